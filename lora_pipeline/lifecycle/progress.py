"""Training progress: a running job's heartbeats become log lines and the version's live ``progress``.

The worker sends ``{"phase", "step", "total", "loss", "at"}`` as RunPod progress updates;
``/status`` answers IN_PROGRESS with the last one as ``output``
(``contracts.job_status.progress_of`` reads it). Two users, both Dagster-free here:

* ``ProgressWatch``: the training op's wait (``submit.wait_for_job``) logs each new
  update once and reports a job whose updates stopped as stalled.
* ``record_progress``: the job-polling sensor records the last update on the version
  (a ``JobProgressReport`` through the merge; a write only when it changed) and the
  stalled verdict, and with ``LORA_CANCEL_STALLED`` cancels a stalled job and records the
  outcome the backend reports.

A job is stalled when it is IN_PROGRESS and its last heartbeat (the worker's ``at``;
before any update, its start) is older than ``LORA_STALL_AFTER_S``. A bad update (a
non-numeric loss, a negative step) is ignored with a log line; it never stops a poll.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from lora_pipeline.backends.base import TrainingBackend
from lora_pipeline.contracts.job_status import (
    InvalidProgress,
    JobStatus,
    TrainingProgress,
    job_report_from_status,
    progress_of,
    progress_report,
)
from lora_pipeline.registry.evidence import Evidence, JobProgressReport, JobReport
from lora_pipeline.registry.merge import find_version_by_job
from lora_pipeline.registry.models import JobProgress, Version, epoch_ms, from_epoch_ms
from lora_pipeline.registry_store.documents import RegistryStore

MAX_PROGRESS_STYLES_PER_TICK = 100  # registry documents read (and at most written) per sensor tick
MAX_CANCELS_PER_TICK = 20


def stall_reason(heartbeat: datetime, now: datetime, stall_after_s: float) -> str | None:
    """Why a job whose last heartbeat was ``heartbeat`` is stalled at ``now``, or None.

    The text depends only on the heartbeat and the limit, so the verdict recorded on one
    tick is the same on the next (no rewrite)."""
    if (now - heartbeat).total_seconds() <= stall_after_s:
        return None
    return (
        f"stalled: no progress update since {heartbeat.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ} "
        f"(LORA_STALL_AFTER_S={stall_after_s:g})"
    )


@dataclass
class ProgressWatch:
    """One job's progress as a waiting op sees it: each new update logged once, a stall once.

    Time is the op's own monotonic clock (when an update was first seen), so a worker's
    clock skew cannot make a job look stalled."""

    stall_after_s: float | None = None
    clock: Callable[[], float] = time.monotonic
    last: TrainingProgress | None = None
    changed_at: float | None = None  # when the job was first seen running, or its last new update
    stalled: bool = False

    def observe(self, status: JobStatus, log: Callable[[str], None], warn: Callable[[str], None]) -> str | None:
        """Log what is new in ``status``; the stall reason the first time the job is stalled."""
        if status.status != "IN_PROGRESS":
            return None
        now = self.clock()
        if self.changed_at is None:
            self.changed_at = now
        try:
            progress = progress_of(status)
        except InvalidProgress as exc:
            warn(f"{exc}; update ignored")
            progress = None
        if progress is not None and (self.last is None or progress.key() != self.last.key()):
            self.last, self.changed_at, self.stalled = progress, now, False
            log(f"job {status.id}: {progress.describe()}")
        if self.stall_after_s is None or self.stalled or now - self.changed_at <= self.stall_after_s:
            return None
        self.stalled = True
        return (
            f"job {status.id} stalled: no new progress update for {now - self.changed_at:.0f} s "
            f"(LORA_STALL_AFTER_S={self.stall_after_s:g})"
        )


@dataclass
class ProgressTick:
    """What ``record_progress`` did on one sensor tick: the lines to log and the cancellations."""

    recorded: list[str] = field(default_factory=list)  # job ids whose version was rewritten
    stalled: list[str] = field(default_factory=list)  # warnings: one per job newly found stalled
    problems: list[str] = field(default_factory=list)  # bad updates, failed cancels
    cancelled: dict[str, JobStatus] = field(default_factory=dict)  # job id → the backend's answer


def record_progress(
    registry: RegistryStore,
    backend: TrainingBackend,
    running: Mapping[str, tuple[str, JobStatus]],
    *,
    now: datetime,
    stall_after_s: float,
    cancel_stalled: bool = False,
    max_styles: int = MAX_PROGRESS_STYLES_PER_TICK,
    max_cancels: int = MAX_CANCELS_PER_TICK,
) -> ProgressTick:
    """Record the progress of IN_PROGRESS jobs (job id → (style, status)) on their versions.

    One document read per style (at most ``max_styles``), and a conditional write only
    when a version's progress or stalled verdict changed. A stalled job is flagged once;
    with ``cancel_stalled`` the backend's cancel is called (while the job still runs)
    and its answer recorded as a job report.
    """
    tick = ProgressTick()
    by_style: dict[str, dict[str, JobStatus]] = {}
    for job_id, (style, status) in running.items():
        if status.status == "IN_PROGRESS":
            by_style.setdefault(style, {})[job_id] = status
    for style in sorted(by_style)[:max_styles]:
        document, _ = registry.read(style)
        evidence: list[Evidence] = []
        for job_id, status in sorted(by_style[style].items()):
            version = find_version_by_job(document, job_id)
            if version is None:
                continue
            report, reason = _job_evidence(version, status, now, stall_after_s, tick)
            if report is not None:
                evidence.append(report)
            if reason is not None and cancel_stalled and len(tick.cancelled) < max_cancels:
                evidence.extend(_cancel(backend, status, reason, now, tick))
        if evidence and registry.apply(style, evidence).changed:
            tick.recorded.extend(sorted({e.job_id for e in evidence if isinstance(e, (JobProgressReport, JobReport))}))
    return tick


def _job_evidence(
    version: Version, status: JobStatus, now: datetime, stall_after_s: float, tick: ProgressTick
) -> tuple[JobProgressReport | None, str | None]:
    """The evidence of this job's update and verdict (None when the version already says it),
    and the stall reason when it is stalled."""
    current = version.progress
    try:
        progress = progress_of(status)
    except InvalidProgress as exc:
        tick.problems.append(f"{exc}; update ignored")
        progress = None
    latest: JobProgressReport | None = None
    if progress is not None:
        at = progress.at
        if at is None:  # an update without a time: its heartbeat is when it was first seen
            seen = current is not None and (current.step, current.total, current.loss, current.phase) == (
                progress.step,
                progress.total,
                progress.loss,
                progress.phase,
            )
            at = from_epoch_ms(current.heartbeat_at) if seen and current is not None else now
        latest = progress_report(status, replace(progress, at=at), now)
    if current is not None and (latest is None or current.heartbeat_at > epoch_ms(latest.at)):
        latest = JobProgressReport(
            job_id=status.id,
            at=from_epoch_ms(current.heartbeat_at),
            step=current.step,
            total=current.total,
            loss=current.loss,
            phase=current.phase,
        )
    bare = latest is None
    if latest is None:  # no update yet: its heartbeat is its start, as far as the registry knows
        started = _started(version, status)
        if started is None:
            return None, None
        latest = JobProgressReport(job_id=status.id, at=started)
    reason = stall_reason(latest.at, now, stall_after_s)
    if reason is None and bare:
        return None, None
    latest = replace(latest, stalled=reason)
    if reason is not None and (current is None or current.stalled != reason):
        tick.stalled.append(f"job {status.id} ({version.name}) {reason}")
    recorded = JobProgress(epoch_ms(latest.at), latest.step, latest.total, latest.loss, latest.phase, latest.stalled)
    return (None if recorded == current else latest), reason


def _cancel(
    backend: TrainingBackend, status: JobStatus, reason: str, now: datetime, tick: ProgressTick
) -> list[Evidence]:
    """Cancel a stalled job; its answer, as the backend reports it, becomes a job report."""
    try:
        answer = backend.cancel(status.id)
    except Exception as exc:  # noqa: BLE001 - a failed cancel is tried again on the next tick
        tick.problems.append(f"job {status.id}: cancelling the stalled job failed: {type(exc).__name__}: {exc}")
        return []
    tick.cancelled[status.id] = answer
    report = job_report_from_status(answer, at=now, source="poll")
    if answer.status == "CANCELLED" and not answer.error:
        report = replace(report, error=f"cancelled by the pipeline: {reason}")
    return [report]


def _started(version: Version, status: JobStatus) -> datetime | None:
    """When the job started running, as far as known: submitted + RunPod's queue delay."""
    if version.start_time is None:
        return None
    return from_epoch_ms(version.start_time) + timedelta(milliseconds=status.delayTime or 0)


def running_statuses(statuses: Mapping[str, JobStatus], styles: Mapping[str, str]) -> dict[str, tuple[str, JobStatus]]:
    """The IN_PROGRESS jobs of a poll, with their styles (job id → (style, status))."""
    return {
        job_id: (styles[job_id], s) for job_id, s in statuses.items() if s.status == "IN_PROGRESS" and job_id in styles
    }
