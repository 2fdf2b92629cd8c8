"""Z-Image on the tiny Z-Image model (built in code): it trains as diffusers' reference script
trains it, its diffusers file loads into ZImagePipeline with the delta it trained, and its
companion file loads whole under ComfyUI's Z-Image (NextDiT) rules, under a header that tells
the truth."""

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
from lora_pipeline.worker.families.z_image import ZImage, nextdit_module
from lora_pipeline.contracts.families import BaseModelRefused, family_from_config
from lora_pipeline.worker.family import denoiser_config, detect_family
from lora_pipeline.worker.kohya import KohyaNameError
from lora_pipeline_tests.worker import comfy_rules
from lora_pipeline_tests.worker.conftest import TrainedFiles, quick_params, sample_images, train_and_write

# Every kind of module ComfyUI names: attention (fused q/k/v), MLP, block and final modulation,
# final projection, the caption and timestep embedders.
TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "w1",
    "w2",
    "w3",
    "layers.0.adaLN_modulation.0",
    "adaLN_modulation.1",
    "linear",
    "cap_embedder.1",
    "t_embedder.mlp.0",
]


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    return [Example(decode_image(data, name), caption, name) for name, data, caption in sample_images()]


@pytest.fixture(scope="module")
def loaded(tiny_z_image_model: Path):
    return family_for("z-image", tiny_z_image_model).load(torch.device("cpu"), torch.float32)


def test_tiny_z_image_is_detected_with_no_variant_the_configs_cannot_tell(tiny_z_image_model: Path) -> None:
    assert detect_family(tiny_z_image_model) == "z-image"
    assert family_for("z-image", tiny_z_image_model).variant() == ""
    assert family_from_config({"_class_name": "ZImageImg2ImgPipeline"}, lambda _: {}, "img2img") == "z-image"
    with pytest.raises(BaseModelRefused, match="ZImageOmniPipeline"):  # SigLIP conditioning
        family_from_config({"_class_name": "ZImageOmniPipeline"}, lambda _: {}, "other")


def test_timesteps_are_the_reference_uniform_draws_of_the_statically_shifted_schedule(loaded) -> None:
    z_image = ZImage(Path("."))
    draws = z_image.draw_timesteps(loaded, 4000, torch.Generator().manual_seed(0), torch.device("cpu"))
    # the script: u = rand (weighting "none"); timesteps = scheduler.timesteps[(u * N).long()]
    u = torch.rand(4000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(draws, loaded.scheduler.timesteps[(u * 1000).long()], rtol=0, atol=0)
    # shift 3 (static): σ(0.5) = 1.5 / 2, so the median t is about 750, not 500
    assert not loaded.scheduler.config.use_dynamic_shifting
    assert 700 < float(draws.median()) < 800


def test_noisy_input_and_target_follow_the_scripts_sigmas(loaded) -> None:
    scheduler = loaded.scheduler
    t = scheduler.timesteps[torch.tensor([0, 300, 999])]
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    noisy, target = ZImage(Path(".")).noisy_and_target(loaded, latents, noise, t)
    # the script's get_sigmas: the scheduler's sigma at each timestep's index
    sigmas = torch.stack([scheduler.sigmas[(scheduler.timesteps == v).nonzero().item()] for v in t]).view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1.0 - sigmas) * latents + sigmas * noise)
    torch.testing.assert_close(target, noise - latents)


def test_captions_are_encoded_as_the_pipeline_encodes_them(tiny_z_image_model: Path, loaded) -> None:
    from diffusers import ZImagePipeline

    captions = ["geoshapes style, a red square", "a"]
    cond = ZImage(tiny_z_image_model).encode_prompts(loaded, captions, torch.device("cpu"))
    assert cond["cap_feats"].shape[:2] == cond["cap_mask"].shape == (2, 512)
    pipe = ZImagePipeline.from_pretrained(tiny_z_image_model)
    with torch.no_grad():
        expected, _ = pipe.encode_prompt(list(captions), device="cpu", do_classifier_free_guidance=False)
    for features, mask, reference in zip(cond["cap_feats"], cond["cap_mask"], expected, strict=True):
        torch.testing.assert_close(features[mask], reference)


def test_the_transformer_is_called_as_the_script_calls_it() -> None:
    calls = []

    def transformer(x, t, cap_feats, return_dict):  # records the call, answers a known flow
        calls.append((x, t, cap_feats))
        return ([torch.full_like(latent, 2.0) for latent in x],)

    noisy = torch.randn(2, 4, 8, 8)
    features = torch.randn(2, 6, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.float32)
    pred = ZImage(Path(".")).predict(
        transformer, noisy, torch.tensor([250.0, 1000.0]), {"cap_feats": features, "cap_mask": mask}
    )
    x, t, captions = calls[0]
    assert [tuple(latent.shape) for latent in x] == [(4, 1, 8, 8)] * 2
    torch.testing.assert_close(x[1][:, 0], noisy[1])
    torch.testing.assert_close(t, torch.tensor([0.75, 0.0]))  # (1000 - t) / 1000
    assert [c.shape[0] for c in captions] == [3, 5]  # the tokens the mask keeps
    torch.testing.assert_close(captions[1], features[1, :5])
    torch.testing.assert_close(pred, torch.full_like(noisy, -2.0))  # negated


def test_latents_are_the_posteriors_mode(tiny_z_image_model: Path, loaded, examples) -> None:
    import numpy as np

    from lora_pipeline.worker.data import bucket_for, resize_and_crop
    from lora_pipeline.worker.train import prepare_cache

    params = quick_params()
    cache = prepare_cache(ZImage(tiny_z_image_model), loaded, examples[:1], params, torch.device("cpu"), torch.float32)
    assert torch.count_nonzero(cache.latent_std[0]) == 0  # a sampled latent is the mean
    crop, _ = resize_and_crop(examples[0].image, bucket_for(examples[0].image.size, 32, True))
    pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        torch.testing.assert_close(cache.latent_mean[0], loaded.vae.encode(pixels).latent_dist.mode()[0])


def test_training_the_text_encoder_is_refused_before_loading(examples) -> None:
    from lora_pipeline.worker.train import train_lora

    with pytest.raises(WorkerInputError, match="train_text_encoder"):
        train_lora(quick_params(train_text_encoder=True), "z-image", Path("/nonexistent"), examples)


@pytest.fixture(scope="module")
def trained(tiny_z_image_model: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedFiles:
    """A Z-Image LoRA with alpha ≠ rank on every kind of module ComfyUI names, in both layouts."""
    return train_and_write(
        tiny_z_image_model, "z-image", "", tmp_path_factory.mktemp("z-image-files"), dataset_hash="ef" * 32,
        rank=4, alpha=2, max_train_steps=3, learning_rate=5e-2, target_modules=TARGETS,
        trigger_word="geoshapes style",
    )  # fmt: skip


def _transformer_output(transformer) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    x = [torch.randn(4, 1, 8, 8, generator=gen)]
    captions = [torch.randn(7, 32, generator=gen)]
    with torch.no_grad():
        return transformer(x, torch.tensor([0.4]), captions, return_dict=False)[0][0]


def test_the_z_image_diffusers_file_loads_into_the_pipeline_with_the_trained_delta(
    tiny_z_image_model: Path, trained
) -> None:
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    outcome, diffusers_file, _ = trained
    pipe = ZImagePipeline.from_pretrained(tiny_z_image_model)
    base = _transformer_output(pipe.transformer)
    scale = outcome.adapter_configs["transformer"]["lora_alpha"] / outcome.adapter_configs["transformer"]["r"]
    reference = ZImageTransformer2DModel.from_pretrained(tiny_z_image_model, subfolder="transformer")
    reference.load_state_dict(comfy_rules.with_lora(reference.state_dict(), outcome.denoiser_lora, scale))
    expected = _transformer_output(reference)
    assert not torch.allclose(base, expected, atol=1e-4)
    pipe.load_lora_weights(str(diffusers_file))
    torch.testing.assert_close(_transformer_output(pipe.transformer), expected, rtol=1e-4, atol=1e-5)


def test_the_z_image_companion_loads_whole_under_comfyuis_nextdit_rules(tiny_z_image_model: Path, trained) -> None:
    from diffusers import ZImageTransformer2DModel

    outcome, _, kohya_file = trained
    config = denoiser_config(tiny_z_image_model)
    mapping = comfy_rules.z_image_to_nextdit(config["n_layers"], config["n_refiner_layers"], config["dim"])
    base = ZImageTransformer2DModel.from_pretrained(tiny_z_image_model, subfolder="transformer").state_dict()
    scale = outcome.adapter_configs["transformer"]["lora_alpha"] / outcome.adapter_configs["transformer"]["r"]
    expected = comfy_rules.to_bfl(comfy_rules.with_lora(base, outcome.denoiser_lora, scale), mapping)
    model = comfy_rules.to_bfl(base, mapping)
    patched, not_loaded = comfy_rules.apply_kohya_lora(load_file(str(kohya_file)), model, {})
    assert not_loaded == []
    changed = [k for k in model if not torch.equal(patched[k], model[k])]
    for key in ("layers.0.attention.qkv.weight", "context_refiner.0.attention.qkv.weight", "x_embedder.weight"):
        assert (key in changed) == (key != "x_embedder.weight")  # untargeted weights stay
    assert "final_layer.adaLN_modulation.1.weight" in changed and "t_embedder.mlp.0.weight" in changed
    for key, value in expected.items():
        torch.testing.assert_close(patched[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_z_image_headers_tell_the_truth(trained) -> None:
    outcome, diffusers_file, kohya_file = trained
    with safe_open(str(kohya_file), framework="pt") as handle:
        meta = handle.metadata()
        keys = set(handle.keys())
        qkv_alpha = float(handle.get_tensor("lora_unet_layers_0_attention_qkv.alpha"))
        out_alpha = float(handle.get_tensor("lora_unet_layers_0_attention_out.alpha"))
    assert meta["modelspec.architecture"] == "Z-Image/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Tongyi-MAI/Z-Image"
    assert "ss_network_module" not in meta and "ss_base_model_version" not in meta  # sd-scripts has no Z-Image
    assert meta["lora_pipeline.family"] == "z-image" and meta["lora_pipeline.base_model"] == "tiny-z-image"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert qkv_alpha == 6.0 and out_alpha == 2.0  # fused q/k/v: rank and alpha × 3, alpha/rank unchanged
    assert meta["modelspec.trigger_phrase"] == "geoshapes style" and meta["ss_steps"] == str(outcome.steps)
    assert meta["lora_pipeline.dataset_hash"] == "ef" * 32 and meta["lora_pipeline.prediction_type"] == "flow"
    assert all(k.startswith("lora_unet_") for k in keys)
    with safe_open(str(diffusers_file), framework="pt") as handle:
        dmeta = handle.metadata()
        assert "transformer.layers.0.attention.to_q.lora_A.weight" in set(handle.keys())
    adapter = json.loads(dmeta["lora_adapter_metadata"])
    assert adapter["transformer.lora_alpha"] == 2 and adapter["transformer.r"] == 4
    assert not any(k.startswith(("ss_", "modelspec.")) for k in dmeta)


def test_the_registry_reads_each_z_image_files_layout_from_its_tensor_names(trained) -> None:
    from lora_pipeline.registry.layouts import layout_of

    _, diffusers_file, kohya_file = trained
    for path, layout in ((diffusers_file, "diffusers"), (kohya_file, "kohya")):
        with safe_open(str(path), framework="pt") as handle:
            assert layout_of(handle.keys()) == layout


def test_modules_comfyui_cannot_name_are_refused() -> None:
    assert nextdit_module("noise_refiner.0.attention.to_k") == ("noise_refiner.0.attention.qkv", "attention.to_k")
    assert nextdit_module("all_final_layer.2-1.adaLN_modulation.1") == ("final_layer.adaLN_modulation.1", None)
    pair = {"down": torch.zeros(2, 32), "up": torch.zeros(32, 2)}
    for module in ("siglip_refiner.0.attention.to_q", "all_x_embedder.4-1"):
        with pytest.raises(KohyaNameError, match="target_modules"):
            ZImage.kohya_tensors({("transformer", module): pair}, 2.0, {"dim": 32})


def test_z_image_sample_images_render_with_the_lora_loaded(tiny_z_image_model: Path, trained) -> None:
    from PIL import Image

    from lora_pipeline.worker.samples import generate_samples

    _, diffusers_file, _ = trained
    params = quick_params(sample_inference_steps=2, seed=5)
    pngs = generate_samples(
        tiny_z_image_model, "z-image", diffusers_file, ["geoshapes style", "a"], params, torch.device("cpu")
    )
    assert len(pngs) == 2
    assert Image.open(io.BytesIO(pngs[0])).size == (32, 32)
