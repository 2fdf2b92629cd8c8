"""The Definitions object: what it holds, and that loading it stays cheap."""

from __future__ import annotations

import subprocess
import sys

import dagster as dg


def test_definitions_hold_the_three_assets_in_order():
    from lora_pipeline.definitions import defs

    graph = defs.resolve_asset_graph()
    assert graph.get(dg.AssetKey("trained_lora")).parent_keys == {dg.AssetKey("training_dataset")}
    assert graph.get(dg.AssetKey("lora_registry")).parent_keys == {dg.AssetKey("trained_lora")}


def test_definitions_validate():
    """What `dagster definitions validate` checks: every object resolves."""
    from lora_pipeline.definitions import defs

    defs.resolve_all_job_defs()
    for name in ("train_lora", "reconcile_registry", "complete_training"):
        assert defs.resolve_job_def(name)
    assert defs.resolve_schedule_def("reconcile_registry_schedule").cron_schedule == "0 * * * *"
    for name in ("runpod_job_sensor", "runpod_webhook_sensor"):
        assert defs.resolve_sensor_def(name)


def test_importing_definitions_loads_no_gpu_library():
    """Dagster imports the code location often; torch & co. belong to the worker only."""
    code = (
        "import sys, lora_pipeline.definitions; "
        "print(','.join(m for m in ('torch', 'diffusers', 'peft', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_dagster_cli_validates_the_workspace(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-m", "lora_pipeline.definitions"],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "DAGSTER_HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
