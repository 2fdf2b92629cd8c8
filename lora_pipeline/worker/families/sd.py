"""Stable Diffusion 1.x and 2.x: a UNet on one CLIP text encoder, DDPM noise, ε or v targets.

The recipe is diffusers' ``train_text_to_image_lora.py``: timesteps uniform over the
scheduler's ``num_train_timesteps``, ``add_noise``, and the target the scheduler's
``prediction_type`` names (SD 2.x 768-v predicts velocity).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from lora_pipeline.worker.families.base import Conditioning, Family, Loaded, freeze, tokenize


class StableDiffusion(Family):
    """SD 1.x (``sd1``) and SD 2.x (``sd2``): the same training, told apart for the header."""

    name: ClassVar[str] = "sd1"
    pipeline_class: ClassVar[str] = "StableDiffusionPipeline"
    channels_last: ClassVar[bool] = True
    fused_qkv: ClassVar[bool] = True

    def load(self, device: torch.device, dtype: torch.dtype) -> Loaded:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        path = str(self.model_dir)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        tokenizers = [AutoTokenizer.from_pretrained(path, subfolder="tokenizer", use_fast=True)]
        text_encoders: list[Any] = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)]
        text_encoders += self._more_text_encoders(tokenizers, dtype)
        # The VAE only encodes each image once, so fp32 costs little and avoids the SDXL
        # VAE's fp16 overflow.
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", dtype=dtype)
        freeze([vae, unet, *text_encoders], device)
        return Loaded(unet, vae, text_encoders, tokenizers, scheduler)

    def _more_text_encoders(self, tokenizers: list[Any], dtype: torch.dtype) -> list[Any]:
        """SDXL's second encoder (appending its tokenizer); none for SD 1/2."""
        return []

    def encode_prompts(self, loaded: Loaded, captions: Sequence[str], device: torch.device) -> Conditioning:
        ids = tokenize(loaded.tokenizers[0], captions, device)
        return {"encoder_hidden_states": loaded.text_encoders[0](ids, return_dict=False)[0]}

    def draw_timesteps(self, loaded: Loaded, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        return torch.randint(0, loaded.scheduler.config.num_train_timesteps, (n,), generator=generator, device=device)

    def noisy_and_target(
        self, loaded: Loaded, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scheduler = loaded.scheduler
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if scheduler.config.prediction_type == "v_prediction":
            return noisy, scheduler.get_velocity(latents, noise, timesteps)
        return noisy, noise

    def predict(
        self, denoiser: Any, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        return denoiser(noisy, timesteps, conditioning["encoder_hidden_states"], return_dict=False)[0]

    def prediction_type(self) -> str:
        from lora_pipeline.worker.family import prediction_type

        return prediction_type(self.model_dir)

    def sampling_pipeline(self, dtype: torch.dtype) -> Any:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.from_pretrained(
            str(self.model_dir), dtype=dtype, safety_checker=None, requires_safety_checker=False
        )

    @classmethod
    def kohya_model_version(cls, variant: str, prediction_type: str) -> dict[str, str]:
        v_pred = prediction_type == "v_prediction"
        sd2 = cls.name == "sd2"
        if sd2:
            architecture = "stable-diffusion-v2-768-v" if v_pred else "stable-diffusion-v2-512"
        else:
            architecture = "stable-diffusion-v1"
        return {
            "ss_base_model_version": ("sd_v2" if sd2 else "sd_v1") + ("_v" if v_pred else ""),
            "ss_v2": str(sd2),
            "modelspec.architecture": f"{architecture}/lora",
            "modelspec.implementation": "diffusers",
            "modelspec.prediction_type": "v" if v_pred else "epsilon",
        }


class StableDiffusion2(StableDiffusion):
    """SD 2.x: trained as SD 1.x; the header says ``sd_v2`` (``_v`` with a v-prediction scheduler)."""

    name: ClassVar[str] = "sd2"
