"""Z-Image (Tongyi-MAI's 6B single-stream DiT; Z-Image-Turbo is its distilled variant): one
transformer over the caption's Qwen3 states and the image's latent patches, flow matching.

Training follows diffusers' ``examples/dreambooth/train_dreambooth_lora_z_image.py`` (v0.40.0;
HEAD differs only in ``check_min_version``):

* captions: ``ZImagePipeline.encode_prompt`` (``pipeline_z_image.py``, ``_encode_prompt``): each
  caption is one user message through the tokenizer's chat template (``add_generation_prompt=True,
  enable_thinking=True``), tokenized to ``max_sequence_length`` = 512 (the script's
  ``--max_sequence_length`` default) with the attention mask, and the Qwen3 encoder's
  second-to-last hidden states (``hidden_states[-2]``) are kept for the tokens the mask keeps: a
  list of variable-length embeddings, no pooled vector. The cache here holds them padded to 512
  with the mask beside them (cached conditioning is stacked per batch), and ``predict`` hands the
  transformer the masked tokens only: the same list. The script never trains the text encoder.
* timesteps: ``weighting_scheme`` "none" (uniform ``u``), ``timesteps = scheduler.timesteps[(u·N)]``
  of the base's ``FlowMatchEulerDiscreteScheduler``: Z-Image-Turbo's config shifts statically
  (``shift`` 3.0, ``use_dynamic_shifting`` false), so training sees the shifted schedule.
* target: ``noisy = (1 − σ)·x + σ·ε`` with σ the scheduler's sigma at t (= t / 1000), target
  ``ε − x``, unweighted MSE (``flow.FlowMatching``).
* the transformer takes the latents as a list of ``(C, 1, H, W)`` (it patchifies 2×2 itself and
  builds the position ids), the timestep as ``(1000 − t) / 1000`` (its ``t_scale`` 1000 is inside),
  the caption list; its output is negated ("z-Image negates the prediction").
* VAE: FLUX.1's autoencoder, ``(z − shift_factor) · scaling_factor`` (0.1159, 0.3611), encoded with
  the posterior's mode, not a sample (``latent_dist.mode()``): ``latent_mode``.
* LoRA targets: the script's default is ``to_k, to_q, to_v, to_out.0`` (ours too).

Samples use ``ZImagePipeline``'s own defaults (its ``guidance_scale`` 5.0 with an empty negative
prompt), as the script's validation does.

Variant: Z-Image and Z-Image-Turbo share the transformer config (diffusers' defaults are its
values); the configs this module can read do not tell them apart, so ``variant`` is empty and the
header names the family, not the checkpoint.

Files: ComfyUI (v0.19.3) loads Z-Image as a Lumina 2 model (``model_base.Lumina2``, its NextDiT
module tree; ``comfy/utils.py`` ``z_image_to_diffusers`` converts diffusers' Z-Image weights to it).
Its key map (``comfy/lora.py`` ``model_lora_keys_unet``) holds ``lora_unet_<NextDiT path>`` for every
weight of that tree, so the companion file uses those names (``.lora_down``/``.lora_up`` + ``.alpha``).
NextDiT fuses what diffusers splits, ``attention.qkv`` = to_q, to_k, to_v (each ``dim`` rows), so
that LoRA is the parts' side by side (``flow.fuse_lora``: the same delta exactly). sd-scripts has no
Z-Image; the header's ``modelspec.architecture`` is musubi-tuner's (kohya-ss's DiT trainer,
``utils/sai_model_spec.py``: ``ARCH_Z_IMAGE = "Z-Image"``, ``/lora`` appended, implementation
``https://github.com/Tongyi-MAI/Z-Image``), and no ``ss_network_module`` is claimed.
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
ARCHITECTURE = "Z-Image"  # musubi-tuner's modelspec.architecture for Z-Image
IMPLEMENTATION = "https://github.com/Tongyi-MAI/Z-Image"  # musubi-tuner's modelspec.implementation
PATCH = "2-1"  # the one (patch size, frame patch size) embedder ComfyUI's NextDiT has

# diffusers module inside a block (layers / noise_refiner / context_refiner) → NextDiT's, one to one.
_BLOCK = {
    "attention.to_out.0": "attention.out",
    "feed_forward.w1": "feed_forward.w1",
    "feed_forward.w2": "feed_forward.w2",
    "feed_forward.w3": "feed_forward.w3",
    "adaLN_modulation.0": "adaLN_modulation.0",
}
_QKV = ("attention.to_q", "attention.to_k", "attention.to_v")  # NextDiT's attention.qkv, in order
_TOP = {
    f"all_x_embedder.{PATCH}": "x_embedder",
    f"all_final_layer.{PATCH}.linear": "final_layer.linear",
    f"all_final_layer.{PATCH}.adaLN_modulation.1": "final_layer.adaLN_modulation.1",
    "cap_embedder.1": "cap_embedder.1",
    "t_embedder.mlp.0": "t_embedder.mlp.0",
    "t_embedder.mlp.2": "t_embedder.mlp.2",
}
_BLOCKS = ("layers", "noise_refiner", "context_refiner")


class ZImage(FlowMatching):
    name: ClassVar[str] = "z-image"
    pipeline_class: ClassVar[str] = "ZImagePipeline"
    text_encoder_components: ClassVar[tuple[str, ...]] = ()  # Qwen3 stays frozen, as in the script
    latent_mode: ClassVar[bool] = True

    @cached_property
    def transformer_config(self) -> dict[str, Any]:
        return json.loads((self.model_dir / "transformer" / "config.json").read_text(encoding="utf-8"))

    def load(self, device: torch.device, dtype: torch.dtype) -> Loaded:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
        from transformers import AutoTokenizer, Qwen3Model

        path = str(self.model_dir)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
        qwen = Qwen3Model.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", dtype=torch.float32)
        transformer = ZImageTransformer2DModel.from_pretrained(path, subfolder="transformer", dtype=dtype)
        freeze([vae, transformer, qwen], device)
        return Loaded(transformer, vae, [], [tokenizer], scheduler, frozen_encoders=[qwen])

    def encode_prompts(self, loaded: Loaded, captions: Sequence[str], device: torch.device) -> Conditioning:
        tokenizer, qwen = loaded.tokenizers[0], loaded.frozen_encoders[0]
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": caption}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=True,
            )
            for caption in captions
        ]
        tokens = tokenizer(
            texts, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True, return_tensors="pt"
        )
        mask = tokens.attention_mask.to(device).bool()
        hidden = qwen(input_ids=tokens.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
        return {"cap_feats": hidden.hidden_states[-2], "cap_mask": mask}

    def predict(
        self, denoiser: Any, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        features, mask = conditioning["cap_feats"], conditioning["cap_mask"].bool()
        captions = [f[m] for f, m in zip(features, mask, strict=True)]
        pred = denoiser(
            list(noisy.unsqueeze(2).unbind(0)),  # (C, 1, H, W) each
            (1000 - timesteps) / 1000,
            captions,
            return_dict=False,
        )[0]
        return -torch.stack(pred, dim=0).squeeze(2)

    # -- files --------------------------------------------------------------------------

    @classmethod
    def kohya_tensors(
        cls, modules: Mapping[tuple[str, str], LoraPair], alpha: float, denoiser_config: Mapping[str, Any] | None
    ) -> dict[str, torch.Tensor]:
        if denoiser_config is None:
            raise KohyaNameError("a Z-Image LoRA needs the transformer config to be named")
        dim = int(denoiser_config["dim"])
        groups = fused_groups({m: p for (c, m), p in modules.items() if c == "transformer"}, nextdit_module)
        others = sorted(c for c, _ in modules if c != "transformer")
        if others:
            raise KohyaNameError(f"a Z-Image LoRA adapts the transformer only, not {others[0]!r}")
        return fused_kohya_tensors(groups, alpha, _fused_parts, dict.fromkeys(_QKV, dim))

    @classmethod
    def kohya_model_version(cls, variant: str, prediction_type: str) -> dict[str, str | None]:
        return {
            "ss_network_module": None,  # sd-scripts has no Z-Image network
            "modelspec.architecture": f"{ARCHITECTURE}/lora",
            "modelspec.implementation": IMPLEMENTATION,
        }


def nextdit_module(module: str) -> tuple[str, str | None]:
    """(ComfyUI's NextDiT module, the part of it when fused) of a diffusers Z-Image transformer
    module; KohyaNameError for one ComfyUI maps no name for (Omni's SigLIP modules, an embedder of
    another patch size)."""
    parts = module.split(".")
    if parts[0] in _BLOCKS and len(parts) > 2:
        block, inner = ".".join(parts[:2]), ".".join(parts[2:])
        if inner in _QKV:
            return f"{block}.attention.qkv", inner
        if inner in _BLOCK:
            return f"{block}.{_BLOCK[inner]}", None
    elif module in _TOP:
        return _TOP[module], None
    raise KohyaNameError(
        f"Z-Image transformer module {module!r} has no name in ComfyUI's Z-Image (NextDiT) model; "
        "leave it out of params.target_modules"
    )


def _fused_parts(nextdit: str) -> tuple[str, ...] | None:
    return _QKV if nextdit.endswith(".attention.qkv") else None


# -- a tiny Z-Image built in code ---------------------------------------------------------

# Z-Image-Turbo's published transformer config (diffusers' ZImageTransformer2DModel defaults: dim
# 3840, 30 layers, 2 refiner layers, 30 heads, cap_feat_dim 2560 = Qwen3-4B's width, rope axes
# 32/48/48) scaled down: dim 32 in 2 heads of 16 (rope axes 4/6/6), 1 layer, 1 refiner layer of
# each kind, captions 32 wide; 16 latent channels → 4 (FLUX.1's tiny VAE).
TINY_TRANSFORMER = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=4,
    dim=32,
    n_layers=1,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=32,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[4, 6, 6],
    axes_lens=[1024, 512, 512],
)
# Qwen3-4B's config (hidden 2560, 36 layers, 32 heads / 8 KV heads of 128) scaled down.
TINY_QWEN3: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=MAX_SEQUENCE_LENGTH,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
)
# Z-Image-Turbo's scheduler config: a static shift.
SCHEDULER = dict(num_train_timesteps=1000, use_dynamic_shifting=False, shift=3.0)
# Qwen3's chat template, reduced to what encode_prompt renders (user messages, the generation
# prompt, the empty thinking block only when thinking is off): the same text for those.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def build_random(folder: Path, *, seed: int = 0) -> None:
    """Save a Z-Image-shaped pipeline with seeded random weights. The tokenizer is Qwen's class
    (byte-level BPE, ``<|endoftext|>`` as pad, ``<|im_start|>``/``<|im_end|>``) on the tiny
    byte-level vocabulary, so any caption tokenizes."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

    from lora_pipeline.worker.families.flux1 import TINY_VAE
    from lora_pipeline.worker.tiny_model import write_tiny_tokenizer_files

    source = folder / "_tokenizer_src"
    write_tiny_tokenizer_files(source)
    tokenizer = Qwen2Tokenizer(
        vocab=str(source / "vocab.json"),
        merges=str(source / "merges.txt"),
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_SEQUENCE_LENGTH,
    )
    torch.manual_seed(seed)
    transformer: Any = ZImageTransformer2DModel(**TINY_TRANSFORMER)  # nn.Parameters mypy cannot see
    with torch.no_grad():  # created with torch.empty: give them values (diffusers' tests use ones)
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**TINY_VAE)
    torch.manual_seed(seed)
    qwen = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **TINY_QWEN3))
    pipeline: Any = ZImagePipeline(  # diffusers declares save_pretrained through a wrapper mypy cannot see
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=vae,
        text_encoder=qwen,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
