"""Which dataset version is a style's current one, and reading stored versions.

A version is immutable once its manifest exists (``datasets/<style>/<hash>/
manifest.json`` is written last, after every image), so "is this version
stored?" is one HEAD. The current version is a small pointer document,
``datasets/<style>/current.json``, moved with a conditional write (If-Match on
the ETag it was read at, If-None-Match for the first one; storage.documents'
update loop) so two ingests racing on one style never lose an update.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, UTC
from typing import TypedDict

from lora_pipeline.dataset.manifest import DatasetManifest
from lora_pipeline.registry.names import InvalidStyleName, validate_style
from lora_pipeline.storage.base import ObjectNotFound, ObjectStore, StoredObject
from lora_pipeline.storage.documents import update_object
from lora_pipeline.storage.keys import DATASETS, dataset_manifest_key

CURRENT_FILE = "current.json"
HISTORY_LIMIT = 100


class DatasetNotFound(LookupError):
    """No stored dataset (or version) by that name; the message names it."""


def current_key(style: str) -> str:
    """``datasets/<style>/current.json``: the pointer to the style's current version."""
    return f"{DATASETS}/{validate_style(style)}/{CURRENT_FILE}"


@dataclass(frozen=True)
class VersionEntry:
    dataset_hash: str
    image_count: int
    at: str


@dataclass(frozen=True)
class CurrentPointer:
    """The pointer document: the current version and the ones before it (newest first)."""

    style: str
    dataset_hash: str
    image_count: int
    updated_at: str
    history: list[VersionEntry] = field(default_factory=list)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "style": self.style,
                "datasetHash": self.dataset_hash,
                "imageCount": self.image_count,
                "updatedAt": self.updated_at,
                "history": [
                    {"datasetHash": h.dataset_hash, "imageCount": h.image_count, "at": h.at} for h in self.history
                ],
            },
            indent=2,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> CurrentPointer:
        raw = json.loads(data)
        return cls(
            style=raw["style"],
            dataset_hash=raw["datasetHash"],
            image_count=int(raw.get("imageCount", 0)),
            updated_at=raw.get("updatedAt", ""),
            history=[
                VersionEntry(h["datasetHash"], int(h.get("imageCount", 0)), h.get("at", ""))
                for h in raw.get("history", [])
            ],
        )


def read_pointer(store: ObjectStore, style: str) -> tuple[CurrentPointer | None, str | None]:
    """The pointer and the ETag it was read at, or (None, None) for a style never ingested."""
    try:
        stored = store.get(current_key(style))
    except ObjectNotFound:
        return None, None
    return CurrentPointer.from_json(stored.data), stored.etag


class _Outcome(TypedDict, total=False):
    """What set_current's update decided on its last read."""

    previous: str | None
    changed: bool


def set_current(
    store: ObjectStore, manifest: DatasetManifest, *, now: datetime | None = None
) -> tuple[bool, str | None]:
    """Make ``manifest`` the style's current version; returns (changed, previous hash).

    Setting the version that is already current writes nothing, so re-ingesting
    the same data leaves the pointer, and everything keyed on it, alone.
    """
    outcome: _Outcome = {}

    def apply(current: StoredObject | None) -> bytes | None:
        pointer = CurrentPointer.from_json(current.data) if current is not None else None
        previous = pointer.dataset_hash if pointer else None
        outcome["previous"] = previous
        outcome["changed"] = previous != manifest.dataset_hash
        if previous == manifest.dataset_hash:
            return None
        at = (now or datetime.now(UTC)).isoformat()
        entry = VersionEntry(manifest.dataset_hash, len(manifest.images), at)
        older = [h for h in (pointer.history if pointer else []) if h.dataset_hash != entry.dataset_hash]
        return CurrentPointer(
            style=manifest.style,
            dataset_hash=manifest.dataset_hash,
            image_count=len(manifest.images),
            updated_at=at,
            history=([entry] + older)[:HISTORY_LIMIT],
        ).to_json()

    update_object(store, current_key(manifest.style), apply, content_type="application/json")
    return bool(outcome["changed"]), outcome["previous"]


def read_manifest(store: ObjectStore, style: str, dataset_hash: str) -> DatasetManifest:
    """A stored version's manifest; raises DatasetNotFound naming style and hash."""
    try:
        stored = store.get(dataset_manifest_key(style, dataset_hash))
    except ObjectNotFound:
        raise DatasetNotFound(f"no dataset version {dataset_hash} for style {style!r} in {store.describe()}") from None
    return DatasetManifest.model_validate_json(stored.data)


def current_dataset(store: ObjectStore, style: str) -> DatasetManifest | None:
    """The style's current dataset version, or None if it was never ingested."""
    pointer, _ = read_pointer(store, style)
    if pointer is None:
        return None
    return read_manifest(store, style, pointer.dataset_hash)


def style_folders(store: ObjectStore, top: str = DATASETS) -> list[str]:
    """Valid style names with a folder under ``<top>/``, from a one-level listing.

    Nothing below the folders is read, so the cost grows with styles, not with
    the images and versions they hold. A folder is not proof of a current
    version (an ingest may have stopped before ``current.json``): see list_styles.
    """
    found = []
    for folder in store.list_prefixes(f"{top}/"):
        try:
            found.append(validate_style(folder[len(top) + 1 : -1]))
        except InvalidStyleName:
            continue
    return found


def list_styles(store: ObjectStore) -> list[str]:
    """Styles with a current dataset version (what the Dagster layer makes partitions of).

    One listing of style folders, then one HEAD of each ``current.json``: never
    a listing of the images.
    """
    return sorted(s for s in style_folders(store) if store.head(current_key(s)) is not None)


def discover_incoming(store: ObjectStore, prefix: str = "incoming/") -> list[str]:
    """Styles that have files dropped under ``<prefix><style>/`` (for the discovery sensor).

    Folder names that are not valid style ids are left out; ingesting them
    would be refused anyway (``dataset add`` names the problem).
    """
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    found: set[str] = set()
    for info in store.list(prefix):
        rest = info.key[len(prefix) :]
        if "/" not in rest:
            continue
        candidate = rest.split("/", 1)[0]
        try:
            found.add(validate_style(candidate))
        except InvalidStyleName:
            continue
    return sorted(found)
