"""Issue 11, items 5 and 6, in the webhook sensor: one unusable inbox file never stops a tick
(it moves to webhooks/rejected/ with its reason, and the files behind it are handled), and a
status body under any ``.json`` name is used, in arrival order (stamp, else object time)."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime

import dagster as dg
import pytest

from lora_pipeline.defs import completion_sensors
from lora_pipeline.defs.completion_sensors import runpod_webhook_sensor
from lora_pipeline.registry.evidence import JobReport
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.storage.keys import WEBHOOK_INBOX, WEBHOOK_PROCESSED
from lora_pipeline.webhook.inbox import WEBHOOK_REJECTED, write_webhook
from lora_pipeline_tests.dagster_layer.conftest import submit_pending

JOB = "26945dbf-4e87-4574-ad26-b1f71e865942"
OTHER = "c3d1f7aa-5b0e-4e0f-8d55-7a4e3b2c9f10"
THIRD = "5f0e8a3c-2d47-4b8e-9c1a-0b6d7e8f9a10"


def evaluate(sensor, instance, resources, cursor=None):
    with dg.build_sensor_context(instance=instance, resources=resources, cursor=cursor) as context:
        return sensor(context)


def body(job_id: str, status: str = "COMPLETED", **extra) -> bytes:
    return json.dumps({"id": job_id, "status": status, **extra}).encode()


def keys(store, prefix: str) -> list[str]:
    return [info.key for info in store.list(prefix + "/")]


def set_time(store, key: str, when: datetime) -> None:
    os.utime(store.root / key, (when.timestamp(), when.timestamp()))


def inbox_keys_requested(result) -> list[str]:
    return [r.run_config["ops"]["trained_lora"]["config"]["inbox_key"] for r in result.run_requests]


@pytest.mark.parametrize(
    "poison, problem",
    [
        (body(JOB, delayTime="soon"), "delayTime"),
        (body(JOB, output=5), "output"),
        (b"{not json", "not JSON"),
        (b'["id", "status"]', "JSON object"),
    ],
    ids=["delayTime-soon", "output-5", "not-json", "array"],
)
def test_a_poisoned_file_ahead_of_good_ones_is_rejected_and_the_good_ones_are_requested(
    store, instance, resources, poison, problem
):
    submit_pending(store, "style_59", f"{JOB}-e1")
    submit_pending(store, "style_7", f"{OTHER}-u1")
    poisoned = f"{WEBHOOK_INBOX}/20260101T000000000000Z_{JOB}.json"
    store.put(poisoned, poison)  # straight into the inbox, as an old receiver or a copy would
    first = write_webhook(store, body(JOB, output={}), received_at=datetime(2026, 1, 2, tzinfo=UTC))
    second = write_webhook(store, body(OTHER, "FAILED", error="oom"), received_at=datetime(2026, 1, 3, tzinfo=UTC))

    result = evaluate(runpod_webhook_sensor, instance, resources)

    assert inbox_keys_requested(result) == [first, second]
    assert [r.partition_key for r in result.run_requests] == ["style_59", "style_7"]
    rejected = f"{WEBHOOK_REJECTED}/20260101T000000000000Z_{JOB}.json"
    assert keys(store, WEBHOOK_REJECTED) == [rejected, rejected + ".reason.txt"]
    assert store.get(rejected).data == poison
    assert problem in store.get(rejected + ".reason.txt").data.decode()
    assert keys(store, WEBHOOK_INBOX) == [first, second]

    again = evaluate(runpod_webhook_sensor, instance, resources)  # the next tick: nothing new to reject
    assert keys(store, WEBHOOK_REJECTED) == [rejected, rejected + ".reason.txt"]
    assert inbox_keys_requested(again) == [first, second]


def test_a_tick_of_only_bad_files_skips_and_says_so(store, instance, resources):
    store.put(f"{WEBHOOK_INBOX}/a.json", body(JOB, output=5))
    store.put(f"{WEBHOOK_INBOX}/b.txt", body(JOB))

    result = evaluate(runpod_webhook_sensor, instance, resources)

    assert not result.run_requests and "2 rejected" in result.skip_reason.skip_message
    assert keys(store, WEBHOOK_INBOX) == []
    assert keys(store, WEBHOOK_REJECTED) == [
        f"{WEBHOOK_REJECTED}/{n}" for n in ("a.json", "a.json.reason.txt", "b.txt", "b.txt.reason.txt")
    ]


@pytest.mark.parametrize("name", [f"{JOB}.json", "anything.json"])
def test_a_foreign_named_status_body_requests_its_run(store, instance, resources, name):
    submit_pending(store, "style_59", f"{JOB}-e2")
    key = f"{WEBHOOK_INBOX}/{name}"
    store.put(key, body(JOB, output={"lora_key": "loras/style_59/style_59_v1.safetensors"}))

    result = evaluate(runpod_webhook_sensor, instance, resources)

    [request] = result.run_requests
    assert (request.partition_key, request.run_key) == ("style_59", f"complete:{JOB}:COMPLETED")
    assert inbox_keys_requested(result) == [key]


def test_a_foreign_named_body_already_recorded_moves_to_processed_under_its_name(store, instance, resources):
    submit_pending(store, "style_59", f"{JOB}-e1")
    RegistryStore(store).apply(
        "style_59",
        [JobReport(f"{JOB}-e1", "FAILED", None, "CUDA out of memory", None, None, datetime.now(UTC), "poll")],
    )
    store.put(f"{WEBHOOK_INBOX}/anything.json", body(JOB, "FAILED", error="CUDA out of memory"))

    result = evaluate(runpod_webhook_sensor, instance, resources)

    assert not result.run_requests
    assert keys(store, WEBHOOK_INBOX) == []
    assert keys(store, WEBHOOK_PROCESSED) == [f"{WEBHOOK_PROCESSED}/anything.json"]


def test_ticks_walk_the_inbox_in_arrival_order_with_foreign_names_by_object_time(
    store, instance, resources, monkeypatch
):
    monkeypatch.setattr(completion_sensors, "MAX_WEBHOOKS_PER_TICK", 1)
    for n, job in enumerate((JOB, OTHER, THIRD), start=1):
        submit_pending(store, f"style_{n}", job)
    late = write_webhook(store, body(THIRD), received_at=datetime(2026, 1, 3, tzinfo=UTC))
    early = write_webhook(store, body(JOB), received_at=datetime(2026, 1, 1, tzinfo=UTC))
    middle = f"{WEBHOOK_INBOX}/zzz-from-the-old-dashboard.json"
    store.put(middle, body(OTHER))
    set_time(store, middle, datetime(2026, 1, 2, tzinfo=UTC))

    seen, cursor = [], None
    for _ in range(3):
        result = evaluate(runpod_webhook_sensor, instance, resources, cursor=cursor)
        seen += inbox_keys_requested(result)
        cursor = result.cursor
    assert seen == [early, middle, late]


def test_a_cursor_from_before_arrival_ordering_starts_from_the_head(store, instance, resources):
    submit_pending(store, "style_59", JOB)
    key = write_webhook(store, body(JOB))
    result = evaluate(runpod_webhook_sensor, instance, resources, cursor=f"{WEBHOOK_INBOX}/zzzz.json")
    assert inbox_keys_requested(result) == [key]


def test_rejections_count_against_the_tick_budget(store, instance, resources, monkeypatch):
    """A flood of bad files is spread over ticks instead of running one tick past its timeout."""
    monkeypatch.setattr(completion_sensors, "MAX_WEBHOOKS_PER_TICK", 2)
    submit_pending(store, "style_59", JOB)
    for n in range(3):
        store.put(f"{WEBHOOK_INBOX}/2026010{n + 1}T000000000000Z_bad.json", b"{bad")
    good = write_webhook(store, body(JOB), received_at=datetime(2026, 1, 9, tzinfo=UTC))

    first = evaluate(runpod_webhook_sensor, instance, resources)
    assert not first.run_requests and first.cursor
    assert len(keys(store, WEBHOOK_REJECTED)) == 4  # two files and their reasons
    second = evaluate(runpod_webhook_sensor, instance, resources, cursor=first.cursor)
    assert inbox_keys_requested(second) == [good]
    assert len(keys(store, WEBHOOK_REJECTED)) == 6


def test_rejecting_files_during_a_store_outage_stops_at_the_first_failure(store, monkeypatch):
    """A failing store skips the tick at once: never one timeout per unusable file."""
    from lora_pipeline.storage.base import PreconditionFailed, StorageError

    calls = []

    def failing_reject(store_, key, reason):
        calls.append(key)
        raise StorageError("S3 put webhooks/rejected/x failed: read timeout")

    monkeypatch.setattr(completion_sensors, "reject", failing_reject)
    with pytest.raises(StorageError):
        completion_sensors._reject_unusable(store, f"{WEBHOOK_INBOX}/a.json", "not JSON")
    assert len(calls) == 1

    def refused(store_, key, reason):  # an answer, not an outage: noted, the tick goes on
        raise PreconditionFailed(key, "lost a race")

    monkeypatch.setattr(completion_sensors, "reject", refused)
    note = completion_sensors._reject_unusable(store, f"{WEBHOOK_INBOX}/b.json", "not JSON")
    assert "tried again next tick" in note


def test_odd_named_inbox_files_are_requested_and_an_unparsable_one_rejected(store, instance, resources):
    """Issue 22, defect 1: names a person or a tool writes never fail the tick."""
    submit_pending(store, "style_59", f"{JOB}-e1")
    submit_pending(store, "style_7", f"{OTHER}-u1")
    first, second = f"{WEBHOOK_INBOX}/copy of body (1).json", f"{WEBHOOK_INBOX}/résumé.json"
    store.put(first, body(JOB, output={}))
    store.put(second, body(OTHER, "FAILED", error="oom"))
    store.put(f"{WEBHOOK_INBOX}/body (1).json", b"<html>502 Bad Gateway</html>")
    set_time(store, first, datetime(2026, 1, 1, tzinfo=UTC))
    set_time(store, second, datetime(2026, 1, 2, tzinfo=UTC))

    result = evaluate(runpod_webhook_sensor, instance, resources)

    assert inbox_keys_requested(result) == [first, second]
    rejected = f"{WEBHOOK_REJECTED}/body (1).json"
    assert keys(store, WEBHOOK_REJECTED) == [rejected, rejected + ".reason.txt"]
    assert "not JSON" in store.get(rejected + ".reason.txt").data.decode()
