"""FLUX.2 klein on the tiny FLUX.2-klein-4B-base model (built in code): trained as diffusers'
train_dreambooth_lora_flux2_klein.py trains it, its diffusers file loads into Flux2KleinPipeline
with the delta it trained, and its ComfyUI file loads whole under ComfyUI's FLUX.2 rules, under a
header that tells the truth; targets ComfyUI would drop are refused."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_pipeline.worker.data import Example, decode_image
from lora_pipeline.worker.errors import WorkerInputError
from lora_pipeline.worker.families import family_for
from lora_pipeline.worker.families.flux2_klein import Flux2Klein, bfl_module
from lora_pipeline.worker.family import denoiser_config, detect_family
from lora_pipeline.worker.kohya import KohyaNameError
from lora_pipeline_tests.worker import comfy_rules
from lora_pipeline_tests.worker.conftest import TrainedFiles, quick_params, sample_images, train_and_write

# Every kind of module ComfyUI names: fused double-block q/k/v (img and txt), the double blocks'
# outputs and feed-forwards, the single blocks' fused linear1 and linear2, the final projection.
TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_v_proj",
    "ff.linear_in",
    "ff_context.linear_out",
    "to_qkv_mlp_proj",
    "single_transformer_blocks.0.attn.to_out",
    "proj_out",
]


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    return [Example(decode_image(data, name), caption, name) for name, data, caption in sample_images()]


@pytest.fixture(scope="module")
def family(tiny_flux2_klein_model: Path) -> Flux2Klein:
    return family_for("flux2-klein", tiny_flux2_klein_model)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def loaded(family: Flux2Klein):
    return family.load(torch.device("cpu"), torch.float32)


def test_tiny_flux2_klein_is_detected_and_its_variant_read_from_the_configs(
    tiny_flux2_klein_model: Path, tmp_path: Path
) -> None:
    assert detect_family(tiny_flux2_klein_model) == "flux2-klein"
    assert family_for("flux2-klein", tiny_flux2_klein_model).variant() == "4b-base"
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"joint_attention_dim": 12288}))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline", "is_distilled": True}))
    nine = Flux2Klein(tmp_path)
    assert nine.variant() == "9b-distilled" and not nine.guidance
    assert nine.sample_kwargs()["guidance_scale"] == 1.0  # a distilled model samples without CFG
    assert Flux2Klein.kohya_model_version("9b-distilled", "flow")["modelspec.architecture"] == "Flux.2-klein-9b/lora"


def test_captions_are_encoded_as_the_klein_pipeline_encodes_prompts(family: Flux2Klein, loaded) -> None:
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline(
        scheduler=loaded.scheduler, vae=None, text_encoder=loaded.frozen_encoders[0],
        tokenizer=loaded.tokenizers[0], transformer=None,
    )  # fmt: skip
    ours = family.encode_prompts(loaded, ["geoshapes style, a blue square"], torch.device("cpu"))
    theirs, _ = pipe.encode_prompt("geoshapes style, a blue square", device=torch.device("cpu"))  # (9, 18, 27), 512
    assert ours["encoder_hidden_states"].shape == (1, 512, 3 * 16)
    torch.testing.assert_close(ours["encoder_hidden_states"], theirs)


def test_timesteps_are_uniform_and_latents_are_patchified_and_batch_normalised(family: Flux2Klein, loaded) -> None:
    draws = family.draw_timesteps(loaded, 4000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert 1.0 <= float(draws.min()) and float(draws.max()) <= 1000.0  # dynamic shifting: unshifted in training
    assert abs(float(draws.mean()) - 500.5) < 15
    assert family.latent_transform(loaded) == (1.0, 0.0)  # no scaling/shift factor: batch norm instead
    gen = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([250.0, 900.0])
    noisy, target = family.noisy_and_target(loaded, latents, noise, t)

    def patchify(x: torch.Tensor) -> torch.Tensor:  # the script's _patchify_latents, written out
        return x.view(2, 4, 4, 2, 4, 2).permute(0, 1, 3, 5, 2, 4).reshape(2, 16, 4, 4)

    bn = loaded.vae.bn
    model_input = (patchify(latents) - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
        bn.running_var.view(1, -1, 1, 1) + 1e-4
    )
    sigmas = (t / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - sigmas) * model_input + sigmas * patchify(noise))
    torch.testing.assert_close(target, patchify(noise) - model_input)


def test_predict_packs_tokens_and_unpacks_them_by_their_position_ids(family: Flux2Klein) -> None:
    noisy = torch.randn(2, 16, 4, 6)
    seen = {}

    def transformer(**kwargs):  # hands its tokens back, as a transformer predicting its input would
        seen.update(kwargs)
        return (kwargs["hidden_states"],)

    out = family.predict(
        transformer, noisy, torch.tensor([500.0, 20.0]), {"encoder_hidden_states": torch.zeros(2, 7, 48)}
    )
    torch.testing.assert_close(out, noisy)
    assert seen["hidden_states"].shape == (2, 24, 16) and seen["guidance"] is None
    torch.testing.assert_close(seen["timestep"], torch.tensor([0.5, 0.02]))
    assert seen["txt_ids"].shape == (2, 7, 4) and seen["img_ids"].shape == (2, 24, 4)


def test_latents_are_the_vae_mode_not_a_sample(family: Flux2Klein, loaded, examples: list[Example]) -> None:
    from lora_pipeline.worker.train import prepare_cache

    prepared = prepare_cache(family, loaded, examples[:1], quick_params(), torch.device("cpu"), torch.float32)
    assert torch.count_nonzero(prepared.latent_std[0]) == 0 and torch.count_nonzero(prepared.latent_mean[0]) > 0


def test_training_the_text_encoder_is_refused(tiny_flux2_klein_model: Path, examples: list[Example]) -> None:
    from lora_pipeline.worker.train import train_lora

    with pytest.raises(WorkerInputError, match="train_text_encoder"):
        train_lora(quick_params(train_text_encoder=True), "flux2-klein", tiny_flux2_klein_model, examples[:2])


@pytest.fixture(scope="module")
def trained(tiny_flux2_klein_model: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedFiles:
    """A FLUX.2 klein LoRA with alpha ≠ rank on every kind of nameable module, in both layouts."""
    return train_and_write(
        tiny_flux2_klein_model, "flux2-klein", "4b-base", tmp_path_factory.mktemp("flux2-files"),
        dataset_hash="ef" * 32, rank=4, alpha=2, max_train_steps=3, learning_rate=5e-2, target_modules=TARGETS,
        trigger_word="geoshapes style",
    )  # fmt: skip


def _transformer_output(transformer) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, 16, 16, generator=gen),
            encoder_hidden_states=torch.randn(1, 6, 48, generator=gen),
            timestep=torch.tensor([0.5]),
            txt_ids=torch.cartesian_prod(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.arange(6.0))[None],
            img_ids=torch.cartesian_prod(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), torch.zeros(1))[None],
            return_dict=False,
        )[0]


def test_the_flux2_diffusers_file_loads_into_the_pipeline_with_the_trained_delta(
    tiny_flux2_klein_model: Path, trained
) -> None:
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    outcome, diffusers_file, _ = trained
    pipe = Flux2KleinPipeline.from_pretrained(tiny_flux2_klein_model)
    base = _transformer_output(pipe.transformer)
    scale = outcome.adapter_configs["transformer"]["lora_alpha"] / outcome.adapter_configs["transformer"]["r"]
    reference = Flux2Transformer2DModel.from_pretrained(tiny_flux2_klein_model, subfolder="transformer")
    reference.load_state_dict(comfy_rules.with_lora(reference.state_dict(), outcome.denoiser_lora, scale))
    expected = _transformer_output(reference)
    assert not torch.allclose(base, expected, atol=1e-4)
    pipe.load_lora_weights(str(diffusers_file))
    torch.testing.assert_close(_transformer_output(pipe.transformer), expected, rtol=1e-4, atol=1e-5)


def test_the_flux2_comfyui_file_loads_whole_under_comfyuis_rules_with_the_trained_delta(
    tiny_flux2_klein_model: Path, trained
) -> None:
    from diffusers import Flux2Transformer2DModel

    outcome, _, kohya_file = trained
    config = denoiser_config(tiny_flux2_klein_model)
    mapping = comfy_rules.flux2_to_bfl(
        config["num_layers"], config["num_single_layers"], config["num_attention_heads"] * config["attention_head_dim"]
    )
    base = Flux2Transformer2DModel.from_pretrained(tiny_flux2_klein_model, subfolder="transformer").state_dict()
    scale = outcome.adapter_configs["transformer"]["lora_alpha"] / outcome.adapter_configs["transformer"]["r"]
    expected = comfy_rules.to_bfl(comfy_rules.with_lora(base, outcome.denoiser_lora, scale), mapping)
    model = comfy_rules.to_bfl(base, mapping)
    patched, not_loaded = comfy_rules.apply_kohya_lora(load_file(str(kohya_file)), model, {})
    assert not_loaded == []
    for key in ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "final_layer.linear.weight"):
        assert not torch.equal(patched[key], model[key]), key
    for key, value in expected.items():
        torch.testing.assert_close(patched[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_flux2_headers_tell_the_truth(trained) -> None:
    from lora_pipeline.registry.layouts import layout_of

    outcome, diffusers_file, kohya_file = trained
    with safe_open(str(kohya_file), framework="pt") as handle:
        meta = handle.metadata()
        qkv_alpha = float(handle.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.alpha"))
        linear2_alpha = float(handle.get_tensor("lora_unet_single_blocks_0_linear2.alpha"))
    assert meta["modelspec.architecture"] == "Flux.2-klein-4b/lora"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux2"
    assert "ss_network_module" not in meta  # sd-scripts has no FLUX.2 network to load it with
    assert meta["lora_pipeline.family"] == "flux2-klein" and meta["lora_pipeline.variant"] == "4b-base"
    assert meta["lora_pipeline.base_model"] == "tiny-flux2-klein"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert qkv_alpha == 6.0 and linear2_alpha == 2.0  # fused q/k/v: alpha × 3 with the rank
    assert meta["modelspec.trigger_phrase"] == "geoshapes style" and meta["ss_steps"] == str(outcome.steps)
    assert meta["lora_pipeline.dataset_hash"] == "ef" * 32
    with safe_open(str(diffusers_file), framework="pt") as handle:
        adapter = json.loads(handle.metadata()["lora_adapter_metadata"])
        diffusers_keys = list(handle.keys())
    assert adapter["transformer.lora_alpha"] == 2 and adapter["transformer.r"] == 4
    with safe_open(str(kohya_file), framework="pt") as handle:
        kohya_keys = list(handle.keys())
    assert (layout_of(kohya_keys), layout_of(diffusers_keys)) == ("kohya", "diffusers")  # as the registry reads them


def test_flux2_sample_images_render_with_the_lora_loaded(tiny_flux2_klein_model: Path, trained) -> None:
    from PIL import Image

    from lora_pipeline.worker.samples import generate_samples

    _, diffusers_file, _ = trained
    params = quick_params(sample_inference_steps=2, seed=5)
    pngs = generate_samples(
        tiny_flux2_klein_model, "flux2-klein", diffusers_file, ["geoshapes style", "a"], params, torch.device("cpu")
    )
    assert len(pngs) == 2 and Image.open(io.BytesIO(pngs[0])).size == (32, 32)


def test_flux2_modules_map_to_comfyui_names_and_modulation_targets_are_refused() -> None:
    assert bfl_module("transformer_blocks.2.attn.add_k_proj") == ("double_blocks.2.txt_attn.qkv", "attn.add_k_proj")
    assert bfl_module("transformer_blocks.0.ff_context.linear_in") == ("double_blocks.0.txt_mlp.0", None)
    assert bfl_module("single_transformer_blocks.5.attn.to_qkv_mlp_proj") == ("single_blocks.5.linear1", None)
    # the oracle agrees that ComfyUI has no diffusers name for these
    oracle = comfy_rules.flux2_to_bfl(1, 1, 32)
    for module in (
        "double_stream_modulation_img.linear",
        "single_stream_modulation.linear",
        "time_guidance_embed.timestep_embedder.linear_1",
        "norm_out.linear",
    ):
        assert f"{module}.weight" not in oracle
        with pytest.raises(KohyaNameError, match="leave them out of target_modules"):
            bfl_module(module)
    pair = {"down": torch.zeros(4, 32), "up": torch.zeros(192, 4)}
    with pytest.raises(KohyaNameError, match="double_stream_modulation_txt"):
        Flux2Klein.kohya_tensors(
            {("transformer", "double_stream_modulation_txt.linear"): pair},
            4.0,
            {"num_attention_heads": 2, "attention_head_dim": 16},
        )
