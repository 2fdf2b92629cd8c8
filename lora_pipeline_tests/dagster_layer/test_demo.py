"""End to end: what `lora-pipeline demo` does, on the embedded defaults, checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lora_pipeline.cli import main
from lora_pipeline.contracts.presets import FAMILY_PRESETS
from lora_pipeline.demo import run_demo
from lora_pipeline.registry.models import Attested, VersionStatus
from lora_pipeline.storage.local import LocalStore

pytestmark = pytest.mark.slow


@pytest.fixture
def model_cache(tmp_path_factory, monkeypatch) -> Path:
    cache = tmp_path_factory.getbasetemp() / "demo-model-cache"
    monkeypatch.setenv("LORA_PIPELINE_CACHE", str(cache))
    return cache


def test_demo_trains_the_sample_style_into_one_completed_loadable_version(store_dir, model_cache, tmp_path):
    result = run_demo(timeout_s=900, poll_interval_s=0.5, echo=lambda _m: None)

    [version] = result.document.versions
    assert version.status is VersionStatus.completed
    assert version.id == result.job_id
    assert version.s3_key == "loras/sample_style/sample_style_v1.safetensors"
    lora = tmp_path / "v1.safetensors"
    LocalStore(store_dir).download_file(version.s3_key, lora)
    assert _pipeline_output_changes(lora, model_cache)


def _pipeline_output_changes(lora: Path, cache: Path) -> bool:
    """diffusers' load_lora_weights reads the file into the same base model and changes its output."""
    import torch
    from diffusers import StableDiffusionPipeline

    from lora_pipeline.worker.tiny_model import ensure_tiny_model

    pipe = StableDiffusionPipeline.from_pretrained(ensure_tiny_model(), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def render():
        generator = torch.Generator().manual_seed(0)
        return pipe(
            "geoshapes style", num_inference_steps=2, generator=generator, height=32, width=32, output_type="np"
        ).images

    before = render()
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    after = render()
    return not np.allclose(before, after)


def test_demo_command_names_the_failing_step(store_dir, model_cache):
    """A style with no data fails at the dataset step, and the exit code says so."""
    result = CliRunner().invoke(main, ["demo", "--style", "no_such_style"])

    assert result.exit_code == 1
    assert "training_dataset" in result.output


def test_materializing_all_three_assets_yields_a_trained_lora_in_the_registry(store_dir, model_cache):
    """The UI path: select the three assets, Materialize, partition sample_style."""
    import dagster as dg

    from lora_pipeline.definitions import defs

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("styles", ["sample_style"])
        result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
            instance=instance,
            partition_key="sample_style",
            run_config={"ops": {"trained_lora": {"config": {"poll_interval_s": 0.5, "wait_timeout_s": 900}}}},
        )

    assert result.success
    by_asset = {e.asset_key.path[-1]: e.materialization.metadata for e in result.get_asset_materialization_events()}
    assert set(by_asset) == {"training_dataset", "trained_lora", "lora_registry"}
    assert by_asset["trained_lora"]["lora_key"].value == "loras/sample_style/sample_style_v1.safetensors"
    assert by_asset["trained_lora"]["steps"].value == 30
    assert by_asset["lora_registry"]["latest_version"].value == "V1"
    assert all(check.passed for check in result.get_asset_check_evaluations())


@pytest.mark.parametrize(
    ("base_model", "family", "architecture"),
    [
        ("tiny-sdxl", "sdxl", "stable-diffusion-xl-v1-base/lora"),
        ("tiny-flux1", "flux1", "flux-1-dev/lora"),
        ("tiny-sd3", "sd3", "stable-diffusion-3-medium/lora"),
        ("tiny-z-image", "z-image", "Z-Image/lora"),
        ("tiny-flux2-klein", "flux2-klein", "Flux.2-klein-4b/lora"),
        ("tiny-qwen-image", "qwen-image", "Qwen-Image/lora"),
    ],
)
def test_demo_on_each_family_ends_in_a_completed_version_whose_files_registry_download_hands_out(
    base_model, family, architecture, store_dir, model_cache, tmp_path
):
    """`lora-pipeline demo --base-model tiny-<family>` (SD 1.x's `tiny`: the sample-style test above):
    the whole chain; the primary (kohya) file names the family, and `registry download` gives both layouts, checksum verified."""
    import json

    from safetensors import safe_open

    result = run_demo(base_model=base_model, timeout_s=900, poll_interval_s=0.5, echo=lambda _m: None)

    [version] = result.document.versions
    assert version.status is VersionStatus.completed
    assert set(version.files()) == {"kohya", "diffusers"}
    # The registry records the family and base model, confirmed by the file's header, and the
    # params the run used: the family's preset (its timestep shift) under the tiny models' preset.
    assert (version.family, version.base_model) == (Attested(family, "file"), Attested(base_model, "file"))
    assert version.params is not None and version.params["timestep_shift"] == FAMILY_PRESETS[family].get(
        "timestep_shift"
    )
    for layout in ("kohya", "diffusers"):
        out = tmp_path / f"{layout}.safetensors"
        got = CliRunner().invoke(
            main, ["registry", "download", "sample_style", "--format", layout, "-o", str(out), "--json"]
        )
        assert got.exit_code == 0, got.output
        assert json.loads(got.output)["verified"] is True
        with safe_open(str(out), framework="pt") as handle:
            meta = handle.metadata()
        assert meta["lora_pipeline.family"] == family and meta["lora_pipeline.base_model"] == base_model
    assert meta["lora_pipeline.layout"] == "diffusers"
    with safe_open(str(tmp_path / "kohya.safetensors"), framework="pt") as handle:
        assert handle.metadata()["modelspec.architecture"] == architecture
