"""The local training backend: RunPod Serverless's contract, on this machine.

The embedded default when no RunPod endpoint is configured. It keeps RunPod's
interface and habits so the pipeline above cannot tell the difference: ids with a
suffix (``<uuid4>-u1``), the same statuses and status bodies, and on completion the
status body dropped into the store's webhook inbox exactly as RunPod's webhook
POST would deliver it. Each job runs the worker handler in a detached process
(``local_runner``), and all state is in files under ``state_dir``, so jobs survive a
restart of Dagster and their status is read from disk.

Unlike RunPod, results never expire here.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lora_pipeline.backends.base import ExecutionPolicy, JobNotFound
from lora_pipeline.backends.local_runner import DEFAULT_HANDLER, WEBHOOK_RETRY_DELAY_S
from lora_pipeline.backends.local_state import JobStateDir, status_body, utcnow_iso
from lora_pipeline.contracts.job_status import TERMINAL_STATUSES, JobStatus
from lora_pipeline.contracts.training import TrainingRequest
from lora_pipeline.registry.jobids import same_job
from lora_pipeline.storage.base import ObjectStore
from lora_pipeline.webhook.inbox import validate_job_id, write_webhook

log = logging.getLogger(__name__)


def _process_table() -> str:
    """Which process table a recorded pid belongs to: the host name and the pid namespace.

    A state directory can be shared (a volume mounted into several containers, a network
    disk): a pid recorded under another table names some unrelated process here, so it is
    never used to judge a job dead or to signal it.
    """
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}:{namespace}"


PROCESS_TABLE = _process_table()

NEVER_STARTED_AFTER_S = 120.0
TERMINATE_GRACE_S = 5.0


def new_job_id(suffix: str = "u1") -> str:
    """A RunPod-shaped id: a uuid4 and an attempt-like suffix."""
    return f"{uuid.uuid4()}-{suffix}"


class LocalBackend:
    """A TrainingBackend that runs the worker in detached local processes."""

    def __init__(
        self,
        store: ObjectStore,
        state_dir: Path,
        python: str = sys.executable,
        *,
        handler: str = DEFAULT_HANDLER,
        store_url: str | None = None,
        env: Mapping[str, str] | None = None,
        webhook_retry_delay_s: float = WEBHOOK_RETRY_DELAY_S,
    ) -> None:
        """``store_url`` is how the runner process reopens ``store`` (default:
        ``store.describe()``, which is a path or an ``s3://`` URL); ``handler`` is
        ``"module:function"`` (tests inject stubs); ``env`` is added to the runner's
        environment."""
        self.store = store
        self.jobs = JobStateDir(Path(state_dir))
        self.python = python
        self.handler = handler
        self.store_url = store_url or store.describe()
        self.env = dict(env or {})
        self.webhook_retry_delay_s = webhook_retry_delay_s
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    # -- TrainingBackend ----------------------------------------------------------

    def submit(
        self,
        request: TrainingRequest,
        *,
        webhook_url: str | None = None,
        policy: ExecutionPolicy,
    ) -> str:
        """Queue the job on disk and start its runner; returns the job id."""
        job_id = new_job_id()
        self.jobs.create(
            {
                "id": job_id,
                "status": "IN_QUEUE",
                "input": request.model_dump(mode="json"),
                "webhook": webhook_url,
                "policy": policy.to_api(),
                "handler": self.handler,
                "createdAt": utcnow_iso(),
            }
        )
        self._start_runner(job_id)
        return job_id

    def status(self, job_id: str) -> JobStatus:
        """The job's status body, from disk; a runner that died unreported ends FAILED."""
        state = self._state(job_id)
        if state["status"] not in TERMINAL_STATUSES:
            state = self._settle_vanished(state)
        return JobStatus.model_validate(status_body(state))

    def cancel(self, job_id: str) -> JobStatus:
        """Cancel a queued or running job and kill its runner; a finished job is left as is."""
        state = self._state(job_id)
        state, cancelled = self.jobs.finish(state["id"], status="CANCELLED")
        if cancelled:
            self._kill(state)
        return JobStatus.model_validate(status_body(state))

    # -- extras --------------------------------------------------------------------

    def job_ids(self) -> list[str]:
        """Every job this backend knows (newest runs are not ordered specially)."""
        return self.jobs.job_ids()

    def log_path(self, job_id: str) -> Path:
        """Where the runner of ``job_id`` writes its output (for debugging a failure)."""
        return self.jobs.log_path(self._state(job_id)["id"])

    def wait(self, job_id: str, timeout_s: float = 600.0, poll_s: float = 0.2) -> JobStatus:
        """Block until the job is final (tests, the demo CLI); raises TimeoutError."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status(job_id)
            if status.is_terminal:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"local job {job_id} still {status.status} after {timeout_s} s")
            time.sleep(poll_s)

    # -- internals -----------------------------------------------------------------

    def _state(self, job_id: str) -> dict[str, Any]:
        """Look a job up by the id as given, then by any id with the same base UUID."""
        try:
            validate_job_id(job_id)
        except ValueError:
            raise JobNotFound(job_id, "not a job id") from None
        try:
            return self.jobs.read(job_id)
        except JobNotFound:
            for known in self.jobs.job_ids():
                if same_job(known, job_id):
                    return self.jobs.read(known)
            raise

    def _start_runner(self, job_id: str) -> None:
        env = {**os.environ, **self.env, "LORA_STORAGE_URL": self.store_url}
        command = [
            self.python,
            "-m",
            "lora_pipeline.backends.local_runner",
            "--state-dir",
            str(self.jobs.root.resolve()),
            "--job-id",
            job_id,
            "--store-url",
            self.store_url,
            "--webhook-retry-delay",
            str(self.webhook_retry_delay_s),
        ]
        with open(self.jobs.log_path(job_id), "ab") as log:
            child = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # survives the parent; killable as a group
                close_fds=True,
            )
        self._children[job_id] = child

        def record_pid(state: dict[str, Any]) -> dict[str, Any]:
            state.setdefault("pid", child.pid)
            state.setdefault("host", PROCESS_TABLE)
            return state

        self.jobs.update(job_id, record_pid)

    def _alive(self, job_id: str, pid: int | None, host: str | None = None) -> bool:
        child = self._children.get(job_id)
        if child is not None:
            return child.poll() is None  # also reaps our own finished children
        if host is not None and host != PROCESS_TABLE:
            return True  # its pid means nothing here; its runner (or its timeout) ends it
        if pid is None:
            return False
        if Path("/proc/self").exists():
            try:  # the job id in the command line guards against pid reuse
                return job_id.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _settle_vanished(self, state: dict[str, Any]) -> dict[str, Any]:
        job_id, pid = state["id"], state.get("pid")
        if self._alive(job_id, pid, state.get("host")):
            return state
        if pid is None:
            created = datetime.fromisoformat(state["createdAt"])
            if (datetime.now(UTC) - created).total_seconds() < NEVER_STARTED_AFTER_S:
                return state  # being started right now
        reason = (
            "the local worker process exited without reporting a result"
            if pid is not None
            else "the local worker process was never started"
        )
        # Re-read under the lock: the runner may have finished since we looked.
        state, failed = self.jobs.finish(job_id, status="FAILED", error=f"{reason} (log: {self.jobs.log_path(job_id)})")
        if failed:
            # As RunPod would: a failed job's webhook. Best effort; polling is the backstop.
            try:
                write_webhook(self.store, json.dumps(status_body(state)).encode())
            except Exception as exc:  # noqa: BLE001
                log.warning("webhook file for failed local job %s not written: %s", job_id, exc)
        return state

    def _kill(self, state: dict[str, Any]) -> None:
        job_id, pid = state["id"], state.get("pid")
        if state.get("host", PROCESS_TABLE) != PROCESS_TABLE:
            return  # another machine's or container's pid: never signal it here
        if pid is None or not self._alive(job_id, pid):
            return
        for sig, grace in ((signal.SIGTERM, TERMINATE_GRACE_S), (signal.SIGKILL, 0.0)):
            try:
                os.killpg(pid, sig)
            except (ProcessLookupError, PermissionError):
                return
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if not self._alive(job_id, pid):
                    return
                time.sleep(0.05)
        child = self._children.get(job_id)
        if child is not None:
            child.wait(timeout=5)
