"""Qwen-Image: a 20B MMDiT (``QwenImageTransformer2DModel``) on Qwen2.5-VL's last hidden states,
with its own video-style VAE (``AutoencoderKLQwenImage``), flow matching.

Training follows diffusers' ``examples/dreambooth/train_dreambooth_lora_qwen_image.py`` (v0.40.0,
the same at HEAD but for its version check):

* text: the script's ``text_encoding_pipeline`` (``QwenImagePipeline`` with only the tokenizer and
  the Qwen2.5-VL encoder), ``encode_prompt(prompt, max_sequence_length=512)``: each caption in the
  pipeline's chat template (``prompt_template_encode``), the encoder's LAST hidden layer, the
  template's first 34 tokens dropped (``prompt_template_encode_start_idx``), at most 512 tokens,
  with the mask of the real ones; a batch is padded to its longest caption and the mask passed
  only when some token is padding (the script's ``concat_prompt_embedding_batches``). We pad each
  caption to 512 so the cache stacks, and ``predict`` trims a batch back to its longest caption:
  the same tensors the script passes. The encoder is not trained (the script has no option for it).
* timesteps: ``u`` uniform (``weighting_scheme`` "none"), ``timesteps = scheduler.timesteps[u·1000]``
  of the scheduler loaded with ``shift=3.0``; Qwen-Image's scheduler shifts dynamically
  (``use_dynamic_shifting``), so its training schedule is unshifted (the ``shift`` is unused)
  and ``t`` is uniform over 1…1000; the loss is unweighted.
* target: ``noise − latents`` at ``(1 − σ)·latents + σ·noise``, σ = t/1000 (flow.py), the
  transformer called with ``timestep / 1000``, latents packed 2×2 into tokens
  (``QwenImagePipeline._pack_latents``) with ``img_shapes = [(1, h/2, w/2)]`` per image (its RoPE
  positions), no guidance embedding.
* VAE: images as one-frame videos (``pixel_values.unsqueeze(2)``: 5-D, B×C×1×H×W), the latent
  ``latent_dist.sample()`` normalised per channel, ``(z − latents_mean) / latents_std`` (the VAE
  config's 16-value lists). The training loop draws ``mean + std·ε`` then ``(z − shift)·scaling``
  with scalars, so ``NormalisedFrames`` hands it the distribution already normalised (mean and std
  divided per channel: the same sample) and the scalar transform is the identity. The VAE encodes
  in float32, as every family's here (the script casts it to the training dtype).

The companion (primary) file: ComfyUI v0.19.3 loads the QwenImage model's weights under their
own names, which are diffusers' (``comfy/ldm/qwen_image/model.py``: ``transformer_blocks.N.attn.to_q``,
``img_mlp.net.0.proj``, ``img_mod.1``, ``norm_out.linear`` with diffusers' scale-then-shift order),
and ``model_lora_keys_unet`` maps every weight as ``lora_unet_<path with _>`` (all models) and as
``<path>``/``transformer.<path>``/``lycoris_…`` ("QwenImage lora format"). We write
``lora_unet_<path>.lora_down/.lora_up/.alpha``: the names musubi-tuner (kohya-ss) writes for
Qwen-Image (``networks.lora_qwen_image``: prefix ``lora_unet``, the DiT's module paths), so
ComfyUI, musubi-tuner and the kohya readers scale alike. Nothing fuses: each module is its own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import torch

from lora_pipeline.worker.families.base import Conditioning, Loaded, freeze
from lora_pipeline.worker.families.flow import FlowMatching, LoraPair
from lora_pipeline.worker.kohya import KohyaNameError

MAX_SEQUENCE_LENGTH = 512  # the reference script's --max_sequence_length default
# musubi-tuner's utils/sai_model_spec.py: ARCH_QWEN_IMAGE ("Qwen-Image", "/lora" for a LoRA) and
# IMPL_QWEN_IMAGE; sd-scripts has no Qwen-Image, musubi-tuner (kohya-ss's DiT trainer) is its kohya.
ARCHITECTURE = "Qwen-Image/lora"
IMPLEMENTATION = "https://github.com/QwenLM/Qwen-Image"
# musubi-tuner's hv_train_network.py writes ss_base_model_version = architecture_full_name, for
# Qwen-Image dataset/image_video_dataset.py's ARCHITECTURE_QWEN_IMAGE_FULL.
BASE_MODEL_VERSION = "qwen_image"

# The Linear layers of ComfyUI's QwenImage model (comfy/ldm/qwen_image/model.py), which have the
# same paths in diffusers' transformer: inside each transformer_blocks.N, and at the top.
BLOCK_LINEARS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "img_mod.1",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mod.1",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)
TOP_LINEARS = (
    "img_in",
    "txt_in",
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
    "norm_out.linear",
    "proj_out",
)


class NormalisedFrames(torch.nn.Module):
    """The Qwen-Image VAE as the training loop's image VAE: ``encode`` takes B×C×H×W pixels (one
    frame each) and returns the latent distribution per-channel normalised, B×C×h×w, as the
    reference normalises its samples: ``(z − latents_mean) / latents_std``."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae
        shape = (1, int(vae.config.z_dim), 1, 1)
        self.register_buffer("latents_mean", torch.tensor(vae.config.latents_mean).view(shape), persistent=False)
        self.register_buffer("latents_scale", 1.0 / torch.tensor(vae.config.latents_std).view(shape), persistent=False)

    def encode(self, pixels: torch.Tensor) -> Any:
        dist = self.vae.encode(pixels.unsqueeze(2)).latent_dist  # one-frame videos
        mean = (dist.mean[:, :, 0] - self.latents_mean) * self.latents_scale
        std = dist.std[:, :, 0] * self.latents_scale
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=std))


class QwenImage(FlowMatching):
    name: ClassVar[str] = "qwen-image"
    pipeline_class: ClassVar[str] = "QwenImagePipeline"
    # None: the reference trains no text encoder, and QwenImagePipeline's LoRA loader reads none.
    text_encoder_components: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model_dir: Any) -> None:
        super().__init__(model_dir)
        self._encoding: Any = None  # the reference's text_encoding_pipeline, once loaded

    def load(self, device: torch.device, dtype: torch.dtype) -> Loaded:
        from diffusers import (
            AutoencoderKLQwenImage,
            FlowMatchEulerDiscreteScheduler,
            QwenImagePipeline,
            QwenImageTransformer2DModel,
        )

        path = str(self.model_dir)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", shift=3.0)
        # As the script builds it: the pipeline with only the tokenizer and the text encoder.
        self._encoding = QwenImagePipeline.from_pretrained(
            path, vae=None, transformer=None, scheduler=None, dtype=dtype
        )
        encoder = self._encoding.text_encoder
        vae = NormalisedFrames(AutoencoderKLQwenImage.from_pretrained(path, subfolder="vae", dtype=torch.float32))
        transformer = QwenImageTransformer2DModel.from_pretrained(path, subfolder="transformer", dtype=dtype)
        freeze([vae, transformer, encoder], device)
        return Loaded(transformer, vae, [], [self._encoding.tokenizer], scheduler, frozen_encoders=[encoder])

    def latent_transform(self, loaded: Loaded) -> tuple[float, float]:
        return 1.0, 0.0  # NormalisedFrames normalised them already

    def encode_prompts(self, loaded: Loaded, captions: Sequence[str], device: torch.device) -> Conditioning:
        embeds, mask = self._encoding.encode_prompt(
            prompt=list(captions), device=device, max_sequence_length=MAX_SEQUENCE_LENGTH
        )
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        pad = MAX_SEQUENCE_LENGTH - embeds.shape[1]
        return {
            "encoder_hidden_states": torch.nn.functional.pad(embeds, (0, 0, 0, pad)),
            "encoder_hidden_states_mask": torch.nn.functional.pad(mask, (0, pad)),
        }

    def predict(
        self, denoiser: Any, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        from diffusers import QwenImagePipeline

        b, c, h, w = noisy.shape
        text, mask = batch_text(conditioning["encoder_hidden_states"], conditioning["encoder_hidden_states_mask"])
        pred = denoiser(
            hidden_states=QwenImagePipeline._pack_latents(noisy, b, c, h, w),
            encoder_hidden_states=text,
            encoder_hidden_states_mask=mask,
            timestep=timesteps / 1000,
            img_shapes=[(1, h // 2, w // 2)] * b,
            return_dict=False,
        )[0]
        # vae_scale_factor 1: the sizes given are the latent's own; one frame out.
        return QwenImagePipeline._unpack_latents(pred, h, w, 1)[:, :, 0]

    def sample_kwargs(self) -> dict[str, Any]:
        return {"max_sequence_length": MAX_SEQUENCE_LENGTH}

    # -- files --------------------------------------------------------------------------

    @classmethod
    def kohya_tensors(
        cls, modules: Mapping[tuple[str, str], LoraPair], alpha: float, denoiser_config: Mapping[str, Any] | None
    ) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for (component, module), pair in sorted(modules.items()):
            if component != "transformer":
                raise KohyaNameError(f"a Qwen-Image LoRA adapts the transformer only, not {component!r}")
            name = comfy_lora_name(module)
            tensors[f"{name}.lora_down.weight"] = pair["down"].contiguous()
            tensors[f"{name}.lora_up.weight"] = pair["up"].contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
        return tensors

    @classmethod
    def kohya_model_version(cls, variant: str, prediction_type: str) -> dict[str, str | None]:
        return {
            "ss_network_module": None,  # sd-scripts has no Qwen-Image network (musubi-tuner's is its own)
            "ss_base_model_version": BASE_MODEL_VERSION,
            "modelspec.architecture": ARCHITECTURE,
            "modelspec.implementation": IMPLEMENTATION,
        }


def batch_text(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch's caption embeddings (each padded to 512) cut to its longest caption, with the mask
    only where some token is padding: what the script's ``concat_prompt_embedding_batches`` gives."""
    valid = mask > 0.5  # cached in the training dtype: 0.0 or 1.0
    length = int(valid.sum(dim=1).max())
    valid = valid[:, :length]
    return embeds[:, :length], None if bool(valid.all()) else valid.long()


def comfy_lora_name(module: str) -> str:
    """The kohya name (``lora_unet_<path>``) ComfyUI maps to a diffusers Qwen-Image transformer module."""
    parts = module.split(".")
    inner = ".".join(parts[2:])
    in_block = parts[0] == "transformer_blocks" and len(parts) > 2 and parts[1].isdigit() and inner in BLOCK_LINEARS
    if not (in_block or module in TOP_LINEARS):
        raise KohyaNameError(
            f"Qwen-Image transformer module {module!r} is not a Linear layer of ComfyUI's QwenImage model: "
            "no LoRA name loads into it"
        )
    return "lora_unet_" + module.replace(".", "_")


# -- a tiny Qwen-Image built in code ------------------------------------------------------

# Qwen/Qwen-Image's published transformer config scaled down: 60 → 2 blocks, 24 × 128 → 2 × 16
# attention (rope axes 16/56/56 → 4/6/6, summing to the head dim), the text width 3584 → 32;
# the VAE's 16 latent channels → 4 (in_channels = 4 × 2×2 packing).
TINY_TRANSFORMER = dict(
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    guidance_embeds=False,
    axes_dims_rope=(4, 6, 6),
)
# The published VAE (base_dim 96, z_dim 16, dim_mult [1, 2, 4, 4], 2 res blocks, temporal
# downsampling [False, True, True]) scaled down to one 2× downsampling; latents_mean/std are the
# published first four channels', so the per-channel normalisation is a real one.
TINY_VAE = dict(
    base_dim=16,
    z_dim=4,
    dim_mult=[1, 2],
    num_res_blocks=1,
    temperal_downsample=[False],
    latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075],
    latents_std=[2.8184, 1.4541, 2.3275, 2.6558],
)
# The published scheduler config (dynamic, exponential shift by resolution at sampling time).
SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=0.9,
    base_image_seq_len=256,
    max_image_seq_len=8192,
    shift_terminal=0.02,
    time_shift_type="exponential",
)
# Qwen2.5-VL-7B's text model (28 layers, 3584 wide, 28 heads / 4 KV heads, mrope sections
# [16, 24, 24] of a 128 head) scaled down: 2 layers, 32 wide, 4 heads / 2 KV heads of 8.
TINY_TEXT: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
    rope_theta=1000000.0,
    max_position_embeddings=2048,
)
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]  # the prompt template's special tokens


def tiny_qwen_tokenizer(folder: Path) -> Any:
    """A Qwen2 (byte-level BPE) tokenizer on the tiny byte vocabulary (every byte a token; no
    merges), with the chat template's special tokens: any text tokenizes."""
    from transformers import Qwen2Tokenizer

    from lora_pipeline.worker.tiny_model import write_tiny_tokenizer_files

    write_tiny_tokenizer_files(folder)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": CHAT_TOKENS})
    return tokenizer


def build_random(folder: Path, *, seed: int = 0) -> None:
    """Save a Qwen-Image-shaped pipeline with seeded random weights; its text encoder is
    Qwen2.5-VL's text model alone (the pipeline reads only its hidden states)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    tokenizer = tiny_qwen_tokenizer(folder / "_tokenizer_src")
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(**TINY_TRANSFORMER)
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(**TINY_VAE)
    torch.manual_seed(seed)
    text = Qwen2_5_VLTextModel(
        Qwen2_5_VLTextConfig(
            **TINY_TEXT,
            vocab_size=len(tokenizer),
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    pipeline: Any = QwenImagePipeline(  # diffusers declares save_pretrained through a wrapper mypy cannot see
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
