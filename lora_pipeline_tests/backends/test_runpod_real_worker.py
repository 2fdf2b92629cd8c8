"""Both backends run the real worker handler end to end (tiny model, a few CPU steps)."""

from __future__ import annotations

import json
import time

import pytest

from lora_pipeline.backends.base import ExecutionPolicy
from lora_pipeline.backends.local import LocalBackend
from lora_pipeline.backends.runpod_client import RunPodClient
from lora_pipeline.contracts.training import TrainingParams, TrainingRequest
from lora_pipeline.dataset.ingest import SAMPLE_TRIGGER_WORD, IngestOptions, ingest_dataset, sample_dataset_path
from lora_pipeline.storage.keys import WEBHOOK_INBOX
from lora_pipeline.webhook.app import create_app
from lora_pipeline.webhook.inbox import list_inbox
from lora_pipeline.webhook.urls import webhook_url
from lora_pipeline_tests.fakes.runpod_api import FakeRunPod
from lora_pipeline_tests.fakes.uvicorn_thread import serve_in_thread

pytestmark = pytest.mark.slow
TOKEN = "s3cret-token-0123456789"
POLICY = ExecutionPolicy(execution_timeout_ms=600_000, ttl_ms=1_200_000)


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("lora-pipeline-cache"))


@pytest.fixture(autouse=True)
def _tiny_model_cache(_hermetic_env, model_cache, monkeypatch) -> None:
    """'tiny' builds once for this module, in a temporary cache (never ~/.cache)."""
    monkeypatch.setenv("LORA_PIPELINE_CACHE", model_cache)


def training_request(store, version: str) -> TrainingRequest:
    report = ingest_dataset(
        store, "sample_style", sample_dataset_path(), options=IngestOptions(trigger_word=SAMPLE_TRIGGER_WORD)
    )
    params = TrainingParams(rank=4, resolution=64, max_train_steps=2, learning_rate=1e-3)
    return TrainingRequest(
        style="sample_style",
        version=version,
        dataset_hash=report.manifest.dataset_hash,
        params=params,
        storage_url=store.describe(),
        request_id=f"test-{version}",
    )


def test_local_backend_trains_and_drops_the_webhook(local_store, tmp_path):
    backend = LocalBackend(local_store, tmp_path / "jobs")
    job_id = backend.submit(training_request(local_store, "V1"), webhook_url=None, policy=POLICY)
    status = backend.wait(job_id, timeout_s=280)
    assert status.status == "COMPLETED", backend.log_path(job_id).read_text()[-3000:]
    assert local_store.head(status.output["lora_key"]) is not None
    deadline = time.monotonic() + 30
    while not (items := list(list_inbox(local_store))) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [item.body for item in items] == [status.to_body()]


def test_runpod_double_runs_the_real_handler_and_posts_the_webhook(local_store):
    from lora_pipeline.worker.handler import handler

    request = training_request(local_store, "V2")
    with serve_in_thread(create_app(local_store, TOKEN)) as base, FakeRunPod(auto=True, handler=handler) as fake:
        client = RunPodClient(fake.api_key, fake.endpoint_id, base_url=fake.base_url)
        job_id = client.submit(request, webhook_url=webhook_url(base, TOKEN), policy=POLICY)
        fake.wait_for_webhooks(1, timeout_s=280)
        status = client.status(job_id)
    assert status.status == "COMPLETED", status.error
    assert local_store.head(status.output["lora_key"]) is not None
    (info,) = list(local_store.list(WEBHOOK_INBOX + "/"))
    assert json.loads(local_store.get(info.key).data) == status.to_body()
