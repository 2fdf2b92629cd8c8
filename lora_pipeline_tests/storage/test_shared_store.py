"""One checked store per process, its start-up check behind the breaker, and tick timeouts.

Endpoints that fail: "stalled" accepts connections and never answers (the fault
proxy stalls every request far longer than any timeout here), "refusing" has
nothing listening (the proxy, stopped).
"""

from __future__ import annotations

import time
import warnings

import pytest

from lora_pipeline.settings import SettingsError, load_settings
from lora_pipeline.storage import StorageError, StoreUnavailable
from lora_pipeline.storage.breaker import BreakerStore
from lora_pipeline.storage.factory import reset_shared_stores, s3_location, shared_breaker, shared_store
from lora_pipeline.storage.s3 import ConditionalWritesUnsupported, S3Options, build_s3_client
from lora_pipeline_tests.conftest import moto_options
from lora_pipeline_tests.storage.fault_proxy import FaultProxy


@pytest.fixture(autouse=True)
def _fresh_process_state():
    reset_shared_stores()
    yield
    reset_shared_stores()


def head_buckets(proxy: FaultProxy, bucket: str) -> int:
    return sum(1 for r in proxy.requests if r.method == "HEAD" and r.path.rstrip("/") == f"/{bucket}")


def open_via(proxy: FaultProxy, bucket: str, boto_session, **overrides):
    options = moto_options(proxy.endpoint, **overrides)
    return shared_store(
        f"s3://{bucket}/lora",
        options=options,
        make_client=lambda o: build_s3_client(o, session=boto_session),
    )


def tick_options(endpoint: str) -> S3Options:
    return moto_options(endpoint, read_timeout=3.0, tick_read_timeout=0.5, tick_connect_timeout=0.5).for_ticks()


def test_a_store_is_built_and_checked_once_per_process(proxy, s3_bucket, boto_session):
    stores = [open_via(proxy, s3_bucket, boto_session) for _ in range(3)]

    assert stores[0] is stores[1] is stores[2]
    assert isinstance(stores[0], BreakerStore)
    assert head_buckets(proxy, s3_bucket) == 1
    stores[0].put("a.json", b"{}")
    assert open_via(proxy, s3_bucket, boto_session).get("a.json").data == b"{}"


def test_other_client_settings_get_their_own_store_but_share_the_breaker(proxy, s3_bucket, boto_session):
    steps = open_via(proxy, s3_bucket, boto_session)
    ticks = open_via(proxy, s3_bucket, boto_session, read_timeout=1.0)

    assert steps is not ticks
    assert steps.breaker is ticks.breaker is shared_breaker(s3_location(s3_bucket, "lora"))
    assert head_buckets(proxy, s3_bucket) == 2


def test_a_stalled_endpoint_fails_the_check_within_the_tick_bound_and_opens_the_breaker(proxy, s3_bucket, boto_session):
    options = tick_options(proxy.endpoint)
    proxy.always("stall")

    started = time.monotonic()
    with pytest.raises(StorageError, match="AWS_ENDPOINT_URL_S3"):
        shared_store(
            f"s3://{s3_bucket}/lora", options=options, make_client=lambda o: build_s3_client(o, session=boto_session)
        )
    elapsed = time.monotonic() - started

    assert options.failure_bound_s() < 10  # 2 attempts x 0.5 s + backoff
    assert elapsed < 30  # generous: the bound above, on a loaded machine
    assert shared_breaker(s3_location(s3_bucket, "lora")).is_open
    # Open: the next attempt is refused at once, with nothing sent.
    sent = proxy.settled()
    with pytest.raises(StoreUnavailable, match="unavailable since"):
        shared_store(
            f"s3://{s3_bucket}/lora", options=options, make_client=lambda o: build_s3_client(o, session=boto_session)
        )
    assert len(proxy.requests) == sent


def test_a_refusing_endpoint_fails_the_check_and_opens_the_breaker(moto_server, s3_bucket, boto_session):
    proxy = FaultProxy(moto_server).start()
    endpoint = proxy.endpoint
    proxy.stop()  # nothing listens there now: connection refused

    def open_once():
        return shared_store(
            f"s3://{s3_bucket}/lora",
            options=tick_options(endpoint),
            make_client=lambda o: build_s3_client(o, session=boto_session),
        )

    with pytest.raises(StorageError, match="cannot reach"):
        open_once()
    assert shared_breaker(s3_location(s3_bucket, "lora")).is_open
    with pytest.raises(StoreUnavailable, match="unavailable since"):
        open_once()


def test_a_failed_check_is_not_kept_and_runs_again_after_the_reset_period(proxy, s3_bucket, boto_session, monkeypatch):
    monkeypatch.setenv("LORA_STORE_BREAKER_RESET_S", "0.3")
    proxy.always("500")
    with pytest.raises(StorageError):
        open_via(proxy, s3_bucket, boto_session)
    failed_checks = head_buckets(proxy, s3_bucket)
    breaker = shared_breaker(s3_location(s3_bucket, "lora"))
    assert breaker.is_open

    proxy.clear()
    time.sleep(0.4)
    store = open_via(proxy, s3_bucket, boto_session)  # the half-open probe is the check itself
    assert breaker.state == "closed"
    assert head_buckets(proxy, s3_bucket) > failed_checks  # checked again, not refused
    # Kept now: the next open sends nothing. (Counted from a settled proxy, not as "one more
    # HEAD": urllib3 may resend a request once on a pooled connection the proxy closed.)
    sent = proxy.settled()
    assert open_via(proxy, s3_bucket, boto_session) is store
    assert proxy.settled() == sent


def test_a_stall_during_the_write_probe_is_a_failure_not_unsupported_writes(proxy, s3_bucket, boto_session):
    """HeadBucket passes, the probe PUT stalls: an outage (no clean-up request sent into it),
    never 'the endpoint ignores conditional writes'."""
    proxy.always("stall", match=lambda r: r.method == "PUT")

    with warnings.catch_warnings():
        warnings.simplefilter("error", ConditionalWritesUnsupported)
        with pytest.raises(StorageError, match="test write"):
            shared_store(
                f"s3://{s3_bucket}/lora",
                options=tick_options(proxy.endpoint),
                make_client=lambda o: build_s3_client(o, session=boto_session),
            )

    assert shared_breaker(s3_location(s3_bucket, "lora")).is_open
    assert not [r for r in proxy.requests if r.method == "DELETE"]


def test_5xx_during_the_write_probe_is_a_failure_not_unsupported_writes(proxy, s3_bucket, boto_session):
    proxy.always("503", match=lambda r: r.method == "PUT")

    with warnings.catch_warnings():
        warnings.simplefilter("error", ConditionalWritesUnsupported)
        with pytest.raises(StorageError, match="SlowDown"):
            shared_store(
                f"s3://{s3_bucket}/lora",
                options=tick_options(proxy.endpoint),
                make_client=lambda o: build_s3_client(o, session=boto_session),
            )


def test_tick_options_cap_timeouts_and_attempts_and_bound_a_failing_request():
    options = S3Options()
    ticks = options.for_ticks()

    assert (ticks.connect_timeout, ticks.read_timeout, ticks.max_attempts) == (2.0, 5.0, 2)
    assert ticks.retry_mode == "standard"
    # 2 attempts x max(2 s connect, 5 s read) + one backoff (<= 1 s, + 5 s retry-after)
    assert ticks.failure_bound_s() == 16.0
    assert options.failure_bound_s() > 300  # the step settings: 5 x 60 s read timeouts
    # Never longer than the step settings, and configurable.
    short = S3Options(read_timeout=1.0, max_attempts=1).for_ticks()
    assert (short.read_timeout, short.max_attempts) == (1.0, 1)
    env = S3Options.from_settings(
        load_settings(
            {"LORA_S3_TICK_READ_TIMEOUT": "3", "LORA_S3_TICK_MAX_ATTEMPTS": "3", "LORA_S3_TICK_CONNECT_TIMEOUT": "1"}
        )
    ).for_ticks()
    assert (env.connect_timeout, env.read_timeout, env.max_attempts) == (1.0, 3.0, 3)


@pytest.mark.parametrize(
    "name", ["LORA_S3_TICK_READ_TIMEOUT", "LORA_S3_TICK_MAX_ATTEMPTS", "LORA_S3_TICK_CONNECT_TIMEOUT"]
)
def test_bad_tick_settings_fail_naming_the_variable(name):
    with pytest.raises(
        SettingsError,
        match=f"^{name}='0': expected a whole number of at least 1$|^{name}='0': expected a number of seconds above 0$",
    ):
        load_settings({name: "0"})


def test_local_stores_are_opened_afresh_as_before(tmp_path):
    first = shared_store(str(tmp_path / "s"))
    second = shared_store(str(tmp_path / "s"))
    assert first is not second and first.breaker is second.breaker
    first.put("a", b"1")
    assert second.get("a").data == b"1"


def test_probe_objects_never_show_as_folders(s3_store, s3_client, s3_bucket):
    s3_client.put_object(Bucket=s3_bucket, Key="lora/.lora-store/probe-x", Body=b"x")
    s3_store.put("a/b.json", b"{}")
    assert list(s3_store.list_prefixes()) == ["a/"]
