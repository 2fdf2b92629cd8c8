"""A poll pass: concurrent, bounded in time, every job accounted for."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest

from lora_pipeline.backends.base import JobNotFound, RunPodRateLimited, RunPodUnavailable
from lora_pipeline.backends.poll import PollResult, _file_answer, _lookup_worker, poll_jobs
from lora_pipeline.contracts.job_status import JobStatus


class ScriptedBackend:
    """status() answers from a script: a status string, an exception, or an Event to wait on."""

    def __init__(self, script: dict[str, object]) -> None:
        self.script = script
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def status(self, job_id: str) -> JobStatus:
        with self.lock:
            self.calls.append(job_id)
        outcome = self.script[job_id]
        if isinstance(outcome, threading.Event):
            outcome.wait(10)
            return JobStatus(id=job_id, status="IN_PROGRESS")
        if isinstance(outcome, Exception):
            raise outcome
        return JobStatus(id=job_id, status=str(outcome))


def test_every_job_lands_in_exactly_one_group():
    backend = ScriptedBackend(
        {"a": "COMPLETED", "b": "IN_PROGRESS", "c": JobNotFound("c"), "d": ValueError("bad body")}
    )
    result = poll_jobs(backend, ["a", "b", "c", "d"], max_workers=4, deadline_s=10)
    assert set(result.statuses) == {"a", "b"}
    assert result.not_found == ["c"]
    assert set(result.errors) == {"d"} and "bad body" in result.errors["d"]
    assert result.unfinished == []
    assert set(result.terminal) == {"a"}


def test_jobs_still_waiting_at_the_deadline_are_left_for_the_next_tick():
    release = threading.Event()
    backend = ScriptedBackend({"fast": "COMPLETED", "slow": release})
    try:
        result = poll_jobs(backend, ["fast", "slow"], max_workers=2, deadline_s=0.3)
    finally:
        release.set()
    assert set(result.statuses) == {"fast"}
    assert result.unfinished == ["slow"]


def test_an_unavailable_backend_stops_the_pass_and_loses_no_job():
    script = {f"j{i}": RunPodUnavailable("breaker open") for i in range(50)}
    backend = ScriptedBackend(script)
    result = poll_jobs(backend, list(script), max_workers=1, deadline_s=10)
    assert result.unavailable and "breaker open" in result.unavailable_reason
    assert len(backend.calls) == 1
    assert sorted(result.unfinished) == sorted(script)


def test_duplicate_ids_are_polled_once():
    backend = ScriptedBackend({"a": "COMPLETED"})
    poll_jobs(backend, ["a", "a", "a"], deadline_s=10)
    assert backend.calls == ["a"]


def test_lookups_run_concurrently():
    barrier = threading.Barrier(8, timeout=5)

    class BarrierBackend:
        def status(self, job_id: str) -> JobStatus:
            barrier.wait()  # only passes if 8 lookups are in flight at once
            return JobStatus(id=job_id, status="IN_QUEUE")

    result = poll_jobs(BarrierBackend(), [f"j{i}" for i in range(8)], max_workers=8, deadline_s=10)
    assert len(result.statuses) == 8


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="max_workers"):
        poll_jobs(ScriptedBackend({}), ["a"], max_workers=0)


def test_a_job_still_rate_limited_is_left_for_the_next_tick():
    from lora_pipeline.backends.runpod_client import RunPodRateLimited

    backend = ScriptedBackend({"a": RunPodRateLimited("429"), "b": "COMPLETED"})
    result = poll_jobs(backend, ["a", "b"], deadline_s=10)
    assert result.unfinished == ["a"] and not result.errors


def test_pacing_leaves_what_does_not_fit_before_the_deadline():
    backend = ScriptedBackend({f"j{i}": "IN_QUEUE" for i in range(100)})
    result = poll_jobs(backend, list(backend.script), max_workers=4, deadline_s=0.5, max_rate_per_s=20)
    assert 0 < len(result.statuses) < 100
    assert len(result.statuses) + len(result.unfinished) == 100


def _finished(outcome: JobStatus | Exception | None) -> Future[JobStatus | None]:
    future: Future[JobStatus | None] = Future()
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
    return future


def test_each_kind_of_answer_is_filed_in_its_group():
    result, stop = PollResult(), threading.Event()
    answers = {
        "done": JobStatus(id="done", status="COMPLETED"),
        "gone": JobNotFound("gone"),
        "paced": RunPodRateLimited("429"),
        "skipped": None,
        "broken": ValueError("bad body"),
    }
    for job_id, outcome in answers.items():
        _file_answer(result, job_id, _finished(outcome), stop)
    assert set(result.statuses) == {"done"} and result.not_found == ["gone"]
    assert result.unfinished == ["paced", "skipped"] and set(result.errors) == {"broken"}
    assert not result.unavailable and not stop.is_set()
    _file_answer(result, "down", _finished(RunPodUnavailable("breaker open")), stop)
    _file_answer(result, "down2", _finished(RunPodUnavailable("later")), stop)
    assert result.unavailable and stop.is_set() and result.unavailable_reason == "breaker open"
    assert result.unfinished[-2:] == ["down", "down2"]


def test_the_worker_that_meets_an_unavailable_backend_stops_the_pass_itself():
    stop = threading.Event()
    backend = ScriptedBackend({"a": RunPodUnavailable("breaker open"), "b": "COMPLETED"})
    lookup = _lookup_worker(backend, stop, None, deadline=float("inf"))
    with pytest.raises(RunPodUnavailable):
        lookup("a")
    assert stop.is_set()
    assert lookup("b") is None and backend.calls == ["a"]  # once stopped, no further call is made
