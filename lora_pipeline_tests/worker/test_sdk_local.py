"""The handler under the real runpod SDK's local test mode, as RunPod's worker convention runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lora_pipeline.worker.handler as handler_module
from lora_pipeline.contracts.training import TrainingRequest
from lora_pipeline.dataset.ingest import SAMPLE_TRIGGER_WORD, IngestOptions, ingest_dataset, sample_dataset_path
from lora_pipeline.storage.keys import lora_key
from lora_pipeline_tests.worker.conftest import request_dict

WORKER_DIR = Path(handler_module.__file__).resolve().parent
REPO_ROOT = WORKER_DIR.parents[1]
TEST_INPUT = WORKER_DIR / "test_input.json"


def _run_handler_py(args: list[str], env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "LORA_STORAGE"))}
    env.update(env_extra)
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run(
        [sys.executable, "handler.py", *args],
        cwd=WORKER_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_test_input_names_the_bundled_sample_dataset(store) -> None:
    """test_input.json carries the sample's hash; it must match what ingest computes today."""
    request = TrainingRequest.model_validate(json.loads(TEST_INPUT.read_text())["input"])
    report = ingest_dataset(
        store, request.style, sample_dataset_path(), options=IngestOptions(trigger_word=SAMPLE_TRIGGER_WORD)
    )
    assert request.dataset_hash == report.dataset_hash
    assert request.base_model == "tiny" and request.storage_url is None


@pytest.mark.slow
def test_sdk_local_mode_runs_a_job_given_on_the_command_line(store, sample_dataset: str) -> None:
    job = {"input": request_dict(store, sample_dataset, params={"max_train_steps": 3}, storage_url=None)}
    done = _run_handler_py(
        ["--test_input", json.dumps(job)],
        {"LORA_STORAGE_URL": str(store.root), "LORA_PIPELINE_CACHE": os.environ["LORA_PIPELINE_CACHE"]},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "completed successfully" in done.stdout + done.stderr
    assert store.head(lora_key("geo", 1)) is not None


@pytest.mark.slow
def test_sdk_local_mode_fails_the_run_for_a_bad_request(store, sample_dataset: str) -> None:
    job = {"input": request_dict(store, sample_dataset, params={"rank": 0})}
    done = _run_handler_py(["--test_input", json.dumps(job)], {})
    assert done.returncode == 1
    assert "params.rank" in done.stdout + done.stderr


@pytest.mark.slow
def test_python_handler_py_runs_test_input_json_on_a_fresh_checkout(tmp_path: Path) -> None:
    """No store configured: the bundled sample is ingested into a temporary one and trained on."""
    done = _run_handler_py([], {"LORA_PIPELINE_CACHE": os.environ["LORA_PIPELINE_CACHE"], "TMPDIR": str(tmp_path)})
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "completed successfully" in output
    assert "loras/sample_style/sample_style_v1.safetensors" in output
