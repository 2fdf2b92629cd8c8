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
        header[f"unet.block.{i}.lora_A.weight"] = {
            "dtype": "F32",
            "shape": [2, 2],
            "data_offsets": [16 * i, 16 * (i + 1)],
        }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(16 * tensors)


def truncated_lora_bytes() -> bytes:
    """A file whose upload stopped half way through the tensor data."""
    data = lora_bytes()
    return data[: len(data) - 10]


def pair_bytes(layout: str, metadata: dict[str, str] | None = None, *, seed: int = 0, checksum: bool = True) -> bytes:
    """A small LoRA file in ``layout`` (``kohya``: sd-scripts names, or ``diffusers``) whose header
    declares the SHA-256 of its tensor data (``lora_pipeline.tensors_sha256``) unless ``checksum``
    is false. ``seed`` varies the tensor bytes."""
    import hashlib

    module = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    if layout == "kohya":
        names = [
            f"lora_unet_{module}.alpha",
            f"lora_unet_{module}.lora_down.weight",
            f"lora_unet_{module}.lora_up.weight",
        ]
    else:
        path = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
        names = [f"{path}.lora.down.weight", f"{path}.lora.up.weight"]
    data = b"".join(struct.pack("<4f", seed + i, 1, 2, 3) for i in range(len(names)))
    meta = {"lora_pipeline.layout": layout, **(metadata or {})}
    if checksum:
        meta["lora_pipeline.tensors_sha256"] = hashlib.sha256(data).hexdigest()
    header: dict = {"__metadata__": meta}
    for i, name in enumerate(names):
        header[name] = {"dtype": "F32", "shape": [2, 2], "data_offsets": [16 * i, 16 * (i + 1)]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data
