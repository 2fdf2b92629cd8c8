"""Stable Diffusion base models with random weights, built in code and kept on disk.

Tests, the local demo and the CPU benchmark need a real diffusers model without
reaching a model hub. ``ensure_tiny_model`` builds a tiny SD1-family model
(seeded random weights, sizes from diffusers' own LoRA tests), saves it as an
ordinary diffusers folder and returns the path, so the worker loads it exactly
the way it loads a real base model. The training benchmark uses the same builder
with real SD1.5/SDXL sizes. Building the tiny model takes a couple of seconds;
later calls find the folder and return at once.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lora_pipeline.contracts.training import TINY_MODELS
from lora_pipeline.settings import get_settings

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

# Bump when the tiny architecture or weights change, so stale caches are not reused.
TINY_MODEL_VERSION = 1
_DONE_MARKER = ".lora_pipeline_tiny_model"


@dataclass(frozen=True)
class RandomModelSpec:
    """Component configs of a Stable Diffusion pipeline to build with random weights."""

    family: Literal["sd1", "sd2", "sdxl"]
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    text_encoder_2: dict[str, Any] | None = None
    scheduler: dict[str, Any] = field(
        default_factory=lambda: dict(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            clip_sample=False,
            steps_offset=1,
        )
    )
    seed: int = 0
    save_dtype: Literal["float32", "bfloat16", "float16"] = "float32"


TINY_SD1 = RandomModelSpec(
    family="sd1",
    unet=dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
    ),
    vae=dict(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=64,
    ),
    text_encoder=dict(
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        max_position_embeddings=77,
        projection_dim=32,
    ),
)


# SDXL-shaped (two text encoders, text_time conditioning) at the tiny SD1 sizes.
TINY_SDXL = RandomModelSpec(
    family="sdxl",
    unet=dict(
        TINY_SD1.unet,
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
        use_linear_projection=True,
        attention_head_dim=(2, 4),
    ),
    vae=TINY_SD1.vae,
    text_encoder=TINY_SD1.text_encoder,
)


def default_cache_dir() -> Path:
    """The setting ``LORA_PIPELINE_CACHE``, else ``~/.cache/lora_pipeline``."""
    return get_settings().cache_dir


def ensure_tiny_model(dir: Path | None = None) -> Path:  # noqa: A002 - the contract's name
    """Return a folder holding the tiny SD1-family model, building it on first use.

    ``dir`` is the model folder itself; by default
    ``<cache>/tiny-sd1-v<TINY_MODEL_VERSION>``.
    """
    target = Path(dir) if dir is not None else default_cache_dir() / f"tiny-sd1-v{TINY_MODEL_VERSION}"
    return ensure_random_model(TINY_SD1, target)


def ensure_named_tiny_model(name: str, cache: Path | None = None) -> Path:
    """The folder of the tiny model ``name`` (one of ``TINY_MODELS``), built on first use."""
    cache = cache or default_cache_dir()
    if name == "tiny":
        return ensure_tiny_model(cache / f"tiny-sd1-v{TINY_MODEL_VERSION}")
    if name == "tiny-sdxl":
        return ensure_random_model(TINY_SDXL, cache / f"tiny-sdxl-v{TINY_MODEL_VERSION}")
    if name == "tiny-flux1":
        from lora_pipeline.worker.families.flux1 import build_random

        return ensure_built(cache / f"tiny-flux1-v{TINY_MODEL_VERSION}", build_random, "flux1")
    if name == "tiny-sd3":
        from lora_pipeline.worker.families import sd3

        return ensure_built(cache / f"tiny-sd3-v{TINY_MODEL_VERSION}", sd3.build_random, "sd3")
    if name == "tiny-z-image":
        from lora_pipeline.worker.families import z_image

        return ensure_built(cache / f"tiny-z-image-v{TINY_MODEL_VERSION}", z_image.build_random, "z-image")

    if name == "tiny-flux2-klein":
        from lora_pipeline.worker.families import flux2_klein

        return ensure_built(cache / f"tiny-flux2-klein-v{TINY_MODEL_VERSION}", flux2_klein.build_random, "flux2-klein")

    if name == "tiny-qwen-image":
        from lora_pipeline.worker.families import qwen_image

        return ensure_built(cache / f"tiny-qwen-image-v{TINY_MODEL_VERSION}", qwen_image.build_random, "qwen-image")
    raise ValueError(f"no tiny model {name!r}; built in code are {', '.join(TINY_MODELS)}")


def ensure_random_model(spec: RandomModelSpec, target: Path) -> Path:
    """Build ``spec`` into ``target`` unless a finished build is already there."""
    return ensure_built(target, lambda folder: build_random_model(folder, spec), spec.family)


def ensure_built(target: Path, build: Callable[[Path], None], family: str) -> Path:
    """Run ``build(folder)`` into ``target`` unless a finished build is already there.

    The build writes to a temporary sibling and renames it into place, so
    concurrent callers (parallel tests, the local backend's subprocesses) never
    see a half-written model.
    """
    target = Path(target)
    if (target / _DONE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        shutil.rmtree(staging / "_tokenizer_src", ignore_errors=True)
        (staging / _DONE_MARKER).write_text(json.dumps({"version": TINY_MODEL_VERSION, "family": family}))
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first, or a stale unfinished folder is in the way.
            if not (target / _DONE_MARKER).is_file():
                shutil.rmtree(target, ignore_errors=True)
                staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable character map."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def write_tiny_tokenizer_files(folder: Path) -> int:
    """Write a byte-level CLIP vocabulary (no merges) and return its size.

    Every byte is a token, with and without CLIP's end-of-word mark, so any text
    tokenizes; a real merges table is not needed for a model with random weights.
    """
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return len(vocab)


def tiny_tokenizer(folder: Path) -> tuple[CLIPTokenizer, dict[str, int]]:
    """A CLIP tokenizer on the byte-level vocabulary written into ``folder`` (``ensure_built``
    removes ``<model>/_tokenizer_src`` once the model is saved), and the token ids a text
    encoder's config needs."""
    from transformers import CLIPTokenizer

    if not (folder / "vocab.json").is_file():
        write_tiny_tokenizer_files(folder)
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)
    size = len(json.loads((folder / "vocab.json").read_text(encoding="utf-8")))
    return tokenizer, dict(bos_token_id=size - 2, eos_token_id=size - 1, pad_token_id=size - 1, vocab_size=size)


def build_random_model(folder: Path, spec: RandomModelSpec) -> None:
    """Save a whole diffusers pipeline folder for ``spec`` (seeded random weights)."""
    # Long on purpose: the published configs of the tiny UNet, VAE and text encoder, one keyword per line.
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer_dir = folder / "_tokenizer_src"
    _, vocab = tiny_tokenizer(tokenizer_dir)

    def tokenizer() -> CLIPTokenizer:
        return tiny_tokenizer(tokenizer_dir)[0]

    def text_config(kwargs: dict[str, Any]) -> CLIPTextConfig:
        return CLIPTextConfig(**{**vocab, **kwargs})

    torch.manual_seed(spec.seed)
    unet = UNet2DConditionModel(**spec.unet)
    torch.manual_seed(spec.seed)
    vae = AutoencoderKL(**spec.vae)
    torch.manual_seed(spec.seed)
    text_encoder = CLIPTextModel(text_config(spec.text_encoder))
    scheduler = DDPMScheduler(**spec.scheduler)
    dtype = getattr(torch, spec.save_dtype)
    if dtype != torch.float32:
        for module in (unet, vae, text_encoder):
            # diffusers' ModelMixin.to is declared through functools.wraps: mypy sees no such method.
            module.to(dtype)  # type: ignore[union-attr]

    if spec.family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        torch.manual_seed(spec.seed)
        text_encoder_2 = CLIPTextModelWithProjection(text_config(spec.text_encoder_2 or spec.text_encoder)).to(dtype)
        pipeline: Any = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer(),
            tokenizer_2=tokenizer(),
            unet=unet,
            scheduler=scheduler,
        )
    else:
        from diffusers import StableDiffusionPipeline

        pipeline = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer(),
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipeline.save_pretrained(folder, safe_serialization=True)
