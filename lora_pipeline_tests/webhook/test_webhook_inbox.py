"""The webhook inbox: bodies stored as delivered, once per (job, status), problems reported.

Run against both stores (``store`` fixture): idempotency rests on conditional writes.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest

from lora_pipeline.storage.base import StoreUnavailable
from lora_pipeline.storage.keys import WEBHOOK_INBOX
from lora_pipeline.webhook.inbox import (
    InvalidWebhook,
    inbox_key,
    list_inbox,
    mark_processed,
    write_webhook,
)
from lora_pipeline_tests.fakes.stores import FailingStore

LEGACY_WEBHOOKS = Path("/work/shared/fixtures/legacy/webhooks")
JOB = "26945dbf-4e87-4574-ad26-b1f71e865942"


def body(job_id: str = JOB, status: str = "COMPLETED", **extra) -> bytes:
    return json.dumps({"id": job_id, "status": status, **extra}).encode()


def inbox_keys(store) -> list[str]:
    return [info.key for info in store.list(WEBHOOK_INBOX + "/")]


def test_inbox_key_is_a_sortable_utc_stamp_and_the_job_id():
    at = datetime(2026, 11, 25, 7, 55, 1, 123456, tzinfo=UTC)
    assert inbox_key(JOB + "-e2", at) == f"webhooks/inbox/20261125T075501123456Z_{JOB}-e2.json"


def test_body_is_stored_byte_for_byte(store):
    raw = b'{ "status" : "COMPLETED",\n  "id": "%s", "output": {"k": 1.50} }' % JOB.encode()
    key = write_webhook(store, raw)
    assert store.get(key).data == raw


@pytest.mark.skipif(not LEGACY_WEBHOOKS.exists(), reason="legacy fixtures not present")
def test_legacy_webhook_fixtures_land_in_the_inbox(store):
    for path in sorted(LEGACY_WEBHOOKS.glob("*.json")):
        write_webhook(store, path.read_bytes())
    items = list(list_inbox(store))
    assert sorted(item.status for item in items) == ["COMPLETED", "FAILED"]
    assert all(item.problem is None for item in items)


def test_second_delivery_of_same_job_and_status_writes_nothing(store):
    assert write_webhook(store, body()) is not None
    assert write_webhook(store, body()) is None
    assert len(inbox_keys(store)) == 1


def test_delivery_after_processing_is_still_a_duplicate(store):
    mark_processed(store, write_webhook(store, body()))
    assert write_webhook(store, body()) is None
    assert inbox_keys(store) == []


def test_a_new_status_of_the_same_job_is_a_new_delivery(store):
    write_webhook(store, body(status="FAILED", error="oom"))
    write_webhook(store, body(status="COMPLETED", output={}))
    assert len(inbox_keys(store)) == 2


def test_concurrent_duplicate_deliveries_land_exactly_once(store):
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda _: write_webhook(store, body()), range(32)))
    assert sum(r is not None for r in results) == 1
    assert len(inbox_keys(store)) == 1


@pytest.mark.parametrize(
    "raw, problem",
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"status": "COMPLETED"}', "'id'"),
        (b'{"id": "' + JOB.encode() + b'"}', "'status'"),
        (b'{"id": "../../etc", "status": "COMPLETED"}', "invalid job id"),
        (b'{"id": "' + JOB.encode() + b'", "status": 7}', "invalid status"),
    ],
)
def test_malformed_bodies_are_refused_and_nothing_is_written(store, raw, problem):
    with pytest.raises(InvalidWebhook, match=problem):
        write_webhook(store, raw)
    assert list(store.list("")) == []


def test_a_failed_body_write_is_finished_by_the_redelivery(store):
    flaky = FailingStore(store, fail_keys_with=WEBHOOK_INBOX)
    with pytest.raises(StoreUnavailable):
        write_webhook(flaky, body())
    flaky.failing = False
    key = write_webhook(flaky, body())
    assert key is not None and inbox_keys(store) == [key]


def test_unparsable_inbox_files_are_reported_and_kept(store):
    good = write_webhook(store, body())
    store.put(f"{WEBHOOK_INBOX}/20260101T000000000000Z_{JOB}-x1.json", b"{truncated")
    items = {item.key: item for item in list_inbox(store)}
    assert items[good].problem is None and items[good].body["id"] == JOB
    bad = [item for item in items.values() if item.key != good]
    assert len(bad) == 1 and "not JSON" in bad[0].problem
    assert len(inbox_keys(store)) == 2


def test_an_inbox_file_named_after_another_job_is_used_for_the_job_its_body_names(store):
    """The name is only an ordering hint (its stamp); the body says which job it is."""
    other = "c3d1f7aa-5b0e-4e0f-8d55-7a4e3b2c9f10"
    store.put(f"{WEBHOOK_INBOX}/20260101T000000000000Z_{other}.json", body())
    (item,) = list_inbox(store)
    assert item.problem is None and item.job_id == JOB
    assert item.received_at == datetime(2026, 1, 1, tzinfo=UTC)


def test_inbox_lists_in_arrival_order(store):
    first = write_webhook(store, body(status="FAILED"), received_at=datetime(2026, 1, 1, tzinfo=UTC))
    second = write_webhook(store, body(status="COMPLETED"), received_at=datetime(2026, 1, 2, tzinfo=UTC))
    assert [item.key for item in list_inbox(store)] == [first, second]


def test_mark_processed_moves_the_file_out_of_the_inbox(store):
    key = write_webhook(store, body())
    target = mark_processed(store, key)
    assert target.startswith("webhooks/processed/")
    assert store.get(target).data == body()
    assert inbox_keys(store) == []


def test_mark_processed_twice_is_harmless(store):
    key = write_webhook(store, body())
    assert mark_processed(store, key) == mark_processed(store, key)
