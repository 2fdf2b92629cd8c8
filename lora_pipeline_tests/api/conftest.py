"""The API served over real HTTP (uvicorn in a thread) on a local or S3 (moto) store."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest

from lora_pipeline.api.app import ApiConfig, create_app
from lora_pipeline.api.dagster_client import DagsterClient
from lora_pipeline.dataset.ingest import sample_dataset_path
from lora_pipeline.storage.base import ObjectStore
from lora_pipeline.storage.local import LocalStore
from lora_pipeline_tests.fakes.uvicorn_thread import serve_in_thread

TOKEN = "app-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@dataclass
class Api:
    url: str
    store: ObjectStore
    client: httpx.Client

    def call(self, method: str, path: str, *, token: str | None = TOKEN, **kwargs) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return self.client.request(method, self.url + path, headers=headers, **kwargs)


def config_for(store: ObjectStore, **overrides) -> ApiConfig:
    base = ApiConfig(
        token=TOKEN,
        admin_token=ADMIN,
        webhook_secret=SECRET,
        local_store=isinstance(store, LocalStore),
        pump_interval_s=0,
        version_wait_s=0,
    )
    return replace(base, **overrides)


@contextlib.contextmanager
def running_api(store: ObjectStore, dagster_url: str = "http://127.0.0.1:9", **overrides) -> Iterator[Api]:
    """The app on a free port; Dagster at ``dagster_url`` (a dead port unless a test needs it)."""
    dagster = DagsterClient(dagster_url, timeout=5)
    app = create_app(store, dagster, config_for(store, **overrides))
    with serve_in_thread(app, lifespan="on") as url, httpx.Client(timeout=60) as client:
        yield Api(url, store, client)
    dagster.close()


@pytest.fixture
def api(store) -> Iterator[Api]:
    """The API on each store backend (local: URLs it serves itself; S3 on moto: presigned)."""
    with running_api(store) as running:
        yield running


def sample_files() -> list[Path]:
    return sorted(p for p in sample_dataset_path().iterdir() if p.is_file())


def content_type(path: Path) -> str:
    return {".png": "image/png", ".jpg": "image/jpeg", ".txt": "text/plain"}[path.suffix]


def declare(files: list[Path]) -> dict:
    return {"files": [{"name": p.name, "size": p.stat().st_size, "contentType": content_type(p)} for p in files]}


def put_all(api: Api, answer: dict, files: list[Path]) -> None:
    """PUT each file to its URL with the headers the upload named (no bearer token)."""
    by_name = {p.name: p for p in files}
    for f in answer["files"]:
        response = api.client.put(f["url"], content=by_name[f["name"]].read_bytes(), headers=f["headers"])
        assert response.status_code == 200, response.text


def upload(api: Api, style: str, files: list[Path] | None = None) -> dict:
    """Declare, PUT and complete ``files`` (default: the bundled sample): the complete's answer."""
    files = files or sample_files()
    started = api.call("POST", f"/v1/styles/{style}/uploads", json=declare(files))
    assert started.status_code == 201, started.text
    put_all(api, started.json(), files)
    done = api.call("POST", f"/v1/styles/{style}/uploads/{started.json()['uploadId']}/complete")
    assert done.status_code == 200, done.text
    return done.json()
