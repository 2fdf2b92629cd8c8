"""SD3/3.5 on the tiny SD3 model (built in code): it learns, resumes exactly, its diffusers file
loads into StableDiffusion3Pipeline with the delta it trained, and its kohya file loads whole
under ComfyUI's MMDiT rules, under a header that tells the truth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_pipeline.worker.data import Example, decode_image
from lora_pipeline.worker.families import family_for
from lora_pipeline.worker.families.sd3 import StableDiffusion3, mmdit_module
from lora_pipeline.worker.family import denoiser_config, detect_family
from lora_pipeline.worker.kohya import KohyaNameError
from lora_pipeline_tests.worker import comfy_rules
from lora_pipeline_tests.worker.conftest import TrainedFiles, sample_images, train_and_write

TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.2",
    "proj_out",
]


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    return [Example(decode_image(data, name), caption, name) for name, data, caption in sample_images()]


def test_tiny_sd3_is_detected_and_its_variant_read_from_the_transformer(tiny_sd3_model: Path, tmp_path: Path) -> None:
    assert detect_family(tiny_sd3_model) == "sd3"
    assert family_for("sd3", tiny_sd3_model).variant() == "3-medium"
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"num_layers": 38}))
    assert StableDiffusion3(tmp_path).variant() == "3.5-large"
    version = StableDiffusion3.kohya_model_version("3.5-large", "flow")
    assert version["modelspec.architecture"] == "stable-diffusion-3-5-large/lora"
    assert version["ss_base_model_version"] == "5-large"
    medium = StableDiffusion3.kohya_model_version("3.5-medium", "flow")
    assert medium["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"


def test_sd3_draws_logit_normal_timesteps_of_the_shifted_schedule_and_preconditions(tiny_sd3_model: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    sd3 = family_for("sd3", tiny_sd3_model)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_sd3_model, subfolder="scheduler")
    loaded = type("L", (), {"scheduler": scheduler})()
    draws = sd3.draw_timesteps(loaded, 4000, torch.Generator().manual_seed(0), torch.device("cpu"))  # type: ignore[arg-type]
    # logit-normal u is centred on 0.5; shift 3 moves σ(0.5) to 0.75: the median t is about 750
    assert 700 < float(draws.median()) < 800
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([250.0, 900.0])
    noisy, target = sd3.noisy_and_target(loaded, latents, noise, t)  # type: ignore[arg-type]
    assert torch.equal(target, latents)

    def perfect(**kwargs):  # a transformer that predicts the flow exactly
        return (noise - latents,)

    cond = {"encoder_hidden_states": torch.zeros(2, 3, 64), "pooled_projections": torch.zeros(2, 64)}
    torch.testing.assert_close(sd3.predict(perfect, noisy, t, cond), latents)


@pytest.fixture(scope="module")
def trained(tiny_sd3_model: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedFiles:
    """An SD3 LoRA with alpha ≠ rank, both CLIPs trained too, written in both layouts."""
    return train_and_write(
        tiny_sd3_model, "sd3", "3-medium", tmp_path_factory.mktemp("sd3-files"), dataset_hash="cd" * 32,
        rank=4, alpha=2, max_train_steps=3, learning_rate=5e-2, target_modules=TARGETS, train_text_encoder=True,
        trigger_word="geoshapes style",
    )  # fmt: skip


def _transformer_output(transformer) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, 4, 8, 8, generator=gen),
            encoder_hidden_states=torch.randn(1, 6, 64, generator=gen),
            pooled_projections=torch.randn(1, 64, generator=gen),
            timestep=torch.tensor([500.0]),
            return_dict=False,
        )[0]


def test_the_sd3_diffusers_file_loads_into_the_pipeline_with_the_trained_delta(tiny_sd3_model: Path, trained) -> None:
    from diffusers import StableDiffusion3Pipeline

    outcome, diffusers_file, _ = trained
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_model)
    base = _transformer_output(pipe.transformer)
    scale = outcome.adapter_configs["transformer"]["lora_alpha"] / outcome.adapter_configs["transformer"]["r"]
    expected_weights = comfy_rules.with_lora(pipe.transformer.state_dict(), outcome.denoiser_lora, scale)
    reference = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_model).transformer
    reference.load_state_dict(expected_weights)
    expected = _transformer_output(reference)
    assert not torch.allclose(base, expected, atol=1e-4)
    pipe.load_lora_weights(str(diffusers_file))
    torch.testing.assert_close(_transformer_output(pipe.transformer), expected, rtol=1e-4, atol=1e-5)


def test_the_sd3_kohya_file_loads_whole_under_comfyuis_mmdit_rules(tiny_sd3_model: Path, trained) -> None:
    from diffusers import SD3Transformer2DModel

    outcome, _, kohya_file = trained
    mapping = comfy_rules.mmdit_to_mmdit(denoiser_config(tiny_sd3_model)["num_layers"])
    base = SD3Transformer2DModel.from_pretrained(tiny_sd3_model, subfolder="transformer").state_dict()
    scale = outcome.adapter_configs["transformer"]["lora_alpha"] / outcome.adapter_configs["transformer"]["r"]
    expected = comfy_rules.to_bfl(comfy_rules.with_lora(base, outcome.denoiser_lora, scale), mapping)
    model = comfy_rules.to_bfl(base, mapping)
    patched, not_loaded = comfy_rules.apply_kohya_lora(load_file(str(kohya_file)), model, {"clip_l": 5, "clip_g": 5})
    assert not_loaded == []  # the CLIP-L and CLIP-G modules included (lora_te1_, lora_te2_)
    assert not torch.equal(
        patched["joint_blocks.0.x_block.attn.qkv.weight"], model["joint_blocks.0.x_block.attn.qkv.weight"]
    )
    for key, value in expected.items():
        torch.testing.assert_close(patched[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_sd3_headers_tell_the_truth(trained) -> None:
    outcome, _, kohya_file = trained
    with safe_open(str(kohya_file), framework="pt") as handle:
        meta = handle.metadata()
        qkv_alpha = float(handle.get_tensor("lora_unet_joint_blocks_0_x_block_attn_qkv.alpha"))
    assert meta["modelspec.architecture"] == "stable-diffusion-3-medium/lora"
    assert meta["ss_network_module"] == "networks.lora_sd3" and meta["ss_base_model_version"] == "medium"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["lora_pipeline.family"] == "sd3" and meta["lora_pipeline.variant"] == "3-medium"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0" and qkv_alpha == 6.0
    assert meta["modelspec.trigger_phrase"] == "geoshapes style" and meta["ss_steps"] == str(outcome.steps)


def test_sd3_modules_map_to_mmdit_names_and_the_swapped_last_modulation_is_refused() -> None:
    assert mmdit_module("transformer_blocks.1.attn.add_v_proj", 1) == (
        "joint_blocks.1.context_block.attn.qkv",
        "attn.add_v_proj",
    )
    assert mmdit_module("transformer_blocks.0.ff_context.net.2", 1) == ("joint_blocks.0.context_block.mlp.fc2", None)
    assert (
        mmdit_module("transformer_blocks.0.norm1_context.linear", 1)[0]
        == "joint_blocks.0.context_block.adaLN_modulation.1"
    )
    with pytest.raises(KohyaNameError, match="norm1_context"):
        mmdit_module("transformer_blocks.1.norm1_context.linear", 1)
