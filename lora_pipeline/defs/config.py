"""Run configuration shared by the training op and the ``trained_lora`` asset."""

from __future__ import annotations

import dagster as dg
from pydantic import Field


class TrainingConfig(dg.Config):
    """What to train: the base model and hyperparameter overrides (see TrainingParams)."""

    base_model: str = Field(
        "tiny",
        description="'tiny' (built in code), a local diffusers folder, 'store:<prefix>' or a hub id.",
    )
    params: dict = Field(
        default_factory=dict,
        description="Overrides of lora_pipeline.contracts.training.TrainingParams, e.g. "
        "{'rank': 16, 'max_train_steps': 1500, 'resolution': 768}.",
    )
    force: bool = Field(False, description="Train again even if this dataset was trained with these settings.")
    wait_timeout_s: float = Field(6 * 3600, description="How long a run waits for the job to finish.")
    poll_interval_s: float = Field(5.0, description="Seconds between status polls while waiting.")
