"""The family protocol: what differs between model families, behind one small class.

The training loop (``worker/train.py``) is family-free. It asks the family to load the
base model, to say what each image and caption contributes besides its latent (SDXL's
time ids, FLUX's pooled embedding …), how timesteps are drawn (DDPM's uniform integers,
flow matching's density), how a clean latent becomes the model input and the training
target, and how the denoiser is called. Everything else (the latent cache, batches,
the optimizer, checkpoints, levers) is shared.

A family is one module under ``worker/families/`` with one subclass of ``Family``;
``families/__init__.py`` lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

Conditioning = dict[str, torch.Tensor]  # keyword → tensor with the batch first


@dataclass
class Loaded:
    """A base model's parts as training uses them."""

    denoiser: Any  # what the LoRA adapts: the UNet or the diffusion transformer
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    scheduler: Any  # the noise scheduler the family draws its training noise with


class Family:
    """One model family's training rules. Instances are made per base model (``model_dir``)."""

    name: ClassVar[str]
    pipeline_class: ClassVar[str]  # the diffusers pipeline that loads, saves and samples its LoRAs
    denoiser_component: ClassVar[str] = "unet"  # the pipeline component the LoRA adapts
    text_encoder_components: ClassVar[tuple[str, ...]] = ("text_encoder",)
    channels_last: ClassVar[bool] = False  # a convolutional denoiser gains from channels-last memory
    fused_qkv: ClassVar[bool] = False  # levers.fuse_qkv knows its attention layers

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)

    @classmethod
    def detect(cls, index: Mapping[str, Any], config: Callable[[str], dict]) -> str | None:
        """This family's name (or one of its names) when ``index`` (``model_index.json``) and the
        component configs (``config("unet/config.json")``) are one of its models, else None."""
        raise NotImplementedError

    # -- load ---------------------------------------------------------------------------

    def load(self, device: torch.device, dtype: torch.dtype) -> Loaded:
        """The base model's parts, frozen, on ``device``; the denoiser and text encoders in ``dtype``."""
        raise NotImplementedError

    def latent_transform(self, loaded: Loaded) -> tuple[float, float]:
        """(scaling, shift) turning a VAE sample into the denoiser's latent: ``(z - shift) * scaling``."""
        config = loaded.vae.config
        return float(config.scaling_factor), float(getattr(config, "shift_factor", None) or 0.0)

    # -- conditioning -------------------------------------------------------------------

    def image_conditioning(
        self, original_size: tuple[int, int], bucket: tuple[int, int], crop_top_left: tuple[int, int]
    ) -> dict[str, list[float]]:
        """What an image adds to the conditioning besides its latent (SDXL's time ids); values
        are made tensors in the training dtype. ``original_size`` and ``bucket`` are (width, height)."""
        return {}

    def encode_prompts(self, loaded: Loaded, captions: Sequence[str], device: torch.device) -> Conditioning:
        """The text conditioning of ``captions``, batch first, as the family's reference script computes it."""
        raise NotImplementedError

    # -- target -------------------------------------------------------------------------

    def draw_timesteps(self, loaded: Loaded, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """``n`` training timesteps drawn from ``generator`` (on ``device``, the generator's)."""
        raise NotImplementedError

    def noisy_and_target(
        self, loaded: Loaded, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the denoiser's input, the training target) for clean ``latents`` at ``timesteps``."""
        raise NotImplementedError

    def predict(
        self, denoiser: Any, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """The denoiser's prediction, in the latents' shape."""
        raise NotImplementedError

    # -- header -------------------------------------------------------------------------

    def prediction_type(self) -> str:
        """What the header records as the model's prediction (``epsilon``, ``v_prediction``, ``flow``)."""
        raise NotImplementedError


def tokenize(tokenizer: Any, captions: Sequence[str], device: torch.device, max_length: int | None = None) -> Any:
    """Token ids padded to the tokenizer's (or ``max_length``) length, truncated, on ``device``."""
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


def freeze(modules: Sequence[Any], device: torch.device) -> None:
    """No gradients for the base model's parts, and each on ``device``."""
    for module in modules:
        module.requires_grad_(False)
        module.to(device)
