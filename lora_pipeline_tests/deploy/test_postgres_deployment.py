"""The production shape, for real: Postgres, and the code server, webserver and daemon as
separate OS processes (what `make prod-local` starts), the queued run coordinator and the
runpod_gpu pool. Runs are submitted through the webserver's GraphQL API, as the UI submits
them, and launched by the daemon; training runs on the local backend (the worker in a
subprocess, the tiny built-in model).

The tests share one deployment and run in file order; each uses its own styles.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import httpx
import pytest
from dagster_graphql import DagsterGraphQLClient

from lora_pipeline.dataset.ingest import ingest_dataset, sample_dataset_path
from lora_pipeline.defs.jobs import GPU_POOL
from lora_pipeline.defs.partitions import STYLES_PARTITIONS_NAME
from lora_pipeline.defs.resources import TrainingBackendResource
from lora_pipeline.registry.models import VersionStatus
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.storage.local import LocalStore
from lora_pipeline_tests.deploy.conftest import free_port

pytestmark = pytest.mark.slow

LOCATION, REPOSITORY = "lora_pipeline", "__repository__"
CHAIN = ["training_dataset", "trained_lora", "lora_registry"]
FAST = {"params": {"max_train_steps": 4}, "poll_interval_s": 0.5}
SLOWER = {**FAST, "params": {"max_train_steps": 12}}  # holds the slot long enough to restart around it
DONE = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


@pytest.fixture(scope="module")
def instance(deployment):
    """The deployment's instance (Postgres), opened from the test process's own DAGSTER_HOME."""
    with dg.DagsterInstance.get() as inst:
        assert type(inst.run_storage).__name__ == "PostgresRunStorage"
        yield inst


@pytest.fixture(scope="module")
def store(deployment) -> LocalStore:
    return LocalStore(deployment.extra_env["LORA_STORAGE_URL"])


def submit(dep, job: str, style: str, run_config: dict | None = None, assets: list[str] | None = None) -> str:
    client = DagsterGraphQLClient(dep.host, port_number=dep.web_port)
    return client.submit_job_execution(
        job,
        repository_location_name=LOCATION,
        repository_name=REPOSITORY,
        run_config=run_config or {},
        tags={"dagster/partition": style},
        asset_selection=[dg.AssetKey(a) for a in assets] if assets else None,
    )


def gql(dep, query: str, **variables) -> dict:
    answer = httpx.post(f"{dep.url}/graphql", json={"query": query, "variables": variables}, timeout=60).json()
    assert "errors" not in answer, answer
    return answer["data"]


def wait_done(instance, run_id: str, timeout_s: float = 240) -> dg.DagsterRun:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = instance.get_run_by_id(run_id)
        if run is not None and run.status in DONE:
            return run
        time.sleep(0.5)
    pytest.fail(f"run {run_id} not finished after {timeout_s}s: {instance.get_run_by_id(run_id).status}")


def events(instance, run_id: str) -> list[dg.EventLogEntry]:
    return [e for e in instance.all_logs(run_id) if e.dagster_event is not None]


def event_types(instance, run_id: str) -> list[str]:
    return [e.dagster_event.event_type_value for e in events(instance, run_id)]


def step_interval(instance, run_id: str, step: str) -> tuple[float, float]:
    times = {
        e.dagster_event.event_type_value: e.timestamp
        for e in events(instance, run_id)
        if e.step_key == step and e.dagster_event.event_type_value in ("STEP_START", "STEP_SUCCESS")
    }
    return times["STEP_START"], times["STEP_SUCCESS"]


def add_style(instance, store: LocalStore, style: str) -> None:
    ingest_dataset(store, style, sample_dataset_path())
    instance.add_dynamic_partitions(STYLES_PARTITIONS_NAME, [style])


def versions(store: LocalStore, style: str):
    document, _ = RegistryStore(store).read(style)
    return document.versions


def test_instance_is_postgres_with_the_pool_set_explicitly(deployment, instance):
    """`deploy init` set the pool's limit itself (no default limit: dagster#33552)."""
    info = instance.event_log_storage.get_concurrency_info(GPU_POOL)
    assert (info.slot_count, info.using_default_limit) == (1, False)
    assert instance.get_dynamic_partitions(STYLES_PARTITIONS_NAME) == ["sample_style"]
    assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
    pids = {name: deployment.record(name).pgid for name in ("code-server", "webserver", "daemon")}
    assert len(set(pids.values()) | {os.getpid()}) == 4


def test_sample_chain_runs_through_the_queue(deployment, instance, store):
    """The UI's 'Materialize selected' for sample_style: enqueued by the webserver, launched
    by the daemon, executed by a run process the code server starts."""
    run_id = submit(deployment, "__ASSET_JOB", "sample_style", {"ops": {"trained_lora": {"config": FAST}}}, CHAIN)
    run = wait_done(instance, run_id)
    assert run.status == dg.DagsterRunStatus.SUCCESS, event_types(instance, run_id)
    types = event_types(instance, run_id)
    # enqueued by the webserver (QueuedRunCoordinator), then launched by the daemon
    assert types.index("PIPELINE_ENQUEUED") < types.index("PIPELINE_STARTING") < types.index("PIPELINE_START")
    materialized = {
        e.dagster_event.asset_key.to_user_string()
        for e in events(instance, run_id)
        if e.dagster_event.event_type_value == "ASSET_MATERIALIZATION"
    }
    assert materialized == set(CHAIN)
    [version] = versions(store, "sample_style")
    assert version.status is VersionStatus.completed


def test_two_runs_race_for_a_gpu_pool_of_one_across_a_webserver_and_daemon_restart(deployment, instance, store):
    """train_lora's op and trained_lora (materialized from the UI) share runpod_gpu: with one
    slot, one waits while the other holds it (the daemon keeps a run whose pool is full in the
    queue; a step that got past it would wait for a slot), and their GPU steps never overlap.
    While one holds the slot and the other waits, the daemon and the webserver are stopped and
    started again: the running run outlives both, the waiting one is launched once, later."""
    for style in ("pool_a", "pool_b"):
        add_style(instance, store, style)
    a = submit(deployment, "train_lora", "pool_a", {"ops": {"submit_lora_training": {"config": SLOWER}}})
    b = submit(deployment, "__ASSET_JOB", "pool_b", {"ops": {"trained_lora": {"config": FAST}}}, ["trained_lora"])

    def waiting() -> bool:
        info = instance.event_log_storage.get_concurrency_info(GPU_POOL)
        statuses = {instance.get_run_by_id(r).status for r in (a, b)}
        assert info.active_slot_count <= 1
        return info.active_slot_count == 1 and (info.pending_step_count > 0 or dg.DagsterRunStatus.QUEUED in statuses)

    deadline = time.monotonic() + 180
    while not waiting():
        assert time.monotonic() < deadline, "never one run holding the slot while the other waited"
        time.sleep(0.2)
    before = {r: instance.get_run_by_id(r).status for r in (a, b)}
    deployment.stop("daemon")
    deployment.stop("webserver")
    assert not deployment.running("daemon") and not deployment.running("webserver")  # whole groups gone
    assert {r: instance.get_run_by_id(r).status for r in (a, b)} == before  # nothing moved meanwhile
    deployment.start("webserver")
    deployment.start("daemon")
    deployment.wait_webserver(120)

    deadline = time.monotonic() + 300
    while not all(instance.get_run_by_id(r).status in DONE for r in (a, b)) and time.monotonic() < deadline:
        waiting()  # asserts at most one slot is ever held
        time.sleep(0.2)
    for run_id in (a, b):
        assert wait_done(instance, run_id).status == dg.DagsterRunStatus.SUCCESS, event_types(instance, run_id)
        types = event_types(instance, run_id)
        assert types.count("PIPELINE_STARTING") == types.count("PIPELINE_START") == 1, types
    (a0, a1), (b0, b1) = (
        step_interval(instance, a, "submit_lora_training"),
        step_interval(instance, b, "trained_lora.train_on_gpu"),
    )
    assert a1 <= b0 or b1 <= a0, "the two GPU steps ran at the same time"


def _sensor_id(dep, name: str) -> str:
    data = gql(
        dep,
        """query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) {
        __typename ... on Sensor { id } } }""",
        s={"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "sensorName": name},
    )
    return data["sensorOrError"]["id"]


def test_webhook_file_starts_complete_training_in_the_daemon(deployment, instance, store, tmp_path):
    """A RunPod webhook POSTed to the receiver (its own process) lands in the inbox; the
    webhook sensor, ticking in the daemon, requests the complete_training run that records it.
    The job sensor is stopped so that only the webhook can complete the job."""
    data = gql(
        deployment,
        """mutation($id: String) { stopSensor(id: $id) { __typename
        ... on StopSensorMutationResult { instigationState { status } } } }""",
        id=_sensor_id(deployment, "runpod_job_sensor"),
    )
    assert data["stopSensor"]["instigationState"]["status"] == "STOPPED"
    add_style(instance, store, "hooked")
    config = {**FAST, "wait_for_completion": False}
    train = submit(deployment, "train_lora", "hooked", {"ops": {"submit_lora_training": {"config": config}}})
    assert wait_done(instance, train).status == dg.DagsterRunStatus.SUCCESS
    [pending] = versions(store, "hooked")
    jobs_dir = deployment.extra_env["LORA_LOCAL_JOBS_DIR"]
    backend = TrainingBackendResource(local_state_dir=jobs_dir).get_backend(store)  # as the runs build it
    deadline = time.monotonic() + 240
    while (status := backend.status(pending.id)).status not in ("COMPLETED", "FAILED"):
        assert time.monotonic() < deadline, "the local job did not finish"
        time.sleep(0.5)
    assert status.status == "COMPLETED"
    assert versions(store, "hooked")[0].status is not VersionStatus.completed  # nothing recorded it yet

    token, port = "deploy-test-token-0123456789", free_port()
    receiver = subprocess.Popen(
        [str(Path(sys.executable).with_name("lora-pipeline")), "webhook", "serve", "--port", str(port)],
        env={**deployment.env(), "LORA_WEBHOOK_TOKEN": token},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                assert receiver.poll() is None and time.monotonic() < deadline, "receiver did not start"
                time.sleep(0.3)
        answer = httpx.post(
            f"http://127.0.0.1:{port}/webhooks/runpod",
            params={"token": token},
            content=status.model_dump_json(),
            headers={"content-type": "application/json"},
        )
        assert answer.status_code == 200, answer.text
    finally:
        receiver.terminate()
        receiver.wait(timeout=30)

    deadline = time.monotonic() + 120
    while True:
        runs = instance.get_runs(dg.RunsFilter(job_name="complete_training", tags={"dagster/partition": "hooked"}))
        if runs and all(r.status in DONE for r in runs):
            break
        assert time.monotonic() < deadline, "no complete_training run from the webhook"
        time.sleep(0.5)
    [run] = runs
    assert run.status == dg.DagsterRunStatus.SUCCESS
    assert run.tags["lora_pipeline/source"] == "webhook"
    assert run.tags["dagster/sensor_name"] == "runpod_webhook_sensor"
    [version] = versions(store, "hooked")
    assert version.status is VersionStatus.completed and version.id == pending.id


def test_nothing_ran_twice_and_every_job_is_recorded_once(deployment, instance, store):
    """After all of the above (restarts included): no run key twice, no failed run, and each
    style's GPU job is one version."""
    every = instance.get_runs()
    keys = [r.tags["dagster/run_key"] for r in every if "dagster/run_key" in r.tags]
    assert len(keys) == len(set(keys)), "a sensor requested the same run twice"
    assert not [(r.job_name, r.tags.get("dagster/partition")) for r in every if r.status == dg.DagsterRunStatus.FAILURE]
    for style in ("sample_style", "pool_a", "pool_b", "hooked"):
        found = versions(store, style)
        assert len(found) == 1 and found[0].id, (style, found)
