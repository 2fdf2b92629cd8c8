"""The code location loads in a real Dagster webserver, as a user's `make dev` would show it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]

QUERY = """
{
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        locationOrLoadError {
          __typename
          ... on PythonError { message }
          ... on RepositoryLocation {
            repositories {
              jobs { name }
              schedules { name }
              sensors { name }
              assetNodes { assetKey { path } dependencyKeys { path } }
            }
          }
        }
      }
    }
  }
}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def webserver(tmp_path_factory):
    home = tmp_path_factory.mktemp("dagster_home")
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "LORA_STORAGE_URL": str(home / "store")}
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("dagster-webserver")),
            "-w",
            "workspace.yaml",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"webserver exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{url}/server_info", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            pytest.fail("webserver did not answer within 120 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_code_location_loads_with_the_whole_pipeline(webserver):
    """The UI shows the asset graph, the jobs, the schedule and the sensors, with no load error."""
    answer = httpx.post(f"{webserver}/graphql", json={"query": QUERY}, timeout=60).json()
    entries = answer["data"]["workspaceOrError"]["locationEntries"]
    assert len(entries) == 1
    location = entries[0]["locationOrLoadError"]
    assert location["__typename"] == "RepositoryLocation", location.get("message")
    repo = location["repositories"][0]
    assets = {tuple(n["assetKey"]["path"]): n for n in repo["assetNodes"]}
    assert {("training_dataset",), ("trained_lora",), ("lora_registry",)} <= set(assets)
    assert [d["path"] for d in assets[("trained_lora",)]["dependencyKeys"]] == [["training_dataset"]]
    assert [d["path"] for d in assets[("lora_registry",)]["dependencyKeys"]] == [["trained_lora"]]
    assert {"train_lora", "reconcile_registry"} <= {j["name"] for j in repo["jobs"]}
    assert {s["name"] for s in repo["schedules"]} == {"reconcile_registry_schedule", "pipeline_health_schedule"}
    assert {"runpod_job_sensor", "runpod_webhook_sensor"} <= {s["name"] for s in repo["sensors"]}
