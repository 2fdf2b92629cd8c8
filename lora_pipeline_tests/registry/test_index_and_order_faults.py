"""A lagging index strands nothing, and a job finishing mid-reconciliation is not failed.

The registry document and ``registry/index.json`` are separate writes; the index can be
left behind by a crash or a store error between them. Every reader that routes or polls
by the index must still find the job. And reconciliation must look at RunPod before it
lists the store, or a job that completes in between looks like "COMPLETED without a file".
"""

from __future__ import annotations

import json
from datetime import timedelta

from lora_pipeline.backends.base import JobNotFound
from lora_pipeline.contracts.job_status import JobStatus
from lora_pipeline.defs.completion_sensors import unfinished_jobs
from lora_pipeline.lifecycle.reconcile import process_inbox, reconcile
from lora_pipeline.registry.evidence import Submission
from lora_pipeline.registry.models import VersionStatus
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.storage.base import StoreUnavailable
from lora_pipeline.storage.keys import INDEX_KEY
from lora_pipeline.webhook.inbox import write_webhook

from .lora_files import at, lora_bytes

JOB = "0f1e2d3c-4b5a-6978-8a9b-acbdcedfe0f1-u1"


class IndexWritesFail:
    """The store, except that writes of the index fail (a crash between the two writes)."""

    def __init__(self, inner):
        self.inner = inner

    def put(self, key, data, **kwargs):
        if key == INDEX_KEY:
            raise StoreUnavailable("store down (test) writing the index")
        return self.inner.put(key, data, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def submit_with_a_failed_index_write(store) -> None:
    registry = RegistryStore(IndexWritesFail(store))
    try:
        registry.apply("s", [Submission("s", "V1", "req-1", JOB, "ab", {}, at(0))])
    except StoreUnavailable:
        pass  # the document was written; its index entry was not
    assert RegistryStore(store).read("s")[0].version("V1").id == JOB


def test_a_stale_index_still_lists_the_job_for_polling(store):
    submit_with_a_failed_index_write(store)
    registry = RegistryStore(store)
    assert "s" not in registry.read_index()[0].styles  # the stale index itself lacks it
    assert unfinished_jobs(registry) == {JOB: "s"}
    assert registry.read_index()[0].styles["s"].unfinished  # and the index was repaired


def test_a_stale_index_entry_of_a_known_style_is_rebuilt(store):
    RegistryStore(store).apply("s", [Submission("s", "V1", "req-0", None, "ab", {}, at(0))])  # indexed
    submit_with_a_failed_index_write(store)
    registry = RegistryStore(store)
    assert registry.read_index()[0].styles["s"].unfinished == {}  # behind its document
    index, stale = registry.fresh_index()
    assert stale == ["s"] and [j.job_id for j in index.styles["s"].unfinished.values()] == [JOB]


def test_the_webhook_of_a_job_missing_from_the_index_is_applied(store):
    """A FAILED body names no style; only the (rebuilt) index can route it."""
    submit_with_a_failed_index_write(store)
    write_webhook(store, json.dumps({"id": JOB, "status": "FAILED", "error": "CUDA out of memory"}).encode())
    report = process_inbox(store)
    assert report.webhooks_applied and not report.webhooks_waiting
    version = RegistryStore(store).read("s")[0].version("V1")
    assert version.status is VersionStatus.failed and "out of memory" in version.error


def test_a_job_missing_from_the_index_still_expires_three_days_later(store):
    submit_with_a_failed_index_write(store)

    def forgotten(job_id):
        raise JobNotFound(job_id)

    report = reconcile(store, status_lookup=forgotten, now=at(3 * 24 * 60))
    assert report.index_rebuilt == ["s"] and report.polls == 1
    version = RegistryStore(store).read("s")[0].version("V1")
    assert version.status is VersionStatus.failed and "maximum job age" in version.error


def test_a_document_removed_by_hand_leaves_the_index(store):
    RegistryStore(store).apply("s", [Submission("s", "V1", "req-1", JOB, "ab", {}, at(0))])
    store.delete("registry/s/training_versions.json")
    index, _ = RegistryStore(store).fresh_index()
    assert "s" not in index.styles and unfinished_jobs(RegistryStore(store)) == {}


def test_a_job_that_completes_between_the_poll_and_the_listing_is_completed(store):
    """The worker uploads its file, then returns; a poll that sees COMPLETED must be
    followed by a listing that sees the file."""
    RegistryStore(store).apply("s", [Submission("s", "V1", "req-1", JOB, "ab", {}, at(0))])

    def finishes_now(job_id):
        store.put("loras/s/s_v1.safetensors", lora_bytes())  # uploaded just before the answer
        return JobStatus(id=job_id, status="COMPLETED", output={"lora_key": "loras/s/s_v1.safetensors"})

    reconcile(store, status_lookup=finishes_now, now=at(5), max_job_age=timedelta(hours=25))
    version = RegistryStore(store).read("s")[0].version("V1")
    assert version.status is VersionStatus.completed and version.error is None
