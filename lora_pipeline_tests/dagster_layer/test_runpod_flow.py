"""The RunPod backend end to end through the real Definitions, against the RunPod API double.

Issue 5's "done when": a job submitted on the RunPod backend ends as one completed
version with its URL, whether its completion is seen by webhook, by polling, or
only by the next reconciliation, and every failure the legacy notes list is
handled. Here the double (``FakeRunPod``, real HTTP) stands in for RunPod, the
webhook receiver runs under uvicorn, the sensors are evaluated by hand the way the
daemon would (cursor kept, run keys deduplicated per sensor) and the runs they
request are executed in process with the request's partition, config and tags.

The double's handler is a stub that writes a valid LoRA file where the real worker
would and returns the worker's result shape: the real torch worker under the SDK
is covered in ``backends/test_runpod_real_worker.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pytest

from lora_pipeline.backends.runpod_client import RunPodClient
from lora_pipeline.contracts.training import TrainingRequest, TrainingResult
from lora_pipeline.dataset.ingest import SAMPLE_TRIGGER_WORD, IngestOptions, ingest_dataset, sample_dataset_path
from lora_pipeline.definitions import defs
from lora_pipeline.demo import RUN_KEY_TAG, SensorDaemon, Tick
from lora_pipeline.defs import resources as resources_module
from lora_pipeline.defs.completion_sensors import JOB_TAG
from lora_pipeline.defs.presentation import url_value
from lora_pipeline.registry.jobids import base_job_id
from lora_pipeline.registry.models import RegistryDocument, Version, VersionStatus
from lora_pipeline.registry.names import parse_version_name
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.storage import ObjectStore
from lora_pipeline.storage.breaker import CircuitBreaker
from lora_pipeline.storage.factory import open_store
from lora_pipeline.storage.keys import (
    WEBHOOK_INBOX,
    WEBHOOK_PROCESSED,
    companion_key,
    lora_key,
    lora_prefix,
    registry_key,
)
from lora_pipeline.webhook.app import create_app
from lora_pipeline.webhook.urls import webhook_url
from lora_pipeline_tests.fakes.runpod_api import FakeRunPod
from lora_pipeline_tests.fakes.uvicorn_thread import serve_in_thread
from lora_pipeline_tests.registry.lora_files import lora_bytes, pair_bytes

STYLE = "sample_style"
TOKEN = "flow-test-token-0123456789"
NO_WAIT = {"ops": {"submit_lora_training": {"config": {"wait_for_completion": False}}}}


# -- the worker stand-in ---------------------------------------------------------------


def write_lora_handler(job: dict[str, Any]) -> dict[str, Any]:
    """What the GPU worker does, minus the training: the kohya file, then the LoRA file at the
    request's key in the request's store, and a TrainingResult as the job's output."""
    request = TrainingRequest.model_validate(job["input"])
    number = parse_version_name(request.version)
    assert number is not None and request.storage_url
    key = lora_key(request.style, number)
    kohya = companion_key(request.style, number, "kohya")
    store = open_store(request.storage_url, breaker=False, check=False)
    header = {
        "lora_pipeline.steps": str(request.params.max_train_steps),
        "lora_pipeline.final_loss": "0.125",
        "lora_pipeline.dataset_hash": request.dataset_hash,
        "lora_pipeline.job_id": job["id"],
    }
    store.put(kohya, pair_bytes("kohya", header))
    store.put(key, lora_bytes(header))
    return TrainingResult(
        style=request.style,
        version=request.version,
        lora_key=key,
        dataset_hash=request.dataset_hash,
        steps=request.params.max_train_steps,
        final_loss=0.125,
        duration_s=0.01,
        kohya_key=kohya,
        files={"kohya": kohya, "diffusers": key},
        metadata=header,
    ).model_dump(mode="json")


# -- a hand-cranked daemon -----------------------------------------------------------------


class Daemon(SensorDaemon):
    """The demo's hand-cranked daemon (``lora_pipeline.demo.SensorDaemon``) on the Definitions."""

    def __init__(self, instance: dg.DagsterInstance) -> None:
        super().__init__(defs, instance)

    def completion_runs(self, job_id: str) -> list[dg.DagsterRun]:
        return list(self.instance.get_runs(filters=dg.RunsFilter(tags={JOB_TAG: base_job_id(job_id)})))


# -- fixtures ------------------------------------------------------------------------------


@dataclass
class Flow:
    """One test's world: the store the Definitions use, a Dagster instance, the double."""

    store: ObjectStore
    instance: dg.DagsterInstance
    daemon: Daemon
    start_runpod: Callable[..., FakeRunPod]
    env: pytest.MonkeyPatch

    @property
    def registry(self) -> RegistryStore:
        return RegistryStore(self.store)

    def document(self) -> RegistryDocument:
        return self.registry.read(STYLE)[0]

    def only_version(self) -> Version:
        [version] = self.document().versions
        return version

    def inbox(self) -> list[str]:
        return [info.key for info in self.store.list(WEBHOOK_INBOX + "/")]

    def processed(self) -> list[str]:
        return [info.key for info in self.store.list(WEBHOOK_PROCESSED + "/")]

    def add_dataset(self) -> str:
        report = ingest_dataset(
            self.store, STYLE, sample_dataset_path(), options=IngestOptions(trigger_word=SAMPLE_TRIGGER_WORD)
        )
        return report.dataset_hash

    def train(self, run_config: dict | None = None) -> str:
        """train_lora for the style, as launched from the UI; returns the job id it recorded."""
        if not self.instance.has_dynamic_partition("styles", STYLE):
            self.instance.add_dynamic_partitions("styles", [STYLE])
        result = defs.resolve_job_def("train_lora").execute_in_process(
            instance=self.instance, partition_key=STYLE, run_config=run_config or NO_WAIT, raise_on_error=False
        )
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        return result.output_for_node("submit_lora_training")


@pytest.fixture(scope="module")
def dagster_instance() -> Iterator[dg.DagsterInstance]:
    """One test instance for the module (a fresh one costs about a second): tests share
    nothing through it, since every run they look at is found by its own job's tag."""
    with dg.instance_for_test() as instance:
        yield instance


@pytest.fixture
def flow(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    dagster_instance: dg.DagsterInstance,
) -> Iterator[Flow]:
    """The Definitions on a local store by default; ``@pytest.mark.parametrize('flow', ['s3'],
    indirect=True)`` puts them on the moto S3 server instead."""
    if getattr(request, "param", "local") == "s3":
        request.getfixturevalue("moto_env")
        bucket = request.getfixturevalue("s3_bucket")
        url = f"s3://{bucket}/lora"
        monkeypatch.setenv("LORA_STORAGE_URL", url)
        store = open_store(url, breaker=False, check=False)
    else:
        root = tmp_path / "store"
        monkeypatch.setenv("LORA_STORAGE_URL", str(root))
        store = open_store(str(root), breaker=False)
    fakes: list[FakeRunPod] = []
    clients: list[RunPodClient] = []

    def start_runpod(**options: Any) -> FakeRunPod:
        """The double, started, with RUNPOD_* pointing at it; webhook retries 50 ms apart."""
        options.setdefault("handler", write_lora_handler)
        options.setdefault("webhook_retry_delay_s", 0.05)
        options.setdefault("webhook_timeout_s", 5.0)
        fake = FakeRunPod(**options).start()
        fakes.append(fake)
        monkeypatch.setenv("RUNPOD_ENDPOINT_ID", fake.endpoint_id)
        monkeypatch.setenv("RUNPOD_API_KEY", fake.api_key)
        monkeypatch.setenv("RUNPOD_ENDPOINT_BASE_URL", fake.base_url)
        clients.append(_quick_client(fake))
        return fake

    try:
        yield Flow(store, dagster_instance, Daemon(dagster_instance), start_runpod, monkeypatch)
    finally:
        for fake in fakes:
            fake.stop()
        for client in clients:
            client.close()
        resources_module._runpod_client.cache_clear()


def _quick_client(fake: FakeRunPod) -> RunPodClient:
    """The resource's own (process-wide, cached) client for this endpoint, with the test's
    clock: retries 10 ms apart instead of 0.5 s, and a breaker that half-opens after
    0.2 s instead of 30 s. Everything else is as configured from the environment."""
    client = resources_module._runpod_client(fake.api_key, fake.endpoint_id, fake.base_url)
    assert isinstance(client, RunPodClient)
    client.backoff_base_s = 0.01
    client.max_retry_wait_s = 0.05
    client.breaker = CircuitBreaker("RunPod (test)", fail_max=client.breaker.fail_max, reset_timeout=0.2)
    return client


def runpod_backend():
    """The training backend exactly as the Definitions build it."""
    storage = defs.resources["storage"]
    return defs.resources["training_backend"].get_backend(storage.get_store())  # type: ignore[union-attr]


def assert_completed_with_url(flow: Flow, job_id: str) -> Version:
    """The one outcome every path must reach: one completed version, the job id as RunPod
    returned it, the LoRA file as proof and a stable URL to it."""
    version = flow.only_version()
    key = lora_key(STYLE, 1)
    assert version.status is VersionStatus.completed, version
    assert version.id == job_id
    assert version.s3_key == key
    assert version.lora_url == flow.store.url(key)
    assert "X-Amz-Signature" not in (version.lora_url or "")
    return version


def materialized(run: dg.ExecuteInProcessResult) -> dict[str, dg.AssetMaterialization]:
    return {event.asset_key.to_user_string(): event.materialization for event in run.get_asset_materialization_events()}


# -- the scenarios -------------------------------------------------------------------------


@pytest.mark.parametrize("flow", ["local", "s3"], indirect=True)
def test_webhook_completion_is_recorded_as_one_completed_version(flow: Flow):
    """The main path of the "done when": train_lora submitted as from the UI (the op waits
    for the job), RunPod POSTs the completion to the tokened receiver URL, the webhook
    sensor turns the inbox file into one complete_training run, which records V1 with its
    URL and materializes trained_lora and lora_registry. On the local store and on S3."""
    fake = flow.start_runpod(auto=True, queue_delay_s=0.2)
    with serve_in_thread(create_app(flow.store, TOKEN)) as receiver:
        receiver_url = f"{receiver}/webhooks/runpod"
        flow.env.setenv("LORA_WEBHOOK_URL", receiver_url)
        flow.env.setenv("LORA_WEBHOOK_TOKEN", TOKEN)
        dataset_hash = flow.add_dataset()
        job_id = flow.train(
            {"ops": {"submit_lora_training": {"config": {"poll_interval_s": 0.05, "wait_timeout_s": 30}}}}
        )
        [attempt] = fake.wait_for_webhooks(1)
    assert fake.job(job_id).webhook == webhook_url(receiver_url, TOKEN)
    assert attempt.status_code == 200
    assert len(flow.inbox()) == 1

    tick = flow.daemon.tick("runpod_webhook_sensor")

    [run] = tick.runs
    assert run.success
    assert tick.requests[0].run_key == f"complete:{base_job_id(job_id)}:COMPLETED"
    version = assert_completed_with_url(flow, job_id)
    assert version.dataset_hash == dataset_hash
    assets = materialized(run)
    assert set(assets) == {"trained_lora", "lora_registry"}
    assert assets["trained_lora"].partition == STYLE
    kohya = companion_key(STYLE, 1, "kohya")
    # the primary layout's; a local store's file:// URL is shown as its path
    assert assets["trained_lora"].metadata["url"].value == url_value(flow.store.url(kohya)).value
    assert assets["trained_lora"].metadata["kohya_file"].value == kohya
    assert assets["trained_lora"].metadata["diffusers_url"].value == url_value(version.lora_url).value
    assert assets["trained_lora"].metadata["steps"].value == 30
    assert assets["lora_registry"].metadata["latest_version"].value == "V1"
    checks = run.get_asset_check_evaluations()
    assert len(checks) == 6 and all(check.passed for check in checks), checks  # lora_registry's 5, trained_lora's 1
    assert flow.inbox() == [] and len(flow.processed()) == 1
    assert flow.daemon.tick("runpod_job_sensor").skip_message == "no unfinished jobs"
    assert flow.daemon.tick("runpod_webhook_sensor").runs == []


def test_poll_completion_is_recorded_without_a_webhook(flow: Flow):
    """No receiver is configured (no LORA_WEBHOOK_URL): polling alone must finish the job.
    While it runs the poll sensor only skips; once RunPod says COMPLETED it requests one
    complete_training run, keyed by job and status."""
    fake = flow.start_runpod()
    flow.add_dataset()
    job_id = flow.train()
    assert fake.job(job_id).webhook is None

    running = flow.daemon.tick("runpod_job_sensor")
    assert running.requests == [] and running.skip_message == "1 jobs still running"
    assert flow.only_version().status in (VersionStatus.pending, VersionStatus.starting)

    fake.process(job_id)
    tick = flow.daemon.tick("runpod_job_sensor")

    [request] = tick.requests
    assert (request.job_name, request.run_key) == ("complete_training", f"complete:{base_job_id(job_id)}:COMPLETED")
    assert request.tags["lora_pipeline/source"] == "poll"
    [run] = tick.runs
    assert run.success
    assert_completed_with_url(flow, job_id)
    assert set(materialized(run)) == {"trained_lora", "lora_registry"}
    assert flow.daemon.tick("runpod_job_sensor").skip_message == "no unfinished jobs"


def test_job_whose_status_expired_is_completed_from_its_file_by_the_job_sensor(flow: Flow):
    """The legacy "redis err: client is nil": the job finished while no sensor ran, and
    RunPod forgot it (/status answers 404 after the result TTL). The poll sensor must not
    fail the version: its LoRA is in the store, so the tick completes the version from it and
    requests the one recording run, which materializes trained_lora."""
    fake = flow.start_runpod(result_ttl_s=60)
    flow.add_dataset()
    job_id = flow.train()
    fake.process(job_id)
    fake.advance(61)
    assert (
        httpx.get(
            f"{fake.base_url}/{fake.endpoint_id}/status/{job_id}", headers={"Authorization": f"Bearer {fake.api_key}"}
        ).status_code
        == 404
    )

    tick = flow.daemon.tick("runpod_job_sensor")

    [request] = tick.requests
    assert (request.job_name, request.tags["lora_pipeline/source"]) == ("complete_training", "poll")
    [run] = tick.runs
    assert run.success
    version = assert_completed_with_url(flow, job_id)
    assert version.error is None
    trained = materialized(run)["trained_lora"]
    assert trained.partition == STYLE and trained.metadata["version"].value == version.name
    assert flow.daemon.tick("runpod_job_sensor").skip_message == "no unfinished jobs"


@pytest.mark.parametrize(
    ("double", "use_webhook"),
    [
        (dict(id_suffix="e2", webhook_id_form="base"), True),
        (dict(id_suffix="u1", status_lookup="base"), False),
        (dict(id_suffix="e1", status_lookup="full", webhook_id_form="base"), False),
    ],
    ids=["webhook-names-the-bare-uuid", "status-knows-only-the-bare-uuid", "status-knows-only-the-full-id"],
)
def test_suffixed_job_ids_still_complete_one_version(flow: Flow, double: dict, use_webhook: bool):
    """The legacy notes' suffix confusion, in both directions: RunPod returns `<uuid>-e2`
    (or `-u1`) but its webhook names the bare UUID, or its /status answers only one of the
    two forms. Matching by base UUID must still complete the one version, and the id kept is
    the one RunPod returned at submission."""
    fake = flow.start_runpod(**double)
    flow.add_dataset()
    if use_webhook:
        with serve_in_thread(create_app(flow.store, TOKEN)) as receiver:
            flow.env.setenv("LORA_WEBHOOK_URL", receiver)
            flow.env.setenv("LORA_WEBHOOK_TOKEN", TOKEN)
            job_id = flow.train()
            fake.process(job_id)
            [attempt] = fake.wait_for_webhooks(1)
        assert attempt.job_id == base_job_id(job_id) != job_id
        tick = flow.daemon.tick("runpod_webhook_sensor")
    else:
        job_id = flow.train()
        fake.process(job_id)
        tick = flow.daemon.tick("runpod_job_sensor")

    assert job_id.endswith("-" + double["id_suffix"])
    [request] = tick.requests  # seen by this path itself, not left to reconciliation
    assert (request.job_name, request.run_key) == ("complete_training", f"complete:{base_job_id(job_id)}:COMPLETED")
    [run] = tick.runs
    assert run.success
    assert_completed_with_url(flow, job_id)


def test_failed_attempt_then_completed_retry_is_one_completed_version(flow: Flow):
    """A job fails (out of memory), the operator retries it (RunPod /retry, same job, a new
    suffix), and the retry completes: one version, failed first and then completed, not a
    failed V1 and a stray completion. Each outcome has its own run key."""
    fake = flow.start_runpod(retry_suffix="e2")
    flow.add_dataset()
    with serve_in_thread(create_app(flow.store, TOKEN)) as receiver:
        flow.env.setenv("LORA_WEBHOOK_URL", receiver)
        flow.env.setenv("LORA_WEBHOOK_TOKEN", TOKEN)
        job_id = flow.train()
        fake.process(job_id, {"status": "FAILED", "error": "CUDA out of memory"})
        fake.wait_for_webhooks(1)

        failed = flow.daemon.tick("runpod_webhook_sensor")
        [failed_run] = failed.runs
        assert not failed_run.success  # no LoRA: the run says so
        version = flow.only_version()
        assert version.status is VersionStatus.failed and "CUDA out of memory" in (version.error or "")

        retried = runpod_backend().retry(job_id)
        assert (retried.status, retried.id) == ("IN_QUEUE", f"{base_job_id(job_id)}-e2")
        fake.process(job_id)
        fake.wait_for_webhooks(2)

    completed = flow.daemon.tick("runpod_webhook_sensor")

    [run] = completed.runs
    assert run.success
    assert [r.run_key for t in (failed, completed) for r in t.requests] == [
        f"complete:{base_job_id(job_id)}:FAILED",
        f"complete:{base_job_id(job_id)}:COMPLETED",
    ]
    version = flow.only_version()
    assert version.status is VersionStatus.completed
    assert base_job_id(version.id or "") == base_job_id(job_id)
    assert version.lora_url == flow.store.url(lora_key(STYLE, 1))
    assert flow.inbox() == []


def test_duplicate_and_late_webhooks_record_one_completion(flow: Flow):
    """RunPod redelivers a webhook whose 200 it did not see, and a stale report can arrive
    after the job was recorded. Duplicates write nothing to the inbox, the sensor asks for
    one run per job and status, and a late FAILED for a completed job changes nothing."""
    fake = flow.start_runpod()
    flow.add_dataset()
    with serve_in_thread(create_app(flow.store, TOKEN)) as receiver:
        flow.env.setenv("LORA_WEBHOOK_URL", receiver)
        flow.env.setenv("LORA_WEBHOOK_TOKEN", TOKEN)
        hook = webhook_url(receiver, TOKEN)
        job_id = flow.train()
        fake.process(job_id)
        fake.wait_for_webhooks(1)
        body = json.dumps(fake.job(job_id).body())
        redelivered = [httpx.post(hook, content=body) for _ in range(2)]
        assert [(r.status_code, r.json()["stored"]) for r in redelivered] == [(200, False), (200, False)]
        assert len(flow.inbox()) == 1

        first = flow.daemon.tick("runpod_webhook_sensor")
        [run] = first.runs
        assert run.success
        assert_completed_with_url(flow, job_id)
        recorded = flow.store.get(registry_key(STYLE)).data

        again = httpx.post(hook, content=body)
        late = httpx.post(hook, content=json.dumps({"id": job_id, "status": "FAILED", "error": "worker lost"}))
        assert (again.json()["stored"], late.json()["stored"]) == (False, True)

        later = [flow.daemon.tick("runpod_webhook_sensor") for _ in range(2)]

    assert [t.requests for t in later] == [[], []]
    assert flow.store.get(registry_key(STYLE)).data == recorded
    assert flow.inbox() == [] and len(flow.processed()) == 2
    [completion] = flow.daemon.completion_runs(job_id)
    assert completion.tags[RUN_KEY_TAG] == f"complete:{base_job_id(job_id)}:COMPLETED"
    assert flow.daemon.tick("runpod_job_sensor").skip_message == "no unfinished jobs"


def test_runpod_api_down_skips_the_poll_and_loses_nothing(flow: Flow):
    """RunPod's API answers 503 for a while. The poll sensor skips with a reason (the first
    tick after its retries, later ticks at once, the breaker being open), the version stays
    pending with its job id, and once the API is back the completion is recorded."""
    fake = flow.start_runpod()
    flow.add_dataset()
    job_id = flow.train()
    fake.process(job_id)
    fake.down = True

    first = flow.daemon.tick("runpod_job_sensor")
    calls = fake.requests["status"]
    second = flow.daemon.tick("runpod_job_sensor")

    for tick in (first, second):
        assert tick.requests == []
        assert tick.skip_message and tick.skip_message.startswith("RunPod unavailable")
    assert fake.requests["status"] == calls, "the open breaker must spare the dead API"
    version = flow.only_version()
    assert version.id == job_id and version.status in (VersionStatus.pending, VersionStatus.starting)
    assert flow.daemon.completion_runs(job_id) == []

    fake.down = False
    time.sleep(0.25)  # the breaker's (test-sized) reset timeout: the next call is a probe
    back = flow.daemon.tick("runpod_job_sensor")

    [run] = back.runs
    assert run.success
    assert_completed_with_url(flow, job_id)


@pytest.mark.parametrize("outcome", ["COMPLETED", "FAILED"])
def test_webhook_before_the_job_id_is_recorded_is_not_lost(flow: Flow, outcome: str):
    """The job can end, and its webhook land and be read by the sensor, between RunPod
    accepting /run and the training op writing the job id into the registry. The webhook
    must be neither lost nor misfiled. A COMPLETED one names its style and LoRA in its
    output, so it is recorded at once from the file in the store (the version reserved
    for the job completes, and gets its id when the op's write lands); a FAILED one names
    nothing, so it stays in the inbox until the id is known and is recorded then."""
    fake = flow.start_runpod()
    flow.add_dataset()
    client = resources_module._runpod_client(fake.api_key, fake.endpoint_id, fake.base_url)
    early: list[Tick] = []
    submit = client.submit

    def submit_and_end_at_once(request, **kwargs):
        job_id = submit(request, **kwargs)
        fake.process(job_id, None if outcome == "COMPLETED" else {"status": "FAILED", "error": "CUDA out of memory"})
        fake.wait_for_webhooks(1)
        early.append(flow.daemon.tick("runpod_webhook_sensor"))
        return job_id

    with serve_in_thread(create_app(flow.store, TOKEN)) as receiver:
        flow.env.setenv("LORA_WEBHOOK_URL", receiver)
        flow.env.setenv("LORA_WEBHOOK_TOKEN", TOKEN)
        flow.env.setattr(client, "submit", submit_and_end_at_once)
        job_id = flow.train()
    later = flow.daemon.tick("runpod_webhook_sensor")

    [before] = early
    if outcome == "COMPLETED":
        [run] = before.runs
        assert run.success, "the LoRA is in the store: its run must not fail"
        assert set(materialized(run)) == {"trained_lora", "lora_registry"}
        assert later.runs == []
        assert_completed_with_url(flow, job_id)
    else:
        assert before.runs == [] and before.skip_message == "no new webhook files (1 kept)"
        [run] = later.runs
        assert not run.success  # no LoRA: the run says so
        version = flow.only_version()
        assert (version.status, version.id) == (VersionStatus.failed, job_id)
        assert "CUDA out of memory" in (version.error or "")
    assert flow.inbox() == [] and len(flow.processed()) == 1
    assert flow.daemon.tick("runpod_job_sensor").skip_message == "no unfinished jobs"


# -- progress while training ---------------------------------------------------------------------


def _heartbeat(fake: FakeRunPod, job_id: str, step: int, at: str) -> None:
    """What the worker's runpod.serverless.progress_update does on RunPod."""
    fake.progress_update({"id": job_id}, {"phase": "training", "step": step, "total": 30, "loss": 0.5, "at": at})


def test_the_poll_sensor_records_a_running_jobs_progress_once(flow: Flow):
    fake = flow.start_runpod()
    flow.add_dataset()
    job_id = flow.train()
    fake.start_job(job_id)
    now = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    _heartbeat(fake, job_id, 12, now)

    assert flow.daemon.tick("runpod_job_sensor").skip_message == "1 jobs still running"
    version = flow.only_version()
    assert version.status == VersionStatus.training
    assert version.progress is not None and (version.progress.step, version.progress.total) == (12, 30)
    assert version.progress.stalled is None
    etag = flow.registry.read(STYLE)[1]
    flow.daemon.tick("runpod_job_sensor")  # the same update: no write
    assert flow.registry.read(STYLE)[1] == etag

    _heartbeat(fake, job_id, "twelve", now)  # a bad update: logged and ignored, the tick goes on
    assert flow.daemon.tick("runpod_job_sensor").skip_message == "1 jobs still running"
    assert flow.only_version().progress.step == 12


@pytest.mark.parametrize("cancel", [False, True])
def test_a_stalled_job_is_flagged_and_cancelled_only_with_the_setting(flow: Flow, cancel: bool):
    flow.env.setenv("LORA_STALL_AFTER_S", "60")
    if cancel:
        flow.env.setenv("LORA_CANCEL_STALLED", "true")
    fake = flow.start_runpod()
    flow.add_dataset()
    job_id = flow.train()
    fake.start_job(job_id)
    _heartbeat(fake, job_id, 3, time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - 3600)))

    flow.daemon.tick("runpod_job_sensor")

    version = flow.only_version()
    assert version.progress is not None and version.progress.stalled is not None
    assert "(LORA_STALL_AFTER_S=60)" in version.progress.stalled
    if cancel:
        assert fake.job(job_id).status == "CANCELLED"
        assert version.status == VersionStatus.failed and version.job_status == "CANCELLED"
        assert flow.daemon.tick("runpod_job_sensor").skip_message == "no unfinished jobs"
    else:
        assert fake.job(job_id).status == "IN_PROGRESS" and version.status == VersionStatus.training


def test_the_demo_settles_a_job_runpod_forgot_before_the_first_poll(flow: Flow):
    """Issue 22: with RunPod keeping a status 1 s, the job finishes and is forgotten before any
    sensor polls it. Its file is in the store, so the job sensor completes the version on that
    tick and requests the one recording run; no reconciliation is needed."""
    from lora_pipeline.demo import run_demo

    fake = flow.start_runpod(result_ttl_s=1)
    lines: list[str] = []

    def echo(line: str) -> None:
        lines.append(line)
        if line.strip().endswith("submitted"):  # before the first tick: the job ends and expires
            job = fake.process()
            fake.advance(2)
            assert fake.job(job.id).status == "COMPLETED"

    result = run_demo(STYLE, timeout_s=60, poll_interval_s=0.1, echo=echo)

    [version] = result.document.versions
    assert version.status is VersionStatus.completed and version.id == result.job_id
    assert [line.strip() for line in lines if "→" in line] == ["runpod_job_sensor → complete_training (poll)"]


def test_the_demo_runs_the_reconciliation_the_job_sensor_requests(flow: Flow):
    """The same forgotten job, its file not in the store yet at the first tick: the job sensor
    requests reconcile_registry and the demo runs it, as the daemon would (it ran only
    complete_training before, and gave up after its timeout); the file lands, and a later tick
    completes the version from it."""
    from lora_pipeline.demo import run_demo

    fake = flow.start_runpod(result_ttl_s=1)
    lines: list[str] = []
    held: dict[str, bytes] = {}

    def echo(line: str) -> None:
        lines.append(line)
        if line.strip().endswith("submitted"):
            fake.process()
            fake.advance(2)
            for info in list(flow.store.list(lora_prefix(STYLE))):  # the upload is late
                held[info.key] = flow.store.get(info.key).data
                flow.store.delete(info.key)
        if "→ reconcile_registry" in line:
            for key, data in held.items():
                flow.store.put(key, data)

    result = run_demo(STYLE, timeout_s=60, poll_interval_s=0.1, echo=echo)

    [version] = result.document.versions
    assert held and version.status is VersionStatus.completed and version.id == result.job_id
    assert any("runpod_job_sensor → reconcile_registry" in line for line in lines), lines
