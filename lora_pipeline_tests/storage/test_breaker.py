"""The circuit breaker's state machine, on a fake clock and a store that fails on demand."""

from __future__ import annotations

import threading

import pytest

from lora_pipeline.storage import ObjectNotFound, PreconditionFailed, StorageError, StoreUnavailable
from lora_pipeline.storage.breaker import BreakerStore, CircuitBreaker
from lora_pipeline.storage.local import LocalStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FlakyStore(LocalStore):
    """A LocalStore whose reads fail with StorageError while ``down`` is set."""

    down = False
    calls = 0

    def get(self, key):
        self.calls += 1
        if self.down:
            raise StorageError("endpoint unreachable")
        return super().get(key)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def flaky(tmp_path) -> FlakyStore:
    store = FlakyStore(tmp_path / "s")
    store.put("k", b"v")
    return store


@pytest.fixture
def guarded(flaky, clock) -> BreakerStore:
    return BreakerStore(flaky, CircuitBreaker("test store", fail_max=3, reset_timeout=30, clock=clock))


def fail(store: BreakerStore, times: int) -> None:
    for _ in range(times):
        with pytest.raises(StorageError):
            store.get("k")


def test_breaker_stays_closed_below_the_failure_threshold(guarded, flaky):
    flaky.down = True
    fail(guarded, 2)
    assert guarded.breaker.state == "closed"


def test_breaker_opens_after_consecutive_failures_and_fails_fast(guarded, flaky):
    flaky.down = True
    fail(guarded, 3)
    calls = flaky.calls
    with pytest.raises(StoreUnavailable) as err:
        guarded.get("k")
    assert flaky.calls == calls
    message = str(err.value)
    assert "test store is unavailable since" in message and "endpoint unreachable" in message


def test_a_success_resets_the_consecutive_failure_count(guarded, flaky):
    flaky.down = True
    fail(guarded, 2)
    flaky.down = False
    guarded.get("k")
    flaky.down = True
    fail(guarded, 2)
    assert guarded.breaker.state == "closed"


def test_after_the_reset_timeout_one_probe_closes_the_breaker_on_success(guarded, flaky, clock):
    flaky.down = True
    fail(guarded, 3)
    clock.now += 31
    assert guarded.breaker.state == "half-open"
    flaky.down = False
    assert guarded.get("k").data == b"v"
    assert guarded.breaker.state == "closed"
    assert guarded.breaker.unavailable_since is None


def test_a_failed_probe_opens_the_breaker_again_and_keeps_the_outage_start(guarded, flaky, clock):
    flaky.down = True
    fail(guarded, 3)
    since = guarded.breaker.unavailable_since
    clock.now += 31
    fail(guarded, 1)  # the probe
    assert guarded.breaker.state == "open"
    assert guarded.breaker.unavailable_since == since
    with pytest.raises(StoreUnavailable):
        guarded.get("k")


def test_only_one_probe_is_admitted_while_half_open(clock):
    breaker = CircuitBreaker(fail_max=1, reset_timeout=5, clock=clock)
    breaker.record_failure(StorageError("down"))
    clock.now += 6
    breaker.before_call()  # the probe
    with pytest.raises(StoreUnavailable):
        breaker.before_call()


@pytest.mark.parametrize("answer", [ObjectNotFound("k"), PreconditionFailed("k")])
def test_a_store_answering_no_is_not_a_failure(answer, clock):
    breaker = CircuitBreaker(fail_max=1, clock=clock)

    def call():
        raise answer

    for _ in range(3):
        with pytest.raises(type(answer)):
            breaker.call(call)
    assert breaker.state == "closed"


def test_listing_failures_count_and_successful_listings_close(guarded, flaky, clock):
    class Boom(StorageError):
        pass

    def broken_list(prefix=""):
        yield from ()
        raise Boom("list failed")

    flaky.list = broken_list
    for _ in range(3):
        with pytest.raises(Boom):
            list(guarded.list())
    assert guarded.breaker.is_open


def test_breaker_does_not_serialize_concurrent_calls(tmp_path):
    """Unlike pybreaker, calls run in parallel: two calls can be inside the store at once."""
    inside = threading.Barrier(2, timeout=5)

    class Meeting(LocalStore):
        def head(self, key):
            inside.wait()  # both threads must be here at the same time
            return None

    store = BreakerStore(Meeting(tmp_path / "m"))
    threads = [threading.Thread(target=store.head, args=("k",)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not inside.broken


def test_breaker_store_forwards_backend_attributes(guarded, flaky):
    assert guarded.supports_conditional_writes is True
    assert guarded.root == flaky.root
