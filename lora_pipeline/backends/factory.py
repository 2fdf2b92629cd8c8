"""Pick the training backend from the settings: RunPod when an endpoint is set, else local."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_pipeline.backends.base import TrainingBackend
from lora_pipeline.settings import Settings, get_settings
from lora_pipeline.storage.base import ObjectStore


def open_training_backend(
    store: ObjectStore,
    settings: Settings | None = None,
    *,
    state_dir: Path | None = None,
    **kwargs: Any,
) -> TrainingBackend:
    """RunPodClient for RUNPOD_ENDPOINT_ID, else LocalBackend with its job state in
    ``state_dir`` (default LORA_LOCAL_JOBS_DIR, else ``.lora_jobs`` beside a local
    store's directory, or in the working directory for S3). ``settings``: default
    ``get_settings()``. ``kwargs`` go to the chosen backend's constructor."""
    settings = settings or get_settings()
    if settings.training_backend == "runpod":
        from lora_pipeline.backends.runpod_client import RunPodClient

        return RunPodClient.from_settings(settings, **kwargs)
    from lora_pipeline.backends.local import LocalBackend

    return LocalBackend(store, state_dir or settings.local_jobs_dir_or_default, **kwargs)
