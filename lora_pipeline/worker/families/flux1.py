"""FLUX.1 (dev, with its guidance embedding; schnell, without): a rectified-flow transformer on
CLIP-L (pooled) and T5 (sequence) embeddings, latents packed 2×2 into tokens with position ids.

Training follows diffusers' ``train_dreambooth_lora_flux.py``: uniform timesteps over the
unshifted schedule (FLUX's scheduler shifts dynamically, by resolution, only when
sampling), ``guidance = 3.5`` for a model with ``guidance_embeds``, ``timestep / 1000``
into the transformer, T5 at 512 tokens (256 for schnell), the ``noise - latents`` target.

The kohya file uses sd-scripts' FLUX.1 names (BFL's module tree: ``double_blocks.N.img_attn.qkv``,
``single_blocks.N.linear1`` …), which ComfyUI, Forge and sd-scripts load. BFL fuses what diffusers
splits (q, k, v, and a single block's MLP input), so a fused module's LoRA is the parts'
LoRAs side by side: ``down`` stacked, ``up`` block-diagonal, alpha scaled with the rank, which
is the same weight delta exactly.
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

GUIDANCE_SCALE = 3.5  # the reference script's --guidance_scale default
IMPLEMENTATION = "https://github.com/black-forest-labs/flux"  # sd-scripts' modelspec.implementation for FLUX.1

# diffusers module (inside a block) → BFL module, one to one.
_DOUBLE = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
}
_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear",
}
# BFL's fused modules: their parts in order, as diffusers names them.
_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}


class Flux1(FlowMatching):
    name: ClassVar[str] = "flux1"
    pipeline_class: ClassVar[str] = "FluxPipeline"
    text_encoder_components: ClassVar[tuple[str, ...]] = ("text_encoder",)  # CLIP; T5 stays frozen, as in the reference

    @cached_property
    def guidance(self) -> bool:
        """FLUX.1-dev is guidance-distilled (a guidance embedding); schnell is not."""
        config = json.loads((self.model_dir / "transformer" / "config.json").read_text(encoding="utf-8"))
        return bool(config.get("guidance_embeds"))

    def variant(self) -> str:
        return "dev" if self.guidance else "schnell"

    @property
    def max_sequence_length(self) -> int:
        return 512 if self.guidance else 256  # the pipelines' T5 lengths for dev and schnell

    def load(self, device: torch.device, dtype: torch.dtype) -> Loaded:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        path = str(self.model_dir)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        tokenizers = [
            AutoTokenizer.from_pretrained(path, subfolder="tokenizer"),
            AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2"),
        ]
        clip = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
        t5 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", dtype=torch.float32)
        transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", dtype=dtype)
        freeze([vae, transformer, clip, t5], device)
        return Loaded(transformer, vae, [clip], tokenizers, scheduler, frozen_encoders=[t5])

    def encode_prompts(self, loaded: Loaded, captions: Sequence[str], device: torch.device) -> Conditioning:
        clip, t5 = loaded.text_encoders[0], loaded.frozen_encoders[0]
        pooled = clip(tokenize(loaded.tokenizers[0], captions, device, 77), output_hidden_states=False).pooler_output
        ids = tokenize(loaded.tokenizers[1], captions, device, self.max_sequence_length)
        return {"encoder_hidden_states": t5(ids)[0], "pooled_projections": pooled}

    def predict(
        self, denoiser: Any, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        text = conditioning["encoder_hidden_states"]
        guidance = torch.full((b,), GUIDANCE_SCALE, device=noisy.device) if self.guidance else None
        pred = denoiser(
            hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w),
            timestep=timesteps / 1000,
            guidance=guidance,
            pooled_projections=conditioning["pooled_projections"],
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype),
            return_dict=False,
        )[0]
        # vae_scale_factor 1: the sizes given are the latent's own.
        return FluxPipeline._unpack_latents(pred, h, w, 1)

    def sample_kwargs(self) -> dict[str, Any]:
        return {
            "guidance_scale": GUIDANCE_SCALE if self.guidance else 0.0,
            "max_sequence_length": self.max_sequence_length,
        }

    # -- files --------------------------------------------------------------------------

    @classmethod
    def kohya_tensors(
        cls, modules: Mapping[tuple[str, str], LoraPair], alpha: float, denoiser_config: Mapping[str, Any] | None
    ) -> dict[str, torch.Tensor]:
        if denoiser_config is None:
            raise KohyaNameError("a FLUX.1 LoRA needs the transformer config to be named")
        hidden = int(denoiser_config["num_attention_heads"]) * int(denoiser_config["attention_head_dim"])
        sizes = {"attn.to_q": hidden, "attn.to_k": hidden, "attn.to_v": hidden, "proj_mlp": 4 * hidden}
        sizes.update({"attn.add_q_proj": hidden, "attn.add_k_proj": hidden, "attn.add_v_proj": hidden})
        tensors = super().kohya_tensors({k: p for k, p in modules.items() if k[0] != "transformer"}, alpha, None)
        groups = fused_groups({m: p for (c, m), p in modules.items() if c == "transformer"}, bfl_module)
        tensors.update(fused_kohya_tensors(groups, alpha, _fused_parts, sizes))
        return tensors

    @classmethod
    def kohya_model_version(cls, variant: str, prediction_type: str) -> dict[str, str]:
        arch = "flux-1-schnell" if variant == "schnell" else "flux-1-dev"
        return {
            "ss_network_module": "networks.lora_flux",
            "ss_base_model_version": "flux1",
            "modelspec.architecture": f"{arch}/lora",
            "modelspec.implementation": IMPLEMENTATION,
        }


def bfl_module(module: str) -> tuple[str, str | None]:
    """(BFL module, the part of it when fused) of a diffusers FLUX.1 transformer module."""
    parts = module.split(".")
    if parts[0] in ("transformer_blocks", "single_transformer_blocks") and len(parts) > 2:
        double = parts[0] == "transformer_blocks"
        block = f"{'double_blocks' if double else 'single_blocks'}.{parts[1]}"
        inner = ".".join(parts[2:])
        fused = _DOUBLE_FUSED if double else _SINGLE_FUSED
        for bfl, members in fused.items():
            if inner in members:
                return f"{block}.{bfl}", inner
        single = (_DOUBLE if double else _SINGLE).get(inner)
        if single is not None:
            return f"{block}.{single}", None
    elif module in _TOP:
        return _TOP[module], None
    raise KohyaNameError(f"FLUX.1 transformer module {module!r} has no sd-scripts (BFL) name")


def _fused_parts(bfl: str) -> tuple[str, ...] | None:
    last = bfl.split(".", 2)[-1]
    return _DOUBLE_FUSED.get(last) or _SINGLE_FUSED.get(last)


# -- a tiny FLUX.1 built in code ----------------------------------------------------------

# FLUX.1-dev's published transformer config, scaled down (19 → 1 double, 38 → 1 single blocks;
# 24 × 128 → 2 × 16 attention; 4096/768 → 32 text widths; rope axes summing to the head dim);
# the VAE's 16 latent channels → 4 (in_channels = 4 × 2×2 packing).
TINY_TRANSFORMER = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
    up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    block_out_channels=[32, 64],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=32,
    scaling_factor=0.3611,  # FLUX.1's VAE
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
# FLUX.1-dev's scheduler config (shift by resolution at sampling time).
SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def build_random(folder: Path, *, seed: int = 0, guidance_embeds: bool = True) -> None:
    """Save a FLUX.1-shaped pipeline with seeded random weights (dev; schnell without guidance).

    The T5 tokenizer is the tiny CLIP byte-level vocabulary: any text tokenizes, and a model
    with random weights needs no real vocabulary."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from lora_pipeline.worker.tiny_model import TINY_SD1, tiny_tokenizer

    tokenizer, vocab = tiny_tokenizer(folder / "_tokenizer_src")
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**dict(TINY_TRANSFORMER, guidance_embeds=guidance_embeds))
    torch.manual_seed(seed)
    vae = AutoencoderKL(**TINY_VAE)
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(**{**vocab, **TINY_SD1.text_encoder}))
    torch.manual_seed(seed)
    t5 = T5EncoderModel(
        T5Config(vocab_size=vocab["vocab_size"], d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, pad_token_id=0)
    )
    pipeline: Any = FluxPipeline(  # diffusers declares save_pretrained through a wrapper mypy cannot see
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=vae,
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer,
        transformer=transformer,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
