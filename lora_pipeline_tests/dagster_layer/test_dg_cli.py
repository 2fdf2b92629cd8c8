"""The `dg` CLI on this checkout, as a user with the project's venv runs it (docs/dg.md).

Each call is a real `dg` process reading [tool.dg] in pyproject.toml: what `make dev` and
`make test` run. The slow ones launch the README's walk-through headless and start `dg dev`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from lora_pipeline_tests.dagster_layer.conftest import dg_dev, dg_env, dg_project

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
DG = str(VENV_BIN / "dg")


def run_dg(*args: str, cwd: Path = REPO, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DG, *args], cwd=cwd, env=dg_env(**env), capture_output=True, text=True, timeout=timeout, check=False
    )


def test_dg_list_defs_shows_the_pipeline():
    """`dg list defs` loads the code location from [tool.dg]: the three assets, jobs, sensors, schedules."""
    result = run_dg("list", "defs", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    listed = json.loads(result.stdout)
    assert {a["asset_key"] for a in listed["assets"]} == {"training_dataset", "trained_lora", "lora_registry"}
    assert {"train_lora", "complete_training", "reconcile_registry"} <= {j["name"] for j in listed["jobs"]}
    assert {"style_discovery_sensor", "new_dataset_version_sensor"} <= {s["name"] for s in listed["sensors"]}
    assert {r["name"] for r in listed["resources"]} >= {"storage", "training_backend"}


def test_dg_check_defs_fails_with_the_load_error():
    """A code location that does not load fails `dg check defs` (so `make test`) with the error itself:
    here a bad setting, whose one line names the variable."""
    result = run_dg("check", "defs", LORA_RECONCILE_CRON="every hour")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Validation failed for code location lora_pipeline" in output
    assert "LORA_RECONCILE_CRON='every hour': expected a cron expression" in output


def test_dg_scaffold_writes_a_declaration_that_dg_check_yaml_passes(tmp_path: Path):
    """`dg scaffold defs lora_pipeline.LoraTraining watercolor` in a project writes its defs.yaml
    (the style named after the folder), and `dg check yaml` accepts it as written."""
    module = dg_project(tmp_path, {})
    scaffolded = run_dg("scaffold", "defs", "lora_pipeline.LoraTraining", "watercolor", cwd=tmp_path)
    assert scaffolded.returncode == 0, scaffolded.stderr[-3000:]
    written = yaml.safe_load((tmp_path / module / "defs" / "watercolor" / "defs.yaml").read_text())
    assert written == {
        "type": "lora_pipeline.LoraTraining",
        "attributes": {"style": "watercolor", "params": {}, "automation": "manual"},
    }
    checked = run_dg("check", "yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout[-3000:]
    assert "All component YAML validated successfully." in checked.stdout


def test_dg_scaffold_refuses_a_folder_name_that_is_no_style(tmp_path: Path):
    module = dg_project(tmp_path, {})
    result = run_dg("scaffold", "defs", "lora_pipeline.LoraTraining", "water colour", cwd=tmp_path)
    assert result.returncode != 0
    assert "invalid style name 'water colour'" in result.stdout + result.stderr
    assert not (tmp_path / module / "defs" / "water colour").exists()


def test_dg_check_yaml_reports_each_bad_value_at_its_line(tmp_path: Path):
    """Every mistake in a declaration, each with its file, line and field, before anything loads."""
    declaration = (
        "type: lora_pipeline.LoraTraining\n"  # 1
        "attributes:\n"  # 2
        "  style: ink/v2\n"  # 3
        "  automation: always\n"  # 4
        "  schedule: every night\n"  # 5
        "  params:\n"  # 6
        "    rank: 0\n"  # 7
        "    lr_scheduler: cosine_restarts\n"  # 8
        "    ranks: 4\n"  # 9
    )
    module = dg_project(tmp_path, {"ink": declaration})
    result = run_dg("check", "yaml", cwd=tmp_path)
    assert result.returncode != 0
    path = tmp_path / module / "defs" / "ink" / "defs.yaml"
    found = {
        line.split(" - ", 1)[0].rsplit(":", 1)[1]: line
        for line in result.stdout.splitlines()
        if line.startswith(f"{path}:")
    }
    assert "attributes.style 'ink/v2' does not match" in found["3"]
    assert "attributes.automation 'always' is not one of ['on_new_dataset_version', 'manual']" in found["4"]
    assert "attributes.schedule 'every night' does not match" in found["5"]
    assert "attributes.params.rank 0 is less than the minimum of 1" in found["7"]
    assert "attributes.params.lr_scheduler 'cosine_restarts' is not one of" in found["8"]
    assert "('ranks' was unexpected)" in found["9"]


@pytest.mark.slow
def test_dg_launch_runs_the_walkthrough_headless(tmp_path: Path):
    """`dg launch --assets training_dataset,trained_lora,lora_registry --partition sample_style` on
    an instance that knows the partition trains the sample and records V1 in the registry."""
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "DAGSTER_HOME": str(home),
        "LORA_STORAGE_URL": str(tmp_path / "store"),
        "LORA_LOCAL_JOBS_DIR": str(tmp_path / "jobs"),
    }
    # A fresh instance knows no partition yet: `deploy init` adds the sample and the declared
    # styles (what style_discovery_sensor does at `make dev`'s first tick).
    synced = subprocess.run(
        [str(VENV_BIN / "lora-pipeline"), "deploy", "init"],
        env=dg_env(**env),
        capture_output=True,
        text=True,
        check=False,
    )
    assert synced.returncode == 0, synced.stderr
    assert "sample_style" in synced.stdout, synced.stdout
    # In one process: the default executor's process per step loads the code location each time
    # (minutes on 2 cores; the command without --config-json is what docs/dg.md shows).
    result = run_dg(
        "launch",
        "--assets",
        "training_dataset,trained_lora,lora_registry",
        "--partition",
        "sample_style",
        "--config-json",
        json.dumps({"execution": {"config": {"in_process": {}}}}),
        timeout=900,
        **env,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    document = json.loads((tmp_path / "store" / "registry" / "sample_style" / "training_versions.json").read_text())
    assert [(v["name"], v["status"]) for v in document["versions"]] == [("V1", "completed")]


@pytest.mark.slow
def test_dg_dev_serves_the_code_location(tmp_path: Path):
    """`dg dev` (what `make dev` runs) starts the webserver on the project's code location, without
    the notice `dagster dev` printed."""
    query = "{ workspaceOrError { ... on Workspace { locationEntries { name locationOrLoadError { __typename } } } } }"
    log = tmp_path / "dg_dev.log"
    with dg_dev(REPO, log, DAGSTER_HOME=str(tmp_path), LORA_STORAGE_URL=str(tmp_path / "store")) as url:
        entries = httpx.post(f"{url}/graphql", json={"query": query}, timeout=60).json()["data"]
    [entry] = entries["workspaceOrError"]["locationEntries"]
    assert entry["name"] == "lora_pipeline"
    assert entry["locationOrLoadError"]["__typename"] == "RepositoryLocation"
    assert "Use 'dg dev' instead" not in log.read_text()  # `dagster dev`'s notice
