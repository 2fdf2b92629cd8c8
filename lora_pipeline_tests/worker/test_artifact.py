"""The LoRA file: loads with diffusers, changes the output, carries its facts, exports kohya keys."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lora_pipeline.worker.artifact import ArtifactFacts, lora_metadata, write_kohya_file, write_lora_file
from lora_pipeline.worker.data import Example, decode_image
from lora_pipeline.worker.train import TrainOutcome, train_lora
from lora_pipeline_tests.worker.conftest import quick_params, sample_images

# alpha ≠ rank on purpose: the scale alpha/rank must survive both file layouts.
PARAMS = quick_params(train_text_encoder=True, max_train_steps=4, learning_rate=5e-2, alpha=8,
                      trigger_word="geoshapes style")


@pytest.fixture(scope="module")
def outcome(tiny_model: Path) -> TrainOutcome:
    examples = [Example(decode_image(d, n), c, n) for n, d, c in sample_images()]
    return train_lora(PARAMS, "sd1", tiny_model, examples)


def _facts(outcome: TrainOutcome) -> ArtifactFacts:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    return ArtifactFacts(
        style="geo", version="V3", job_id="job-123-e1", request_id="req-9", dataset_hash="ab" * 32,
        base_model="tiny", family="sd1", params=PARAMS, steps=outcome.steps, num_train_images=8,
        tag_frequency={"geoshapes style": 8}, training_seconds=12.5, started_at=now, finished_at=now,
        final_loss=outcome.final_loss,
    )


@pytest.fixture(scope="module")
def lora_file(outcome: TrainOutcome, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("artifact") / "geo_v3.safetensors"
    return write_lora_file(path, "sd1", outcome.unet_lora, lora_metadata(_facts(outcome)),
                           text_encoder_lora=outcome.text_encoder_lora, adapter_configs=outcome.adapter_configs)


def _render(pipe) -> torch.Tensor:
    out = pipe("geoshapes style, a red circle", num_inference_steps=2, height=32, width=32,
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    return out


def test_lora_file_loads_into_the_pipeline_and_changes_its_output(tiny_model: Path, lora_file: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    before = _render(pipe)
    pipe.load_lora_weights(str(lora_file))
    after = _render(pipe)
    assert (after - before).abs().max() > 1e-3


def test_every_tensor_is_a_lora_layer_of_the_unet_or_text_encoder(lora_file: Path) -> None:
    with safe_open(str(lora_file), framework="pt") as handle:
        keys = list(handle.keys())
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)
    # diffusers writes peft (lora_A/B) or its own (lora.down/up, lora_linear_layer) suffixes.
    lora_suffix = re.compile(r"\.(lora_[AB]|lora\.(up|down)|lora_linear_layer\.(up|down))\.weight$")
    assert all(lora_suffix.search(k) for k in keys), [k for k in keys if not lora_suffix.search(k)][:3]


def test_header_records_the_training_facts_as_strings(lora_file: Path) -> None:
    with safe_open(str(lora_file), framework="pt") as handle:
        meta = handle.metadata()
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["lora_pipeline.dataset_hash"] == "ab" * 32
    assert meta["lora_pipeline.job_id"] == "job-123-e1"
    assert meta["lora_pipeline.family"] == "sd1"
    assert meta["lora_pipeline.rank"] == meta["ss_network_dim"] == "4"
    assert meta["lora_pipeline.alpha"] == meta["ss_network_alpha"] == "8"
    assert meta["lora_pipeline.steps"] == meta["ss_steps"] == "4"
    assert meta["lora_pipeline.trigger_word"] == meta["modelspec.trigger_phrase"] == "geoshapes style"
    assert meta["lora_pipeline.training_time"] == "12.5"
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_num_train_images"] == "8"
    assert json.loads(meta["ss_tag_frequency"]) == {"geo": {"geoshapes style": 8}}
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_kohya_export_uses_the_a1111_comfyui_key_names(lora_file: Path, tmp_path: Path) -> None:
    kohya = write_kohya_file(lora_file, tmp_path / "geo_v3_kohya.safetensors", alpha=8, family="sd1")
    with safe_open(str(kohya), framework="pt") as handle:
        keys = list(handle.keys())
        alpha = handle.get_tensor(next(k for k in keys if k.endswith(".alpha")))
        meta = handle.metadata()
    pattern = re.compile(r"^lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
    assert keys and all(pattern.match(k) for k in keys), [k for k in keys if not pattern.match(k)][:3]
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    assert float(alpha) == 8.0
    assert meta["ss_network_dim"] == "4"


def test_kohya_file_and_diffusers_file_give_the_same_image(tiny_model: Path, lora_file: Path, tmp_path: Path) -> None:
    """Same layers, same alpha/rank scale, whichever layout a tool reads."""
    from diffusers import StableDiffusionPipeline

    kohya = write_kohya_file(lora_file, tmp_path / "k.safetensors", alpha=8, family="sd1")
    images = []
    for path in (lora_file, kohya):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(str(path))
        images.append(_render(pipe))
    torch.testing.assert_close(images[0], images[1], atol=1e-5, rtol=0)


def test_sdxl_lora_with_both_text_encoders_loads_and_changes_the_output(tiny_sdxl_model: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    from lora_pipeline.worker.family import detect_family

    assert detect_family(tiny_sdxl_model) == "sdxl"
    examples = [Example(decode_image(d, n), c, n) for n, d, c in sample_images()[:4]]
    params = quick_params(train_text_encoder=True, max_train_steps=2, learning_rate=5e-2, resolution=64)
    outcome = train_lora(params, "sdxl", tiny_sdxl_model, examples)
    path = write_lora_file(tmp_path / "xl.safetensors", "sdxl", outcome.unet_lora, {},
                           text_encoder_lora=outcome.text_encoder_lora,
                           text_encoder_2_lora=outcome.text_encoder_2_lora,
                           adapter_configs=outcome.adapter_configs)
    kohya = write_kohya_file(path, tmp_path / "xl_kohya.safetensors", alpha=4, family="sdxl")
    with safe_open(str(kohya), framework="pt") as handle:
        assert {key.split("_")[1] for key in handle.keys()} == {"unet", "te1", "te2"}

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model)
    pipe.set_progress_bar_config(disable=True)
    before = _render(pipe)
    pipe.load_lora_weights(str(path))
    assert (_render(pipe) - before).abs().max() > 1e-3
