"""Pure checks behind the lora_registry asset checks, run on documents as stored."""

import json

from lora_pipeline.registry.checks import (
    completed_without_readable_file,
    duplicate_job_ids,
    duplicate_names,
    stored_document_problems,
    stored_presigned_urls,
)
from lora_pipeline.registry.models import RegistryDocument

JOB = "26945dbf-4e87-4574-ad26-b1f71e865942"


def stored(*records) -> bytes:
    return json.dumps({"versions": list(records)}).encode()


def test_duplicate_names_are_found_in_a_stored_document():
    doc = RegistryDocument.from_json(
        stored({"name": "V4", "status": "training"}, {"name": "vV4", "status": "completed"}), "s"
    )
    assert duplicate_names(doc) == ["s: V4 appears in 2 records"]


def test_duplicate_job_ids_are_compared_without_suffix():
    doc = RegistryDocument.from_json(
        stored({"id": f"{JOB}-e1", "name": "V1", "status": "completed"}, {"id": JOB, "name": "V2", "status": "failed"}),
        "s",
    )
    assert duplicate_job_ids(doc) == [f"s: job {JOB} appears in 2 records"]


def test_a_completed_version_needs_a_readable_file():
    doc = RegistryDocument.from_json(
        stored(
            {"name": "V1", "status": "completed"},
            {"name": "V2", "status": "completed", "file": {"key": "loras/s/s_v2.safetensors"}},
            {"name": "V3", "status": "completed", "file": {"key": "loras/s/s_v3.safetensors"}},
        ),
        "s",
    )
    problems = completed_without_readable_file(doc, readable=lambda key: key.endswith("v3.safetensors"))
    assert problems == [
        "s V1: completed but no LoRA file is recorded",
        "s V2: completed but loras/s/s_v2.safetensors is missing or unreadable",
    ]


def test_a_stored_presigned_url_is_reported():
    data = stored(
        {
            "name": "V1",
            "status": "completed",
            "loraUrl": "https://b.s3.amazonaws.com/k?X-Amz-Signature=abc&X-Amz-Expires=60",
        }
    )
    assert stored_presigned_urls(data) == ["V1: loraUrl is a presigned URL (it expires; store the plain URL)"]


def test_a_clean_document_has_no_problems():
    data = stored({"id": JOB, "name": "V1", "status": "training"})
    assert stored_document_problems(data, "s", readable=lambda key: True) == []


def test_an_unreadable_document_is_one_problem():
    assert stored_document_problems(b"{", "s", readable=lambda key: True)[0].startswith("registry document of 's'")
