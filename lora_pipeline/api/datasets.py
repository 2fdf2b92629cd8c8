"""A dataset version as one zip, streamed: what the old dashboard's "bulk download" was."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import PurePosixPath

from lora_pipeline.dataset.manifest import DatasetManifest
from lora_pipeline.dataset.versions import DatasetNotFound, current_dataset, read_manifest
from lora_pipeline.storage.base import ObjectStore
from lora_pipeline.storage.keys import dataset_prefix


class _Pipe:
    """A write-only, unseekable file: what zipfile writes into, drained between entries."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def drain(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


def dataset_zip_chunks(store: ObjectStore, style: str, dataset_hash: str | None) -> Iterator[bytes]:
    """The zip's bytes, one image at a time (memory holds one image, never the archive).

    Resolves the manifest first, so an unknown style or hash raises LookupError
    (DatasetNotFound) before any byte is sent. Entries: ``images/<the source's name>``
    with its caption beside it as ``.txt``, and ``manifest.json``; images are stored
    uncompressed (they are compressed already)."""
    manifest: DatasetManifest | None = (
        read_manifest(store, style, dataset_hash) if dataset_hash else current_dataset(store, style)
    )
    if manifest is None:
        raise DatasetNotFound(f"style {style!r} has no dataset")
    return _chunks(store, manifest)


def _chunks(store: ObjectStore, manifest: DatasetManifest) -> Iterator[bytes]:
    prefix = dataset_prefix(manifest.style, manifest.dataset_hash)
    pipe = _Pipe()
    with zipfile.ZipFile(pipe, "w", compression=zipfile.ZIP_STORED) as archive:
        used: set[str] = set()
        for entry in manifest.images:
            name = _unique(PurePosixPath(entry.source).name, used)
            archive.writestr(f"images/{name}", store.get(prefix + entry.file).data)
            archive.writestr(
                f"images/{PurePosixPath(name).stem}.txt", entry.caption.encode(), compress_type=zipfile.ZIP_DEFLATED
            )
            yield pipe.drain()
        archive.writestr("manifest.json", manifest.to_json(), compress_type=zipfile.ZIP_DEFLATED)
    yield pipe.drain()


def _unique(name: str, used: set[str]) -> str:
    """``name``, or ``<stem>-<n><suffix>`` when two sources in subfolders share a file name."""
    candidate, n = name, 1
    while PurePosixPath(candidate).stem.lower() in used:
        n += 1
        candidate = f"{PurePosixPath(name).stem}-{n}{PurePosixPath(name).suffix}"
    used.add(PurePosixPath(candidate).stem.lower())
    return candidate
