"""Evidence: every fact that can change a registry document, as plain values.

Each path into the registry (a submission, a status poll, a webhook body, a file
found in the store, a legacy record, the verdict on a job RunPod forgot) produces
one of these and hands it to the one merge function. Times are timezone-aware
datetimes; they are only used for createdAt/updatedAt/completedAt, never to
decide which value wins (that is decided by content, so order does not matter).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from lora_pipeline.registry.aliases import AliasAction
from lora_pipeline.registry.models import SampleImage
from lora_pipeline.registry.names import parse_version_name

ClaimPhase = Literal["claimed", "posting", "released", "unknown"]  # models.CLAIM_PHASES


@dataclass(frozen=True)
class Submission:
    """A version was reserved (``job_id`` None) or submitted to RunPod (``job_id`` as returned).

    ``base_model`` is what the request named; ``family`` the family the request expects (named, or
    known at launch from the base model), None when only the worker can tell (a hub id)."""

    style: str
    version: str | int
    request_id: str
    job_id: str | None
    dataset_hash: str
    params: dict[str, Any]
    at: datetime
    family: str | None = None
    base_model: str | None = None

    @property
    def version_number(self) -> int:
        return _number(self.version)


@dataclass(frozen=True)
class JobReport:
    """What RunPod said about a job: a status body from a poll or a webhook.

    It names no style or version: the merge finds the version by the job's base
    UUID, and ignores a report for a job the document does not hold (the caller
    keeps a webhook file in the inbox until it matches).
    """

    job_id: str
    status: str  # RunPod's: IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED, CANCELLED, TIMED_OUT
    output: dict[str, Any] | None
    error: str | None
    delay_time_ms: int | None
    execution_time_ms: int | None
    at: datetime
    source: Literal["poll", "webhook"] = "poll"


@dataclass(frozen=True)
class JobProgressReport:
    """A running job's heartbeat (its worker's last progress update), or the verdict that it
    stalled (``stalled``: why). ``at`` is the heartbeat's time, not when it was polled, so
    the same update seen on every poll is the same evidence and changes nothing."""

    job_id: str
    at: datetime
    step: int | None = None
    total: int | None = None
    loss: float | None = None
    phase: str | None = None
    stalled: str | None = None


@dataclass(frozen=True)
class StoredLora:
    """A LoRA file in the store whose safetensors header parsed: proof of completion.

    ``at`` should be the object's last-modified time, so the same file seen twice
    is the same evidence. ``url`` is the store's stable URL (never a presigned one).
    """

    style: str
    key: str
    version_number: int
    url: str | None
    size: int
    etag: str
    metadata: dict[str, str]
    at: datetime
    layout: str | None = None  # kohya | diffusers | unknown, from the header's tensor names
    checksum: str | None = None  # SHA-256 of the tensor data, as the header declares it


@dataclass(frozen=True)
class StoredCompanion:
    """A version's file in its other layout (``…_v4_kohya.safetensors``) whose header parsed.

    Never proof of completion: the worker publishes it before the main file, so a job
    that died in between leaves one behind. The merge attaches it to its version once
    that version is completed (by its main file); until then it is kept among the
    superseded files, so every object in the store stays accounted for.
    """

    style: str
    key: str
    version_number: int
    url: str | None
    size: int
    etag: str
    layout: str
    checksum: str | None
    at: datetime


@dataclass(frozen=True)
class RejectedLora:
    """A ``.safetensors`` object for a version whose header did not parse (never proof)."""

    style: str
    key: str
    etag: str
    reason: str
    at: datetime


@dataclass(frozen=True)
class LegacyRecord:
    """One version record of the legacy dashboard's ``training_versions.json``, as it was."""

    style: str
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobExpired:
    """The pipeline's verdict that a job ended without a LoRA: RunPod forgot it (404) and
    no file appeared within the maximum job age, or it reported COMPLETED and no
    readable file is in the store. Makes the version failed with ``reason``,
    unless a valid file proves it completed."""

    job_id: str
    at: datetime
    reason: str


@dataclass(frozen=True)
class Claim:
    """A submitter's claim on a version, or its next phase (see models.SubmitClaim)."""

    style: str
    version: str | int
    owner: str
    phase: ClaimPhase
    at: datetime  # when the claim was taken: the same for every phase of one claim
    lease_until: datetime
    note: str | None = None

    @property
    def version_number(self) -> int:
        return _number(self.version)


@dataclass(frozen=True)
class SubmissionLost:
    """The verdict on a version whose POST /run had an unknown outcome: no job, webhook or
    file appeared within the maximum job age, so it is failed (a late file still wins)."""

    style: str
    version: str | int
    at: datetime
    reason: str

    @property
    def version_number(self) -> int:
        return _number(self.version)


@dataclass(frozen=True)
class AliasMove:
    """An operator moved ``alias`` to ``version`` (promote, or rollback to the version before).

    ``seq`` is one past the document's last alias move and ``previous`` where the alias
    pointed, both read under the conditional write that records this (so racing moves
    get consecutive numbers, and none is lost). Only ``RegistryStore.move_alias`` builds one:
    it checks first that the version is completed and its files parse."""

    style: str
    alias: str
    version: str | int
    action: AliasAction
    by: str
    at: datetime
    seq: int
    previous: str | None = None
    reason: str | None = None

    @property
    def version_number(self) -> int:
        return _number(self.version)


@dataclass(frozen=True)
class VersionDeleted:
    """An operator (or the retention policy) deleted a version's files: its tombstone.

    ``files``: (key, ETag, last-modified ms) of every object removed. Outranks every other
    evidence about the version, so nothing brings it back and its number is never reused."""

    style: str
    version: str | int
    by: str
    at: datetime
    reason: str | None = None
    files: tuple[tuple[str, str, int], ...] = ()

    @property
    def version_number(self) -> int:
        return _number(self.version)


@dataclass(frozen=True)
class SamplesRendered:
    """Sample images rendered for an existing version after its training (its sample settings
    changed; they are not part of its identity). Adds the samples; changes nothing else."""

    style: str
    version: str | int
    samples: tuple[SampleImage, ...]
    at: datetime

    @property
    def version_number(self) -> int:
        return _number(self.version)


Evidence = (
    Submission
    | JobReport
    | StoredLora
    | StoredCompanion
    | RejectedLora
    | LegacyRecord
    | JobExpired
    | Claim
    | SubmissionLost
    | JobProgressReport
    | AliasMove
    | VersionDeleted
    | SamplesRendered
)


def _number(version: str | int) -> int:
    number = version if isinstance(version, int) else parse_version_name(version)
    if number is None or number < 1:
        raise ValueError(f"invalid version {version!r}: expected V1, V2, … or a positive number")
    return number
