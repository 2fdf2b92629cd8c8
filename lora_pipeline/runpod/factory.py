"""Pick the training backend from the settings: RunPod when an endpoint is set, else local."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lora_pipeline.runpod.backend import TrainingBackend
from lora_pipeline.storage.base import ObjectStore

LOCAL_JOBS_DIR_ENV = "LORA_LOCAL_JOBS_DIR"
DEFAULT_LOCAL_JOBS_DIR = ".lora_jobs"


def open_training_backend(
    store: ObjectStore,
    settings: Any = None,
    *,
    state_dir: Path | None = None,
    **kwargs: Any,
) -> TrainingBackend:
    """RunPodClient for RUNPOD_ENDPOINT_ID, else LocalBackend with its job state in
    ``state_dir`` (default LORA_LOCAL_JOBS_DIR, else ``.lora_jobs`` beside a local
    store's directory, or in the working directory for S3). ``kwargs`` go to the
    chosen backend's constructor."""
    if settings is None:
        from lora_pipeline.settings import load_settings

        settings = load_settings()
    if settings.training_backend == "runpod":
        from lora_pipeline.runpod.client import RunPodClient

        return RunPodClient.from_settings(settings, **kwargs)
    from lora_pipeline.runpod.local import LocalBackend

    if state_dir is None:
        local = settings.local_storage_dir
        default = (local.parent if local else Path(".")) / DEFAULT_LOCAL_JOBS_DIR
        state_dir = Path(os.environ.get(LOCAL_JOBS_DIR_ENV) or default)
    return LocalBackend(store, state_dir, **kwargs)
