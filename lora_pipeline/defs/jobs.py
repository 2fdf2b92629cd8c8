"""Jobs: train a style's LoRA on the GPU backend, complete finished jobs, reconcile the registry."""

import dagster as dg
from pydantic import Field, ValidationError

from lora_pipeline.contracts.run_tags import VERSION_TAG
from lora_pipeline.defs.config import TrainingConfig
from lora_pipeline.defs.declared_styles import DeclaredStyles
from lora_pipeline.defs.health import HEALTH_CHECK_KEYS
from lora_pipeline.defs.partitions import styles_partitions
from lora_pipeline.defs.presentation import backend_kind
from lora_pipeline.defs.resources import StorageResource, TrainingBackendResource
from lora_pipeline.contracts.training import TrainingParams
from lora_pipeline.lifecycle.samples import SampleRenderingFailed, render_missing_samples
from lora_pipeline.lifecycle.submit import (
    NoDatasetError,
    SubmissionInFlight,
    SubmissionUnknown,
    submit_training,
    completed_version,
    launch_choice,
    wait_for_job,
)
from lora_pipeline.contracts.families import BaseModelRefused
from lora_pipeline.settings import get_settings

GPU_POOL = "runpod_gpu"
# The run tag naming the job (base UUID) a run records: a completion sensor requests no run for a job
# a run with this tag is recording or recorded (its own, or a hand materialization waiting for the job).
JOB_TAG = "lora_pipeline/job"


class TrainLoraConfig(TrainingConfig):
    wait_for_completion: bool = Field(
        True,
        description="Hold the run (and its slot in the runpod_gpu pool) until the job ends; "
        "cancelling the run then cancels the job. The completion sensors record the result.",
    )


@dg.op(pool=GPU_POOL, tags={"kind": backend_kind()})
def submit_lora_training(
    context: dg.OpExecutionContext,
    config: TrainLoraConfig,
    storage: StorageResource,
    training_backend: TrainingBackendResource,
    declared_styles: dg.ResourceParam[DeclaredStyles],
) -> str:
    """Submit the style's current dataset version for training; return the job id.

    The pending version is recorded in the registry before this returns. The
    `runpod_gpu` concurrency pool caps how many of these hold a GPU job at
    once: set its limit to the endpoint's worker count
    (`dagster instance concurrency set runpod_gpu N`).
    """
    style = context.partition_key
    store = storage.get_store()
    backend = training_backend.get_backend(store)
    base_model, overrides = config.training_choice(declared_styles.get(style))
    try:
        choice = launch_choice(base_model, overrides, model_family=config.model_family, store=store)
    except (BaseModelRefused, ValidationError) as exc:
        raise dg.Failure(description=f"nothing submitted for {style}: {exc}") from None
    params = choice.params
    try:
        submitted = submit_training(
            store=store,
            backend=backend,
            style=style,
            params=params,
            base_model=base_model,
            family=choice.family,
            storage_url=training_backend.storage_url_for_worker(storage),
            webhook_url=training_backend.webhook_url_for_jobs(),
            force=config.force,
        )
    except (NoDatasetError, ValidationError, SubmissionInFlight) as exc:
        raise dg.Failure(description=f"nothing submitted for {style}: {exc}") from None
    except SubmissionUnknown as exc:
        raise dg.Failure(description=str(exc), metadata={"version": exc.version.name}) from None
    context.add_output_metadata(
        {
            "job_id": submitted.job_id,
            "version": submitted.version,
            "reused": submitted.reused,
            "dataset_hash": submitted.dataset_hash,
        }
    )
    # The app's API answers with the version and follows it by this tag (contracts/run_tags.py).
    context.instance.add_run_tags(context.run_id, {VERSION_TAG: submitted.version})
    context.log.info(
        f"{'reused' if submitted.reused else 'submitted'} job {submitted.job_id} → {style} {submitted.version}"
    )
    if submitted.reused:
        render_reused_samples(context, storage, style, submitted.version, params)
    if config.wait_for_completion and not submitted.reused:
        settings = get_settings()
        final = wait_for_job(
            backend,
            submitted.job_id,
            timeout_s=config.wait_timeout_s,
            poll_interval_s=config.poll_interval_s,
            on_status=lambda s: context.log.info(f"job {s.id}: {s.status}"),
            log=context.log.info,
            warn=context.log.warning,
            stall_after_s=settings.stall_after_s,
            cancel_stalled=settings.cancel_stalled,
        )
        context.log.info(f"job {final.id} ended {final.status}; the completion sensors record it")
    return submitted.job_id


def render_reused_samples(
    context: dg.OpExecutionContext, storage: StorageResource, style: str, version: str, params: TrainingParams
) -> None:
    """Sample settings are not part of a version's identity: a request that changes only them
    reuses the version, and its missing samples are rendered here (no training)."""
    reused = completed_version(storage.get_store(), style, version)
    if reused is None or reused.version is None:
        return
    try:
        count = render_missing_samples(storage.resolved_url(), style, reused.version, params)
    except SampleRenderingFailed as exc:
        raise dg.Failure(description=str(exc)) from None
    if count:
        context.log.info(f"{style} {version}: rendered {count} sample image(s) for the existing version")


@dg.job(partitions_def=styles_partitions, tags={"lora_pipeline/kind": "training"})
def train_lora() -> None:
    """Train a LoRA for one style on the configured backend (RunPod, or local)."""
    submit_lora_training()


complete_training = dg.define_asset_job(
    "complete_training",
    # the two assets and their data checks; the registry's lag and health checks run on their own schedule
    selection=dg.AssetSelection.assets("trained_lora", "lora_registry") - dg.AssetSelection.checks(*HEALTH_CHECK_KEYS),
    description="Started by the completion sensors: verify a finished job's LoRA and record it.",
)

ingest_training_dataset = dg.define_asset_job(
    "ingest_training_dataset",
    selection=dg.AssetSelection.assets("training_dataset"),
    description="Ingests a style's source as a new dataset version (a declared style's dataset schedule).",
)
