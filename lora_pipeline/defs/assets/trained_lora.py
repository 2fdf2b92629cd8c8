"""``trained_lora``: a LoRA trained on the style's current dataset version.

Materialized two ways: by hand (or by automation), when it submits a job and
waits for it; or by a completion sensor's run, which hands it the job's final
status so it only verifies the file and records the outcome. A graph of three
steps, so that only the GPU step (skipped in the second way) holds a slot of the
``runpod_gpu`` pool.
"""

import dagster as dg
from pydantic import Field, ValidationError

from lora_pipeline.contracts.job_status import JobStatus
from lora_pipeline.contracts.problems import describe_validation_error
from lora_pipeline.defs.config import TrainingConfig
from lora_pipeline.defs.declared_styles import DeclaredStyles
from lora_pipeline.defs.partitions import styles_partitions
from lora_pipeline.defs.presentation import OWNERS, backend_kind, url_value
from lora_pipeline.defs.resources import StorageResource, TrainingBackendResource
from lora_pipeline.defs.jobs import GPU_POOL, JOB_TAG, render_reused_samples
from lora_pipeline.contracts.families import BaseModelRefused
from lora_pipeline.lifecycle.samples import sample_rows, samples_markdown
from lora_pipeline.lifecycle.submit import (
    training_params,
    Completion,
    NoDatasetError,
    SubmissionInFlight,
    SubmissionUnknown,
    completed_version,
    record_completion,
    submit_and_wait,
)
from lora_pipeline.registry.jobids import base_job_id
from lora_pipeline.registry.merge import BASE_MODEL_KEY, FAMILY_KEY
from lora_pipeline.registry.models import VersionStatus
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.registry_store.model_cards import publish_model_card
from lora_pipeline.settings import get_settings
from lora_pipeline.storage import ObjectStore
from lora_pipeline.webhook.inbox import mark_processed


# The table the asset emits (`lora_header`): the LoRA file's safetensors `__metadata__` entries.
HEADER_SCHEMA = dg.TableSchema(
    columns=[
        dg.TableColumn("key", "string", description="e.g. `lora_pipeline.steps`, `ss_network_dim`"),
        dg.TableColumn("value", "string"),
    ]
)
SAMPLES_SCHEMA = dg.TableSchema(
    columns=[
        dg.TableColumn("#", "int", description="the image's place in the `samples` grid"),
        dg.TableColumn("prompt", "string"),
        dg.TableColumn("seed", "int"),
        dg.TableColumn("key", "string", description="the image in the store"),
    ]
)


class TrainedLoraConfig(TrainingConfig):
    """Training settings, plus the finished job when a completion sensor started the run."""

    status_body: str | None = Field(
        None, description="Set by the completion sensors: the job's final RunPod status body (JSON)."
    )
    source: str = Field("poll", description="Where the status came from: poll or webhook.")
    inbox_key: str | None = Field(None, description="The webhook file to archive once recorded.")


def checked_training_config(config: dict) -> dict:
    """The run config of ``trained_lora``, with its hyperparameters validated at launch.

    The config mapping calls this when the run is created (the launchpad, a schedule, the CLI),
    so a bad value (``rank: 0``, an unknown parameter) refuses the launch with one message that
    names the field, instead of a run whose step fails after waiting for a GPU slot; so does a
    base model no family trains, or one of another family than ``model_family`` names.
    """
    checked = TrainedLoraConfig.model_validate(config)
    if not checked.status_body:
        try:
            # No partition here: a declared style's params preset was checked when its defs.yaml
            # loaded, and the step validates the preset and these overrides together again.
            training_params(*checked.training_choice(None), model_family=checked.model_family)
        except ValidationError as exc:
            raise dg.DagsterInvalidConfigError(
                f"trained_lora config, params: {describe_validation_error(exc, root='params')}", [], config
            ) from None
        except BaseModelRefused as exc:
            raise dg.DagsterInvalidConfigError(f"trained_lora config: {exc}", [], config) from None
    return config


@dg.op(
    ins={"training_dataset": dg.In(dg.Nothing)},
    out={
        "train": dg.Out(dict, is_required=False, description="No finished job was handed over: train."),
        "finished": dg.Out(dict, is_required=False, description="A completion sensor handed over a finished job."),
    },
)
def take_training_request(config: TrainedLoraConfig):  # noqa: ANN201 - yields one of two outputs
    """Route the run: a completion sensor's finished job goes straight to recording, so that
    recording never waits for a `runpod_gpu` slot; anything else goes to the GPU step."""
    if config.status_body:
        yield dg.Output(
            {"status_body": config.status_body, "source": config.source, "inbox_key": config.inbox_key}, "finished"
        )
    else:
        yield dg.Output(config.model_dump(mode="json"), "train")


@dg.op(pool=GPU_POOL, tags={"kind": backend_kind()})
def train_on_gpu(
    context: dg.OpExecutionContext,
    request: dict,
    storage: StorageResource,
    training_backend: TrainingBackendResource,
    declared_styles: dg.ResourceParam[DeclaredStyles],
) -> dict:
    """Submit the style's current dataset (idempotently) and hold a `runpod_gpu` slot
    until the job ends: the same pool as `train_lora`'s op."""
    style = context.partition_key
    config = TrainedLoraConfig.model_validate(request)
    store = storage.get_store()
    settings = get_settings()
    base_model, overrides = config.training_choice(declared_styles.get(style))
    try:
        submitted, status = submit_and_wait(
            store=store,
            backend=training_backend.get_backend(store),
            style=style,
            base_model=base_model,
            params=overrides,
            model_family=config.model_family,
            force=config.force,
            timeout_s=config.wait_timeout_s,
            poll_interval_s=config.poll_interval_s,
            storage_url=training_backend.storage_url_for_worker(storage),
            webhook_url=training_backend.webhook_url_for_jobs(),
            log=context.log.info,
            warn=context.log.warning,
            stall_after_s=settings.stall_after_s,
            cancel_stalled=settings.cancel_stalled,
            on_submitted=lambda submitted: _claim_job(context, submitted.job_id),
        )
    except (NoDatasetError, ValidationError, SubmissionInFlight, BaseModelRefused) as exc:
        raise dg.Failure(description=f"nothing submitted for {style}: {exc}") from None
    except SubmissionUnknown as exc:
        raise dg.Failure(description=str(exc), metadata={"version": exc.version.name}) from None
    if status is None:  # an existing completed version: render the samples it lacks, if asked for
        params = training_params(base_model, overrides, model_family=config.model_family, store=store)
        render_reused_samples(context, storage, style, submitted.version, params)
    return {
        "version": submitted.version,
        "status_body": status.model_dump_json() if status is not None else None,
        "source": "poll",
        "inbox_key": None,
    }


def _claim_job(context: dg.OpExecutionContext, job_id: str) -> None:
    """Tag this run with the job it waits for, as a completion sensor's run is tagged: the
    sensors then request no second run for it (one materialization per version), unless this
    run fails or is cancelled before recording."""
    if job_id:
        context.instance.add_run_tags(context.run_id, {JOB_TAG: base_job_id(job_id)})


@dg.op(out=dg.Out(dg.Nothing))
def record_trained_lora(context: dg.OpExecutionContext, outcomes: list[dict], storage: StorageResource):  # noqa: ANN201
    """Record the finished job (verifying its file) and materialize `trained_lora`.

    `outcomes` holds exactly one entry: the GPU step's, or the finished job a completion
    sensor handed over (the other branch was skipped).
    """
    [outcome] = outcomes
    style = context.partition_key
    store = storage.get_store()
    status = JobStatus.model_validate_json(outcome["status_body"]) if outcome["status_body"] else None
    if status is not None:
        completion = record_completion(store, style, status, source=outcome["source"])
        if outcome["inbox_key"]:
            mark_processed(store, outcome["inbox_key"])
    else:
        completion = completed_version(store, style, outcome["version"]) or Completion(
            style, None, "missing", None, {}, problem=f"version {outcome['version']} is no longer completed"
        )
    metadata, data_version = completion_result(completion, status, store=store)
    yield dg.Output(None, metadata=metadata, data_version=data_version, tags=family_tags(metadata["family"]))


FAMILY_TAG = "lora_pipeline/family"


def family_tags(family: str) -> dict[str, str]:
    """The materialization's tags: its model family (``lora_pipeline/family: flux1``), so the
    events of one style trained on several families tell them apart. Kinds cannot: they belong to
    the asset definition, which every style (partition) shares. A base model is no tag value
    (paths and hub ids hold ``/`` and ``:``): it is in the metadata."""
    return {FAMILY_TAG: family} if family else {}


@dg.graph_asset(
    partitions_def=styles_partitions,
    ins={"training_dataset": dg.AssetIn(dagster_type=dg.Nothing)},
    group_name="lora",
    kinds={"pytorch", backend_kind()},
    owners=OWNERS,
    metadata={"dagster/column_schema": HEADER_SCHEMA},
    # The run config stays `ops: {trained_lora: {config: ...}}`, as for a one-op asset.
    config=dg.ConfigMapping(
        config_schema=TrainedLoraConfig.to_config_schema(),
        config_fn=lambda config: {"take_training_request": {"config": checked_training_config(config)}},
    ),
)
def trained_lora(training_dataset):  # noqa: ANN001, ANN201 - a graph's composition function
    """Train (or record the training of) this style's LoRA and verify the file.

    Materialized by hand (or by automation) it submits a GPU job and waits for it, in
    its train_on_gpu step, the one that holds a runpod_gpu slot. Started by a completion
    sensor with the job's final status it skips that step and only records: a finished job
    is never kept waiting for a GPU slot.
    """
    request = take_training_request(training_dataset)
    return record_trained_lora([train_on_gpu(request.train), request.finished])


def completion_result(
    completion: Completion, status: JobStatus | None, *, store: ObjectStore | None = None
) -> tuple[dict, dg.DataVersion]:
    """Materialization metadata a user wants and the data version, or a Failure that says
    why there is no LoRA. With ``store``, the version's sample images inline (``samples``)."""
    version = completion.version
    if version is None or version.status != VersionStatus.completed:
        reason = completion.problem or (version.error if version else None) or completion.status
        raise dg.Failure(
            description=f"training of {completion.style} "
            f"{version.name if version else ''} did not produce a LoRA: {reason}",
            metadata={"job_id": version.id if version else None},
        )
    meta = completion.lora_metadata
    primary = get_settings().primary_format
    main = version.download(primary)
    url = main.url if main is not None else version.lora_url
    metadata: dict = {
        "style": completion.style,
        "version": version.name,
        "job_id": version.id or (status.id if status is not None else ""),
        "lora_key": completion.lora_key or version.s3_key or "",
        "url": url_value(url),
        "primary_format": primary,
        "dataset_hash": version.dataset_hash or meta.get("lora_pipeline.dataset_hash", ""),
        # What it was trained on, as the registry records it (the file's header, corrected from the request).
        "family": version.family.value if version.family else meta.get(FAMILY_KEY, ""),
        "base_model": version.base_model.value if version.base_model else meta.get(BASE_MODEL_KEY, ""),
        "steps": int(meta["lora_pipeline.steps"]) if "lora_pipeline.steps" in meta else None,
        "final_loss": float(meta["lora_pipeline.final_loss"]) if "lora_pipeline.final_loss" in meta else None,
    }
    for layout, f in version.files().items():  # kohya_file, kohya_url, …, diffusers_file, …
        metadata[f"{layout}_file"] = f.key
        metadata[f"{layout}_url"] = url_value(f.url)
        metadata[f"{layout}_size"] = f.size
        metadata[f"{layout}_sha256"] = f.checksum or ""
    if status is not None:
        metadata["queue_delay_s"] = (status.delayTime or 0) / 1000
        metadata["execution_time_s"] = (status.executionTime or 0) / 1000
    if store is not None:
        metadata["samples"] = dg.MetadataValue.md(samples_markdown(store, version.samples))
        document, _ = RegistryStore(store).read(completion.style)
        card_key, card = publish_model_card(store, document, document.version(version.number) or version)
        metadata["model_card"] = dg.MetadataValue.md(card)
        metadata["model_card_key"] = card_key
    metadata["sample_count"] = len(version.samples)
    if version.samples:
        metadata["sample_prompts"] = dg.MetadataValue.table(
            records=[dg.TableRecord(row) for row in sample_rows(version.samples)], schema=SAMPLES_SCHEMA
        )
    metadata["lora_header"] = dg.MetadataValue.table(
        records=[dg.TableRecord({"key": k, "value": str(v)}) for k, v in sorted(meta.items())], schema=HEADER_SCHEMA
    )
    return {k: v for k, v in metadata.items() if v is not None}, dg.DataVersion(version.s3_key or version.name)
