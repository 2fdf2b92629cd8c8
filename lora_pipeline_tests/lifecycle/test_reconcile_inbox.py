"""Issue 11, items 5 and 6, in reconciliation: an unusable inbox file is rejected (moved, with
its reason) and never stops the pass; a status body under any ``.json`` name is applied, at
the object's time when its name carries no stamp."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime

import pytest

from lora_pipeline.lifecycle.reconcile import WEBHOOK_REJECTED, process_inbox, reconcile
from lora_pipeline.registry.evidence import Submission
from lora_pipeline.registry.models import VersionStatus
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.storage.keys import WEBHOOK_INBOX, WEBHOOK_PROCESSED
from lora_pipeline.webhook.inbox import write_webhook

from lora_pipeline_tests.registry.lora_files import at

JOB = "26945dbf-4e87-4574-ad26-b1f71e865942"
OTHER = "c3d1f7aa-5b0e-4e0f-8d55-7a4e3b2c9f10"
PASSES = {
    "reconcile": lambda store: reconcile(store, now=at(60)),
    "process_inbox": lambda store: process_inbox(store, now=at(60)),
}


def submit(store, style: str, job: str) -> None:
    RegistryStore(store).apply(style, [Submission(style, "V1", "r", job, "ab", {}, at(0))])


def body(job_id: str, status: str = "FAILED", **extra) -> bytes:
    return json.dumps({"id": job_id, "status": status, **extra}).encode()


def keys(store, prefix: str) -> list[str]:
    return [info.key for info in store.list(prefix + "/")]


@pytest.mark.parametrize("run", PASSES.values(), ids=PASSES.keys())
@pytest.mark.parametrize(
    "poison, problem",
    [(body(JOB, delayTime="soon"), "delayTime"), (body(JOB, "COMPLETED", output=5), "output")],
    ids=["delayTime-soon", "output-5"],
)
def test_a_poisoned_file_is_rejected_and_the_good_ones_behind_it_applied(store, run, poison, problem):
    submit(store, "a", f"{JOB}-e1")
    submit(store, "b", f"{OTHER}-u1")
    poisoned = f"{WEBHOOK_INBOX}/20260101T000000000000Z_{JOB}.json"
    store.put(poisoned, poison)
    write_webhook(store, body(JOB, error="CUDA out of memory"), received_at=datetime(2026, 1, 2, tzinfo=UTC))
    write_webhook(store, body(OTHER, error="no images"), received_at=datetime(2026, 1, 3, tzinfo=UTC))

    report = run(store)

    registry = RegistryStore(store)
    assert registry.read("a")[0].version("V1").status is VersionStatus.failed
    assert registry.read("b")[0].version("V1").error == "no images"
    assert report.webhooks_rejected == [poisoned] and len(report.webhooks_applied) == 2
    assert any(poisoned in p and "rejected" in p and problem in p for p in report.problems)
    assert report.to_dict()["stats"]["webhooks_rejected"] == 1
    rejected = f"{WEBHOOK_REJECTED}/20260101T000000000000Z_{JOB}.json"
    assert keys(store, WEBHOOK_REJECTED) == [rejected, rejected + ".reason.txt"]
    assert store.get(rejected).data == poison
    assert problem in store.get(rejected + ".reason.txt").data.decode()
    assert keys(store, WEBHOOK_INBOX) == []


@pytest.mark.parametrize("run", PASSES.values(), ids=PASSES.keys())
@pytest.mark.parametrize("name", [f"{JOB}.json", "anything.json"])
def test_a_foreign_named_status_body_is_applied_at_the_object_time(local_store, run, name):
    submit(local_store, "a", f"{JOB}-e1")
    key = f"{WEBHOOK_INBOX}/{name}"
    local_store.put(key, body(JOB, error="CUDA out of memory"))
    when = datetime(2026, 1, 1, 0, 30, tzinfo=UTC)
    os.utime(local_store.root / key, (when.timestamp(), when.timestamp()))

    report = run(local_store)

    version = RegistryStore(local_store).read("a")[0].version("V1")
    assert (version.status, version.error) == (VersionStatus.failed, "CUDA out of memory")
    assert version.updated_at == int(when.timestamp() * 1000)
    assert report.webhooks_applied == [key] and report.webhooks_rejected == []
    assert keys(local_store, WEBHOOK_INBOX) == []
    assert keys(local_store, WEBHOOK_PROCESSED) == [f"{WEBHOOK_PROCESSED}/{name}"]


def test_dry_run_reports_a_rejection_and_moves_nothing(local_store):
    local_store.put(f"{WEBHOOK_INBOX}/anything.json", body(JOB, output=5))
    report = reconcile(local_store, dry_run=True)
    assert report.webhooks_rejected == [f"{WEBHOOK_INBOX}/anything.json"]
    assert keys(local_store, WEBHOOK_INBOX) == [f"{WEBHOOK_INBOX}/anything.json"]
    assert keys(local_store, WEBHOOK_REJECTED) == []
