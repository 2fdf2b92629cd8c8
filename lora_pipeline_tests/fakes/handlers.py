"""Stub worker handlers, importable as ``lora_pipeline_tests.fakes.handlers:<name>``.

The local backend and the RunPod double run a handler given as "module:function";
these stand in for the real training worker where a test is about the plumbing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def succeed(job: dict[str, Any]) -> dict[str, Any]:
    """Return a TrainingResult-shaped output without training."""
    request = job["input"]
    return {
        "style": request["style"],
        "version": request["version"],
        "lora_key": f"loras/{request['style']}/{request['style']}_v{request['version'][1:]}.safetensors",
        "dataset_hash": request["dataset_hash"],
        "request_id": request.get("request_id"),
        "steps": request.get("params", {}).get("max_train_steps", 1),
        "final_loss": 0.125,
        "duration_s": 0.01,
    }


def return_error(job: dict[str, Any]) -> dict[str, Any]:
    """What a handler does when it catches its own failure: an ``error`` dict."""
    return {"error": "CUDA out of memory"}


def raise_error(job: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("boom in the handler")


def sleep_forever(job: dict[str, Any]) -> dict[str, Any]:
    """Block until killed; writes a marker first so a test knows it is running."""
    marker = os.environ.get("STUB_RUNNING_MARKER")
    if marker:
        Path(marker).write_text(job["id"])
    while True:
        time.sleep(0.1)


def die(job: dict[str, Any]) -> dict[str, Any]:
    """The process vanishes without reporting (OOM killer, node loss)."""
    os._exit(9)


def report_progress_then_wait(job: dict[str, Any]) -> dict[str, Any]:
    """Send one progress update the way the real worker does, then wait for ``STUB_RELEASE``
    (a file) to exist before finishing: a test reads the running job's status in between."""
    from lora_pipeline.worker.progress import send_progress

    send_progress(job, {"phase": "training", "step": 3, "total": 10, "loss": 0.25, "at": "2026-11-29T10:00:00+00:00"})
    release = Path(os.environ["STUB_RELEASE"])
    deadline = time.monotonic() + 60
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return succeed(job)
