"""The launch check refuses, in one line naming both, a base model of another family than the run
names and a base model no family trains, by the worker's own table (contracts/families.py), before
anything is submitted; what it cannot read (a hub id) is left to the worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_pipeline.contracts.families import PIPELINE_FAMILIES, BaseModelRefused, tiny_model_family
from lora_pipeline.contracts.training import TINY_MODELS
from lora_pipeline.lifecycle.base_models import launch_family
from lora_pipeline.lifecycle.submit import launch_choice


def diffusers_folder(root: Path, pipeline: str, **configs: dict) -> Path:
    """A folder with just the configs the check reads: model_index.json and ``configs``
    (``unet={…}`` is written to unet/config.json)."""
    root.mkdir(parents=True)
    index = {"_class_name": pipeline, **{name: ["diffusers", "X"] for name in configs}}
    (root / "model_index.json").write_text(json.dumps(index))
    for name, config in configs.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
    return root


def test_every_model_built_in_code_has_its_family():
    assert {name: tiny_model_family(name) for name in TINY_MODELS} == {
        name: "sd1" if name == "tiny" else name.removeprefix("tiny-") for name in TINY_MODELS
    }
    assert tiny_model_family("org/model") is None


def test_a_named_family_that_is_not_the_base_models_is_refused_naming_both():
    with pytest.raises(BaseModelRefused) as refused:
        launch_family("tiny-sdxl", "flux1")
    assert str(refused.value) == "model_family 'flux1' does not match base_model 'tiny-sdxl', a 'sdxl' model"
    assert launch_family("tiny-sdxl", "sdxl") == "sdxl" and launch_family("tiny-sdxl") == "sdxl"


def test_a_local_folder_is_read_for_its_family(tmp_path: Path):
    flux = diffusers_folder(tmp_path / "flux", "FluxPipeline", transformer={})
    assert launch_family(str(flux)) == "flux1"
    with pytest.raises(BaseModelRefused, match=rf"model_family 'sdxl' does not match base_model '{flux}', a 'flux1'"):
        launch_family(str(flux), "sdxl")


@pytest.mark.parametrize(
    ("pipeline", "unet", "family"),
    [
        ("StableDiffusionPipeline", {"cross_attention_dim": 768}, "sd1"),
        ("StableDiffusionPipeline", {"cross_attention_dim": 1024}, "sd2"),
        ("StableDiffusionPipeline", {"addition_embed_type": "text_time"}, "sdxl"),
    ],
)
def test_the_unet_config_tells_sd1_sd2_and_sdxl_apart(tmp_path: Path, pipeline, unet, family):
    folder = diffusers_folder(tmp_path / "m", pipeline, unet=unet, text_encoder={}, text_encoder_2={})
    assert launch_family(str(folder)) == family


def test_a_base_no_family_trains_is_refused(tmp_path: Path):
    wan = diffusers_folder(tmp_path / "wan", "WanPipeline", transformer={})
    with pytest.raises(BaseModelRefused, match=r"is a 'WanPipeline', which no family trains") as refused:
        launch_family(str(wan))
    assert "\n" not in str(refused.value) and "FluxPipeline" in str(refused.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelRefused, match="is not a diffusers model: it has no model_index.json"):
        launch_family(str(tmp_path / "empty"))


def test_a_store_model_is_read_from_the_store(local_store):
    local_store.put("models/xl/model_index.json", json.dumps({"_class_name": "FluxPipeline"}).encode())
    assert launch_family("store:models/xl", store=local_store) == "flux1"
    with pytest.raises(BaseModelRefused, match="does not match base_model 'store:models/xl'"):
        launch_family("store:models/xl", "sd3", store=local_store)
    # Another store (the worker's own LORA_STORAGE_URL) may hold it: the worker decides.
    assert launch_family("store:models/elsewhere", "sd3", store=local_store) == "sd3"


def test_a_hub_id_cannot_be_checked_at_launch_so_the_named_family_stands():
    assert launch_family("black-forest-labs/FLUX.1-dev") is None
    assert launch_family("black-forest-labs/FLUX.1-dev", "flux1") == "flux1"
    with pytest.raises(BaseModelRefused, match="model_family 'flux3' is unknown; known: auto, sd1"):
        launch_family("black-forest-labs/FLUX.1-dev", "flux3")


def test_a_timestep_shift_on_a_unet_family_is_refused():
    with pytest.raises(BaseModelRefused, match="timestep_shift applies to the flow-matching families only; "):
        launch_choice("tiny", {"timestep_shift": 2.0})
    assert launch_choice("tiny-flux1", {"timestep_shift": 2.0}).params.timestep_shift == 2.0


def test_the_table_names_only_known_families():
    from lora_pipeline.contracts.families import FAMILIES

    assert set(PIPELINE_FAMILIES.values()) <= set(FAMILIES)
