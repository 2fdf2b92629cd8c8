"""Property-based: the merge is idempotent, order-independent, batch-independent and never
loses a version, for any mix of evidence."""

from hypothesis import given, settings
from hypothesis import strategies as st

from lora_pipeline.registry.evidence import (
    JobExpired,
    JobProgressReport,
    JobReport,
    LegacyRecord,
    RejectedLora,
    StoredCompanion,
    StoredLora,
    Submission,
)
from lora_pipeline.registry.merge import merge
from lora_pipeline.registry.models import RegistryDocument

from .lora_files import at

STYLE = "style_59"
BASES = [
    "26945dbf-4e87-4574-ad26-b1f71e865942",
    "0b7c3c1e-9d7a-4f36-9a43-2f6f1d0c8a11",
    "c3d1f7aa-5b0e-4e0f-8d55-7a4e3b2c9f10",
]
URLS = [
    None,
    "https://b.s3-accelerate.amazonaws.com/k",
    "https://b.s3.us-west-1.amazonaws.com/k",
    "https://s3.us-west-1.amazonaws.com/b/k",
    "https://b.s3.us-west-1.amazonaws.com/k?X-Amz-Signature=x",
    "file:///tmp/k",
]

numbers = st.integers(1, 4)
minutes = st.integers(0, 100)
job_ids = st.builds(lambda b, s: b + s, st.sampled_from(BASES), st.sampled_from(["", "-e1", "-e2", "-u1"]))
maybe_job = st.one_of(st.none(), job_ids)

# The family and base model each evidence names (None: it names none); the merge keeps the best attested.
FAMILIES = [None, "sd1", "sdxl", "flux1"]
BASE_MODELS = [None, "tiny", "tiny-sdxl", "/models/flux"]


def model_metadata(family, base):
    return {k: v for k, v in (("lora_pipeline.family", family), ("lora_pipeline.base_model", base)) if v is not None}


submissions = st.builds(
    lambda n, job, m, req, ds, family, base: Submission(STYLE, n, req, job, ds, {"rank": 4}, at(m), family, base),
    numbers,
    maybe_job,
    minutes,
    st.sampled_from(["r1", "r2"]),
    st.sampled_from(["aa", "bb"]),
    st.sampled_from(FAMILIES),
    st.sampled_from(BASE_MODELS),
)
reports = st.builds(
    lambda job, status, err, m, src, out: JobReport(job, status, out, err, m, m * 2, at(m), src),
    job_ids,
    st.sampled_from(["IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"]),
    st.sampled_from([None, "CUDA out of memory", "boom"]),
    minutes,
    st.sampled_from(["poll", "webhook"]),
    st.sampled_from(
        [
            None,
            {"lora_key": "loras/style_59/style_59_v1.safetensors", "steps": 30},
            {"error": "x"},
            {"steps": 30, "metadata": model_metadata("sdxl", "tiny-sdxl")},
            {"steps": 30, "metadata": model_metadata("sd1", None)},
        ]
    ),
)
LAYOUTS = [None, "diffusers", "kohya", "unknown"]
stored = st.builds(
    lambda n, spelling, url, etag, m, layout, family, base: StoredLora(
        STYLE,
        f"loras/{STYLE}/{STYLE}_{spelling}{n}.safetensors",
        n,
        url,
        10,
        etag,
        {"k": etag, **model_metadata(family, base)},
        at(m),
        layout,
        None if layout is None else etag * 32,
    ),
    numbers,
    st.sampled_from(["v", "vV", "VV"]),
    st.sampled_from(URLS),
    st.sampled_from(["e1", "e2"]),
    minutes,
    st.sampled_from(LAYOUTS),
    st.sampled_from(FAMILIES),
    st.sampled_from(BASE_MODELS),
)
# A version's file in its other layout: attached only once its version is completed.
companions = st.builds(
    lambda n, spelling, suffix, url, etag, m, layout: StoredCompanion(
        STYLE, f"loras/{STYLE}/{STYLE}_{spelling}{n}_{suffix}.safetensors", n, url, 9, etag, layout, None, at(m)
    ),
    numbers,
    st.sampled_from(["v", "vV"]),
    st.sampled_from(["kohya", "diffusers"]),
    st.sampled_from(URLS),
    st.sampled_from(["k1", "k2"]),
    minutes,
    st.sampled_from(["kohya", "diffusers", "unknown"]),
)
rejected = st.builds(
    lambda n, suffix, etag, m: RejectedLora(
        STYLE, f"loras/{STYLE}/{STYLE}_v{n}{suffix}.safetensors", etag, "bad", at(m)
    ),
    numbers,
    st.sampled_from(["", "", "_kohya"]),
    st.sampled_from(["e0", "e3"]),
    minutes,
)
legacy = st.builds(
    lambda n, job, status, url, created, note, family: LegacyRecord(
        STYLE,
        {
            k: v
            for k, v in {
                "id": job,
                "name": f"V{n}",
                "status": status,
                "loraUrl": url,
                "createdAt": created,
                "note": note,
                "family": family,
            }.items()
            if v is not None
        },
    ),
    numbers,
    maybe_job,
    st.sampled_from(["pending", "training", "completed", "failed"]),
    st.sampled_from(URLS),
    st.one_of(st.none(), st.integers(1759000000000, 1759900000000)),
    st.sampled_from([None, "a", "b"]),
    st.sampled_from(FAMILIES),
)
expiries = st.builds(
    lambda job, m, why: JobExpired(job, at(m), why), job_ids, minutes, st.sampled_from(["expired", "no file"])
)
# A running job's heartbeat, or the verdict that it stalled: the latest heartbeat wins.
heartbeats = st.builds(
    lambda job, m, step, loss, stalled: JobProgressReport(job, at(m), step, 100, loss, "training", stalled),
    job_ids,
    minutes,
    st.sampled_from([None, 10, 20]),
    st.sampled_from([None, 0.5, 0.25]),
    st.sampled_from([None, "stalled: no progress update since …"]),
)

numbered = st.one_of(submissions, stored, legacy, rejected, companions)
job_only = st.one_of(reports, expiries, heartbeats)
evidence_lists = st.lists(st.one_of(numbered, job_only), max_size=14)


def doc_bytes(doc: RegistryDocument) -> bytes:
    return doc.to_json()


@settings(max_examples=300, deadline=None)
@given(evidence_lists)
def test_merging_the_same_evidence_twice_changes_nothing(evidence):
    once = merge(RegistryDocument(STYLE), evidence)
    assert doc_bytes(merge(once, evidence)) == doc_bytes(once)
    assert doc_bytes(merge(once, [])) == doc_bytes(once)


@settings(max_examples=300, deadline=None)
@given(evidence_lists, st.randoms(use_true_random=False))
def test_the_order_of_evidence_does_not_matter(evidence, random):
    shuffled = list(evidence)
    random.shuffle(shuffled)
    assert doc_bytes(merge(RegistryDocument(STYLE), shuffled)) == doc_bytes(merge(RegistryDocument(STYLE), evidence))


@settings(max_examples=300, deadline=None)
@given(st.lists(numbered, max_size=10), st.lists(numbered, max_size=6), st.lists(job_only, max_size=6))
def test_applying_evidence_in_batches_equals_applying_it_at_once(first, second, reports_later):
    """Job reports come in a batch after the evidence that introduces their job (the
    inbox keeps a report until its job is known)."""
    stepwise = merge(merge(RegistryDocument(STYLE), first), second + reports_later)
    at_once = merge(RegistryDocument(STYLE), first + second + reports_later)
    assert doc_bytes(stepwise) == doc_bytes(at_once)


@settings(max_examples=300, deadline=None)
@given(evidence_lists, evidence_lists)
def test_a_version_once_recorded_is_never_lost(earlier, later):
    before = merge(RegistryDocument(STYLE), earlier)
    after = merge(before, later)
    for version in before.versions:
        for number in version.numbers:
            assert after.version(number) is not None
    named = {e.version_number for e in earlier + later if isinstance(e, (Submission, StoredLora))}
    assert all(after.version(n) is not None for n in named)


@settings(max_examples=200, deadline=None)
@given(evidence_lists)
def test_no_two_versions_share_a_name_or_a_job(evidence):
    doc = merge(RegistryDocument(STYLE), evidence)
    names = [n for v in doc.versions for n in v.numbers]
    jobs = [b for v in doc.versions for b in v.job_bases]
    assert len(names) == len(set(names))
    assert len(jobs) == len(set(jobs))


@settings(max_examples=200, deadline=None)
@given(evidence_lists)
def test_a_document_survives_its_json_round_trip(evidence):
    doc = merge(RegistryDocument(STYLE), evidence)
    again = merge(RegistryDocument.from_json(doc.to_json(), STYLE), [])
    assert doc_bytes(again) == doc_bytes(doc)


@settings(max_examples=200, deadline=None)
@given(evidence_lists)
def test_no_presigned_url_ever_reaches_a_document(evidence):
    assert b"X-Amz-Signature" not in merge(RegistryDocument(STYLE), evidence).to_json()


@settings(max_examples=200, deadline=None)
@given(evidence_lists, st.sampled_from(["kohya", "diffusers"]))
def test_every_file_is_accounted_for_once_and_a_version_has_one_file_per_layout(evidence, primary):
    """Each file key is a version's main file, a completed version's file in another layout, a
    superseded file or a rejected one (a main file later overwritten by a broken upload is
    both its version's proof and rejected); a file in another layout is attached to one
    version or kept as superseded, never both; the JSON round trip keeps all of it."""
    doc = merge(RegistryDocument(STYLE), evidence)
    attached = [c.key for v in doc.versions for c in v.companions]
    superseded = [f.key for f in doc.superseded_files]
    places = {v.file.key for v in doc.versions if v.file} | set(attached) | set(superseded)
    places |= {r.key for r in doc.rejected_files}
    assert places == {e.key for e in evidence if isinstance(e, (StoredLora, StoredCompanion, RejectedLora))}
    assert len(attached) == len(set(attached)) and not set(attached) & set(superseded)
    for v in doc.versions:
        assert not v.companions or v.status.value == "completed"
        layouts = [c.layout for c in v.companions] + ([v.file.layout] if v.file and v.file.layout else [])
        assert len(layouts) == len(set(layouts))
    again = merge(RegistryDocument.from_json(doc.to_json(primary), STYLE), [])
    assert again.to_json(primary) == doc.to_json(primary)


@settings(max_examples=200, deadline=None)
@given(evidence_lists)
def test_a_version_s_family_and_base_model_are_the_best_attested_ones(evidence):
    """A file's header outranks the worker's result, which outranks the request (and a value of
    unknown origin): for each version the recorded witness is the best among the evidence that
    named it, and a version whose own main file names a family records that one."""
    doc = merge(RegistryDocument(STYLE), evidence)
    rank = {"recorded": 0, "request": 1, "worker": 2, "file": 3}
    for v in doc.versions:
        for attested in (v.family, v.base_model):
            assert attested is None or attested.by in rank
        header = v.file.metadata if v.file else {}
        if "lora_pipeline.family" in header:
            assert v.family is not None and v.family.by == "file"
        named = [e for e in evidence if isinstance(e, Submission) and e.version_number in v.numbers and e.family]
        if named:
            assert v.family is not None and rank[v.family.by] >= rank["request"]
