"""The one Definitions object of the code location (named in workspace.yaml).

Every Dagster object lives in a small module under ``lora_pipeline/defs/``;
this file only gathers them. Importing it must stay cheap: Dagster imports the
code location often, so nothing here imports torch, diffusers or peft.

The settings are read first: a bad value fails loading the code location with one line
naming the variable (``SettingsError``), before any Dagster object is built.
"""

import dagster as dg

from lora_pipeline.settings import get_settings

get_settings()

from lora_pipeline.defs.assets.lora_registry import lora_registry
from lora_pipeline.defs.assets.trained_lora import trained_lora
from lora_pipeline.defs.assets.training_dataset import training_dataset
from lora_pipeline.defs.completion_sensors import runpod_job_sensor, runpod_webhook_sensor
from lora_pipeline.defs.discovery_sensors import new_dataset_version_sensor, style_discovery_sensor
from lora_pipeline.defs.jobs import complete_training, train_lora
from lora_pipeline.defs.reconcile import reconcile_registry, reconcile_registry_schedule
from lora_pipeline.defs.resources import StorageResource, TrainingBackendResource

defs = dg.Definitions(
    assets=[training_dataset, trained_lora, lora_registry],
    jobs=[train_lora, complete_training, reconcile_registry],
    schedules=[reconcile_registry_schedule],
    sensors=[runpod_job_sensor, runpod_webhook_sensor, style_discovery_sensor, new_dataset_version_sensor],
    resources={
        "storage": StorageResource(),
        "training_backend": TrainingBackendResource(),
    },
)
