"""``trained_lora``: a LoRA trained on the style's current dataset version.

Materialized two ways: by hand (or by automation), when it submits a job and
waits for it; or by a completion sensor's run, which hands it the job's final
status so it only verifies the file and records the outcome.
"""


import json

import dagster as dg
from pydantic import Field, ValidationError

from lora_pipeline.defs.config import TrainingConfig
from lora_pipeline.defs.partitions import styles_partitions
from lora_pipeline.defs.resources import StorageResource, TrainingBackendResource
from lora_pipeline.registry.layouts import primary_layout
from lora_pipeline.registry.models import VersionStatus
from lora_pipeline.runpod.backend import JobStatus
from lora_pipeline.training import (
    Completion,
    NoDatasetError,
    SubmissionInFlight,
    SubmissionUnknown,
    record_completion,
    submit_and_wait,
)
from lora_pipeline.webhook.inbox import mark_processed


class TrainedLoraConfig(TrainingConfig):
    """Training settings, plus the finished job when a completion sensor started the run."""

    status_body: str | None = Field(
        None, description="Set by the completion sensors: the job's final RunPod status body (JSON)."
    )
    source: str = Field("poll", description="Where the status came from: poll or webhook.")
    inbox_key: str | None = Field(None, description="The webhook file to archive once recorded.")


@dg.asset(
    partitions_def=styles_partitions,
    deps=["training_dataset"],
    group_name="lora",
    kinds={"pytorch", "runpod"},
    # Materialized by hand it submits a GPU job and holds it: the same pool as train_lora's op.
    pool="runpod_gpu",
)
def trained_lora(
    context: dg.AssetExecutionContext,
    config: TrainedLoraConfig,
    storage: StorageResource,
    training_backend: TrainingBackendResource,
) -> dg.MaterializeResult:
    """Train (or record the training of) this style's LoRA and verify the file."""
    style = context.partition_key
    store = storage.get_store()
    if config.status_body:
        status = JobStatus.model_validate_json(config.status_body)
        completion = record_completion(store, style, status, source=config.source)  # type: ignore[arg-type]
        if config.inbox_key:
            mark_processed(store, config.inbox_key)
    else:
        backend = training_backend.get_backend(store)
        try:
            status, completion = submit_and_wait(
                store=store,
                backend=backend,
                style=style,
                base_model=config.base_model,
                params=config.params,
                force=config.force,
                timeout_s=config.wait_timeout_s,
                poll_interval_s=config.poll_interval_s,
                storage_url=training_backend.storage_url_for_worker(storage),
                webhook_url=training_backend.webhook_url_for_jobs(),
                log=context.log.info,
            )
        except (NoDatasetError, ValidationError, SubmissionInFlight) as exc:
            raise dg.Failure(description=f"nothing submitted for {style}: {exc}") from None
        except SubmissionUnknown as exc:
            raise dg.Failure(description=str(exc), metadata={"version": exc.version.name}) from None
    return completion_result(completion, status)


def completion_result(completion: Completion, status: JobStatus | None) -> dg.MaterializeResult:
    """Materialization metadata a user wants, or a Failure that says why there is no LoRA."""
    version = completion.version
    if version is None or version.status != VersionStatus.completed:
        reason = completion.problem or (version.error if version else None) or completion.status
        raise dg.Failure(
            description=f"training of {completion.style} "
            f"{version.name if version else ''} did not produce a LoRA: {reason}",
            metadata={"job_id": version.id if version else None},
        )
    meta = completion.lora_metadata
    primary = primary_layout()
    main = version.download(primary)
    url = main.url if main is not None else version.lora_url
    metadata: dict = {
        "style": completion.style,
        "version": version.name,
        "job_id": version.id or (status.id if status is not None else ""),
        "lora_key": completion.lora_key or version.s3_key or "",
        "url": dg.MetadataValue.url(url) if url else "",
        "primary_format": primary,
        "dataset_hash": version.dataset_hash or meta.get("lora_pipeline.dataset_hash", ""),
        "steps": int(meta["lora_pipeline.steps"]) if "lora_pipeline.steps" in meta else None,
        "final_loss": float(meta["lora_pipeline.final_loss"]) if "lora_pipeline.final_loss" in meta else None,
    }
    for layout, f in version.files().items():  # kohya_file, kohya_url, …, diffusers_file, …
        metadata[f"{layout}_file"] = f.key
        metadata[f"{layout}_url"] = dg.MetadataValue.url(f.url) if f.url else ""
        metadata[f"{layout}_size"] = f.size
        metadata[f"{layout}_sha256"] = f.checksum or ""
    if status is not None:
        metadata["queue_delay_s"] = (status.delayTime or 0) / 1000
        metadata["execution_time_s"] = (status.executionTime or 0) / 1000
    metadata["lora_header"] = dg.MetadataValue.json(json.loads(json.dumps(meta)))
    return dg.MaterializeResult(
        metadata={k: v for k, v in metadata.items() if v is not None},
        data_version=dg.DataVersion(version.s3_key or version.name),
    )
