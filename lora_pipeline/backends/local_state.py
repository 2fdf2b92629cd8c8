"""Job state of the local backend: one JSON file per job, updated under a file lock.

Both the backend (in the Dagster process) and the detached runner process write a
job's file: the runner moves it to IN_PROGRESS and then to its final status, the
backend cancels it or declares a vanished runner FAILED. Every update is a
read-modify-write under an exclusive ``flock`` with an atomic rename, so the two
never interleave, and a final status is never overwritten: whichever of "finished"
and "cancelled" gets the lock first wins, as on RunPod.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lora_pipeline.backends.base import JobNotFound
from lora_pipeline.contracts.job_status import TERMINAL_STATUSES
from lora_pipeline.webhook.inbox import validate_job_id

STATUS_BODY_KEYS = ("id", "status", "delayTime", "executionTime", "output", "error")


def utcnow_iso() -> str:
    return datetime.now(UTC).isoformat()


def millis_between(start_iso: str | None, end_iso: str | None) -> int | None:
    if not start_iso or not end_iso:
        return None
    delta = datetime.fromisoformat(end_iso) - datetime.fromisoformat(start_iso)
    return max(0, int(delta.total_seconds() * 1000))


def status_body(state: dict[str, Any]) -> dict[str, Any]:
    """The RunPod-shaped status body of a job state (what /status and the webhook carry)."""
    return {k: state[k] for k in STATUS_BODY_KEYS if state.get(k) is not None}


class JobStateDir:
    """``<state_dir>/<job_id>.json`` files plus their locks and the runners' logs."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        (self.root / "locks").mkdir(exist_ok=True)

    def path(self, job_id: str) -> Path:
        return self.root / f"{validate_job_id(job_id)}.json"

    def log_path(self, job_id: str) -> Path:
        return self.root / "logs" / f"{validate_job_id(job_id)}.log"

    def job_ids(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.json") if not p.name.startswith("."))

    def read(self, job_id: str) -> dict[str, Any]:
        try:
            return json.loads(self.path(job_id).read_text())
        except FileNotFoundError:
            raise JobNotFound(job_id, "no such job in the local backend") from None

    def create(self, state: dict[str, Any]) -> None:
        with self._locked(state["id"]):
            if self.path(state["id"]).exists():
                raise FileExistsError(f"local job {state['id']!r} already exists")
            self._write(state)

    def update(
        self, job_id: str, change: Callable[[dict[str, Any]], dict[str, Any] | None]
    ) -> tuple[dict[str, Any], bool]:
        """Apply ``change`` to the state under the lock; it returns the new state or None.

        Returns (state now on disk, whether it changed). A job in a final status is
        passed to ``change`` too, so callers decide; ``finish`` below refuses to
        overwrite one.
        """
        with self._locked(job_id):
            state = self.read(job_id)
            new = change(dict(state))
            if new is None or new == state:
                return state, False
            self._write(new)
            return new, True

    def finish(self, job_id: str, **fields: Any) -> tuple[dict[str, Any], bool]:
        """Move a job to a final status unless it already has one (its progress output dropped)."""

        def change(state: dict[str, Any]) -> dict[str, Any] | None:
            if state["status"] in TERMINAL_STATUSES:
                return None
            state.pop("output", None)  # the last progress update: a final status carries its own output
            state.update(fields)
            state.setdefault("completedAt", utcnow_iso())
            if state.get("startedAt") is None:
                state["startedAt"] = state["completedAt"]
            state["delayTime"] = millis_between(state.get("createdAt"), state.get("startedAt"))
            state["executionTime"] = millis_between(state.get("startedAt"), state["completedAt"])
            return state

        return self.update(job_id, change)

    @contextlib.contextmanager
    def _locked(self, job_id: str) -> Iterator[None]:
        lock_path = self.root / "locks" / f"{validate_job_id(job_id)}.lock"
        with open(lock_path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write(self, state: dict[str, Any]) -> None:
        target = self.path(state["id"])
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(state, handle, indent=2, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
