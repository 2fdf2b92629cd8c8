"""The families the GPU benchmark measures, one entry each: what to build, what to compare with.

An entry holds the published configs of the family's transformer, text encoders and VAE
(random weights at real size: the GPU machine has no network), the diffusers reference
script with the arguments that make its run the same as ours (resolution, rank, batch),
the tiny model ``--dry-run`` uses instead, and the run's sizes (steps, warm-up).

A transformer family's model folder holds configs and tokenizers only, no weights, and a
marker (``reference_shim/random_weights.py``): its ``from_pretrained`` builds each model
from its config directly on the device in the run's weight dtype, so a 12–20B model costs
seconds (CUDA kernels fill the weights; nothing is written to or read from disk). SD1.5 and
SDXL keep their saved random-weight folders (``bench_training.model_spec``), a few GB.

Where each config comes from (the hub is not reachable here; each is written out below):

* FLUX.1-dev: ``black-forest-labs/FLUX.1-dev`` ``transformer/config.json`` (19 double, 38
  single blocks, 24 × 128 heads, T5 4096 / CLIP 768 widths, guidance embedding); its VAE
  (16 latent channels, scaling 0.3611, shift 0.1159); CLIP ViT-L/14's text tower;
  T5 v1.1 XXL's encoder (``google/t5-v1_1-xxl``); the scheduler of ``flux1.SCHEDULER``.
* SD3.5 medium / large: ``stabilityai/stable-diffusion-3.5-medium`` / ``-large``
  ``transformer/config.json`` (24 blocks of 24 × 64 with dual attention in 0–12; 38 blocks of
  38 × 64); CLIP-L and OpenCLIP bigG with projections; T5 XXL; their 16-channel VAE
  (scaling 1.5305, shift 0.0609); ``FlowMatchEulerDiscreteScheduler(shift=3.0)``.
* FLUX.2 klein 4B: diffusers' ``scripts/convert_flux2_to_diffusers.py`` (v0.40.0),
  ``get_flux2_transformer_config("klein-4b")``, ``AutoencoderKLFlux2()``'s defaults (the
  script saves those), the FLUX.1-dev scheduler (the script copies it); Qwen3-4B
  (``Qwen/Qwen3-4B`` ``config.json``) as ``Qwen3ForCausalLM``, whose three hidden layers
  stacked make the 7680 text width.
* Z-Image: ``ZImageTransformer2DModel``'s defaults in diffusers 0.42 (dim 3840, 30 layers,
  30 heads, caption width 2560 = Qwen3-4B), the FLUX.1 VAE, Qwen3-4B as ``Qwen3Model``,
  ``FlowMatchEulerDiscreteScheduler(shift=3.0)``.
* Qwen-Image: ``QwenImageTransformer2DModel``'s and ``AutoencoderKLQwenImage``'s defaults
  in diffusers 0.42 (60 blocks, 24 × 128, text width 3584), ``Qwen/Qwen2.5-VL-7B-Instruct``
  ``config.json`` (text 28 × 3584, vision 32 × 1280), and ``Qwen/Qwen-Image``
  ``scheduler/scheduler_config.json`` (exponential dynamic shift, terminal 0.02).

Tokenizers are small byte-level stand-ins of the classes the pipelines load (CLIP, T5,
Qwen2 with a chat template): random weights need no real vocabulary, and both sides get the
same token ids. A caption is then a few more tokens than the real vocabularies make: the
text part of a 1024² step (4096 image tokens) grows by a few percent on both sides alike.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MARKER = "bench_random_weights.json"  # reference_shim/random_weights.py builds such folders' models

CLIP_L = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
    vocab_size=49408,
)
CLIP_BIGG = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=20,
    num_hidden_layers=32,
    max_position_embeddings=77,
    projection_dim=1280,
    hidden_act="gelu",
    vocab_size=49408,
)
T5_XXL = dict(
    d_model=4096,
    d_ff=10240,
    d_kv=64,
    num_heads=64,
    num_layers=24,
    vocab_size=32128,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6,
    pad_token_id=0,
    eos_token_id=1,
)
QWEN3_4B = dict(
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    vocab_size=151936,
    tie_word_embeddings=True,
    hidden_act="silu",
)
QWEN25_VL_7B = dict(
    text_config=dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=128000,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        vocab_size=152064,
        hidden_act="silu",
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    ),
    vision_config=dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=3584,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
        in_chans=3,
        hidden_act="silu",
    ),
    tie_word_embeddings=False,
)
KL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    norm_num_groups=32,
    sample_size=1024,
    latent_channels=16,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
FLUX1_VAE = dict(KL_VAE, scaling_factor=0.3611, shift_factor=0.1159)
SD3_VAE = dict(KL_VAE, scaling_factor=1.5305, shift_factor=0.0609)
FLUX1_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
QWEN_IMAGE_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=math.log(3),
    max_shift=math.log(3),
    base_image_seq_len=256,
    max_image_seq_len=8192,
    shift_terminal=0.02,
    time_shift_type="exponential",
)


@dataclass(frozen=True)
class Component:
    """One model of a pipeline: its library, class and published config."""

    library: str  # "diffusers" | "transformers"
    cls: str
    config: dict[str, Any]
    tokenizer: str | None = None  # the byte-level stand-in to write beside it: "clip" | "t5" | "qwen"


@dataclass(frozen=True)
class FamilyEntry:
    """One family in the benchmark: a row of ``TABLE``."""

    name: str  # the run ids' prefix
    family: str  # lora_pipeline.worker.families' name (train_lora's ``family``)
    tiny: str  # the tiny model --dry-run trains (lora_pipeline.contracts.training.TINY_MODELS)
    reference_script: str  # examples/dreambooth/… or examples/text_to_image/… at diffusers v0.40.0
    resolution: int
    batch_size: int
    rank: int
    steps: int
    warmup: int
    images: int  # a multiple of the batch: neither side gets a short batch
    tflop_per_sample: float | None  # denoiser forward per sample at this resolution (MFU); None: not estimated
    # Beyond the common flags (bench_gpu.reference_argv): what makes the reference's run ours.
    reference_args: tuple[str, ...] = ()
    # TrainingParams fields of our baseline run, matching reference_args (gradient checkpointing …).
    params: dict[str, Any] = field(default_factory=dict)
    # Real-size components; None: SD1.5/SDXL, saved by bench_training.model_spec.
    pipeline: str | None = None
    components: dict[str, Component] | None = None
    scheduler: dict[str, Any] | None = None
    peak_goal_gb: float | None = None  # the memory goal for this family (FLUX.1-dev: 24 GB)


DREAMBOOTH = "examples/dreambooth/"
GC = ("--gradient_checkpointing",)

# In order of importance: the budget cuts from the end (bench_gpu.plan).
TABLE: dict[str, FamilyEntry] = {
    e.name: e
    for e in [
        FamilyEntry(
            "flux1",
            "flux1",
            "tiny-flux1",
            DREAMBOOTH + "train_dreambooth_lora_flux.py",
            1024,
            1,
            16,
            steps=6,
            warmup=2,
            images=4,
            # 12B × 2 FLOP × (4096 image + 512 text tokens) + attention: ≈ 125 TFLOP a forward.
            tflop_per_sample=125.0,
            reference_args=GC,  # 12B at 1024² without checkpointing does not fit 80 GB with room to spare
            params={"gradient_checkpointing": True},
            pipeline="FluxPipeline",
            components={
                "transformer": Component(
                    "diffusers",
                    "FluxTransformer2DModel",
                    dict(
                        patch_size=1,
                        in_channels=64,
                        num_layers=19,
                        num_single_layers=38,
                        attention_head_dim=128,
                        num_attention_heads=24,
                        joint_attention_dim=4096,
                        pooled_projection_dim=768,
                        guidance_embeds=True,
                        axes_dims_rope=[16, 56, 56],
                    ),
                ),
                "vae": Component("diffusers", "AutoencoderKL", FLUX1_VAE),
                "text_encoder": Component("transformers", "CLIPTextModel", CLIP_L, tokenizer="clip"),
                "text_encoder_2": Component("transformers", "T5EncoderModel", T5_XXL, tokenizer="t5"),
            },
            scheduler=FLUX1_SCHEDULER,
            peak_goal_gb=24.0,
        ),
        FamilyEntry(
            "sd3-medium",
            "sd3",
            "tiny-sd3",
            DREAMBOOTH + "train_dreambooth_lora_sd3.py",
            1024,
            1,
            16,
            steps=8,
            warmup=3,
            images=4,
            tflop_per_sample=23.0,  # 2.5B × 2 × (4096 + 333 tokens) + attention
            pipeline="StableDiffusion3Pipeline",
            components={
                "transformer": Component(
                    "diffusers",
                    "SD3Transformer2DModel",
                    dict(
                        sample_size=128,
                        patch_size=2,
                        in_channels=16,
                        out_channels=16,
                        num_layers=24,
                        attention_head_dim=64,
                        num_attention_heads=24,
                        joint_attention_dim=4096,
                        caption_projection_dim=1536,
                        pooled_projection_dim=2048,
                        pos_embed_max_size=384,
                        dual_attention_layers=list(range(13)),
                        qk_norm="rms_norm",
                    ),
                ),
                "vae": Component("diffusers", "AutoencoderKL", SD3_VAE),
                "text_encoder": Component("transformers", "CLIPTextModelWithProjection", CLIP_L, tokenizer="clip"),
                "text_encoder_2": Component("transformers", "CLIPTextModelWithProjection", CLIP_BIGG, tokenizer="clip"),
                "text_encoder_3": Component("transformers", "T5EncoderModel", T5_XXL, tokenizer="t5"),
            },
            scheduler=dict(num_train_timesteps=1000, shift=3.0),
        ),
        FamilyEntry(
            "flux2-klein",
            "flux2-klein",
            "tiny-flux2-klein",
            DREAMBOOTH + "train_dreambooth_lora_flux2_klein.py",
            1024,
            1,
            16,
            steps=8,
            warmup=3,
            images=4,
            tflop_per_sample=40.0,  # 4B × 2 × (4096 + 512) + attention
            # The klein pipelines' text layers, which ours uses (families/flux2_klein.py's TEXT_LAYERS);
            # the script's default (10 20 30) differs, and is past the tiny model's 28 layers.
            reference_args=("--text_encoder_out_layers", "9", "18", "27"),
            pipeline="Flux2KleinPipeline",
            components={
                "transformer": Component(
                    "diffusers",
                    "Flux2Transformer2DModel",
                    dict(
                        patch_size=1,
                        in_channels=128,
                        num_layers=5,
                        num_single_layers=20,
                        attention_head_dim=128,
                        num_attention_heads=24,
                        joint_attention_dim=7680,
                        timestep_guidance_channels=256,
                        mlp_ratio=3.0,
                        axes_dims_rope=[32, 32, 32, 32],
                        rope_theta=2000,
                        eps=1e-6,
                        guidance_embeds=False,
                    ),
                ),
                "vae": Component("diffusers", "AutoencoderKLFlux2", {}),
                "text_encoder": Component("transformers", "Qwen3ForCausalLM", QWEN3_4B, tokenizer="qwen"),
            },
            scheduler=FLUX1_SCHEDULER,
        ),
        FamilyEntry(
            "z-image",
            "z-image",
            "tiny-z-image",
            DREAMBOOTH + "train_dreambooth_lora_z_image.py",
            1024,
            1,
            16,
            steps=8,
            warmup=3,
            images=4,
            tflop_per_sample=55.0,  # 6B × 2 × (4096 + text) + attention
            pipeline="ZImagePipeline",
            components={
                "transformer": Component("diffusers", "ZImageTransformer2DModel", {}),
                "vae": Component("diffusers", "AutoencoderKL", FLUX1_VAE),
                "text_encoder": Component("transformers", "Qwen3Model", QWEN3_4B, tokenizer="qwen"),
            },
            scheduler=dict(num_train_timesteps=1000, shift=3.0),
        ),
        FamilyEntry(
            "qwen-image",
            "qwen-image",
            "tiny-qwen-image",
            DREAMBOOTH + "train_dreambooth_lora_qwen_image.py",
            1024,
            1,
            16,
            steps=6,
            warmup=2,
            images=4,
            tflop_per_sample=180.0,  # 20B × 2 × (4096 + text) + attention
            reference_args=GC,  # 20B: activations of 60 blocks at 1024² need checkpointing on 80 GB
            params={"gradient_checkpointing": True},
            pipeline="QwenImagePipeline",
            components={
                "transformer": Component("diffusers", "QwenImageTransformer2DModel", {}),
                "vae": Component("diffusers", "AutoencoderKLQwenImage", {}),
                "text_encoder": Component(
                    "transformers", "Qwen2_5_VLForConditionalGeneration", QWEN25_VL_7B, tokenizer="qwen"
                ),
            },
            scheduler=QWEN_IMAGE_SCHEDULER,
        ),
        # The UNet families: saved random-weight folders (bench_training.model_spec).
        FamilyEntry(
            "sd15",
            "sd1",
            "tiny",
            "examples/text_to_image/train_text_to_image_lora.py",
            512,
            4,
            16,
            steps=60,
            warmup=20,
            images=8,
            tflop_per_sample=0.80,  # UNet forward, DESIGN.md's convention
        ),
        FamilyEntry(
            "sdxl",
            "sdxl",
            "tiny-sdxl",
            DREAMBOOTH + "train_dreambooth_lora_sdxl.py",
            1024,
            2,
            16,
            steps=40,
            warmup=10,
            images=8,
            tflop_per_sample=6.8,
        ),
        FamilyEntry(
            "sd3-large",
            "sd3",
            "tiny-sd3",
            DREAMBOOTH + "train_dreambooth_lora_sd3.py",
            1024,
            1,
            16,
            steps=6,
            warmup=2,
            images=4,
            tflop_per_sample=72.0,  # 8B × 2 × (4096 + 333) + attention
            reference_args=GC,
            params={"gradient_checkpointing": True},
            pipeline="StableDiffusion3Pipeline",
            components={
                "transformer": Component(
                    "diffusers",
                    "SD3Transformer2DModel",
                    dict(
                        sample_size=128,
                        patch_size=2,
                        in_channels=16,
                        out_channels=16,
                        num_layers=38,
                        attention_head_dim=64,
                        num_attention_heads=38,
                        joint_attention_dim=4096,
                        caption_projection_dim=2432,
                        pooled_projection_dim=2048,
                        pos_embed_max_size=192,
                        qk_norm="rms_norm",
                    ),
                ),
                "vae": Component("diffusers", "AutoencoderKL", SD3_VAE),
                "text_encoder": Component("transformers", "CLIPTextModelWithProjection", CLIP_L, tokenizer="clip"),
                "text_encoder_2": Component("transformers", "CLIPTextModelWithProjection", CLIP_BIGG, tokenizer="clip"),
                "text_encoder_3": Component("transformers", "T5EncoderModel", T5_XXL, tokenizer="t5"),
            },
            scheduler=dict(num_train_timesteps=1000, shift=3.0),
        ),
    ]
}

# --------------------------------------------------------------------------- tokenizers

# Enough of Qwen's chat format for the pipelines' apply_chat_template (Z-Image, FLUX.2 klein).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tokenizer(kind: str, folder: Path) -> int:
    """A byte-level stand-in of the tokenizer class the pipelines load; returns its size.

    Printable ASCII only (and CLIP's byte vocabulary for CLIP): small enough for any tiny
    text encoder's vocabulary, and every caption the benchmark writes is ASCII."""
    from lora_pipeline.worker.tiny_model import _bytes_to_unicode, tiny_tokenizer

    ascii_symbols = [c for b, c in _bytes_to_unicode().items() if 32 <= b < 127]
    if kind == "clip":
        tokenizer, ids = tiny_tokenizer(folder / "_src")
        tokenizer.save_pretrained(folder)
        shutil.rmtree(folder / "_src")
        return ids["vocab_size"]
    if kind == "t5":
        from transformers import T5TokenizerFast

        pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
        pieces += [(chr(c), -2.0) for c in range(33, 127)]
        T5TokenizerFast(vocab=pieces, extra_ids=0).save_pretrained(folder)
        return len(pieces)
    if kind == "qwen":
        from transformers import Qwen2Tokenizer

        vocab = {s: i for i, s in enumerate(ascii_symbols)}
        qwen = Qwen2Tokenizer(vocab=vocab, merges=[])
        qwen.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        qwen.chat_template = QWEN_CHAT_TEMPLATE
        qwen.save_pretrained(folder)
        return len(qwen)
    raise ValueError(f"no tokenizer stand-in {kind!r}: clip, t5 or qwen")


# --------------------------------------------------------------------------- folders


def write_real_folder(entry: FamilyEntry, folder: Path) -> Path:
    """A real-size pipeline folder without weights: model_index.json, each component's
    complete config (built on the meta device once, so a wrong key fails here in seconds),
    the tokenizer stand-ins and the marker."""
    import diffusers
    import torch
    import transformers

    if entry.components is None or entry.pipeline is None:
        raise ValueError(f"{entry.name}: no real-size components (SD families are saved with weights)")
    if (folder / MARKER).is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"_class_name": entry.pipeline, "_diffusers_version": diffusers.__version__}
    tokenizer_sizes = {}
    for name, component in entry.components.items():
        target = folder / name
        if component.library == "diffusers":
            cls = getattr(diffusers, component.cls)
            with torch.device("meta"):
                model = cls.from_config(component.config)
            model.save_config(target)
        else:
            cls = getattr(transformers, component.cls)
            config = cls.config_class(**component.config)
            config.architectures = [component.cls]
            config.save_pretrained(target)
        index[name] = [component.library, component.cls]
        if component.tokenizer:
            tokenizer_name = name.replace("text_encoder", "tokenizer")
            tokenizer_sizes[name] = write_tokenizer(component.tokenizer, folder / tokenizer_name)
            index[tokenizer_name] = ["transformers", _TOKENIZER_CLASS[component.tokenizer]]
    diffusers.FlowMatchEulerDiscreteScheduler(**(entry.scheduler or {})).save_config(folder / "scheduler")
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    for name in getattr(diffusers, entry.pipeline)._optional_components:
        index.setdefault(name, [None, None])  # image encoders …: absent, as in the published folders
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    _check_vocabularies(folder, tokenizer_sizes)
    (folder / MARKER).write_text(json.dumps({"family": entry.family, "size": "real", "seed": 0}) + "\n")
    return folder


_TOKENIZER_CLASS = {"clip": "CLIPTokenizer", "t5": "T5TokenizerFast", "qwen": "Qwen2Tokenizer"}


def configs_only(model: Path, entry: FamilyEntry, folder: Path) -> Path:
    """The dry run's folder: the tiny model's configs, no weights, and the tokenizer stand-ins
    (the reference scripts load T5 and Qwen tokenizers by class), so the dry run loads through
    the same random-weights shim as the GPU run."""
    if (folder / MARKER).is_file():
        return folder
    if entry.components is None:
        raise ValueError(f"{entry.name}: SD families keep their saved folders")
    shutil.copytree(model, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", ".lora_pipeline_*"))
    sizes = {}
    index = json.loads((folder / "model_index.json").read_text())
    for name, component in entry.components.items():
        if component.tokenizer and name in index:
            tokenizer_name = name.replace("text_encoder", "tokenizer")
            shutil.rmtree(folder / tokenizer_name, ignore_errors=True)
            sizes[name] = write_tokenizer(component.tokenizer, folder / tokenizer_name)
            index[tokenizer_name] = ["transformers", _TOKENIZER_CLASS[component.tokenizer]]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    _check_vocabularies(folder, sizes)
    (folder / MARKER).write_text(json.dumps({"family": entry.family, "size": "tiny", "seed": 0}) + "\n")
    return folder


def _check_vocabularies(folder: Path, sizes: dict[str, int]) -> None:
    """Every token id the stand-in makes is an id the text encoder embeds."""
    for name, size in sizes.items():
        config = json.loads((folder / name / "config.json").read_text())
        vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
        if vocab is not None and vocab < size:
            raise ValueError(f"{folder.name}/{name}: vocab_size {vocab} < the {size}-token tokenizer stand-in")
