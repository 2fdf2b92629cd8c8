"""A poll pass through the real client and the API double: the sensor's situations."""

from __future__ import annotations

from lora_pipeline.backends.poll import poll_jobs
from lora_pipeline.backends.runpod_client import RunPodClient


def test_a_job_that_finished_unwatched_and_expired_is_reported_not_found(client, fake_runpod):
    watched = fake_runpod.add_job({})
    expired = fake_runpod.add_job({})
    fake_runpod.process(expired.id)
    fake_runpod.advance(31 * 60)
    result = poll_jobs(client, [watched.id, expired.id], deadline_s=30)
    assert result.statuses[watched.id].status == "IN_QUEUE"
    assert result.not_found == [expired.id]


def test_results_are_keyed_by_the_id_the_caller_holds(client, fake_runpod):
    job = fake_runpod.add_job({})
    fake_runpod.process(job.id)
    result = poll_jobs(client, [job.base], deadline_s=30)
    assert result.statuses[job.base].id == job.id


def test_api_down_makes_the_pass_stop_early_and_lose_nothing(fake_runpod):
    jobs = [fake_runpod.add_job({}).id for _ in range(200)]
    client = RunPodClient(
        fake_runpod.api_key,
        fake_runpod.endpoint_id,
        base_url=fake_runpod.base_url,
        max_attempts=2,
        breaker_fail_max=3,
        sleep=lambda s: None,
    )
    fake_runpod.down = True
    result = poll_jobs(client, jobs, max_workers=8, deadline_s=30)
    assert result.unavailable
    assert sorted(result.unfinished) == sorted(jobs) and not result.statuses
    assert fake_runpod.requests["status"] < 50  # the breaker, not 200 × retries


def test_a_failed_attempt_then_a_completed_retry_is_seen_as_completed(client, fake_runpod):
    job = fake_runpod.add_job({})
    fake_runpod.finish(job.id, {"status": "FAILED", "error": "oom"})
    assert poll_jobs(client, [job.id], deadline_s=30).statuses[job.id].status == "FAILED"
    client.retry(job.id)
    fake_runpod.process(job.id, {"status": "COMPLETED", "output": {"lora_key": "k"}})
    assert poll_jobs(client, [job.id], deadline_s=30).statuses[job.id].status == "COMPLETED"
