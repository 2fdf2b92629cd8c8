"""Where a dataset comes from: a local folder, a zip file, or an object-store prefix.

Each source lists its files under relative POSIX names and reads one file's
bytes on request (from several threads at once). Entries that must never be
read — zip members with ``../`` or absolute paths, encrypted or oversized
members, hidden/system files — are listed as refusals, with a reason, so the
ingest report accounts for them instead of dropping them silently. Nothing is
ever extracted to disk under a name taken from the source.
"""

from __future__ import annotations

import os
import re
import stat
import threading
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Protocol

from lora_pipeline.storage.base import ObjectNotFound, ObjectStore
from lora_pipeline.storage.keys import in_api_upload

DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024
STORE_SCHEME = "store:"


class SourceError(ValueError):
    """The source as a whole cannot be read (missing, not a zip, unreachable)."""


@dataclass(frozen=True)
class SourceFile:
    name: str  # relative POSIX path inside the source
    size: int


@dataclass(frozen=True)
class Refusal:
    name: str
    reason: str


@dataclass
class Listing:
    files: list[SourceFile] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)


class Source(Protocol):
    """A readable collection of files; ``read`` is safe to call from many threads."""

    description: str

    def listing(self) -> Listing: ...

    def read(self, name: str) -> bytes: ...

    def local_path(self, name: str) -> Path | None:
        """The file on local disk, when there is one (uploads then stream from it)."""
        ...

    def close(self) -> None: ...


def open_source(
    source: str | os.PathLike[str],
    *,
    store: ObjectStore | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> Source:
    """Resolve what the user typed into a Source.

    ``store:incoming/<style>/`` reads a prefix of ``store`` (the configured one);
    ``s3://bucket/prefix`` and ``file:///dir`` open that location as a store; a
    path is a folder or a zip file.
    """
    text = os.fspath(source)
    if text.startswith(STORE_SCHEME):
        if store is None:
            raise SourceError(f"source {text!r} names the configured store, but no store was given")
        return StorePrefixSource(store, text[len(STORE_SCHEME) :], max_file_bytes=max_file_bytes)
    if text.startswith(("s3://", "file://")):
        from lora_pipeline.storage.factory import open_store  # only needed for URL sources

        return StorePrefixSource(open_store(text), "", max_file_bytes=max_file_bytes, description=text)
    path = Path(text).expanduser()
    if path.is_dir():
        return FolderSource(path, max_file_bytes=max_file_bytes)
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise SourceError(
                f"source {text!r} is a file but not a zip archive; give a folder, a .zip, "
                "'store:<prefix>' or an s3:// URL"
            )
        return ZipSource(path, max_file_bytes=max_file_bytes)
    raise SourceError(f"source {text!r} does not exist (expected a folder, a .zip, 'store:<prefix>' or an s3:// URL)")


def hidden_reason(name: str) -> str | None:
    """Why a path is skipped as system clutter (.DS_Store, __MACOSX/, Thumbs.db, dotfiles)."""
    parts = PurePosixPath(name).parts
    if any(part == "__MACOSX" for part in parts):
        return "macOS resource-fork entry (__MACOSX), not training data"
    if any(part.startswith(".") for part in parts):
        return "hidden file or folder, not read"
    if parts and parts[-1].lower() in ("thumbs.db", "desktop.ini"):
        return "operating-system file, not training data"
    return None


class FolderSource:
    """A local folder, walked recursively; symlinked folders are not followed."""

    def __init__(self, root: Path, *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> None:
        self.root = root.resolve()
        self.max_file_bytes = max_file_bytes
        self.description = str(self.root)

    def listing(self) -> Listing:
        result = Listing()
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            prefix = "" if rel == "." else rel + "/"
            walked = []
            for d in sorted(dirnames):
                if (reason := hidden_reason(prefix + d)) is not None:
                    result.refused.append(Refusal(prefix + d + "/", reason))
                elif (Path(dirpath) / d).is_symlink():
                    result.refused.append(Refusal(prefix + d + "/", "symlinked folder, not followed"))
                else:
                    walked.append(d)
            dirnames[:] = walked
            for filename in sorted(filenames):
                name = prefix + filename
                path = Path(dirpath) / filename
                if (reason := hidden_reason(name)) is not None:
                    result.refused.append(Refusal(name, reason))
                    continue
                try:
                    info = path.stat()
                except OSError as exc:
                    result.refused.append(Refusal(name, f"cannot read: {exc.strerror or exc}"))
                    continue
                if not stat.S_ISREG(info.st_mode):
                    result.refused.append(Refusal(name, "not a regular file"))
                elif info.st_size > self.max_file_bytes:
                    result.refused.append(Refusal(name, _too_big(info.st_size, self.max_file_bytes)))
                else:
                    result.files.append(SourceFile(name, info.st_size))
        return result

    def read(self, name: str) -> bytes:
        return self._path(name).read_bytes()

    def local_path(self, name: str) -> Path | None:
        return self._path(name)

    def _path(self, name: str) -> Path:
        # Names come from listing() (never from user input), so they stay inside root.
        return self.root / name

    def close(self) -> None:
        pass


_DRIVE = re.compile(r"^[A-Za-z]:")


def unsafe_member_reason(name: str) -> str | None:
    """Why a zip member name is refused: it would land outside the dataset if extracted."""
    normalised = name.replace("\\", "/")
    if normalised.startswith("/") or _DRIVE.match(normalised):
        return "absolute path in zip; refused, nothing extracted"
    if any(part == ".." for part in normalised.split("/")):
        return "path with '..' in zip (would escape the dataset folder); refused, nothing extracted"
    if "\x00" in normalised:
        return "NUL byte in zip member name; refused"
    return None


class ZipSource:
    """A zip archive, read member by member in memory; never extracted by member name."""

    def __init__(self, path: Path, *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> None:
        self.path = path.resolve()
        self.max_file_bytes = max_file_bytes
        self.description = str(self.path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise SourceError(f"cannot open zip {self.path}: {exc}") from exc
        self._members: dict[str, zipfile.ZipInfo] = {}
        self._lock = threading.Lock()

    def listing(self) -> Listing:
        result = Listing()
        for info in self._zip.infolist():
            if info.is_dir():
                continue
            name = info.filename
            if (reason := unsafe_member_reason(name)) is not None:
                result.refused.append(Refusal(name, reason))
            elif (reason := hidden_reason(name)) is not None:
                result.refused.append(Refusal(name, reason))
            elif info.flag_bits & 0x1:
                result.refused.append(Refusal(name, "encrypted zip member; cannot be read"))
            elif info.file_size > self.max_file_bytes:
                result.refused.append(Refusal(name, _too_big(info.file_size, self.max_file_bytes)))
            elif name in self._members:
                result.refused.append(Refusal(name, "duplicate member name in zip; the first one is used"))
            else:
                self._members[name] = info
                result.files.append(SourceFile(name, info.file_size))
        result.files.sort(key=lambda f: f.name)
        return result

    def read(self, name: str) -> bytes:
        info = self._members[name]
        # The size in the central directory can lie; never inflate past the limit.
        try:
            with self._zip.open(info) as member:
                data = member.read(self.max_file_bytes + 1)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
            raise SourceError(f"damaged zip member ({exc})") from exc
        if len(data) > self.max_file_bytes:
            raise SourceError(f"{name}: inflates past {self.max_file_bytes} bytes (zip bomb?)")
        return data

    def local_path(self, name: str) -> Path | None:
        return None

    def close(self) -> None:
        self._zip.close()


class StorePrefixSource:
    """Objects under a prefix of an object store (e.g. ``incoming/<style>/``)."""

    def __init__(
        self,
        store: ObjectStore,
        prefix: str,
        *,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        description: str | None = None,
    ) -> None:
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.store = store
        self.prefix = prefix
        self.max_file_bytes = max_file_bytes
        self.description = description or f"{store.describe().rstrip('/')}/{prefix}"

    def listing(self) -> Listing:
        result = Listing()
        for info in self.store.list(self.prefix):
            name = info.key[len(self.prefix) :]
            if in_api_upload(name):  # an API upload in progress below a drop: ingested by its own complete
                continue
            if (reason := hidden_reason(name)) is not None:
                result.refused.append(Refusal(name, reason))
            elif info.size > self.max_file_bytes:
                result.refused.append(Refusal(name, _too_big(info.size, self.max_file_bytes)))
            else:
                result.files.append(SourceFile(name, info.size))
        if not result.files and not result.refused:
            raise SourceError(f"nothing found under {self.description}")
        return result

    def read(self, name: str) -> bytes:
        try:
            return self.store.get(self.prefix + name).data
        except ObjectNotFound:
            raise SourceError(f"{self.prefix + name} vanished from the store while ingesting") from None

    def local_path(self, name: str) -> Path | None:
        return None

    def close(self) -> None:
        pass


def _too_big(size: int, limit: int) -> str:
    return f"file is {size:,} bytes, over the {limit:,}-byte limit"
