"""Fixtures for the Dagster layer: a configured local store, resources, a stub backend."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import httpx
import pytest

from lora_pipeline.backends.base import JobNotFound
from lora_pipeline.contracts.job_status import JobStatus
from lora_pipeline.defs.declared_styles import DECLARED_STYLES, declared_styles
from lora_pipeline.defs.resources import StorageResource, TrainingBackendResource
from lora_pipeline.registry.evidence import Submission
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.storage.local import LocalStore
from lora_pipeline_tests.conftest import free_port
from lora_pipeline_tests.dataset.builders import write_files


@pytest.fixture
def store_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "store"
    monkeypatch.setenv("LORA_STORAGE_URL", str(path))
    return path


@pytest.fixture
def store(store_dir: Path) -> LocalStore:
    return LocalStore(store_dir)


@pytest.fixture
def instance():
    with dg.instance_for_test() as instance:
        yield instance


class StubBackend:
    """A training backend whose answers a test scripts: job id → status body or exception."""

    def __init__(self) -> None:
        self.answers: dict[str, JobStatus | Exception] = {}
        self.submitted: list = []
        self.cancelled: list[str] = []

    def submit(self, request, *, webhook_url, policy) -> str:
        job_id = f"0000000{len(self.submitted)}-1111-4222-8333-444455556666-u1"
        self.submitted.append(request)
        self.answers[job_id] = JobStatus(id=job_id, status="IN_QUEUE")
        return job_id

    def status(self, job_id: str) -> JobStatus:
        answer = self.answers.get(job_id) or JobNotFound(job_id)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def cancel(self, job_id: str) -> JobStatus:
        self.cancelled.append(job_id)
        self.answers[job_id] = JobStatus(id=job_id, status="CANCELLED")
        return self.answers[job_id]


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> StubBackend:
    stub = StubBackend()
    monkeypatch.setattr(TrainingBackendResource, "get_backend", lambda self, store: stub)
    return stub


@pytest.fixture
def resources(store_dir: Path) -> dict:
    return {
        "storage": StorageResource(storage_url=str(store_dir)),
        "training_backend": TrainingBackendResource(),
        DECLARED_STYLES: declared_styles(),
    }


def submit_pending(store: LocalStore, style: str, job_id: str, version: int = 1) -> None:
    """A version submitted to RunPod and not finished yet, as the training op leaves it."""
    RegistryStore(store).apply(
        style,
        [Submission(style, version, f"req-{version}", job_id, "ab" * 32, {"rank": 4}, datetime.now(UTC))],
    )


def dg_project(root: Path, declarations: dict[str, str]) -> str:
    """A dg project at ``root`` (pyproject [tool.dg]) whose defs folder holds one
    ``<name>/defs.yaml`` per declaration; returns its root module, a fresh name each time."""
    module = f"team_{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text(
        "[tool.dg]\n"
        'directory_type = "project"\n\n'
        "[tool.dg.project]\n"
        f'root_module = "{module}"\n'
        f'defs_module = "{module}.defs"\n'
    )
    write_files(root, {f"{module}/__init__.py": "", f"{module}/defs/__init__.py": ""})
    write_files(root, {f"{module}/defs/{name}/defs.yaml": text for name, text in declarations.items()})
    return module


def dg_env(**extra: str) -> dict[str, str]:
    """The environment of an activated venv (what the Makefile's $(DG) sets), plus ``extra``."""
    return {
        **os.environ,
        "VIRTUAL_ENV": str(Path(sys.executable).parent.parent),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        **extra,
    }


@contextmanager
def dg_dev(cwd: Path, log_path: Path, **env: str) -> Iterator[str]:
    """`dg dev` (what `make dev` runs: webserver + daemon) on a free local port with ``env``;
    yields its URL once /server_info answers, and stops its whole process group after."""
    port = free_port()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("dg")), "dev", "-h", "127.0.0.1", "-p", str(port)],
            cwd=cwd,
            env=dg_env(**env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the webserver, daemon and code servers go with it
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"dg dev exited: {log_path.read_text()[-2000:]}")
                try:
                    if httpx.get(f"{url}/server_info", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail("dg dev's webserver did not answer within 180 s")
                time.sleep(0.5)
            yield url
        finally:
            # The whole group; `dagster dev` sometimes hangs on SIGTERM, and its instance is thrown away.
            for sig, grace_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=grace_s)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
