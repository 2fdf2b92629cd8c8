"""The process the local backend starts for one job: RunPod's worker loop, for one job.

``python -m lora_pipeline.backends.local_runner --state-dir D --job-id J --store-url U``
loads the job file, calls the handler the way ``runpod.serverless`` does
(``handler({"id": …, "input": …})``), records the final status body in the job file
and then delivers that body to the store's webhook inbox, as RunPod's webhook
POST would. A handler that returns ``{"error": …}`` or raises ends FAILED.
The job's ``executionTimeout`` is enforced: past it the job ends TIMED_OUT.

It runs detached from the process that started it, so a restart of Dagster does
not kill a training run, and its state is all on disk.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_pipeline.backends.local_state import JobStateDir, status_body, utcnow_iso
from lora_pipeline.worker.progress import progress_sink

DEFAULT_HANDLER = "lora_pipeline.worker.handler:handler"
WEBHOOK_ATTEMPTS = 3  # RunPod: one delivery and up to 2 more
WEBHOOK_RETRY_DELAY_S = 10.0


def load_handler(spec: str) -> Callable[[dict[str, Any]], Any]:
    """``"package.module:function"`` → the function."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"handler must look like 'package.module:function', got {spec!r}")
    handler = getattr(importlib.import_module(module_name), attr)
    if not callable(handler):
        raise TypeError(f"handler {spec!r} is not callable")
    return handler


def outcome(result: Any) -> dict[str, Any]:
    """The final fields of a job from what its handler returned (runpod.serverless's rules)."""
    if isinstance(result, dict) and "error" in result:
        return {"status": "FAILED", "error": _error_text(result["error"])}
    return {"status": "COMPLETED", "output": result}


def record_progress(jobs: JobStateDir, job_id: str, update: dict[str, Any]) -> None:
    """A progress update becomes the running job's ``output``, as RunPod's ``/status`` shows it
    (``IN_PROGRESS`` with the update as ``output``); the final status replaces it."""
    json.dumps(update)  # what RunPod could not serialise is refused here, as progress_update would

    def change(state: dict[str, Any]) -> dict[str, Any] | None:
        if state["status"] != "IN_PROGRESS":
            return None
        state["output"] = update
        return state

    jobs.update(job_id, change)


def deliver_webhook(store_url: str, body: bytes, *, attempts: int, delay_s: float) -> str | None:
    """Write the status body to the inbox, retrying like RunPod retries a webhook."""
    from lora_pipeline.webhook.inbox import write_webhook

    last: Exception | None = None
    for attempt in range(attempts):
        try:
            return write_webhook(_open_store(store_url), body)
        except Exception as exc:  # noqa: BLE001 - a failed delivery is retried, then logged
            last = exc
            print(f"webhook delivery {attempt + 1}/{attempts} failed: {exc}", file=sys.stderr)
            if attempt + 1 < attempts:
                time.sleep(delay_s)
    print(f"webhook dropped after {attempts} attempts: {last}", file=sys.stderr)
    return None


def run_job(
    jobs: JobStateDir,
    job_id: str,
    store_url: str | None,
    *,
    webhook_attempts: int = WEBHOOK_ATTEMPTS,
    webhook_retry_delay_s: float = WEBHOOK_RETRY_DELAY_S,
) -> dict[str, Any]:
    """Run one queued job to its end; returns the final job state."""

    def start(state: dict[str, Any]) -> dict[str, Any] | None:
        if state["status"] != "IN_QUEUE":
            return None
        state.update(status="IN_PROGRESS", startedAt=utcnow_iso(), pid=os.getpid())
        return state

    state, started = jobs.update(job_id, start)
    if not started:
        return state  # cancelled while queued, or already run

    timeout_ms = (state.get("policy") or {}).get("executionTimeout")
    watchdog = None
    if timeout_ms:
        watchdog = threading.Timer(timeout_ms / 1000, _time_out, args=(jobs, job_id, timeout_ms))
        watchdog.daemon = True
        watchdog.start()

    try:
        handler = load_handler(state.get("handler") or DEFAULT_HANDLER)
        with progress_sink(lambda _job, update: record_progress(jobs, job_id, update)):
            fields = outcome(handler({"id": job_id, "input": state["input"]}))
        json.dumps(fields)  # an output RunPod could not serialise is a failure too
    except Exception as exc:  # noqa: BLE001 - the worker's failure becomes the job's error
        fields = {"status": "FAILED", "error": f"handler: {exc}\ntraceback: {traceback.format_exc()}"}
    if watchdog is not None:
        watchdog.cancel()

    state, finished = jobs.finish(job_id, **fields)
    if finished and store_url and state["status"] in ("COMPLETED", "FAILED"):
        body = json.dumps(status_body(state)).encode()
        deliver_webhook(store_url, body, attempts=webhook_attempts, delay_s=webhook_retry_delay_s)
    return state


def _time_out(jobs: JobStateDir, job_id: str, timeout_ms: int) -> None:
    _, timed_out = jobs.finish(job_id, status="TIMED_OUT", error=f"execution timeout of {timeout_ms} ms exceeded")
    if timed_out:
        os._exit(124)


def _error_text(error: Any) -> str:
    return error if isinstance(error, str) else json.dumps(error, sort_keys=True, default=str)


def _open_store(url: str):
    from lora_pipeline.storage.factory import open_store

    return open_store(url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--store-url", default=None)
    parser.add_argument("--webhook-attempts", type=int, default=WEBHOOK_ATTEMPTS)
    parser.add_argument("--webhook-retry-delay", type=float, default=WEBHOOK_RETRY_DELAY_S)
    args = parser.parse_args(argv)
    state = run_job(
        JobStateDir(args.state_dir),
        args.job_id,
        args.store_url,
        webhook_attempts=args.webhook_attempts,
        webhook_retry_delay_s=args.webhook_retry_delay,
    )
    print(f"job {args.job_id} ended {state['status']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
