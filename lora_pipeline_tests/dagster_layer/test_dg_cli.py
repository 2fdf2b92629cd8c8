"""The `dg` CLI on this checkout, as a user with the project's venv runs it (docs/dg.md).

Each call is a real `dg` process reading [tool.dg] in pyproject.toml: what `make dev` and
`make test` run. The slow ones launch the README's walk-through headless and start `dg dev`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lora_pipeline_tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
DG = str(VENV_BIN / "dg")


def dg_env(**extra: str) -> dict[str, str]:
    """The environment of an activated venv (what the Makefile's $(DG) sets), plus ``extra``."""
    return {
        **os.environ,
        "VIRTUAL_ENV": str(VENV_BIN.parent),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        **extra,
    }


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


@pytest.mark.slow
def test_dg_dev_serves_the_code_location(tmp_path: Path):
    """`dg dev` (what `make dev` runs) starts the webserver on the project's code location."""
    port = free_port()
    log = (tmp_path / "dg_dev.log").open("wb")
    proc = subprocess.Popen(
        [DG, "dev", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO,
        env=dg_env(DAGSTER_HOME=str(tmp_path), LORA_STORAGE_URL=str(tmp_path / "store")),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # webserver, daemon and code server go with its process group
    )
    url = f"http://127.0.0.1:{port}"
    query = "{ workspaceOrError { ... on Workspace { locationEntries { name locationOrLoadError { __typename } } } } }"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "dg_dev.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/server_info", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "dg dev's webserver did not answer within 180 s"
            time.sleep(0.5)
        entries = httpx.post(f"{url}/graphql", json={"query": query}, timeout=60).json()["data"]
        [entry] = entries["workspaceOrError"]["locationEntries"]
        assert entry["name"] == "lora_pipeline"
        assert entry["locationOrLoadError"]["__typename"] == "RepositoryLocation"
    finally:
        for sig, grace_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=grace_s)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()
