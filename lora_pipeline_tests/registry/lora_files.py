"""Small valid (and deliberately broken) safetensors files for registry tests."""

from __future__ import annotations

import json
import struct
from datetime import UTC, datetime, timedelta

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(minutes: float = 0) -> datetime:
    """A fixed instant plus ``minutes``: tests never depend on the wall clock."""
    return T0 + timedelta(minutes=minutes)


def lora_bytes(metadata: dict[str, str] | None = None, *, tensors: int = 2) -> bytes:
    """A complete safetensors file: ``tensors`` F32 [2, 2] LoRA tensors."""
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    for i in range(tensors):
        header[f"unet.block.{i}.lora_A.weight"] = {"dtype": "F32", "shape": [2, 2],
                                                   "data_offsets": [16 * i, 16 * (i + 1)]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(16 * tensors)


def truncated_lora_bytes() -> bytes:
    """A file whose upload stopped half way through the tensor data."""
    data = lora_bytes()
    return data[: len(data) - 10]
