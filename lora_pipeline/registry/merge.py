"""The one merge function: every piece of evidence reaches a registry document here.

The document is a join-semilattice: each piece of evidence becomes a version
fragment, fragments that name the same version (same number, or same job by base
UUID) fold into one, and each field keeps its most informative value by a fixed
order (status by lifecycle rank, URL by rank, times by min/max, …), never by
arrival. So merging is idempotent and order-independent, and a version, once
seen, is never lost. DESIGN.md "Rules the merge function enforces" is the spec.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar, overload

from lora_pipeline.registry.aliases import AliasEntry, join_history
from lora_pipeline.registry.evidence import (
    AliasMove,
    Claim,
    Evidence,
    JobExpired,
    JobProgressReport,
    JobReport,
    LegacyRecord,
    RejectedLora,
    StoredCompanion,
    StoredLora,
    SamplesRendered,
    Submission,
    SubmissionLost,
    VersionDeleted,
)
from lora_pipeline.registry.jobids import base_job_id, job_id_suffix
from lora_pipeline.registry.layouts import UNKNOWN
from lora_pipeline.registry.models import (
    Attested,
    epoch_ms,
    LEGACY_COMPANION_URL,
    JobProgress,
    LoraFile,
    RegistryDocument,
    RejectedFile,
    SampleImage,
    SubmitClaim,
    Version,
    VersionStatus,
    read_samples,
)
from lora_pipeline.registry.names import companion_suffix, parse_lora_file, version_name
from lora_pipeline.registry.tombstones import DeletedObject, Deletion
from lora_pipeline.registry.urls import stable_url, url_sort_key

if TYPE_CHECKING:
    from _typeshed import SupportsRichComparison

_T = TypeVar("_T")
_C = TypeVar("_C", bound="SupportsRichComparison")

# Which source's word wins between fragments of equal status: for a completion the
# file in the store is the proof; for a failure RunPod's own error message says most.
_SOURCE_PRIORITY: dict[VersionStatus, dict[str | None, int]] = {
    VersionStatus.completed: {"reconcile": 5, "webhook": 4, "poll": 3, "submit": 2, "legacy": 1},
    VersionStatus.failed: {"webhook": 5, "poll": 4, "legacy": 3, "submit": 2, "reconcile": 1},
}
_DEFAULT_PRIORITY: dict[str | None, int] = {"webhook": 5, "poll": 4, "submit": 3, "reconcile": 2, "legacy": 1}

RUNPOD_STATUS_RANK = {"IN_QUEUE": 1, "IN_PROGRESS": 2, "CANCELLED": 3, "TIMED_OUT": 3, "FAILED": 3, "COMPLETED": 4}
_RUNPOD_TO_STATUS = {"IN_QUEUE": VersionStatus.starting, "IN_PROGRESS": VersionStatus.training}
_METADATA_VALUE_LIMIT = 256  # long header values (ss_tag_frequency…) stay in the file
# The provenance header keys (worker/artifact.py provenance_metadata) naming the family and base model.
FAMILY_KEY = "lora_pipeline.family"
BASE_MODEL_KEY = "lora_pipeline.base_model"


def merge(doc: RegistryDocument, evidence: Iterable[Evidence]) -> RegistryDocument:
    """``doc`` with ``evidence`` applied; pure, idempotent and order-independent.

    Duplicates already in ``doc`` fold too, so ``merge(doc, [])`` normalises a
    document read from a legacy file. A job report (or expiry) for a job that no
    version holds is ignored: the caller keeps it (e.g. in the webhook inbox)
    until a submission or import introduces the job.
    """
    folder = _Folder()
    ledger = _FileLedger(doc.style)
    for version in doc.versions:
        folder.add(version)
        ledger.note(version.file)
        for companion in version.companions:
            ledger.note(companion)
    entries: tuple[RejectedFile | LoraFile, ...] = (*doc.rejected_files, *doc.superseded_files)
    for entry in entries:
        ledger.note(entry)
    job_only: list[Version] = []
    moves: list[AliasEntry] = []
    for item in evidence:
        style = getattr(item, "style", None)
        if style is not None and style != doc.style:
            raise ValueError(f"evidence for style {style!r} given to the document of {doc.style!r}")
        if isinstance(item, AliasMove):
            moves.append(_alias_entry(item))
            continue
        if isinstance(item, RejectedLora):
            ledger.note(RejectedFile(item.key, item.etag, item.reason, epoch_ms(item.at)))
            continue
        if isinstance(item, StoredCompanion):
            ledger.note(
                LoraFile(
                    item.key,
                    item.size,
                    item.etag,
                    epoch_ms(item.at),
                    {},
                    item.layout,
                    item.checksum,
                    stable_url(item.url),
                )
            )
            continue
        fragment = fragment_of(item)
        ledger.note(fragment.file)
        for companion in fragment.companions:  # a record of our schema, imported as legacy
            ledger.note(companion)
        if not folder.add(fragment):
            job_only.append(fragment)
    for fragment in job_only:  # after every fragment that could introduce their job
        folder.add(fragment)
    versions = tuple(folder.versions[n] for n in sorted(folder.versions))
    versions = ledger.attach_companions(_bury(versions, ledger))
    rejected, superseded = ledger.split(versions)
    history = join_history(doc.alias_history, moves) if moves else doc.alias_history
    return replace(doc, versions=versions, rejected_files=rejected, superseded_files=superseded, alias_history=history)


def _bury(versions: tuple[Version, ...], ledger: _FileLedger) -> tuple[Version, ...]:
    """Deleted versions without files (whatever evidence named them), and the objects their
    deletion removed out of the ledger: the document no longer accounts for them. An object
    uploaded again under such a key is another entry, and stays (superseded)."""
    if not any(v.deletion is not None for v in versions):
        return versions
    removed: set[DeletedObject] = set()
    out = []
    for v in versions:
        if v.deletion is None:
            out.append(v)
            continue
        removed.update(v.deletion.files)
        extra = {k: x for k, x in v.extra.items() if k not in (LEGACY_COMPANION_URL, "loraUrl", "s3Key")}
        out.append(
            replace(v, status=VersionStatus.deleted, file=None, lora_url=None, companions=(), claim=None, extra=extra)
        )
    ledger.forget(removed)
    return tuple(out)


class _FileLedger:
    """The latest thing known about every LoRA object key: a valid file or a rejected one.

    Versions keep one main file each, and one file per other layout (companions, once
    completed); a valid file that is neither (an older spelling of the same version, a
    file of a folded duplicate, the companion of a version not completed) stays here as
    "superseded", so every object the store lists stays accounted for and the document
    remains a pure function of its evidence. A companion's URL is kept per key, best
    rank first, apart from its file record (records of one upload differ only in it).
    """

    def __init__(self, style: str) -> None:
        self.style = style
        self.entries: dict[str, LoraFile | RejectedFile] = {}
        self.any_rejected = False
        self.companion_numbers: dict[str, int] = {}  # companion key → the version it names
        self.best_url: dict[str, str] = {}

    def note(self, entry: LoraFile | RejectedFile | None) -> None:
        if entry is None:
            return
        if isinstance(entry, RejectedFile):
            self.any_rejected = True
        elif entry.url is not None:
            known = self.best_url.get(entry.key)
            if known is None or url_sort_key(entry.url) > url_sort_key(known):
                self.best_url[entry.key] = entry.url
            entry = replace(entry, url=None)
        if entry.key not in self.entries and companion_suffix(entry.key) is not None:
            parsed = parse_lora_file(self.style, entry.key.rsplit("/", 1)[-1])
            if parsed is not None and parsed[1] is not None:
                self.companion_numbers[entry.key] = parsed[0]
        current = self.entries.get(entry.key)
        if current is None:
            self.entries[entry.key] = entry
        elif current is not entry and entry.last_seen > current.last_seen:
            self.entries[entry.key] = entry

    def forget(self, removed: set[DeletedObject]) -> None:
        """Drop the entries that are exactly these (key, ETag, last-modified) objects."""
        for key, etag, modified in removed:
            entry = self.entries.get(key)
            if entry is not None and (entry.etag, entry.last_modified) == (etag, modified):
                del self.entries[key]
                self.companion_numbers.pop(key, None)
                self.best_url.pop(key, None)

    def attach_companions(self, versions: tuple[Version, ...]) -> tuple[Version, ...]:
        """Each completed version with its companions: per layout the newest valid file, unless
        its main file already holds that layout."""
        if not self.companion_numbers:
            return versions
        holder = {n: i for i, v in enumerate(versions) for n in v.numbers}
        chosen: dict[tuple[int, str], LoraFile] = {}
        for key, number in self.companion_numbers.items():
            entry = self.entries[key]
            i = holder.get(number)
            if not isinstance(entry, LoraFile) or i is None or versions[i].status is not VersionStatus.completed:
                continue
            layout = entry.layout or UNKNOWN
            main = versions[i].file
            if main is not None and main.layout == layout:
                continue
            current = chosen.get((i, layout))
            if current is None or _file_order(entry) > _file_order(current):
                chosen[(i, layout)] = entry
        attached: dict[int, list[LoraFile]] = {}
        for (i, _layout), entry in chosen.items():
            attached.setdefault(i, []).append(replace(entry, url=self.best_url.get(entry.key)))
        out = []
        for i, version in enumerate(versions):
            files = tuple(sorted(attached.get(i, ()), key=lambda f: f.key))
            out.append(version if version.companions == files else replace(version, companions=files))
        return tuple(out)

    def split(self, versions: tuple[Version, ...]) -> tuple[tuple[RejectedFile, ...], tuple[LoraFile, ...]]:
        if not self.entries:
            return (), ()
        files = [v.file for v in versions if v.file] + [c for v in versions for c in v.companions]
        if not self.any_rejected and len(files) == len(self.entries) and self.entries.keys() == {f.key for f in files}:
            return (), ()  # every object is exactly one version's file (one key, one number)
        in_use = {(f.key, f.last_seen) for f in files}
        rejected, superseded = [], []
        for key in sorted(self.entries):
            entry = self.entries[key]
            if isinstance(entry, RejectedFile):
                rejected.append(entry)
            elif (key, entry.last_seen) not in in_use:
                url = self.best_url.get(key)
                superseded.append(replace(entry, url=url) if url else entry)
        return tuple(rejected), tuple(superseded)


def find_version_by_job(doc: RegistryDocument, job_id: str) -> Version | None:
    """The version that holds ``job_id``, compared by base UUID (suffixes aside)."""
    base = base_job_id(job_id)
    return next((v for v in doc.versions if base in v.job_bases), None)


def next_version_number(doc: RegistryDocument) -> int:
    """One past the highest version number the document knows (folded names included)."""
    return max((n for v in doc.versions for n in v.numbers), default=0) + 1


def _alias_entry(item: AliasMove) -> AliasEntry:
    """The alias history entry an alias move adds (the merge joins them in ``seq`` order)."""
    return AliasEntry(
        item.seq,
        item.alias,
        version_name(item.version_number),
        item.action,
        item.by,
        epoch_ms(item.at),
        item.previous,
        item.reason,
    )


def fragment_of(item: Evidence) -> Version:
    """The version fragment a piece of evidence asserts. Number 0 means "job only"."""
    # Long on purpose: one branch per evidence type, each a single Version(...) with a field per
    # line, so the whole mapping from evidence to fragment is read in one place.
    if type(item) is StoredLora:  # by far the most common evidence: test it first
        return _stored_fragment(item)
    if isinstance(item, Submission):
        at = epoch_ms(item.at)
        return Version(
            number=item.version_number,
            status=VersionStatus.starting if item.job_id else VersionStatus.pending,
            source="submit",
            job_ids=(item.job_id,) if item.job_id else (),
            created_at=at,
            updated_at=at,
            start_time=at if item.job_id else None,
            request_id=item.request_id,
            dataset_hash=item.dataset_hash,
            params=dict(item.params),
            family=Attested.of(item.family, "request"),
            base_model=Attested.of(item.base_model, "request"),
        )
    if isinstance(item, JobReport):
        return _report_fragment(item)
    if isinstance(item, StoredLora):
        return _stored_fragment(item)
    if isinstance(item, LegacyRecord):
        return replace(Version.from_dict(item.raw, default_source="legacy"), source="legacy")
    if isinstance(item, Claim):
        at = epoch_ms(item.at)
        return Version(
            number=item.version_number,
            # "unknown": RunPod may have queued it; otherwise nothing was sent (yet).
            status=VersionStatus.starting if item.phase == "unknown" else VersionStatus.pending,
            source="submit",
            created_at=at,
            claim=SubmitClaim(item.owner, item.phase, at, epoch_ms(item.lease_until), item.note),
        )
    if isinstance(item, SubmissionLost):
        return Version(
            number=item.version_number,
            status=VersionStatus.failed,
            source="reconcile",
            error=item.reason,
            updated_at=epoch_ms(item.at),
        )
    if isinstance(item, JobProgressReport):
        at = epoch_ms(item.at)
        return Version(
            number=0,
            status=VersionStatus.training,  # a worker that reports progress is running
            source="poll",
            job_ids=(item.job_id,),
            updated_at=at,
            job_status="IN_PROGRESS",
            progress=JobProgress(at, item.step, item.total, item.loss, item.phase, item.stalled),
        )
    if isinstance(item, VersionDeleted):
        at = epoch_ms(item.at)
        return Version(
            number=item.version_number,
            status=VersionStatus.deleted,
            source="operator",
            created_at=at,
            updated_at=at,
            deletion=Deletion(at, item.by, item.reason, tuple(sorted(set(item.files)))),
        )
    if isinstance(item, SamplesRendered):
        # Pending outranks nothing: the samples join the version, its status and files stay.
        return Version(
            number=item.version_number,
            status=VersionStatus.pending,
            source="submit",
            updated_at=epoch_ms(item.at),
            samples=item.samples,
        )
    if isinstance(item, JobExpired):
        return Version(
            number=0,
            status=VersionStatus.failed,
            source="reconcile",
            error=item.reason,
            job_ids=(item.job_id,),
            updated_at=epoch_ms(item.at),
        )
    raise TypeError(f"not registry evidence: {item!r}")


def _stored_fragment(item: StoredLora) -> Version:
    at = epoch_ms(item.at)
    metadata = {k: v for k, v in item.metadata.items() if len(v) <= _METADATA_VALUE_LIMIT}
    return Version(
        number=item.version_number,
        status=VersionStatus.completed,
        source="reconcile",
        lora_url=stable_url(item.url),
        file=LoraFile(item.key, item.size, item.etag, at, metadata, item.layout, item.checksum),
        created_at=at,
        updated_at=at,
        completed_at=at,
        dataset_hash=metadata.get("lora_pipeline.dataset_hash"),
        family=Attested.of(item.metadata.get(FAMILY_KEY), "file"),
        base_model=Attested.of(item.metadata.get(BASE_MODEL_KEY), "file"),
    )


def _report_fragment(report: JobReport) -> Version:
    runpod_status = report.status.strip().upper()
    output = report.output if isinstance(report.output, Mapping) else {}
    error = report.error or (str(output["error"]) if output.get("error") else None)
    if runpod_status in ("FAILED", "CANCELLED", "TIMED_OUT"):
        status, error = VersionStatus.failed, error or f"job ended {runpod_status}"
    elif runpod_status == "COMPLETED":
        # Completion counts only with the file: until a StoredLora proves it, the job
        # is finished but the version is not completed (reconciliation checks the file).
        status = VersionStatus.failed if error else VersionStatus.training
    else:
        status, error = _RUNPOD_TO_STATUS.get(runpod_status, VersionStatus.pending), None
    training = {
        name: output[key]
        for name, key in (("steps", "steps"), ("finalLoss", "final_loss"), ("durationS", "duration_s"))
        if output.get(key) is not None
    }
    return Version(
        number=0,
        status=status,
        source=report.source,
        error=error,
        job_ids=(report.job_id,),
        updated_at=epoch_ms(report.at),
        job_status=runpod_status,
        # Only for matching: a job whose id the registry never learned (ambiguous /run)
        # finds the version its request reserved.
        request_id=output.get("request_id") if isinstance(output.get("request_id"), str) else None,
        dataset_hash=output.get("dataset_hash") if isinstance(output.get("dataset_hash"), str) else None,
        training=training,
        delay_time_ms=report.delay_time_ms,
        execution_time_ms=report.execution_time_ms,
        samples=_report_samples(output),
        family=Attested.of(_output_metadata(output, FAMILY_KEY), "worker"),
        base_model=Attested.of(_output_metadata(output, BASE_MODEL_KEY), "worker"),
    )


def _output_metadata(output: Mapping[str, Any], key: str) -> str | None:
    """A header value the job's output repeats (``metadata``: the worker's provenance keys)."""
    metadata = output.get("metadata")
    value = metadata.get(key) if isinstance(metadata, Mapping) else None
    return value if isinstance(value, str) else None


def _report_samples(output: Mapping[str, Any]) -> tuple[SampleImage, ...]:
    """The job's sample images: ``samples`` (key, prompt, seed, url), or the bare ``sample_keys``
    of a worker from before ``samples`` existed."""
    samples = output.get("samples")
    listed = samples if isinstance(samples, list) and samples else output.get("sample_keys")
    return read_samples(listed)


class _Folder:
    """Versions indexed by every number and job base they hold; adding folds matches."""

    def __init__(self) -> None:
        self.versions: dict[int, Version] = {}
        self._by_number: dict[int, int] = {}
        self._by_job: dict[str, int] = {}
        self._by_request: dict[str, int] = {}

    def add(self, fragment: Version) -> bool:
        """Fold ``fragment`` in; False when it names no number and matches no job."""
        if not fragment.folded_names and not fragment.job_ids:  # the common case, kept cheap
            if fragment.number == 0:
                return False
            target = self._by_number.get(fragment.number)
            if target is None:
                self.versions[fragment.number] = fragment
                self._by_number[fragment.number] = fragment.number
                if fragment.request_id:
                    self._by_request[fragment.request_id] = fragment.number
                return True
            targets = {target}
        else:
            numbers = fragment.numbers if fragment.folded_names else (fragment.number,)
            targets = {self._by_number[n] for n in numbers if n in self._by_number}
            targets.update(self._by_job[b] for b in fragment.job_bases if b in self._by_job)
            if fragment.number == 0 and not targets and fragment.request_id in self._by_request:
                targets.add(self._by_request[fragment.request_id])  # a job the registry had no id for
            if fragment.number == 0 and not targets:
                return False
        merged = fragment
        for target in targets:
            merged = join(self.versions.pop(target), merged)
        if merged.number == 0:  # a job-only fragment took its number from its match
            raise AssertionError("job-only fragment folded without a numbered version")
        self.versions[merged.number] = merged
        for n in merged.numbers if merged.folded_names else (merged.number,):
            self._by_number[n] = merged.number
        if merged.job_ids:
            for b in merged.job_bases:
                self._by_job[b] = merged.number
        if merged.request_id:
            self._by_request[merged.request_id] = merged.number
        return True


def join(a: Version, b: Version) -> Version:
    """The least version that says everything ``a`` and ``b`` say (commutative, associative,
    idempotent): the heart of order-independence."""
    if a == b:
        return a
    numbers = {n for n in (*a.numbers, *b.numbers) if n > 0}
    number = min(numbers)
    top = max(a, b, key=_status_order)
    return Version(
        number=number,
        status=top.status,
        source=top.source,
        error=None if top.status is VersionStatus.completed else top.error,
        job_ids=_join_job_ids(a.job_ids, b.job_ids),
        lora_url=a.lora_url if a.lora_url == b.lora_url else max(a.lora_url, b.lora_url, key=url_sort_key),
        file=_max_present(a.file, b.file, key=_file_order),
        created_at=_min_present(a.created_at, b.created_at),
        updated_at=_max_present(a.updated_at, b.updated_at),
        completed_at=_min_present(a.completed_at, b.completed_at),
        job_status=_max_present(a.job_status, b.job_status, key=_runpod_order),
        request_id=_max_present(a.request_id, b.request_id),
        dataset_hash=_max_present(a.dataset_hash, b.dataset_hash),
        params=_max_present(a.params, b.params, key=_canonical),
        training=_join_mapping(a.training, b.training),
        delay_time_ms=_max_present(a.delay_time_ms, b.delay_time_ms),
        execution_time_ms=_max_present(a.execution_time_ms, b.execution_time_ms),
        start_time=_min_present(a.start_time, b.start_time),
        estimated_duration=_max_present(a.estimated_duration, b.estimated_duration),
        folded_names=tuple(sorted(numbers - {number})),
        claim=_max_present(a.claim, b.claim, key=_claim_order),
        extra=_join_mapping(a.extra, b.extra),
        companions=_join_companions(a.companions, b.companions),
        deletion=a.deletion.join(b.deletion) if a.deletion is not None else b.deletion,
        progress=_max_present(a.progress, b.progress, key=_progress_order),
        samples=_join_samples(a.samples, b.samples),
        family=_max_present(a.family, b.family, key=_attested_order),
        base_model=_max_present(a.base_model, b.base_model, key=_attested_order),
    )


def _attested_order(value: Attested) -> tuple[int, str, str]:
    return value.order


def _claim_order(claim: SubmitClaim) -> tuple[int, int, str, str]:
    return claim.order


def _progress_order(progress: JobProgress) -> tuple[int, bool, int, str]:
    return progress.order


def _status_order(v: Version) -> tuple[int, int, str, str]:
    priority = _SOURCE_PRIORITY.get(v.status, _DEFAULT_PRIORITY).get(v.source, 0)
    return (v.status.rank, priority, v.source or "", v.error or "")


def _join_job_ids(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    """One id per base UUID, spelled as RunPod returned it (a suffixed id beats a bare one)."""
    best: dict[str, str] = {}
    for job_id in (*a, *b):
        base = base_job_id(job_id)
        current = best.get(base)
        if current is None or _id_order(job_id) > _id_order(current):
            best[base] = job_id
    return tuple(best[base] for base in sorted(best))


def _id_order(job_id: str) -> tuple[bool, str]:
    return (job_id_suffix(job_id) is not None, job_id)


def _file_order(f: LoraFile) -> tuple[int, str, str, int, str, str]:
    return (f.last_modified, f.key, f.etag, f.size, f.layout or "", f.checksum or "")


def _join_companions(a: tuple[LoraFile, ...], b: tuple[LoraFile, ...]) -> tuple[LoraFile, ...]:
    """Per key the newest record, with the best URL either side had (merge() re-derives the
    companions from its ledger; this only has to be a join)."""
    if a == b or not b:
        return a
    if not a:
        return b
    best: dict[str, LoraFile] = {}
    for f in (*a, *b):
        current = best.get(f.key)
        if current is None:
            best[f.key] = f
            continue
        url = max(current.url, f.url, key=url_sort_key)
        newest = max(current, f, key=_file_order)
        best[f.key] = newest if newest.url == url else replace(newest, url=url)
    return tuple(best[k] for k in sorted(best))


def _join_samples(a: tuple[SampleImage, ...], b: tuple[SampleImage, ...]) -> tuple[SampleImage, ...]:
    """Every key of both; per key the entry that says most (prompt, seed, URL present), then the
    canonical maximum, so the join stays commutative."""
    if a == b or not b:
        return a
    if not a:
        return b
    best: dict[str, SampleImage] = {s.key: s for s in a}
    for sample in b:
        held = best.get(sample.key)
        best[sample.key] = sample if held is None else max(held, sample, key=_sample_order)
    return tuple(best[k] for k in sorted(best))


def _sample_order(s: SampleImage) -> tuple[int, str]:
    return (sum(v is not None for v in (s.prompt, s.seed, s.url)), _canonical(s.to_dict()))


def _runpod_order(status: str) -> tuple[int, str]:
    return (RUNPOD_STATUS_RANK.get(status, 0), status)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


@overload
def _max_present(a: _C | None, b: _C | None, key: None = None) -> _C | None: ...
@overload
def _max_present(a: _T | None, b: _T | None, key: Callable[[_T], SupportsRichComparison]) -> _T | None: ...
def _max_present(a: Any, b: Any, key: Callable[[Any], SupportsRichComparison] | None = None) -> Any:
    """The larger of two values (by ``key``), a present one beating None."""
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b, key=key) if key else max(a, b)


def _min_present(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _join_mapping(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Key-wise: a present value beats None; between two, the canonical-JSON maximum."""
    if a == b or not b:
        return dict(a)
    if not a:
        return dict(b)
    out = dict(a)
    for key, value in b.items():
        out[key] = _max_present(out.get(key), value, key=_canonical)
    return out
