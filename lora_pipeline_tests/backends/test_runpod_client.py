"""The RunPod client against the API double: the documented contract and every legacy failure."""

from __future__ import annotations

import time

import httpx
import pytest

from lora_pipeline.backends.base import (
    ExecutionPolicy,
    JobNotFound,
    RunPodAuthError,
    RunPodError,
    RunPodRequestError,
    RunPodUnavailable,
    SubmitOutcomeUnknown,
)
from lora_pipeline.backends.runpod_client import (
    RunPodClient,
    RunPodRateLimited,
    _refusal,
    _Transient,
    _transport_failure,
)
from lora_pipeline.contracts.training import TrainingRequest
from lora_pipeline.registry.jobids import base_job_id
from lora_pipeline.storage.breaker import CircuitBreaker
from lora_pipeline_tests.fakes.runpod_api import FakeRunPod

POLICY = ExecutionPolicy(execution_timeout_ms=7_200_000, ttl_ms=90_000_000)


def request() -> TrainingRequest:
    return TrainingRequest(style="style_59", version="V5", dataset_hash="ab" * 8, request_id="r1")


def make_client(fake: FakeRunPod, **kwargs) -> RunPodClient:
    kwargs.setdefault("sleep", lambda s: None)
    return RunPodClient(fake.api_key, fake.endpoint_id, base_url=fake.base_url, timeout=5.0, **kwargs)


def test_submit_sends_input_webhook_and_policy(client, fake_runpod):
    job_id = client.submit(request(), webhook_url="https://hooks.example/runpod?token=t", policy=POLICY)
    job = fake_runpod.job(job_id)
    assert job.input["style"] == "style_59"
    assert job.webhook == "https://hooks.example/runpod?token=t"
    assert job.policy == {"executionTimeout": 7_200_000, "ttl": 90_000_000}


def test_submit_returns_the_id_with_its_suffix(client):
    job_id = client.submit(request(), webhook_url=None, policy=POLICY)
    assert job_id.endswith("-u1") and base_job_id(job_id) != job_id


def test_status_reports_the_job_life(client, fake_runpod):
    job_id = client.submit(request(), webhook_url=None, policy=POLICY)
    assert client.status(job_id).status == "IN_QUEUE"
    fake_runpod.start_job(job_id)
    assert client.status(job_id).status == "IN_PROGRESS"
    fake_runpod.finish(job_id, {"status": "COMPLETED", "output": {"lora_key": "k"}})
    final = client.status(job_id)
    assert final.status == "COMPLETED" and final.output == {"lora_key": "k"}
    assert final.delayTime is not None and final.executionTime is not None


def test_suffixed_id_falls_back_to_the_base_uuid_when_the_api_wants_it_bare(fake_runpod):
    fake_runpod.status_lookup = "base"  # what the legacy notes believed
    client = make_client(fake_runpod)
    job_id = client.submit(request(), webhook_url=None, policy=POLICY)
    assert client.status(job_id).status == "IN_QUEUE"
    assert fake_runpod.requests["status"] == 2  # the id as returned first, then the base


def test_suffixed_id_is_tried_as_returned_first(fake_runpod):
    fake_runpod.status_lookup = "full"
    client = make_client(fake_runpod)
    job_id = client.submit(request(), webhook_url=None, policy=POLICY)
    assert client.status(job_id).id == job_id
    assert fake_runpod.requests["status"] == 1


def test_a_bare_uuid_from_a_webhook_finds_the_suffixed_job(client, fake_runpod):
    job_id = client.submit(request(), webhook_url=None, policy=POLICY)
    assert client.status(base_job_id(job_id)).id == job_id


def test_an_id_whose_suffix_changed_on_retry_is_still_found(client, fake_runpod):
    fake_runpod.id_suffix, fake_runpod.retry_suffix = "e1", "e2"
    job_id = client.submit(request(), webhook_url=None, policy=POLICY)
    fake_runpod.finish(job_id, {"status": "FAILED", "error": "oom"})
    assert client.retry(job_id).id.endswith("-e2")
    assert client.status(job_id).id == base_job_id(job_id) + "-e2"


def test_an_expired_result_is_job_not_found(client, fake_runpod):
    job_id = client.submit(request(), webhook_url=None, policy=POLICY)
    fake_runpod.process(job_id)
    fake_runpod.advance(31 * 60)
    with pytest.raises(JobNotFound, match="expired") as caught:
        client.status(job_id)
    assert caught.value.job_id == job_id
    assert "client is nil" in caught.value.detail


def test_a_result_is_kept_for_thirty_minutes(client, fake_runpod):
    job_id = client.submit(request(), webhook_url=None, policy=POLICY)
    fake_runpod.process(job_id)
    fake_runpod.advance(29 * 60)
    assert client.status(job_id).status == "COMPLETED"


def test_an_unknown_job_is_job_not_found(client):
    with pytest.raises(JobNotFound):
        client.status("60902e6c-08a1-426e-9cb9-9eaec90f5e2b-u1")


def test_a_wrong_key_says_to_check_runpod_api_key(fake_runpod):
    client = RunPodClient("wrong", fake_runpod.endpoint_id, base_url=fake_runpod.base_url)
    with pytest.raises(RunPodAuthError, match="RUNPOD_API_KEY"):
        client.health()


def test_a_missing_key_is_refused_before_any_request():
    with pytest.raises(RunPodAuthError, match="RUNPOD_API_KEY"):
        RunPodClient("", "endpoint")


def test_a_wrong_endpoint_says_to_check_runpod_endpoint_id(fake_runpod):
    client = RunPodClient(fake_runpod.api_key, "other-endpoint", base_url=fake_runpod.base_url)
    with pytest.raises(RunPodRequestError, match="RUNPOD_ENDPOINT_ID"):
        client.health()


def test_429_is_retried_after_the_retry_after_delay(client, fake_runpod, sleeps):
    job_id = client.submit(request(), webhook_url=None, policy=POLICY)
    fake_runpod.script("status", 429, count=2, retry_after=3)
    assert client.status(job_id).status == "IN_QUEUE"
    assert sleeps == [3.0, 3.0]


def test_retry_after_is_capped(fake_runpod):
    sleeps: list[float] = []
    client = make_client(fake_runpod, sleep=sleeps.append, max_retry_wait_s=5)
    fake_runpod.script("health", 429, count=1, retry_after=3600)
    client.health()
    assert sleeps == [5]


def test_persistent_429_raises_rate_limited(client, fake_runpod):
    fake_runpod.script("health", 429, count=100)
    with pytest.raises(RunPodRateLimited):
        client.health()
    assert fake_runpod.requests["health"] == client.max_attempts


def test_5xx_is_retried_with_backoff(client, fake_runpod, sleeps):
    job_id = client.submit(request(), webhook_url=None, policy=POLICY)
    fake_runpod.script("status", 502, count=2)
    assert client.status(job_id).id == job_id
    assert len(sleeps) == 2 and sleeps[1] >= sleeps[0] / 2


def test_a_run_that_answers_5xx_is_not_repeated(client, fake_runpod, sleeps):
    """A 502 may come from a gateway after RunPod queued the job: repeating could train twice."""
    fake_runpod.script("run", 502, count=2)
    with pytest.raises(SubmitOutcomeUnknown, match="not repeated"):
        client.submit(request(), webhook_url=None, policy=POLICY)
    assert fake_runpod.requests["run"] == 1 and sleeps == []


def test_a_run_that_times_out_is_not_repeated_though_the_job_was_queued(fake_runpod):
    fake_runpod.latency_s = 0.5
    client = RunPodClient(
        fake_runpod.api_key, fake_runpod.endpoint_id, base_url=fake_runpod.base_url, timeout=0.1, sleep=lambda s: None
    )
    with pytest.raises(SubmitOutcomeUnknown, match="not repeated"):
        client.submit(request(), webhook_url=None, policy=POLICY)
    assert fake_runpod.requests["run"] == 1
    deadline = time.monotonic() + 5
    while not fake_runpod.jobs and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(fake_runpod.jobs) == 1  # RunPod took it: exactly one job, its id unknown to us


def test_a_run_that_could_not_connect_is_repeated(fake_runpod, sleeps):
    """No connection means RunPod saw nothing: the one failure /run may safely repeat."""
    import httpx

    attempts = []

    def refuse_then_forward(request: httpx.Request) -> httpx.Response:
        attempts.append(request.url.path)
        if len(attempts) < 3:
            raise httpx.ConnectError("connection refused", request=request)
        with httpx.Client() as real:
            return real.send(request)

    client = RunPodClient(
        fake_runpod.api_key,
        fake_runpod.endpoint_id,
        base_url=fake_runpod.base_url,
        transport=httpx.MockTransport(refuse_then_forward),
        sleep=sleeps.append,
    )
    assert client.submit(request(), webhook_url=None, policy=POLICY)
    assert len(attempts) == 3 and fake_runpod.requests["run"] == 1 and len(fake_runpod.jobs) == 1


def test_a_run_that_is_rate_limited_is_repeated(client, fake_runpod, sleeps):
    fake_runpod.script("run", 429, count=2, retry_after=0)
    assert client.submit(request(), webhook_url=None, policy=POLICY)
    assert fake_runpod.requests["run"] == 3 and len(fake_runpod.jobs) == 1


def test_api_down_opens_the_breaker_and_calls_then_fail_fast(fake_runpod):
    client = make_client(fake_runpod, breaker_fail_max=3, max_attempts=2)
    fake_runpod.down = True
    for _ in range(2):
        with pytest.raises(RunPodUnavailable):
            client.health()
    before = fake_runpod.requests["total"]
    with pytest.raises(RunPodUnavailable, match="unavailable"):
        client.status("60902e6c-08a1-426e-9cb9-9eaec90f5e2b-u1")
    assert fake_runpod.requests["total"] == before
    assert client.breaker.is_open


def test_breaker_closes_again_once_the_api_answers(fake_runpod):
    now = [0.0]
    breaker = CircuitBreaker("RunPod", fail_max=1, reset_timeout=30, clock=lambda: now[0])
    client = make_client(fake_runpod, breaker=breaker, max_attempts=1)
    fake_runpod.down = True
    with pytest.raises(RunPodUnavailable):
        client.health()
    fake_runpod.down = False
    now[0] = 31.0
    assert "jobs" in client.health()
    assert not breaker.is_open


def test_unreachable_api_is_unavailable(fake_runpod):
    client = make_client(fake_runpod, max_attempts=2)
    fake_runpod.stop()
    with pytest.raises(RunPodUnavailable):
        client.health()


def test_cancel_cancels_a_queued_job(client, fake_runpod):
    job_id = client.submit(request(), webhook_url=None, policy=POLICY)
    assert client.cancel(job_id).status == "CANCELLED"
    assert fake_runpod.job(job_id).status == "CANCELLED"


def test_retry_requeues_a_failed_job(client, fake_runpod):
    job_id = client.submit(request(), webhook_url=None, policy=POLICY)
    fake_runpod.finish(job_id, {"status": "FAILED", "error": "oom"})
    assert client.retry(job_id).status == "IN_QUEUE"
    fake_runpod.process(job_id)
    assert client.status(job_id).status == "COMPLETED"


def test_retry_of_a_completed_job_is_refused(client, fake_runpod):
    job_id = client.submit(request(), webhook_url=None, policy=POLICY)
    fake_runpod.process(job_id)
    with pytest.raises(RunPodRequestError, match="FAILED or TIMED_OUT"):
        client.retry(job_id)


def test_run_sync_returns_the_final_status(client, fake_runpod):
    fake_runpod.outcomes.append({"status": "COMPLETED", "output": {"lora_key": "k"}})
    status = client.run_sync({"x": 1})
    assert status.status == "COMPLETED" and status.output == {"lora_key": "k"}


def test_health_and_purge_queue(client, fake_runpod):
    for _ in range(3):
        client.submit(request(), webhook_url=None, policy=POLICY)
    assert client.health()["jobs"]["inQueue"] == 3
    assert client.purge_queue()["removed"] == 3
    assert client.health()["jobs"]["inQueue"] == 0


def test_base_url_comes_from_runpod_endpoint_base_url(fake_runpod, monkeypatch):
    monkeypatch.setenv("RUNPOD_ENDPOINT_BASE_URL", fake_runpod.base_url)
    client = RunPodClient(fake_runpod.api_key, fake_runpod.endpoint_id, base_url=None)
    assert "jobs" in client.health()


def test_repr_never_shows_the_key(client):
    assert "test-key" not in repr(client)


def test_the_factory_picks_runpod_when_an_endpoint_is_set(fake_runpod, local_store):
    from lora_pipeline.backends.factory import open_training_backend
    from lora_pipeline.settings import load_settings

    settings = load_settings(
        {
            "RUNPOD_API_KEY": fake_runpod.api_key,
            "RUNPOD_ENDPOINT_ID": fake_runpod.endpoint_id,
            "RUNPOD_ENDPOINT_BASE_URL": fake_runpod.base_url,
        }
    )
    chosen = open_training_backend(local_store, settings)
    assert isinstance(chosen, RunPodClient) and "jobs" in chosen.health()


def test_the_documented_rate_limit_is_absorbed_by_retries(fake_runpod, sleeps):
    fake_runpod.rate_limits = {"status": (3, 60.0)}
    job = fake_runpod.add_job({})
    client = make_client(fake_runpod, sleep=sleeps.append, max_attempts=2)
    for _ in range(3):
        client.status(job.id)
    with pytest.raises(RunPodRateLimited):
        client.status(job.id)
    assert sleeps and 0 < sleeps[0] <= 30.0


def test_a_status_body_outside_the_schema_is_a_runpod_error_naming_the_field(client, fake_runpod):
    job_id = client.submit(request(), webhook_url=None, policy=POLICY)
    fake_runpod.script("status", 200, body={"id": job_id, "status": "IN_PROGRESS", "delayTime": "soon"})
    with pytest.raises(RunPodError, match="delayTime"):
        client.status(job_id)


def test_an_unusable_answer_to_run_leaves_the_outcome_unknown(client, fake_runpod):
    fake_runpod.script("run", 200, body={"status": "IN_QUEUE"})  # no id: which job is it?
    with pytest.raises(SubmitOutcomeUnknown, match="not a status body"):
        client.submit(request(), webhook_url=None, policy=POLICY)


@pytest.mark.parametrize(
    ("failure", "idempotent", "repeated"),
    [
        (httpx.ConnectError("refused"), False, True),  # no connection: RunPod saw nothing
        (httpx.ConnectTimeout("slow"), False, True),
        (httpx.PoolTimeout("busy"), False, True),
        (httpx.ReadTimeout("no answer"), False, False),  # /run may have been queued
        (httpx.RemoteProtocolError("dropped"), False, False),
        (httpx.ReadTimeout("no answer"), True, True),  # a lookup is safe to repeat
    ],
)
def test_only_a_request_that_never_left_is_repeated_unless_idempotent(failure, idempotent, repeated):
    verdict = _transport_failure(failure, what="POST /run", idempotent=idempotent)
    if repeated:
        assert isinstance(verdict, _Transient) and verdict.api_down
    else:
        assert isinstance(verdict, SubmitOutcomeUnknown) and "not repeated" in str(verdict)


def test_an_answer_below_500_is_classified_by_its_status_code():
    def refusal(code: int, job_id: str | None = None, **kwargs):
        return _refusal(httpx.Response(code, **kwargs), "GET /x", job_id=job_id, endpoint_id="ep")

    paced = refusal(429, headers={"Retry-After": "3"})
    assert isinstance(paced, _Transient) and not paced.api_down and paced.retry_after_s == 3.0
    assert isinstance(refusal(401), RunPodAuthError) and isinstance(refusal(403), RunPodAuthError)
    assert isinstance(refusal(404, job_id="j1"), JobNotFound)
    wrong_endpoint = refusal(404)
    assert isinstance(wrong_endpoint, RunPodRequestError) and "RUNPOD_ENDPOINT_ID" in str(wrong_endpoint)
    assert isinstance(refusal(422), RunPodRequestError) and refusal(422).status_code == 422
    assert refusal(200) is None and refusal(204) is None
