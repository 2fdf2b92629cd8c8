"""The family protocol: what differs between model families, behind one small class.

The training loop (``worker/train.py``) is family-free. It asks the family to load the
base model, to say what each image and caption contributes besides its latent (SDXL's
time ids, FLUX's pooled embedding …), how timesteps are drawn (DDPM's uniform integers,
flow matching's density), how a clean latent becomes the model input and the training
target, and how the denoiser is called. Everything else (the latent cache, batches,
the optimizer, checkpoints, levers) is shared.

A family is one module under ``worker/families/`` with one subclass of ``Family``;
``families/__init__.py`` lists them. Which family a base model is (its pipeline class, its
component configs) is ``contracts/families.py``'s table, torch-free, so the orchestrator refuses
a mismatch at launch by the same rules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
    # Encoders used for captions that no LoRA adapts (FLUX.1's T5): cached and offloaded like the rest.
    frozen_encoders: list[Any] = field(default_factory=list)


class Family:
    """One model family's training rules. Instances are made per base model (``model_dir``)."""

    name: ClassVar[str]
    pipeline_class: ClassVar[str]  # the diffusers pipeline that loads, saves and samples its LoRAs
    denoiser_component: ClassVar[str] = "unet"  # the pipeline component the LoRA adapts
    text_encoder_components: ClassVar[tuple[str, ...]] = ("text_encoder",)
    channels_last: ClassVar[bool] = False  # a convolutional denoiser gains from channels-last memory
    fused_qkv: ClassVar[bool] = False  # levers.fuse_qkv knows its attention layers
    peft_names: ClassVar[bool] = False  # its diffusers file keeps peft's lora_A/lora_B names (as its script saves)
    # Its script trains on the VAE posterior's mode (``latent_dist.mode()``: Z-Image, FLUX.2 klein), not a sample.
    latent_mode: ClassVar[bool] = False
    # TrainingParams.timestep_shift, set by the loop: the flow families shift their training
    # timesteps by it (None: the scheduler's own schedule); the UNet families never get one.
    timestep_shift: float | None = None

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)

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

    # -- samples and files --------------------------------------------------------------

    def prediction_type(self) -> str:
        """What the header records as the model's prediction (``epsilon``, ``v_prediction``, ``flow``)."""
        raise NotImplementedError

    def variant(self) -> str:
        """Which model of the family the base is, where the header tells them apart (FLUX.1 dev or
        schnell); empty where it does not."""
        return ""

    def sampling_pipeline(self, dtype: torch.dtype) -> Any:
        """The family's diffusers pipeline on this base model, to render samples with a LoRA."""
        import diffusers

        return getattr(diffusers, self.pipeline_class).from_pretrained(str(self.model_dir), dtype=dtype)

    def sample_kwargs(self) -> dict[str, Any]:
        """Arguments the family's pipeline call takes besides prompt, size, steps and generator."""
        return {}

    @classmethod
    def kohya_tensors(
        cls,
        modules: Mapping[tuple[str, str], Mapping[str, torch.Tensor]],
        alpha: float,
        denoiser_config: Mapping[str, Any] | None,
    ) -> dict[str, torch.Tensor]:
        """The kohya layout's tensors (``<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``)
        of the LoRA ``modules`` ((component, module path) → {"down", "up"}, diffusers' names).
        By default each module is one kohya module (``kohya_module_name``)."""
        from lora_pipeline.worker.kohya import KohyaNameError, kohya_module_name

        tensors: dict[str, torch.Tensor] = {}
        for (component, module), pair in sorted(modules.items()):
            unet = component == cls.denoiser_component
            name = kohya_module_name("unet" if unet else component, module, cls.name, denoiser_config)
            if f"{name}.alpha" in tensors:
                raise KohyaNameError(f"two modules are both named {name!r} in the kohya layout")
            tensors[f"{name}.lora_down.weight"] = pair["down"].contiguous()
            tensors[f"{name}.lora_up.weight"] = pair["up"].contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
        return tensors

    @classmethod
    def kohya_model_version(cls, variant: str, prediction_type: str) -> Mapping[str, str | None]:
        """The header keys that name the base model as sd-scripts does: ``ss_base_model_version``,
        ``modelspec.architecture``, ``modelspec.implementation`` (and ``ss_v2``,
        ``modelspec.prediction_type`` where sd-scripts writes them). None: leave the key out
        (a family sd-scripts does not train claims none of its network modules)."""
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
