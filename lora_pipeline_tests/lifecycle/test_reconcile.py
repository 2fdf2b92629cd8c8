"""Reconciliation: files, inbox and polls become evidence; only changed documents are written;
a second run right after reads no document and writes nothing."""

import json
from datetime import timedelta

import pytest

from lora_pipeline.backends.base import JobNotFound
from lora_pipeline.contracts.job_status import JobStatus
from lora_pipeline.lifecycle.reconcile import WEBHOOK_REJECTED, reconcile
from lora_pipeline.registry.evidence import Submission
from lora_pipeline.registry.models import VersionStatus
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.webhook.inbox import WEBHOOK_INBOX, write_webhook

from lora_pipeline_tests.registry.lora_files import at, lora_bytes, truncated_lora_bytes

JOB = "26945dbf-4e87-4574-ad26-b1f71e865942"


class CountingStore:
    """Counts reads of registry documents and every write, to prove a no-op run is one."""

    def __init__(self, inner):
        self.inner, self.doc_reads, self.writes = inner, [], []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def get(self, key):
        if key.endswith("training_versions.json"):
            self.doc_reads.append(key)
        return self.inner.get(key)

    def put(self, key, data, **kw):
        self.writes.append(key)
        return self.inner.put(key, data, **kw)

    def delete(self, key):
        self.writes.append(key)
        return self.inner.delete(key)


def submit(store, version="V1", job=f"{JOB}-e2", style="s", minute=0):
    RegistryStore(store).apply(style, [Submission(style, version, "r", job, "ab", {}, at(minute))])


def test_files_in_the_store_create_completed_versions(store):
    store.put("loras/s/s_vV1.safetensors", lora_bytes())
    store.put("loras/s/s_v2.safetensors", lora_bytes())
    report = reconcile(store)
    doc, _ = RegistryStore(store).read("s")
    assert [(v.name, v.status) for v in doc.versions] == [
        ("V1", VersionStatus.completed),
        ("V2", VersionStatus.completed),
    ]
    assert report.changed_versions == 2
    assert doc.version("V1").lora_url == store.url("loras/s/s_vV1.safetensors")


def test_a_second_run_reads_no_document_and_writes_nothing(store):
    for style in ("a", "b"):
        store.put(f"loras/{style}/{style}_v1.safetensors", lora_bytes())
    submit(store, "V2", style="a")
    reconcile(store)
    counting = CountingStore(store)
    report = reconcile(counting, now=at(10))
    assert report.changed_versions == 0
    assert counting.doc_reads == [] and counting.writes == []


def test_only_the_style_with_a_new_file_is_read_and_written(local_store):
    for style in ("a", "b"):
        local_store.put(f"loras/{style}/{style}_v1.safetensors", lora_bytes())
    reconcile(local_store)
    local_store.put("loras/b/b_v2.safetensors", lora_bytes())
    counting = CountingStore(local_store)
    report = reconcile(counting)
    assert counting.doc_reads == ["registry/b/training_versions.json"]
    assert [(c.style, c.version, c.kind) for c in report.changes] == [("b", "V2", "created")]


@pytest.mark.parametrize("content", [truncated_lora_bytes(), b"not a LoRA", b""])
def test_a_corrupt_file_never_completes_a_version_and_is_reported(local_store, content):
    submit(local_store)
    local_store.put("loras/s/s_v1.safetensors", content)
    report = reconcile(local_store, now=at(1))
    doc, _ = RegistryStore(local_store).read("s")
    assert doc.version("V1").status is VersionStatus.starting
    assert any("loras/s/s_v1.safetensors" in p for p in report.problems)
    assert [r.key for r in doc.rejected_files] == ["loras/s/s_v1.safetensors"]
    assert reconcile(CountingStore(local_store), now=at(2)).headers_read == 0


def test_another_styles_file_in_a_folder_is_ignored(local_store):
    local_store.put("loras/style_59/style_5_vV1.safetensors", lora_bytes())
    local_store.put("loras/style_59/notes.txt", b"not a LoRA")
    reconcile(local_store)
    assert RegistryStore(local_store).styles() == []


def test_a_bad_style_folder_is_reported_and_the_others_still_processed(local_store):
    local_store.put("loras/bad..style/bad..style_v1.safetensors", lora_bytes())
    local_store.put("loras/good/good_v1.safetensors", lora_bytes())
    report = reconcile(local_store)
    assert any("bad..style" in p and "invalid style name" in p for p in report.problems)
    assert RegistryStore(local_store).styles() == ["good"]


def test_dry_run_reports_changes_and_writes_nothing(local_store):
    local_store.put("loras/s/s_v1.safetensors", lora_bytes())
    counting = CountingStore(local_store)
    report = reconcile(counting, dry_run=True)
    assert report.changed_versions == 1 and report.dry_run
    assert counting.writes == []


def test_inbox_webhooks_are_applied_and_archived(local_store):
    submit(local_store)
    write_webhook(local_store, json.dumps({"id": JOB, "status": "FAILED", "error": "CUDA out of memory"}).encode())
    report = reconcile(local_store, now=at(1))
    doc, _ = RegistryStore(local_store).read("s")
    assert (doc.version("V1").status, doc.version("V1").error) == (VersionStatus.failed, "CUDA out of memory")
    assert len(report.webhooks_applied) == 1
    assert list(local_store.list(WEBHOOK_INBOX + "/")) == []


def test_a_webhook_for_an_unknown_job_stays_in_the_inbox(local_store):
    write_webhook(local_store, json.dumps({"id": JOB, "status": "FAILED"}).encode())
    report = reconcile(local_store)
    assert len(report.webhooks_waiting) == 1
    assert len(list(local_store.list(WEBHOOK_INBOX + "/"))) == 1


def test_an_unparseable_webhook_file_moves_to_rejected_with_its_reason(local_store):
    local_store.put(f"{WEBHOOK_INBOX}/20260101T000000000000Z_{JOB}.json", b"{broken")
    report = reconcile(local_store)
    keys = [i.key for i in local_store.list(WEBHOOK_REJECTED + "/")]
    assert keys == [
        f"{WEBHOOK_REJECTED}/20260101T000000000000Z_{JOB}.json",
        f"{WEBHOOK_REJECTED}/20260101T000000000000Z_{JOB}.json.reason.txt",
    ]
    assert b"not JSON" in local_store.get(keys[1]).data
    assert len(report.webhooks_rejected) == 1


def test_polls_move_unfinished_jobs_forward(local_store):
    submit(local_store)
    lookups = []

    def lookup(job_id):
        lookups.append(job_id)
        return JobStatus(id=job_id, status="IN_PROGRESS", delayTime=5, executionTime=10)

    reconcile(local_store, status_lookup=lookup, now=at(1))
    assert lookups == [f"{JOB}-e2"]
    assert RegistryStore(local_store).read("s")[0].version("V1").status is VersionStatus.training


def test_a_poll_with_no_news_reads_no_document(local_store):
    submit(local_store)

    def lookup(job_id):
        return JobStatus(id=job_id, status="IN_PROGRESS")

    reconcile(local_store, status_lookup=lookup, now=at(1))
    counting = CountingStore(local_store)
    reconcile(counting, status_lookup=lookup, now=at(2))
    assert counting.doc_reads == [] and counting.writes == []


def _expired(job_id):
    raise JobNotFound(job_id)


def test_an_expired_job_with_its_file_in_the_store_is_completed(local_store):
    submit(local_store)
    local_store.put("loras/s/s_v1.safetensors", lora_bytes())
    reconcile(local_store, status_lookup=_expired, now=at(5))
    assert RegistryStore(local_store).read("s")[0].version("V1").status is VersionStatus.completed


def test_an_expired_job_without_a_file_waits_for_the_maximum_age(local_store):
    submit(local_store)
    reconcile(local_store, status_lookup=_expired, now=at(60), max_job_age=timedelta(hours=2))
    assert RegistryStore(local_store).read("s")[0].version("V1").status is VersionStatus.starting


def test_an_expired_job_without_a_file_fails_with_a_clear_reason_after_the_maximum_age(local_store):
    submit(local_store)
    reconcile(local_store, status_lookup=_expired, now=at(180), max_job_age=timedelta(hours=2))
    version = RegistryStore(local_store).read("s")[0].version("V1")
    assert version.status is VersionStatus.failed
    assert "no longer knows" in version.error and "maximum job age" in version.error


def test_a_completed_job_without_a_readable_file_fails_with_a_reason(local_store):
    submit(local_store)

    def lookup(job_id):
        return JobStatus(id=job_id, status="COMPLETED", output={"lora_key": "loras/s/s_v1.safetensors"})

    reconcile(local_store, status_lookup=lookup, now=at(5))
    version = RegistryStore(local_store).read("s")[0].version("V1")
    assert version.status is VersionStatus.failed
    assert "COMPLETED but no readable LoRA file" in version.error


def test_report_to_dict_has_an_integer_changed_versions_and_details(local_store):
    local_store.put("loras/s/s_v1.safetensors", lora_bytes())
    out = reconcile(local_store).to_dict()
    assert out["changed_versions"] == 1 and isinstance(out["changed_versions"], int)
    assert out["details"][0]["version"] == "V1"
    assert json.loads(json.dumps(out)) == out


def test_two_files_for_one_version_are_both_accounted_for_and_not_re_read(local_store):
    local_store.put("loras/s/s_vV1.safetensors", lora_bytes({"n": "legacy"}))
    local_store.put("loras/s/s_v1.safetensors", lora_bytes({"n": "canonical"}))
    reconcile(local_store)
    doc, _ = RegistryStore(local_store).read("s")
    assert len(doc.versions) == 1
    assert {doc.versions[0].s3_key, *(f.key for f in doc.superseded_files)} == {
        "loras/s/s_vV1.safetensors",
        "loras/s/s_v1.safetensors",
    }
    counting = CountingStore(local_store)
    assert reconcile(counting).headers_read == 0 and counting.doc_reads == []
