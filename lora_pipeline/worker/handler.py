"""The RunPod Serverless handler: one job = one LoRA version trained and stored.

``handler(job)`` follows RunPod's convention (``job = {"id": ..., "input": {...}}``)
and returns a ``TrainingResult`` dict, or ``{"error": "..."}``. It runs the same
way under ``runpod.serverless.start`` on a GPU worker, under the SDK's local test
mode (``python handler.py`` runs ``test_input.json`` beside this file), and in the
local backend's subprocess.

Order matters: everything that can be checked cheaply (the request, the version
name, the optimizer, the store, the dataset, the images, the base model's family)
is checked before the model is loaded, so a bad request costs seconds, not GPU
minutes. The LoRA file is uploaded last, because a valid file in the store is the
registry's proof of completion.

Importing this module has no side effects and does not import torch.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __name__ == "__main__":  # `python handler.py`: keep this folder's modules off the top level
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]

from pydantic import ValidationError

from lora_pipeline.contracts.problems import describe_validation_error
from lora_pipeline.contracts.training import ModelFamily, SampleImage, TrainingParams, TrainingRequest, TrainingResult
from lora_pipeline.registry.names import parse_version_name
from lora_pipeline.settings import SettingsError, get_settings, settings_or_exit
from lora_pipeline.storage.base import PreconditionFailed
from lora_pipeline.worker.errors import WorkerInputError
from lora_pipeline.worker.progress import Progress, runpod_progress

if TYPE_CHECKING:  # each imports at run time where it is used: importing the handler stays torch-free
    from lora_pipeline.worker.artifact import ArtifactFacts
    from lora_pipeline.worker.checkpoint import StoreCheckpointer
    from lora_pipeline.worker.data import Example
    from lora_pipeline.worker.train import TrainOutcome

log = logging.getLogger("lora_pipeline.worker")
TRAINING_HEARTBEAT_S = 300.0  # a training update at least this often, however slow the steps (LORA_STALL_AFTER_S)


def handler(job: dict[str, Any]) -> dict[str, Any]:
    """RunPod entry point: train the requested LoRA; never raises."""
    try:
        get_settings()  # a bad setting fails the job with its line, before anything is read
        return run_training_job(job, report=runpod_progress(job))
    except SettingsError as exc:
        log.error("job %s refused: %s", job.get("id"), exc)
        return {"error": f"worker settings: {exc}"}
    except WorkerInputError as exc:
        log.error("job %s refused: %s", job.get("id"), exc)
        return {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - the job must end with a readable error
        log.exception("job %s failed", job.get("id"))
        return {"error": f"training failed: {type(exc).__name__}: {exc}"}


def parse_request(job: dict[str, Any]) -> TrainingRequest:
    """The job's input as a TrainingRequest, or WorkerInputError naming the bad fields."""
    payload = job.get("input") if isinstance(job, dict) else None
    if not isinstance(payload, dict):
        raise WorkerInputError("input: the job has no 'input' object")
    try:
        request = TrainingRequest.model_validate(payload)
    except ValidationError as exc:
        problems = describe_validation_error(exc, root="input", limit=10)
        raise WorkerInputError(f"invalid training request: {problems}") from None
    if parse_version_name(request.version) is None:
        raise WorkerInputError(f"version: {request.version!r} is not a version name like 'V5'")
    return request


def run_training_job(job: dict[str, Any], *, report: Progress | None = None) -> dict[str, Any]:
    """The whole job: check, train, publish; raises WorkerInputError for a bad request or dataset.

    The steps are in the order the module docstring promises: every cheap check
    before the model loads, the diffusers file uploaded last.
    """
    started = time.perf_counter()
    started_at = datetime.now(UTC)
    job_id = str(job.get("id", "")) if isinstance(job, dict) else ""
    request = parse_request(job)
    report = report or (lambda update: None)

    store, key = open_job(request, job_id)
    finished = _already_trained(store, key, request)
    if finished is not None:
        report({"phase": "done", "note": "LoRA already in the store for this request"})
        return finished

    checked = check_job(request, job_id, store, key, report)
    outcome = train_job(checked, report)
    published = publish_job(checked, outcome, started_at, report)
    if published.deferred_to is not None:
        return published.deferred_to
    checked.checkpointer.clear()
    result = job_result(checked, outcome, published, duration_s=round(time.perf_counter() - started, 3))
    report({"phase": "done", "step": outcome.steps, "total": outcome.steps})
    return result


@dataclass
class CheckedJob:
    """A request checked against its store, dataset, base model and device: worth GPU minutes."""

    request: TrainingRequest
    job_id: str
    store: Any
    key: str  # the diffusers file: a valid file here is the registry's proof of completion
    params: TrainingParams  # the request's, with the dataset's trigger word when it names none
    examples: list[Example]
    model_dir: Path
    family: ModelFamily
    denoiser_layout: dict[str, Any]
    device: Any  # torch.device; not imported here, so that importing the handler stays torch-free
    checkpointer: StoreCheckpointer

    @property
    def kohya_key(self) -> str:
        from lora_pipeline.storage.keys import companion_key

        return companion_key(self.request.style, parse_version_name(self.request.version) or 0, "kohya")


@dataclass
class Published:
    """What publishing left in the store, or the result of a twin job that published first."""

    samples: list[SampleImage]
    metadata: dict[str, str]
    deferred_to: dict[str, Any] | None = None


def open_job(request: TrainingRequest, job_id: str) -> tuple[Any, str]:
    """The request's store and its LoRA's key, with this job's start marker written.

    The base model's name is checked first and the store opened second: both refuse a
    bad request without reading anything.
    """
    from lora_pipeline.storage.keys import lora_key
    from lora_pipeline.worker.base_model import describe_source

    describe_source(request.base_model)
    store = open_request_store(request)
    version_number = parse_version_name(request.version)
    assert version_number is not None
    key = lora_key(request.style, version_number)
    announce_start(store, request, job_id)
    return store, key


def check_job(request: TrainingRequest, job_id: str, store: Any, key: str, report: Progress) -> CheckedJob:
    """Everything that can refuse the job before the model loads: dataset, base model, device."""
    report({"phase": "dataset"})
    params, examples = check_dataset(request, store)
    report({"phase": "base_model"})
    model_dir, family, denoiser_layout = check_base_model(request, store)
    device = check_device(params)

    from lora_pipeline.storage.keys import checkpoint_prefix
    from lora_pipeline.worker.checkpoint import StoreCheckpointer

    checkpointer = StoreCheckpointer(store, checkpoint_prefix(request.style, request.version, request.request_id))
    return CheckedJob(
        request, job_id, store, key, params, examples, model_dir, family, denoiser_layout, device, checkpointer
    )


def check_dataset(request: TrainingRequest, store: Any) -> tuple[TrainingParams, list[Example]]:
    """The dataset's examples (every image fetched and decoded), and the params with its trigger word.

    A request that names no trigger word trains with the one the dataset was ingested
    with, so the LoRA answers to the word its captions were written around.
    """
    from lora_pipeline.worker.data import fetch_examples, load_manifest

    manifest = load_manifest(store, request.style, request.dataset_hash)
    examples = fetch_examples(store, manifest, request.style, request.dataset_hash)
    return with_dataset_trigger(request.params, manifest.trigger_word), examples


def with_dataset_trigger(params: TrainingParams, dataset_trigger: str | None) -> TrainingParams:
    """``params`` with the dataset's trigger word, unless they name one themselves."""
    trigger = params.trigger_word if params.trigger_word is not None else dataset_trigger
    if trigger != params.trigger_word:
        params = params.model_copy(update={"trigger_word": trigger})
    return params


def check_base_model(request: TrainingRequest, store: Any) -> tuple[Path, ModelFamily, dict[str, Any]]:
    """The base model's folder, family and denoiser config (UNet or transformer); refused if the
    family is not the requested one or (SDXL) the kohya file could not name its blocks."""
    from lora_pipeline.worker.base_model import resolve_base_model
    from lora_pipeline.contracts.families import BaseModelRefused, check_timestep_shift
    from lora_pipeline.worker.family import check_family, detect_family, denoiser_config

    model_dir = resolve_base_model(request.base_model, store)
    family = check_family(detect_family(model_dir, request.base_model), request.model_family, request.base_model)
    try:
        check_timestep_shift(request.params.timestep_shift, family, request.base_model)
    except BaseModelRefused as exc:
        raise WorkerInputError(str(exc)) from None
    denoiser_layout = denoiser_config(model_dir)
    if family == "sdxl":
        check_kohya_layout(denoiser_layout)
    return model_dir, family, denoiser_layout


def check_kohya_layout(denoiser_layout: dict[str, Any]) -> None:
    """The kohya file names SDXL modules by SGM block: a UNet without such names fails now, not
    after training."""
    from lora_pipeline.worker.kohya import KohyaNameError, check_unet_config

    try:
        check_unet_config(denoiser_layout)
    except KohyaNameError as exc:
        raise WorkerInputError(f"base model: its UNet cannot be exported in the kohya layout: {exc}") from None


def check_device(params: TrainingParams) -> Any:
    """The device training will run on, once the optimizer and precision are known to work there."""
    from lora_pipeline.worker.train import check_optimizer_available, pick_device, weight_dtype_for

    check_optimizer_available(params.optimizer)
    device = pick_device()
    weight_dtype_for(params.mixed_precision, device)
    return device


def train_job(checked: CheckedJob, report: Progress) -> TrainOutcome:
    """Train the LoRA, resuming from this request's checkpoints when a retry finds them."""
    from lora_pipeline.worker.train import run_fingerprint, train_lora

    request, params = checked.request, checked.params
    on_step = training_progress(report, params)
    report({"phase": "training", "step": 0})
    return train_lora(
        params,
        checked.family,
        checked.model_dir,
        checked.examples,
        fingerprint=run_fingerprint(params, checked.family, request.base_model, request.dataset_hash),
        checkpointer=checked.checkpointer if params.checkpoint_every else None,
        progress=on_step,
        device=checked.device,
    )


def training_progress(
    report: Progress,
    params: TrainingParams,
    *,
    heartbeat_s: float = TRAINING_HEARTBEAT_S,
    clock: Callable[[], float] = time.monotonic,
) -> Callable[[int, int, float], None]:
    """A progress callback that passes on about ten training updates, and always the last one:
    a progress update per step would flood RunPod's status endpoint. A long run also passes one
    every ``heartbeat_s``, so the orchestrator never takes slow steps for a stalled job."""
    every = max(1, _steps_hint(params) // 10)
    last = [clock()]

    def on_step(step: int, total: int, loss: float) -> None:
        now = clock()
        if step == total or step % every == 0 or now - last[0] >= heartbeat_s:
            last[0] = now
            report({"phase": "training", "step": step, "total": total, "loss": round(loss, 6)})

    return on_step


def publish_job(checked: CheckedJob, outcome: TrainOutcome, started_at: datetime, report: Progress) -> Published:
    """Write the LoRA file, publish its samples and its kohya companion, and the diffusers file last."""
    from lora_pipeline.worker.artifact import provenance_metadata, write_lora_file

    report({"phase": "saving"})
    metadata = provenance_metadata(artifact_facts(checked, outcome, started_at))
    with tempfile.TemporaryDirectory(prefix="lora-job-") as tmp:
        lora_file = write_lora_file(
            Path(tmp) / "lora.safetensors",
            checked.family,
            outcome.denoiser_lora,
            metadata,
            text_encoder_lora=outcome.text_encoder_lora,
            text_encoder_2_lora=outcome.text_encoder_2_lora,
            adapter_configs=outcome.adapter_configs,
        )
        samples = publish_samples(checked, lora_file, report)
        report({"phase": "uploading"})
        deferred_to = publish_files(checked, lora_file, Path(tmp))
        if deferred_to is not None:
            report({"phase": "done", "note": "another job of this request published first"})
    return Published(samples, metadata, deferred_to)


def artifact_facts(checked: CheckedJob, outcome: TrainOutcome, started_at: datetime) -> ArtifactFacts:
    """What the LoRA file's header records about how it was made."""
    from lora_pipeline.worker.artifact import ArtifactFacts
    from lora_pipeline.worker.data import tag_frequency
    from lora_pipeline.worker.families import family_for

    request = checked.request
    rules = family_for(checked.family, checked.model_dir)
    return ArtifactFacts(
        style=request.style,
        version=request.version,
        job_id=checked.job_id,
        request_id=request.request_id,
        dataset_hash=request.dataset_hash,
        base_model=request.base_model,
        family=checked.family,
        params=checked.params,
        steps=outcome.steps,
        num_train_images=len(checked.examples),
        tag_frequency=tag_frequency([e.caption for e in checked.examples]),
        training_seconds=outcome.train_seconds,
        started_at=started_at,
        finished_at=datetime.now(UTC),
        final_loss=outcome.final_loss,
        prediction_type=rules.prediction_type(),
        variant=rules.variant(),
        quantize_base=outcome.quantize_base,
        gradient_checkpointing=outcome.gradient_checkpointing,
        mixed_precision=outcome.mixed_precision,
        memory_plan=outcome.memory_plan,
    )


def publish_samples(checked: CheckedJob, lora_file: Path, report: Progress) -> list[SampleImage]:
    """Generate the requested sample images with the trained LoRA and store them beside it,
    each with its prompt and seed (``generate_samples`` seeds image ``i`` with ``seed + i``)."""
    params = checked.params
    if not params.num_sample_images:
        return []
    from lora_pipeline.worker.data import with_trigger
    from lora_pipeline.contracts.training import sample_key as stored_sample_key
    from lora_pipeline.worker.samples import generate_samples, sample_prompts

    report({"phase": "samples"})
    prompts = sample_prompts(
        [with_trigger(e.caption, params.trigger_word) for e in checked.examples], params.num_sample_images
    )
    samples: list[SampleImage] = []
    images = generate_samples(checked.model_dir, checked.family, lora_file, prompts, params, checked.device)
    for index, png in enumerate(images):
        sample_key = stored_sample_key(checked.key, index, params.sample_inference_steps, params.sample_inference_steps)
        checked.store.put(sample_key, png, content_type="image/png")
        samples.append(
            SampleImage(
                key=sample_key, prompt=prompts[index], seed=params.seed + index, url=checked.store.url(sample_key)
            )
        )
    return samples


def publish_files(checked: CheckedJob, lora_file: Path, tmp: Path) -> dict[str, Any] | None:
    """Upload the kohya file, then the diffusers file; the twin's result if a twin job of this
    request published first (None when this job's file is the one published)."""
    from lora_pipeline.worker.artifact import write_kohya_file

    store, key, request = checked.store, checked.key, checked.request
    # The kohya layout first (a companion: proves nothing alone), the diffusers file last.
    kohya_file = write_kohya_file(lora_file, tmp / "kohya.safetensors", denoiser_config=checked.denoiser_layout)
    _publish_companion(store, checked.kohya_key, kohya_file, request)
    # Last, and create-only: a valid file here means "completed", and a version's
    # file is never replaced, not even by a second job of the same request.
    try:
        store.upload_file(key, lora_file, if_none_match=True)
    except PreconditionFailed:
        published = _already_trained(store, key, request)
        if published is None:  # deleted again in between: nothing to defer to
            raise
        # Our kohya file may have replaced the winner's just before: derive it again from
        # the published diffusers file, so the pair holds one set of weights.
        _republish_companion(store, key, checked.kohya_key, checked.denoiser_layout, request, tmp)
        return published
    return None


def job_result(
    checked: CheckedJob, outcome: TrainOutcome, published: Published, *, duration_s: float
) -> dict[str, Any]:
    """The job's answer: where the files are, and the facts the registry records."""
    request, key, kohya_key = checked.request, checked.key, checked.kohya_key
    metadata = published.metadata
    return TrainingResult(
        style=request.style,
        version=request.version,
        lora_key=key,
        dataset_hash=request.dataset_hash,
        request_id=request.request_id,
        steps=outcome.steps,
        final_loss=outcome.final_loss,
        duration_s=duration_s,
        sample_keys=[s.key for s in published.samples],
        samples=published.samples,
        kohya_key=kohya_key,
        files={"kohya": kohya_key, "diffusers": key},
        metadata={k: v for k, v in metadata.items() if k.startswith("lora_pipeline.") and k != "lora_pipeline.params"},
    ).model_dump(mode="json")


def open_request_store(request: TrainingRequest):
    """The request's store, or the worker's ``LORA_STORAGE_URL``; a clear error if neither."""
    from lora_pipeline.storage.base import StorageError
    from lora_pipeline.storage.factory import open_store

    settings = get_settings()
    url = request.storage_url or (settings.storage_url if settings.storage_url_is_set else None)
    if not url:
        raise WorkerInputError("storage_url: the request has none and the worker's LORA_STORAGE_URL is not set")
    try:
        return open_store(url, settings=settings)
    except (StorageError, ValueError) as exc:
        raise WorkerInputError(f"storage_url: cannot open {url!r}: {exc}") from None


def announce_start(store: Any, request: TrainingRequest, job_id: str) -> None:
    """Write ``runs/<style>/<version>/<job id>.json``: this job runs this request.

    When a ``/run`` answer was lost the registry knows the version and its request
    id but not the job id; reconciliation reads this marker to attach the job, so it
    is polled and settled like any other. Best effort: a job is not failed for it.
    """
    from lora_pipeline.storage.keys import run_marker_key

    if not job_id:
        return
    try:
        key = run_marker_key(request.style, request.version, job_id)
        body = {"jobId": job_id, "requestId": request.request_id, "startedAt": datetime.now(UTC).isoformat()}
        store.put(key, json.dumps(body, sort_keys=True).encode(), content_type="application/json")
    except Exception:  # noqa: BLE001 - the marker only speeds up healing; training goes on
        log.warning("could not write the start marker of job %s", job_id, exc_info=True)


def _owner(store: Any, key: str) -> tuple[str | None, dict[str, str]] | None:
    """(request id, header metadata) of the LoRA file at ``key``, or None when there is none.

    A file whose header does not parse is refused rather than taken for "not trained":
    nothing here ever replaces an object it cannot identify. Store errors propagate
    (the job fails and can be retried), they never mean "absent".
    """
    if store.head(key) is None:
        return None
    from lora_pipeline.registry.safetensors_header import InvalidLoraFile
    from lora_pipeline.registry_store.lora_files import read_header

    try:
        metadata = dict(read_header(store, key).metadata)
    except InvalidLoraFile as exc:
        raise WorkerInputError(
            f"version: {key} already exists but is not a readable LoRA ({exc}); refusing to overwrite it"
        ) from None
    return metadata.get("lora_pipeline.request_id"), metadata


def _publish_companion(store: Any, key: str, path: Path, request: TrainingRequest) -> None:
    """Upload a file published beside the LoRA (the kohya layout): created if absent,
    replaced only when an earlier attempt of this same request wrote it."""
    try:
        store.upload_file(key, path, if_none_match=True)
        return
    except PreconditionFailed:
        found = _owner(store, key)
    if found is not None and found[0] != request.request_id:
        raise WorkerInputError(
            f"version: {key} already exists (written by request {found[0]!r}); refusing to overwrite it"
        )
    store.upload_file(key, path)  # this request's own earlier attempt: its weights are superseded


def _republish_companion(
    store: Any, key: str, kohya_key: str, denoiser_layout: dict, request: TrainingRequest, tmp: Path
) -> None:
    """The kohya file derived from the diffusers file published at ``key`` (by a twin job of this
    request), uploaded in place of whatever this job put there."""
    from lora_pipeline.worker.artifact import write_kohya_file

    published = tmp / "published.safetensors"
    store.download_file(key, published)
    _publish_companion(
        store,
        kohya_key,
        write_kohya_file(published, tmp / "republished.safetensors", denoiser_config=denoiser_layout),
        request,
    )


def _already_trained(store: Any, key: str, request: TrainingRequest) -> dict[str, Any] | None:
    """A retry of a job that uploaded its LoRA but died before returning gets the same result.

    A file at the key from another request (or one that cannot be read) is never
    overwritten: the job fails with an error naming the key and its writer.
    """
    found = _owner(store, key)
    if found is None:
        return None
    owner, metadata = found
    if owner != request.request_id:
        raise WorkerInputError(
            f"version: {key} already exists (written by request {owner!r}); refusing to overwrite it"
        )
    from lora_pipeline.storage.keys import companion_key

    ours = {k: v for k, v in metadata.items() if k.startswith("lora_pipeline.") and k != "lora_pipeline.params"}
    stem = key.rsplit(".", 1)[0]
    kohya = companion_key(request.style, parse_version_name(request.version) or 0, "kohya")
    has_kohya = store.head(kohya) is not None  # absent for versions trained before both were written
    return TrainingResult(
        style=request.style,
        version=request.version,
        lora_key=key,
        dataset_hash=request.dataset_hash,
        request_id=request.request_id,
        steps=int(metadata.get("lora_pipeline.steps", "0") or 0),
        final_loss=float(metadata["lora_pipeline.final_loss"]) if metadata.get("lora_pipeline.final_loss") else None,
        duration_s=float(metadata.get("lora_pipeline.training_time", "0") or 0),
        sample_keys=[info.key for info in store.list(f"{stem}_sample_")],
        kohya_key=kohya if has_kohya else None,
        files={"kohya": kohya, "diffusers": key} if has_kohya else {"diffusers": key},
        metadata=ours,
    ).model_dump(mode="json")


def _steps_hint(params: Any) -> int:
    return params.max_train_steps if params.num_train_epochs is None else 100


def main() -> None:
    """``python handler.py``: the SDK's worker loop on RunPod, its local test mode here.

    A bad setting stops the worker at start: its line on stderr, exit status 2."""
    logging.basicConfig(level=logging.INFO)
    settings = settings_or_exit("worker")
    if not settings.under_runpod and not settings.runpod_webhook_get_job:
        from lora_pipeline.worker.local_test import prepare_local_store

        prepare_local_store(settings)
    import runpod

    runpod.serverless.start({"handler": handler})


if __name__ == "__main__":
    main()
