"""A LoRA file's safetensors header, parsed from bytes given to it (no I/O here).

A file counts as a LoRA only if its header parses (DESIGN.md): a truncated upload
or a stray text file must never make a version completed. The header is at the
front (8-byte little-endian length, then JSON), so one ranged read of the first
64 KiB answers for almost every LoRA; a larger header takes one more ranged read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from lora_pipeline.registry.layouts import layout_of, tensors_checksum

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit

_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


class InvalidLoraFile(ValueError):
    """The object is not a readable safetensors file; the message names the key and why."""


@dataclass(frozen=True)
class SafetensorsHeader:
    """What a header says: the tensors, the ``__metadata__`` strings and the expected size."""

    header_size: int
    tensors: dict[str, dict[str, Any]]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_size(self) -> int:
        return max((t["data_offsets"][1] for t in self.tensors.values()), default=0)

    @property
    def file_size(self) -> int:
        """The size a complete file with this header has."""
        return 8 + self.header_size + self.data_size

    @property
    def layout(self) -> str:
        """``kohya``, ``diffusers`` or ``unknown``, from the tensor names (registry.layouts)."""
        return layout_of(self.tensors)

    @property
    def checksum(self) -> str | None:
        """The SHA-256 of the tensor data the header declares (ours, or sd-scripts' model hash)."""
        return tensors_checksum(self.metadata)


def header_length(prefix: bytes) -> int:
    """The header length in the first 8 bytes; raises InvalidLoraFile if implausible."""
    if len(prefix) < 8:
        raise InvalidLoraFile(f"file is {len(prefix)} bytes, shorter than the 8-byte header length")
    length = int.from_bytes(prefix[:8], "little")  # the format's unsigned little-endian u64
    if length < 2 or length > MAX_HEADER_BYTES:
        raise InvalidLoraFile(f"header length {length} is outside 2..{MAX_HEADER_BYTES} bytes")
    return length


def parse_header(data: bytes) -> dict[str, Any]:
    """The decoded header of a file starting with ``data`` (length prefix + JSON).

    Validates the structure the way the safetensors loader does (dtypes, shapes,
    contiguous data offsets) so a file accepted here also loads.
    """
    length = header_length(data)
    raw = data[8 : 8 + length]
    if len(raw) < length:
        raise InvalidLoraFile(f"header is truncated: {len(raw)} of {length} bytes present")
    try:
        header = json.loads(raw.decode("utf-8").rstrip(" "))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidLoraFile(f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidLoraFile(f"header must be a JSON object, got {type(header).__name__}")
    _validate(header)
    return header


def _validate(header: dict[str, Any]) -> None:
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InvalidLoraFile("__metadata__ must map strings to strings")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise InvalidLoraFile(f"tensor {name!r}: entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _DTYPE_BYTES:
            raise InvalidLoraFile(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise InvalidLoraFile(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise InvalidLoraFile(f"tensor {name!r}: data_offsets {offsets!r} are invalid")
        if offsets[1] - offsets[0] != math.prod(shape) * _DTYPE_BYTES[dtype]:
            raise InvalidLoraFile(f"tensor {name!r}: data_offsets do not match dtype × shape")
        spans.append((offsets[0], offsets[1]))
    if not spans:
        raise InvalidLoraFile("the file holds no tensors")
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise InvalidLoraFile("tensor data is not contiguous (gap or overlap in data_offsets)")
        position = end


def complete_header(data: bytes, length: int, size: int) -> SafetensorsHeader:
    """The header at the front of ``data`` of a file of ``size`` bytes; InvalidLoraFile unless
    the header parses and describes exactly that many bytes."""
    header = parse_header(data)
    parsed = SafetensorsHeader(
        header_size=length,
        tensors={k: v for k, v in header.items() if k != "__metadata__"},
        metadata=dict(header.get("__metadata__", {})),
    )
    if size != parsed.file_size:
        raise InvalidLoraFile(f"file is {size} bytes but its header describes {parsed.file_size} (truncated upload?)")
    return parsed
