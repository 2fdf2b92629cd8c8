"""The API against a real Dagster instance on the embedded defaults' instance file (SQLite, the
queued coordinator, the runpod_gpu pool: `make dev`'s dagster.dev.yaml), with S3 on moto."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from unittest import mock

import pytest

from lora_pipeline.deploy.local import LocalDeployment
from lora_pipeline.storage.s3 import S3Store
from lora_pipeline_tests.conftest import _drop_bucket, free_port, moto_client, moto_options
from lora_pipeline_tests.fakes.uvicorn_thread import serve_in_thread

from .app_flow import FLOW_STYLE, images_to_downloadable_lora, version_of_run, wait_for
from .conftest import running_api
from .test_api_callbacks import Receiver

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def s3_dagster(tmp_path_factory, moto_server, boto_session):
    """A bucket on moto and a Dagster (code server, webserver, daemon) whose store it is."""
    client = moto_client(boto_session, moto_server)
    bucket = f"api-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    root = tmp_path_factory.mktemp("embedded")
    env = {
        "LORA_STORAGE_URL": f"s3://{bucket}/lora",
        "AWS_ENDPOINT_URL_S3": moto_server,
        "LORA_S3_ADDRESSING_STYLE": "path",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_REGION": "us-east-1",
        "LORA_LOCAL_JOBS_DIR": str(root / "jobs"),
        "LORA_PIPELINE_CACHE": str(tmp_path_factory.getbasetemp() / "demo-model-cache"),
    }
    dep = LocalDeployment(
        root,
        code_port=free_port(),
        web_port=free_port(),
        instance_yaml=REPO / "dagster.dev.yaml",
        extra_env=env,
    )
    try:
        with mock.patch.dict(os.environ, {"DAGSTER_HOME": str(dep.home)}):
            dep.up()
        store = S3Store(client, bucket, "lora", options=moto_options(moto_server)).check(probe_conditional_writes=False)
        yield dep, store
    finally:
        for log in sorted((root / "logs").glob("*.log")):
            print(f"--- {log.name} ---\n{log.read_text(errors='replace')[-1500:]}")
        dep.down()
        _drop_bucket(client, bucket)


@pytest.fixture
def receiver():
    with serve_in_thread((r := Receiver()).app()) as url:
        r.url = url + "/hook"
        yield r


def test_images_to_a_downloadable_lora_with_a_signed_callback(s3_dagster, receiver):
    dep, store = s3_dagster
    with running_api(store, dep.url, pump_interval_s=1, version_wait_s=30) as api:
        images_to_downloadable_lora(api, receiver, dep.url)


def test_a_training_is_cancelled_through_its_run_and_the_app_is_told(s3_dagster, receiver):
    dep, store = s3_dagster
    with running_api(store, dep.url, pump_interval_s=1, version_wait_s=30) as api:
        if api.call("GET", f"/v1/styles/{FLOW_STYLE}/versions").status_code == 404:
            from .conftest import upload

            upload(api, FLOW_STYLE)
        started = api.call(
            "POST",
            f"/v1/styles/{FLOW_STYLE}/trainings",
            json={"params": {"max_train_steps": 400}, "force": True, "webhook": receiver.url},
        ).json()
        version = version_of_run(api, FLOW_STYLE, started)
        cancelled = api.call("POST", f"/v1/styles/{FLOW_STYLE}/trainings/{version}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["terminatedRuns"] == [started["runId"]]
        [(_id, event)] = wait_for("the callback", lambda: list(receiver.verified), 240, every=0.5)
        assert event["type"] in ("training.failed", "training.canceled") and event["data"]["version"] == version
        again = api.call("POST", f"/v1/styles/{FLOW_STYLE}/trainings/{version}/cancel")
        assert again.status_code == 409 and "nothing to cancel" in again.json()["error"]
