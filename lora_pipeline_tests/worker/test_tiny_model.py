"""The tiny base model: a real diffusers folder, built offline, once, deterministically."""

from __future__ import annotations

import hashlib
from pathlib import Path

from lora_pipeline.worker.tiny_model import ensure_tiny_model


def _digest(folder: Path) -> str:
    return hashlib.sha256((folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()


def test_tiny_model_loads_as_a_stable_diffusion_pipeline(tiny_model: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    image = pipe(
        "a red circle",
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert image.shape == (32, 32, 3)


def test_tiny_model_is_built_once_and_then_reused(tiny_model: Path) -> None:
    weights = tiny_model / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    assert ensure_tiny_model(tiny_model) == tiny_model
    assert weights.stat().st_mtime_ns == before


def test_tiny_model_weights_are_the_same_in_every_build(tiny_model: Path, tmp_path: Path) -> None:
    """Seeded: a cache rebuilt on another machine trains to the same LoRA."""
    assert _digest(ensure_tiny_model(tmp_path / "again")) == _digest(tiny_model)


def test_tiny_model_default_location_follows_the_cache_setting(tmp_path: Path, monkeypatch) -> None:
    from lora_pipeline.worker.tiny_model import default_cache_dir

    monkeypatch.setenv("LORA_PIPELINE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
