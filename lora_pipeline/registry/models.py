"""The registry document: one ``training_versions.json`` per style.

A superset of the legacy dashboard's file, so that dashboard can still read it:
``versions[].id``, ``name``, ``status``, ``loraUrl`` and ``currentTraining`` keep
their names and meaning (camelCase, times in epoch milliseconds), and keys we do
not know are carried through untouched. Everything here is data and its JSON
form; how documents combine is merge.py's job.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from lora_pipeline.registry.aliases import AliasEntry, current_aliases
from lora_pipeline.registry.jobids import base_job_id
from lora_pipeline.registry.layouts import DEFAULT_PRIMARY
from lora_pipeline.registry.names import companion_suffix, parse_version_name, validate_style, version_name
from lora_pipeline.registry.tombstones import Deletion
from lora_pipeline.registry.urls import stable_url

SCHEMA_VERSION = 1


class VersionStatus(str, Enum):
    """pending → starting → training → completed | failed; completed is sticky."""

    pending = "pending"  # reserved, not yet submitted
    starting = "starting"  # submitted, queued at RunPod
    training = "training"  # running (or finished, its file not yet verified)
    failed = "failed"
    completed = "completed"  # its LoRA file is in the store (or the legacy record said so)
    deleted = "deleted"  # an operator deleted its files: a tombstone, above everything (registry/tombstones.py)

    @property
    def rank(self) -> int:
        """Position in the lifecycle; the merge keeps the highest. Completed outranks failed
        because a valid file is proof, whatever a late failure report says."""
        return _STATUS_RANK[self]

    @property
    def finished(self) -> bool:
        return self in (VersionStatus.completed, VersionStatus.failed, VersionStatus.deleted)


_STATUS_RANK = {s: i for i, s in enumerate(VersionStatus)}
UNFINISHED_STATUSES = frozenset({VersionStatus.pending, VersionStatus.starting, VersionStatus.training})

SOURCES = ("submit", "webhook", "poll", "reconcile", "legacy", "operator")  # operator: a deletion


class InvalidRecord(ValueError):
    """A version record that cannot be read (no usable name, bad status…); names the problem."""


def epoch_ms(at: datetime) -> int:
    """``at`` as epoch milliseconds: the registry document's one time unit (RunPod's too)."""
    return int(at.timestamp() * 1000)


def from_epoch_ms(ms: float) -> datetime:
    """Epoch milliseconds as an aware UTC datetime."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def to_millis(value: Any) -> int | None:
    """Epoch milliseconds from an int/float (ms), an ISO-8601 string, or a datetime."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, datetime):
        return epoch_ms(value)
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, str) and value.strip():
        text = value.strip()
        if text.isdigit():
            return int(text)
        try:
            return epoch_ms(datetime.fromisoformat(text.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 3x, and the merge builds one per file
class LoraFile:
    """A verified LoRA file: key, size, ETag, last-modified time (ms), the short ``__metadata__``
    entries of its header (training facts, provenance), its key layout (``kohya``,
    ``diffusers`` or ``unknown``, read from its tensor names; None: not classified yet), the
    SHA-256 of its tensor data its header declares, and, for a version's second file, its URL
    (the main file's URL is the version's ``lora_url``)."""

    key: str
    size: int
    etag: str
    last_modified: int
    metadata: dict[str, str] = field(default_factory=dict)
    layout: str | None = None
    checksum: str | None = None
    url: str | None = None

    @property
    def last_seen(self) -> tuple[int, str, int, str, str]:
        """Order among entries for one key (see RejectedFile.last_seen); of two records of one
        upload, the classified one."""
        return (self.last_modified, self.etag, 1, self.layout or "", self.checksum or "")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "key": self.key,
            "size": self.size,
            "etag": self.etag,
            "lastModified": self.last_modified,
        }
        if self.layout:
            out["layout"] = self.layout
        if self.checksum:
            out["tensorsSha256"] = self.checksum
        if self.url:
            out["url"] = self.url
        if self.metadata:
            out["metadata"] = self.metadata
        return out

    @classmethod
    def from_dict(cls, raw: Any) -> LoraFile | None:
        if not isinstance(raw, Mapping) or not isinstance(raw.get("key"), str):
            return None
        metadata = raw.get("metadata")
        if not isinstance(metadata, Mapping):
            metadata = {}
        return cls(
            key=raw["key"],
            size=int(raw.get("size") or 0),
            etag=str(raw.get("etag") or ""),
            last_modified=to_millis(raw.get("lastModified")) or 0,
            metadata={str(k): str(v) for k, v in metadata.items()},
            layout=str(raw["layout"]) if raw.get("layout") else None,
            checksum=str(raw["tensorsSha256"]) if raw.get("tensorsSha256") else None,
            url=stable_url(raw.get("url")),
        )


@dataclass(frozen=True, slots=True)
class RejectedFile:
    """A ``.safetensors`` object whose header does not parse: recorded so it is not re-read
    on every reconciliation, and so an operator sees it."""

    @property
    def last_seen(self) -> tuple[int, str, int, str]:
        """Order among entries for one key: newer upload first, a valid file over a broken one."""
        return (self.last_modified, self.etag, 0, self.reason)

    key: str
    etag: str
    reason: str
    last_modified: int

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "etag": self.etag, "reason": self.reason, "lastModified": self.last_modified}

    @classmethod
    def from_dict(cls, raw: Any) -> RejectedFile | None:
        if not isinstance(raw, Mapping) or not isinstance(raw.get("key"), str):
            return None
        return cls(
            raw["key"],
            str(raw.get("etag") or ""),
            str(raw.get("reason") or ""),
            to_millis(raw.get("lastModified")) or 0,
        )


@dataclass(frozen=True, slots=True)
class CurrentTraining:
    """The legacy dashboard's ``currentTraining`` block, derived from the versions."""

    job_id: str
    start_time: int | None
    estimated_duration: int | None
    status: VersionStatus

    def to_dict(self) -> dict[str, Any]:
        return {
            "jobId": self.job_id,
            "startTime": self.start_time,
            "estimatedDuration": self.estimated_duration,
            "status": self.status.value,
        }


CLAIM_PHASES = ("claimed", "posting", "released", "unknown")
_PHASE_RANK = {phase: i for i, phase in enumerate(CLAIM_PHASES)}


@dataclass(frozen=True, slots=True)
class SubmitClaim:
    """Who may send a version to the GPU, and how far they got: the guard of "one job per version".

    RunPod's ``/run`` has no idempotency key, so the registry makes submitting a
    claimed step. A submitter first records a claim (``claimed``, with a lease) under
    the document's conditional write; only the holder may go on. Immediately before
    it POSTs it moves the claim to ``posting`` (again conditionally, while the lease
    holds). Then the job id is recorded; or the claim is ``released`` when RunPod
    certainly did not take the job (refused, rate limited, unreachable), so another
    submitter may claim it at once; or it becomes ``unknown`` when RunPod may have
    taken it (the answer was lost). A ``claimed`` claim whose lease ran out belonged to
    a submitter that died before POSTing: a successor takes it over. A ``posting`` or
    ``unknown`` claim is never taken over, since a job may exist: the webhook, the
    job's output (it names its request id) and reconciliation settle it.
    """

    owner: str
    phase: str
    at: int  # when this claim was taken (ms); a successor's claim is later
    lease_until: int  # ms; what "live" means for claimed and posting
    note: str | None = None

    @property
    def order(self) -> tuple[int, int, str, str]:
        """Join order: the latest claim wins; within one claim, the furthest phase."""
        return (self.at, _PHASE_RANK.get(self.phase, -1), self.owner, self.note or "")

    def live(self, now_ms: int) -> bool:
        return self.phase in ("claimed", "posting") and now_ms < self.lease_until

    @property
    def maybe_submitted(self) -> bool:
        """Whether a job may exist that the registry has no id for (a POST was under way)."""
        return self.phase in ("posting", "unknown")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"owner": self.owner, "phase": self.phase, "at": self.at, "leaseUntil": self.lease_until}
        if self.note:
            out["note"] = self.note
        return out

    @classmethod
    def from_dict(cls, raw: Any) -> SubmitClaim | None:
        if (
            not isinstance(raw, Mapping)
            or raw.get("phase") not in CLAIM_PHASES
            or not isinstance(raw.get("owner"), str)
        ):
            return None
        return cls(
            raw["owner"],
            raw["phase"],
            to_millis(raw.get("at")) or 0,
            to_millis(raw.get("leaseUntil")) or 0,
            str(raw["note"]) if raw.get("note") else None,
        )


@dataclass(frozen=True, slots=True)
class JobProgress:
    """A running job's last heartbeat: what its worker last reported (RunPod progress update).

    ``heartbeat_at`` (ms) is when the worker sent it (or, for an update without a time, when
    it was first seen). ``stalled`` is the pipeline's verdict, with its reason, that no
    heartbeat came for longer than ``LORA_STALL_AFTER_S``; a newer heartbeat clears it.
    """

    heartbeat_at: int
    step: int | None = None
    total: int | None = None
    loss: float | None = None
    phase: str | None = None
    stalled: str | None = None

    @property
    def order(self) -> tuple[int, bool, int, str]:
        """Join order: the latest heartbeat wins; for one heartbeat, the stalled verdict."""
        return (
            self.heartbeat_at,
            self.stalled is not None,
            -1 if self.step is None else self.step,
            json.dumps(self.to_dict(), sort_keys=True),
        )

    def same_report(self, other: JobProgress | None) -> bool:
        """Whether ``other`` carries the same worker report (the verdict aside)."""
        return other is not None and replace(other, stalled=None) == replace(self, stalled=None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"heartbeatAt": self.heartbeat_at, "stalled": self.stalled is not None}
        optional = {
            "step": self.step,
            "total": self.total,
            "loss": self.loss,
            "phase": self.phase,
            "stalledReason": self.stalled,
        }
        out.update((k, v) for k, v in optional.items() if v is not None)
        return out

    @classmethod
    def from_dict(cls, raw: Any) -> JobProgress | None:
        if not isinstance(raw, Mapping):
            return None
        heartbeat = to_millis(raw.get("heartbeatAt"))
        if heartbeat is None:
            return None
        step, total, loss = raw.get("step"), raw.get("total"), raw.get("loss")
        return cls(
            heartbeat_at=heartbeat,
            step=step if isinstance(step, int) and not isinstance(step, bool) else None,
            total=total if isinstance(total, int) and not isinstance(total, bool) else None,
            loss=float(loss) if isinstance(loss, (int, float)) and not isinstance(loss, bool) else None,
            phase=str(raw["phase"]) if raw.get("phase") else None,
            stalled=str(raw.get("stalledReason") or "stalled") if raw.get("stalled") else None,
        )


# Who said which family or base model a version was trained on, weakest first: a value of unknown
# origin (a document written by hand), the training request, the worker's result, the LoRA file's
# own header. The merge keeps the best attested value, so the file corrects what a request guessed.
ATTESTATIONS = ("recorded", "request", "worker", "file")
_ATTESTATION_RANK = {by: i for i, by in enumerate(ATTESTATIONS)}


@dataclass(frozen=True, slots=True)
class Attested:
    """A value with who said it (one of ``ATTESTATIONS``): a version's family or base model.

    In the JSON the value is the plain camelCase key (``family``, ``baseModel``) and who said it
    is ``<key>From``, so the merge of a re-read document ranks the value as before."""

    value: str
    by: str = "recorded"

    @property
    def order(self) -> tuple[int, str, str]:
        """Join order: the better witness, then the value (so the join stays commutative)."""
        return (_ATTESTATION_RANK.get(self.by, -1), self.value, self.by)

    @classmethod
    def read(cls, value: Any, by: Any) -> Attested | None:
        """The attested value of a record's ``<key>``/``<key>From`` pair; None when the record has no
        usable value (an older document: the fields are optional)."""
        if not isinstance(value, str) or not value.strip():
            return None
        return cls(value.strip(), by if by in ATTESTATIONS else "recorded")

    @classmethod
    def of(cls, value: str | None, by: str) -> Attested | None:
        """``value`` attested by ``by``; None for a missing or empty value."""
        return cls(value, by) if value else None


class UnknownVersion(ValueError):
    """A version reference (``V3``, ``@production``) that names no version of the style."""


@dataclass(frozen=True, slots=True)
class SampleImage:
    """A sample image rendered with the version's LoRA (``samples`` in the JSON): its key, the
    prompt and seed it was rendered from (None when the worker did not say), its stable URL."""

    key: str
    prompt: str | None = None
    seed: int | None = None
    url: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "prompt": self.prompt, "seed": self.seed, "url": self.url}

    @classmethod
    def from_dict(cls, raw: Any) -> SampleImage | None:
        """A ``samples`` entry (or a bare key, as ``sample_keys`` lists them); None if unusable."""
        if isinstance(raw, str):
            raw = {"key": raw}
        if not isinstance(raw, Mapping) or not isinstance(raw.get("key"), str) or not raw["key"]:
            return None
        seed = raw.get("seed")
        return cls(
            key=raw["key"],
            prompt=str(raw["prompt"]) if raw.get("prompt") is not None else None,
            seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
            url=stable_url(raw["url"]) if isinstance(raw.get("url"), str) else None,
        )


def read_samples(raw: Any) -> tuple[SampleImage, ...]:
    """The usable entries of a ``samples`` list, sorted by key."""
    if not isinstance(raw, list):
        return ()
    found = {s.key: s for s in map(SampleImage.from_dict, raw) if s is not None}
    return tuple(found[k] for k in sorted(found))


# JSON keys the Version knows; anything else in a record is kept in ``extra``.
_KNOWN_KEYS = frozenset(
    {
        "id",
        "name",
        "status",
        "loraUrl",
        "s3Key",
        "createdAt",
        "updatedAt",
        "completedAt",
        "error",
        "source",
        "jobIds",
        "jobStatus",
        "requestId",
        "datasetHash",
        "params",
        "training",
        "file",
        "delayTimeMs",
        "executionTimeMs",
        "startTime",
        "estimatedDuration",
        "foldedNames",
        "claim",
        "files",
        "deleted",
        "progress",
        "samples",
        "family",
        "familyFrom",
        "baseModel",
        "baseModelFrom",
    }
)
# A legacy ``loraUrl`` that names a version's second file (``…_v4_kohya.safetensors``) is not
# the main file's URL; it is kept under this key instead.
LEGACY_COMPANION_URL = "legacyLoraUrl"

_LEGACY_STATUS = {
    "pending": VersionStatus.pending,
    "queued": VersionStatus.starting,
    "starting": VersionStatus.starting,
    "in_queue": VersionStatus.starting,
    "training": VersionStatus.training,
    "running": VersionStatus.training,
    "in_progress": VersionStatus.training,
    "completed": VersionStatus.completed,
    "failed": VersionStatus.failed,
    "cancelled": VersionStatus.failed,
    "timed_out": VersionStatus.failed,
    "deleted": VersionStatus.deleted,
}


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 3x, and the merge builds one per file
class Version:
    """One LoRA version of a style, with everything the evidence said about it.

    ``job_ids`` holds every RunPod id seen for the version (one per base UUID, in
    the most informative spelling: the suffixed one RunPod returned); ``id`` is
    the first. ``folded_names`` are other version numbers that turned out to be
    the same version (same job) and were folded into this one.

    Treat it as immutable (``dataclasses.replace`` makes a changed copy); it is
    not frozen only because a frozen ``__init__`` is three times slower and a
    reconciliation builds one per file.
    """

    number: int
    status: VersionStatus = VersionStatus.pending
    source: str | None = None
    error: str | None = None
    job_ids: tuple[str, ...] = ()
    lora_url: str | None = None
    file: LoraFile | None = None
    created_at: int | None = None
    updated_at: int | None = None
    completed_at: int | None = None
    job_status: str | None = None
    request_id: str | None = None
    dataset_hash: str | None = None
    params: dict[str, Any] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    delay_time_ms: int | None = None
    execution_time_ms: int | None = None
    start_time: int | None = None
    estimated_duration: int | None = None
    folded_names: tuple[int, ...] = ()
    claim: SubmitClaim | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # The version's files in its other layouts (``…_v4_kohya.safetensors``), each with its URL:
    # attached by the merge to completed versions only, at most one per layout.
    companions: tuple[LoraFile, ...] = ()
    # Set on a deleted version (status ``deleted``): who, when, why, which objects went.
    deletion: Deletion | None = None
    # A running job's last heartbeat (step, total, loss, phase) and the stalled verdict.
    progress: JobProgress | None = None
    # The sample images the worker rendered with the LoRA, sorted by key.
    samples: tuple[SampleImage, ...] = ()
    # The model family (``sdxl``, ``flux1`` …) and base model (``tiny-sdxl``, a folder, a hub id) it
    # was trained on, each with who said so (the request, the worker, the file's header).
    family: Attested | None = None
    base_model: Attested | None = None

    @property
    def name(self) -> str:
        return version_name(self.number)

    @property
    def id(self) -> str | None:
        """The job id as RunPod returned it (legacy key ``id``)."""
        return self.job_ids[0] if self.job_ids else None

    @property
    def s3_key(self) -> str | None:
        return self.file.key if self.file else None

    @property
    def job_bases(self) -> frozenset[str]:
        return frozenset(base_job_id(j) for j in self.job_ids)

    @property
    def numbers(self) -> tuple[int, ...]:
        return (self.number, *self.folded_names)

    def files(self) -> dict[str, LoraFile]:
        """layout → file, each with its URL: the main file (once its layout is known) and the
        other layouts' files. What a user picks a download from."""
        out: dict[str, LoraFile] = {}
        if self.file is not None and self.file.layout:
            out[self.file.layout] = replace(self.file, url=self.lora_url)
        for companion in self.companions:
            out.setdefault(companion.layout or "unknown", companion)
        return out

    def download(self, layout: str) -> LoraFile | None:
        """The file in ``layout``, with a URL, if the version has one."""
        found = self.files().get(layout)
        return found if found is not None and found.url else None

    def to_dict(self, primary: str | None = None) -> dict[str, Any]:
        """The JSON record. ``loraUrl``/``s3Key`` name the ``primary`` layout's file
        (default kohya; callers pass the setting ``LORA_PRIMARY_FORMAT``) when the version has it,
        else its main file."""
        files = self.files() if self.file is not None or self.companions else {}
        chosen = files.get(primary or DEFAULT_PRIMARY)
        if chosen is None or not chosen.url:
            chosen = None
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "status": self.status.value,
            "loraUrl": chosen.url if chosen else (self.lora_url or self.extra.get(LEGACY_COMPANION_URL)),
            "s3Key": chosen.key if chosen else self.s3_key,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "completedAt": self.completed_at,
            "error": self.error,
            "source": self.source,
            "jobIds": list(self.job_ids),
        }
        optional = {
            "jobStatus": self.job_status,
            "requestId": self.request_id,
            "datasetHash": self.dataset_hash,
            "params": self.params,
            "training": self.training or None,
            # The main file's URL rides along with it, so loraUrl can name another file.
            "file": {**self.file.to_dict(), "url": self.lora_url} if self.file else None,
            "files": {layout: _file_entry(f) for layout, f in sorted(files.items())} or None,
            "delayTimeMs": self.delay_time_ms,
            "executionTimeMs": self.execution_time_ms,
            "startTime": self.start_time,
            "estimatedDuration": self.estimated_duration,
            "foldedNames": [version_name(n) for n in self.folded_names] or None,
            "claim": self.claim.to_dict() if self.claim else None,
            "deleted": self.deletion.to_dict() if self.deletion else None,
            "progress": self.progress.to_dict() if self.progress else None,
            "samples": [s.to_dict() for s in self.samples] or None,
        }
        for key, attested in (("family", self.family), ("baseModel", self.base_model)):
            if attested is not None:
                optional[key], optional[f"{key}From"] = attested.value, attested.by
        out.update((k, v) for k, v in optional.items() if v is not None)
        out.update((k, v) for k, v in self.extra.items() if k not in out)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, default_source: str | None = None) -> Version:
        """Read a record in our schema or the legacy one. Raises InvalidRecord.

        Presigned URLs are reduced to their stable form; unknown keys go to ``extra``.
        """
        if not isinstance(raw, Mapping):
            raise InvalidRecord(f"a version record must be an object, got {type(raw).__name__}")
        name = raw.get("name")
        number = parse_version_name(name) if isinstance(name, str) else None
        if number is None or number < 1:
            raise InvalidRecord(f"version record has no usable name (got {raw.get('name')!r}; expected V1, V2, …)")
        status_text = raw.get("status")
        status = _LEGACY_STATUS.get(str(status_text).strip().lower()) if status_text is not None else None
        if status is None:
            raise InvalidRecord(f"version {raw.get('name')}: unknown status {status_text!r}")
        job_ids = [j for j in raw.get("jobIds") or [] if isinstance(j, str) and j.strip()]
        if isinstance(raw.get("id"), str) and raw["id"].strip():
            job_ids.insert(0, raw["id"].strip())
        folded = tuple(
            n
            for n in (parse_version_name(x) for x in raw.get("foldedNames") or [] if isinstance(x, str))
            if n and n != number
        )
        source = raw.get("source") if raw.get("source") in SOURCES else default_source
        extra = {k: v for k, v in raw.items() if k not in _KNOWN_KEYS}
        main, lora_url, companions = _read_files(raw, extra)
        training = raw.get("training")
        if not isinstance(training, Mapping):
            training = {}
        params = raw.get("params")
        if not isinstance(params, Mapping):
            params = None
        return cls(
            number=number,
            status=status,
            source=source,
            error=str(raw["error"]) if raw.get("error") not in (None, "") else None,
            job_ids=tuple(dict.fromkeys(job_ids)),
            lora_url=lora_url,
            file=main,
            created_at=to_millis(raw.get("createdAt")),
            updated_at=to_millis(raw.get("updatedAt")),
            completed_at=to_millis(raw.get("completedAt")),
            job_status=str(raw["jobStatus"]).upper() if raw.get("jobStatus") else None,
            request_id=str(raw["requestId"]) if raw.get("requestId") else None,
            dataset_hash=str(raw["datasetHash"]) if raw.get("datasetHash") else None,
            params=dict(params) if params is not None else None,
            training=dict(training),
            delay_time_ms=to_millis(raw.get("delayTimeMs")),
            execution_time_ms=to_millis(raw.get("executionTimeMs")),
            start_time=to_millis(raw.get("startTime")),
            estimated_duration=to_millis(raw.get("estimatedDuration")),
            folded_names=tuple(sorted(set(folded))),
            claim=SubmitClaim.from_dict(raw.get("claim")),
            progress=JobProgress.from_dict(raw.get("progress")),
            extra=extra,
            companions=companions,
            deletion=Deletion.from_dict(raw.get("deleted")),
            samples=read_samples(raw.get("samples")),
            family=Attested.read(raw.get("family"), raw.get("familyFrom")),
            base_model=Attested.read(raw.get("baseModel"), raw.get("baseModelFrom")),
        )


def _read_files(
    raw: Mapping[str, Any], extra: dict[str, Any]
) -> tuple[LoraFile | None, str | None, tuple[LoraFile, ...]]:
    """(main file, loraUrl, companion files) of a version record in our schema or the legacy one.

    In our schema the main file carries its URL, and loraUrl may name another file.
    A legacy loraUrl that names a companion (kohya) file is not the LoRA's URL: it is
    kept in ``extra`` under LEGACY_COMPANION_URL, so nothing is lost.
    """
    file_raw = raw.get("file")
    main = LoraFile.from_dict(file_raw)
    if main is not None and isinstance(file_raw, Mapping) and "url" in file_raw:  # main: file_raw is a Mapping
        lora_url, main = main.url, replace(main, url=None)
    else:
        lora_url = stable_url(raw.get("loraUrl"))
        if lora_url and companion_suffix(lora_url.partition("?")[0]):
            extra.setdefault(LEGACY_COMPANION_URL, lora_url)
            lora_url = None
    listed = raw.get("files")
    if not isinstance(listed, Mapping):
        listed = {}
    companions = tuple(
        sorted(
            (f for f in map(LoraFile.from_dict, listed.values()) if f and (main is None or f.key != main.key)),
            key=lambda f: f.key,
        )
    )
    return main, lora_url, companions


def _file_entry(f: LoraFile) -> dict[str, Any]:
    """A ``files`` entry: the file without its header metadata (that is under ``file``)."""
    return {k: v for k, v in f.to_dict().items() if k != "metadata"}


_DOC_KNOWN_KEYS = frozenset(
    {
        "schemaVersion",
        "style",
        "revision",
        "versions",
        "currentTraining",
        "rejectedFiles",
        "supersededFiles",
        "aliases",
        "aliasHistory",
    }
)


@dataclass(frozen=True)
class RegistryDocument:
    """A style's versions as stored. ``revision`` counts writes (set by RegistryStore,
    never by the merge) so the derived index can tell a newer summary from an older one.

    A document read from storage may hold duplicates (a legacy file did);
    ``merge(doc, [])`` folds them.
    """

    style: str
    versions: tuple[Version, ...] = ()
    rejected_files: tuple[RejectedFile, ...] = ()
    superseded_files: tuple[LoraFile, ...] = ()  # valid files that are no version's file
    extra: dict[str, Any] = field(default_factory=dict)
    revision: int = 0
    legacy: bool = field(default=False, compare=False)  # read from a file without schemaVersion
    # Every move of an alias (production, staging…), in order; only ever added to (registry/aliases.py).
    alias_history: tuple[AliasEntry, ...] = ()

    def __post_init__(self) -> None:
        validate_style(self.style)

    @property
    def current_training(self) -> CurrentTraining | None:
        """The newest unfinished version with a job, else the newest version with a job."""
        with_job = [v for v in self.versions if v.id]
        if not with_job:
            return None
        unfinished = [v for v in with_job if v.status in UNFINISHED_STATUSES]
        latest = max(unfinished or with_job, key=lambda v: v.number)
        return CurrentTraining(
            job_id=latest.id or "",
            start_time=latest.start_time if latest.start_time is not None else latest.created_at,
            estimated_duration=latest.estimated_duration,
            status=latest.status,
        )

    @property
    def aliases(self) -> dict[str, str]:
        """alias → the version name it points at now (replayed from ``alias_history``)."""
        return current_aliases(self.alias_history)

    def aliases_of(self, version: Version) -> list[str]:
        """The aliases that point at ``version`` now."""
        return [a for a, name in self.aliases.items() if self.version(name) is version]

    @property
    def latest_completed(self) -> Version | None:
        """The completed version with the highest number: what "the style's LoRA" means when no
        version is named (a download, the registry asset's latest, the file check)."""
        completed = [v for v in self.versions if v.status is VersionStatus.completed]
        return max(completed, key=lambda v: v.number, default=None)

    def resolve(self, ref: str) -> Version:
        """The version ``ref`` names: ``V3`` (any case, folded names included), or an alias, as
        ``@production`` (MLflow's ``models:/name@alias``) or ``production`` where that is no
        version name. Raises UnknownVersion saying what the style has."""
        ref = ref.strip()
        alias = ref[1:] if ref.startswith("@") else (ref if parse_version_name(ref) is None else None)
        if alias is not None:
            target = self.aliases.get(alias)
            known = ", ".join(f"@{a}" for a in sorted(self.aliases)) or "none"
            if target is None and ref.startswith("@"):
                raise UnknownVersion(f"{self.style} has no alias {alias!r} (its aliases: {known})")
            if target is None:
                raise UnknownVersion(
                    f"{ref!r} is not a version name like V3, nor an alias of {self.style} (its aliases: {known})"
                )
            ref = target
        number = parse_version_name(ref)
        found = self.version(number) if number is not None else None
        if found is None:
            names = ", ".join(v.name for v in self.versions) or "none"
            raise UnknownVersion(
                f"{self.style} has no version {version_name(number) if number else ref} (it has: {names})"
            )
        return found

    def version(self, name: str | int) -> Version | None:
        """The version named ``V4``/``v4``/``vV4`` (or numbered 4), folded names included."""
        number = name if isinstance(name, int) else parse_version_name(name)
        return next((v for v in self.versions if number in v.numbers), None)

    def to_dict(self, primary: str | None = None) -> dict[str, Any]:
        """The stored JSON; ``primary``: the layout ``loraUrl`` names (default kohya; callers pass the
        setting ``LORA_PRIMARY_FORMAT``)."""
        current = self.current_training
        primary = primary or DEFAULT_PRIMARY
        out: dict[str, Any] = {
            "schemaVersion": SCHEMA_VERSION,
            "style": self.style,
            "revision": self.revision,
            "versions": [v.to_dict(primary) for v in self.versions],
            "currentTraining": current.to_dict() if current else None,
        }
        if self.rejected_files:
            out["rejectedFiles"] = [r.to_dict() for r in self.rejected_files]
        if self.alias_history:
            out["aliases"] = self.aliases
            out["aliasHistory"] = [e.to_dict() for e in self.alias_history]
        if self.superseded_files:
            out["supersededFiles"] = [f.to_dict() for f in self.superseded_files]
        out.update((k, v) for k, v in self.extra.items() if k not in out)
        return out

    def to_json(self, primary: str | None = None) -> bytes:
        return (json.dumps(self.to_dict(primary), indent=2, ensure_ascii=False) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes, style: str) -> RegistryDocument:
        """Parse our schema or the legacy one, keeping records as stored (duplicates included).

        Raises InvalidRecord when the file is not JSON, not an object, or a record is unreadable.
        """
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidRecord(f"registry document of {style!r} is not JSON: {exc}") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("versions", []), list):
            raise InvalidRecord(f"registry document of {style!r} must be an object with a 'versions' list")
        legacy = "schemaVersion" not in raw
        source = "legacy" if legacy else None
        records = legacy_version_records(raw) if legacy else raw.get("versions", [])
        versions = tuple(Version.from_dict(v, default_source=source) for v in records)
        rejected = tuple(r for r in map(RejectedFile.from_dict, raw.get("rejectedFiles") or []) if r)
        superseded = tuple(f for f in map(LoraFile.from_dict, raw.get("supersededFiles") or []) if f)
        history = raw.get("aliasHistory")
        entries = tuple(e for e in map(AliasEntry.from_dict, history if isinstance(history, list) else []) if e)
        return cls(
            style=style,
            versions=versions,
            rejected_files=rejected,
            superseded_files=superseded,
            alias_history=entries,
            extra={k: v for k, v in raw.items() if k not in _DOC_KNOWN_KEYS},
            revision=int(raw.get("revision") or 0),
            legacy=legacy,
        )


def legacy_version_records(raw: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A legacy document's version records, each a copy, with the document-level
    ``currentTraining`` timing attached to the record of the same job.

    The legacy file kept start time and estimated duration only in
    ``currentTraining``; attaching them to the version keeps them once a newer
    version becomes the current one. The input is never modified.
    """
    current = raw.get("currentTraining")
    if not isinstance(current, Mapping):
        current = {}
    job = current.get("jobId")
    records: list[dict[str, Any]] = []
    for record in raw.get("versions") or []:
        if not isinstance(record, Mapping):
            records.append(record)
            continue
        record = dict(record)
        if (
            isinstance(job, str)
            and isinstance(record.get("id"), str)
            and (base_job_id(record["id"]) == base_job_id(job))
        ):
            for key in ("startTime", "estimatedDuration"):
                if record.get(key) is None and current.get(key) is not None:
                    record[key] = current[key]
        records.append(record)
    return records
