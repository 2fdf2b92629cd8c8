"""Uploads through the app's API: declared files, PUT one by one, ingested on ``complete``.

An upload is a record (``api/uploads/<id>.json``: the style, every file's name, size and
type, when it expires, its state) and a folder its files are PUT into
(``incoming/<style>/<id>/``). The folder lies under the style's drop folder but is never
read as part of the drop (``storage.keys.in_api_upload``): only ``complete`` turns it into
a dataset version, through ``ingest_dataset``, the code ``dataset add`` runs, and only
once every declared file is there with its declared size. So a partial upload never
becomes a dataset; one abandoned past its expiry is removed by housekeeping
(``prune_uploads``).

States: ``open`` → ``completing`` (a claim: one conditional write, so of two concurrent
``complete`` calls one ingests) → ``completed`` (the report kept) or ``rejected``
(nothing accepted). A ``completing`` claim older than ``COMPLETING_LEASE`` (its caller
died mid-ingest) is taken over; ingesting the same files again is idempotent (a dataset
version is its content hash). ``abandoned``: expired and removed.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import PurePosixPath
from typing import Any, Literal

from lora_pipeline.dataset.ingest import EmptyDatasetError, IngestOptions, IngestReport, ingest_dataset
from lora_pipeline.dataset.sources import DEFAULT_MAX_FILE_BYTES
from lora_pipeline.dataset.validate import IMAGE_EXTENSIONS
from lora_pipeline.registry.names import validate_style
from lora_pipeline.storage.base import ObjectNotFound, ObjectStore, PreconditionFailed
from lora_pipeline.storage.keys import API_UPLOADS, INCOMING, UPLOAD_ID, upload_prefix, upload_record_key

MAX_FILES = 2000
MAX_TOTAL_BYTES = 4 * 1024**3
COMPLETING_LEASE = timedelta(minutes=15)
# Kept after completion so a repeated `complete` answers with the same report.
SETTLED_RETENTION = timedelta(days=30)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+@-]{0,199}$")
# Extension → the content types a file of that kind may be declared (and signed) with.
_CONTENT_TYPES: dict[str, tuple[str, ...]] = {
    **{ext: ("image/jpeg",) for ext, kind in IMAGE_EXTENSIONS.items() if kind == "JPEG"},
    ".png": ("image/png",),
    ".webp": ("image/webp",),
    ".bmp": ("image/bmp",),
    ".tif": ("image/tiff",),
    ".tiff": ("image/tiff",),
    ".gif": ("image/gif",),
    ".txt": ("text/plain",),
    ".csv": ("text/csv",),
    ".jsonl": ("application/jsonl", "application/x-ndjson", "text/plain"),
}

State = Literal["open", "completing", "completed", "rejected", "abandoned"]


class UploadError(Exception):
    """Base of the refusals below; the message names what is wrong."""


class UploadRefused(UploadError):
    """The declared files cannot be accepted (name, type, size, count)."""


class UnknownUpload(UploadError):
    """No such upload (for this style)."""


class UploadClosed(UploadError):
    """The upload is completed, rejected, being completed or abandoned; ``record`` says which."""

    def __init__(self, message: str, record: UploadRecord) -> None:
        super().__init__(message)
        self.record = record


class IncompleteUpload(UploadError):
    """Some declared files are missing or have another size than declared."""


@dataclass(frozen=True)
class DeclaredFile:
    name: str
    size: int
    content_type: str


@dataclass(frozen=True)
class UploadRecord:
    id: str
    style: str
    files: tuple[DeclaredFile, ...]
    created_at: str
    expires_at: str
    state: State = "open"
    claimed_at: str | None = None
    dataset_hash: str | None = None
    report: dict[str, Any] | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return upload_prefix(self.style, self.id)

    def key(self, name: str) -> str:
        return self.prefix + name

    def expired(self, now: datetime) -> bool:
        return datetime.fromisoformat(self.expires_at) <= now

    def to_json(self) -> bytes:
        raw = asdict(self)
        raw["files"] = [asdict(f) for f in self.files]
        return json.dumps(raw, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> UploadRecord:
        raw = json.loads(data)
        raw["files"] = tuple(DeclaredFile(**f) for f in raw["files"])
        return cls(**raw)


def check_declared(files: list[DeclaredFile], *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> None:
    """Refuse a declaration the ingest could never accept, naming the first file at fault.

    Pure: names are flat, key-safe and unique; each extension is an image or caption kind
    and its content type one that kind is served as; each size at most ``max_file_bytes``
    (what the ingest reads), the sum at most MAX_TOTAL_BYTES.
    """
    if not files:
        raise UploadRefused("files: declare at least one file")
    if len(files) > MAX_FILES:
        raise UploadRefused(f"files: {len(files)} declared, at most {MAX_FILES} per upload")
    seen: set[str] = set()
    for f in files:
        if not _NAME.match(f.name):
            raise UploadRefused(
                f"file {f.name!r}: a name is one path segment of letters, digits and ._=+@- "
                "(no '/', not starting with '.'), at most 200 characters"
            )
        if f.name in seen:
            raise UploadRefused(f"file {f.name!r}: declared twice")
        seen.add(f.name)
        suffix = PurePosixPath(f.name).suffix.lower()
        allowed = _CONTENT_TYPES.get(suffix)
        if allowed is None:
            raise UploadRefused(
                f"file {f.name!r}: extension {suffix or '(none)'} is neither an image "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))}) nor a caption file (.txt, .csv, .jsonl)"
            )
        if f.content_type not in allowed:
            raise UploadRefused(f"file {f.name!r}: type {f.content_type!r} does not match {suffix}: use {allowed[0]}")
        if not 0 < f.size <= max_file_bytes:
            raise UploadRefused(f"file {f.name!r}: size {f.size:,} bytes is not between 1 and {max_file_bytes:,}")
    total = sum(f.size for f in files)
    if total > MAX_TOTAL_BYTES:
        raise UploadRefused(f"files: {total:,} bytes in all, over the {MAX_TOTAL_BYTES:,}-byte limit per upload")


def create_upload(
    store: ObjectStore, style: str, files: list[DeclaredFile], *, ttl: timedelta, now: datetime | None = None
) -> UploadRecord:
    """Check the declaration and record a new open upload (its URLs are the caller's to sign)."""
    validate_style(style)
    check_declared(files)
    now = now or datetime.now(UTC)
    record = UploadRecord(
        id=f"upload-{uuid.uuid4().hex}",
        style=style,
        files=tuple(files),
        created_at=now.isoformat(),
        expires_at=(now + ttl).isoformat(),
    )
    store.put(upload_record_key(record.id), record.to_json(), if_none_match=True, content_type="application/json")
    return record


def read_upload(store: ObjectStore, style: str, upload_id: str) -> tuple[UploadRecord, str]:
    """The record and its ETag; UnknownUpload for an id that is malformed, unknown or another style's."""
    if not UPLOAD_ID.match(upload_id):
        raise UnknownUpload(f"upload {upload_id!r}: not an upload id (upload-<32 hex digits>)")
    try:
        stored = store.get(upload_record_key(upload_id))
    except ObjectNotFound:
        raise UnknownUpload(f"upload {upload_id!r} does not exist") from None
    record = UploadRecord.from_json(stored.data)
    if record.style != style:
        raise UnknownUpload(f"upload {upload_id!r} does not belong to style {style!r}")
    return record, stored.etag


def missing_files(store: ObjectStore, record: UploadRecord) -> list[str]:
    """Each declared file that is absent or has another size than declared, with what is wrong."""
    present = {info.key: info.size for info in store.list(record.prefix)}
    problems = []
    for f in record.files:
        size = present.get(record.key(f.name))
        if size is None:
            problems.append(f"{f.name} (not uploaded)")
        elif size != f.size:
            problems.append(f"{f.name} ({size:,} bytes, declared {f.size:,})")
    return problems


def complete_upload(
    store: ObjectStore,
    style: str,
    upload_id: str,
    *,
    options: IngestOptions | None = None,
    now: datetime | None = None,
) -> tuple[UploadRecord, IngestReport | None]:
    """Ingest a fully uploaded upload as ``style``'s new current dataset version.

    Returns the completed record and the ingest's report; the record only (report None)
    when nothing was accepted (state ``rejected``, its report in the record). Raises
    UnknownUpload, UploadClosed (a second complete, one under way, an abandoned upload)
    or IncompleteUpload (nothing is ingested; PUT what is named and complete again).
    """
    now = now or datetime.now(UTC)
    record, etag = read_upload(store, style, upload_id)
    _refuse_closed(record, now)
    problems = missing_files(store, record)
    if problems:
        raise IncompleteUpload(f"upload {upload_id}: {len(problems)} file(s) not ready: " + ", ".join(problems[:20]))
    claimed = replace(record, state="completing", claimed_at=now.isoformat())
    try:
        etag = store.put(upload_record_key(upload_id), claimed.to_json(), if_match=etag)
    except PreconditionFailed:
        raise UploadClosed(f"upload {upload_id} is being completed by another request", record) from None
    try:
        report = ingest_dataset(store, style, f"store:{record.prefix}", options=options or IngestOptions())
    except EmptyDatasetError as exc:
        settled = replace(claimed, state="rejected", error=str(exc), report=exc.report.to_dict())
        store.put(upload_record_key(upload_id), settled.to_json(), if_match=etag)
        _remove_files(store, record)
        return settled, None
    settled = replace(claimed, state="completed", dataset_hash=report.dataset_hash, report=report.to_dict())
    store.put(upload_record_key(upload_id), settled.to_json(), if_match=etag)
    _remove_files(store, record)  # the dataset version holds them now
    return settled, report


def _refuse_closed(record: UploadRecord, now: datetime) -> None:
    if record.state == "completed":
        raise UploadClosed(f"upload {record.id} is already completed (dataset {record.dataset_hash})", record)
    if record.state == "rejected":
        raise UploadClosed(f"upload {record.id} was already completed and rejected: {record.error}", record)
    if record.state == "abandoned":
        raise UploadClosed(f"upload {record.id} was abandoned at {record.expires_at} and its files removed", record)
    if record.state == "completing" and record.claimed_at:
        if datetime.fromisoformat(record.claimed_at) + COMPLETING_LEASE > now:
            raise UploadClosed(f"upload {record.id} is being completed by another request", record)
    if record.expired(now):
        raise UploadClosed(f"upload {record.id} expired at {record.expires_at}: create a new upload", record)


def _remove_files(store: ObjectStore, record: UploadRecord) -> None:
    for info in list(store.list(record.prefix)):
        store.delete(info.key)


@dataclass
class UploadPruning:
    """What ``prune_uploads`` removed: abandoned uploads, stray folders, settled records."""

    abandoned: list[str] = field(default_factory=list)
    stray_files: list[str] = field(default_factory=list)
    settled_records: list[str] = field(default_factory=list)

    def keys(self) -> list[str]:
        return [*self.abandoned, *self.stray_files, *self.settled_records]


def prune_uploads(
    store: ObjectStore, *, now: datetime | None = None, dry_run: bool = False, grace: timedelta = COMPLETING_LEASE
) -> UploadPruning:
    """Remove what uploads leave behind: the files of uploads never completed once they have
    expired (the record stays, ``abandoned``, so a late ``complete`` says why), files in an
    upload folder no open record owns (older than ``grace``), and settled records after
    SETTLED_RETENTION. An upload under way (open and unexpired, or being completed) is never
    touched. Raises StorageError (housekeeping reports it and carries on next time)."""
    now = now or datetime.now(UTC)
    result = UploadPruning()
    owned: set[str] = set()
    for info in list(store.list(API_UPLOADS + "/")):
        try:
            record = UploadRecord.from_json(store.get(info.key).data)
        except (ObjectNotFound, ValueError, TypeError, KeyError):
            continue
        if record.state in ("open", "completing") and not (
            record.expired(now) and (record.state == "open" or _lease_over(record, now))
        ):
            owned.add(record.prefix)
            continue
        if record.state in ("open", "completing"):
            result.abandoned.append(record.id)
            if not dry_run:
                _remove_files(store, record)
                store.put(info.key, replace(record, state="abandoned").to_json(), if_match=info.etag)
        elif info.last_modified + SETTLED_RETENTION <= now:
            result.settled_records.append(info.key)
            if not dry_run:
                store.delete(info.key)
    for info in list(store.list(INCOMING + "/")):
        parts = info.key.split("/")
        if len(parts) < 4 or not UPLOAD_ID.match(parts[2]):
            continue
        if "/".join(parts[:3]) + "/" in owned or info.last_modified + grace > now:
            continue
        result.stray_files.append(info.key)
        if not dry_run:
            store.delete(info.key)
    return result


def _lease_over(record: UploadRecord, now: datetime) -> bool:
    return record.claimed_at is None or datetime.fromisoformat(record.claimed_at) + COMPLETING_LEASE <= now
