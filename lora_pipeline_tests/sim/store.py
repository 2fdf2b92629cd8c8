"""An in-memory object store with the store protocol's semantics, and injected faults.

What it keeps of S3 (and of LocalStore, which keeps it too): an ETag is the md5 hex of
a single-part object (``md5-of-part-md5s-N`` for a multipart one), a conditional write
(If-Match, If-None-Match) is checked and applied atomically, a listing is in key order
and strongly consistent, a ranged read returns what exists, a delete of a missing key is
no error, ``last_modified`` is the (true, unskewed) time of the write, and keys are
checked as the real stores check them (``validate_stored_key``: any name a tool can write). ``upload_file`` above ``MULTIPART_THRESHOLD``
goes up in parts and becomes visible only at its (conditional) completion.

Every call first hands control to the scheduler (``Sim.step``: others may run, the
actor may crash there). A faulty actor's call may then fail before it is applied (a
503 after the retries), stall (simulated minutes pass: leases run out), or lose its
answer after it was applied (a reset: the caller sees an error, or for a conditional
write that a retry found already applied, PreconditionFailed).

``drop`` writes a file as an outside tool would (``aws s3 cp``, a file manager): no key
check, so names the pipeline never builds occur.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from lora_pipeline.storage.base import (
    ObjectInfo,
    ObjectNotFound,
    PreconditionFailed,
    StorageError,
    StoredObject,
    validate_stored_key,
)
from lora_pipeline_tests.sim.scheduler import Sim

MULTIPART_THRESHOLD = 512  # bytes: a LoRA file this large is uploaded in parts
PART_SIZE = 256


@dataclass(frozen=True)
class _Object:
    data: bytes
    etag: str
    modified: datetime


@dataclass
class FaultRates:
    """Per call, for a faulty actor: fail before applying, stall, lose the answer after applying."""

    error: float = 0.02
    stall: float = 0.01
    lost_answer: float = 0.02


@dataclass
class SimStore:
    """The ObjectStore protocol in memory (``lora_pipeline.storage.base.ObjectStore``)."""

    sim: Sim
    faults: FaultRates = field(default_factory=FaultRates)
    objects: dict[str, _Object] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)  # sorted, for listings
    supports_conditional_writes: bool = True
    injected: dict[str, int] = field(default_factory=dict)

    # -- faults -------------------------------------------------------------------------

    def _enter(self, op: str, key: str) -> bool:
        """Before a call: let others run, maybe crash, fail or stall. True: lose the answer after."""
        actor = self.sim.step()
        if actor is None or not actor.faulty:
            return False
        roll = self.sim.rng.random()
        if roll < self.faults.error:
            self._count("error")
            raise StorageError(f"injected: {op} {key!r} failed (503 SlowDown after retries)")
        roll -= self.faults.error
        if roll < self.faults.stall:
            self._count("stall")
            self.sim.sleep(self.sim.rng.choice([30.0, 90.0, 400.0, 1800.0]))
            return False
        roll -= self.faults.stall
        return op in ("put", "delete", "upload") and roll < self.faults.lost_answer

    def _count(self, kind: str) -> None:
        self.injected[kind] = self.injected.get(kind, 0) + 1

    def _lost(self, op: str, key: str, conditional: bool) -> None:
        self._count("lost_answer")
        if conditional and self.sim.rng.random() < 0.5:  # the SDK retried; the retry met its own write
            raise PreconditionFailed(key, "injected: a retry of an applied conditional write")
        raise StorageError(f"injected: {op} {key!r}: connection reset after the write was applied")

    # -- state ----------------------------------------------------------------------------

    def _set(self, key: str, data: bytes, etag: str | None = None) -> str:
        etag = etag or hashlib.md5(data, usedforsecurity=False).hexdigest()
        if key not in self.objects:
            bisect.insort(self.keys, key)
        self.objects[key] = _Object(data, etag, self.sim.true_now())
        return etag

    def _remove(self, key: str) -> None:
        if self.objects.pop(key, None) is not None:
            self.keys.pop(bisect.bisect_left(self.keys, key))

    def _check(self, key: str, if_match: str | None, if_none_match: bool) -> None:
        current = self.objects.get(key)
        if if_none_match and current is not None:
            raise PreconditionFailed(key, "object already exists")
        if if_match is not None and (current is None or current.etag != if_match.strip('"')):
            raise PreconditionFailed(key, "object changed since it was read" if current else "object does not exist")

    def drop(self, key: str, data: bytes) -> None:
        """An outside tool's write: no key check, no fault, no scheduling."""
        self._set(key, data)

    def info(self, key: str) -> ObjectInfo | None:
        """What HEAD would say, without a call (for the checks)."""
        current = self.objects.get(key)
        return None if current is None else ObjectInfo(key, len(current.data), current.etag, current.modified)

    # -- ObjectStore ------------------------------------------------------------------------

    def describe(self) -> str:
        return "sim://store"

    def get(self, key: str) -> StoredObject:
        validate_stored_key(key)
        self._enter("get", key)
        current = self.objects.get(key)
        if current is None:
            raise ObjectNotFound(key)
        return StoredObject(key, current.data, current.etag)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError(f"invalid range start={start} length={length}")
        validate_stored_key(key)
        self._enter("get_range", key)
        current = self.objects.get(key)
        if current is None:
            raise ObjectNotFound(key)
        return current.data[start : start + length]

    def head(self, key: str) -> ObjectInfo | None:
        validate_stored_key(key)
        self._enter("head", key)
        return self.info(key)

    def put(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
        content_type: str | None = None,
    ) -> str:
        validate_stored_key(key)
        lose = self._enter("put", key)
        self._check(key, if_match, if_none_match)
        etag = self._set(key, bytes(data))
        if lose:
            self._lost("put", key, if_match is not None or if_none_match)
        return etag

    def delete(self, key: str) -> None:
        validate_stored_key(key)
        lose = self._enter("delete", key)
        self._remove(key)
        if lose:
            self._lost("delete", key, False)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self._enter("list", prefix)
        start = bisect.bisect_left(self.keys, prefix)
        snapshot = []
        for key in self.keys[start:]:
            if not key.startswith(prefix):
                break
            snapshot.append(self.info(key))
        yield from (i for i in snapshot if i is not None)

    def list_prefixes(self, prefix: str = "") -> Iterator[str]:
        self._enter("list", prefix)
        found: list[str] = []
        for info in self.list_unscheduled(prefix):
            rest = info.key[len(prefix) :]
            if "/" in rest:
                folder = prefix + rest.split("/", 1)[0] + "/"
                if not found or found[-1] != folder:
                    found.append(folder)
        yield from found

    def list_unscheduled(self, prefix: str = "") -> list[ObjectInfo]:
        """A listing without a call (for the checks)."""
        start = bisect.bisect_left(self.keys, prefix)
        out = []
        for key in self.keys[start:]:
            if not key.startswith(prefix):
                break
            info = self.info(key)
            assert info is not None
            out.append(info)
        return out

    @staticmethod
    def etag_for_file(path: Path) -> str:
        """The ETag ``upload_file`` gives ``path``'s content (for skip-if-same)."""
        data = Path(path).read_bytes()
        if len(data) < MULTIPART_THRESHOLD:
            return hashlib.md5(data, usedforsecurity=False).hexdigest()
        parts = [data[i : i + PART_SIZE] for i in range(0, len(data), PART_SIZE)]
        digests = b"".join(hashlib.md5(p, usedforsecurity=False).digest() for p in parts)
        return hashlib.md5(digests, usedforsecurity=False).hexdigest() + f"-{len(parts)}"

    def upload_file(self, key: str, path: Path, *, if_none_match: bool = False) -> str:
        validate_stored_key(key)
        data = Path(path).read_bytes()
        if len(data) < MULTIPART_THRESHOLD:
            lose = self._enter("upload", key)
            if if_none_match:
                self._check(key, None, True)
            etag = self._set(key, data)
        else:  # create, parts, complete: visible only once completed, atomically
            self._enter("create_multipart", key)
            for _ in range(0, len(data), PART_SIZE):
                self._enter("upload_part", key)
            lose = self._enter("upload", key)
            if if_none_match:
                self._check(key, None, True)
            self._count("multipart")
            etag = self._set(key, data, self.etag_for_file(path))
        if lose:
            self._lost("upload", key, if_none_match)
        return etag

    def download_file(self, key: str, path: Path) -> None:
        stored = self.get(key)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(stored.data)

    def url(self, key: str) -> str:
        validate_stored_key(key)
        return f"https://sim.invalid/{key}"

    def presigned_url(self, key: str, expires_in: int = 3600) -> str:
        return self.url(key) + f"?expires={expires_in}"
