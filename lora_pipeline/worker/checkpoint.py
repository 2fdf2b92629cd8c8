"""Training checkpoints in the object store, so a retried job resumes instead of restarting.

RunPod retries a failed or timed-out job as a new execution attempt (``-e2`` …) of
the same request, possibly on another machine: the only state that survives is in
the store. Checkpoints are therefore keyed by the request (style, version,
request id: ``storage.keys.checkpoint_prefix``), never by the job id or a local path.
"""

from __future__ import annotations

import io
import re
from typing import Any

from lora_pipeline.storage.base import ObjectNotFound, ObjectStore

_STEP_FILE = re.compile(r"step-([0-9]{9})\.pt\Z")


class StoreCheckpointer:
    """Saves ``torch.save`` blobs as ``step-<n>.pt``; keeps the newest ``keep``."""

    def __init__(self, store: ObjectStore, prefix: str, *, keep: int = 2) -> None:
        self.store = store
        self.prefix = prefix
        self.keep = keep

    def steps(self) -> list[int]:
        found = []
        for info in self.store.list(self.prefix):
            match = _STEP_FILE.search(info.key)
            if match and info.key.startswith(self.prefix):
                found.append(int(match.group(1)))
        return sorted(found)

    def key(self, step: int) -> str:
        return f"{self.prefix}step-{step:09d}.pt"

    def save(self, step: int, state: dict[str, Any]) -> None:
        import torch

        buffer = io.BytesIO()
        torch.save(state, buffer)
        self.store.put(self.key(step), buffer.getvalue(), content_type="application/octet-stream")
        for old in self.steps()[: -self.keep]:
            self.store.delete(self.key(old))

    def load_latest(self) -> dict[str, Any] | None:
        import torch

        for step in reversed(self.steps()):
            try:
                data = self.store.get(self.key(step)).data
                return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except ObjectNotFound:
                continue
            except Exception:  # noqa: BLE001 - an unreadable checkpoint is skipped, not fatal
                continue
        return None

    def clear(self) -> None:
        for step in self.steps():
            self.store.delete(self.key(step))
