"""RunPod's status body, and the registry evidence it becomes.

The status body has one shape everywhere: RunPod's own (``id``, ``status``,
``delayTime``, ``executionTime``, ``output``, ``error``), whether it came from a poll,
a webhook file or the local backend's job state. The backends produce it, the webhook
receiver and inbox check it, and ``job_report_from_status`` is the one place it becomes
evidence for the merge function, so a webhook and a poll of the same job fold into the
same thing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from lora_pipeline.registry.evidence import JobProgressReport, JobReport
from lora_pipeline.registry.jobids import base_job_id

TERMINAL_STATUSES: frozenset[str] = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})


class JobStatus(BaseModel):
    """RunPod's status body, as ``/status``, ``/run`` and the webhook POST carry it.

    Extra keys (``workerId``, ``retries`` …) are kept, so a body can be stored and
    re-read without loss. ``error`` is normalised to a string because RunPod
    sometimes sends a JSON-encoded dict there.

    This is the one schema every status body is checked against: the webhook
    receiver (400 for a body it refuses), the inbox sensor and reconciliation
    (which move such a file to ``webhooks/rejected/``) and the pollers.
    ``delayTime``/``executionTime`` are milliseconds (an int, a finite float,
    truncated, or a string of digits; never a bool). ``output`` is a JSON object or
    absent/null: RunPod itself passes through whatever a handler returns (any
    JSON value), but this pipeline's worker (``lora_pipeline.worker.handler``)
    always returns an object (its result, or ``{"error": …}``) and its progress
    updates are objects too, so any other output is not one of our jobs' bodies.
    """

    model_config = ConfigDict(extra="allow")

    id: str
    status: str
    delayTime: int | None = None
    executionTime: int | None = None
    output: dict[str, Any] | None = None
    error: str | None = None

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not value or not value.strip():
            raise ValueError("job id must not be empty")
        return value

    @field_validator("status")
    @classmethod
    def _status(cls, value: str) -> str:
        return value.strip().upper()

    @field_validator("error", mode="before")
    @classmethod
    def _error(cls, value: Any) -> str | None:
        if value is None or isinstance(value, str):
            return value
        return json.dumps(value, sort_keys=True)

    @field_validator("delayTime", "executionTime", mode="before")
    @classmethod
    def _millis(cls, value: Any) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool):
            raise ValueError("expected whole milliseconds (a number), not a boolean")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value):
            return int(value)
        if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
            return int(value.strip())
        raise ValueError("expected whole milliseconds (a number)")

    @property
    def base_id(self) -> str:
        """The id without its ``-u1``/``-e2`` suffix: what matching uses."""
        return base_job_id(self.id)

    @property
    def is_terminal(self) -> bool:
        """Whether RunPod will not change this job's status again (short of a retry)."""
        return self.status in TERMINAL_STATUSES

    @property
    def succeeded(self) -> bool:
        """COMPLETED with an output that is not an error dict.

        RunPod may report COMPLETED for a handler that returned ``{"error": …}`` or
        nothing at all; neither is a success. (Even a success counts only once the
        LoRA file is in the store; that check belongs to the caller.)
        """
        if self.status != "COMPLETED" or self.error:
            return False
        if not isinstance(self.output, dict) or not self.output:
            return False
        return "error" not in self.output

    def failure_message(self) -> str | None:
        """Why the job did not succeed, or None when it did or is still running."""
        if self.succeeded or not self.is_terminal:
            return None
        if self.error:
            return self.error
        if isinstance(self.output, dict) and "error" in self.output:
            return str(self.output["error"])
        if self.status == "COMPLETED":
            return "job completed without an output (the worker returned nothing)"
        return f"job ended {self.status}"

    def to_body(self) -> dict[str, Any]:
        """The status body as RunPod sends it (keys with None values dropped)."""
        return self.model_dump(mode="json", exclude_none=True)


def job_report_from_status(status: JobStatus, at: datetime, source: Literal["poll", "webhook"] = "poll") -> JobReport:
    """Evidence of what RunPod said about a job at ``at``.

    A handler's ``{"error": …}`` inside a COMPLETED output is surfaced as the
    report's error, so the registry never records it as a success.
    """
    output = status.output if isinstance(status.output, dict) else None
    error = status.error
    if error is None and status.is_terminal and not status.succeeded:
        error = status.failure_message()
    return JobReport(
        job_id=status.id,
        status=status.status,
        output=output,
        error=error,
        delay_time_ms=status.delayTime,
        execution_time_ms=status.executionTime,
        at=at,
        source=source,
    )


PROGRESS_FIELDS = ("step", "total", "loss", "phase", "at")


class InvalidProgress(ValueError):
    """An IN_PROGRESS output that is not a usable progress update; the message names the field."""


@dataclass(frozen=True)
class TrainingProgress:
    """A worker's progress update, as ``/status`` carries it while a job is IN_PROGRESS.

    The worker (``lora_pipeline.worker.handler``) sends ``{"phase", "step", "total",
    "loss", "at"}`` through ``runpod.serverless.progress_update``; RunPod (and the local
    backend) answers ``/status`` with ``status: IN_PROGRESS`` and that dict as ``output``.
    Every field is optional (a phase change carries no step); ``at`` is the worker's
    clock (ISO 8601), None when the update carried none.
    """

    step: int | None = None
    total: int | None = None
    loss: float | None = None
    phase: str | None = None
    at: datetime | None = None

    def describe(self) -> str:
        """One log line: ``step 40/100, loss 0.1234 (training)``."""
        parts = []
        if self.step is not None:
            parts.append(f"step {self.step}/{self.total}" if self.total else f"step {self.step}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4g}")
        text = ", ".join(parts) or (self.phase or "progress")
        return f"{text} ({self.phase})" if parts and self.phase else text

    def key(self) -> tuple[Any, ...]:
        """What makes two updates the same update (for "log once per new progress")."""
        return (self.step, self.total, self.loss, self.phase, self.at)


def progress_of(status: JobStatus) -> TrainingProgress | None:
    """The progress update an IN_PROGRESS status carries, or None when it carries none.

    Raises InvalidProgress for an output that has progress fields of the wrong type
    (a non-numeric loss, a negative step, an unreadable time): the caller logs it and
    goes on; a bad update never stops a poll.
    """
    output = status.output
    if status.status != "IN_PROGRESS" or not output:
        return None
    if not any(key in output for key in PROGRESS_FIELDS):
        raise InvalidProgress(f"job {status.id}: output has none of {', '.join(PROGRESS_FIELDS)}: {_short(output)}")
    return TrainingProgress(
        step=_count(status.id, output, "step", minimum=0),
        total=_count(status.id, output, "total", minimum=1),
        loss=_loss(status.id, output.get("loss")),
        phase=_phase(status.id, output.get("phase")),
        at=_time(status.id, output.get("at")),
    )


def progress_report(
    status: JobStatus, progress: TrainingProgress, seen_at: datetime, stalled: str | None = None
) -> JobProgressReport:
    """Registry evidence of a progress update: its time is the worker's (else ``seen_at``)."""
    return JobProgressReport(
        job_id=status.id,
        at=progress.at or seen_at,
        step=progress.step,
        total=progress.total,
        loss=progress.loss,
        phase=progress.phase,
        stalled=stalled,
    )


def _count(job_id: str, output: dict[str, Any], name: str, *, minimum: int) -> int | None:
    value = output.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidProgress(f"job {job_id}: progress {name} {value!r} is not a whole number >= {minimum}")
    return value


def _loss(job_id: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidProgress(f"job {job_id}: progress loss {value!r} is not a finite number")
    return float(value)


def _phase(job_id: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidProgress(f"job {job_id}: progress phase {value!r} is not a string")
    return value[:64]


def _time(job_id: str, value: Any) -> datetime | None:
    if value is None:
        return None
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00")) if isinstance(value, str) else None
    except ValueError:
        at = None
    if at is None:
        raise InvalidProgress(f"job {job_id}: progress time {value!r} is not an ISO 8601 time")
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 120 else text[:117] + "..."
