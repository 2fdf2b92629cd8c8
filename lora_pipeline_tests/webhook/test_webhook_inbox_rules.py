"""Issue 11, items 5 and 6: one validator for every status body; any ``.json`` status body in
the inbox is usable whatever its name; unusable files move to ``webhooks/rejected/`` with a
reason, and nothing is ever lost on the way.

Against both stores (``store`` fixture) unless a test needs to set an object's time.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime

import pytest

from lora_pipeline.storage.keys import WEBHOOK_INBOX, WEBHOOK_PROCESSED
from lora_pipeline.webhook import inbox
from lora_pipeline.webhook.inbox import (
    WEBHOOK_REJECTED,
    InvalidWebhook,
    list_inbox,
    mark_processed,
    parse_webhook_body,
    reject,
    write_webhook,
)

JOB = "26945dbf-4e87-4574-ad26-b1f71e865942"
OTHER = "c3d1f7aa-5b0e-4e0f-8d55-7a4e3b2c9f10"


def body(job_id: str = JOB, status: str = "COMPLETED", **extra) -> bytes:
    return json.dumps({"id": job_id, "status": status, **extra}).encode()


def keys(store, prefix: str) -> list[str]:
    return [info.key for info in store.list(prefix + "/")]


def set_time(store, key: str, when: datetime) -> None:
    os.utime(store.root / key, (when.timestamp(), when.timestamp()))


POISON = [
    pytest.param(body(delayTime="soon"), "delayTime", id="delayTime-soon"),
    pytest.param(body(output=5), "output", id="output-5"),
    pytest.param(body(output="loras/s/s_v1.safetensors"), "output", id="output-string"),
    pytest.param(body(executionTime=[1]), "executionTime", id="executionTime-list"),
    pytest.param(body(delayTime=True), "delayTime", id="delayTime-bool"),
    pytest.param(
        b'{"id": "%s", "status": "COMPLETED", "delayTime": Infinity}' % JOB.encode(),
        "delayTime",
        id="delayTime-infinity",
    ),
    pytest.param(
        b'{"id": "%s", "status": "COMPLETED", "workerId": "\\ud800"}' % JOB.encode(), "status body", id="lone-surrogate"
    ),
    pytest.param(b"[" * 200_000 + b"]" * 200_000, "nested too deeply", id="deep-nesting"),
]


@pytest.mark.parametrize("raw, problem", POISON)
def test_one_validator_refuses_bodies_outside_the_status_schema(raw, problem):
    with pytest.raises(InvalidWebhook, match=problem):
        parse_webhook_body(raw[: inbox.MAX_BODY_BYTES])


@pytest.mark.parametrize("raw, problem", POISON[:2])
def test_write_webhook_refuses_them_and_writes_nothing(local_store, raw, problem):
    with pytest.raises(InvalidWebhook, match=problem):
        write_webhook(local_store, raw)
    assert list(local_store.list("")) == []


@pytest.mark.parametrize("raw, problem", POISON[:2])
def test_a_poisoned_inbox_file_is_listed_with_its_problem_and_the_rest_still_listed(store, raw, problem):
    store.put(f"{WEBHOOK_INBOX}/20260101T000000000000Z_{JOB}.json", raw)
    good = write_webhook(store, body(OTHER, "FAILED", error="oom"))
    items = list(list_inbox(store))
    assert [i.key for i in items][-1] == good and items[-1].problem is None
    assert items[0].body is None and problem in items[0].problem


@pytest.mark.parametrize("name", [f"{JOB}.json", "anything.json", "sub/legacy-dashboard.json", "x.JSON"])
def test_a_status_body_under_any_json_name_is_usable_and_moves_to_processed(store, name):
    key = f"{WEBHOOK_INBOX}/{name}"
    store.put(key, body(output={"lora_key": "loras/s/s_v1.safetensors"}))
    (item,) = list_inbox(store)
    assert (item.problem, item.job_id, item.status) == (None, JOB, "COMPLETED")
    assert item.job_status is not None and item.job_status.output == {"lora_key": "loras/s/s_v1.safetensors"}
    assert item.received_at == store.head(key).last_modified.astimezone(UTC)
    assert mark_processed(store, key) == f"{WEBHOOK_PROCESSED}/{name}"
    assert keys(store, WEBHOOK_INBOX) == [] and store.get(f"{WEBHOOK_PROCESSED}/{name}").data == body(
        output={"lora_key": "loras/s/s_v1.safetensors"}
    )


def test_files_are_ordered_by_stamp_or_else_by_object_time(local_store):
    stamped = write_webhook(local_store, body(OTHER, "FAILED"), received_at=datetime(2026, 1, 2, tzinfo=UTC))
    local_store.put(f"{WEBHOOK_INBOX}/zzz-early.json", body(status="IN_PROGRESS"))
    local_store.put(f"{WEBHOOK_INBOX}/{JOB}.json", body(status="COMPLETED"))
    set_time(local_store, f"{WEBHOOK_INBOX}/zzz-early.json", datetime(2026, 1, 1, tzinfo=UTC))
    set_time(local_store, f"{WEBHOOK_INBOX}/{JOB}.json", datetime(2026, 1, 3, tzinfo=UTC))
    items = list(list_inbox(local_store))
    assert [i.key for i in items] == [f"{WEBHOOK_INBOX}/zzz-early.json", stamped, f"{WEBHOOK_INBOX}/{JOB}.json"]
    assert [i.received_at.day for i in items] == [1, 2, 3]


def test_a_non_json_file_is_a_problem_and_dot_files_are_left_alone(store):
    store.put(f"{WEBHOOK_INBOX}/notes.txt", body())
    store.put(f"{WEBHOOK_INBOX}/.upload-in-progress.json", b"{trunc")
    (item,) = list_inbox(store)
    assert item.key == f"{WEBHOOK_INBOX}/notes.txt" and "not a .json file" in item.problem


def test_an_oversized_inbox_file_is_a_problem_without_being_read_and_still_moves_whole(local_store, monkeypatch):
    monkeypatch.setattr(inbox, "MAX_BODY_BYTES", 64)
    big = body(output={"blob": "x" * 500})
    local_store.put(f"{WEBHOOK_INBOX}/big.json", big)
    reads = []
    real_get = type(local_store).get
    monkeypatch.setattr(type(local_store), "get", lambda self, key: reads.append(key) or real_get(self, key))
    (item,) = list_inbox(local_store)
    assert "over the 64-byte limit" in item.problem and reads == []
    target = reject(local_store, item.key, item.problem)
    assert reads == [] and local_store.get(target).data == big
    assert keys(local_store, WEBHOOK_INBOX) == []


def test_reject_moves_the_file_with_its_reason_beside_it(store):
    key = f"{WEBHOOK_INBOX}/anything.json"
    store.put(key, body(delayTime="soon"))
    target = reject(store, key, "not a RunPod status body: delayTime")
    assert target == f"{WEBHOOK_REJECTED}/anything.json"
    assert store.get(target).data == body(delayTime="soon")
    assert store.get(target + ".reason.txt").data == b"not a RunPod status body: delayTime\n"
    assert keys(store, WEBHOOK_INBOX) == []


def test_reject_never_overwrites_an_earlier_rejected_file_of_the_same_name(store):
    key = f"{WEBHOOK_INBOX}/status.json"
    store.put(key, b"{first")
    first = reject(store, key, "first")
    store.put(key, b"{second")
    second = reject(store, key, "second")
    assert first != second and second.startswith(f"{WEBHOOK_REJECTED}/status.") and second.endswith(".json")
    assert (store.get(first).data, store.get(second).data) == (b"{first", b"{second")
    assert store.get(second + ".reason.txt").data == b"second\n"


def test_a_reject_interrupted_before_the_delete_is_finished_by_the_next_pass(store):
    key = f"{WEBHOOK_INBOX}/status.json"
    store.put(key, b"{bad")
    store.put(f"{WEBHOOK_REJECTED}/status.json", b"{bad")  # the copy made before a crash
    assert reject(store, key, "bad") == f"{WEBHOOK_REJECTED}/status.json"
    assert keys(store, WEBHOOK_REJECTED) == [
        f"{WEBHOOK_REJECTED}/status.json",
        f"{WEBHOOK_REJECTED}/status.json.reason.txt",
    ]
    assert keys(store, WEBHOOK_INBOX) == []


def test_mark_processed_keeps_an_earlier_file_processed_under_the_same_name(store):
    key = f"{WEBHOOK_INBOX}/status.json"
    store.put(key, body(status="FAILED"))
    first = mark_processed(store, key)
    store.put(key, body(status="COMPLETED"))
    second = mark_processed(store, key)
    assert first == f"{WEBHOOK_PROCESSED}/status.json" and second != first
    assert (store.get(first).data, store.get(second).data) == (body(status="FAILED"), body(status="COMPLETED"))
    assert mark_processed(store, write_webhook(store, body(OTHER))).startswith(f"{WEBHOOK_PROCESSED}/2")


def test_a_corrected_body_for_a_claim_whose_file_was_rejected_lands(store):
    """The old receiver accepted a body the sensor now rejects; its claim must not block the fix."""
    key = write_webhook(store, body())
    store.put(key, body(delayTime="soon"))  # what an old receiver stored under that claim
    reject(store, key, "delayTime")
    assert write_webhook(store, body()) == key
    assert [i.problem for i in list_inbox(store)] == [None]
