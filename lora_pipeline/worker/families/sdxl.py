"""SDXL: the SD recipe with two CLIP encoders (penultimate hidden states concatenated, the
second one's pooled embedding) and the ``time_ids`` of each image's size and crop, as
diffusers' ``train_text_to_image_lora_sdxl.py`` computes them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from lora_pipeline.worker.families.base import Conditioning, Loaded, tokenize
from lora_pipeline.worker.families.sd import StableDiffusion

# sd-scripts' implementation URL for an SDXL LoRA (its SGM UNet); "diffusers" for SD 1/2.
SGM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


class StableDiffusionXL(StableDiffusion):
    name: ClassVar[str] = "sdxl"
    pipeline_class: ClassVar[str] = "StableDiffusionXLPipeline"
    text_encoder_components: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")

    def _more_text_encoders(self, tokenizers: list[Any], dtype: torch.dtype) -> list[Any]:
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        path = str(self.model_dir)
        tokenizers.append(AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", use_fast=True))
        return [CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype)]

    def image_conditioning(
        self, original_size: tuple[int, int], bucket: tuple[int, int], crop_top_left: tuple[int, int]
    ) -> dict[str, list[float]]:
        (w, h), (top, left) = original_size, crop_top_left
        return {"time_ids": [h, w, top, left, bucket[1], bucket[0]]}

    def encode_prompts(self, loaded: Loaded, captions: Sequence[str], device: torch.device) -> Conditioning:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(loaded.tokenizers, loaded.text_encoders, strict=True):
            out = encoder(tokenize(tokenizer, captions, device), output_hidden_states=True, return_dict=False)
            pooled = out[0]
            hidden.append(out[-1][-2])
        assert pooled is not None  # two encoders
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def predict(
        self, denoiser: Any, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        added = {"text_embeds": conditioning["text_embeds"], "time_ids": conditioning["time_ids"]}
        return denoiser(
            noisy, timesteps, conditioning["encoder_hidden_states"], added_cond_kwargs=added, return_dict=False
        )[0]

    def sampling_pipeline(self, dtype: torch.dtype) -> Any:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(str(self.model_dir), dtype=dtype)
        pipe.vae.to(torch.float32)  # the SDXL VAE overflows in fp16
        return pipe

    @classmethod
    def kohya_model_version(cls, variant: str, prediction_type: str) -> dict[str, str]:
        return {
            "ss_base_model_version": "sdxl_base_v1-0",
            "ss_v2": "False",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "modelspec.implementation": SGM_IMPLEMENTATION,
            "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        }
