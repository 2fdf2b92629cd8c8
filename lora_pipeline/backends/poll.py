"""One bounded, concurrent status pass over many jobs: the core of the polling sensor.

A Dagster sensor tick is cut at 60 s. Polling 1,000 unfinished jobs one after the
other at ~100 ms a call would take 100 s, so the pass runs the lookups on a thread
pool and stops waiting at ``deadline_s``: whatever has not answered by then is
returned as ``unfinished`` for the next tick (the sensor's cursor), never lost.
When the backend reports itself unavailable (the circuit breaker is open) the pass
stops scheduling new lookups at once, so a dead API costs one tick, not 1,000
timeouts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from lora_pipeline.backends.base import JobNotFound, RunPodRateLimited, RunPodUnavailable, TrainingBackend
from lora_pipeline.contracts.job_status import JobStatus


@dataclass
class PollResult:
    """What one pass learned. Every requested job id is in exactly one of the four groups."""

    statuses: dict[str, JobStatus] = field(default_factory=dict)
    not_found: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    unfinished: list[str] = field(default_factory=list)
    unavailable: bool = False
    unavailable_reason: str | None = None
    elapsed_s: float = 0.0

    @property
    def terminal(self) -> dict[str, JobStatus]:
        """Jobs whose status is final (COMPLETED, FAILED, CANCELLED, TIMED_OUT)."""
        return {job_id: s for job_id, s in self.statuses.items() if s.is_terminal}

    def summary(self) -> dict[str, int | float | bool]:
        """Counts for logs and sensor metadata."""
        return {
            "polled": len(self.statuses),
            "terminal": len(self.terminal),
            "not_found": len(self.not_found),
            "errors": len(self.errors),
            "unfinished": len(self.unfinished),
            "unavailable": self.unavailable,
            "elapsed_s": round(self.elapsed_s, 3),
        }


def poll_jobs(
    backend: TrainingBackend,
    job_ids: Iterable[str],
    *,
    max_workers: int = 32,
    deadline_s: float = 40.0,
    max_rate_per_s: float | None = None,
) -> PollResult:
    """Look up every job's status concurrently, within ``deadline_s`` seconds.

    Keys of the result are the ids as passed in (the registry's), whatever id the
    backend answers with. Duplicated ids are polled once. ``max_rate_per_s`` paces
    the lookups (RunPod allows 2000 /status calls per 10 s); a job still rate
    limited after the client's retries is left ``unfinished``, not an error.
    """
    _check_limits(max_workers, deadline_s, max_rate_per_s)
    ids = list(dict.fromkeys(job_ids))
    result = PollResult()
    started = time.monotonic()
    if not ids:
        return result
    stop = threading.Event()
    pace = _Pacer(max_rate_per_s, started) if max_rate_per_s else None
    deadline = started + deadline_s
    lookup = _lookup_worker(backend, stop, pace, deadline)
    pool = ThreadPoolExecutor(max_workers=min(max_workers, len(ids)), thread_name_prefix="poll")
    try:
        futures: dict[Future[JobStatus | None], str] = {pool.submit(lookup, j): j for j in ids}
        pending = _gather_answers(futures, deadline, result, stop)
        stop.set()  # lookups queued but not yet started return at once: the pool drains
        result.unfinished.extend(futures[f] for f in pending)
        order = {job_id: i for i, job_id in enumerate(ids)}
        result.unfinished.sort(key=order.__getitem__)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # never block the sensor tick on a slow lookup
    result.elapsed_s = time.monotonic() - started
    return result


def _check_limits(max_workers: int, deadline_s: float, max_rate_per_s: float | None) -> None:
    """Refuse limits that would make a pass hang or do nothing, before any thread starts."""
    if max_workers < 1:
        raise ValueError(f"max_workers must be at least 1, got {max_workers}")
    if deadline_s <= 0:
        raise ValueError(f"deadline_s must be positive, got {deadline_s}")
    if max_rate_per_s is not None and max_rate_per_s <= 0:
        raise ValueError(f"max_rate_per_s must be positive, got {max_rate_per_s}")


def _lookup_worker(
    backend: TrainingBackend, stop: threading.Event, pace: _Pacer | None, deadline: float
) -> Callable[[str], JobStatus | None]:
    """The task one pool thread runs per job: its status, or None to leave the job for the next tick.

    The worker, not the caller, sets ``stop`` when the backend is unavailable: the
    caller may be busy filing other answers, and every lookup that starts meanwhile
    would wait out a timeout against a dead API.
    """

    def lookup(job_id: str) -> JobStatus | None:
        if pace is not None and not pace.wait_turn(stop, deadline):
            return None
        if stop.is_set():
            return None  # the API is down or time is up: leave it for the next tick
        try:
            return backend.status(job_id)
        except RunPodUnavailable:
            stop.set()  # here, in the worker: no further lookup starts, however busy the caller is
            raise

    return lookup


def _gather_answers(
    futures: dict[Future[JobStatus | None], str],
    deadline: float,
    result: PollResult,
    stop: threading.Event,
) -> set[Future[JobStatus | None]]:
    """File each lookup as it answers until all have or the deadline passes; returns those still out.

    Waits on FIRST_COMPLETED rather than in submission order, so one slow job
    cannot hold back the filing of the others before the deadline.
    """
    pending = set(futures)
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        done, pending = wait(pending, timeout=remaining, return_when=FIRST_COMPLETED)
        for future in done:
            _file_answer(result, futures[future], future, stop)
    return pending


def _file_answer(result: PollResult, job_id: str, future: Future[JobStatus | None], stop: threading.Event) -> None:
    """Put one finished lookup into exactly one group of ``result``.

    Rate limiting and an unavailable backend are the API's state, not the job's:
    those jobs stay ``unfinished`` for the next tick rather than counting as errors.
    """
    try:
        status = future.result()
    except JobNotFound:
        result.not_found.append(job_id)
    except RunPodRateLimited:
        result.unfinished.append(job_id)
    except RunPodUnavailable as exc:
        result.unavailable = True
        stop.set()
        result.unfinished.append(job_id)
        result.unavailable_reason = result.unavailable_reason or str(exc)
    except Exception as exc:  # noqa: BLE001 - one bad job must not sink the pass
        result.errors[job_id] = f"{type(exc).__name__}: {exc}"
    else:
        if status is None:
            result.unfinished.append(job_id)
        else:
            result.statuses[job_id] = status


class _Pacer:
    """Hands out evenly spaced start times: at most ``rate`` lookups per second."""

    def __init__(self, rate: float, start: float) -> None:
        self.interval = 1.0 / rate
        self.next_slot = start
        self.lock = threading.Lock()

    def wait_turn(self, stop: threading.Event, deadline: float) -> bool:
        """Sleep until this caller's slot; False if the pass stops or the slot is past the deadline."""
        with self.lock:
            slot = max(self.next_slot, time.monotonic())
            self.next_slot = slot + self.interval
        if slot >= deadline:
            stop.set()
            return False
        delay = slot - time.monotonic()
        return not (delay > 0 and stop.wait(delay))
