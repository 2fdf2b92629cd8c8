"""Batch transfers: many files up or down at once, and a prefix as a streamed zip.

Many small files (a dataset of images and captions) are bound by requests in
flight, not bandwidth, so files go through a bounded thread pool; large files
are additionally split into concurrent parts by the S3 backend. Each file is
retried on its own (a transient failure costs one file a retry, not the batch),
files already in place with the same size and checksum are skipped, and the
report lists every file that still failed, with its error, instead of stopping
at the first one.

Progress goes to a callback, because the CLI draws a tqdm bar and the Dagster
layer writes log lines: ``tqdm_progress`` and ``logging_progress`` adapt both.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from lora_pipeline.settings import get_settings
from lora_pipeline.storage.base import ObjectInfo, ObjectStore, StorageError, validate_key
from lora_pipeline.storage.breaker import counts_as_failure
from lora_pipeline.storage.local import md5_file, validate_prefix

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = [
    "FileFailure",
    "TransferProgress",
    "TransferReport",
    "default_concurrency",
    "download_prefix",
    "iter_zip",
    "logging_progress",
    "tqdm_progress",
    "upload_files",
    "upload_tree",
    "write_zip",
]

T = TypeVar("T")

DEFAULT_ATTEMPTS = 3
ZIP_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class FileFailure:
    key: str
    path: str
    error: str


@dataclass(frozen=True)
class TransferProgress:
    """One file finished (transferred, skipped or failed), with the running totals."""

    key: str
    outcome: str  # "transferred" | "skipped" | "failed"
    size: int
    files_done: int
    files_total: int
    bytes_done: int
    bytes_total: int


ProgressCallback = Callable[[TransferProgress], None]


@dataclass
class TransferReport:
    """What a batch did, file by file; ``ok`` is False if any file failed."""

    transferred: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[FileFailure] = field(default_factory=list)
    bytes_transferred: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def raise_for_failures(self) -> TransferReport:
        if self.failed:
            listing = "; ".join(f"{f.key}: {f.error}" for f in self.failed[:10])
            more = f" (and {len(self.failed) - 10} more)" if len(self.failed) > 10 else ""
            raise StorageError(f"{len(self.failed)} file(s) failed to transfer: {listing}{more}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """For Dagster metadata and ``--json`` output."""
        return {
            "transferred": len(self.transferred),
            "skipped": len(self.skipped),
            "failed": [f.__dict__ for f in self.failed],
            "bytes_transferred": self.bytes_transferred,
            "seconds": round(self.seconds, 3),
        }


def _retryable(exc: BaseException) -> bool:
    """Retry what may pass on a second try; not a missing file or an open breaker."""
    return counts_as_failure(exc) or isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError)


def _with_retries(fn: Callable[[], T], attempts: int) -> T:
    for attempt in Retrying(
        stop=stop_after_attempt(attempts),
        wait=wait_random_exponential(multiplier=0.2, max=5.0),
        retry=retry_if_exception(_retryable),
        reraise=True,
    ):
        with attempt:
            return fn()
    raise AssertionError("unreachable: Retrying re-raises the last failure")


def _expected_etag(store: ObjectStore, path: Path) -> str:
    etag_for_file = getattr(store, "etag_for_file", None)
    return etag_for_file(path) if etag_for_file else md5_file(path)


def _same_content(store: ObjectStore, info: ObjectInfo | None, path: Path) -> bool:
    if info is None:
        return False
    try:
        if path.stat().st_size != info.size:
            return False
    except FileNotFoundError:
        return False
    return _expected_etag(store, path) == info.etag


def _common_dir(keys: list[str]) -> str:
    """Longest folder prefix shared by all keys ('' if none), for one listing."""
    if not keys:
        return ""
    prefix = os.path.commonprefix(keys)
    return prefix[: prefix.rfind("/") + 1] if "/" in prefix else ""


class _Tally:
    """Thread-safe running totals feeding the report and the progress callback."""

    def __init__(self, files_total: int, bytes_total: int, progress: ProgressCallback | None) -> None:
        self.report = TransferReport()
        self._lock = threading.Lock()
        self._files_total = files_total
        self._bytes_total = bytes_total
        self._files_done = 0
        self._bytes_done = 0
        self._progress = progress

    def record(self, key: str, path: Path, size: int, outcome: str, error: str = "") -> None:
        with self._lock:
            self._files_done += 1
            self._bytes_done += size
            if outcome == "transferred":
                self.report.transferred.append(key)
                self.report.bytes_transferred += size
            elif outcome == "skipped":
                self.report.skipped.append(key)
            else:
                self.report.failed.append(FileFailure(key=key, path=str(path), error=error))
            event = TransferProgress(
                key, outcome, size, self._files_done, self._files_total, self._bytes_done, self._bytes_total
            )
        if self._progress is not None:
            self._progress(event)


def default_concurrency() -> int:
    """Files in flight: LORA_TRANSFER_CONCURRENCY, default 16 (the AWS CLI uses 10, s5cmd 256)."""
    return get_settings().transfer_concurrency


def _run_batch(
    jobs: list[tuple[str, Path, int]],
    work: Callable[[str, Path], str],
    *,
    concurrency: int | None,
    progress: ProgressCallback | None,
) -> TransferReport:
    """Run ``work(key, path)`` (returns an outcome) over jobs in a bounded pool."""
    concurrency = default_concurrency() if concurrency is None else concurrency
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    started = time.perf_counter()
    tally = _Tally(len(jobs), sum(size for _, _, size in jobs), progress)
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="transfer") as pool:
        futures = {pool.submit(work, key, path): (key, path, size) for key, path, size in jobs}
        for future in as_completed(futures):
            key, path, size = futures[future]
            try:
                outcome = future.result()
            except Exception as exc:  # noqa: BLE001 - every failure goes in the report
                tally.record(key, path, size, "failed", f"{type(exc).__name__}: {exc}")
            else:
                tally.record(key, path, size, outcome)
    tally.report.transferred.sort()
    tally.report.skipped.sort()
    tally.report.failed.sort(key=lambda f: f.key)
    tally.report.seconds = time.perf_counter() - started
    return tally.report


def upload_files(
    store: ObjectStore,
    items: Iterable[tuple[str, Path]],
    *,
    concurrency: int | None = None,
    attempts: int = DEFAULT_ATTEMPTS,
    skip_existing: bool = True,
    progress: ProgressCallback | None = None,
) -> TransferReport:
    """Upload ``(key, local path)`` pairs concurrently; never raises for one bad file.

    With ``skip_existing`` one listing of the keys' common folder finds objects
    already there with the same size and ETag (md5, or S3's multipart ETag
    computed locally), which are skipped.
    """
    pairs = [(validate_key(key), Path(path)) for key, path in items]
    existing: dict[str, ObjectInfo] = {}
    if skip_existing and pairs:
        wanted = {key for key, _ in pairs}
        existing = {info.key: info for info in store.list(_common_dir(sorted(wanted))) if info.key in wanted}

    def work(key: str, path: Path) -> str:
        if skip_existing and _same_content(store, existing.get(key), path):
            return "skipped"
        _with_retries(lambda: store.upload_file(key, path), attempts)
        return "transferred"

    jobs = [(key, path, path.stat().st_size if path.is_file() else 0) for key, path in pairs]
    return _run_batch(jobs, work, concurrency=concurrency, progress=progress)


def upload_tree(
    store: ObjectStore,
    local_dir: Path,
    prefix: str,
    *,
    include: Callable[[Path], bool] | None = None,
    **kwargs: Any,
) -> TransferReport:
    """Upload every file under ``local_dir`` to ``prefix`` + its relative path.

    Hidden files and folders (a leading '.') are left out; ``include`` narrows
    further. Other keyword arguments are upload_files's.
    """
    root = Path(local_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"not a folder: {root}")
    prefix = _folder_prefix(prefix)
    items = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if include is not None and not include(path):
                continue
            items.append((prefix + path.relative_to(root).as_posix(), path))
    return upload_files(store, items, **kwargs)


def _folder_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    if prefix:
        validate_prefix(prefix + "/")
        return prefix + "/"
    return ""


def download_prefix(
    store: ObjectStore,
    prefix: str,
    local_dir: Path,
    *,
    concurrency: int | None = None,
    attempts: int = DEFAULT_ATTEMPTS,
    skip_existing: bool = True,
    progress: ProgressCallback | None = None,
) -> TransferReport:
    """Download every object under ``prefix`` into ``local_dir`` (relative paths kept).

    Each file is written to a temporary name and renamed, so an interrupted run
    leaves no truncated file behind; local files with the same size and
    checksum are skipped.
    """
    folder = _folder_prefix(prefix)
    root = Path(local_dir)
    listing = list(store.list(folder))
    by_key = {info.key: info for info in listing}

    def work(key: str, path: Path) -> str:
        if skip_existing and path.is_file() and _same_content(store, by_key[key], path):
            return "skipped"
        _with_retries(lambda: store.download_file(key, path), attempts)
        return "transferred"

    jobs = [(info.key, root / info.key[len(folder) :], info.size) for info in listing]
    return _run_batch(jobs, work, concurrency=concurrency, progress=progress)


# -- zip streaming ----------------------------------------------------------------


class _Sink:
    """A write-only, unseekable file that hands its bytes to a generator."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._offset = 0

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        self._offset += len(data)
        return len(data)

    def tell(self) -> int:
        return self._offset

    def flush(self) -> None:
        pass

    def close(self) -> None:  # part of zipfile's writable-file protocol; ZipFile never closes a passed file
        pass

    def drain(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


def iter_zip(
    store: ObjectStore,
    prefix: str,
    *,
    keys: Iterable[str] | None = None,
    chunk_size: int = ZIP_CHUNK,
    compression: int = zipfile.ZIP_STORED,
) -> Iterator[bytes]:
    """Yield a zip of the objects under ``prefix`` (or exactly ``keys``), chunk by chunk.

    Objects are read with ranged GETs of ``chunk_size`` and written straight
    into the zip stream, so memory stays around one chunk whatever the total
    size. Entries are named relative to ``prefix``. ZIP_STORED by default:
    safetensors and images do not compress.
    """
    folder = _folder_prefix(prefix)
    if keys is None:
        infos = list(store.list(folder))
    else:
        infos = []
        for key in keys:
            info = store.head(key)
            if info is None:
                raise StorageError(f"cannot zip {key!r}: object not found")
            infos.append(info)
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", compression=compression, allowZip64=True) as archive:
        for info in infos:
            name = info.key[len(folder) :] if info.key.startswith(folder) else info.key
            entry = zipfile.ZipInfo(name, date_time=info.last_modified.timetuple()[:6])
            entry.compress_type = compression
            with archive.open(entry, "w", force_zip64=info.size >= 2**31) as member:
                offset = 0
                while offset < info.size:
                    chunk = store.get_range(info.key, offset, chunk_size)
                    if not chunk:
                        raise StorageError(f"{info.key!r} shrank while being zipped")
                    member.write(chunk)
                    offset += len(chunk)
                    yield sink.drain()
            yield sink.drain()
    yield sink.drain()


def write_zip(store: ObjectStore, prefix: str, fileobj: BinaryIO, **kwargs: Any) -> int:
    """Write the zip of ``prefix`` to ``fileobj`` (need not be seekable); returns bytes written."""
    written = 0
    for chunk in iter_zip(store, prefix, **kwargs):
        if chunk:
            fileobj.write(chunk)
            written += len(chunk)
    return written


# -- progress adapters ------------------------------------------------------------


class tqdm_progress:  # noqa: N801 - used like a function in a with statement
    """``with tqdm_progress("upload") as progress: upload_tree(..., progress=progress)``."""

    def __init__(self, desc: str, **tqdm_kwargs: Any) -> None:
        self._desc = desc
        self._kwargs = tqdm_kwargs
        self._bar: tqdm[Any] | None = None

    def __enter__(self) -> ProgressCallback:
        return self

    def __call__(self, event: TransferProgress) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=event.bytes_total, desc=self._desc, unit="B", unit_scale=True, **self._kwargs)
        self._bar.update(event.size)
        if event.outcome == "failed":
            self._bar.write(f"failed: {event.key}")

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.close()


def logging_progress(logger: logging.Logger | Any, *, every: int = 100, label: str = "transfer") -> ProgressCallback:
    """A callback logging every ``every`` files, every failure, and the last file.

    ``logger`` may be a logging.Logger or Dagster's ``context.log``.
    """

    def callback(event: TransferProgress) -> None:
        if event.outcome == "failed":
            logger.warning(f"{label}: {event.key} failed")
        if event.files_done % every == 0 or event.files_done == event.files_total:
            logger.info(
                f"{label}: {event.files_done}/{event.files_total} files, "
                f"{event.bytes_done / 1e6:.1f}/{event.bytes_total / 1e6:.1f} MB"
            )

    return callback
