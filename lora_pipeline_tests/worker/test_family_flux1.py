"""FLUX.1 on the tiny FLUX.1-dev model (built in code): it learns, resumes exactly, and its files
load into diffusers' FluxPipeline (the diffusers file, and the kohya file through diffusers' own
sd-scripts converter) with the weight delta it trained, under a header that tells the truth."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lora_pipeline.worker.data import Example, decode_image
from lora_pipeline.worker.families import family_for
from lora_pipeline.worker.families.flow import fuse_lora
from lora_pipeline.worker.families.flux1 import Flux1, bfl_module
from lora_pipeline.worker.family import denoiser_config, detect_family
from lora_pipeline.worker.kohya import KohyaNameError
from lora_pipeline_tests.worker.conftest import TrainedFiles, quick_params, sample_images, train_and_write

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_mlp", "proj_out", "ff.net.2"]


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    return [Example(decode_image(data, name), caption, name) for name, data, caption in sample_images()]


def test_tiny_flux1_is_detected_as_flux1_dev(tiny_flux1_model: Path) -> None:
    assert detect_family(tiny_flux1_model) == "flux1"
    assert family_for("flux1", tiny_flux1_model).variant() == "dev"


def test_a_flux1_model_without_guidance_embedding_is_schnell(tmp_path: Path) -> None:
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"guidance_embeds": False}))
    flux = Flux1(tmp_path)
    assert flux.variant() == "schnell" and flux.max_sequence_length == 256
    version = Flux1.kohya_model_version("schnell", "flow")
    assert version["modelspec.architecture"] == "flux-1-schnell/lora"


def test_timesteps_follow_the_reference_uniform_density_over_the_unshifted_schedule(tiny_flux1_model: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    flux = family_for("flux1", tiny_flux1_model)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_flux1_model, subfolder="scheduler")
    loaded = type("L", (), {"scheduler": scheduler})()
    draws = flux.draw_timesteps(loaded, 4000, torch.Generator().manual_seed(0), torch.device("cpu"))  # type: ignore[arg-type]
    # dynamic shifting: training sees the schedule unshifted, t uniform over 1..1000
    assert 1.0 <= float(draws.min()) and float(draws.max()) <= 1000.0
    assert abs(float(draws.mean()) - 500.5) < 15
    latents, noise = torch.ones(4, 4, 8, 8), torch.zeros(4, 4, 8, 8)
    noisy, target = flux.noisy_and_target(loaded, latents, noise, torch.tensor([0.0, 250.0, 500.0, 1000.0]))  # type: ignore[arg-type]
    assert [float(noisy[i, 0, 0, 0]) for i in range(4)] == [1.0, 0.75, 0.5, 0.0]
    assert torch.equal(target, noise - latents)


@pytest.fixture(scope="module")
def trained(tiny_flux1_model: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedFiles:
    """A FLUX.1 LoRA with alpha ≠ rank, CLIP trained too, written in both layouts."""
    return train_and_write(
        tiny_flux1_model, "flux1", "dev", tmp_path_factory.mktemp("flux1-files"), dataset_hash="ab" * 32,
        rank=4, alpha=2, max_train_steps=3, learning_rate=5e-2, target_modules=TARGETS, train_text_encoder=True,
        trigger_word="geoshapes style",
    )  # fmt: skip


def _transformer_output(pipe, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, 16, 16, generator=gen)
    text = torch.randn(1, 8, 32, generator=gen)
    pooled = torch.randn(1, 32, generator=gen)
    with torch.no_grad():
        return pipe.transformer(
            hidden_states=hidden,
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=torch.tensor([0.5]),
            guidance=torch.tensor([3.5]),
            txt_ids=torch.zeros(8, 3),
            img_ids=pipe._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32),
            return_dict=False,
        )[0]


def _expected_output(tiny_flux1_model: Path, outcome, skip: tuple[str, ...] = ()) -> torch.Tensor:
    """The base transformer with each trained module's delta (alpha/rank · up @ down) added by
    hand, but for the modules named in ``skip``."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux1_model)
    scale = outcome.adapter_configs["transformer"]["lora_alpha"] / outcome.adapter_configs["transformer"]["r"]
    modules = dict(pipe.transformer.named_modules())
    with torch.no_grad():
        for key, down in outcome.denoiser_lora.items():
            if key.endswith(".lora_A.weight"):
                name = key[: -len(".lora_A.weight")]
                if name in skip:
                    continue
                up = outcome.denoiser_lora[name + ".lora_B.weight"]
                modules[name].weight += scale * up @ down
    return _transformer_output(pipe)


def test_the_diffusers_file_loads_into_flux_pipeline_with_the_trained_delta(tiny_flux1_model: Path, trained) -> None:
    from diffusers import FluxPipeline

    outcome, diffusers_file, _ = trained
    expected = _expected_output(tiny_flux1_model, outcome)
    base = _transformer_output(FluxPipeline.from_pretrained(tiny_flux1_model))
    assert not torch.allclose(base, expected, atol=1e-4)  # the LoRA changes the output
    pipe = FluxPipeline.from_pretrained(tiny_flux1_model)
    pipe.load_lora_weights(str(diffusers_file))
    torch.testing.assert_close(_transformer_output(pipe), expected, rtol=1e-4, atol=1e-5)


def test_the_kohya_file_loads_through_diffusers_sd_scripts_converter_with_the_same_delta(
    tiny_flux1_model: Path, trained, tmp_path: Path
) -> None:
    """diffusers reads sd-scripts' FLUX.1 names (its own converter: an independent reading of
    our BFL names, fused q/k/v split back by the block-diagonal up). Its converter sizes a
    single block's ``linear1`` as the real FLUX.1's (3072/12288), and reads ``final_layer``
    without its alpha ("TODO: alphas"), so those two modules, checked by the fusing and naming
    tests below, are left out here."""
    from diffusers import FluxPipeline
    from safetensors.torch import load_file, save_file

    outcome, _, kohya_file = trained
    tensors = {k: v for k, v in load_file(str(kohya_file)).items() if "_linear1." not in k and "final_layer" not in k}
    without_linear1 = tmp_path / "kohya.safetensors"
    save_file(tensors, str(without_linear1))
    linear1 = tuple(f"single_transformer_blocks.0.{m}" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))
    expected = _expected_output(tiny_flux1_model, outcome, skip=(*linear1, "proj_out"))
    pipe = FluxPipeline.from_pretrained(tiny_flux1_model)
    pipe.load_lora_weights(str(without_linear1))
    torch.testing.assert_close(_transformer_output(pipe), expected, rtol=1e-4, atol=1e-5)


def test_flux1_headers_tell_the_truth(trained) -> None:
    outcome, diffusers_file, kohya_file = trained
    with safe_open(str(kohya_file), framework="pt") as handle:
        meta = handle.metadata()
        keys = set(handle.keys())
        qkv_alpha = float(handle.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.alpha"))
        qkv_down = handle.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight")
        linear1_up = handle.get_tensor("lora_unet_single_blocks_0_linear1.lora_up.weight")
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert meta["ss_base_model_version"] == "flux1" and meta["ss_network_module"] == "networks.lora_flux"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["modelspec.trigger_phrase"] == "geoshapes style"
    assert meta["lora_pipeline.family"] == "flux1" and meta["lora_pipeline.variant"] == "dev"
    assert meta["lora_pipeline.dataset_hash"] == "ab" * 32 and meta["ss_steps"] == str(outcome.steps)
    assert "modelspec.prediction_type" not in meta  # sd-scripts writes none for FLUX.1
    # q, k, v fused: rank 3·4, alpha 3·2 (alpha/rank unchanged); linear1 = q, k, v, mlp (4·32 rows)
    assert qkv_down.shape[0] == 12 and qkv_alpha == 6.0
    assert linear1_up.shape == (3 * 32 + 128, 16)
    assert "lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight" in keys  # add_q_proj alone
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    with safe_open(str(diffusers_file), framework="pt") as handle:
        dmeta = handle.metadata()
        dkeys = set(handle.keys())
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in dkeys
    assert not any(k.startswith("ss_") or k.startswith("modelspec.") for k in dmeta)
    adapter = json.loads(dmeta["lora_adapter_metadata"])
    assert adapter["transformer.lora_alpha"] == 2 and adapter["transformer.r"] == 4


def test_fusing_parts_keeps_each_parts_delta_and_zeroes_an_unadapted_one() -> None:
    gen = torch.Generator().manual_seed(0)
    q = {"down": torch.randn(2, 5, generator=gen), "up": torch.randn(3, 2, generator=gen)}
    v = {"down": torch.randn(2, 5, generator=gen), "up": torch.randn(3, 2, generator=gen)}
    down, up, factor = fuse_lora([q, None, v], [3, 3, 3])
    assert factor == 2.0  # rank 4 from two rank-2 parts
    delta = up @ down
    torch.testing.assert_close(delta[0:3], q["up"] @ q["down"])
    assert torch.count_nonzero(delta[3:6]) == 0
    torch.testing.assert_close(delta[6:9], v["up"] @ v["down"])


def test_flux1_modules_map_to_bfl_names_and_unmappable_ones_are_refused() -> None:
    assert bfl_module("transformer_blocks.3.attn.add_k_proj") == ("double_blocks.3.txt_attn.qkv", "attn.add_k_proj")
    assert bfl_module("single_transformer_blocks.7.proj_mlp") == ("single_blocks.7.linear1", "proj_mlp")
    assert bfl_module("single_transformer_blocks.7.proj_out") == ("single_blocks.7.linear2", None)
    assert bfl_module("time_text_embed.guidance_embedder.linear_1") == ("guidance_in.in_layer", None)
    with pytest.raises(KohyaNameError, match="norm_out.linear"):
        bfl_module("norm_out.linear")  # BFL swaps its shift and scale: no exact kohya name


def test_the_registry_reads_each_flux1_files_layout_from_its_tensor_names(trained) -> None:
    from lora_pipeline.registry.layouts import layout_of

    _, diffusers_file, kohya_file = trained
    for path, layout in ((diffusers_file, "diffusers"), (kohya_file, "kohya")):
        with safe_open(str(path), framework="pt") as handle:
            assert layout_of(handle.keys()) == layout


def test_the_kohya_file_loads_whole_under_comfyuis_flux_rules_with_the_trained_delta(
    tiny_flux1_model: Path, trained
) -> None:
    """ComfyUI (comfy_rules: its flux_to_diffusers and LoRA key map) loads every key of the kohya
    file onto the weight it was trained for, fused layers included, at its alpha."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    from lora_pipeline_tests.worker import comfy_rules

    outcome, _, kohya_file = trained
    config = denoiser_config(tiny_flux1_model)
    mapping = comfy_rules.flux_to_bfl(
        config["num_layers"], config["num_single_layers"], config["num_attention_heads"] * config["attention_head_dim"]
    )
    base = FluxTransformer2DModel.from_pretrained(tiny_flux1_model, subfolder="transformer").state_dict()
    scale = outcome.adapter_configs["transformer"]["lora_alpha"] / outcome.adapter_configs["transformer"]["r"]
    trained_weights = comfy_rules.with_lora(base, outcome.denoiser_lora, scale)
    base_bfl, expected_bfl = comfy_rules.to_bfl(base, mapping), comfy_rules.to_bfl(trained_weights, mapping)
    patched, not_loaded = comfy_rules.apply_kohya_lora(load_file(str(kohya_file)), base_bfl, {"clip_l": 5})
    assert not_loaded == []
    assert not torch.equal(patched["single_blocks.0.linear1.weight"], base_bfl["single_blocks.0.linear1.weight"])
    for key, value in expected_bfl.items():
        torch.testing.assert_close(patched[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_flux1_sample_images_render_with_the_lora_loaded(tiny_flux1_model: Path, trained) -> None:
    from PIL import Image

    from lora_pipeline.worker.samples import generate_samples

    _, diffusers_file, _ = trained
    params = quick_params(sample_inference_steps=2, seed=5)
    pngs = generate_samples(
        tiny_flux1_model, "flux1", diffusers_file, ["geoshapes style", "a"], params, torch.device("cpu")
    )
    assert len(pngs) == 2
    assert Image.open(io.BytesIO(pngs[0])).size == (32, 32)
