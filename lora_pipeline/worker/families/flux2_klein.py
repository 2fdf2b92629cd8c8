"""FLUX.2 klein (4B and 9B; base and step-distilled): a rectified-flow transformer on one Qwen3
text encoder's stacked hidden states, with the FLUX.2 VAE's latents patchified 2×2 into 4× the
channels and normalised per channel by the VAE's batch-norm statistics.

Training follows diffusers' ``examples/dreambooth/train_dreambooth_lora_flux2_klein.py`` (the same
at v0.40.0 and at the mirror's HEAD but for the version check):

- text: ``Flux2KleinPipeline.encode_prompt`` → ``_get_qwen3_prompt_embeds``: the caption as one
  user message through the tokenizer's chat template (``add_generation_prompt=True``,
  ``enable_thinking=False``), padded to ``--max_sequence_length`` 512, the hidden states of
  layers (9, 18, 27) stacked per token (3 × the encoder's width); ``txt_ids`` from
  ``_prepare_text_ids``. The script's ``--text_encoder_out_layers`` defaults to [10, 20, 30],
  FLUX.2-dev's Mistral layers, while every klein pipeline and ComfyUI's klein encoder
  (``comfy/text_encoders/flux.py``, v0.19.3) use (9, 18, 27): diffusers issue #13445 (fix in
  PR #13509). We train on the layers the model is sampled with, (9, 18, 27). The text
  encoder never trains (the script has no ``--train_text_encoder``).
- latents: ``vae.encode(x).latent_dist.mode()`` (the mean, not a sample: ``latent_mode``),
  ``_patchify_latents`` (C×H×W → 4C×H/2×W/2), then ``(z − bn.running_mean) /
  sqrt(bn.running_var + batch_norm_eps)``, no scaling or shift factor; ``img_ids`` from
  ``_prepare_latent_ids``, tokens from ``_pack_latents``, the prediction unpacked with
  ``_unpack_latents_with_ids``.
- timesteps: ``compute_density_for_timestep_sampling`` ("none": uniform) indexing the
  scheduler's unshifted timesteps (the published scheduler, FLUX.1-dev's, shifts dynamically
  only when sampling), σ = t / 1000 (``flow.FlowMatching``); the transformer takes ``t / 1000``;
  ``guidance`` 3.5 only where ``guidance_embeds`` (no klein model has it).
- target: ``noise − latents``, unweighted MSE.

The primary (ComfyUI) file names modules as ComfyUI v0.19.3's FLUX.2 model holds them (BFL's
tree, ``comfy/ldm/flux/model.py`` with ``global_modulation``): ``lora_unet_<path>``, which
``comfy/lora.py`` ``model_lora_keys_unet`` maps for every weight of the model, and which
musubi-tuner's ``networks/lora_flux_2.py`` writes. Double blocks fuse q/k/v as FLUX.1's do
(``flow.fuse_lora``); single blocks are already fused in diffusers (``to_qkv_mlp_proj`` =
``linear1``, ``to_out`` = ``linear2``). The shared modulation layers, the timestep embedding and
``norm_out`` are refused (KohyaNameError): ComfyUI's diffusers map (``flux_to_diffusers``) has no
name for them (DESIGN.md), and ``norm_out`` is stored with shift and scale swapped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import torch

from lora_pipeline.worker.families.base import Conditioning, Loaded, freeze
from lora_pipeline.worker.families.flow import FlowMatching, LoraPair, fused_groups, fused_kohya_tensors
from lora_pipeline.worker.kohya import KohyaNameError

MAX_SEQUENCE_LENGTH = 512  # the script's --max_sequence_length default (and the pipeline's)
TEXT_LAYERS = (9, 18, 27)  # the klein pipelines' hidden_states_layers (see the module docstring)
GUIDANCE_SCALE = 3.5  # the script's --guidance_scale, used only with guidance_embeds
BASE_GUIDANCE_SCALE = 4.0  # Flux2KleinPipeline's default CFG scale, for samples from a base model
IMPLEMENTATION = "https://github.com/black-forest-labs/flux2"  # musubi-tuner's modelspec.implementation for FLUX.2

# diffusers module inside transformer_blocks.N → BFL module inside double_blocks.N, one to one.
_DOUBLE = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear"}
# Modules ComfyUI's FLUX.2 diffusers map names nothing for: a LoRA there would be dropped.
_UNMAPPED = ("time_guidance_embed.", "double_stream_modulation_", "single_stream_modulation.", "norm_out.")


class Flux2Klein(FlowMatching):
    name: ClassVar[str] = "flux2-klein"
    pipeline_class: ClassVar[str] = "Flux2KleinPipeline"
    text_encoder_components: ClassVar[tuple[str, ...]] = ()  # Qwen3 stays frozen, as in the reference
    latent_mode: ClassVar[bool] = True

    def __init__(self, model_dir: Any) -> None:
        super().__init__(model_dir)
        self._bn: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @cached_property
    def transformer_config(self) -> dict[str, Any]:
        return json.loads((self.model_dir / "transformer" / "config.json").read_text(encoding="utf-8"))

    @cached_property
    def distilled(self) -> bool:
        """Step-distilled (FLUX.2-klein-4B/9B) or base (FLUX.2-klein-base-4B/9B): the pipeline's
        ``is_distilled``, in ``model_index.json``."""
        index = json.loads((self.model_dir / "model_index.json").read_text(encoding="utf-8"))
        return bool(index.get("is_distilled"))

    @property
    def guidance(self) -> bool:
        return bool(self.transformer_config.get("guidance_embeds"))

    def variant(self) -> str:
        """``4b`` or ``9b`` (diffusers' ``convert_flux2_to_diffusers.py``: 4B has 5 double blocks and
        a 7680-wide text input, 9B 8 and 12288), then ``-base`` or ``-distilled``."""
        size = "9b" if int(self.transformer_config.get("joint_attention_dim", 0)) >= 12288 else "4b"
        return f"{size}-{'distilled' if self.distilled else 'base'}"

    def load(self, device: torch.device, dtype: torch.dtype) -> Loaded:
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
        from transformers import AutoTokenizer, Qwen3ForCausalLM

        path = str(self.model_dir)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
        qwen = Qwen3ForCausalLM.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
        vae = AutoencoderKLFlux2.from_pretrained(path, subfolder="vae", dtype=torch.float32)
        transformer = Flux2Transformer2DModel.from_pretrained(path, subfolder="transformer", dtype=dtype)
        freeze([vae, transformer, qwen], device)
        return Loaded(transformer, vae, [], [tokenizer], scheduler, frozen_encoders=[qwen])

    def latent_transform(self, loaded: Loaded) -> tuple[float, float]:
        """None here: FLUX.2 normalises per channel after patchifying (``noisy_and_target``)."""
        return 1.0, 0.0

    def encode_prompts(self, loaded: Loaded, captions: Sequence[str], device: torch.device) -> Conditioning:
        from diffusers import Flux2KleinPipeline

        embeds = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            text_encoder=loaded.frozen_encoders[0],
            tokenizer=loaded.tokenizers[0],
            prompt=list(captions),
            device=device,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            hidden_states_layers=list(TEXT_LAYERS),
        )
        return {"encoder_hidden_states": embeds}

    def _bn_stats(self, loaded: Loaded, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's batch-norm (mean, std) per patchified channel, kept on ``device`` (the VAE
        itself leaves the device once the latents are cached)."""
        if device not in self._bn:
            bn, eps = loaded.vae.bn, float(loaded.vae.config.batch_norm_eps)
            mean = bn.running_mean.detach().view(1, -1, 1, 1).float()
            std = torch.sqrt(bn.running_var.detach().view(1, -1, 1, 1).float() + eps)
            self._bn[device] = (mean.to(device), std.to(device))
        return self._bn[device]

    def noisy_and_target(
        self, loaded: Loaded, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE latents patchified and normalised as the script's ``model_input``; the noise
        patchified alike (a permutation of independent normals: still standard normal)."""
        from diffusers import Flux2KleinPipeline

        mean, std = self._bn_stats(loaded, latents.device)
        model_input = ((Flux2KleinPipeline._patchify_latents(latents) - mean) / std).to(latents.dtype)
        return super().noisy_and_target(loaded, model_input, Flux2KleinPipeline._patchify_latents(noise), timesteps)

    def predict(
        self, denoiser: Any, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        from diffusers import Flux2KleinPipeline

        b, _, h, w = noisy.shape
        text = conditioning["encoder_hidden_states"]
        img_ids = Flux2KleinPipeline._prepare_latent_ids(noisy).to(noisy.device)
        guidance = torch.full((b,), GUIDANCE_SCALE, device=noisy.device) if self.guidance else None
        pred = denoiser(
            hidden_states=Flux2KleinPipeline._pack_latents(noisy),
            timestep=timesteps / 1000,
            guidance=guidance,
            encoder_hidden_states=text,
            txt_ids=Flux2KleinPipeline._prepare_text_ids(text).to(noisy.device),
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return Flux2KleinPipeline._unpack_latents_with_ids(pred[:, : h * w], img_ids)

    def sample_kwargs(self) -> dict[str, Any]:
        # A distilled model ignores CFG (the pipeline warns above 1); a base model samples with its default.
        return {
            "guidance_scale": 1.0 if self.distilled else BASE_GUIDANCE_SCALE,
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
        }

    # -- files --------------------------------------------------------------------------

    @classmethod
    def kohya_tensors(
        cls, modules: Mapping[tuple[str, str], LoraPair], alpha: float, denoiser_config: Mapping[str, Any] | None
    ) -> dict[str, torch.Tensor]:
        if denoiser_config is None:
            raise KohyaNameError("a FLUX.2 klein LoRA needs the transformer config to be named")
        others = sorted(c for c, _ in modules if c != "transformer")
        if others:
            raise KohyaNameError(f"a FLUX.2 klein LoRA adapts the transformer only, not {others[0]!r}")
        hidden = int(denoiser_config["num_attention_heads"]) * int(denoiser_config["attention_head_dim"])
        sizes = {part: hidden for parts in _DOUBLE_FUSED.values() for part in parts}
        groups = fused_groups({m: p for (_, m), p in modules.items()}, bfl_module)
        return fused_kohya_tensors(groups, alpha, _fused_parts, sizes)

    @classmethod
    def kohya_model_version(cls, variant: str, prediction_type: str) -> dict[str, str | None]:
        """musubi-tuner's modelspec (``utils/sai_model_spec.py``: ``Flux.2-klein-4b``/``-9b``); no
        ``ss_network_module``: sd-scripts has no FLUX.2 network, and ComfyUI reads none."""
        size = "9b" if variant.startswith("9b") else "4b"
        return {
            "ss_network_module": None,
            "ss_base_model_version": "flux2-klein",  # our choice: sd-scripts has no FLUX.2 value
            "modelspec.architecture": f"Flux.2-klein-{size}/lora",
            "modelspec.implementation": IMPLEMENTATION,
        }


def bfl_module(module: str) -> tuple[str, str | None]:
    """(BFL module as ComfyUI's FLUX.2 model holds it, the part of it when fused) of a diffusers
    FLUX.2 transformer module; KohyaNameError where ComfyUI would drop the LoRA."""
    parts = module.split(".")
    if parts[0] == "transformer_blocks" and len(parts) > 2:
        block, inner = f"double_blocks.{parts[1]}", ".".join(parts[2:])
        for bfl, members in _DOUBLE_FUSED.items():
            if inner in members:
                return f"{block}.{bfl}", inner
        if inner in _DOUBLE:
            return f"{block}.{_DOUBLE[inner]}", None
    elif parts[0] == "single_transformer_blocks" and len(parts) > 2:
        inner = ".".join(parts[2:])
        if inner in _SINGLE:
            return f"single_blocks.{parts[1]}.{_SINGLE[inner]}", None
    elif module in _TOP:
        return _TOP[module], None
    elif module.startswith(_UNMAPPED):
        raise KohyaNameError(
            f"FLUX.2 transformer module {module!r}: ComfyUI maps no LoRA name for the shared modulation, "
            "the timestep embedding or norm_out, so it would drop these weights; leave them out of "
            "target_modules (e.g. to_q, to_k, to_v, to_out.0, to_qkv_mlp_proj, attn.to_out)"
        )
    raise KohyaNameError(f"FLUX.2 transformer module {module!r} has no ComfyUI (BFL) name")


def _fused_parts(bfl: str) -> tuple[str, ...] | None:
    return _DOUBLE_FUSED.get(bfl.split(".", 2)[-1]) if bfl.startswith("double_blocks.") else None


# -- a tiny FLUX.2 klein built in code ----------------------------------------------------

# FLUX.2-klein-4B's transformer config (diffusers' convert_flux2_to_diffusers.py, "klein-4b")
# scaled down: 5 → 1 double and 20 → 1 single blocks, 24 × 128 → 2 × 16 attention, rope axes
# 4 × 32 → 4 × 4 (summing to the head dim), the text width 7680 (3 × Qwen3-4B's 2560) → 3 × 16,
# in_channels 128 (32 latent channels × 2×2) → 4 × 4.
TINY_TRANSFORMER = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=48,
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(4, 4, 4, 4),
    rope_theta=2000,
    eps=1e-6,
    guidance_embeds=False,
)
# AutoencoderKLFlux2's defaults (FLUX.2's VAE) scaled down: 4 → 2 blocks of 32/64, 32 → 4 latent channels.
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=32,
    batch_norm_eps=1e-4,
)
# Qwen3-4B scaled down to width 16; 28 layers so the pipeline's layers (9, 18, 27) exist.
TINY_QWEN3: dict[str, Any] = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=28,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    max_position_embeddings=MAX_SEQUENCE_LENGTH,
    tie_word_embeddings=True,
)
# The chat template's output for one user message with add_generation_prompt and
# enable_thinking=False, as Qwen3's template renders it (the only call the pipeline makes).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def tiny_qwen_tokenizer(folder: Path) -> Any:
    """A Qwen2 byte-level BPE tokenizer on the tiny vocabulary (every byte a token, no merges) with
    Qwen's special tokens (``<|endoftext|>`` pads, as in Qwen3) and the chat template above."""
    from transformers import Qwen2Tokenizer  # Qwen2TokenizerFast's class in transformers 5

    from lora_pipeline.worker.tiny_model import write_tiny_tokenizer_files

    write_tiny_tokenizer_files(folder)
    tokenizer = Qwen2Tokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_random(folder: Path, *, seed: int = 0, distilled: bool = False) -> None:
    """Save a FLUX.2-klein-4B-shaped pipeline with seeded random weights (base; ``distilled`` for the
    step-distilled model's ``is_distilled``). The VAE's batch-norm statistics are seeded too, not
    BatchNorm's 0/1, so the per-channel normalisation is visible in tests."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from lora_pipeline.worker.families.flux1 import SCHEDULER  # the published FLUX.2 scheduler is FLUX.1-dev's

    tokenizer = tiny_qwen_tokenizer(folder / "_tokenizer_src")
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(**TINY_TRANSFORMER)
    torch.manual_seed(seed)
    vae: Any = AutoencoderKLFlux2(**TINY_VAE)  # its `bn` is set in __init__, unseen by mypy
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.1 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(0.5 + torch.rand_like(vae.bn.running_var))
    torch.manual_seed(seed)
    special = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    qwen = Qwen3ForCausalLM(
        Qwen3Config(**TINY_QWEN3, vocab_size=len(tokenizer), pad_token_id=special, eos_token_id=special)
    )
    pipeline: Any = Flux2KleinPipeline(  # diffusers declares save_pretrained through a wrapper mypy cannot see
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=vae,
        text_encoder=qwen,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=distilled,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
