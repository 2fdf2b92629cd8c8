"""Issue 22, defect 1: an inbox file under a name a person or a tool writes (``copy of body
(1).json``, ``résumé.json``, ``body (1).json``) stops neither reconciliation nor housekeeping,
on the local store and on S3; a file that cannot be read goes to ``webhooks/rejected/`` with
its reason (or, if even that fails, stays and is reported) and the pass goes on; housekeeping
carries on past a key it cannot delete and reports it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from lora_pipeline.lifecycle.housekeeping import PROCESSED, housekeep
from lora_pipeline.lifecycle.reconcile import reconcile
from lora_pipeline.registry.evidence import Submission
from lora_pipeline.registry.models import VersionStatus
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.storage.base import InvalidKey, StoreUnavailable
from lora_pipeline.storage.keys import WEBHOOK_INBOX, WEBHOOK_PROCESSED, WEBHOOK_REJECTED
from lora_pipeline.webhook.inbox import list_inbox

from lora_pipeline_tests.registry.lora_files import at

ODD_NAMES = ["copy of body (1).json", "résumé.json", "body (1).json"]
JOBS = [
    "26945dbf-4e87-4574-ad26-b1f71e865942",
    "c3d1f7aa-5b0e-4e0f-8d55-7a4e3b2c9f10",
    "5f0e8a3c-2d47-4b8e-9c1a-0b6d7e8f9a10",
]


def keys(store, prefix: str) -> list[str]:
    return [info.key for info in store.list(prefix + "/")]


def failed_body(job_id: str) -> bytes:
    return json.dumps({"id": job_id, "status": "FAILED", "error": f"oom {job_id[:4]}"}).encode()


def drop_odd_files(store) -> list[str]:
    """Each job's FAILED body under an odd name, as ``aws s3 cp`` or a file manager leaves it."""
    dropped = []
    for i, (name, job) in enumerate(zip(ODD_NAMES, JOBS, strict=True)):
        RegistryStore(store).apply(f"s{i}", [Submission(f"s{i}", "V1", "r", f"{job}-e1", "ab", {}, at(0))])
        key = f"{WEBHOOK_INBOX}/{name}"
        store.put(key, failed_body(job))
        dropped.append(key)
    return dropped


def test_reconcile_applies_odd_named_inbox_files_and_moves_them_to_processed(store):
    dropped = drop_odd_files(store)

    report = reconcile(store, now=at(60))

    assert sorted(report.webhooks_applied) == sorted(dropped) and report.webhooks_rejected == []
    registry = RegistryStore(store)
    for i, job in enumerate(JOBS):
        version = registry.read(f"s{i}")[0].version("V1")
        assert (version.status, version.error) == (VersionStatus.failed, f"oom {job[:4]}")
    assert keys(store, WEBHOOK_INBOX) == []
    assert sorted(keys(store, WEBHOOK_PROCESSED)) == sorted(f"{WEBHOOK_PROCESSED}/{n}" for n in ODD_NAMES)


def test_housekeeping_prunes_odd_named_processed_files(store):
    drop_odd_files(store)
    reconcile(store, now=at(60))

    report = housekeep(store, now=datetime.now(UTC) + timedelta(days=40))

    assert report.problems == []
    assert sorted(report.deleted[PROCESSED]) == sorted(f"{WEBHOOK_PROCESSED}/{n}" for n in ODD_NAMES)
    assert keys(store, WEBHOOK_PROCESSED) == []


class _Unreadable:
    """``inner`` whose reads (or deletes) of some keys fail as a file with bad permissions does."""

    def __init__(self, inner, *, reads=(), deletes=(), error: Exception | None = None) -> None:
        self.inner, self.reads, self.deletes = inner, set(reads), set(deletes)
        self.error = error or PermissionError(13, "Permission denied")

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def get(self, key):
        if key in self.reads:
            raise self.error
        return self.inner.get(key)

    def download_file(self, key, path):
        if key in self.reads:
            raise self.error
        return self.inner.download_file(key, path)

    def delete(self, key):
        if key in self.deletes:
            raise self.error
        return self.inner.delete(key)


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"), InvalidKey("invalid object key")], ids=str)
def test_an_unreadable_inbox_file_is_reported_and_the_pass_goes_on(store, error):
    dropped = drop_odd_files(store)
    wrapped = _Unreadable(store, reads={dropped[0]}, error=error)

    items = list(list_inbox(wrapped))
    assert [i.key for i in items if i.problem] == [dropped[0]]
    assert "unreadable" in items[[i.key for i in items].index(dropped[0])].problem

    report = reconcile(wrapped, now=at(60))

    assert sorted(report.webhooks_applied) == sorted(dropped[1:])
    assert report.webhooks_rejected == [dropped[0]]
    # It could not be copied either: it stays where it is, and the pass says so.
    assert any(dropped[0] in p and "could not move" in p for p in report.problems)
    assert keys(store, WEBHOOK_INBOX) == [dropped[0]]


def test_an_unparsable_odd_named_file_goes_to_rejected_with_its_reason(store):
    key = f"{WEBHOOK_INBOX}/copy of body (1).json"
    store.put(key, b"<html>proxy error</html>")

    report = reconcile(store, now=at(60))

    assert report.webhooks_rejected == [key]
    rejected = f"{WEBHOOK_REJECTED}/copy of body (1).json"
    assert keys(store, WEBHOOK_REJECTED) == [rejected, rejected + ".reason.txt"]
    assert "not JSON" in store.get(rejected + ".reason.txt").data.decode()


def test_housekeeping_carries_on_past_a_key_it_cannot_delete_and_reports_it(store):
    drop_odd_files(store)
    reconcile(store, now=at(60))
    stuck = f"{WEBHOOK_PROCESSED}/{ODD_NAMES[1]}"
    wrapped = _Unreadable(store, deletes={stuck})

    report = housekeep(wrapped, now=datetime.now(UTC) + timedelta(days=40))

    assert keys(store, WEBHOOK_PROCESSED) == [stuck]
    assert stuck not in report.deleted[PROCESSED] and len(report.deleted[PROCESSED]) == 2
    assert [p for p in report.problems if stuck in p and "not deleted" in p]


def test_housekeeping_stops_when_the_store_is_down(store):
    drop_odd_files(store)
    reconcile(store, now=at(60))
    processed = keys(store, WEBHOOK_PROCESSED)
    wrapped = _Unreadable(store, deletes=set(processed), error=StoreUnavailable("breaker open"))

    report = housekeep(wrapped, now=datetime.now(UTC) + timedelta(days=40))

    assert report.deleted[PROCESSED] == [] and keys(store, WEBHOOK_PROCESSED) == processed
    assert len(report.problems) == 1 and "stopped" in report.problems[0]
