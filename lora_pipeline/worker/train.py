"""The training loop: diffusers' LoRA recipe, with the work that does not change done once.

The recipe is diffusers' ``train_text_to_image_lora.py`` (peft ``LoraConfig`` +
``unet.add_adapter``, trainable parameters in fp32, the noise-prediction MSE
loss). What differs is where time goes: the VAE encodes each image once (its
latent mean and std are cached and a fresh latent is sampled per step, as the
reference does by re-encoding), text embeddings are computed once unless the text
encoder trains, attention runs through PyTorch SDPA, the UNet is channels-last and
optionally compiled, and AdamW is fused on CUDA.

Every random draw of step ``s`` comes from a generator seeded by ``(seed, s)`` and
batch order is a pure function of ``(seed, epoch)``, so a run resumed from a
checkpoint takes exactly the steps an uninterrupted run takes.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from lora_pipeline.worker.data import (
    Example,
    batches_per_epoch,
    bucket_for,
    epoch_batches,
    resize_and_crop,
    with_trigger,
)
from lora_pipeline.worker.errors import WorkerInputError
from lora_pipeline.worker.schema import ModelFamily, TrainingParams

TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]

ProgressFn = Callable[[int, int, float], None]


class Checkpointer(Protocol):
    """Where training state goes every N steps, and where a retried job finds it."""

    def load_latest(self) -> dict[str, Any] | None: ...

    def save(self, step: int, state: dict[str, Any]) -> None: ...


@dataclass
class TrainOutcome:
    """What training produced: LoRA layers in diffusers naming, per component."""

    unet_lora: dict[str, torch.Tensor]
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

    @property
    def final_loss(self) -> float | None:
        if not self.losses:
            return None
        tail = self.losses[-10:]
        return sum(tail) / len(tail)


@dataclass
class _Models:
    family: ModelFamily
    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    noise_scheduler: Any


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def weight_dtype_for(mixed_precision: str, device: torch.device) -> torch.dtype:
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


def load_models(model_dir: Path, family: ModelFamily, device: torch.device, dtype: torch.dtype) -> _Models:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    path = str(model_dir)
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    tokenizers = [AutoTokenizer.from_pretrained(path, subfolder="tokenizer", use_fast=True)]
    text_encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)]
    if family == "sdxl":
        tokenizers.append(AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", use_fast=True))
        text_encoders.append(
            CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype)
        )
    # The VAE only encodes each image once, so fp32 costs little and avoids the SDXL
    # VAE's fp16 overflow.
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", dtype=dtype)
    for module in (vae, unet, *text_encoders):
        module.requires_grad_(False)
        module.to(device)
    return _Models(family, unet, vae, text_encoders, tokenizers, noise_scheduler)


def add_lora(models: _Models, params: TrainingParams) -> list[torch.nn.Parameter]:
    """Attach peft LoRA adapters; return the trainable parameters (fp32), in a fixed order."""
    from peft import LoraConfig

    alpha = params.effective_alpha
    unet_config = LoraConfig(
        r=params.rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(params.target_modules)
    )
    try:
        models.unet.add_adapter(unet_config)
    except ValueError as exc:
        raise WorkerInputError(f"params.target_modules: {exc}") from None
    modules = [models.unet]
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
    kwargs = dict(lr=params.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    if params.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(trainable, **kwargs)
    fused = params.optimizer == "adamw_fused" or device.type == "cuda"
    if fused:
        return torch.optim.AdamW(trainable, fused=True, **kwargs)
    return torch.optim.AdamW(trainable, foreach=True, **kwargs)


def _encode_prompts(models: _Models, captions: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt embeddings (and SDXL's pooled embedding), the way each family's training script does."""
    if models.family != "sdxl":
        ids = _tokenize(models.tokenizers[0], captions, device)
        return models.text_encoders[0](ids, return_dict=False)[0], None
    hidden, pooled = [], None
    for tokenizer, encoder in zip(models.tokenizers, models.text_encoders, strict=True):
        out = encoder(_tokenize(tokenizer, captions, device), output_hidden_states=True, return_dict=False)
        pooled = out[0]
        hidden.append(out[-1][-2])
    return torch.cat(hidden, dim=-1), pooled


def _tokenize(tokenizer: Any, captions: Sequence[str], device: torch.device) -> torch.Tensor:
    return tokenizer(
        list(captions), padding="max_length", max_length=tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids.to(device)


@dataclass
class _Prepared:
    buckets: list[tuple[int, int]]
    latent_mean: list[torch.Tensor]
    latent_std: list[torch.Tensor]
    time_ids: list[torch.Tensor]
    captions: list[str]
    prompt_embeds: list[torch.Tensor] | None
    pooled_embeds: list[torch.Tensor] | None


@torch.no_grad()
def prepare_cache(models: _Models, examples: Sequence[Example], params: TrainingParams, device: torch.device, dtype: torch.dtype) -> _Prepared:
    """Encode every image once (latent mean/std) and, unless the text encoder trains, every caption."""
    import numpy as np

    buckets, means, stds, time_ids = [], [], [], []
    for example in examples:
        bucket = bucket_for(example.image.size, params.resolution, params.enable_bucketing)
        crop, (top, left) = resize_and_crop(example.image, bucket)
        pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        dist = models.vae.encode(pixels.unsqueeze(0).to(device)).latent_dist
        means.append(dist.mean[0].to(dtype))
        stds.append(dist.std[0].to(dtype))
        buckets.append(bucket)
        w, h = example.image.size
        time_ids.append(torch.tensor([h, w, top, left, bucket[1], bucket[0]], dtype=dtype, device=device))
    captions = [with_trigger(e.caption, params.trigger_word) for e in examples]
    prompt_embeds = pooled = None
    if not params.train_text_encoder:
        prompt_embeds, pooled = [], []
        for caption in captions:
            embeds, pool = _encode_prompts(models, [caption], device)
            prompt_embeds.append(embeds[0].to(dtype))
            pooled.append(pool[0].to(dtype) if pool is not None else None)
    return _Prepared(buckets, means, stds, time_ids, captions, prompt_embeds, pooled)


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1009 + micro) % (2**63))


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
) -> TrainOutcome:
    """Train a LoRA on ``examples`` and return its layers; resumes from ``checkpointer``."""
    if not examples:
        raise WorkerInputError("dataset has no images to train on")
    started = time.perf_counter()
    device = device or pick_device()
    dtype = weight_dtype_for(params.mixed_precision, device)
    check_optimizer_available(params.optimizer)

    torch.manual_seed(params.seed)
    random.seed(params.seed)
    models = load_models(model_dir, family, device, dtype)
    cache = prepare_cache(models, examples, params, device, dtype)
    # Everything the cache replaced leaves the GPU: the VAE always, the text
    # encoders unless they train. That memory is what the reference spends per step.
    models.vae.to("cpu")
    if not params.train_text_encoder:
        for encoder in models.text_encoders:
            encoder.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if params.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if params.train_text_encoder:
            for encoder in models.text_encoders:
                encoder.gradient_checkpointing_enable()
    torch.manual_seed(params.seed)
    trainable = add_lora(models, params)
    if device.type == "cuda":
        models.unet.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(params, trainable, device)

    from diffusers.optimization import get_scheduler

    per_epoch = batches_per_epoch(cache.buckets, params.train_batch_size)
    n_steps = total_steps(params, per_epoch)
    lr_scheduler = get_scheduler(
        params.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=params.lr_warmup_steps, num_training_steps=n_steps,
    )
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    start_step, losses, resumed_from = 0, [], None
    state = checkpointer.load_latest() if checkpointer else None
    if state is not None and state.get("fingerprint") == fingerprint:
        start_step = int(state["step"])
        with torch.no_grad():
            for param, saved in zip(trainable, state["lora"], strict=True):
                param.copy_(saved.to(param.device))
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        _restore_rng(state["rng"])
        losses = list(state["losses"])
        resumed_from = start_step

    unet = models.unet
    if params.compile:
        unet = torch.compile(unet)
    for module in (models.unet, *models.text_encoders):
        module.train(params.train_text_encoder or module is models.unet)

    prediction_type = models.noise_scheduler.config.prediction_type
    num_timesteps = models.noise_scheduler.config.num_train_timesteps
    scaling = models.vae.config.scaling_factor
    shift = getattr(models.vae.config, "shift_factor", None) or 0.0
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    images_seen = start_step * params.gradient_accumulation_steps * params.train_batch_size

    for step in range(start_step, n_steps):
        step_loss = 0.0
        for micro in range(params.gradient_accumulation_steps):
            index = step * params.gradient_accumulation_steps + micro
            batch = epoch_batches(cache.buckets, params.train_batch_size, params.seed, index // per_epoch)[index % per_epoch]
            gen = step_generator(params.seed, step, micro)
            mean = torch.stack([cache.latent_mean[i] for i in batch])
            std = torch.stack([cache.latent_std[i] for i in batch])
            eps = torch.randn(mean.shape, generator=gen).to(device, mean.dtype)
            latents = ((mean + std * eps) - shift) * scaling
            noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
            timesteps = torch.randint(0, num_timesteps, (len(batch),), generator=gen).to(device)
            noisy = models.noise_scheduler.add_noise(latents, noise, timesteps)
            if device.type == "cuda":
                noisy = noisy.contiguous(memory_format=torch.channels_last)
            with autocast:
                if cache.prompt_embeds is not None:
                    embeds = torch.stack([cache.prompt_embeds[i] for i in batch])
                    pooled = torch.stack([cache.pooled_embeds[i] for i in batch]) if family == "sdxl" else None
                else:
                    embeds, pooled = _encode_prompts(models, [cache.captions[i] for i in batch], device)
                added = None
                if family == "sdxl":
                    added = {"text_embeds": pooled, "time_ids": torch.stack([cache.time_ids[i] for i in batch])}
                pred = unet(noisy, timesteps, embeds, added_cond_kwargs=added, return_dict=False)[0]
            if prediction_type == "v_prediction":
                target = models.noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise
            loss = F.mse_loss(pred.float(), target.float()) / params.gradient_accumulation_steps
            (scaler.scale(loss) if scaler else loss).backward()
            step_loss += loss.item()
            images_seen += len(batch)
        if scaler:
            scaler.unscale_(optimizer)
        if params.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, params.max_grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        done = step + 1
        if checkpointer and params.checkpoint_every and done % params.checkpoint_every == 0 and done < n_steps:
            checkpointer.save(done, {
                "fingerprint": fingerprint,
                "step": done,
                "lora": [p.detach().cpu().clone() for p in trainable],
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler else None,
                "rng": _rng_state(),
                "losses": losses,
            })
        if progress:
            progress(done, n_steps, step_loss)

    unet_lora, te_lora, te2_lora = _lora_layers(models, params)
    configs = {"unet": models.unet.peft_config["default"].to_dict()}
    if params.train_text_encoder:
        for name, encoder in zip(("text_encoder", "text_encoder_2"), models.text_encoders, strict=False):
            configs[name] = encoder.peft_config["default"].to_dict()
    return TrainOutcome(
        unet_lora=unet_lora,
        text_encoder_lora=te_lora,
        text_encoder_2_lora=te2_lora,
        losses=losses,
        steps=n_steps,
        images_seen=images_seen,
        resumed_from=resumed_from,
        train_seconds=time.perf_counter() - started,
        device=str(device),
        adapter_configs=configs,
    )


def _lora_layers(models: _Models, params: TrainingParams):
    """``get_peft_model_state_dict`` → ``convert_state_dict_to_diffusers``, in fp32 on the CPU."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def layers(module):
        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}

    unet = layers(models.unet)
    te = te2 = None
    if params.train_text_encoder:
        te = layers(models.text_encoders[0])
        if len(models.text_encoders) > 1:
            te2 = layers(models.text_encoders[1])
    return unet, te, te2


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
