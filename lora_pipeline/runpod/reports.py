"""Turn a RunPod status body into registry evidence (a ``JobReport``).

Polls, webhook files and the local backend all produce the same status body; this
is the one place it becomes evidence for the merge function, so a webhook and a
poll of the same job fold into the same thing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from lora_pipeline.registry.evidence import JobReport
from lora_pipeline.runpod.backend import JobStatus


def job_report_from_status(
    status: JobStatus, at: datetime, source: Literal["poll", "webhook"] = "poll"
) -> JobReport:
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
