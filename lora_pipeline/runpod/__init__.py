"""Training backends: RunPod Serverless over HTTP, and a local one that runs the worker here.

Dagster-free building blocks; the Dagster layer wraps them in resources, ops and sensors.
"""

from lora_pipeline.runpod.backend import (
    TERMINAL_STATUSES,
    ExecutionPolicy,
    JobNotFound,
    JobStatus,
    RunPodAuthError,
    RunPodError,
    RunPodRateLimited,
    RunPodRequestError,
    RunPodUnavailable,
    TrainingBackend,
)

__all__ = [
    "TERMINAL_STATUSES",
    "ExecutionPolicy",
    "JobNotFound",
    "JobStatus",
    "RunPodAuthError",
    "RunPodError",
    "RunPodRateLimited",
    "RunPodRequestError",
    "RunPodUnavailable",
    "TrainingBackend",
]
