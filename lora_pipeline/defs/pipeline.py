"""The pipeline's definitions, built once: what every style, hand-added or declared, runs on.

``PIPELINE`` holds the assets, checks, jobs, schedules, sensors and resources of the code
location, whatever styles exist: a style is a partition of its assets. ``pipeline_definitions``
binds the one resource that depends on which styles are declared (``declared_styles``, their
settings); a declared style (a ``LoraTraining`` component) adds only what is its own
(``declared_style_definitions``): if it asks for them, its dataset schedule and its training
sensor, which target PIPELINE's jobs. So two declared styles, or none, run on the same assets,
checks and jobs as a style added by hand.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import dagster as dg

from lora_pipeline.defs.assets.lora_registry import lora_registry
from lora_pipeline.defs.assets.trained_lora import trained_lora
from lora_pipeline.defs.assets.trained_lora_checks import lora_file_matches_registry
from lora_pipeline.defs.assets.training_dataset import training_dataset
from lora_pipeline.defs.compare import compare_lora_versions
from lora_pipeline.defs.completion_sensors import runpod_job_sensor, runpod_webhook_sensor
from lora_pipeline.defs.registry_sensor import registry_change_sensor
from lora_pipeline.defs.declared_styles import DECLARED_STYLES, StyleDeclaration, declared_styles
from lora_pipeline.defs.discovery_sensors import (
    dagster_name,
    declared_style_training_sensor,
    new_dataset_version_sensor,
    style_discovery_sensor,
)
from lora_pipeline.defs.health import pipeline_health, pipeline_health_checks, pipeline_health_schedule
from lora_pipeline.defs.lora_training import LoraTraining
from lora_pipeline.defs.jobs import complete_training, ingest_training_dataset, train_lora
from lora_pipeline.defs.reconcile import reconcile_registry, reconcile_registry_schedule
from lora_pipeline.defs.resources import StorageResource, TrainingBackendResource
from lora_pipeline.defs.versions import delete_lora_version, promote_lora_version


def _with_code_references(assets: list[dg.AssetsDefinition]) -> list[Any]:
    """Each asset links to its source file and line (local paths: works offline, no git remote).
    The API is beta in Dagster 1.13; its warning is not the user's to act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        return list(dg.with_source_code_references(assets))


_ASSETS = _with_code_references([training_dataset, trained_lora, lora_registry])
_RESOURCES = {"storage": StorageResource(), "training_backend": TrainingBackendResource()}


def pipeline_definitions(declarations: Iterable[StyleDeclaration] = ()) -> dg.Definitions:
    """The pipeline's objects (the same ones at every call) with the ``declared_styles`` resource
    holding ``declarations`` (their schedules and sensors come from their components:
    ``declared_style_definitions``)."""
    return dg.Definitions(
        assets=_ASSETS,
        asset_checks=[pipeline_health_checks, lora_file_matches_registry],
        jobs=[
            train_lora,
            ingest_training_dataset,
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
        resources={**_RESOURCES, DECLARED_STYLES: declared_styles(declarations)},
    )


PIPELINE = pipeline_definitions()


def declared_style_definitions(declaration: StyleDeclaration) -> dg.Definitions:
    """What one declared style adds to ``PIPELINE``: what its automation asks for."""
    style = declaration.style
    return dg.Definitions(
        sensors=[declared_style_training_sensor(style)] if declaration.train_on_new_dataset else [],
        schedules=[dataset_schedule(style, declaration.schedule)] if declaration.schedule else [],
    )


def dataset_schedule(style: str, cron: str) -> dg.ScheduleDefinition:
    """Re-ingests ``style``'s declared source on ``cron``: a changed source makes a new dataset
    version (trained if the declaration says so), an unchanged one the same hash (nothing to train)."""

    @dg.schedule(
        name=f"{dagster_name(style)}_dataset_schedule",
        cron_schedule=cron,
        # By name: Dagster copies what a defs.yaml builds, and a copy of the job would clash.
        job_name=ingest_training_dataset.name,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Ingests {style}'s declared source (its LoraTraining defs.yaml).",
    )
    def _schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        return dg.RunRequest(partition_key=style)

    return _schedule


class DuplicateStyleDeclaration(ValueError):
    """Two ``defs.yaml`` files declare the same style: which one's settings would win is unclear."""


def pipeline_with_declared_styles(styles_module: ModuleType, project_root: Path) -> dg.Definitions:
    """The pipeline with every style declared under ``styles_module``: a folder of
    ``<name>/defs.yaml`` files as ``dg scaffold defs lora_pipeline.LoraTraining <name>`` writes
    them. Their declarations become the ``declared_styles`` resource; what each adds of its own
    (schedule, sensor) comes from building the folder, as ``load_from_defs_folder`` builds it."""
    tree = dg.ComponentTree.from_module(defs_module=styles_module, project_root=project_root)
    declarations = [component.declaration() for component in tree.get_all_components(of_type=LoraTraining)]
    counts = Counter(d.style for d in declarations)
    if duplicated := sorted(style for style, count in counts.items() if count > 1):
        raise DuplicateStyleDeclaration(
            f"style {', '.join(duplicated)} is declared by more than one defs.yaml under {styles_module.__name__}"
        )
    with warnings.catch_warnings():
        # Loading a defs folder goes through APIs Dagster 1.13 marks preview or beta (its own
        # load_from_defs_folder silences them the same way): not the user's to act on.
        warnings.simplefilter("ignore", dg.PreviewWarning)
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.Definitions.merge(pipeline_definitions(declarations), tree.build_defs())
