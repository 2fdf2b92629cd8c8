"""One test per rule of DESIGN.md "Rules the merge function enforces"."""

import json

import pytest

from lora_pipeline.registry.evidence import (
    JobExpired,
    JobProgressReport,
    JobReport,
    LegacyRecord,
    RejectedLora,
    StoredLora,
    Submission,
)
from lora_pipeline.registry.merge import find_version_by_job, merge, next_version_number
from lora_pipeline.registry.models import RegistryDocument, VersionStatus

from .lora_files import at

JOB = "26945dbf-4e87-4574-ad26-b1f71e865942"
ACCEL = "https://b.s3-accelerate.amazonaws.com/loras/s/s_v1.safetensors"
REGULAR = "https://b.s3.us-west-1.amazonaws.com/loras/s/s_v1.safetensors"
PATH = "https://s3.us-west-1.amazonaws.com/b/loras/s/s_v1.safetensors"


def empty(style: str = "s") -> RegistryDocument:
    return RegistryDocument(style)


def submission(version="V1", job=f"{JOB}-e2", minute=0, style="s", **kw):
    return Submission(
        style,
        version,
        kw.get("request_id", "r1"),
        job,
        kw.get("dataset_hash", "ab"),
        kw.get("params", {"rank": 4}),
        at(minute),
    )


def report(status, job=JOB, minute=1, error=None, output=None, source="webhook"):
    return JobReport(job, status, output, error, 10, 20, at(minute), source)


def stored(version=1, url=REGULAR, key=None, style="s", minute=5, etag="e1"):
    return StoredLora(
        style,
        key or f"loras/{style}/{style}_v{version}.safetensors",
        version,
        url,
        100,
        etag,
        {"lora_pipeline.dataset_hash": "ab"},
        at(minute),
    )


def only(doc: RegistryDocument):
    assert len(doc.versions) == 1, [v.name for v in doc.versions]
    return doc.versions[0]


def test_a_report_with_the_bare_uuid_matches_a_version_stored_with_a_suffix():
    doc = merge(empty(), [submission(job=f"{JOB}-e2"), report("IN_PROGRESS", job=JOB)])
    assert only(doc).status is VersionStatus.training


def test_a_report_with_a_suffix_matches_a_version_stored_with_the_bare_uuid():
    doc = merge(empty(), [submission(job=JOB), report("IN_PROGRESS", job=f"{JOB}-u1")])
    assert only(doc).status is VersionStatus.training


def test_the_id_is_stored_as_runpod_returned_it_not_as_the_webhook_named_it():
    doc = merge(empty(), [submission(job=f"{JOB}-e2"), report("COMPLETED", job=JOB)])
    assert only(doc).id == f"{JOB}-e2"


@pytest.mark.parametrize("spelling", ["vV4", "v4", "VV4", "vv4"])
def test_every_spelling_of_a_file_version_names_the_same_version(spelling):
    key = f"loras/s/s_{spelling}.safetensors"
    doc = merge(empty(), [submission(version="V4"), stored(version=4, key=key)])
    version = only(doc)
    assert version.name == "V4" and version.s3_key == key


def test_a_file_of_style_5_never_lands_in_style_59():
    with pytest.raises(ValueError, match="style 'style_5'"):
        merge(empty("style_59"), [stored(version=1, style="style_5")])


def test_completed_is_sticky_against_any_later_report():
    doc = merge(empty(), [submission(), stored(version=1)])
    for late in ("IN_QUEUE", "IN_PROGRESS", "FAILED", "CANCELLED", "TIMED_OUT"):
        doc = merge(doc, [report(late, minute=30, error="late")])
        assert only(doc).status is VersionStatus.completed
        assert only(doc).error is None


def test_a_valid_file_beats_a_failure_report_in_either_order():
    events = [submission(), report("FAILED", error="CUDA out of memory", minute=50), stored(version=1)]
    assert only(merge(empty(), events)).status is VersionStatus.completed
    assert only(merge(empty(), events[::-1])).status is VersionStatus.completed


def test_completed_job_report_alone_does_not_make_a_version_completed():
    version = only(merge(empty(), [submission(), report("COMPLETED", output={"lora_key": "loras/s/s_v1.safetensors"})]))
    assert version.status is VersionStatus.training
    assert version.job_status == "COMPLETED"


def test_completed_report_with_an_error_in_its_output_is_a_failure():
    version = only(merge(empty(), [submission(), report("COMPLETED", output={"error": "nan loss"})]))
    assert version.status is VersionStatus.failed
    assert version.error == "nan loss"


def test_failure_keeps_runpods_error_over_the_pipelines_expiry_verdict():
    events = [submission(), JobExpired(JOB, at(90), "expired"), report("FAILED", error="CUDA out of memory")]
    assert only(merge(empty(), events)).error == "CUDA out of memory"
    assert only(merge(empty(), events[::-1])).error == "CUDA out of memory"


def test_statuses_move_forward_through_the_lifecycle():
    doc = merge(empty(), [submission(job=None)])
    assert only(doc).status is VersionStatus.pending
    doc = merge(doc, [submission()])
    assert only(doc).status is VersionStatus.starting
    doc = merge(doc, [report("IN_PROGRESS")])
    assert only(doc).status is VersionStatus.training
    doc = merge(doc, [report("IN_QUEUE")])
    assert only(doc).status is VersionStatus.training


@pytest.mark.parametrize(
    ("first", "second", "kept"),
    [(ACCEL, REGULAR, ACCEL), (REGULAR, ACCEL, ACCEL), (REGULAR, PATH, REGULAR), (ACCEL, PATH, ACCEL)],
)
def test_a_lower_ranked_url_never_replaces_a_higher_one(first, second, kept):
    doc = merge(empty(), [stored(url=first)])
    doc = merge(doc, [stored(url=second, minute=9)])
    assert only(doc).lora_url == kept


def test_a_presigned_url_is_never_stored():
    signed = REGULAR + "?X-Amz-Signature=abc&X-Amz-Expires=3600&X-Amz-Credential=k"
    doc = merge(
        empty(),
        [
            stored(url=signed),
            LegacyRecord("s", {"name": "V2", "status": "completed", "loraUrl": signed.replace("v1", "v2")}),
        ],
    )
    assert all("Signature" not in (v.lora_url or "") for v in doc.versions)
    assert doc.version("V1").lora_url == REGULAR


def test_duplicate_records_fold_keeping_the_most_informative_values():
    records = [
        {"id": f"{JOB}-e1", "name": "V4", "status": "training", "createdAt": 1759300000000},
        {
            "id": f"{JOB}-e1",
            "name": "V4",
            "status": "completed",
            "loraUrl": ACCEL,
            "createdAt": 1759300000000,
            "note": "kept",
        },
    ]
    version = only(merge(empty(), [LegacyRecord("s", r) for r in records]))
    assert (version.status, version.lora_url, version.extra["note"]) == (VersionStatus.completed, ACCEL, "kept")


def test_records_sharing_a_job_id_fold_into_one_version_keeping_both_names():
    records = [
        {"id": f"{JOB}-e1", "name": "V3", "status": "training"},
        {"id": JOB, "name": "V4", "status": "completed"},
    ]
    doc = merge(empty(), [LegacyRecord("s", r) for r in records])
    version = only(doc)
    assert version.name == "V3" and version.folded_names == (4,)
    assert doc.version("V4") is version
    assert next_version_number(doc) == 5


def test_a_report_for_an_unknown_job_is_ignored_not_invented():
    doc = merge(empty(), [submission(), report("FAILED", job="00000000-0000-4000-8000-000000000000")])
    assert only(doc).status is VersionStatus.starting


def test_a_report_and_its_submission_in_one_batch_match_whatever_their_order():
    events = [report("IN_PROGRESS"), submission()]
    assert only(merge(empty(), events)).status is VersionStatus.training


def test_legacy_keys_are_kept_so_the_old_dashboard_still_reads_the_document():
    legacy = {
        "versions": [{"id": f"{JOB}-e2", "name": "V3", "status": "pending", "createdAt": 1, "custom": [1]}],
        "currentTraining": {"jobId": f"{JOB}-e2", "startTime": 5, "estimatedDuration": 7, "status": "pending"},
        "dashboardSetting": True,
    }
    doc = merge(RegistryDocument.from_json(json.dumps(legacy).encode(), "s"), [])
    out = json.loads(doc.to_json())
    record = out["versions"][0]
    assert (record["id"], record["name"], record["status"], record["custom"]) == (f"{JOB}-e2", "V3", "pending", [1])
    assert "loraUrl" in record
    assert out["currentTraining"] == legacy["currentTraining"]
    assert out["dashboardSetting"] is True


def test_a_rejected_file_is_recorded_but_never_completes_a_version():
    doc = merge(empty(), [submission(), RejectedLora("s", "loras/s/s_v1.safetensors", "e0", "truncated", at(3))])
    assert only(doc).status is VersionStatus.starting
    assert [r.key for r in doc.rejected_files] == ["loras/s/s_v1.safetensors"]


def test_a_valid_upload_after_a_rejected_one_clears_the_rejection():
    doc = merge(
        empty(),
        [
            RejectedLora("s", "loras/s/s_v1.safetensors", "e0", "truncated", at(3)),
            stored(version=1, key="loras/s/s_v1.safetensors", minute=4),
        ],
    )
    assert doc.rejected_files == ()
    assert only(doc).status is VersionStatus.completed


def test_find_version_by_job_compares_base_uuids():
    doc = merge(empty(), [submission(job=f"{JOB}-e2")])
    assert find_version_by_job(doc, f"{JOB}-u1").name == "V1"
    assert find_version_by_job(doc, "11111111-1111-4111-8111-111111111111") is None


def test_a_running_jobs_latest_heartbeat_wins_whatever_the_order_and_a_newer_one_clears_a_stall():
    early = JobProgressReport(f"{JOB}-e2", at(2), 10, 100, 0.5, "training")
    stalled = JobProgressReport(f"{JOB}-e2", at(2), 10, 100, 0.5, "training", "stalled: no progress update since …")
    late = JobProgressReport(JOB, at(9), 60, 100, 0.25, "training")
    for order in ([early, stalled, late], [late, stalled, early], [stalled, late, early]):
        version = only(merge(empty(), [submission(), *order]))
        assert version.status == VersionStatus.training and version.progress.step == 60
        assert version.progress.stalled is None
    flagged = only(merge(empty(), [submission(), early, stalled]))
    assert flagged.progress.stalled is not None  # same heartbeat: the verdict is the more informative
    assert only(merge(empty(), [submission(), stalled, report("COMPLETED")])).job_status == "COMPLETED"


def test_progress_is_an_additive_key_of_the_version_record():
    doc = merge(empty(), [submission(), JobProgressReport(JOB, at(3), 5, 10, 0.125, "training")])
    record = json.loads(doc.to_json())["versions"][0]
    assert record["progress"] == {
        "heartbeatAt": record["progress"]["heartbeatAt"],
        "stalled": False,
        "step": 5,
        "total": 10,
        "loss": 0.125,
        "phase": "training",
    }
    assert RegistryDocument.from_json(doc.to_json(), "s") == doc
