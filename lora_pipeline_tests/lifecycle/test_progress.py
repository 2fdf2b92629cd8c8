"""Training progress: parsing a running job's update, the waiting op's log lines, the sensor's record
on the version, stalled jobs (flagged; cancelled only with the setting), and bad updates ignored."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from lora_pipeline.contracts.job_status import InvalidProgress, JobStatus, progress_of
from lora_pipeline.lifecycle.progress import record_progress, stall_reason
from lora_pipeline.lifecycle.submit import wait_for_job
from lora_pipeline.registry.evidence import Submission
from lora_pipeline.registry.models import VersionStatus
from lora_pipeline.registry_store.documents import RegistryStore

STYLE = "geo"
JOB = "11111111-2222-3333-4444-555555555555-u1"
T0 = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)


def running(output: dict[str, Any] | None = None, job_id: str = JOB, delay_ms: int | None = None) -> JobStatus:
    return JobStatus(id=job_id, status="IN_PROGRESS", output=output, delayTime=delay_ms)


def update(step: int, *, at: datetime | None = T0, loss: Any = 0.25, total: int = 100) -> dict[str, Any]:
    out: dict[str, Any] = {"phase": "training", "step": step, "total": total, "loss": loss}
    if at is not None:
        out["at"] = at.isoformat()
    return out


class Backend:
    """A backend that answers the scripted statuses in turn (the last one repeats)."""

    def __init__(self, *statuses: JobStatus) -> None:
        self.statuses = list(statuses)
        self.cancelled: list[str] = []

    def submit(self, request: Any, *, webhook_url: str | None, policy: Any) -> str:
        raise NotImplementedError

    def status(self, job_id: str) -> JobStatus:
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    def cancel(self, job_id: str) -> JobStatus:
        self.cancelled.append(job_id)
        return JobStatus(id=job_id, status="CANCELLED")


# -- the status body ---------------------------------------------------------------------------
def test_an_in_progress_output_is_read_as_progress() -> None:
    progress = progress_of(running(update(40)))
    assert progress is not None
    assert (progress.step, progress.total, progress.loss, progress.phase, progress.at) == (
        40,
        100,
        0.25,
        "training",
        T0,
    )
    assert progress.describe() == "step 40/100, loss 0.25 (training)"


def test_missing_fields_are_fine_and_no_output_is_no_progress() -> None:
    progress = progress_of(running({"phase": "saving"}))
    assert progress is not None and progress.step is None and progress.describe() == "saving"
    assert progress_of(running(None)) is None
    assert progress_of(JobStatus(id=JOB, status="COMPLETED", output={"step": 3})) is None  # a result, not progress


@pytest.mark.parametrize(
    "output, problem",
    [
        ({"step": 3, "loss": "low"}, "loss 'low' is not a finite number"),
        ({"step": -1}, "step -1 is not a whole number"),
        ({"step": 1, "at": "yesterday"}, "time 'yesterday' is not an ISO 8601 time"),
        ({"something": "else"}, "none of step, total, loss, phase, at"),
    ],
)
def test_a_bad_update_is_refused_naming_the_field(output: dict[str, Any], problem: str) -> None:
    with pytest.raises(InvalidProgress, match=problem):
        progress_of(running(output))


# -- the waiting op ----------------------------------------------------------------------------
def test_wait_for_job_logs_a_line_per_new_progress_update() -> None:
    backend = Backend(
        running(update(10)),
        running(update(10)),
        running(update(20, loss=0.125)),
        running({"loss": "nan?"}),
        JobStatus(id=JOB, status="COMPLETED", output={"ok": True}),
    )
    lines: list[str] = []
    warnings: list[str] = []
    final = wait_for_job(backend, JOB, timeout_s=60, sleep=lambda _s: None, log=lines.append, warn=warnings.append)
    assert final.status == "COMPLETED"
    assert lines == [f"job {JOB}: step 10/100, loss 0.25 (training)", f"job {JOB}: step 20/100, loss 0.125 (training)"]
    assert len(warnings) == 1 and "loss 'nan?' is not a finite number; update ignored" in warnings[0]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.parametrize("cancel", [False, True])
def test_wait_for_job_reports_a_stalled_job_and_cancels_it_only_with_the_setting(cancel: bool) -> None:
    backend = Backend(running(update(10)))  # the same update for ever
    clock = Clock()
    warnings: list[str] = []
    if cancel:
        final = wait_for_job(
            backend,
            JOB,
            timeout_s=1000,
            poll_interval_s=50,
            sleep=clock.sleep,
            clock=clock,
            warn=warnings.append,
            stall_after_s=120,
            cancel_stalled=True,
        )
        assert final.status == "CANCELLED" and backend.cancelled == [JOB]
    else:
        with pytest.raises(TimeoutError):
            wait_for_job(
                backend,
                JOB,
                timeout_s=1000,
                poll_interval_s=50,
                sleep=clock.sleep,
                clock=clock,
                warn=warnings.append,
                stall_after_s=120,
            )
        assert backend.cancelled == []
    assert sum("stalled: no new progress update for 150 s (LORA_STALL_AFTER_S=120)" in w for w in warnings) == 1


# -- the sensor's record on the version ----------------------------------------------------------
@pytest.fixture
def registry(local_store) -> RegistryStore:
    registry = RegistryStore(local_store)
    registry.apply(
        STYLE,
        [Submission(style=STYLE, version="V1", request_id="r1", job_id=JOB, dataset_hash="ab" * 8, params={}, at=T0)],
    )
    return registry


def record(
    registry: RegistryStore, status: JobStatus, now: datetime, *, cancel: bool = False, backend: Backend | None = None
):
    return record_progress(
        registry, backend or Backend(status), {JOB: (STYLE, status)}, now=now, stall_after_s=1800, cancel_stalled=cancel
    )


def test_the_sensor_records_progress_on_the_version_once(registry: RegistryStore) -> None:
    status = running(update(40, at=T0 + timedelta(minutes=5)))
    tick = record(registry, status, T0 + timedelta(minutes=6))
    assert tick.recorded == [JOB] and not tick.stalled and not tick.problems
    document, etag = registry.read(STYLE)
    version = document.version("V1")
    assert version is not None and version.status == VersionStatus.training
    assert version.to_dict()["progress"] == {
        "heartbeatAt": int((T0 + timedelta(minutes=5)).timestamp() * 1000),
        "stalled": False,
        "step": 40,
        "total": 100,
        "loss": 0.25,
        "phase": "training",
    }
    again = record(registry, status, T0 + timedelta(minutes=7))  # the same update: no write
    assert again.recorded == [] and registry.read(STYLE)[1] == etag


def test_an_update_without_a_time_keeps_its_first_heartbeat(registry: RegistryStore) -> None:
    status = running(update(40, at=None))
    assert record(registry, status, T0 + timedelta(minutes=1)).recorded == [JOB]
    etag = registry.read(STYLE)[1]
    assert record(registry, status, T0 + timedelta(minutes=2)).recorded == []
    assert registry.read(STYLE)[1] == etag


def test_a_newer_update_replaces_the_recorded_one(registry: RegistryStore) -> None:
    record(registry, running(update(40, at=T0 + timedelta(minutes=5))), T0 + timedelta(minutes=6))
    record(registry, running(update(60, at=T0 + timedelta(minutes=9))), T0 + timedelta(minutes=10))
    record(registry, running(update(40, at=T0 + timedelta(minutes=5))), T0 + timedelta(minutes=11))  # a stale answer
    progress = registry.read(STYLE)[0].version("V1").progress
    assert progress is not None and progress.step == 60


def test_a_job_without_a_heartbeat_for_too_long_is_flagged_stalled_but_not_cancelled(registry: RegistryStore) -> None:
    status = running(update(40, at=T0))
    backend = Backend(status)
    tick = record(registry, status, T0 + timedelta(seconds=1801), backend=backend)
    assert len(tick.stalled) == 1 and "stalled: no progress update since 2026-11-29T10:00:00Z" in tick.stalled[0]
    assert backend.cancelled == [] and not tick.cancelled
    version = registry.read(STYLE)[0].version("V1")
    assert version.progress.to_dict()["stalled"] is True and version.status == VersionStatus.training
    etag = registry.read(STYLE)[1]
    later = record(registry, status, T0 + timedelta(hours=2), backend=backend)  # still stalled: said once
    assert later.stalled == [] and later.recorded == [] and registry.read(STYLE)[1] == etag
    fresh = running(update(41, at=T0 + timedelta(hours=2)))  # a new heartbeat clears the flag
    record(registry, fresh, T0 + timedelta(hours=2, minutes=1))
    assert registry.read(STYLE)[0].version("V1").progress.stalled is None


def test_a_job_that_never_reported_is_stalled_from_its_start(registry: RegistryStore) -> None:
    status = running(None, delay_ms=60_000)
    assert record(registry, status, T0 + timedelta(minutes=20)).recorded == []  # running, no update yet: nothing
    tick = record(registry, status, T0 + timedelta(minutes=32))
    assert len(tick.stalled) == 1 and "since 2026-11-29T10:01:00Z" in tick.stalled[0]


def test_with_the_setting_a_stalled_job_is_cancelled_and_the_outcome_recorded(registry: RegistryStore) -> None:
    status = running(update(40, at=T0))
    backend = Backend(status)
    tick = record(registry, status, T0 + timedelta(hours=1), cancel=True, backend=backend)
    assert backend.cancelled == [JOB] and tick.cancelled[JOB].status == "CANCELLED"
    version = registry.read(STYLE)[0].version("V1")
    assert version.status == VersionStatus.failed and version.job_status == "CANCELLED"
    assert version.error.startswith("cancelled by the pipeline: stalled: no progress update since")


def test_a_bad_update_is_ignored_with_a_clear_line_and_never_stops_the_tick(registry: RegistryStore) -> None:
    good = running(update(5, at=T0), job_id=JOB)
    record(registry, good, T0 + timedelta(minutes=1))
    bad = running({"step": "five", "loss": "low"})
    tick = record(registry, bad, T0 + timedelta(minutes=2))
    assert tick.problems == [f"job {JOB}: progress step 'five' is not a whole number >= 0; update ignored"]
    assert registry.read(STYLE)[0].version("V1").progress.step == 5  # the last good update stays


def test_the_stall_reason_is_the_same_on_every_tick() -> None:
    assert stall_reason(T0, T0 + timedelta(seconds=1800), 1800) is None
    assert stall_reason(T0, T0 + timedelta(hours=1), 1800) == stall_reason(T0, T0 + timedelta(hours=5), 1800)
