"""The one Definitions object of the code location (named in workspace.yaml).

Every Dagster object lives in a small module under ``lora_pipeline/defs/``;
this file only gathers them. Importing it must stay cheap: Dagster imports the
code location often, so nothing here imports torch, diffusers or peft.

The settings are read first: a bad value fails loading the code location with one line
naming the variable (``SettingsError``), before any Dagster object is built.
"""

import warnings
from typing import Any

import dagster as dg

from lora_pipeline.settings import get_settings

get_settings()

from lora_pipeline.defs.assets.lora_registry import lora_registry
from lora_pipeline.defs.assets.trained_lora import trained_lora
from lora_pipeline.defs.assets.trained_lora_checks import lora_file_matches_registry
from lora_pipeline.defs.assets.training_dataset import training_dataset
from lora_pipeline.defs.compare import compare_lora_versions
from lora_pipeline.defs.completion_sensors import runpod_job_sensor, runpod_webhook_sensor
from lora_pipeline.defs.discovery_sensors import new_dataset_version_sensor, style_discovery_sensor
from lora_pipeline.defs.registry_sensor import registry_change_sensor
from lora_pipeline.defs.health import pipeline_health, pipeline_health_checks, pipeline_health_schedule
from lora_pipeline.defs.jobs import complete_training, train_lora
from lora_pipeline.defs.reconcile import reconcile_registry, reconcile_registry_schedule
from lora_pipeline.defs.resources import StorageResource, TrainingBackendResource
from lora_pipeline.defs.versions import delete_lora_version, promote_lora_version


def _with_code_references(assets: list[dg.AssetsDefinition]) -> list[Any]:
    """Each asset links to its source file and line (local paths: works offline, no git remote).
    The API is beta in Dagster 1.13; its warning is not the user's to act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        return list(dg.with_source_code_references(assets))


defs = dg.Definitions(
    assets=_with_code_references([training_dataset, trained_lora, lora_registry]),
    asset_checks=[pipeline_health_checks, lora_file_matches_registry],
    jobs=[
        train_lora,
        complete_training,
        reconcile_registry,
        pipeline_health,
        promote_lora_version,
        delete_lora_version,
        compare_lora_versions,
    ],
    schedules=[reconcile_registry_schedule, pipeline_health_schedule],
    sensors=[
        runpod_job_sensor,
        runpod_webhook_sensor,
        style_discovery_sensor,
        new_dataset_version_sensor,
        registry_change_sensor,
    ],
    resources={
        "storage": StorageResource(),
        "training_backend": TrainingBackendResource(),
    },
)
