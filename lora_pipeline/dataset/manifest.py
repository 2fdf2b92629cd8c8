"""The dataset manifest: what a dataset version holds, shared by ingest and the worker.

Stored at ``datasets/<style>/<hash>/manifest.json``; image files sit beside it at
``datasets/<style>/<hash>/<entry.file>``, byte-for-byte as ingested (EXIF
orientation and RGB conversion are applied when images are decoded, so the
stored bytes keep their content hash).
"""

from __future__ import annotations

import hashlib

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_SCHEMA_VERSION = 1


class ImageEntry(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    file: str = Field(description="Path relative to the dataset prefix, e.g. 'images/<sha256>.png'.")
    sha256: str
    width: int
    height: int
    size: int
    caption: str
    source: str = Field(description="The file's name in the source the user gave.")
    caption_source: str = Field(
        "sidecar",
        alias="captionSource",
        description="Where the caption came from: sidecar | metadata.jsonl | captions.csv | trigger_word.",
    )
    note: str | None = Field(None, description="Something worth knowing, e.g. a caption read as cp1252.")


class RejectedFile(BaseModel):
    source: str
    reason: str


class DatasetManifest(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    schema_version: int = Field(MANIFEST_SCHEMA_VERSION, alias="schemaVersion")
    style: str
    dataset_hash: str = Field(alias="datasetHash")
    created_at: str = Field(alias="createdAt")
    trigger_word: str | None = Field(None, alias="triggerWord")
    images: list[ImageEntry]
    rejected: list[RejectedFile] = Field(default_factory=list)
    source: str | None = Field(None, description="The source the version was ingested from.")

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True, indent=2).encode()


def dataset_hash(entries: list[ImageEntry]) -> str:
    """The dataset version: a hash over the accepted images' content and captions.

    Independent of file names and order, so the same data always gives the same
    version and re-ingesting it uploads nothing and triggers no training.
    """
    digest = hashlib.sha256()
    for sha, caption in sorted((e.sha256, e.caption) for e in entries):
        digest.update(sha.encode())
        digest.update(b"\0")
        digest.update(caption.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()
