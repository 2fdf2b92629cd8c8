"""Per-family presets: a run's unset params come from its family's preset, explicit params win,
models built in code keep their few-second preset, and a family unknown at launch (a hub id
without model_family) falls back to TrainingParams' defaults."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lora_pipeline.contracts.families import FAMILIES, FLOW_FAMILIES
from lora_pipeline.contracts.presets import FAMILY_PRESETS, TINY_MODEL_PRESET
from lora_pipeline.contracts.training import TrainingParams
from lora_pipeline.lifecycle.submit import launch_choice

DEFAULTS = TrainingParams()


def sdxl_folder(tmp_path: Path) -> str:
    folder = tmp_path / "sdxl"
    (folder / "unet").mkdir(parents=True)
    index = {"_class_name": "StableDiffusionXLPipeline", "unet": [], "text_encoder_2": []}
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "unet" / "config.json").write_text(json.dumps({"addition_embed_type": "text_time"}))
    return str(folder)


def test_unset_params_come_from_the_family_preset_and_explicit_ones_win(tmp_path: Path):
    base = sdxl_folder(tmp_path)
    preset = launch_choice(base, {})
    assert preset.family == "sdxl"
    assert (preset.params.rank, preset.params.resolution, preset.params.max_train_steps) == (32, 1024, 3000)
    assert preset.params.num_sample_images == 4
    mine = launch_choice(base, {"rank": 8, "resolution": 768}).params
    assert (mine.rank, mine.resolution, mine.max_train_steps) == (8, 768, 3000)


def test_a_hub_id_gets_its_named_familys_preset_or_the_defaults():
    flux = launch_choice("black-forest-labs/FLUX.1-dev", {}, model_family="flux1").params
    assert (flux.rank, flux.resolution, flux.max_train_steps, flux.timestep_shift) == (16, 1024, 2000, 1.0)
    unknown = launch_choice("black-forest-labs/FLUX.1-dev", {})
    assert unknown.family is None
    assert (unknown.params.rank, unknown.params.max_train_steps) == (DEFAULTS.rank, DEFAULTS.max_train_steps)


@pytest.mark.parametrize("base_model", ["tiny", "tiny-sdxl", "tiny-flux1", "tiny-sd3"])
def test_models_built_in_code_keep_their_quick_preset_over_their_familys(base_model: str):
    choice = launch_choice(base_model, {})
    for name, value in TINY_MODEL_PRESET.items():
        assert getattr(choice.params, name) == value
    assert choice.params.timestep_shift == FAMILY_PRESETS[choice.family].get("timestep_shift")  # type: ignore[index]


def test_every_family_has_a_preset_and_only_flow_families_shift():
    assert set(FAMILY_PRESETS) == set(FAMILIES)
    for family, preset in FAMILY_PRESETS.items():
        TrainingParams.model_validate(preset)
        assert ("timestep_shift" in preset) == (family in FLOW_FAMILIES)


def test_the_presets_are_torch_free():
    code = "import sys, lora_pipeline.contracts.presets, lora_pipeline.lifecycle.base_models; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


def test_the_docs_show_the_presets_table_as_it_is():
    docs = (Path(__file__).parents[2] / "docs" / "worker.md").read_text(encoding="utf-8")
    section = docs.split("## Per-family presets and the launch check", 1)[1].split("\n## ", 1)[0]
    shown = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            family, rank, lr, resolution, steps, shift = (c.strip() for c in line.strip("|").split("|")[:6])
            shown[family.strip("`")] = {
                "rank": int(rank),
                "learning_rate": float(lr),
                "resolution": int(resolution),
                "max_train_steps": int(steps),
                **({} if shift == "—" else {"timestep_shift": float(shift)}),
            }
    assert shown == {family: dict(preset) for family, preset in FAMILY_PRESETS.items()}
