"""The training loop: diffusers' LoRA recipe, with the work that does not change done once.

The recipe is diffusers' LoRA scripts' (peft ``LoraConfig`` + ``add_adapter`` on the
UNet or transformer, trainable parameters in fp32, the MSE to the family's target).
Everything that differs by model family (loading, captions, timesteps, target,
conditioning) is the family's (``worker/families/``): this loop is family-free. What
differs from the reference is where time goes: the VAE encodes each image once (its
latent mean and std are cached and a fresh latent is sampled per step, as the
reference does by re-encoding), text embeddings are computed once unless the text
encoder trains, attention runs through PyTorch SDPA, a UNet is channels-last, the
denoiser is optionally compiled, and AdamW is fused on CUDA.

Every random draw of step ``s`` comes from a generator seeded by ``(seed, s)`` and
batch order is a pure function of ``(seed, epoch)``, so a run resumed from a
checkpoint takes exactly the steps an uninterrupted run takes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import random
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F

from lora_pipeline.contracts.training import ModelFamily, QuantizeBase, TrainingParams
from lora_pipeline.worker.data import (
    Example,
    batches_per_epoch,
    bucket_for,
    epoch_batches,
    resize_and_crop,
    with_trigger,
)
from lora_pipeline.worker.errors import WorkerInputError
from lora_pipeline.worker.families import Family, Loaded, family_for
from lora_pipeline.worker.memory_plan import BaseSize, plan_levers, transformer_levels, unet_levels
from lora_pipeline.worker.quantize import big_linears, check_quantization_available, quantize_denoiser
from lora_pipeline.worker.levers import (
    SpeedLevers,
    compile_unet,
    fill_short_batches,
    fuse_qkv,
    largest_batch,
    memory_probe,
    training_settings,
)

TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
HOST = torch.device("cpu")  # where the base model is loaded, before its parts go to the device in turn

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, float], None]


class Checkpointer(Protocol):
    """Where training state goes every N steps, and where a retried job finds it."""

    def load_latest(self) -> dict[str, Any] | None: ...

    def save(self, step: int, state: dict[str, Any]) -> None: ...


@dataclass
class TrainOutcome:
    """What training produced: LoRA layers in diffusers naming, per component."""

    denoiser_lora: dict[str, torch.Tensor]  # the UNet's or the diffusion transformer's
    text_encoder_lora: dict[str, torch.Tensor] | None
    text_encoder_2_lora: dict[str, torch.Tensor] | None
    losses: list[float]
    steps: int
    images_seen: int
    resumed_from: int | None
    train_seconds: float
    device: str
    # peft LoraConfig of each adapter (rank, alpha, targets): written into the file so
    # load_lora_weights applies alpha/rank, not an assumed alpha == rank.
    adapter_configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    batch_size: int = 0  # the batch trained with (levers.max_batch may raise the requested one)
    levers: dict[str, Any] = field(default_factory=dict)  # the speed levers as resolved for the device
    quantize_base: str = "none"  # how the frozen denoiser was stored while training (params.quantize_base)
    quantized_linears: int = 0  # how many of its linears that quantized
    gradient_checkpointing: bool = False  # as trained (params.gradient_checkpointing, "auto" decided)
    mixed_precision: str = "no"  # as trained (params.mixed_precision, "auto" decided)
    memory_plan: str = ""  # why the planner chose the levers left on "auto" (empty: none were)

    @property
    def final_loss(self) -> float | None:
        if not self.losses:
            return None
        tail = self.losses[-10:]
        return sum(tail) / len(tail)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolved_precision(mixed_precision: str, device: torch.device) -> str:
    """``mixed_precision`` with "auto" decided for ``device``: bf16 on a GPU that has it (as the
    reference scripts train large bases), fp16 on an older GPU, "no" (fp32) on the CPU."""
    if mixed_precision != "auto":
        return mixed_precision
    if device.type != "cuda":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def weight_dtype_for(mixed_precision: str, device: torch.device) -> torch.dtype:
    """The frozen base's dtype (the LoRA's own weights stay fp32: ``add_lora``)."""
    mixed_precision = resolved_precision(mixed_precision, device)
    if mixed_precision == "bf16":
        return torch.bfloat16
    if mixed_precision == "fp16":
        if device.type != "cuda":
            raise WorkerInputError("params.mixed_precision: 'fp16' needs a CUDA GPU; use 'bf16' or 'no'")
        return torch.float16
    return torch.float32


def check_optimizer_available(optimizer: str) -> None:
    """8-bit AdamW needs bitsandbytes; say so before loading anything."""
    if optimizer == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise WorkerInputError(
                "params.optimizer: 'adamw8bit' needs the bitsandbytes package, which is not "
                "installed in this worker; use 'adamw' or 'adamw_fused'"
            ) from None


def total_steps(params: TrainingParams, num_batches_per_epoch: int) -> int:
    """Optimizer steps: ``max_train_steps``, or epochs × updates per epoch."""
    if params.num_train_epochs is None:
        return params.max_train_steps
    updates = math.ceil(num_batches_per_epoch / params.gradient_accumulation_steps)
    return params.num_train_epochs * updates


def run_fingerprint(params: TrainingParams, family: str, base_model: str, dataset_hash: str) -> str:
    """Identifies what a checkpoint belongs to; a checkpoint of anything else is ignored."""
    payload = json.dumps(
        {"params": params.model_dump(mode="json"), "family": family, "base": base_model, "data": dataset_hash},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def add_lora(models: Loaded, params: TrainingParams) -> list[torch.nn.Parameter]:
    """Attach peft LoRA adapters; return the trainable parameters (fp32), in a fixed order."""
    from peft import LoraConfig

    # peft annotates lora_alpha as int, but only divides by it: a float alpha is valid.
    alpha: int = params.effective_alpha  # type: ignore[assignment]
    unet_config = LoraConfig(
        r=params.rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(params.target_modules)
    )
    try:
        with warnings.catch_warnings():
            # peft warns, per torchao layer, that it could not merge into a quantized base: never asked of it.
            warnings.filterwarnings("ignore", message=".*get_apply_tensor_subclass", category=UserWarning)
            models.denoiser.add_adapter(unet_config)
    except ValueError as exc:
        raise WorkerInputError(f"params.target_modules: {exc}") from None
    modules = [models.denoiser]
    if params.train_text_encoder and not models.text_encoders:
        raise WorkerInputError(
            "params.train_text_encoder: this family's text encoder is not trained (its reference script "
            "adapts the transformer only); set it to false"
        )
    if params.train_text_encoder:
        te_config = LoraConfig(
            r=params.rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=TEXT_ENCODER_TARGETS
        )
        for encoder in models.text_encoders:
            _inject_lora(encoder, te_config)
            modules.append(encoder)
    trainable = []
    for module in modules:
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.data.float()
                trainable.append(param)
    return trainable


def check_companion_names(family: Family, denoiser: Any, alpha: float) -> None:
    """Refuse, before the first step, a target the primary (ComfyUI/kohya) file cannot name.

    The companion file is written after training; a module its layout has no name for (FLUX.1's
    swapped ``norm_out``, FLUX.2's shared modulations …) would otherwise fail the job only after
    the whole run was spent. The family's own naming runs here on the freshly attached adapters."""
    from peft.tuners.lora import LoraLayer

    from lora_pipeline.worker.kohya import KohyaNameError

    layers: dict[str, Any] = {name: m for name, m in denoiser.named_modules() if isinstance(m, LoraLayer)}
    modules = {
        (family.denoiser_component, name): {
            "down": layer.lora_A["default"].weight.detach(),
            "up": layer.lora_B["default"].weight.detach(),
        }
        for name, layer in layers.items()
        if "default" in layer.lora_A
    }
    try:
        family.kohya_tensors(modules, alpha, dict(denoiser.config))
    except KohyaNameError as exc:
        raise WorkerInputError(f"params.target_modules: the ComfyUI/kohya file cannot hold it: {exc}") from None


def _inject_lora(model: Any, config: Any) -> None:
    """What ``add_adapter`` does, via peft directly.

    transformers 5's ``add_adapter`` insists on a newer peft than diffusers 0.42
    pairs with; the injected layers and the ``peft_config`` record are the same.
    """
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, model, adapter_name="default")
    model.peft_config = {"default": config}


def make_optimizer(params: TrainingParams, trainable: Sequence[torch.nn.Parameter], device: torch.device):
    check_optimizer_available(params.optimizer)
    kwargs: dict[str, Any] = dict(lr=params.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    if params.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(trainable, **kwargs)
    fused = params.optimizer == "adamw_fused" or device.type == "cuda"
    if fused:
        return torch.optim.AdamW(trainable, fused=True, **kwargs)
    return torch.optim.AdamW(trainable, foreach=True, **kwargs)


@dataclass
class _Prepared:
    buckets: list[tuple[int, int]]
    latent_mean: list[torch.Tensor]
    latent_std: list[torch.Tensor]
    captions: list[str]
    # Per example, keyword → tensor (no batch dimension): what its image adds (SDXL's time ids)
    # and, unless the text encoders train, its caption's embeddings.
    conditioning: list[dict[str, torch.Tensor]]
    text_cached: bool


@torch.no_grad()
def prepare_cache(
    family: Family,
    models: Loaded,
    examples: Sequence[Example],
    params: TrainingParams,
    device: torch.device,
    dtype: torch.dtype,
) -> _Prepared:
    """Encode every image once (latent mean/std) and, unless the text encoder trains, every caption."""
    import numpy as np

    buckets, means, stds, conditioning = [], [], [], []
    for example in examples:
        bucket = bucket_for(example.image.size, params.resolution, params.enable_bucketing)
        crop, top_left = resize_and_crop(example.image, bucket)
        pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        dist = models.vae.encode(pixels.unsqueeze(0).to(device)).latent_dist
        means.append(dist.mean[0].to(dtype))
        # A zero std trains on the posterior's mode (the family's script does); the draw stays.
        stds.append(torch.zeros_like(means[-1]) if family.latent_mode else dist.std[0].to(dtype))
        buckets.append(bucket)
        extra = family.image_conditioning(example.image.size, bucket, top_left)
        conditioning.append({k: torch.tensor(v, dtype=dtype, device=device) for k, v in extra.items()})
    captions = [with_trigger(e.caption, params.trigger_word) for e in examples]
    if not params.train_text_encoder:
        for caption, cond in zip(captions, conditioning, strict=True):
            for key, value in family.encode_prompts(models, [caption], device).items():
                cond[key] = value[0].to(dtype)
    return _Prepared(buckets, means, stds, captions, conditioning, not params.train_text_encoder)


def step_seed(seed: int, step: int, micro: int) -> int:
    return (seed * 1_000_003 + step * 1009 + micro) % (2**63)


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    return torch.Generator().manual_seed(step_seed(seed, step, micro))


def steps_for_batch(params: TrainingParams, num_batches_per_epoch: int, batch_size: int) -> int:
    """Optimizer steps at ``batch_size``: a larger batch than asked for sees the same images in fewer steps."""
    if params.num_train_epochs is None and batch_size != params.train_batch_size:
        return max(1, math.ceil(params.max_train_steps * params.train_batch_size / batch_size))
    return total_steps(params, num_batches_per_epoch)


@dataclass
class _Batch:
    ids: list[int]
    bucket: tuple[int, int]
    rows: torch.Tensor | None = None  # rows in the bucket's stacked tensors, on the device
    ids_on_device: torch.Tensor | None = None


class _Batches:
    """Which examples each micro-step trains on, and where their cached tensors are.

    Batch order stays a pure function of ``(seed, epoch)`` (computed once per epoch).
    With ``levers.device_cache`` the cache is stacked per bucket on the device and a
    batch is an index into it: an epoch's indices go to the device in one copy,
    instead of a ``torch.stack`` of cached tensors every step.
    """

    def __init__(
        self, cache: _Prepared, batch_size: int, seed: int, *, static: bool, on_device: bool, device: torch.device
    ):
        self.cache, self.batch_size, self.seed = cache, batch_size, seed
        self.static, self.on_device, self.device = static, on_device, device
        self.per_epoch = batches_per_epoch(cache.buckets, batch_size)
        self._epoch: int | None = None
        self._batches: list[_Batch] = []
        if on_device:
            self._stack()

    def _stack(self) -> None:
        cache = self.cache
        members: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(cache.buckets):
            members.setdefault(bucket, []).append(index)
        self.row = {index: row for ids in members.values() for row, index in enumerate(ids)}
        self.mean = {b: torch.stack([cache.latent_mean[i] for i in ids]) for b, ids in members.items()}
        self.std = {b: torch.stack([cache.latent_std[i] for i in ids]) for b, ids in members.items()}
        keys = cache.conditioning[0].keys() if cache.conditioning else ()
        self.conditioning = {k: torch.stack([c[k] for c in cache.conditioning]) for k in keys}
        # The per-example tensors become views of the stacked ones: the cache is not held twice.
        for bucket, ids in members.items():
            for row, index in enumerate(ids):
                cache.latent_mean[index] = self.mean[bucket][row]
                cache.latent_std[index] = self.std[bucket][row]
        for index, cond in enumerate(cache.conditioning):
            for key in keys:
                cond[key] = self.conditioning[key][index]

    def get(self, index: int) -> _Batch:
        epoch = index // self.per_epoch
        if epoch != self._epoch:
            self._load(epoch)
        return self._batches[index % self.per_epoch]

    def _load(self, epoch: int) -> None:
        buckets = self.cache.buckets
        batches = epoch_batches(buckets, self.batch_size, self.seed, epoch)
        if self.static:
            batches = fill_short_batches(batches, buckets, self.batch_size)
        self._epoch = epoch
        if not self.on_device:
            self._batches = [_Batch(ids, buckets[ids[0]]) for ids in batches]
            return
        flat = torch.tensor([[self.row[i] for ids in batches for i in ids], [i for ids in batches for i in ids]])
        if self.device.type == "cuda":
            flat = flat.pin_memory()
        flat = flat.to(self.device, non_blocking=True)
        sizes = [len(ids) for ids in batches]
        self._batches = [
            _Batch(ids, buckets[ids[0]], rows, on_device)
            for ids, rows, on_device in zip(batches, flat[0].split(sizes), flat[1].split(sizes), strict=True)
        ]

    def tensors(self, batch: _Batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(latent mean, latent std, cached conditioning) of the batch's examples."""
        cache = self.cache
        if self.on_device:
            assert batch.rows is not None and batch.ids_on_device is not None  # set for an on-device cache
            mean = self.mean[batch.bucket].index_select(0, batch.rows)
            std = self.std[batch.bucket].index_select(0, batch.rows)
            return mean, std, {k: v.index_select(0, batch.ids_on_device) for k, v in self.conditioning.items()}
        ids = batch.ids
        mean = torch.stack([cache.latent_mean[i] for i in ids])
        std = torch.stack([cache.latent_std[i] for i in ids])
        keys = cache.conditioning[ids[0]].keys()
        return mean, std, {k: torch.stack([cache.conditioning[i][k] for i in ids]) for k in keys}


def train_lora(
    params: TrainingParams,
    family: ModelFamily,
    model_dir: Path,
    examples: Sequence[Example],
    *,
    fingerprint: str = "",
    checkpointer: Checkpointer | None = None,
    progress: ProgressFn | None = None,
    device: torch.device | None = None,
    levers: SpeedLevers | None = None,
    device_memory: int | None = None,
) -> TrainOutcome:
    """Train a LoRA on ``examples`` and return its layers; resumes from ``checkpointer``.

    ``device_memory`` (bytes) is what the memory planner plans the levers left on "auto" for;
    default the CUDA device's total memory (on the CPU: none, so they stay off).

    ``progress(step, total, loss)`` is called once per step, in order; with
    ``levers.log_every = N`` the calls come in groups of N, when the losses reach the
    host. ``levers`` default to ``LORA_TRAIN_LEVERS`` (see ``levers.py``).
    """
    if not examples:
        raise WorkerInputError("dataset has no images to train on")
    started = time.perf_counter()
    device = device or pick_device()
    dtype = weight_dtype_for(params.mixed_precision, device)
    check_optimizer_available(params.optimizer)
    check_quantization_available(params.quantize_base)
    levers = (levers if levers is not None else SpeedLevers.from_env()).resolve(device, params.compile)
    with training_settings(levers):
        return _train(
            params,
            family,
            model_dir,
            examples,
            fingerprint,
            checkpointer,
            progress,
            device,
            dtype,
            levers,
            started,
            device_memory,
        )


def _train(
    params: TrainingParams,
    family: ModelFamily,
    model_dir: Path,
    examples: Sequence[Example],
    fingerprint: str,
    checkpointer: Checkpointer | None,
    progress: ProgressFn | None,
    device: torch.device,
    dtype: torch.dtype,
    levers: SpeedLevers,
    started: float,
    device_memory: int | None,
) -> TrainOutcome:
    """Prepare, resume, run the steps, export: each step below keeps the RNG draws in the order
    an uninterrupted run makes them, which is what makes a resumed run exact."""
    # Long only in lines: each step is a named function; the formatter puts each argument of _Run
    # and TrainOutcome on its own line.
    torch.manual_seed(params.seed)
    random.seed(params.seed)
    rules = family_for(family, model_dir)
    if params.train_text_encoder and not rules.text_encoder_components:
        raise WorkerInputError(
            f"params.train_text_encoder: a {rules.name} LoRA trains no text encoder (nor does its script)"
        )
    rules.timestep_shift = params.timestep_shift
    # Loaded on the host; the encoders reach the device to fill the cache and leave it, and only
    # then the denoiser comes (quantized as it arrives): the device never holds both at once.
    models = rules.load(HOST, dtype)
    encoders_to(models, device)
    cache = prepare_cache(rules, models, examples, params, device, dtype)
    memory = plan_memory(models, cache, params, device, dtype, device_memory)
    offload_cached_encoders(models, params, device)
    quantized = quantize_denoiser(models.denoiser, memory.quantize_base, device)
    trainable, optimizer = prepare_lora_training(rules, models, params, levers, device, memory.gradient_checkpointing)

    state = resumable_state(checkpointer, fingerprint)
    if state is not None:
        batch_size = resumed_batch_size(state, params)
    elif levers.max_batch:
        batch_size = _largest_fitting_batch(rules, models, cache, params, levers, trainable, device, dtype)
    else:
        batch_size = params.train_batch_size
    batches = _Batches(
        cache, batch_size, params.seed, static=bool(levers.static_shapes), on_device=levers.device_cache, device=device
    )
    n_steps = steps_for_batch(params, batches.per_epoch, batch_size)
    lr_scheduler = make_lr_scheduler(params, optimizer, n_steps)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    start_step = 0
    losses: list[float] = []
    if state is not None:
        start_step, losses = resume_from(state, trainable, optimizer, lr_scheduler, scaler)

    run = _Run(
        params,
        rules,
        models,
        enter_training_mode(models, params, levers),
        cache,
        batches,
        trainable,
        optimizer,
        lr_scheduler,
        scaler,
        levers,
        device,
        dtype,
        batch_size,
        n_steps,
    )
    images_seen = _train_steps(run, start_step, losses, fingerprint, checkpointer, progress)

    denoiser_lora, te_lora, te2_lora = _lora_layers(models, params, peft_names=rules.peft_names)
    return TrainOutcome(
        denoiser_lora=denoiser_lora,
        text_encoder_lora=te_lora,
        text_encoder_2_lora=te2_lora,
        losses=losses,
        steps=n_steps,
        images_seen=images_seen,
        resumed_from=start_step if state is not None else None,
        train_seconds=time.perf_counter() - started,
        device=str(device),
        adapter_configs=adapter_configs(rules, models, params),
        batch_size=batch_size,
        levers=levers.as_dict(),
        quantize_base=memory.quantize_base if quantized else "none",
        quantized_linears=quantized,
        gradient_checkpointing=memory.gradient_checkpointing,
        mixed_precision=resolved_precision(params.mixed_precision, device),
        memory_plan=memory.why,
    )


# -- prepare ------------------------------------------------------------------------


def encoders_to(models: Loaded, device: torch.device) -> None:
    """The VAE and every text encoder on ``device``, to fill the cache (the denoiser stays where it is)."""
    for module in (models.vae, *models.text_encoders, *models.frozen_encoders):
        module.to(device)


def offload_cached_encoders(models: Loaded, params: TrainingParams, device: torch.device) -> None:
    """Everything the cache replaced leaves the device: the VAE goes to the host (families read its
    config: latent scaling, shift), and the text encoders are released altogether unless they
    train (``models.text_encoders`` and ``frozen_encoders`` emptied, so nothing holds them). That
    memory is what the reference scripts spend per step, and it is free before the denoiser
    arrives (``quantize_denoiser``): T5-XXL alone is 9.5 GB in bf16."""
    models.vae.to(HOST)
    if not params.train_text_encoder:
        released = len(models.text_encoders) + len(models.frozen_encoders)
        models.text_encoders.clear()
        models.frozen_encoders.clear()
        log.info("text embeddings cached: %d text encoder(s) released", released)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def prepare_lora_training(
    family: Family,
    models: Loaded,
    params: TrainingParams,
    levers: SpeedLevers,
    device: torch.device,
    gradient_checkpointing: bool,
) -> tuple[list[torch.nn.Parameter], Any]:
    """The LoRA adapters (initialised from the seed alone) and their optimizer, on a denoiser in the
    memory layout the levers ask for; returns (trainable parameters, optimizer)."""
    if gradient_checkpointing:
        models.denoiser.enable_gradient_checkpointing()
        if params.train_text_encoder:
            for encoder in models.text_encoders:
                encoder.gradient_checkpointing_enable()
    # Re-seeded here so the adapters' initial weights do not depend on what loading drew.
    torch.manual_seed(params.seed)
    trainable = add_lora(models, params)
    check_companion_names(family, models.denoiser, params.effective_alpha)
    if levers.channels_last and family.channels_last:
        models.denoiser.to(memory_format=torch.channels_last)
    if levers.fuse_qkv:
        if family.fused_qkv:
            fuse_qkv(models.denoiser)
        else:
            log.warning("levers.fuse_qkv: not implemented for %s attention; training unfused", family.name)
    return trainable, make_optimizer(params, trainable, device)


@dataclass(frozen=True)
class MemoryLevers:
    """The memory levers a run trains with: the request's, with "auto" decided by the planner."""

    quantize_base: QuantizeBase
    gradient_checkpointing: bool
    why: str = ""


def plan_memory(
    models: Loaded,
    cache: _Prepared,
    params: TrainingParams,
    device: torch.device,
    dtype: torch.dtype,
    device_memory: int | None,
) -> MemoryLevers:
    """``params``' memory levers, those on "auto" chosen by ``memory_plan.plan_levers`` for
    ``device_memory`` (default: the CUDA device's); raises ``DoesNotFit`` when nothing fits.

    Without a memory to plan for (the CPU), "auto" is the plain run: no quantization, no
    checkpointing."""
    quantize, checkpointing = params.quantize_base, params.gradient_checkpointing
    if quantize != "auto" and checkpointing != "auto":
        return MemoryLevers(quantize, bool(checkpointing))
    if device_memory is None and device.type == "cuda":
        device_memory = torch.cuda.get_device_properties(device).total_memory
    if device_memory is None:
        log.info("memory plan: %s memory is not known; 'auto' levers stay off", device.type)
        return MemoryLevers(
            "none" if quantize == "auto" else quantize,
            False if checkpointing == "auto" else bool(checkpointing),
            f"{device.type}: no memory to plan for, auto levers off",
        )
    plan = plan_levers(
        measure_base(models, cache, params),
        resolution=params.resolution,
        rank=params.rank,
        batch=params.train_batch_size,
        device_bytes=device_memory,
        mixed_precision="no" if dtype == torch.float32 else "bf16",
        quantize_base=quantize,
        gradient_checkpointing=checkpointing,
        train_text_encoder=params.train_text_encoder,
        nf4_available=importlib.util.find_spec("bitsandbytes") is not None,
    )
    log.info("memory plan: %s", plan.why())
    chosen = plan.levers
    return MemoryLevers(cast(QuantizeBase, chosen.quantize_base), chosen.gradient_checkpointing, plan.why())


def measure_base(models: Loaded, cache: _Prepared, params: TrainingParams) -> BaseSize:
    """The planner's figures of the loaded base: parameter counts, the denoiser's levels (its
    repeated blocks' width and number; a UNet's from its config), the LoRA's size for
    ``params.target_modules``, and the text tokens each block sees (from the cache)."""
    denoiser = models.denoiser
    config = dict(getattr(denoiser, "config", {}) or {})
    linears = {n: m for n, m in denoiser.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = list(params.target_modules)
    lora_dims = sum(
        m.in_features + m.out_features
        for n, m in linears.items()
        if any(n == t or n.endswith("." + t) for t in targets)
    )
    blocks = [m for m in denoiser.modules() if type(m).__name__ in set(getattr(denoiser, "_repeated_blocks", ()) or ())]
    text_tokens = 0
    if "block_out_channels" in config:
        attention = ["CrossAttn" in kind for kind in config.get("down_block_types", ())]
        levels = unet_levels(config["block_out_channels"], int(config.get("layers_per_block", 2)), attention)
    else:
        width = next((m.in_features for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear)), 0)
        levels = transformer_levels(width, len(blocks))
        cached = [t for c in cache.conditioning[:1] for t in c.values() if t.ndim >= 2]
        text_tokens = max((t.shape[-2] for t in cached), default=0)
    return BaseSize(
        name=type(denoiser).__name__,
        denoiser_params=sum(p.numel() for p in denoiser.parameters()),
        quantizable_params=sum(m.weight.numel() for _, m in big_linears(denoiser)),
        encoder_params=sum(p.numel() for e in (*models.text_encoders, *models.frozen_encoders) for p in e.parameters()),
        vae_params=sum(p.numel() for p in models.vae.parameters()),
        levels=levels,
        lora_dims=lora_dims,
        text_tokens=text_tokens,
    )


def make_lr_scheduler(params: TrainingParams, optimizer: Any, n_steps: int) -> Any:
    """diffusers' learning-rate schedule over the run's ``n_steps`` optimizer steps."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        params.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=params.lr_warmup_steps,
        num_training_steps=n_steps,
    )


def enter_training_mode(models: Loaded, params: TrainingParams, levers: SpeedLevers) -> Any:
    """The denoiser to call (compiled when the levers say so), with every module in train or eval
    mode as it trains or not."""
    denoiser = compile_unet(models.denoiser, levers)
    for module in (models.denoiser, *models.text_encoders):
        module.train(params.train_text_encoder or module is models.denoiser)
    return denoiser


# -- resume and checkpoint -------------------------------------------------------------


def resumable_state(checkpointer: Checkpointer | None, fingerprint: str) -> dict[str, Any] | None:
    """The latest checkpoint when it belongs to this run (same fingerprint), else None.

    A checkpoint of other settings, data or base model would continue a different run:
    it is ignored and training starts over.
    """
    state = checkpointer.load_latest() if checkpointer else None
    if state is not None and state.get("fingerprint") != fingerprint:
        return None
    return state


def resumed_batch_size(state: dict[str, Any], params: TrainingParams) -> int:
    """The batch the checkpointed run trained with (levers.max_batch may have raised it): batch
    order and the step count depend on it, so a resumed run keeps it rather than probing again."""
    return int(state.get("batch_size") or params.train_batch_size)


def resume_from(
    state: dict[str, Any],
    trainable: Sequence[torch.nn.Parameter],
    optimizer: Any,
    lr_scheduler: Any,
    scaler: torch.amp.GradScaler | None,
) -> tuple[int, list[float]]:
    """Put back what ``checkpoint_state`` saved; returns (steps already done, their losses).

    The weights, optimizer moments, schedule position, loss scale and RNG all come
    back, so the steps that follow are the ones the interrupted run would have taken.
    """
    with torch.no_grad():
        for param, saved in zip(trainable, state["lora"], strict=True):
            param.copy_(saved.to(param.device))
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    _restore_rng(state["rng"])
    return int(state["step"]), list(state["losses"])


def checkpoint_state(
    fingerprint: str,
    step: int,
    batch_size: int,
    trainable: Sequence[torch.nn.Parameter],
    optimizer: Any,
    lr_scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    losses: list[float],
) -> dict[str, Any]:
    """Everything ``resume_from`` needs to continue after ``step`` exactly, and the fingerprint
    that says which run it belongs to."""
    return {
        "fingerprint": fingerprint,
        "step": step,
        "batch_size": batch_size,
        "lora": [p.detach().cpu().clone() for p in trainable],
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler else None,
        "rng": _rng_state(),
        "losses": losses,
    }


def checkpoint_due(params: TrainingParams, checkpointer: Checkpointer | None, done: int, n_steps: int) -> bool:
    """Every ``checkpoint_every`` steps, but not after the last: the LoRA file is the final state."""
    return bool(checkpointer and params.checkpoint_every and done % params.checkpoint_every == 0 and done < n_steps)


# -- step ---------------------------------------------------------------------------


@dataclass
class _Run:
    """What every optimisation step uses, fixed before the first one."""

    params: TrainingParams
    family: Family
    models: Loaded
    denoiser: Any  # models.denoiser, or its compiled form
    cache: _Prepared
    batches: _Batches
    trainable: list[torch.nn.Parameter]
    optimizer: Any
    lr_scheduler: Any
    scaler: torch.amp.GradScaler | None
    levers: SpeedLevers
    device: torch.device
    dtype: torch.dtype
    batch_size: int
    n_steps: int
    autocast: Any = field(init=False)
    scaling: float = field(init=False)  # the VAE's latent scaling and shift
    shift: float = field(init=False)
    # One generator on the device, re-seeded per micro-step: the draws of step s are a
    # function of (seed, s) as before, without host→device copies of noise.
    device_gen: torch.Generator | None = field(init=False)

    def __post_init__(self) -> None:
        self.autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        self.scaling, self.shift = self.family.latent_transform(self.models)
        self.device_gen = torch.Generator(device=self.device) if self.levers.device_cache else None


def _train_steps(
    run: _Run,
    start_step: int,
    losses: list[float],
    fingerprint: str,
    checkpointer: Checkpointer | None,
    progress: ProgressFn | None,
) -> int:
    """Steps ``start_step`` to the end, appending to ``losses``; returns the images seen in all.

    Losses stay on the device until a log, checkpoint or the last step needs them on
    the host, so most steps never wait for the GPU.
    """
    params, n_steps = run.params, run.n_steps
    images_seen = start_step * params.gradient_accumulation_steps * run.batch_size
    pending: list[tuple[int, torch.Tensor]] = []  # (step, loss on the device) not yet on the host
    log_every = run.levers.log_every
    assert log_every is not None  # SpeedLevers.resolve decided it
    for step in range(start_step, n_steps):
        step_loss, images = optimisation_step(run, step)
        images_seen += images
        done = step + 1
        pending.append((done, step_loss))
        due = checkpoint_due(params, checkpointer, done, n_steps)
        if not (due or done % log_every == 0 or done == n_steps):
            continue
        flushed = _flush_losses(pending, losses)
        if due and checkpointer is not None:  # due: there is a checkpointer
            checkpointer.save(
                done,
                checkpoint_state(
                    fingerprint,
                    done,
                    run.batch_size,
                    run.trainable,
                    run.optimizer,
                    run.lr_scheduler,
                    run.scaler,
                    losses,
                ),
            )
        if progress:
            for flushed_step, value in flushed:
                progress(flushed_step, n_steps, value)
    return images_seen


def optimisation_step(run: _Run, step: int) -> tuple[torch.Tensor, int]:
    """One optimizer update over ``gradient_accumulation_steps`` micro-batches; returns (the
    step's loss, still on the device, and the images it trained on)."""
    accumulation = run.params.gradient_accumulation_steps
    step_loss: torch.Tensor | None = None
    images = 0
    for micro in range(accumulation):
        batch = run.batches.get(step * accumulation + micro)
        loss = _micro_batch_loss(run, batch, step, micro) / accumulation
        (run.scaler.scale(loss) if run.scaler else loss).backward()
        step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
        images += len(batch.ids)
    _apply_gradients(run)
    assert step_loss is not None  # gradient_accumulation_steps >= 1
    return step_loss, images


def _micro_batch_loss(run: _Run, batch: _Batch, step: int, micro: int) -> torch.Tensor:
    """The MSE between the denoiser's prediction and the family's target on one micro-batch, as
    the family's reference LoRA script computes it."""
    family, models = run.family, run.models
    mean, std, conditioning = run.batches.tensors(batch)
    latents, noise, timesteps = sample_noisy_inputs(
        mean,
        std,
        len(batch.ids),
        seed=run.params.seed,
        step=step,
        micro=micro,
        draw_timesteps=lambda n, gen, device: family.draw_timesteps(models, n, gen, device),
        scaling=run.scaling,
        shift=run.shift,
        device=run.device,
        device_gen=run.device_gen,
    )
    noisy, target = family.noisy_and_target(models, latents, noise, timesteps)
    if run.levers.channels_last and family.channels_last:
        noisy = noisy.contiguous(memory_format=torch.channels_last)
    with run.autocast:
        if not run.cache.text_cached:
            conditioning.update(family.encode_prompts(models, [run.cache.captions[i] for i in batch.ids], run.device))
        pred = family.predict(run.denoiser, noisy, timesteps, conditioning)
    return F.mse_loss(pred.float(), target.float())


TimestepDraw = Callable[[int, torch.Generator, torch.device], torch.Tensor]


def sample_noisy_inputs(
    mean: torch.Tensor,
    std: torch.Tensor,
    n: int,
    *,
    seed: int,
    step: int,
    micro: int,
    draw_timesteps: TimestepDraw,
    scaling: float,
    shift: float,
    device: torch.device,
    device_gen: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A micro-step's random draws: (latents sampled from the cached distributions, noise, timesteps).

    All come from a generator seeded by ``(seed, step, micro)`` and nothing else, so
    a resumed run draws exactly what the uninterrupted one did. ``device_gen`` draws
    on the device; without it the draws are made on the host and copied.
    ``draw_timesteps(n, generator, generator's device)`` is the family's density.
    """
    if device_gen is not None:
        gen = device_gen.manual_seed(step_seed(seed, step, micro))
        eps = torch.randn(mean.shape, generator=gen, device=device).to(mean.dtype)
        latents = ((mean + std * eps) - shift) * scaling
        noise = torch.randn(latents.shape, generator=gen, device=device).to(latents.dtype)
        timesteps = draw_timesteps(n, gen, device)
    else:
        gen = step_generator(seed, step, micro)
        eps = torch.randn(mean.shape, generator=gen).to(device, mean.dtype)
        latents = ((mean + std * eps) - shift) * scaling
        noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
        timesteps = draw_timesteps(n, gen, torch.device("cpu")).to(device)
    return latents, noise, timesteps


def _apply_gradients(run: _Run) -> None:
    """Unscale (fp16), clip, step the optimizer and the learning rate, and clear the gradients."""
    scaler, optimizer = run.scaler, run.optimizer
    if scaler:
        scaler.unscale_(optimizer)
    if run.params.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(run.trainable, run.params.max_grad_norm)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    run.lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


# -- export -------------------------------------------------------------------------


def adapter_configs(family: Family, models: Loaded, params: TrainingParams) -> dict[str, dict[str, Any]]:
    """Each trained adapter's peft LoraConfig, by pipeline component, for the file's header (alpha
    and rank as trained)."""
    configs = {family.denoiser_component: models.denoiser.peft_config["default"].to_dict()}
    if params.train_text_encoder:
        for name, encoder in zip(family.text_encoder_components, models.text_encoders, strict=False):
            configs[name] = encoder.peft_config["default"].to_dict()
    return configs


def _flush_losses(pending: list[tuple[int, torch.Tensor]], losses: list[float]) -> list[tuple[int, float]]:
    """The pending steps' losses, brought to the host in one transfer (the only sync of a step)."""
    if not pending:
        return []
    values = torch.stack([loss for _, loss in pending]).float().tolist()
    flushed = [(step, value) for (step, _), value in zip(pending, values, strict=True)]
    losses.extend(values)
    pending.clear()
    return flushed


def _largest_fitting_batch(
    family: Family,
    models: Loaded,
    cache: _Prepared,
    params: TrainingParams,
    levers: SpeedLevers,
    trainable: Sequence[torch.nn.Parameter],
    device: torch.device,
    dtype: torch.dtype,
) -> int:
    """Probe forward+backward at the largest bucket with growing batches; keep the largest that fits."""
    index = max(range(len(cache.buckets)), key=lambda i: cache.buckets[i][0] * cache.buckets[i][1])
    latent = cache.latent_mean[index]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step(batch: int) -> None:
        try:
            with autocast:
                conditioning = {k: v.expand(batch, *v.shape) for k, v in cache.conditioning[index].items()}
                if not cache.text_cached:
                    conditioning.update(family.encode_prompts(models, [cache.captions[index]] * batch, device))
                noisy = torch.randn((batch, *latent.shape), device=device, dtype=latent.dtype)
                if levers.channels_last and family.channels_last:
                    noisy = noisy.contiguous(memory_format=torch.channels_last)
                timesteps = family.draw_timesteps(models, batch, torch.Generator(device=device), device)
                pred = family.predict(models.denoiser, noisy, timesteps, conditioning)
            pred.float().square().mean().backward()
        finally:
            for param in trainable:
                param.grad = None

    fits = memory_probe(device, step, levers.memory_fraction)
    if fits is None:
        log.warning(
            "levers.max_batch: %s memory cannot be measured; keeping batch %d", device.type, params.train_batch_size
        )
        return params.train_batch_size
    # A batch comes from one bucket: more than its largest bucket holds would only repeat images.
    cap = min(levers.max_batch_cap, max(Counter(cache.buckets).values()))
    return largest_batch(fits, params.train_batch_size, cap)


def _lora_layers(models: Loaded, params: TrainingParams, *, peft_names: bool = False):
    """``get_peft_model_state_dict`` (→ ``convert_state_dict_to_diffusers`` unless ``peft_names``:
    the transformer families' scripts save peft's ``lora_A``/``lora_B``), in fp32 on the CPU."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def layers(module):
        state = get_peft_model_state_dict(module)
        if not peft_names:
            state = convert_state_dict_to_diffusers(state)
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}

    denoiser = layers(models.denoiser)
    te = te2 = None
    if params.train_text_encoder:
        te = layers(models.text_encoders[0])
        if len(models.text_encoders) > 1:
            te2 = layers(models.text_encoders[1])
    return denoiser, te, te2


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value
