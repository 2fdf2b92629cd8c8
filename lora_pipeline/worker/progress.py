"""Progress updates from a running job: RunPod's ``progress_update``, or the local runner's job state.

While a job runs, ``/status`` answers ``IN_PROGRESS`` with the handler's last progress
update as ``output`` (RunPod's documented behaviour for
``runpod.serverless.progress_update(job, progress)``). The handler reports
``{"phase", "step", "total", "loss", "at"}``; the orchestrator turns these into run log
lines and the version's live ``progress`` (``contracts.job_status.progress_of``).

No torch here: the local backend imports this module to record updates.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from lora_pipeline.settings import get_settings

log = logging.getLogger("lora_pipeline.worker")

Progress = Callable[[dict[str, Any]], None]


def under_runpod() -> bool:
    """True inside a deployed RunPod worker (the SDK's job-result URL is configured)."""
    return get_settings().under_runpod


PROGRESS_MIN_INTERVAL_S = 5.0  # at most one intermediate training update per 5 s (phases and the last always)
ProgressSink = Callable[[dict[str, Any], dict[str, Any]], None]  # (job, update), like progress_update
_progress_sink: ContextVar[ProgressSink | None] = ContextVar("lora_pipeline_progress_sink", default=None)


@contextlib.contextmanager
def progress_sink(sink: ProgressSink) -> Iterator[None]:
    """Send the handler's progress updates to ``sink(job, update)`` instead of RunPod's SDK:
    the local backend's runner records them in its job state, so its ``/status`` answers
    IN_PROGRESS with the update as ``output``, as RunPod's does."""
    token = _progress_sink.set(sink)
    try:
        yield
    finally:
        _progress_sink.reset(token)


def send_progress(job: dict[str, Any], update: dict[str, Any]) -> None:
    """One progress update: to the sink the local runner set, else RunPod's SDK when deployed."""
    sink = _progress_sink.get()
    if sink is not None:
        sink(job, update)
    elif under_runpod():
        import runpod

        runpod.serverless.progress_update(job, update)


def runpod_progress(
    job: dict[str, Any],
    *,
    min_interval_s: float = PROGRESS_MIN_INTERVAL_S,
    clock: Callable[[], float] = time.monotonic,
) -> Progress:
    """Progress updates (stamped ``at``, the worker's UTC time) through ``send_progress``; a log
    line for each. Intermediate training steps are throttled to one per ``min_interval_s``;
    phase changes and the last step always go out."""
    last_sent: list[float] = []

    def report(update: dict[str, Any]) -> None:
        stamped = {**update, "at": datetime.now(UTC).isoformat()}
        print(json.dumps({"progress": stamped, "job_id": job.get("id")}), file=sys.stderr, flush=True)
        now = clock()
        if _intermediate(update) and last_sent and now - last_sent[-1] < min_interval_s:
            return
        last_sent[:] = [now]
        try:
            send_progress(job, stamped)
        except Exception:  # noqa: BLE001 - progress is best effort, never fails the job
            log.warning("progress update failed", exc_info=True)

    return report


def _intermediate(update: dict[str, Any]) -> bool:
    """A training step that is not the last one (the kind of update worth throttling)."""
    step, total = update.get("step"), update.get("total")
    return update.get("phase") == "training" and isinstance(step, int) and isinstance(total, int) and step < total
