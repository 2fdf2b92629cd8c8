"""Open the configured object store: one function every entry point uses.

The Dagster resources, the CLI and the GPU worker all turn a storage URL into a
store here, so they agree on the backend, its client settings, the start-up
checks (bucket exists, credentials work, conditional writes honoured) and the
circuit breaker around it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lora_pipeline.settings import Settings, get_settings
from lora_pipeline.settings import parse_storage_url as check_storage_url
from lora_pipeline.storage.base import ObjectStore, StorageError
from lora_pipeline.storage.breaker import BreakerStore, CircuitBreaker, counts_as_failure
from lora_pipeline.storage.local import LocalStore
from lora_pipeline.storage.s3 import S3Options, S3Store, build_s3_client

if TYPE_CHECKING:
    from types_boto3_s3.client import S3Client


class _Checkable(Protocol):
    def check(self) -> object: ...


def parse_storage_url(url: str) -> tuple[str, str, str]:
    """``s3://bucket/prefix`` → ("s3", bucket, prefix); a path or file:// URL → ("file", dir, "").

    ``lora_pipeline.settings.parse_storage_url`` (the one check, also the setting's), its
    ValueError as a StorageError naming LORA_STORAGE_URL."""
    try:
        return check_storage_url(url)
    except ValueError as exc:
        raise StorageError(f"LORA_STORAGE_URL {url!r}: {exc}") from None


def breaker_from_settings(name: str, settings: Settings | None = None) -> CircuitBreaker:
    """A breaker with LORA_STORE_BREAKER_FAILURES and LORA_STORE_BREAKER_RESET_S."""
    settings = settings or get_settings()
    return CircuitBreaker(name, fail_max=settings.store_breaker_failures, reset_timeout=settings.store_breaker_reset_s)


_shared_breakers: dict[str, CircuitBreaker] = {}
_shared_lock = threading.Lock()


def shared_breaker(location: str, settings: Settings | None = None) -> CircuitBreaker:
    """The one CircuitBreaker of this process for a store location.

    Deliberately process-wide: a breaker is the memory of an endpoint's recent
    health, and Dagster builds resources anew for every step and sensor tick. A
    breaker per store object would forget the outage at each tick and never
    open; one per location lets a sensor see it open and skip its tick.
    """
    with _shared_lock:
        breaker = _shared_breakers.get(location)
        if breaker is None:
            breaker = _shared_breakers[location] = breaker_from_settings(f"object store {location}", settings)
        return breaker


def checked_with(store: _Checkable, breaker: CircuitBreaker) -> None:
    """Run ``store.check()`` through ``breaker``.

    An open breaker refuses at once (StoreUnavailable, nothing sent). A failed
    check opens it at once (``trip``): the check already made the client's
    retries, and a store that fails it is unusable, so the next tick or step
    fails fast instead of repeating it; one check is let through per reset
    period (half-open) and closes the breaker when it passes.
    """
    breaker.before_call()
    try:
        store.check()
    except BaseException as exc:
        if counts_as_failure(exc):
            breaker.trip(exc)
        else:
            breaker._settle(exc)
        raise
    breaker.record_success()


def s3_location(bucket: str, prefix: str) -> str:
    """What ``S3Store.describe()`` says for ``bucket`` and ``prefix`` (the breaker's key)."""
    prefix = prefix.strip("/")
    return f"s3://{bucket}/{prefix + '/' if prefix else ''}"


_StoreKey = tuple[str, str, S3Options, Hashable, str | None, bool]
_shared_stores: dict[_StoreKey, ObjectStore] = {}
_store_locks: dict[_StoreKey, threading.Lock] = {}


def shared_store(
    url: str,
    *,
    options: S3Options | None = None,
    make_client: Callable[[S3Options], S3Client] | None = None,
    client_key: Hashable = None,
    public_base_url: str | None = None,
    accelerate: bool = False,
) -> ObjectStore:
    """The one checked, breaker-guarded store of this process for ``url`` and these settings.

    Dagster builds resources anew for every step and sensor tick; building and
    checking an S3 store each time (a client, HeadBucket, four probe requests)
    would put the start-up check outside the breaker on every tick. Here a store
    is checked once, through the location's breaker (``checked_with``), and kept
    for the life of the process, keyed by the URL, the client options,
    ``client_key`` (whatever else shapes the client: credentials, profile, TLS) and
    the URL settings. A failed check is not kept: the next call after the
    breaker's reset period checks again. A local directory is opened afresh each
    call, as before (cheap, no network).

    ``make_client(options)`` builds the boto3 client (default ``build_s3_client``);
    it runs only when the store is not cached yet.
    """
    scheme, location, prefix = parse_storage_url(url)
    if scheme != "s3":
        return open_store(url, public_base_url=public_base_url, accelerate=accelerate)
    options = options or S3Options.from_settings()
    key: _StoreKey = (location, prefix, options, client_key, public_base_url, bool(accelerate))
    with _shared_lock:
        store = _shared_stores.get(key)
        if store is not None:
            return store
        lock = _store_locks.setdefault(key, threading.Lock())
    with lock:  # one check at a time per key; the others then find the store (or an open breaker)
        with _shared_lock:
            store = _shared_stores.get(key)
        if store is not None:
            return store
        breaker = shared_breaker(s3_location(location, prefix))
        if breaker.is_open:
            breaker.before_call()  # raises StoreUnavailable: no client built, nothing sent
        inner = _s3_store(
            (make_client or build_s3_client)(options), location, prefix, options, public_base_url, accelerate
        )
        checked_with(inner, breaker)
        store = BreakerStore(inner, breaker)
        with _shared_lock:
            _shared_stores[key] = store
        return store


def _s3_store(
    client: S3Client, bucket: str, prefix: str, options: S3Options, public_base_url: str | None, accelerate: bool
) -> S3Store:
    return S3Store(
        client,
        bucket,
        prefix,
        public_base_url=public_base_url,
        accelerate=accelerate or options.accelerate,
        options=options,
    )


def reset_shared_stores() -> None:
    """Forget every shared store and breaker of this process (tests; after a fork)."""
    with _shared_lock:
        _shared_stores.clear()
        _store_locks.clear()
        _shared_breakers.clear()


def open_store(
    url: str,
    *,
    s3_client: S3Client | None = None,
    public_base_url: str | None = None,
    accelerate: bool = False,
    breaker: CircuitBreaker | bool = True,
    check: bool = True,
    settings: Settings | None = None,
    **s3_options: Any,
) -> ObjectStore:
    """Open ``url`` as a new ObjectStore wrapped in a circuit breaker (``shared_store``
    keeps one per process instead).

    ``s3_client``: a ready boto3 client (e.g. from dagster-aws's S3Resource); when
    None one is built from the standard AWS variables and ``s3_options``
    (overrides of S3Options fields, e.g. ``read_timeout=10``). ``check`` runs the
    start-up checks for S3 (bucket, credentials, conditional-write probe) and
    raises one StorageError naming the setting to fix; it runs through the breaker
    (``checked_with``), so an open breaker refuses at once and a failed check opens
    it. ``breaker``: True for the location's shared one, False for none, or a
    CircuitBreaker. ``settings``: the S3 and breaker settings (default ``get_settings()``).
    """
    scheme, location, prefix = parse_storage_url(url)
    if scheme == "s3":
        options = S3Options.from_settings(settings, **s3_options)
        client = s3_client if s3_client is not None else build_s3_client(options)
        store: S3Store | LocalStore = _s3_store(client, location, prefix, options, public_base_url, accelerate)
    else:
        if s3_options:
            raise TypeError(f"S3 options {sorted(s3_options)} given for a local store {url!r}")
        store = LocalStore(Path(location), public_base_url=public_base_url)
        check = False  # nothing to check beyond what the constructor did
    if breaker is False:
        if check and isinstance(store, S3Store):  # a local store has nothing to check (check is False)
            store.check()
        return store
    if breaker is True:
        breaker = shared_breaker(store.describe(), settings)
    if check and isinstance(store, S3Store):
        checked_with(store, breaker)
    return BreakerStore(store, breaker)


def open_configured_store(settings: Settings | None = None, **kwargs: Any) -> ObjectStore:
    """The store named by LORA_STORAGE_URL (and LORA_PUBLIC_BASE_URL), ready to use."""
    settings = settings or get_settings()
    return open_store(settings.storage_url, public_base_url=settings.public_base_url, settings=settings, **kwargs)
