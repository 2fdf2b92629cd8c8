"""A circuit breaker around any ObjectStore.

When the store is down, every sensor tick and every step would otherwise wait
through botocore's retries and timeouts before failing, and pile more load on an
endpoint that is already struggling. After ``fail_max`` consecutive failed calls
the breaker opens: calls fail at once with StoreUnavailable, which says since
when the store has been unavailable (sensors turn it into a SkipReason). After
``reset_timeout`` seconds one call is let through as a probe (half-open); if it
succeeds the breaker closes, if it fails it opens again.

Only the store being unwell counts as a failure. A missing object, a lost
conditional write or an invalid key is the store answering correctly, so those
pass through and count as successes.

Why not pybreaker: its ``CircuitBreaker.call`` holds one breaker-wide lock for
the whole guarded call, so wrapping the store with it would serialize every
concurrent transfer (16 parallel uploads would run one at a time). The state
machine needed here is small; this one locks only around state changes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, UTC
from pathlib import Path
from typing import Any, TypeVar

from lora_pipeline.storage.base import (
    InvalidKey,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    PreconditionFailed,
    StorageError,
    StoredObject,
    StoreUnavailable,
)

T = TypeVar("T")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"

_ANSWERS = (ObjectNotFound, PreconditionFailed, InvalidKey)


def counts_as_failure(exc: BaseException) -> bool:
    """True when ``exc`` means the store is unwell, not that it answered 'no'."""
    if isinstance(exc, _ANSWERS) or isinstance(exc, StoreUnavailable):
        return False
    return isinstance(exc, (StorageError, ConnectionError, TimeoutError))


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` means the store cannot be used now (open breaker, failing store,
    failed start-up check) rather than an answer such as a missing object."""
    return isinstance(exc, StoreUnavailable) or counts_as_failure(exc)


class CircuitBreaker:
    """Closed → open after ``fail_max`` consecutive failures → half-open after ``reset_timeout``."""

    def __init__(
        self,
        name: str = "object store",
        *,
        fail_max: int = 5,
        reset_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if fail_max < 1:
            raise ValueError(f"fail_max must be at least 1, got {fail_max}")
        if reset_timeout <= 0:
            raise ValueError(f"reset_timeout must be positive, got {reset_timeout}")
        self.name = name
        self.fail_max = fail_max
        self.reset_timeout = reset_timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        self.unavailable_since: datetime | None = None
        self.last_error: str | None = None

    @property
    def state(self) -> str:
        with self._lock:
            if self._state == OPEN and self._clock() - self._opened_at >= self.reset_timeout:
                return HALF_OPEN
            return self._state

    @property
    def is_open(self) -> bool:
        """True while calls fail fast (sensors skip their tick then)."""
        return self.state == OPEN

    def _unavailable(self) -> StoreUnavailable:
        since = self.unavailable_since.isoformat(timespec="seconds") if self.unavailable_since else "?"
        retry_in = max(0.0, self.reset_timeout - (self._clock() - self._opened_at))
        return StoreUnavailable(
            f"{self.name} is unavailable since {since} after {self._failures} consecutive "
            f"failures (last: {self.last_error}); next probe in {retry_in:.0f} s"
        )

    def before_call(self) -> None:
        """Raise StoreUnavailable if the breaker is open; admit one probe when half-open."""
        with self._lock:
            if self._state == CLOSED:
                return
            if self._state == OPEN and self._clock() - self._opened_at >= self.reset_timeout:
                self._state = HALF_OPEN
                self._probe_in_flight = False
            if self._state == HALF_OPEN and not self._probe_in_flight:
                self._probe_in_flight = True
                return
            raise self._unavailable()

    def record_success(self) -> None:
        with self._lock:
            self._state = CLOSED
            self._failures = 0
            self._probe_in_flight = False
            self.unavailable_since = None
            self.last_error = None

    def record_failure(self, exc: BaseException) -> None:
        with self._lock:
            self._failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            if self._state == HALF_OPEN or self._failures >= self.fail_max:
                if self._state == CLOSED:
                    self.unavailable_since = datetime.now(UTC)
                self._state = OPEN
                self._opened_at = self._clock()
                self._probe_in_flight = False

    def trip(self, exc: BaseException) -> None:
        """Open at once, whatever the count: ``exc`` says the store cannot be used at all
        (its start-up check failed, after the client's own retries)."""
        with self._lock:
            self._failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            if self._state == CLOSED:
                self.unavailable_since = datetime.now(UTC)
            self._state = OPEN
            self._opened_at = self._clock()
            self._probe_in_flight = False

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        self.before_call()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self._settle(exc)
            raise
        self.record_success()
        return result

    def _settle(self, exc: BaseException) -> None:
        if counts_as_failure(exc):
            self.record_failure(exc)
        elif isinstance(exc, Exception):
            self.record_success()
        else:  # KeyboardInterrupt and friends say nothing about the store
            with self._lock:
                self._probe_in_flight = False


class BreakerStore:
    """An ObjectStore that routes every call of ``inner`` through a CircuitBreaker.

    Attributes the protocol does not name (``supports_conditional_writes``,
    ``etag_for_file``, ``bucket``, ``root`` …) are forwarded to ``inner``.
    """

    def __init__(self, inner: ObjectStore, breaker: CircuitBreaker | None = None) -> None:
        self.inner = inner
        self.breaker = breaker or CircuitBreaker(f"object store {inner.describe()}")

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "breaker"):  # not set yet (e.g. during copy/unpickle)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"BreakerStore({self.inner!r}, state={self.breaker.state})"

    def describe(self) -> str:
        return self.inner.describe()

    def get(self, key: str) -> StoredObject:
        return self.breaker.call(self.inner.get, key)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self.breaker.call(self.inner.get_range, key, start, length)

    def head(self, key: str) -> ObjectInfo | None:
        return self.breaker.call(self.inner.head, key)

    def put(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
        content_type: str | None = None,
    ) -> str:
        return self.breaker.call(
            self.inner.put,
            key,
            data,
            if_match=if_match,
            if_none_match=if_none_match,
            content_type=content_type,
        )

    def delete(self, key: str) -> None:
        self.breaker.call(self.inner.delete, key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self.breaker.before_call()
        try:
            yield from self.inner.list(prefix)
        except GeneratorExit:
            self.breaker.record_success()
            raise
        except BaseException as exc:
            self.breaker._settle(exc)
            raise
        self.breaker.record_success()

    def list_prefixes(self, prefix: str = "") -> Iterator[str]:
        return iter(self.breaker.call(lambda: list(self.inner.list_prefixes(prefix))))

    def upload_file(self, key: str, path: Path, *, if_none_match: bool = False) -> str:
        if if_none_match:
            return self.breaker.call(self.inner.upload_file, key, path, if_none_match=True)
        return self.breaker.call(self.inner.upload_file, key, path)

    def download_file(self, key: str, path: Path) -> None:
        self.breaker.call(self.inner.download_file, key, path)

    def url(self, key: str) -> str:
        return self.inner.url(key)

    def presigned_url(self, key: str, expires_in: int = 3600) -> str:
        return self.inner.presigned_url(key, expires_in)
