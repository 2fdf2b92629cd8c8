"""The completion sensors: each finished job becomes exactly one recording run."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import dagster as dg
import pytest

from lora_pipeline.backends.base import JobNotFound, RunPodUnavailable
from lora_pipeline.contracts.job_status import JobStatus
from lora_pipeline.defs.completion_sensors import runpod_job_sensor, runpod_webhook_sensor
from lora_pipeline.registry.evidence import JobReport
from lora_pipeline.registry.models import VersionStatus
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.storage import StoreUnavailable
from lora_pipeline.storage.keys import WEBHOOK_INBOX, WEBHOOK_PROCESSED
from lora_pipeline.webhook.inbox import write_webhook
from lora_pipeline_tests.dagster_layer.conftest import submit_pending
from lora_pipeline_tests.registry.lora_files import lora_bytes

JOB = "26945dbf-4e87-4574-ad26-b1f71e865942"
STYLE = "style_59"


def evaluate(sensor, instance, resources, cursor=None):
    with dg.build_sensor_context(instance=instance, resources=resources, cursor=cursor) as context:
        return sensor(context)


def inbox_keys(store) -> list[str]:
    return [info.key for info in store.list(WEBHOOK_INBOX + "/")]


def test_webhook_for_a_suffixed_job_requests_one_recording_run(store, instance, resources):
    """RunPod's webhook names the bare UUID; the registry holds the id with `-e2`: they match."""
    submit_pending(store, STYLE, f"{JOB}-e2")
    write_webhook(store, json.dumps({"id": JOB, "status": "COMPLETED", "output": {}}).encode())

    result = evaluate(runpod_webhook_sensor, instance, resources)

    [request] = result.run_requests
    assert request.partition_key == STYLE
    assert request.run_key == f"complete:{JOB}:COMPLETED"
    assert request.run_config["ops"]["trained_lora"]["config"]["source"] == "webhook"
    assert instance.has_dynamic_partition("styles", STYLE)


def test_webhook_already_in_the_registry_is_archived_without_a_run(store, instance, resources):
    """A duplicate delivery, or one a poll recorded first, leaves nothing to do."""
    submit_pending(store, STYLE, f"{JOB}-e1")
    failed = JobReport(f"{JOB}-e1", "FAILED", None, "CUDA out of memory", None, None, datetime.now(UTC), "poll")
    RegistryStore(store).apply(STYLE, [failed])
    write_webhook(store, json.dumps({"id": JOB, "status": "FAILED", "error": "CUDA out of memory"}).encode())

    result = evaluate(runpod_webhook_sensor, instance, resources)

    assert not result.run_requests
    assert inbox_keys(store) == []
    assert list(store.list(WEBHOOK_PROCESSED + "/"))


def test_malformed_webhook_file_moves_to_rejected_and_requests_nothing(store, instance, resources):
    store.put(f"{WEBHOOK_INBOX}/20261125T000000000000Z_{JOB}.json", b"{not json")

    result = evaluate(runpod_webhook_sensor, instance, resources)

    assert not result.run_requests
    assert inbox_keys(store) == []
    rejected = f"webhooks/rejected/20261125T000000000000Z_{JOB}.json"
    assert store.get(rejected).data == b"{not json"
    assert b"not JSON" in store.get(rejected + ".reason.txt").data


def test_webhook_for_a_job_not_yet_registered_waits_in_the_inbox(store, instance, resources):
    """The webhook can beat the submitting run's registry write: it must not be lost."""
    write_webhook(store, json.dumps({"id": JOB, "status": "FAILED", "error": "boom"}).encode())

    result = evaluate(runpod_webhook_sensor, instance, resources)

    assert not result.run_requests
    assert len(inbox_keys(store)) == 1


def test_webhook_sensor_skips_while_the_store_is_unavailable(instance, resources, monkeypatch):
    class Down:
        def list(self, prefix=""):
            raise StoreUnavailable("object store unavailable since 10:00 (test)")

        def get(self, key):
            raise StoreUnavailable("down")

    monkeypatch.setattr(type(resources["storage"]), "get_store", lambda self: Down())

    result = evaluate(runpod_webhook_sensor, instance, resources)

    assert not result.run_requests
    assert "unavailable" in result.skip_reason.skip_message


def test_job_sensor_requests_a_run_for_each_finished_job(store, instance, resources, backend):
    submit_pending(store, STYLE, f"{JOB}-u1")
    other = "c3d1f7aa-5b0e-4e0f-8d55-7a4e3b2c9f10-e1"
    submit_pending(store, "style_7", other, version=2)
    backend.answers[f"{JOB}-u1"] = JobStatus(id=f"{JOB}-u1", status="COMPLETED", output={"lora_key": "x"})
    backend.answers[other] = JobStatus(id=other, status="IN_PROGRESS")

    result = evaluate(runpod_job_sensor, instance, resources)

    [request] = result.run_requests
    assert (request.partition_key, request.run_key) == (STYLE, f"complete:{JOB}:COMPLETED")
    assert request.tags["lora_pipeline/source"] == "poll"


@pytest.mark.parametrize("written_for", [{"lora_pipeline.request_id": "req-1"}, {"lora_pipeline.job_id": JOB}])
def test_job_sensor_completes_an_expired_job_from_its_file_on_the_same_tick(
    store, instance, resources, backend, written_for
):
    """RunPod forgot the job before the first poll, but its worker published the version's file
    (its header names the version's request, or the job): the tick completes the version itself,
    and requests the one recording run that materializes trained_lora, not a reconciliation."""
    submit_pending(store, STYLE, f"{JOB}-u1")
    key = f"loras/{STYLE}/{STYLE}_v1.safetensors"
    store.put(key, lora_bytes(written_for))
    backend.answers[f"{JOB}-u1"] = JobNotFound(f"{JOB}-u1")

    result = evaluate(runpod_job_sensor, instance, resources)

    [version] = RegistryStore(store).read(STYLE)[0].versions
    assert version.status is VersionStatus.completed and version.file.key == key
    [request] = result.run_requests
    assert (request.job_name, request.run_key) == ("complete_training", f"complete:{JOB}:COMPLETED")
    status = JobStatus.model_validate_json(request.run_config["ops"]["trained_lora"]["config"]["status_body"])
    assert status.output["lora_key"] == key
    assert not evaluate(runpod_job_sensor, instance, resources).run_requests  # nothing unfinished is left


@pytest.mark.parametrize("file", [None, {"lora_pipeline.request_id": "another-request"}], ids=["absent", "not-its"])
def test_job_sensor_leaves_an_expired_job_without_its_file_to_reconciliation(store, instance, resources, backend, file):
    """No file, or another request's file at the version's key: the version stays unfinished and a
    reconcile_registry run is requested (it completes the job if the file lands, fails it after
    the maximum job age)."""
    submit_pending(store, STYLE, f"{JOB}-u1")
    if file is not None:
        store.put(f"loras/{STYLE}/{STYLE}_v1.safetensors", lora_bytes(file))
    backend.answers[f"{JOB}-u1"] = JobNotFound(f"{JOB}-u1")

    [request] = evaluate(runpod_job_sensor, instance, resources).run_requests

    assert request.job_name == "reconcile_registry"
    [version] = RegistryStore(store).read(STYLE)[0].versions
    assert version.status is VersionStatus.starting


@pytest.mark.parametrize("failure", [RunPodUnavailable("RunPod API down (test)")], ids=["api-down"])
def test_job_sensor_skips_while_runpod_is_unavailable(store, instance, resources, backend, failure):
    submit_pending(store, STYLE, f"{JOB}-u1")
    backend.answers[f"{JOB}-u1"] = failure

    result = evaluate(runpod_job_sensor, instance, resources)

    assert not result.run_requests
    assert result.skip_reason is not None


def test_job_sensor_continues_where_the_last_tick_stopped(store, instance, resources, backend, monkeypatch):
    """More unfinished jobs than one tick may poll: the cursor walks through all of them."""
    import lora_pipeline.defs.completion_sensors as sensors

    monkeypatch.setattr(sensors, "MAX_POLLS_PER_TICK", 2)
    jobs = [f"{i:08d}-1111-4222-8333-444455556666-u1" for i in range(5)]
    for number, job in enumerate(jobs, start=1):
        submit_pending(store, STYLE, job, version=number)
        backend.answers[job] = JobStatus(id=job, status="IN_PROGRESS")
    polled: list[str] = []
    original = backend.status
    backend.status = lambda job_id: (polled.append(job_id), original(job_id))[1]

    cursor = None
    for _ in range(3):
        result = evaluate(runpod_job_sensor, instance, resources, cursor=cursor)
        cursor = result.cursor

    assert polled[:5] == jobs and polled[5] == jobs[0]


def test_style_discovery_adds_partitions_and_ingests_dropped_folders(store, instance, resources):
    """A folder dropped under incoming/<style>/ becomes a partition and a dataset run."""
    from lora_pipeline.defs.discovery_sensors import style_discovery_sensor

    store.put("incoming/watercolor/a.png", b"png bytes")
    store.put("incoming/bad..name/a.png", b"png bytes")

    result = evaluate(style_discovery_sensor, instance, resources)

    [added] = result.dynamic_partitions_requests
    assert set(added.partition_keys) == {"watercolor", "sample_style"}
    [request] = result.run_requests
    assert request.partition_key == "watercolor"
    again = evaluate(style_discovery_sensor, instance, resources)
    assert [r.run_key for r in again.run_requests] == [request.run_key]  # same files: same run key
