"""The GPU benchmark's harness, tested on the CPU: CI has no GPU, so everything the GPU run
does that does not need one is checked here (benchmarks/gpu/, README "GPU training benchmark").

The dry run trains ours on tiny SD1.5- and SDXL-shaped models through the same script and
children the GPU run uses. The reference scripts are not in the repository (nor in
diffusers' sdist), so the reference's runner is tested on a stand-in script here; with
``.gpu_bundle/`` present, ``make gpu-dry-run`` runs the real ones.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
GPU_DIR = REPO / "benchmarks" / "gpu"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, GPU_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bench = _load("bench_gpu")
bundle = sys.modules["bundle"]
families = sys.modules["bench_families"]
from reference_shim import random_weights  # noqa: E402 - on the path bench_gpu sets

CI_SUBSET = ["sd15/ours", "sd15/ours+all", "sd15/reference", "sdxl/ours+all", "sdxl/ours+compile"]


@pytest.mark.slow
def test_dry_run_trains_both_models_through_the_gpu_runs_code_and_writes_the_report(tmp_path: Path) -> None:
    # A subset of the plan that takes each path once (defaults, every eager lever, SDXL,
    # regional compile with static shapes, a skipped reference); `make gpu-dry-run` runs it all.
    command = [
        sys.executable,
        str(GPU_DIR / "bench_gpu.py"),
        "--dry-run",
        "--out",
        str(tmp_path / "out"),
        "--work-dir",
        str(tmp_path / "work"),
        "--reference-dir",
        str(tmp_path / "no-bundle"),
    ]
    for run_id in CI_SUBSET:
        command += ["--only", run_id]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    report = json.loads((tmp_path / "out" / "gpu_bench.json").read_text())
    rows = {row["id"]: row for row in report["runs"]}
    assert sorted(rows) == sorted(CI_SUBSET)
    for run_id in CI_SUBSET:
        if "reference" in run_id:
            assert rows[run_id]["status"] == "skipped" and "make gpu-bundle" in rows[run_id]["error"]
        else:
            assert rows[run_id]["status"] == "ok", rows[run_id]
            assert rows[run_id]["steps_per_s"] > 0 and rows[run_id]["peak_mem_mb"] > 0
    assert rows["sd15/ours+all"]["levers"]["fuse_qkv"] is True
    assert rows["sd15/ours+all"]["levers"]["log_every"] == 2 and rows["sd15/ours"]["levers"]["log_every"] == 1
    compiled = rows["sdxl/ours+compile"]["levers"]
    assert (compiled["compile"], compiled["compile_backend"], compiled["static_shapes"]) == ("regional", "eager", True)
    assert report["import_check"]["missing_on_device"] == []
    assert {"diffusers", "peft", "torch", "transformers", "pydantic"} <= set(report["import_check"]["imported"])
    gains = {(g["lever"], g["config"]): g for g in report["levers"]}
    assert gains[("fuse_qkv", "sd15")]["gain"] > 0 and gains[("compile (regional)", "sdxl")]["gain"] > 0
    markdown = (tmp_path / "out" / "gpu_bench.md").read_text()
    assert "| sdxl/ours+compile |" in markdown and "**Reference skipped**" in markdown


def _present_families() -> list[str]:
    """The transformer families of the table whose module this checkout has (one entry each)."""
    from lora_pipeline.worker.families import FAMILIES

    present, chosen = {cls.name for cls in FAMILIES}, {}
    for name, entry in families.TABLE.items():
        if entry.components is not None and entry.family in present:
            chosen.setdefault(entry.family, name)
    return list(chosen.values())


def _dry_run_params() -> list[Any]:
    """FLUX.1 in every run; the other families (about 40 s each on 2 cores) only under
    ``-m exhaustive`` — ``make gpu-dry-run`` runs them all, which a GPU session does first."""
    names = _present_families()
    return [pytest.param(n, marks=() if n == "flux1" else pytest.mark.exhaustive) for n in names]


@pytest.mark.slow
@pytest.mark.parametrize("name", _dry_run_params())
def test_dry_run_trains_each_transformer_family_from_a_folder_without_weights(tmp_path: Path, name: str) -> None:
    # ~40 s a family on 2 cores (imports, the tiny model's first build): slow. `make gpu-dry-run`
    # runs the references too where .gpu_bundle/ is present.
    runs = [f"{name}/ours", f"{name}/reference"]
    command = [sys.executable, str(GPU_DIR / "bench_gpu.py"), "--dry-run", "--out", str(tmp_path / "out")]
    command += ["--work-dir", str(tmp_path / "work"), "--reference-dir", str(tmp_path / "no-bundle")]
    command += [item for run_id in runs for item in ("--only", run_id)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    report = json.loads((tmp_path / "out" / "gpu_bench.json").read_text())
    rows = {row["id"]: row for row in report["runs"]}
    ours = rows[f"{name}/ours"]
    assert ours["status"] == "ok", ours
    assert ours["steps_per_s"] > 0 and ours["steps"] == bench.DRY.configs[name].steps
    assert rows[f"{name}/reference"]["status"] == "skipped"
    model = tmp_path / "work" / f"model-{name}-tiny"
    assert (model / families.MARKER).is_file() and not list(model.rglob("*.safetensors"))
    assert report["import_check"]["missing_on_device"] == []


# Published sizes of the transformers (parameters, billions): FLUX.1 12B, SD3.5 medium ~2.2B
# (2.5B with its text projections, as Stability counts), SD3.5 large 8B, FLUX.2 klein 4B, Z-Image 6B,
# Qwen-Image 20B.
TRANSFORMER_BILLIONS = {
    "flux1": (11.8, 12.0),
    "sd3-medium": (2.1, 2.6),
    "sd3-large": (7.9, 8.2),
    "flux2-klein": (3.7, 4.1),
    "z-image": (5.9, 6.3),
    "qwen-image": (20.2, 20.6),
}


@pytest.mark.slow
def test_every_family_builds_at_real_size_on_the_meta_device_from_its_folder(tmp_path: Path) -> None:
    # The GPU run's folders, loaded through the shim onto the meta device: a wrong config key, class
    # or tokenizer fails here, not on the GPU machine. ~40 s on 2 cores (Python builds ~80B
    # parameters' worth of modules): slow.
    import diffusers
    import torch
    import transformers

    random_weights.install("meta", torch.bfloat16)
    try:
        for name, entry in families.TABLE.items():
            if entry.components is None:
                continue
            folder = families.write_real_folder(entry, tmp_path / name)
            assert not list(folder.rglob("*.safetensors"))
            index = json.loads((folder / "model_index.json").read_text())
            assert index["_class_name"] == entry.pipeline
            for component, spec in entry.components.items():
                library = diffusers if spec.library == "diffusers" else transformers
                model = getattr(library, spec.cls).from_pretrained(str(folder), subfolder=component)
                parameter = next(model.parameters())
                assert (parameter.device.type, parameter.dtype) == ("meta", torch.bfloat16)
                if component == "transformer":
                    low, high = TRANSFORMER_BILLIONS[name]
                    assert low <= sum(p.numel() for p in model.parameters()) / 1e9 <= high, name
                if spec.tokenizer:
                    tokenizer_folder = folder / component.replace("text_encoder", "tokenizer")
                    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_folder))
                    assert len(tokenizer(bench.INSTANCE_PROMPT).input_ids) > 5
    finally:
        random_weights.uninstall()


# The table's entries shrunk (widths and depths only; classes, tokenizers, scheduler, reference
# arguments as the GPU run has them): the reference scripts of the families whose tiny models
# are on other branches run on them here.
_QWEN3 = dict(hidden_size=32, intermediate_size=37, num_attention_heads=2, num_key_value_heads=2, head_dim=16)
_KL_VAE = dict(block_out_channels=[32, 64], layers_per_block=1)
_KL_VAE |= dict(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
SHRUNK = {
    "z-image": {
        "transformer": dict(dim=64, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32),
        "vae": _KL_VAE,
        "text_encoder": dict(_QWEN3, num_hidden_layers=2, vocab_size=1000),
    },
    "flux2-klein": {  # its script stacks the text encoder's hidden layers 10, 20 and 30
        "transformer": dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2),
        "vae": _KL_VAE,
        "text_encoder": dict(_QWEN3, num_hidden_layers=31, vocab_size=1000),
    },
    "qwen-image": {
        "transformer": dict(num_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32),
        "vae": dict(base_dim=16, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False]),
        "text_encoder": dict(
            text_config=dict(_QWEN3, num_hidden_layers=2, vocab_size=1000, rope_scaling={"mrope_section": [2, 3, 3]}),
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=37, num_heads=2, out_hidden_size=32),
        ),
    },
}
_SHRUNK_ROPE = {"z-image": {"axes_dims": [8, 12, 12]}, "qwen-image": {"axes_dims_rope": [4, 6, 6]}}
_SHRUNK_ROPE["flux2-klein"] = {
    "axes_dims_rope": [4, 4, 4, 4],
    "joint_attention_dim": 96,
    "timestep_guidance_channels": 32,
}


def _shrunk(name: str):
    import dataclasses

    entry = families.TABLE[name]
    components = {}
    for key, component in entry.components.items():
        config = dict(component.config)
        for field, value in SHRUNK[name].get(key, {}).items():
            config[field] = (
                dict(config.get(field, {}), **value) if isinstance(value, dict) and field.endswith("config") else value
            )
        if key == "transformer":
            config.update(_SHRUNK_ROPE[name])
        components[key] = dataclasses.replace(component, config=config)
    return dataclasses.replace(entry, components=components)


@pytest.mark.slow
@pytest.mark.skipif(not (bundle.BUNDLE / "reference").is_dir(), reason="no .gpu_bundle/ (make gpu-bundle)")
@pytest.mark.parametrize("name", sorted(SHRUNK))
def test_the_new_families_reference_scripts_train_on_their_entries_shrunk(tmp_path: Path, name: str) -> None:
    # ~30 s each here: the script's imports, a few steps. Proves the entry's classes, tokenizer
    # stand-ins (Qwen2 with its chat template), scheduler and arguments work with the real script.
    folder = families.write_real_folder(_shrunk(name), tmp_path / "model")
    data = bench.write_data(tmp_path, bench.DRY.configs[name], bench.DRY.configs[name].images)
    deps = [] if not bundle.LOCAL_DEPS_DIR.is_dir() else ["--reference-deps", str(bundle.LOCAL_DEPS_DIR)]
    command = [sys.executable, str(GPU_DIR / "bench_gpu.py"), "--child", "reference", "--dry-run", "--config", name]
    command += ["--mixed-precision", "no", "--model", str(folder), "--data", str(data), "--run-id", f"{name}/reference"]
    command += ["--reference-dir", str(bundle.BUNDLE / "reference"), "--out", str(tmp_path / "out"), *deps]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    rows = [json.loads(line[len(bench.MARKER) :]) for line in done.stdout.splitlines() if line.startswith(bench.MARKER)]
    assert [row["status"] for row in rows] == ["ok"], done.stderr[-3000:]
    assert f"--instance_data_dir={data / 'instance'}" in rows[0]["argv"]


def test_the_shim_builds_seeded_weights_for_marked_folders_only(tmp_path: Path) -> None:
    import torch
    from diffusers import FluxTransformer2DModel
    from transformers import T5EncoderModel

    from lora_pipeline.worker.tiny_model import ensure_named_tiny_model

    tiny = ensure_named_tiny_model("tiny-flux1")
    folder = families.configs_only(tiny, families.TABLE["flux1"], tmp_path / "flux1")
    random_weights.install("cpu", torch.float32)
    try:
        one = FluxTransformer2DModel.from_pretrained(str(folder), subfolder="transformer")
        two = FluxTransformer2DModel.from_pretrained(str(folder), subfolder="transformer", torch_dtype=torch.bfloat16)
        assert not one.training and two.dtype == torch.bfloat16
        # One seed per component: both sides (two loads of it) draw the same model.
        assert torch.equal(
            one.proj_out.weight, FluxTransformer2DModel.from_pretrained(str(folder / "transformer")).proj_out.weight
        )
        t5 = T5EncoderModel.from_pretrained(str(folder / "text_encoder_2"))  # a component folder, as scripts pass it
        assert t5.dtype == torch.float32 and not t5.training
        saved = FluxTransformer2DModel.from_pretrained(str(tiny), subfolder="transformer")  # not marked: its weights
        assert not torch.equal(saved.proj_out.weight, one.proj_out.weight)
        with pytest.raises(NotImplementedError, match="quantization_config"):
            FluxTransformer2DModel.from_pretrained(str(folder), subfolder="transformer", quantization_config=object())
    finally:
        random_weights.uninstall()
    with pytest.raises(OSError):  # without the shim, a folder without weights does not load
        FluxTransformer2DModel.from_pretrained(str(folder), subfolder="transformer")


def test_a_lever_this_checkout_lacks_is_not_available_and_a_typo_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "LEVER_FIELDS", (*bench.LEVER_FIELDS, "future_lever"))
    lacking = bench.Run("flux1/ours+future", "flux1", "ours", params={"future_lever": True})
    refused = bench.Run("flux1/ours+fp64", "flux1", "ours", params={"mixed_precision": "fp64"})
    assert "no field 'future_lever'" in bench.check_params(lacking, bench.GPU)
    assert "refuses {'mixed_precision': 'fp64'}" in bench.check_params(refused, bench.GPU)
    assert bench.check_params(bench.Run("flux1/ours", "flux1", "ours"), bench.GPU) is None
    runs = bench.plan(bench.GPU)
    with pytest.raises(SystemExit, match="flux1/typo: TrainingParams has no field 'gradient_checkpoint'"):
        bench.check_plan(
            [*runs, bench.Run("flux1/typo", "flux1", "ours", {"log_every": 1}, params={"gradient_checkpoint": True})],
            bench.GPU,
        )
    from lora_pipeline.contracts.training import TrainingParams

    quantized = next(r for r in runs if r.id == "flux1/ours+int8")
    bench.check_plan(runs, bench.GPU)
    assert (quantized.unavailable is None) == ("quantize_base" in TrainingParams.model_fields)


def test_a_transformer_reference_trains_our_lora_at_our_sizes() -> None:
    config = bench.GPU.configs["flux1"]
    argv = bench.reference_argv(config, Path("s.py"), Path("m"), Path("d"), Path("o"), "bf16")
    assert {"--resolution=1024", "--train_batch_size=1", "--rank=16", "--gradient_checkpointing"} <= set(argv)
    assert "--lora_layers=to_k,to_q,to_v,to_out.0" in argv and "--instance_data_dir=d/instance" in argv
    assert dict(config.params) == {"gradient_checkpointing": True}  # ours checkpoints as the reference does
    assert "--gradient_checkpointing" not in bench.reference_argv(
        bench.GPU.configs["sd3-medium"], Path("s.py"), Path("m"), Path("d"), Path("o"), "bf16"
    )


STAND_IN = """
import argparse
import time
from tqdm.auto import tqdm

parser = argparse.ArgumentParser()
for flag in {flags!r}:
    parser.add_argument(flag, nargs="?", const=True)
args = parser.parse_args()
for _ in tqdm(range(3), desc="Loading"):  # another bar: not timed
    time.sleep(0.01)
bar = tqdm(range(int(args.max_train_steps)), desc="Steps")
for step in range({updates}):
    time.sleep(0.02)
    bar.update(1)
open({marker!r}, "w").write("the script ran past its steps")
"""


def _stand_in(folder: Path, config, updates: int) -> Path:
    argv = bench.reference_argv(config, Path("s"), Path("m"), Path("d"), Path("o"), "no")
    flags = sorted({item.split("=", 1)[0] for item in argv[1:]})
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "ran-past.txt"
    (folder / config.reference_script).write_text(STAND_IN.format(flags=flags, updates=updates, marker=str(marker)))
    return marker


@pytest.fixture
def isolated_reference(monkeypatch: pytest.MonkeyPatch):
    """The reference child runs in this process here: keep its path and tracker changes to the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(bench.cpu_bench, "_no_tracker", lambda: None)
    yield
    random_weights.uninstall()  # the child patches from_pretrained for marked folders


def _reference_args(tmp_path: Path, config: str = "sd15") -> Namespace:
    return Namespace(
        dry_run=True,
        config=config,
        reference_deps=None,
        reference_dir=str(tmp_path / "ref"),
        model="m",
        data="d",
        mixed_precision="no",
        run_id=f"{config}/reference",
    )


def test_reference_runner_times_the_steps_bar_and_stops_the_script_after_the_last_step(
    tmp_path: Path, capsys: pytest.CaptureFixture, isolated_reference
) -> None:
    import tqdm.auto

    config = bench.DRY.configs["sd15"]
    marker = _stand_in(tmp_path / "ref", config, updates=2 * config.steps)
    original_update, argv = tqdm.auto.tqdm.update, list(sys.argv)
    bench.child_reference(_reference_args(tmp_path))

    rows = [
        json.loads(line[len(bench.MARKER) :])
        for line in capsys.readouterr().out.splitlines()
        if line.startswith(bench.MARKER)
    ]
    assert len(rows) == 1
    row = rows[0]
    assert row["status"] == "ok" and row["id"] == "sd15/reference"
    assert (row["steps"], row["warmup"]) == (config.steps, config.warmup)
    # 4 timed steps of 20 ms each, not the loading bar's
    assert 1 < row["steps_per_s"] < 50
    assert "--train_data_dir=d" in row["argv"] and f"--max_train_steps={config.steps}" in row["argv"]
    assert not marker.exists()  # stopped once its steps were timed
    assert tqdm.auto.tqdm.update is original_update and sys.argv == argv


def test_reference_that_ends_early_is_an_error(tmp_path: Path, isolated_reference) -> None:
    config = bench.DRY.configs["sdxl"]
    _stand_in(tmp_path / "ref", config, updates=config.steps - 1)
    with pytest.raises(RuntimeError, match=f"ended after {config.steps - 1} of {config.steps}"):
        bench.child_reference(_reference_args(tmp_path, "sdxl"))


def test_reference_compiles_through_accelerates_own_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate.utils import TorchDynamoPlugin

    for name in list(os.environ):
        if name.startswith("ACCELERATE_DYNAMO_"):
            monkeypatch.delenv(name)
    for key, value in bench.reference_env("full", "max-autotune-no-cudagraphs", "inductor").items():
        monkeypatch.setenv(key, value)
    plugin = TorchDynamoPlugin()
    assert (plugin.backend.value, plugin.mode, plugin.use_regional_compilation) == (
        "INDUCTOR",
        "max-autotune-no-cudagraphs",
        False,
    )
    assert bench.reference_env("off", None, "inductor") == {"ACCELERATE_DYNAMO_BACKEND": "no"}
    assert "ACCELERATE_DYNAMO_MODE" not in bench.reference_env("full", "max-autotune", "eager")


def test_reference_flags_are_checked_against_the_scripts_own_parser(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent("""
        import argparse
        parser = argparse.ArgumentParser()
        parser.add_argument("--rank", type=int)
        parser.add_argument("--center_crop", action="store_true")
    """)
    )
    assert bundle.unknown_flags(script, ["--rank=4", "--center_crop"]) == []
    assert bundle.unknown_flags(script, ["--rank=4", "--centre_crop", "--seed=0"]) == ["--centre_crop", "--seed"]


@pytest.mark.skipif(not (bundle.BUNDLE / "reference").is_dir(), reason="no .gpu_bundle/ (make gpu-bundle)")
def test_reference_argv_uses_only_flags_the_real_scripts_define() -> None:
    for scale in (bench.GPU, bench.DRY):
        for config in scale.configs.values():
            script = bundle.BUNDLE / "reference" / config.reference_script
            argv = bench.reference_argv(config, script, Path("m"), Path("d"), Path("o"), "bf16")
            assert bundle.unknown_flags(script, argv[1:]) == []


def test_plan_puts_the_comparisons_first_and_isolates_every_lever() -> None:
    runs = bench.plan(bench.GPU)
    bench.check_plan(runs, bench.GPU)
    bench.check_plan(bench.plan(bench.DRY), bench.DRY)
    ids = [r.id for r in runs]
    # Every transformer family's comparison (FLUX.1's 24 GB run with it), then SD1.5's and SDXL's.
    first = ["flux1/ours", "flux1/ours+int8", "flux1/reference"]  # ours' two share a process
    for name in ("sd3-medium", "flux2-klein", "z-image", "qwen-image"):
        first += [f"{name}/ours", f"{name}/reference"]
    first += ["sd15/ours", "sd15/ours+all", "sd15/reference", "sdxl/ours", "sdxl/ours+all", "sdxl/reference"]
    assert ids[: len(first)] == first
    assert ids[-4:] == [
        "sd3-large/ours",
        "sd3-large/reference",
        "sd3-large/ours+int8",
        "sd3-large/ours-gradient_checkpointing",
    ]
    # Each transformer family: our run against its reference, and each TrainingParams lever alone.
    for name in bench.TRANSFORMERS:
        family_levers = {r.lever for r in runs if r.config == name and r.lever}
        assert {"gradient_checkpointing"} <= family_levers and any(
            lever.startswith("quantize_base=") for lever in family_levers
        )
        assert all(r.baseline == f"{name}/ours" for r in runs if r.config == name and r.lever)
    assert {r.lever for r in runs if r.config == "flux1"} >= {
        "quantize_base=int8",
        "quantize_base=float8",
        "quantize_base=nf4",
    }
    assert {r.config for r in runs if r.lever == "mixed_precision bf16"} == {"sd3-medium", "flux2-klein"}
    levers = {r.lever for r in runs if r.lever}
    assert {
        "log_every",
        "device_cache",
        "static_shapes",
        "compile (regional)",
        "fuse_qkv",
        "tf32 off",
        "max_batch",
        "compile max-autotune-no-cudagraphs",
        "compile full vs regional",
    } <= levers
    assert {(r.config, r.compile != "off") for r in runs if r.side == "reference"} == {
        ("sd15", False),
        ("sd15", True),
        ("sdxl", False),
        ("sdxl", True),
    } | {(name, False) for name in bench.TRANSFORMERS}


def test_a_typo_in_the_plan_fails_before_anything_runs() -> None:
    bad = bench.plan(bench.GPU) + [bench.Run("sd15/typo", "sd15", "ours", {"fuse_qvk": True})]
    with pytest.raises(SystemExit, match="sd15/typo"):
        bench.check_plan(bad, bench.GPU)
    bad = bench.plan(bench.GPU) + [
        bench.Run("sd15/mode", "sd15", "ours", {"compile": "full", "compile_mode": "max-autotune-no-cudagrahps"})
    ]
    with pytest.raises(SystemExit, match="compile_mode"):
        bench.check_plan(bad, bench.GPU)


def test_a_spent_budget_skips_runs_and_still_writes_the_report(tmp_path: Path) -> None:
    code = bench.main(
        [
            "--dry-run",
            "--budget-s",
            "0",
            "--out",
            str(tmp_path),
            "--work-dir",
            str(tmp_path / "w"),
            "--reference-dir",
            str(tmp_path / "none"),
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert {row["status"] for row in report["runs"]} <= {"skipped", bench.NOT_AVAILABLE}
    assert any(row["error"] == "time budget spent" for row in report["runs"])
    assert (tmp_path / "gpu_bench.md").read_text().startswith("# GPU training benchmark")


def test_a_child_past_its_time_is_killed_and_its_finished_results_kept(tmp_path: Path) -> None:
    child = (
        'import sys, time; print(\'BENCH_RESULT {"id": "a", "status": "ok"}\', flush=True); '
        "print('starting b', file=sys.stderr, flush=True); time.sleep(60)"
    )
    started = time.monotonic()
    rows, status = bench.run_child([sys.executable, "-c", child], 1.5, tmp_path / "log", dict(os.environ))
    assert time.monotonic() - started < 20
    assert status == "timeout" and rows == [{"id": "a", "status": "ok"}]
    assert "starting b" in (tmp_path / "log").read_text()


def _row(run_id: str, side: str, rate: float, mem: float, batch: int = 4, **extra):
    return {
        "id": run_id,
        "config": run_id.split("/")[0],
        "side": side,
        "status": "ok",
        "steps_per_s": rate,
        "images_per_s": rate * batch,
        "peak_mem_mb": mem,
        "batch_size": batch,
        **extra,
    }


def test_comparisons_hold_ours_best_against_the_reference_and_the_goals() -> None:
    rows = {
        r["id"]: r
        for r in [
            _row("sd15/ours", "ours", 9.0, 9000),
            _row("sd15/ours+compile", "ours", 12.0, 8000, mfu=0.16),
            _row("sd15/ours+max_batch", "ours", 3.0, 60000, batch=32),
            _row("sd15/reference", "reference", 5.0, 10000),
            _row("sd15/reference+compile", "reference", 6.0, 9500),
            _row("sdxl/ours", "ours", 2.0, 30000, batch=2, mfu=0.2),
            _row("sdxl/reference", "reference", 1.2, 25000, batch=2),
        ]
    }
    by_config = {c["config"]: c for c in bench.comparisons(rows, bench.GPU)}
    sd15, sdxl = by_config["sd15"], by_config["sdxl"]
    assert sd15["ours_best"] == "sd15/ours+compile"  # the larger-batch run is compared on its own
    assert sd15["speedup"] == pytest.approx(2.4) and sd15["speedup_defaults"] == pytest.approx(1.8)
    assert sd15["speedup_vs_best_reference"] == pytest.approx(2.0) and sd15["memory_ratio"] == pytest.approx(0.8)
    assert sd15["meets_speed"] and sd15["meets_memory"] and sd15["meets_mfu"]
    assert not sdxl["meets_speed"] and not sdxl["meets_memory"] and not sdxl["meets_mfu"]
    assert "meets_peak_goal" not in sd15  # a goal only FLUX.1-dev has


def test_flux1_is_held_to_24_gb_by_its_lowest_peak_run() -> None:
    rows = {
        r["id"]: r
        for r in [
            _row("flux1/ours", "ours", 1.0, 40000, batch=1),
            _row("flux1/ours+int8", "ours", 0.8, 23 * 1024, batch=1),
            _row("flux1/reference", "reference", 0.5, 45000, batch=1),
        ]
    }
    flux1 = next(c for c in bench.comparisons(rows, bench.GPU) if c["config"] == "flux1")
    assert flux1["lowest_peak_run"] == "flux1/ours+int8" and flux1["meets_peak_goal"]
    assert flux1["ours_best"] == "flux1/ours" and flux1["speedup"] == pytest.approx(2.0)
    rows["flux1/ours+int8"]["peak_mem_mb"] = 25 * 1024
    flux1 = next(c for c in bench.comparisons(rows, bench.GPU) if c["config"] == "flux1")
    assert flux1["meets_peak_goal"] is False
    assert "not peak_goal" in bench.markdown(
        {
            "gpu": {},
            "mode": "gpu",
            "elapsed_s": 1,
            "budget_s": 450,
            "peak_tflops": 989,
            "runs": [],
            "comparisons": [flux1],
            "levers": [],
            "import_check": {"missing_on_device": []},
        }
    )


def test_lever_gain_is_with_over_without_whichever_run_has_it() -> None:
    runs = {
        r.id: r
        for r in [
            bench.Run("sd15/ours+all", "sd15", "ours"),
            bench.Run(
                "sd15/ours+all-device_cache",
                "sd15",
                "ours",
                lever="device_cache",
                baseline="sd15/ours+all",
                lever_on=False,
            ),
            bench.Run(
                "sd15/ours+max_batch",
                "sd15",
                "ours",
                lever="max_batch",
                baseline="sd15/ours+all",
                metric="images_per_s",
            ),
            bench.Run("sd15/ours+lost", "sd15", "ours", lever="tf32 on", baseline="sd15/ours+all"),
        ]
    }
    rows = {
        r["id"]: r
        for r in [
            _row("sd15/ours+all", "ours", 10.0, 8000),
            _row("sd15/ours+all-device_cache", "ours", 8.0, 8000),
            _row("sd15/ours+max_batch", "ours", 3.0, 40000, batch=32),
        ]
    }
    gains = {g["lever"]: g for g in bench.lever_gains(rows, runs)}
    assert gains["device_cache"]["gain"] == pytest.approx(1.25)
    assert gains["max_batch"]["gain"] == pytest.approx(96 / 40) and gains["max_batch"]["memory_ratio"] == 5
    assert "gain" not in gains["tf32 on"]  # its run has no result: no number invented
    runs["sd15/ours+int8"] = bench.Run(
        "sd15/ours+int8", "sd15", "ours", lever="quantize_base=int8", baseline="sd15/ours+all"
    )
    rows["sd15/ours+int8"] = {"id": "sd15/ours+int8", "status": bench.NOT_AVAILABLE, "error": "no field"}
    lacking = next(g for g in bench.lever_gains(rows, runs) if g["lever"] == "quantize_base=int8")
    assert lacking["not_available"] == "no field" and "gain" not in lacking


def test_import_check_names_what_the_gpu_machine_lacks() -> None:
    rows = [{"imports": {"distributions": ["torch", "diffusers", "pydantic", "boto3", "s3fs"], "orphans": []}}]
    assert bench.import_check(rows)["missing_on_device"] == ["s3fs"]


def test_environment_check_reports_unmet_requirements(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundle, "carried_wheels", lambda: {"diffusers": "0.42.1", "not-a-real-package": "1.0"})
    assert bench.environment_check() == ["not-a-real-package: not installed"]


# --------------------------------------------------------------------------- the bundle


def _diffusers_tree(root: Path, min_version: str = "0.40.0") -> Path:
    for name, relative in bundle.REFERENCE_SCRIPTS.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f'check_min_version("{min_version}")\n# {name}\n')
    return root


def test_reference_scripts_come_from_a_source_tree_or_a_local_git_mirror(tmp_path: Path) -> None:
    tree = _diffusers_tree(tmp_path / "diffusers")
    files = bundle.read_reference_sources(tree, None)
    assert set(files) == set(bundle.REFERENCE_SCRIPTS)

    git = ["git", "-C", str(tree), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "v"], check=True)
    subprocess.run(git + ["tag", "v0.40.0"], check=True)
    mirror = tmp_path / "mirror.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(tree), str(mirror)], check=True)
    assert bundle.read_reference_sources(mirror, "v0.40.0") == files
    with pytest.raises(SystemExit, match="has no examples/"):
        bundle.read_reference_sources(mirror, "v9.9.9")
    with pytest.raises(SystemExit, match="neither a diffusers source tree"):
        bundle.read_reference_sources(tmp_path / "empty", None)


def test_scripts_newer_than_the_carried_diffusers_are_refused(tmp_path: Path) -> None:
    files = bundle.read_reference_sources(_diffusers_tree(tmp_path, min_version="0.43.0.dev0"), None)
    with pytest.raises(SystemExit, match="needs diffusers >= 0.43.0.dev0"):
        bundle.check_reference_scripts(files, "0.42.1")
    bundle.check_reference_scripts(files, "0.43.0")


def test_bundle_writes_scripts_manifest_and_the_command_to_run(tmp_path: Path) -> None:
    target = tmp_path / ".gpu_bundle"
    (target / "wheels").mkdir(parents=True)
    _wheel(target / "wheels", "diffusers", ["torch>=2", "safetensors>=0.8"])
    manifest = bundle.build(target, _diffusers_tree(tmp_path / "src"), None, wheels=False)
    assert sorted(p.name for p in (target / "reference").iterdir()) == sorted(bundle.REFERENCE_SCRIPTS)
    assert manifest["wheels"] == ["diffusers-1.0-py3-none-any.whl"]
    assert json.loads((target / "manifest.json").read_text())["command"] == "bash benchmarks/gpu/run_on_gpu.sh"
    text = bundle.instructions(target)
    assert "bash benchmarks/gpu/run_on_gpu.sh" in text and 'carry=["' in text


def _fake_locked(versions: dict[str, str], payload: bytes = b"new") -> object:
    digest = f"sha256:{bundle.sha256(payload)}"
    return bundle.locks.Locked(versions, {n: (digest,) for n in versions}, {n: frozenset() for n in versions}, None)


def test_wheels_are_fetched_for_the_gpu_machines_python_one_version_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "wheels"
    dest.mkdir()
    (dest / "diffusers-0.41.0-py3-none-any.whl").write_bytes(b"old")  # another version: must go
    (dest / "dill-0.4.1-py3-none-any.whl").write_bytes(b"new")
    commands = []

    def fake_pip(command, check, env):
        assert env is bundle.QUIET_PIP and env["PIP_CONFIG_FILE"] == os.devnull
        commands.append(command)
        for pin in [item for item in command if "==" in item]:
            name, version = pin.split("==")
            (dest / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(b"new")

    carried = {"diffusers": "0.42.1", "dill": "0.4.1", "importlib-metadata": "10.2.0"}
    monkeypatch.setattr(bundle, "carried_wheels", lambda: carried)
    monkeypatch.setattr(bundle.locks, "read_lock", lambda name: _fake_locked(carried))
    monkeypatch.setattr(bundle.subprocess, "run", fake_pip)
    wheels = bundle.download_wheels(dest)
    (command,) = commands
    assert {"--no-deps", "--only-binary=:all:"} <= set(command)
    assert command[command.index("--python-version") + 1] == "3.12" and "manylinux_2_17_x86_64" in command
    assert "dill==0.4.1" not in command  # already there
    assert len(wheels) == len(carried)
    assert not (dest / "diffusers-0.41.0-py3-none-any.whl").exists()


def test_a_downloaded_wheel_whose_hash_the_lock_does_not_hold_is_refused_and_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "wheels"
    dest.mkdir()
    (dest / "diffusers-0.42.1-py3-none-any.whl").write_bytes(b"tampered")
    carried = {"diffusers": "0.42.1"}
    monkeypatch.setattr(bundle, "carried_wheels", lambda: carried)
    monkeypatch.setattr(bundle.locks, "read_lock", lambda name: _fake_locked(carried, b"the real one"))
    with pytest.raises(SystemExit, match="not among locks/gpu-bundle.txt's hashes for diffusers"):
        bundle.download_wheels(dest)
    assert not (dest / "diffusers-0.42.1-py3-none-any.whl").exists()


# A lock as uv writes it: transformers (on the GPU machine) needs kernels in this release,
# diffusers (carried) needs importlib-metadata, which needs zipp (on the machine) and lazy-importer.
LOCK_TEXT = """# input-sha256: abc
diffusers==0.42.1 \\
    --hash=sha256:{h}
    # via lora-pipeline (pyproject.toml)
importlib-metadata==10.2.0 \\
    --hash=sha256:{h}
    # via diffusers
kernels==0.19.1 \\
    --hash=sha256:{h}
    # via transformers
lazy-importer==0.1.0 \\
    --hash=sha256:{h}
    # via importlib-metadata
runpod==1.12.3 \\
    --hash=sha256:{h}
    # via lora-pipeline (pyproject.toml)
transformers==5.25.0 \\
    --hash=sha256:{h}
    # via
    #   lora-pipeline (pyproject.toml)
    #   peft
typing-extensions==4.16.0 \\
    --hash=sha256:{h}
    # via
    #   diffusers
    #   transformers
zipp==4.1.2 \\
    --hash=sha256:{h}
    # via importlib-metadata
""".format(h="0" * 64)


def test_the_carried_wheels_are_derived_from_the_lock_less_what_the_gpu_machine_has(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    locked = bundle.locks.parse_lock(LOCK_TEXT)
    assert locked.required_by["typing-extensions"] == {"diffusers", "transformers"}
    monkeypatch.setattr(bundle, "gpu_roots", lambda: ["diffusers", "transformers"])  # runpod: not a root
    carried = bundle.carried_wheels(locked)
    # kernels comes with the machine's own transformers; zipp is on the machine; typing-extensions
    # is on the machine but carried anyway (CARRY_ANYWAY); runpod is no root.
    assert carried == {
        "diffusers": "0.42.1",
        "importlib-metadata": "10.2.0",
        "lazy-importer": "0.1.0",
        "typing-extensions": "4.16.0",
    }
    # The dry run here imports this machine's transformers, which imports kernels: that is no
    # package the GPU run lacks (there, its own transformers decides), so the import check passes.
    monkeypatch.setattr(bundle, "carried_wheels", lambda: carried)
    available = bundle.available_on_device(locked)
    assert {"kernels", "zipp", "lazy-importer"} <= available and "runpod" not in available
    rows = [{"imports": {"distributions": ["transformers", "kernels", "diffusers", "runpod"], "orphans": []}}]
    monkeypatch.setattr(bundle.locks, "read_lock", lambda name: locked)
    assert bench.import_check(rows)["missing_on_device"] == ["runpod"]


def test_the_real_bundle_carries_diffusers_and_nothing_the_gpu_machine_has() -> None:
    carried = bundle.carried_wheels()
    assert carried["diffusers"] == bundle.locks.read_lock("cpu").versions["diffusers"]
    assert {"datasets", "pydantic", "pydantic-settings", "tenacity"} <= set(carried)
    assert not {"torch", "transformers", "peft", "runpod", "nvidia-cublas"} & set(carried)
    assert not (set(carried) & bundle.DEVICE_PACKAGES) - set(bundle.CARRY_ANYWAY)


def test_bundle_without_a_snapshot_says_where_the_scripts_come_from(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DIFFUSERS_SRC", raising=False)
    with pytest.raises(SystemExit, match="sdist on PyPI has no examples"):
        bundle.main([])


def test_the_gpu_command_installs_the_carried_wheels_and_runs_the_benchmark(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    fake_python = tmp_path / "python3"
    fake_python.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake_python.chmod(0o755)
    target = tmp_path / "bundle"
    (target / "wheels").mkdir(parents=True)
    (target / "wheels" / "diffusers-0.42.1-py3-none-any.whl").write_bytes(b"w")
    env = dict(
        os.environ,
        PYTHON=str(fake_python),
        GPU_BUNDLE=str(target),
        OUT=str(tmp_path / "out"),
        GPU_SITE=str(tmp_path / "site"),
    )
    script = str(GPU_DIR / "run_on_gpu.sh")

    missing = subprocess.run(["bash", script], env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "make gpu-bundle" in missing.stderr

    (target / "manifest.json").write_text("{}")
    done = subprocess.run(["bash", script, "--only", "sd15/ours"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    install, run = calls.read_text().splitlines()
    assert install.startswith("-m pip install") and "--no-index --no-deps" in install
    assert f"--target {tmp_path / 'site'} {target}/wheels/diffusers-0.42.1-py3-none-any.whl" in install
    assert run == (
        f"benchmarks/gpu/bench_gpu.py --out {tmp_path / 'out'} --reference-dir {target}/reference --only sd15/ours"
    )


def test_bundle_refuses_scripts_that_do_not_take_the_benchmarks_flags(tmp_path: Path) -> None:
    tree = _diffusers_tree(tmp_path / "src")  # scripts that define no options at all
    with pytest.raises(SystemExit, match="does not define"):
        bundle.main(["--diffusers-src", str(tree), "--bundle", str(tmp_path / "bundle"), "--no-wheels"])


def _wheel(folder: Path, name: str, requires: list[str]) -> Path:
    import zipfile

    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(
            f"{name}-1.0.dist-info/METADATA",
            "Name: {}\n".format(name) + "".join(f"Requires-Dist: {r}\n" for r in requires),
        )
    return path


def test_bundle_names_what_a_carried_wheel_needs_that_the_gpu_machine_lacks(tmp_path: Path) -> None:
    wheels = [
        _wheel(tmp_path, "fine", ["torch>=2", "pydantic", 'pywin32; sys_platform == "win32"', 'pytest; extra == "t"']),
        _wheel(tmp_path, "needy", ["lazy-thing>=0.1", 'old-backport; python_version < "3.10"']),
    ]
    assert bundle.unmet_requirements(wheels) == ["needy-1.0-py3-none-any.whl needs lazy-thing>=0.1"]


def test_bundle_names_a_carried_wheel_that_needs_another_version_of_a_machine_package(tmp_path: Path) -> None:
    hub = bundle.DEVICE_VERSIONS["huggingface-hub"]
    wheels = [
        _wheel(tmp_path, "picky", [f"huggingface-hub>{hub}", f"transformers>={bundle.DEVICE_VERSIONS['transformers']}"])
    ]
    assert bundle.unmet_requirements(wheels) == [
        f"picky-1.0-py3-none-any.whl needs huggingface-hub>{hub}, the machine has {hub}"
    ]


def test_the_torchvision_stand_in_does_what_the_transformer_scripts_call(monkeypatch: pytest.MonkeyPatch) -> None:
    # FLUX.2 klein, Z-Image and Qwen-Image call torchvision.transforms.functional as TF.resize …
    # (the stand-in serves where no torchvision build matches torch, as on this machine).
    from PIL import Image

    if importlib.util.find_spec("torchvision") is not None and "reference_shim" not in str(
        importlib.util.find_spec("torchvision").origin
    ):
        pytest.skip("a real torchvision is installed: the stand-in is not used")
    monkeypatch.syspath_prepend(str(REPO / "benchmarks" / "reference_shim"))
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    image = Image.new("RGB", (40, 30), (255, 0, 0))
    image.putpixel((0, 0), (0, 0, 255))
    resized = TF.resize(image, [20, 16], interpolation=InterpolationMode.BILINEAR)
    assert resized.size == (16, 20)  # [height, width], as torchvision
    assert TF.center_crop(resized, 8).size == (8, 8)
    assert TF.hflip(image).getpixel((39, 0)) == (0, 0, 255)
    assert TF.crop(image, 0, 0, 2, 3).size == (3, 2)
    tensor = TF.normalize(TF.to_tensor(image), [0.5], [0.5])
    assert tuple(tensor.shape) == (3, 30, 40) and float(tensor.min()) == -1.0 and float(tensor.max()) == 1.0
