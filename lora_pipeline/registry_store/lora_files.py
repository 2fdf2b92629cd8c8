"""LoRA files' safetensors headers, read from the store with ranged reads or from a local file.

A file counts as a LoRA only if its header parses (DESIGN.md): a truncated upload
or a stray text file must never make a version completed. The header is at the
front (8-byte little-endian length, then JSON), so one ranged read of the first
64 KiB answers for almost every LoRA; a larger header takes one more ranged read.
The parsing itself is ``lora_pipeline.registry.safetensors_header`` (pure).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from lora_pipeline.registry.safetensors_header import InvalidLoraFile, SafetensorsHeader, complete_header, header_length
from lora_pipeline.storage.base import ObjectNotFound, ObjectStore

FIRST_READ_BYTES = 64 * 1024


def read_header(store: ObjectStore, key: str, *, size: int | None = None) -> SafetensorsHeader:
    """Read and validate ``key``'s header with ranged reads, never the whole file.

    ``size`` (from a listing) saves a HEAD request; the file's size must match
    what the header promises, so a truncated upload is refused.
    """
    try:
        prefix = store.get_range(key, 0, FIRST_READ_BYTES)
        length = header_length(prefix)
        if len(prefix) < 8 + length and len(prefix) == FIRST_READ_BYTES:
            prefix += store.get_range(key, len(prefix), 8 + length - len(prefix))
        if size is None:
            info = store.head(key)
            if info is None:
                raise ObjectNotFound(key)
            size = info.size
        return complete_header(prefix, length, size)
    except InvalidLoraFile as exc:
        raise InvalidLoraFile(f"{key}: not a valid safetensors LoRA: {exc}") from None
    except ObjectNotFound:
        raise InvalidLoraFile(f"{key}: no such file in the store") from None


def verify_local_file(path: Path) -> tuple[SafetensorsHeader, str, str]:
    """Validate a local safetensors file as ``read_header`` validates a stored one, and hash it:
    (header, SHA-256 of the tensor data, SHA-256 of the whole file). Raises InvalidLoraFile.

    The tensor-data digest is what a header declares (``lora_pipeline.tensors_sha256``,
    sd-scripts' ``sshs_model_hash``) and the registry records: a header cannot hold a digest
    of itself, so it covers the bytes after it. The whole-file one is what ``sha256sum`` prints.
    """
    tensors, whole = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = header_length(prefix)
        data = prefix + handle.read(length)
        header = complete_header(data, length, path.stat().st_size)
        whole.update(data)
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            tensors.update(chunk)
            whole.update(chunk)
    return header, tensors.hexdigest(), whole.hexdigest()


def is_readable_lora(store: ObjectStore, key: str) -> bool:
    """Whether ``key`` is a complete safetensors file (for the "completed without a readable
    file" asset check: ``completed_without_readable_file(doc, partial(is_readable_lora, store))``)."""
    try:
        read_header(store, key)
    except InvalidLoraFile:
        return False
    return True
