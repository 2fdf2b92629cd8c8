"""The RunPod double itself keeps the documented contract the other tests rely on."""

from __future__ import annotations

import time

import httpx
import pytest

from lora_pipeline_tests.fakes.runpod_api import FakeRunPod


def api(fake: FakeRunPod, method: str, path: str, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {fake.api_key}"}
    return httpx.request(method, f"{fake.base_url}/{fake.endpoint_id}{path}", headers=headers, timeout=10, **kwargs)


def wait_for(fake: FakeRunPod, job_id: str, status: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while fake.job(job_id).status != status:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{job_id} is {fake.job(job_id).status}, not {status}")
        time.sleep(0.01)


def test_run_answers_an_id_with_a_suffix_and_in_queue():
    with FakeRunPod() as fake:
        body = api(fake, "POST", "/run", json={"input": {"a": 1}}).json()
    assert body["status"] == "IN_QUEUE" and body["id"].endswith("-u1")


def test_run_without_an_input_object_is_400():
    with FakeRunPod() as fake:
        assert api(fake, "POST", "/run", json={"prompt": "x"}).status_code == 400


def test_auto_mode_moves_a_job_through_its_life():
    with FakeRunPod(auto=True, execution_s=0.2) as fake:
        job_id = api(fake, "POST", "/run", json={"input": {}}).json()["id"]
        wait_for(fake, job_id, "IN_PROGRESS")
        wait_for(fake, job_id, "COMPLETED")
        body = api(fake, "GET", f"/status/{job_id}").json()
    assert body["executionTime"] >= 200 and body["output"] == {"ok": True}


def test_a_job_over_its_execution_timeout_ends_timed_out():
    with FakeRunPod(auto=True, execution_s=5.0) as fake:
        job_id = api(fake, "POST", "/run", json={"input": {}, "policy": {"executionTimeout": 100}}).json()["id"]
        wait_for(fake, job_id, "TIMED_OUT")


def test_a_runsync_result_expires_after_a_minute():
    with FakeRunPod() as fake:
        job_id = api(fake, "POST", "/runsync", json={"input": {}}).json()["id"]
        fake.advance(61)
        response = api(fake, "GET", f"/status/{job_id}")
    assert response.status_code == 404 and response.json() == {"error": "redis err: client is nil"}


@pytest.mark.parametrize("lookup, suffixed, bare", [("either", 200, 200), ("full", 200, 404), ("base", 404, 200)])
def test_status_accepts_the_id_forms_it_is_configured_for(lookup, suffixed, bare):
    with FakeRunPod(status_lookup=lookup) as fake:
        job = fake.add_job({})
        assert api(fake, "GET", f"/status/{job.id}").status_code == suffixed
        assert api(fake, "GET", f"/status/{job.base}").status_code == bare


def test_a_handler_returning_an_error_fails_the_job():
    with FakeRunPod(handler=lambda job: {"error": "bad input"}) as fake:
        job = fake.process(fake.add_job({}).id)
    assert (job.status, job.error) == ("FAILED", "bad input")


def test_scripted_429_carries_retry_after():
    with FakeRunPod() as fake:
        fake.script("health", 429, retry_after=2)
        response = api(fake, "GET", "/health")
        assert (response.status_code, response.headers["Retry-After"]) == (429, "2")
        assert api(fake, "GET", "/health").status_code == 200


def test_an_unreachable_webhook_is_tried_three_times_then_dropped():
    with FakeRunPod(webhook_retry_delay_s=0.01) as fake:
        job = fake.add_job({}, webhook="http://127.0.0.1:9/webhooks/runpod")
        fake.finish(job.id, {"status": "COMPLETED", "output": {}})
        attempts = fake.wait_for_webhooks(3)
        time.sleep(0.1)
        assert len(fake.webhook_attempts) == 3
    assert [(a.attempt, a.status_code) for a in attempts] == [(1, None), (2, None), (3, None)]
