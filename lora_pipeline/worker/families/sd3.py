"""Stable Diffusion 3 / 3.5 (medium, large): an MMDiT on two CLIP encoders (penultimate hidden
states and pooled projections) and T5, flow matching.

Training follows diffusers' ``train_dreambooth_lora_sd3.py``: ``u`` from the logit-normal
density (mean 0, std 1), timesteps of the scheduler's statically shifted schedule
(``shift`` 3.0), outputs preconditioned (``pred · (−σ) + noisy``) against the clean latents,
CLIP-L and CLIP-G penultimate states concatenated and padded to T5's width, then T5's
77 tokens appended; pooled = both CLIP projections.

The kohya file uses sd-scripts' SD3 names (the MMDiT tree: ``joint_blocks.N.x_block.attn.qkv``,
``context_block.mlp.fc1`` …), which ComfyUI maps; q/k/v fuse as FLUX.1's do (``flow.fuse_lora``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import torch

from lora_pipeline.worker.families.base import Conditioning, Loaded, freeze, tokenize
from lora_pipeline.worker.families.flow import FlowMatching, LoraPair, fused_groups, fused_kohya_tensors
from lora_pipeline.worker.kohya import KohyaNameError

T5_TOKENS = 77  # the reference script's T5 length
IMPLEMENTATION = "diffusers"  # sd-scripts' modelspec.implementation for an SD3 LoRA
# Our variant → sd-scripts' MMDiT model type (sd3_utils.load_mmdit: "medium", "5-medium", "5-large").
SD_SCRIPTS_MODEL_TYPE = {"3-medium": "medium", "3.5-medium": "5-medium", "3.5-large": "5-large"}

# diffusers module inside transformer_blocks.N → MMDiT module inside joint_blocks.N.
_BLOCK = {
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn2.to_out.0": "x_block.attn2.proj",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
}
_FUSED = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}
_TOP = {
    "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "proj_out": "final_layer.linear",
}


class StableDiffusion3(FlowMatching):
    name: ClassVar[str] = "sd3"
    pipeline_class: ClassVar[str] = "StableDiffusion3Pipeline"
    text_encoder_components: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")  # T5 stays frozen
    weighting_scheme: ClassVar[str] = "logit_normal"  # the SD3 script's default density

    @cached_property
    def transformer_config(self) -> dict[str, Any]:
        return json.loads((self.model_dir / "transformer" / "config.json").read_text(encoding="utf-8"))

    def variant(self) -> str:
        """``3.5-large`` (38 blocks), ``3.5-medium`` (dual attention blocks) or ``3-medium``."""
        config = self.transformer_config
        if int(config.get("num_layers", 0)) >= 38:
            return "3.5-large"
        return "3.5-medium" if config.get("dual_attention_layers") else "3-medium"

    def load(self, device: torch.device, dtype: torch.dtype) -> Loaded:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        path = str(self.model_dir)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        tokenizers = [
            AutoTokenizer.from_pretrained(path, subfolder=f) for f in ("tokenizer", "tokenizer_2", "tokenizer_3")
        ]
        clips = [
            CLIPTextModelWithProjection.from_pretrained(path, subfolder=f, dtype=dtype)
            for f in ("text_encoder", "text_encoder_2")
        ]
        t5 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", dtype=torch.float32)
        transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", dtype=dtype)
        freeze([vae, transformer, *clips, t5], device)
        return Loaded(transformer, vae, clips, tokenizers, scheduler, frozen_encoders=[t5])

    def encode_prompts(self, loaded: Loaded, captions: Sequence[str], device: torch.device) -> Conditioning:
        hidden, pooled = [], []
        for tokenizer, encoder in zip(loaded.tokenizers[:2], loaded.text_encoders, strict=True):
            out = encoder(tokenize(tokenizer, captions, device, 77), output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        t5 = loaded.frozen_encoders[0](tokenize(loaded.tokenizers[2], captions, device, T5_TOKENS))[0]
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2), "pooled_projections": torch.cat(pooled, -1)}

    def noisy_and_target(
        self, loaded: Loaded, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        noisy, _ = super().noisy_and_target(loaded, latents, noise, timesteps)
        return noisy, latents  # preconditioned outputs are trained against the clean latents

    def predict(
        self, denoiser: Any, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        pred = denoiser(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            pooled_projections=conditioning["pooled_projections"],
            return_dict=False,
        )[0]
        sigmas = (timesteps / 1000).to(noisy.dtype).view(-1, *([1] * (noisy.ndim - 1)))
        return pred * (-sigmas) + noisy  # the script's output preconditioning (EDM §5)

    def sample_kwargs(self) -> dict[str, Any]:
        return {"max_sequence_length": T5_TOKENS}

    @classmethod
    def kohya_tensors(
        cls, modules: Mapping[tuple[str, str], LoraPair], alpha: float, denoiser_config: Mapping[str, Any] | None
    ) -> dict[str, torch.Tensor]:
        if denoiser_config is None:
            raise KohyaNameError("an SD3 LoRA needs the transformer config to be named")
        hidden = int(denoiser_config["num_attention_heads"]) * int(denoiser_config["attention_head_dim"])
        sizes = {part: hidden for parts in _FUSED.values() for part in parts}
        last = int(denoiser_config["num_layers"]) - 1
        tensors = super().kohya_tensors({k: p for k, p in modules.items() if k[0] != "transformer"}, alpha, None)
        groups = fused_groups(
            {m: p for (c, m), p in modules.items() if c == "transformer"}, lambda m: mmdit_module(m, last)
        )
        tensors.update(fused_kohya_tensors(groups, alpha, _fused_parts, sizes))
        return tensors

    @classmethod
    def kohya_model_version(cls, variant: str, prediction_type: str) -> dict[str, str]:
        # sd-scripts (library/sd3_utils.py, sai_model_spec.py): the MMDiT's model type is the base
        # model version and follows "stable-diffusion-3-" in the architecture; an SD3 LoRA's
        # implementation is "diffusers" (determine_implementation: LoRA, not SDXL).
        model_type = SD_SCRIPTS_MODEL_TYPE.get(variant, "medium")
        return {
            "ss_network_module": "networks.lora_sd3",
            "ss_base_model_version": model_type,
            "modelspec.architecture": f"stable-diffusion-3-{model_type}/lora",
            "modelspec.implementation": IMPLEMENTATION,
        }


def mmdit_module(module: str, last_block: int) -> tuple[str, str | None]:
    """(MMDiT module, the part of it when fused) of a diffusers SD3 transformer module."""
    parts = module.split(".")
    if parts[0] == "transformer_blocks" and len(parts) > 2:
        block, inner = f"joint_blocks.{parts[1]}", ".".join(parts[2:])
        for fused, members in _FUSED.items():
            if inner in members:
                return f"{block}.{fused}", inner
        # The last block's context modulation is stored with shift and scale swapped: no exact name.
        if inner in _BLOCK and not (inner == "norm1_context.linear" and int(parts[1]) == last_block):
            return f"{block}.{_BLOCK[inner]}", None
    elif module in _TOP:
        return _TOP[module], None
    raise KohyaNameError(f"SD3 transformer module {module!r} has no sd-scripts (MMDiT) name")


def _fused_parts(original: str) -> tuple[str, ...] | None:
    return _FUSED.get(original.split(".", 2)[-1])


# -- a tiny SD3 built in code -------------------------------------------------------------

# SD3.5's published transformer config scaled down: 2 blocks of 2 heads × 64 (ComfyUI sizes
# the fused q/k/v as depth × 64, as every real SD3 is), 16 → 4 latent channels, text widths 64.
TINY_TRANSFORMER = dict(
    sample_size=32,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=2,
    attention_head_dim=64,
    num_attention_heads=2,
    joint_attention_dim=64,
    caption_projection_dim=128,
    pooled_projection_dim=64,
    pos_embed_max_size=32,
    qk_norm="rms_norm",
)


def build_random(folder: Path, *, seed: int = 0) -> None:
    """Save an SD3-shaped pipeline with seeded random weights (T5 tokenized by the tiny CLIP vocabulary)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from lora_pipeline.worker.families.flux1 import TINY_VAE
    from lora_pipeline.worker.tiny_model import TINY_SD1, tiny_tokenizer

    tokenizer, vocab = tiny_tokenizer(folder / "_tokenizer_src")
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**TINY_TRANSFORMER)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**dict(TINY_VAE, scaling_factor=1.5305, shift_factor=0.0609))  # SD3's VAE
    clips = []
    for _ in range(2):
        torch.manual_seed(seed)
        clips.append(CLIPTextModelWithProjection(CLIPTextConfig(**{**vocab, **TINY_SD1.text_encoder})))
    torch.manual_seed(seed)
    t5 = T5EncoderModel(
        T5Config(vocab_size=vocab["vocab_size"], d_model=64, d_kv=8, d_ff=37, num_layers=2, num_heads=4, pad_token_id=0)
    )
    pipeline: Any = StableDiffusion3Pipeline(  # diffusers declares save_pretrained through a wrapper mypy cannot see
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=clips[0],
        tokenizer=tokenizer,
        text_encoder_2=clips[1],
        tokenizer_2=tokenizer,
        text_encoder_3=t5,
        tokenizer_3=tokenizer,
        transformer=transformer,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
