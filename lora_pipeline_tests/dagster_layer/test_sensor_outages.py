"""Sensor ticks and the reconcile schedule skip, in bounded time, while S3 or RunPod is down.

S3 goes through the fault proxy in front of moto: "stalled" answers nothing (every
request stalls far past any timeout), "refusing" is the proxy stopped (nothing
listens). The step settings are deliberately slow (3 s read timeout, 2 attempts),
the tick settings short (0.5 s): a tick that used the step client, or ran the
start-up check outside the breaker, raises or waits; a bounded one skips.
Timings are asserted only with a wide margin (well under Dagster's 60 s): the
bound itself follows from the settings (``S3Options.failure_bound_s``).
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable

import dagster as dg
import pytest

import lora_pipeline.defs.completion_sensors as completion_sensors
from lora_pipeline.dataset.versions import current_key
from lora_pipeline.defs.completion_sensors import runpod_job_sensor, runpod_webhook_sensor
from lora_pipeline.defs.discovery_sensors import style_discovery_sensor
from lora_pipeline.defs.reconcile import reconcile_registry_schedule
from lora_pipeline.defs.declared_styles import DECLARED_STYLES, declared_styles
from lora_pipeline.defs.resources import LoraS3Resource, StorageResource, TrainingBackendResource
from lora_pipeline.storage.factory import reset_shared_stores, s3_location, shared_breaker
from lora_pipeline.storage.local import LocalStore
from lora_pipeline_tests.dagster_layer.conftest import submit_pending
from lora_pipeline_tests.fakes.stores import CountingStore
from lora_pipeline_tests.storage.fault_proxy import FaultProxy

JOB = "26945dbf-4e87-4574-ad26-b1f71e865942-u1"
WELL_UNDER_A_TICK_S = 30.0  # Dagster cuts a tick at 60 s


@pytest.fixture(autouse=True)
def _fresh_process(monkeypatch):
    """A new code-server process: no store checked yet, no breaker memory."""
    monkeypatch.setenv("LORA_S3_READ_TIMEOUT", "3")
    monkeypatch.setenv("LORA_S3_TICK_READ_TIMEOUT", "0.5")
    monkeypatch.setenv("LORA_S3_TICK_CONNECT_TIMEOUT", "0.5")
    reset_shared_stores()
    yield
    reset_shared_stores()


@pytest.fixture
def instance():
    with dg.instance_for_test() as instance:
        yield instance


def s3_resources(proxy: FaultProxy, bucket: str) -> dict:
    return {
        "storage": StorageResource(
            storage_url=f"s3://{bucket}/lora",
            s3=LoraS3Resource(endpoint_url=proxy.endpoint, addressing_style="path"),
        ),
        "training_backend": TrainingBackendResource(),
        DECLARED_STYLES: declared_styles(),
    }


def tick(evaluation: str, instance, resources: dict):
    """One sensor tick or schedule evaluation; returns (skip message or None, result)."""
    if evaluation == "schedule":
        with dg.build_schedule_context(instance=instance, resources=resources) as context:
            result = reconcile_registry_schedule(context)
        return (result.skip_message if isinstance(result, dg.SkipReason) else None), result
    sensor = {
        "webhook_sensor": runpod_webhook_sensor,
        "job_sensor": runpod_job_sensor,
        "discovery_sensor": style_discovery_sensor,
    }[evaluation]
    with dg.build_sensor_context(instance=instance, resources=resources) as context:
        result = sensor(context)
    return (result.skip_reason.skip_message if result.skip_reason else None), result


EVALUATIONS = ["webhook_sensor", "job_sensor", "discovery_sensor", "schedule"]


def head_buckets(proxy: FaultProxy, bucket: str) -> int:
    return sum(1 for r in proxy.requests if r.method == "HEAD" and r.path.rstrip("/") == f"/{bucket}")


def stalled(proxy: FaultProxy) -> None:
    proxy.always("stall")


def refusing(proxy: FaultProxy) -> None:
    proxy.stop()


@pytest.mark.parametrize("outage", [stalled, refusing], ids=["stalled", "refusing"])
@pytest.mark.parametrize("evaluation", EVALUATIONS)
def test_a_tick_against_a_failing_endpoint_skips_in_bounded_time_and_opens_the_breaker(
    evaluation: str, outage: Callable, proxy, s3_bucket, instance, backend
):
    resources = s3_resources(proxy, s3_bucket)
    outage(proxy)

    started = time.monotonic()
    skipped, _ = tick(evaluation, instance, resources)
    elapsed = time.monotonic() - started

    assert skipped is not None and skipped.startswith("object store unavailable")
    assert "AWS_ENDPOINT_URL_S3" in skipped  # names what to check
    assert elapsed < WELL_UNDER_A_TICK_S
    assert shared_breaker(s3_location(s3_bucket, "lora")).is_open

    # The next tick (a new resource, as Dagster builds per tick) skips at once, sending nothing.
    sent = proxy.settled()
    skipped, _ = tick(evaluation, instance, s3_resources(proxy, s3_bucket))
    assert skipped is not None and "unavailable since" in skipped
    assert len(proxy.requests) == sent


@pytest.mark.parametrize("evaluation", EVALUATIONS)
def test_an_outage_after_a_healthy_start_skips_each_tick_until_the_breaker_opens(
    evaluation: str, proxy, s3_bucket, instance, backend, monkeypatch
):
    """The store was checked and cached while healthy; then the endpoint stalls. Each tick
    stops at its first failed request and skips; after LORA_STORE_BREAKER_FAILURES such
    ticks the breaker is open and ticks skip without a request."""
    monkeypatch.setenv("LORA_STORE_BREAKER_FAILURES", "2")
    tick(evaluation, instance, s3_resources(proxy, s3_bucket))  # healthy: store checked and kept
    stalled(proxy)

    for _ in range(2):
        started = time.monotonic()
        skipped, _ = tick(evaluation, instance, s3_resources(proxy, s3_bucket))
        assert skipped is not None and skipped.startswith("object store unavailable")
        assert time.monotonic() - started < WELL_UNDER_A_TICK_S

    assert shared_breaker(s3_location(s3_bucket, "lora")).is_open
    sent = proxy.settled()
    skipped, _ = tick(evaluation, instance, s3_resources(proxy, s3_bucket))
    assert skipped is not None and "unavailable since" in skipped
    assert len(proxy.requests) == sent


def test_every_tick_shares_one_store_checked_once_per_process(proxy, s3_bucket, instance, backend):
    for _ in range(3):
        for evaluation in ("webhook_sensor", "job_sensor", "discovery_sensor"):
            tick(evaluation, instance, s3_resources(proxy, s3_bucket))
    assert head_buckets(proxy, s3_bucket) == 1

    for _ in range(2):
        tick("schedule", instance, s3_resources(proxy, s3_bucket))
    assert head_buckets(proxy, s3_bucket) == 1
    assert not shared_breaker(s3_location(s3_bucket, "lora")).is_open


def test_the_schedule_requests_a_run_when_all_is_well(proxy, s3_bucket, instance):
    skipped, result = tick("schedule", instance, s3_resources(proxy, s3_bucket))
    assert skipped is None and isinstance(result, dg.RunRequest)


# -- RunPod ---------------------------------------------------------------------------


@pytest.fixture
def stalled_runpod(monkeypatch):
    """A RunPod API that accepts connections and never answers (a listening socket nobody
    accepts from); RUNPOD_* point at it, with a fresh endpoint id (a fresh client)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    monkeypatch.setenv("RUNPOD_ENDPOINT_ID", f"stalled{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("RUNPOD_API_KEY", "test-key")
    monkeypatch.setenv("RUNPOD_ENDPOINT_BASE_URL", f"http://127.0.0.1:{port}/v2")
    yield
    listener.close()  # pending connections are reset: abandoned polls end at once


@pytest.fixture
def local_resources(tmp_path, monkeypatch):
    store_dir = tmp_path / "store"
    monkeypatch.setenv("LORA_STORAGE_URL", str(store_dir))
    store = LocalStore(store_dir)
    resources = {"storage": StorageResource(storage_url=str(store_dir)), "training_backend": TrainingBackendResource()}
    return store, resources


def test_the_job_sensor_skips_at_its_poll_deadline_when_runpod_stalls(
    stalled_runpod, local_resources, instance, monkeypatch
):
    """The client's own timeouts and retries (15 s reads, up to 60 s) never set the tick's
    length: the poll pass stops waiting at its deadline and the tick skips."""
    store, resources = local_resources
    submit_pending(store, "style_59", JOB)
    monkeypatch.setattr(completion_sensors, "POLL_DEADLINE_S", 1.0)

    started = time.monotonic()
    skipped, result = tick("job_sensor", instance, resources)
    elapsed = time.monotonic() - started

    assert skipped is not None and skipped.startswith("RunPod unavailable")
    assert not result.run_requests
    assert elapsed < 10  # well before the client's first 15 s read timeout


def test_the_schedule_skips_while_runpods_breaker_is_open(stalled_runpod, local_resources, instance):
    store, resources = local_resources
    client = resources["training_backend"].get_backend(store)
    client.breaker.trip(ConnectionError("RunPod down (test)"))

    skipped, _ = tick("schedule", instance, resources)

    assert skipped is not None and skipped.startswith("RunPod unavailable since")


def test_the_schedule_runs_with_a_healthy_local_store_and_backend(local_resources, instance):
    _, resources = local_resources
    skipped, result = tick("schedule", instance, resources)
    assert skipped is None and isinstance(result, dg.RunRequest)


# -- discovery cost ---------------------------------------------------------------------


def _discovery_calls(store, instance, monkeypatch) -> tuple[CountingStore, dg.SensorResult]:
    counting = CountingStore(store)
    monkeypatch.setattr(StorageResource, "get_store", lambda self: counting)
    monkeypatch.setattr(StorageResource, "get_sensor_store", lambda self: counting, raising=False)
    with dg.build_sensor_context(
        instance=instance, resources={"storage": StorageResource(), DECLARED_STYLES: declared_styles()}
    ) as context:
        result = style_discovery_sensor(context)
    return counting, result


def _style_with_images(store, style: str, images: int) -> None:
    for version in ("aa" * 32, "bb" * 32):
        for i in range(images):
            store.put(f"datasets/{style}/{version}/images/{i:05d}.png", b"png")
        store.put(f"datasets/{style}/{version}/manifest.json", b"{}")
    store.put(current_key(style), b"{}")


@pytest.fixture(params=["local", "s3"])
def any_store(request):
    return request.getfixturevalue(f"{request.param}_store")


def test_discovery_reads_do_not_grow_with_dataset_images(any_store, monkeypatch):
    """Two stores alike but for the number of images per version: the tick makes the same
    calls and lists the same number of entries in both, and still finds every new style."""
    store = any_store
    seen = []
    for images in (2, 40):
        with dg.instance_for_test() as instance:
            prefix = f"n{images}"
            _style_with_images(store, f"{prefix}_known", images)
            _style_with_images(store, f"{prefix}_new", images)
            store.put(f"datasets/{prefix}_unfinished/{'cc' * 32}/images/0.png", b"png")  # no current.json
            store.put(f"incoming/{prefix}_dropped/a.png", b"png")
            instance.add_dynamic_partitions("styles", [f"{prefix}_known"])

            counting, result = _discovery_calls(store, instance, monkeypatch)

            [added] = result.dynamic_partitions_requests
            assert f"{prefix}_new" in added.partition_keys
            assert f"{prefix}_dropped" in added.partition_keys
            assert f"{prefix}_known" not in added.partition_keys
            assert f"{prefix}_unfinished" not in added.partition_keys
            assert [r.partition_key for r in result.run_requests if r.partition_key.startswith(prefix)] == [
                f"{prefix}_dropped"
            ]
            seen.append((len(counting.calls), counting.listed, [c for c in counting.calls if c[0] == "list"]))
            for key in [i.key for i in store.list()]:  # the next round starts from an empty store
                store.delete(key)

    (calls_few, listed_few, lists), (calls_many, listed_many, _) = seen
    assert (calls_many, listed_many) == (calls_few, listed_few)
    assert [prefix for _, prefix in lists] == ["incoming/"]  # nothing below datasets/ or registry/ is listed
