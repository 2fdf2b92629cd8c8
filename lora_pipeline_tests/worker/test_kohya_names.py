"""kohya module names: sd-scripts' SDXL block naming, checked against ComfyUI's rules on every
weight of the real SDXL UNet; SD 1.x keeps diffusers' names; the text-encoder prefixes."""

from __future__ import annotations

import pytest

from lora_pipeline.worker.kohya import KohyaNameError, check_unet_config, kohya_module_name, unet_sgm_path
from lora_pipeline_tests.worker import comfy_rules
from lora_pipeline_tests.worker.real_models import SD15_UNET, SDXL_UNET, build


def _weights(unet) -> list[str]:
    return [k for k in unet.state_dict() if k.endswith(".weight")]


@pytest.fixture(scope="module")
def meta_unets():
    return {family: build(family, meta=True).unet for family in ("sd1", "sdxl")}


def test_every_sdxl_unet_weight_gets_the_sgm_name_comfyui_maps_it_to(meta_unets) -> None:
    expected = comfy_rules.unet_to_sgm(comfy_rules.SDXL)
    weights = _weights(meta_unets["sdxl"])
    assert len(weights) > 1000 and set(weights) <= set(expected)  # the oracle covers the whole UNet
    wrong = {
        k: (unet_sgm_path(k[: -len(".weight")], SDXL_UNET) + ".weight", expected[k])
        for k in weights
        if unet_sgm_path(k[: -len(".weight")], SDXL_UNET) + ".weight" != expected[k]
    }
    assert wrong == {}


def test_every_sd15_unet_weight_also_has_an_sgm_name_comfyui_agrees_with(meta_unets) -> None:
    """SD 1.x files keep diffusers' names, but the block arithmetic must hold for any SD UNet."""
    expected = comfy_rules.unet_to_sgm(comfy_rules.SD15)
    weights = _weights(meta_unets["sd1"])
    assert set(weights) <= set(expected)
    assert all(unet_sgm_path(k[: -len(".weight")], SD15_UNET) + ".weight" == expected[k] for k in weights)


def test_the_derived_comfy_config_of_the_real_models_is_comfyuis_own() -> None:
    assert comfy_rules.comfy_config_of(SDXL_UNET) == comfy_rules.SDXL
    assert comfy_rules.comfy_config_of(SD15_UNET) == comfy_rules.SD15


def test_a_tiny_sdxl_shaped_unet_maps_by_its_own_blocks(tiny_sdxl_model) -> None:
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(tiny_sdxl_model / "unet")
    unet = UNet2DConditionModel.from_config(config)
    expected = comfy_rules.unet_to_sgm(comfy_rules.comfy_config_of(config))
    weights = _weights(unet)
    assert set(weights) <= set(expected)
    assert all(unet_sgm_path(k[: -len(".weight")], config) + ".weight" == expected[k] for k in weights)


@pytest.mark.parametrize(
    ("diffusers", "sgm"),
    [
        (
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        ),
        (
            "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0",
            "input_blocks.8.1.transformer_blocks.9.attn2.to_out.0",
        ),
        ("down_blocks.1.attentions.1.proj_in", "input_blocks.5.1.proj_in"),
        ("mid_block.attentions.0.transformer_blocks.3.ff.net.2", "middle_block.1.transformer_blocks.3.ff.net.2"),
        ("mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
        (
            "up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_k",
            "output_blocks.2.1.transformer_blocks.0.attn1.to_k",
        ),
        ("up_blocks.1.attentions.0.proj_out", "output_blocks.3.1.proj_out"),
        ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
        ("up_blocks.2.resnets.2.conv_shortcut", "output_blocks.8.0.skip_connection"),
        ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
        ("down_blocks.0.resnets.1.conv1", "input_blocks.2.0.in_layers.2"),
        ("conv_in", "input_blocks.0.0"),
        ("add_embedding.linear_2", "label_emb.0.2"),
        ("time_embedding.linear_1", "time_embed.0"),
    ],
)
def test_sdxl_names_are_the_ones_sd_scripts_writes(diffusers: str, sgm: str) -> None:
    """sd-scripts' library/sdxl_model_util.make_unet_conversion_map, row by row."""
    assert unet_sgm_path(diffusers, SDXL_UNET) == sgm
    assert kohya_module_name("unet", diffusers, "sdxl", SDXL_UNET) == "lora_unet_" + sgm.replace(".", "_")


def test_sd1_and_sd2_unet_names_stay_diffusers_names() -> None:
    path = "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0"
    for family in ("sd1", "sd2"):
        assert kohya_module_name("unet", path, family, None) == (
            "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0"
        )


@pytest.mark.parametrize(
    ("component", "family", "path", "name"),
    [
        (
            "text_encoder",
            "sd1",
            "encoder.layers.0.self_attn.q_proj",
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        ),
        ("text_encoder", "sd2", "text_model.encoder.layers.22.mlp.fc2", "lora_te_text_model_encoder_layers_22_mlp_fc2"),
        (
            "text_encoder",
            "sdxl",
            "encoder.layers.11.self_attn.out_proj",
            "lora_te1_text_model_encoder_layers_11_self_attn_out_proj",
        ),
        (
            "text_encoder_2",
            "sdxl",
            "text_model.encoder.layers.31.self_attn.v_proj",
            "lora_te2_text_model_encoder_layers_31_self_attn_v_proj",
        ),
    ],
)
def test_text_encoder_names_have_kohyas_prefix_and_the_text_model_level(component, family, path, name) -> None:
    assert kohya_module_name(component, path, family, SDXL_UNET) == name


@pytest.mark.parametrize(
    "path",
    [
        "down_blocks.2.downsamplers.0.conv",  # the last down block has none
        "up_blocks.2.upsamplers.0.conv",
        "down_blocks.0.attentions.0",  # a block, not a layer
        "down_blocks.3.resnets.0.conv1",
        "up_blocks.0.resnets.3.conv1",
        "mid_block.attentions.1.proj_in",
        "down_blocks.0.resnets.0.nonlinearity",
        "encoder.layers.0",
        "time_proj",
    ],
)
def test_a_module_outside_the_sgm_unet_is_refused_naming_it(path: str) -> None:
    with pytest.raises(KohyaNameError, match="has no|not a LoRA module"):
        unet_sgm_path(path, SDXL_UNET)


def test_text_encoder_2_outside_sdxl_and_unconfigured_sdxl_are_refused() -> None:
    with pytest.raises(KohyaNameError, match="text_encoder_2"):
        kohya_module_name("text_encoder_2", "encoder.layers.0.mlp.fc1", "sd1", None)
    with pytest.raises(KohyaNameError, match="UNet config"):
        kohya_module_name("unet", "conv_in", "sdxl", None)
    with pytest.raises(KohyaNameError, match="as many down blocks"):
        check_unet_config({**SDXL_UNET, "up_block_types": ("UpBlock2D",)})
