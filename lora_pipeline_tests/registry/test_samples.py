"""A version's sample images in the registry document (``samples``): through the merge, and
through ``record_completion`` with a job's output."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from lora_pipeline.contracts.job_status import JobStatus
from lora_pipeline.lifecycle.submit import record_completion
from lora_pipeline.registry.evidence import JobReport, Submission
from lora_pipeline.registry.merge import merge
from lora_pipeline.registry.models import RegistryDocument, SampleImage
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.storage.local import LocalStore
from lora_pipeline_tests.registry.lora_files import lora_bytes

S = "geo"
JOB = "5f0e8a52-1111-4c1e-9b0a-9e0c3f1a0001-e1"
AT = datetime(2026, 1, 1, tzinfo=UTC)
KEY0, KEY1 = f"loras/{S}/{S}_v1_sample_0.png", f"loras/{S}/{S}_v1_sample_1.png"


def submitted() -> Submission:
    return Submission(S, 1, "req-1", JOB, "ab" * 32, {"rank": 4}, AT)


def report(output: dict) -> JobReport:
    return JobReport(JOB, "COMPLETED", output, None, 1, 2, AT)


def test_a_completed_jobs_samples_are_listed_on_its_version_with_prompt_and_seed() -> None:
    samples = [{"key": KEY1, "prompt": "geo, b", "seed": 1}, {"key": KEY0, "prompt": "geo, a", "seed": 0}]
    doc = merge(RegistryDocument(style=S), [submitted(), report({"samples": samples})])
    assert doc.version(1).samples == (SampleImage(KEY0, "geo, a", 0), SampleImage(KEY1, "geo, b", 1))
    raw = json.loads(doc.to_json())["versions"][0]["samples"]
    assert raw[0] == {"key": KEY0, "prompt": "geo, a", "seed": 0, "url": None}
    assert RegistryDocument.from_json(doc.to_json(), S).version(1).samples == doc.version(1).samples


def test_an_older_workers_bare_sample_keys_are_listed_without_prompt_or_seed() -> None:
    doc = merge(RegistryDocument(style=S), [submitted(), report({"sample_keys": [KEY0]})])
    assert doc.version(1).samples == (SampleImage(KEY0),)


def test_the_entry_that_says_most_wins_whatever_the_order() -> None:
    bare, full = report({"sample_keys": [KEY0]}), report({"samples": [{"key": KEY0, "prompt": "p", "seed": 3}]})
    one = merge(RegistryDocument(style=S), [submitted(), bare, full])
    two = merge(RegistryDocument(style=S), [full, submitted(), bare])
    assert one.version(1).samples == two.version(1).samples == (SampleImage(KEY0, "p", 3),)


def test_a_document_without_samples_reads_and_writes_as_before() -> None:
    doc = merge(RegistryDocument(style=S), [submitted()])
    assert "samples" not in json.loads(doc.to_json())["versions"][0]


def test_record_completion_lists_the_jobs_samples_with_their_store_urls(tmp_path) -> None:
    store = LocalStore(tmp_path / "store")
    RegistryStore(store).apply(S, [submitted()])
    lora = f"loras/{S}/{S}_v1.safetensors"
    store.put(lora, lora_bytes({"lora_pipeline.steps": "3"}))
    output = {"lora_key": lora, "sample_keys": [KEY0, KEY1], "samples": [{"key": KEY0, "prompt": "geo, a", "seed": 5}]}
    completion = record_completion(store, S, JobStatus(id=JOB, status="COMPLETED", output=output), source="poll")
    assert completion.version.samples == (SampleImage(KEY0, "geo, a", 5, store.url(KEY0)),)
    completion = record_completion(
        store, S, JobStatus(id=JOB, status="COMPLETED", output={"lora_key": lora, "sample_keys": [KEY1]}), source="poll"
    )
    assert [s.url for s in completion.version.samples] == [store.url(KEY0), store.url(KEY1)]
