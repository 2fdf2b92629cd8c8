"""Qwen-Image on the tiny Qwen-Image model (built in code): its captions, timesteps, latents and
target are the reference script's, its diffusers file loads into QwenImagePipeline with the delta
it trained, and its ComfyUI file loads whole under ComfyUI's QwenImage rules, under a header that
tells the truth."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_pipeline.worker.errors import WorkerInputError
from lora_pipeline.worker.families import family_for
from lora_pipeline.worker.families.qwen_image import QwenImage, batch_text, comfy_lora_name
from lora_pipeline.contracts.families import BaseModelRefused, family_from_config
from lora_pipeline.worker.family import denoiser_config, detect_family
from lora_pipeline.worker.kohya import KohyaNameError
from lora_pipeline_tests.worker import comfy_rules
from lora_pipeline_tests.worker.conftest import TrainedFiles, quick_params, sample_images, train_and_write

TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_k_proj",
    "to_add_out",
    "img_mlp.net.0.proj",
    "txt_mod.1",
    "proj_out",
]


@pytest.fixture(scope="module")
def loaded(tiny_qwen_image_model: Path):
    family = family_for("qwen-image", tiny_qwen_image_model)
    return family, family.load(torch.device("cpu"), torch.float32)


def test_tiny_qwen_image_is_detected_and_has_no_variant(tiny_qwen_image_model: Path) -> None:
    assert detect_family(tiny_qwen_image_model) == "qwen-image"
    assert family_for("qwen-image", tiny_qwen_image_model).variant() == ""
    assert family_from_config({"_class_name": "QwenImageImg2ImgPipeline"}, lambda _: {}, "img2img") == "qwen-image"
    with pytest.raises(BaseModelRefused, match="QwenImageEditPipeline"):
        family_from_config({"_class_name": "QwenImageEditPipeline"}, lambda _: {}, "other")


def test_captions_are_the_last_hidden_layer_of_the_chat_template_without_its_first_34_tokens(loaded) -> None:
    family, models = loaded
    encoder, tokenizer = models.frozen_encoders[0], models.tokenizers[0]
    template = family._encoding.prompt_template_encode
    cond = family.encode_prompts(models, ["geo", "geoshapes style, a red square"], torch.device("cpu"))
    assert cond["encoder_hidden_states"].shape[1] == 512 and cond["encoder_hidden_states_mask"].shape[1] == 512
    for row, caption in enumerate(["geo", "geoshapes style, a red square"]):
        ids = tokenizer(template.format(caption), return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = encoder(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, 34:]
        n = hidden.shape[0]
        assert int(cond["encoder_hidden_states_mask"][row].sum()) == n
        torch.testing.assert_close(cond["encoder_hidden_states"][row, :n], hidden, rtol=1e-5, atol=1e-5)
        assert torch.count_nonzero(cond["encoder_hidden_states"][row, n:]) == 0
    # a batch is cut to its longest caption, the mask kept only where some token is padding
    text, mask = batch_text(cond["encoder_hidden_states"], cond["encoder_hidden_states_mask"].float())
    longest = int(cond["encoder_hidden_states_mask"].sum(1).max())
    assert text.shape[1] == longest and mask is not None and not bool(mask[0].all())
    text, mask = batch_text(cond["encoder_hidden_states"][1:], cond["encoder_hidden_states_mask"][1:])
    assert mask is None and text.shape[1] == longest


def test_latents_are_one_frame_vae_samples_normalised_per_channel(loaded) -> None:
    _, models = loaded
    assert models.vae.vae.config.latents_mean != [0.0] * 4  # the tiny VAE keeps real statistics
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours = models.vae.encode(pixels).latent_dist
    with torch.no_grad():
        dist = models.vae.vae.encode(pixels.unsqueeze(2)).latent_dist  # the script's 5-D pixel values
        sample = dist.sample(generator=torch.Generator().manual_seed(1))
    config = models.vae.vae.config
    mean = torch.tensor(config.latents_mean).view(1, 4, 1, 1, 1)
    reference = (sample - mean) * (1.0 / torch.tensor(config.latents_std).view(1, 4, 1, 1, 1))
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours.mean + ours.std * eps[:, :, 0], reference[:, :, 0], rtol=1e-5, atol=1e-5)
    assert models.vae.encode(pixels).latent_dist.mean.shape == (1, 4, 16, 16)


def test_timesteps_are_uniform_over_the_unshifted_dynamic_schedule_and_the_target_is_the_flow(loaded) -> None:
    family, models = loaded
    assert models.scheduler.config.shift == 3.0 and models.scheduler.config.use_dynamic_shifting
    draws = family.draw_timesteps(models, 4000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert 1.0 <= float(draws.min()) and float(draws.max()) <= 1000.0
    assert abs(float(draws.mean()) - 500.5) < 15  # a static shift of 3 would put it near 690
    latents, noise = torch.ones(4, 4, 8, 8), torch.zeros(4, 4, 8, 8)
    noisy, target = family.noisy_and_target(models, latents, noise, torch.tensor([0.0, 250.0, 500.0, 1000.0]))
    assert [float(noisy[i, 0, 0, 0]) for i in range(4)] == [1.0, 0.75, 0.5, 0.0]
    assert torch.equal(target, noise - latents)


def test_predict_packs_2x2_with_image_shapes_and_the_timestep_over_1000(loaded) -> None:
    family, _ = loaded
    noisy = torch.randn(2, 4, 6, 8)
    seen = {}

    def echo(**kwargs):  # a transformer that returns its packed input
        seen.update(kwargs)
        return (kwargs["hidden_states"],)

    text = torch.randn(2, 512, 32)
    mask = torch.zeros(2, 512)
    mask[0, :5], mask[1, :3] = 1, 1
    out = family.predict(
        echo, noisy, torch.tensor([500.0, 20.0]), {"encoder_hidden_states": text, "encoder_hidden_states_mask": mask}
    )
    torch.testing.assert_close(out, noisy)
    assert seen["hidden_states"].shape == (2, 3 * 4, 16) and seen["img_shapes"] == [(1, 3, 4)] * 2
    assert torch.equal(seen["timestep"], torch.tensor([0.5, 0.02]))
    assert seen["encoder_hidden_states"].shape == (2, 5, 32) and seen["encoder_hidden_states_mask"].tolist()[1] == [
        1,
        1,
        1,
        0,
        0,
    ]


@pytest.fixture(scope="module")
def trained(tiny_qwen_image_model: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedFiles:
    """A Qwen-Image LoRA with alpha ≠ rank on attention, MLP, modulation and output layers."""
    return train_and_write(
        tiny_qwen_image_model, "qwen-image", "", tmp_path_factory.mktemp("qwen-files"), dataset_hash="ef" * 32,
        rank=4, alpha=2, max_train_steps=3, learning_rate=5e-2, target_modules=TARGETS, trigger_word="geoshapes style",
    )  # fmt: skip


def _transformer_output(transformer) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, 16, 16, generator=gen),
            encoder_hidden_states=torch.randn(1, 6, 32, generator=gen),
            encoder_hidden_states_mask=None,
            timestep=torch.tensor([0.5]),
            img_shapes=[(1, 4, 4)],
            return_dict=False,
        )[0]


def _scale(outcome) -> float:
    return outcome.adapter_configs["transformer"]["lora_alpha"] / outcome.adapter_configs["transformer"]["r"]


def test_the_qwen_image_diffusers_file_loads_into_the_pipeline_with_the_trained_delta(
    tiny_qwen_image_model: Path, trained
) -> None:
    from diffusers import QwenImagePipeline

    outcome, diffusers_file, _ = trained
    pipe = QwenImagePipeline.from_pretrained(tiny_qwen_image_model)
    base = _transformer_output(pipe.transformer)
    reference = QwenImagePipeline.from_pretrained(tiny_qwen_image_model).transformer
    reference.load_state_dict(
        comfy_rules.with_lora(pipe.transformer.state_dict(), outcome.denoiser_lora, _scale(outcome))
    )
    expected = _transformer_output(reference)
    assert not torch.allclose(base, expected, atol=1e-4)
    pipe.load_lora_weights(str(diffusers_file))
    torch.testing.assert_close(_transformer_output(pipe.transformer), expected, rtol=1e-4, atol=1e-5)


def test_the_qwen_image_comfyui_file_loads_whole_under_comfyuis_qwenimage_rules(
    tiny_qwen_image_model: Path, trained
) -> None:
    from diffusers import QwenImageTransformer2DModel

    outcome, _, kohya_file = trained
    base = QwenImageTransformer2DModel.from_pretrained(tiny_qwen_image_model, subfolder="transformer").state_dict()
    weights = comfy_rules.qwen_image_weights(denoiser_config(tiny_qwen_image_model)["num_layers"])
    assert set(weights) <= set(base)  # ComfyUI's model holds diffusers' weights under the same names
    model = {k: base[k] for k in weights}
    expected = comfy_rules.with_lora(base, outcome.denoiser_lora, _scale(outcome))
    lora = load_file(str(kohya_file))
    patches, not_loaded = comfy_rules.load_lora(lora, comfy_rules.qwen_image_key_map(weights))
    assert not_loaded == []
    assert all(p.alpha == 2.0 for p in patches.values())  # every loader scales by alpha/rank = 2/4
    patched = comfy_rules.apply_patches(model, patches)
    assert not torch.equal(
        patched["transformer_blocks.1.txt_mod.1.weight"], model["transformer_blocks.1.txt_mod.1.weight"]
    )
    for key in weights:
        torch.testing.assert_close(patched[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_qwen_image_headers_tell_the_truth(trained) -> None:
    outcome, diffusers_file, kohya_file = trained
    with safe_open(str(kohya_file), framework="pt") as handle:
        meta = handle.metadata()
        keys = set(handle.keys())
    assert meta["modelspec.architecture"] == "Qwen-Image/lora"
    assert meta["modelspec.implementation"] == "https://github.com/QwenLM/Qwen-Image"
    assert "ss_network_module" not in meta and meta["ss_base_model_version"] == "qwen_image"
    assert meta["lora_pipeline.family"] == "qwen-image" and meta["lora_pipeline.base_model"] == "tiny-qwen-image"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["modelspec.trigger_phrase"] == "geoshapes style" and meta["ss_steps"] == str(outcome.steps)
    assert meta["lora_pipeline.dataset_hash"] == "ef" * 32
    assert "lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight" in keys
    assert "lora_unet_proj_out.alpha" in keys and not any(k.startswith("lora_te") for k in keys)
    with safe_open(str(diffusers_file), framework="pt") as handle:
        dmeta, dkeys = handle.metadata(), set(handle.keys())
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in dkeys
    assert not any(k.startswith(("ss_", "modelspec.")) for k in dmeta)
    adapter = json.loads(dmeta["lora_adapter_metadata"])
    assert adapter["transformer.lora_alpha"] == 2 and adapter["transformer.r"] == 4


def test_the_registry_reads_each_qwen_image_files_layout_from_its_tensor_names(trained) -> None:
    from lora_pipeline.registry.layouts import layout_of

    _, diffusers_file, kohya_file = trained
    for path, layout in ((diffusers_file, "diffusers"), (kohya_file, "kohya")):
        with safe_open(str(path), framework="pt") as handle:
            assert layout_of(handle.keys()) == layout


def test_qwen_image_sample_images_render_with_the_lora_loaded(tiny_qwen_image_model: Path, trained) -> None:
    from PIL import Image

    from lora_pipeline.worker.samples import generate_samples

    _, diffusers_file, _ = trained
    params = quick_params(sample_inference_steps=2, seed=5)
    pngs = generate_samples(
        tiny_qwen_image_model, "qwen-image", diffusers_file, ["geoshapes style", "a"], params, torch.device("cpu")
    )
    assert len(pngs) == 2 and Image.open(io.BytesIO(pngs[0])).size == (32, 32)


def test_a_module_comfyui_has_no_name_for_and_a_text_encoder_lora_are_refused(tiny_qwen_image_model: Path) -> None:
    assert comfy_lora_name("transformer_blocks.7.img_mlp.net.2") == "lora_unet_transformer_blocks_7_img_mlp_net_2"
    with pytest.raises(KohyaNameError, match="addition_t_embedding"):
        comfy_lora_name("time_text_embed.addition_t_embedding")  # an Embedding (Qwen-Image-Layered)
    with pytest.raises(KohyaNameError, match="txt_norm"):
        comfy_lora_name("txt_norm")
    pair = {"down": torch.zeros(2, 4), "up": torch.zeros(4, 2)}
    with pytest.raises(KohyaNameError, match="transformer only"):
        QwenImage.kohya_tensors({("text_encoder", "layers.0.self_attn.q_proj"): pair}, 2.0, None)
    from lora_pipeline.worker.data import Example, decode_image
    from lora_pipeline.worker.train import train_lora

    name, data, caption = sample_images()[0]
    with pytest.raises(WorkerInputError, match="train_text_encoder"):
        train_lora(
            quick_params(train_text_encoder=True),
            "qwen-image",
            tiny_qwen_image_model,
            [Example(decode_image(data, name), caption, name)],
        )
