"""A local directory that behaves like the S3 bucket, for laptops and tests.

Everything above the store (registry writes with If-Match, webhook inbox
listings, ranged reads of safetensors headers) must behave the same here as on
S3, or bugs hide until production. So this backend keeps S3's semantics:

* an ETag is the md5 hex of the content (what S3 gives a single-part object);
* a write goes to a temporary file and is renamed into place, so a reader sees
  the old bytes or the new ones, never half a file;
* a conditional write holds an exclusive ``flock`` on a per-key lock file while
  it checks the current ETag and renames, so two processes racing on one
  registry document get exactly one winner and one PreconditionFailed;
* listings are in lexicographic key order.

Bookkeeping (locks, temporary files) lives under ``<root>/.lora-store/``, a
reserved first segment that keys cannot use and listings never show.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, UTC
from pathlib import Path
from typing import IO
from urllib.parse import quote

from lora_pipeline.storage.base import (
    InvalidKey,
    ObjectInfo,
    ObjectNotFound,
    PreconditionFailed,
    StorageError,
    StoredObject,
    validate_stored_key,
)

RESERVED_DIR = ".lora-store"
_CHUNK = 1024 * 1024
# ETags of files at least this large are cached per (inode, size, mtime). Small
# files are always hashed afresh: an inode number freed by a rename can be reused
# within one coarse mtime tick, and a stale ETag would let a stale If-Match win.
_CACHE_MIN_SIZE = 8 * _CHUNK
_TMP_MIN_AGE_S = 24 * 3600  # a younger temporary file may belong to a write in progress


def md5_file(path: Path) -> str:
    """md5 hex of a file, read in chunks so large files do not fill memory."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the file at ``path`` (not unlinked or replaced)."""
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (opened.st_ino, opened.st_dev) == (at_path.st_ino, at_path.st_dev)


class _DirectorySyncs:
    """Durable renames with group commit: fsync a directory once for every write renamed into
    it while the previous fsync of that directory ran.

    A file's own fsync covers its bytes, not the directory entry naming it: without a
    directory fsync after the rename, a power cut soon after a put returned could leave the
    old name (or none). One fsync per put would double the syncs of the webhook receiver,
    whose concurrent deliveries land in the same two folders; here a writer whose rename is
    covered by an fsync that started after it waits for that one, and one writer (the
    leader) syncs for all the renames made meanwhile.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._state: dict[str, list[int]] = {}  # directory → [renames seen, renames synced, syncing]

    def sync(self, directory: Path) -> None:
        """Return once an fsync of ``directory`` begun after this call's rename has finished."""
        name = str(directory)
        with self._cond:
            state = self._state.setdefault(name, [0, 0, 0])
            state[0] += 1
            mine = state[0]
            while state[1] < mine:
                if state[2]:
                    self._cond.wait()
                    continue
                state[2] = 1
                covered = state[0]  # every rename made so far is in the directory now
                self._cond.release()
                try:
                    _fsync_directory(directory)
                finally:
                    self._cond.acquire()
                    state[2] = 0
                    self._cond.notify_all()
                state[1] = max(state[1], covered)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return  # removed since (a delete took its last file): no entry in it to keep
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _holds_a_file(directory: Path) -> bool:
    """Whether any file lies below ``directory`` (stops at the first one found)."""
    for _dirpath, _dirnames, filenames in os.walk(directory):
        if filenames:
            return True
    return False


def lock_file_name(key: str) -> str:
    """The lock file of ``key``: one flat name per key."""
    return key.replace("/", "%2F") + ".lock"


@contextlib.contextmanager
def locked_file(lock_path: Path) -> Iterator[None]:
    """Hold the exclusive ``flock`` of ``lock_path`` (created if missing), between threads and
    processes alike (each ``open`` is its own lock holder).

    ``prune_lock_files`` may unlink a lock file (holding its flock while it does),
    so a writer that opened the file before the unlink could lock an inode no
    longer at the path while another writer locks the new file there: two
    "exclusive" holders. Hence the lock counts only if, once acquired, the
    inode locked is still the one at the path; otherwise retry on the new file.
    """
    while True:
        handle = open(lock_path, "a+b")  # noqa: SIM115 - closed below or on retry
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            if _same_file(handle.fileno(), lock_path):
                break
        except BaseException:
            handle.close()
            raise
        handle.close()  # unlinked while we waited: closing releases the stale lock
    try:
        with contextlib.suppress(OSError):
            os.utime(handle.fileno())  # the lock file's mtime says when it was last used
        yield
    finally:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()


def validate_prefix(prefix: str) -> str:
    """A listing prefix may be empty, partial or end with '/', but never escape the root."""
    if not prefix:
        return prefix
    if prefix.startswith("/") or "\\" in prefix:
        raise InvalidKey(f"invalid prefix {prefix!r}: must be relative")
    segments = prefix.split("/")
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment in (".", "..") or (segment == "" and not last):
            raise InvalidKey(f"invalid prefix {prefix!r}: segment {segment!r} not allowed")
    return prefix


class LocalStore:
    """An ObjectStore on a local directory (the embedded default)."""

    supports_conditional_writes = True

    def __init__(self, root: Path | str, public_base_url: str | None = None) -> None:
        self.root = Path(root).expanduser().resolve()
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self._meta = self.root / RESERVED_DIR
        try:
            (self._meta / "tmp").mkdir(parents=True, exist_ok=True)
            (self._meta / "locks").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot use local store directory {self.root} (LORA_STORAGE_URL): {exc}") from exc
        # ETags cost a full read; remember them per (inode, size, mtime).
        self._etag_cache: dict[tuple[str, int, int, int], str] = {}
        self._cache_lock = threading.Lock()
        self._dir_syncs = _DirectorySyncs()

    # -- helpers -----------------------------------------------------------------

    def describe(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        validate_stored_key(key)
        if key.split("/", 1)[0] == RESERVED_DIR:
            raise InvalidKey(f"invalid object key {key!r}: {RESERVED_DIR}/ is reserved")
        return self.root / key

    def _etag(self, path: Path, stat: os.stat_result | None = None) -> str:
        stat = stat or path.stat()
        if stat.st_size < _CACHE_MIN_SIZE:
            return md5_file(path)
        ident = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with self._cache_lock:
            cached = self._etag_cache.get(ident)
        if cached is not None:
            return cached
        etag = md5_file(path)
        with self._cache_lock:
            if len(self._etag_cache) > 10_000:
                self._etag_cache.clear()
            self._etag_cache[ident] = etag
        return etag

    def etag_for_file(self, path: Path) -> str:
        """The ETag this store would give ``path``'s content (for skip-if-same)."""
        return md5_file(path)

    def _locked(self, key: str) -> contextlib.AbstractContextManager[None]:
        """Hold the exclusive flock of ``key``'s lock file (``locked_file``)."""
        return locked_file(self._meta / "locks" / lock_file_name(key))

    def prune_lock_files(self, older_than: datetime, *, dry_run: bool = False) -> dict[str, int]:
        """Remove lock files last used before ``older_than`` and temporary files a killed
        writer left behind (untouched since then, and for at least a day whatever
        ``older_than`` says: a younger one may be a write in progress). Returns counts:
        ``locks``, ``tmp`` (removed, or that would be), ``locks_busy`` (held now: kept).

        A lock file is removed only while this call holds its flock (taken without
        waiting: a held lock means a write in progress) and only if it is still the
        file at its path; ``_locked`` re-checks the path after acquiring, so a writer
        that opened the file just before it went retries on the new one.
        """
        cutoff = older_than.timestamp()
        counts = {"locks": 0, "locks_busy": 0, "tmp": 0}
        for entry in os.scandir(self._meta / "locks"):
            if not entry.name.endswith(".lock"):
                continue
            try:
                if entry.stat().st_mtime >= cutoff:
                    continue
                fd = os.open(entry.path, os.O_RDWR)  # never create one here
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    counts["locks_busy"] += 1
                    continue
                if not _same_file(fd, Path(entry.path)) or os.fstat(fd).st_mtime >= cutoff:
                    continue  # replaced, or used, since the scan
                if not dry_run:
                    os.unlink(entry.path)
                counts["locks"] += 1
            finally:
                os.close(fd)  # releases the flock
        tmp_cutoff = min(cutoff, time.time() - _TMP_MIN_AGE_S)
        for entry in os.scandir(self._meta / "tmp"):
            with contextlib.suppress(FileNotFoundError):
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < tmp_cutoff:
                    if not dry_run:
                        os.unlink(entry.path)
                    counts["tmp"] += 1
        return counts

    def _write_via_rename(self, path: Path, fill: Callable[[IO[bytes]], object]) -> None:
        """Write into a temp file beside the store, fsync, rename it into place, and fsync the
        folder (with group commit): once this returns, the write survives a power cut."""
        fd, tmp = tempfile.mkstemp(dir=self._meta / "tmp", prefix="put-")
        try:
            with os.fdopen(fd, "wb") as handle:
                fill(handle)
                handle.flush()
                os.fsync(handle.fileno())
            if path.is_dir():
                raise StorageError(f"cannot write {path}: a folder of that name exists")
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
            self._dir_syncs.sync(path.parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    # -- ObjectStore -------------------------------------------------------------

    def get(self, key: str) -> StoredObject:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        return StoredObject(key=key, data=data, etag=hashlib.md5(data, usedforsecurity=False).hexdigest())

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError(f"invalid range start={start} length={length}")
        path = self._path(key)
        try:
            with open(path, "rb") as handle:
                handle.seek(start)
                return handle.read(length)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            stat = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not path.is_file():
            return None
        try:
            return self._info(key, path, stat)
        except FileNotFoundError:  # deleted between the stat and the hash
            return None

    def _info(self, key: str, path: Path, stat: os.stat_result) -> ObjectInfo:
        return ObjectInfo(
            key=key,
            size=stat.st_size,
            etag=self._etag(path, stat),
            last_modified=datetime.fromtimestamp(stat.st_mtime, tz=UTC),
        )

    def put(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
        content_type: str | None = None,
    ) -> str:
        path = self._path(key)
        data = bytes(data)
        if if_match is None and not if_none_match:
            self._write_via_rename(path, lambda handle: handle.write(data))
        else:
            with self._locked(key):
                exists = path.is_file()
                if if_none_match and exists:
                    raise PreconditionFailed(key, "object already exists")
                if if_match is not None:
                    if not exists:
                        raise PreconditionFailed(key, "object does not exist")
                    try:
                        current = md5_file(path)  # never a cached ETag here
                    except FileNotFoundError:
                        raise PreconditionFailed(key, "object does not exist") from None
                    if current != if_match.strip('"'):
                        raise PreconditionFailed(key, "object changed since it was read")
                self._write_via_rename(path, lambda handle: handle.write(data))
        return hashlib.md5(data, usedforsecurity=False).hexdigest()

    def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
            path.unlink()
        # Drop folders the delete left empty, as S3 has no empty "folders".
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        if prefix.split("/", 1)[0] == RESERVED_DIR:
            return
        # Walk only the folder the prefix points into, then filter and sort.
        base_dir = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base_dir.is_dir():
            return
        found: list[tuple[str, Path]] = []
        for dirpath, dirnames, filenames in os.walk(base_dir):
            rel_dir = os.path.relpath(dirpath, self.root)
            if rel_dir == ".":
                dirnames[:] = [d for d in dirnames if d != RESERVED_DIR]
                rel_dir = ""
            for name in filenames:
                key = f"{rel_dir}/{name}" if rel_dir else name
                if key.startswith(prefix):
                    found.append((key, Path(dirpath) / name))
        found.sort(key=lambda item: item[0].encode())
        for key, path in found:
            try:  # a file deleted while listing (before its stat or its hash) is not listed
                info = self._info(key, path, path.stat())
            except FileNotFoundError:
                continue
            yield info

    def list_prefixes(self, prefix: str = "") -> Iterator[str]:
        """Sub-folders one level below ``prefix`` holding at least one file (as S3 has no
        empty folders); only their names are read, nothing is hashed."""
        validate_prefix(prefix)
        if prefix.split("/", 1)[0] == RESERVED_DIR:
            return
        folder, _, start = prefix.rpartition("/")
        base_dir = self.root / folder if folder else self.root
        try:
            with os.scandir(base_dir) as entries:
                names = [e.name for e in entries if e.name.startswith(start) and e.is_dir()]
        except (FileNotFoundError, NotADirectoryError):
            return
        names = sorted((n for n in names if n != RESERVED_DIR or folder), key=str.encode)
        for name in names:
            if _holds_a_file(base_dir / name):
                yield f"{folder}/{name}/" if folder else f"{name}/"

    def upload_file(self, key: str, path: Path, *, if_none_match: bool = False) -> str:
        target = self._path(key)
        source = Path(path)
        if not source.is_file():
            raise FileNotFoundError(f"no such file to upload: {source}")
        digest = hashlib.md5(usedforsecurity=False)

        def fill(handle: IO[bytes]) -> None:
            with open(source, "rb") as src:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    handle.write(chunk)

        if not if_none_match:
            self._write_via_rename(target, fill)
            return digest.hexdigest()
        with self._locked(key):  # the same lock as put(if_none_match=True)
            if target.is_file():
                raise PreconditionFailed(key, "object already exists")
            self._write_via_rename(target, fill)
        return digest.hexdigest()

    def download_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFound(key)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as handle, open(source, "rb") as src:
                shutil.copyfileobj(src, handle, _CHUNK)
            os.replace(tmp, target)
        except FileNotFoundError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise ObjectNotFound(key) from None
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def url(self, key: str) -> str:
        path = self._path(key)
        if self.public_base_url:
            return f"{self.public_base_url}/{quote(key, safe='/')}"
        return path.as_uri()

    def presigned_url(self, key: str, expires_in: int = 3600) -> str:
        """A local file has no expiring URL; the file:// URL is the closest thing."""
        if expires_in <= 0:
            raise ValueError(f"expires_in must be positive, got {expires_in}")
        return self._path(key).as_uri()
