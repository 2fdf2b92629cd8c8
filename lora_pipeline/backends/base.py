"""What every training backend (RunPod, local) promises: the protocol, the job policy, the errors.

The training op and the sensors talk to this interface only, so the local backend
(the laptop default) and RunPod Serverless are interchangeable. The status body a
backend answers with is ``lora_pipeline.contracts.job_status.JobStatus``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from lora_pipeline.contracts.job_status import JobStatus
from lora_pipeline.contracts.training import TrainingRequest


class RunPodError(Exception):
    """Base class of every training-backend failure, so callers can catch one type."""


class JobNotFound(RunPodError, KeyError):
    """The backend does not know the job: never existed, or its result expired.

    RunPod keeps a ``/run`` result 30 minutes after completion and then answers 404
    (the legacy notes saw it as "redis err: client is nil"); the registry must then
    be settled from the object store instead (reconciliation).
    """

    def __init__(self, job_id: str, detail: str = "") -> None:
        super().__init__(job_id)
        self.job_id = job_id
        self.detail = detail

    def __str__(self) -> str:
        extra = f" ({self.detail})" if self.detail else ""
        return (
            f"RunPod job {self.job_id!r} is unknown or its result has expired{extra}; "
            "results of /run jobs are kept 30 minutes after completion"
        )


class RunPodAuthError(RunPodError):
    """RunPod refused the API key (401/403): the fix is RUNPOD_API_KEY, not a retry."""


class RunPodUnavailable(RunPodError):
    """RunPod cannot be reached or keeps failing; the circuit breaker may be open.

    Sensors catch this and skip the tick: nothing is lost, the next tick (or
    reconciliation) picks the jobs up again.
    """


class RunPodRateLimited(RunPodError):
    """RunPod kept answering 429 after every retry: try again on the next tick."""


class SubmitOutcomeUnknown(RunPodError):
    """``POST /run`` may or may not have queued the job: the answer was lost (a read
    timeout, a dropped connection, a 5xx). RunPod has no idempotency key, so the request
    is never repeated; the registry records the version as "submitted, id unknown"."""


class RunPodRequestError(RunPodError):
    """RunPod refused the request itself (400/422…): retrying the same call will not help."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


MIN_EXECUTION_TIMEOUT_MS = 5_000
MAX_POLICY_MS = 7 * 24 * 3600 * 1000
DEFAULT_EXECUTION_TIMEOUT_MS = 600_000
DEFAULT_TTL_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class ExecutionPolicy:
    """A job's RunPod ``policy``: how long it may run, and how long it may live.

    RunPod's default ``executionTimeout`` kills a job after 10 minutes; LoRA
    training runs for hours, so the op sizes both values from the planned training
    (``from_training``) instead of trusting the endpoint's default.
    """

    execution_timeout_ms: int = DEFAULT_EXECUTION_TIMEOUT_MS
    ttl_ms: int = DEFAULT_TTL_MS

    def __post_init__(self) -> None:
        if not MIN_EXECUTION_TIMEOUT_MS <= self.execution_timeout_ms <= MAX_POLICY_MS:
            raise ValueError(
                f"execution_timeout_ms must be between {MIN_EXECUTION_TIMEOUT_MS} and "
                f"{MAX_POLICY_MS} (RunPod's limits), got {self.execution_timeout_ms}"
            )
        if not self.execution_timeout_ms <= self.ttl_ms <= MAX_POLICY_MS:
            raise ValueError(
                f"ttl_ms must cover the execution timeout ({self.execution_timeout_ms}) and be "
                f"at most {MAX_POLICY_MS}, got {self.ttl_ms}"
            )

    @classmethod
    def from_training(
        cls,
        max_train_steps: int,
        *,
        seconds_per_step: float = 1.5,
        setup_s: float = 900.0,
        safety_factor: float = 2.0,
        queue_allowance_s: float = 24 * 3600.0,
    ) -> ExecutionPolicy:
        """Size the policy from the planned training.

        ``execution = (setup + steps × seconds_per_step) × safety_factor``, where
        setup covers model and dataset download, latent caching and the upload;
        ``ttl = execution + queue_allowance`` because RunPod counts a job's TTL from
        submission, queue time included. Both are clamped to RunPod's limits
        (executionTimeout ≥ 5 s, both ≤ 7 days).
        """
        if max_train_steps < 1:
            raise ValueError(f"max_train_steps must be at least 1, got {max_train_steps}")
        if seconds_per_step <= 0 or setup_s < 0 or safety_factor < 1 or queue_allowance_s < 0:
            raise ValueError("seconds_per_step must be > 0, setup_s and queue_allowance_s >= 0, safety_factor >= 1")
        execution_s = (setup_s + max_train_steps * seconds_per_step) * safety_factor
        execution_ms = int(min(max(execution_s * 1000, MIN_EXECUTION_TIMEOUT_MS), MAX_POLICY_MS))
        ttl_ms = int(min(execution_ms + queue_allowance_s * 1000, MAX_POLICY_MS))
        return cls(execution_timeout_ms=execution_ms, ttl_ms=ttl_ms)

    def to_api(self) -> dict[str, int]:
        """The ``policy`` object of a ``/run`` body."""
        return {"executionTimeout": self.execution_timeout_ms, "ttl": self.ttl_ms}


@runtime_checkable
class TrainingBackend(Protocol):
    """Where training jobs run: RunPod Serverless, or this machine."""

    def submit(self, request: TrainingRequest, *, webhook_url: str | None, policy: ExecutionPolicy) -> str:
        """Queue a training job; return its id exactly as the backend returned it."""
        ...

    def status(self, job_id: str) -> JobStatus:
        """The job's current status body. Raises JobNotFound when unknown or expired."""
        ...

    def cancel(self, job_id: str) -> JobStatus:
        """Cancel the job (a no-op for a finished one) and return its status."""
        ...
