"""The object-store protocol every part of the pipeline talks to.

Everything the pipeline keeps (datasets, LoRA files, registry documents, webhook
files, job state) lives behind this one small interface, so the local directory
used on a laptop and S3 in production behave the same to the code above them:
same ETags, same conditional writes, same listing order, same ranged reads.
Keys are always relative to the store's root (bucket + prefix, or a directory).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol, runtime_checkable


class StorageError(Exception):
    """Base class of every storage failure, so callers can catch one type."""


class ObjectNotFound(StorageError, KeyError):
    """The key does not exist in the store."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"object not found: {self.key!r}"


class PreconditionFailed(StorageError):
    """A conditional write lost: the object changed (If-Match) or already exists (If-None-Match)."""

    def __init__(self, key: str, detail: str = "") -> None:
        super().__init__(f"precondition failed for {key!r}{': ' + detail if detail else ''}")
        self.key = key


class StoreUnavailable(StorageError):
    """The store is failing; the circuit breaker is open and calls fail fast."""


class InvalidKey(StorageError, ValueError):
    """A key that would escape its prefix or is otherwise unsafe."""


_KEY_SEGMENT = re.compile(r"[A-Za-z0-9._=+@-]+")
MAX_KEY_BYTES = 1024  # S3's limit on a key (UTF-8)
MAX_SEGMENT_BYTES = 255  # a file name's limit on the local store's file systems


def validate_key(key: str) -> str:
    """Refuse a key the pipeline builds unless it has the shape the pipeline builds.

    Keys the pipeline makes (from validated style names, job ids, dataset file
    names) hold only letters, digits and ``._=+@-`` per segment, so a bad name
    is caught where it enters (``upload_files``, the key builders) rather than
    stored. The stores themselves accept any key ``validate_stored_key`` does:
    an outside tool can list a file under any name, and reading, moving or
    deleting it must work.
    """
    validate_stored_key(key)
    for segment in key.split("/"):
        if len(segment) > MAX_SEGMENT_BYTES:
            raise InvalidKey(f"invalid object key {key[:40]!r}…: a segment is over {MAX_SEGMENT_BYTES} characters")
        if not _KEY_SEGMENT.fullmatch(segment):
            raise InvalidKey(
                f"invalid object key {key!r}: segment {segment!r} holds characters outside letters, digits and ._=+@-"
            )
    return key


def validate_stored_key(key: str) -> str:
    """Refuse only keys that could escape the store root or alias another key.

    Both backends map keys onto paths (the local one literally), so `..`, `.`,
    empty segments, absolute paths and NUL are refused; any other name is one a
    person or a tool (``aws s3 cp``, a file manager: ``copy of body (1).json``,
    ``résumé.json``) can write, and a store lists it, so it can be read, moved
    and deleted.
    """
    if not key or key.startswith("/") or key.endswith("/"):
        raise InvalidKey(f"invalid object key {key!r}: must be a relative path to a file")
    if "\x00" in key:
        raise InvalidKey(f"invalid object key {key!r}: holds a NUL character")
    if len(key.encode("utf-8", errors="surrogateescape")) > MAX_KEY_BYTES:
        raise InvalidKey(f"invalid object key {key[:40]!r}…: longer than S3's {MAX_KEY_BYTES} bytes")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidKey(f"invalid object key {key!r}: segment {segment!r} is empty, '.' or '..'")
    return key


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing or HEAD says about one object."""

    key: str
    size: int
    etag: str
    last_modified: datetime


@dataclass(frozen=True)
class StoredObject:
    """An object's bytes together with the ETag they were read at (for If-Match)."""

    key: str
    data: bytes
    etag: str


@runtime_checkable
class ObjectStore(Protocol):
    """The operations the pipeline needs from an object store."""

    def describe(self) -> str:
        """A human-readable location, e.g. ``s3://bucket/prefix`` or ``/path/to/dir``."""
        ...

    def get(self, key: str) -> StoredObject:
        """Read a whole object with its ETag. Raises ObjectNotFound."""
        ...

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Read ``length`` bytes from ``start`` (fewer at the end). Raises ObjectNotFound."""
        ...

    def head(self, key: str) -> ObjectInfo | None:
        """Metadata of one object, or None when it does not exist."""
        ...

    def put(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
        content_type: str | None = None,
    ) -> str:
        """Write an object atomically and return its new ETag.

        ``if_match``: write only if the current ETag equals it; ``if_none_match``:
        write only if the key does not exist. Either failing raises PreconditionFailed.
        """
        ...

    def delete(self, key: str) -> None:
        """Delete an object; deleting a missing key is not an error."""
        ...

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """All objects whose key starts with ``prefix``, in lexicographic key order."""
        ...

    def list_prefixes(self, prefix: str = "") -> Iterator[str]:
        """The "folders" one level below ``prefix``, in lexicographic order, deeper keys unread.

        Each is ``<prefix><name>/`` for a ``<name>`` (without '/') such that some
        object's key starts with it: S3's ListObjectsV2 with ``Delimiter='/'``
        (CommonPrefixes). Costs a request per 1,000 folders, whatever lies below them.
        """
        ...

    def upload_file(self, key: str, path: Path, *, if_none_match: bool = False) -> str:
        """Upload a local file (multipart when large; never a partial object). Returns the ETag.

        ``if_none_match``: create only, atomically: raise PreconditionFailed when the
        key already exists (how a worker publishes a LoRA without ever replacing one).
        """
        ...

    def download_file(self, key: str, path: Path) -> None:
        """Download an object to a local file, written atomically."""
        ...

    def url(self, key: str) -> str:
        """The stable URL to record for a key (public base / accelerated / regular / file://)."""
        ...

    def presigned_url(self, key: str, expires_in: int = 3600) -> str:
        """A temporary GET URL. Never stored in the registry."""
        ...
