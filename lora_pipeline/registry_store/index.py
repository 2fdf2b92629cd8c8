"""``registry/index.json``: derived from the documents, repairable.

Styles, latest version, unfinished jobs and a fingerprint of each style's known
files, so a webhook can be routed and a reconciliation can skip styles with nothing
new. Each summary records the ETag of the document it was derived from, so a stale
entry is found with one listing (``RegistryStore.fresh_index``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lora_pipeline.registry.jobids import base_job_id
from lora_pipeline.registry.models import UNFINISHED_STATUSES, LoraFile, RegistryDocument, RejectedFile
from lora_pipeline.settings import get_settings
from lora_pipeline.storage.base import StoredObject

INDEX_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class UnfinishedJob:
    """An unfinished version's job, as the index records it for routing and polling."""

    job_id: str
    version: str
    job_status: str | None
    created_at: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.job_id, "version": self.version, "jobStatus": self.job_status, "createdAt": self.created_at}


@dataclass(frozen=True)
class AliasPointer:
    """Where an alias points, with what an app needs to load it without reading the document:
    the version, the URL and key of the file in the primary layout (``loraUrl``/``s3Key``, as
    the document's record has them), every layout's file, and the move that set it."""

    version: str
    lora_url: str | None
    s3_key: str | None
    files: dict[str, dict[str, str | None]]  # layout → {"key", "url"}
    since: int | None = None  # ms of the move that set it
    by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "loraUrl": self.lora_url,
            "s3Key": self.s3_key,
            "files": {layout: dict(f) for layout, f in sorted(self.files.items())},
            "since": self.since,
            "by": self.by,
        }

    @classmethod
    def from_dict(cls, raw: Any) -> AliasPointer | None:
        if not isinstance(raw, Mapping) or not isinstance(raw.get("version"), str):
            return None
        files = _mapping(raw.get("files"))
        return cls(
            raw["version"],
            _text(raw.get("loraUrl")),
            _text(raw.get("s3Key")),
            {
                str(k): {"key": _text(v.get("key")), "url": _text(v.get("url"))}
                for k, v in files.items()
                if isinstance(v, Mapping)
            },
            raw.get("since") if isinstance(raw.get("since"), int) else None,
            str(raw["by"]) if raw.get("by") else None,
        )

    @classmethod
    def of(cls, doc: RegistryDocument, alias: str, name: str, primary: str | None) -> AliasPointer | None:
        version = doc.version(name)
        if version is None:
            return None
        record = version.to_dict(primary or get_settings().primary_format)
        last = next((e for e in reversed(doc.alias_history) if e.alias == alias), None)
        return cls(
            version.name,
            record.get("loraUrl"),
            record.get("s3Key"),
            {layout: {"key": f.key, "url": f.url} for layout, f in version.files().items()},
            last.at if last else None,
            last.by if last else None,
        )


@dataclass(frozen=True)
class StyleSummary:
    """A style's line in the index, derived from its document."""

    style: str
    revision: int
    latest_version: str | None
    statuses: dict[str, int]
    files_fingerprint: str
    unfinished: dict[str, UnfinishedJob]
    jobs: tuple[str, ...]  # every job base of the style
    # version → claim time (ms) of unfinished versions with a submit claim but no job id: a
    # POST whose answer was lost, or a submitter that stopped before sending. Reconciliation
    # attaches their jobs from start markers, and fails them after the maximum job age.
    submitting: dict[str, int] = field(default_factory=dict)
    etag: str | None = None  # the document's ETag this summary was derived from
    # alias (production, staging…) → where it points, with the file URLs (index key ``aliases``)
    aliases: dict[str, AliasPointer] = field(default_factory=dict)
    # The latest version's family and base model (``latestFamily``, ``latestBaseModel``); None in an
    # entry written before they were recorded, until the style's document changes.
    latest_family: str | None = None
    latest_base_model: str | None = None

    @classmethod
    def of(cls, doc: RegistryDocument, etag: str | None = None, primary: str | None = None) -> StyleSummary:
        """``primary``: the layout ``loraUrl`` names (default: the setting LORA_PRIMARY_FORMAT)."""
        statuses: dict[str, int] = {}
        for v in doc.versions:
            statuses[v.status.value] = statuses.get(v.status.value, 0) + 1
        unfinished = {
            base_job_id(v.id): UnfinishedJob(v.id, v.name, v.job_status, v.created_at)
            for v in doc.versions
            if v.id and v.status in UNFINISHED_STATUSES
        }
        latest = doc.versions[-1] if doc.versions else None
        return cls(
            style=doc.style,
            revision=doc.revision,
            latest_version=latest.name if latest else None,
            latest_family=latest.family.value if latest and latest.family else None,
            latest_base_model=latest.base_model.value if latest and latest.base_model else None,
            statuses=statuses,
            files_fingerprint=files_fingerprint(known_files(doc), primary),
            unfinished=unfinished,
            jobs=tuple(sorted({b for v in doc.versions for b in v.job_bases})),
            submitting={
                v.name: v.claim.at for v in doc.versions if v.claim and not v.id and v.status in UNFINISHED_STATUSES
            },
            etag=etag,
            aliases={
                alias: pointer
                for alias, name in doc.aliases.items()
                if (pointer := AliasPointer.of(doc, alias, name, primary)) is not None
            },
        )

    def to_dict(self) -> dict[str, Any]:
        out = {
            "revision": self.revision,
            "latestVersion": self.latest_version,
            "statuses": self.statuses,
            "filesFingerprint": self.files_fingerprint,
            "unfinished": {b: j.to_dict() for b, j in sorted(self.unfinished.items())},
            "jobs": list(self.jobs),
            "etag": self.etag,
        }
        if self.submitting:
            out["submitting"] = dict(sorted(self.submitting.items()))
        if self.aliases:
            out["aliases"] = {a: p.to_dict() for a, p in sorted(self.aliases.items())}
        if self.latest_family:
            out["latestFamily"] = self.latest_family
        if self.latest_base_model:
            out["latestBaseModel"] = self.latest_base_model
        return out

    @classmethod
    def from_dict(cls, style: str, raw: Mapping[str, Any]) -> StyleSummary:
        return cls(
            style=style,
            revision=int(raw.get("revision") or 0),
            latest_version=raw.get("latestVersion"),
            latest_family=raw.get("latestFamily") if isinstance(raw.get("latestFamily"), str) else None,
            latest_base_model=raw.get("latestBaseModel") if isinstance(raw.get("latestBaseModel"), str) else None,
            statuses=dict(raw.get("statuses") or {}),
            files_fingerprint=str(raw.get("filesFingerprint") or ""),
            unfinished={
                b: UnfinishedJob(j.get("id", b), j.get("version", ""), j.get("jobStatus"), j.get("createdAt"))
                for b, j in (raw.get("unfinished") or {}).items()
            },
            jobs=tuple(raw.get("jobs") or ()),
            submitting={str(k): int(v) for k, v in (raw.get("submitting") or {}).items()},
            etag=raw.get("etag"),
            aliases={
                str(a): p
                for a, p in ((a, AliasPointer.from_dict(r)) for a, r in _mapping(raw.get("aliases")).items())
                if p is not None
            },
        )


@dataclass(frozen=True)
class RegistryIndex:
    """``registry/index.json``: every style's summary and a job-base → style map."""

    styles: dict[str, StyleSummary] = field(default_factory=dict)

    @property
    def jobs(self) -> dict[str, str]:
        return {b: s.style for s in self.styles.values() for b in s.jobs}

    def to_json(self) -> bytes:
        body = {
            "schemaVersion": INDEX_SCHEMA_VERSION,
            "styles": {name: s.to_dict() for name, s in sorted(self.styles.items())},
        }
        return json.dumps(body, separators=(",", ":"), sort_keys=False).encode()

    @classmethod
    def from_json(cls, data: bytes) -> RegistryIndex:
        raw = json.loads(data)
        styles = raw.get("styles") if isinstance(raw, dict) else None
        if not isinstance(styles, dict):
            return cls()
        return cls({name: StyleSummary.from_dict(name, s) for name, s in styles.items()})


def known_files(doc: RegistryDocument) -> dict[str, str]:
    """key → ETag of every LoRA object the document accounts for: the latest entry per key
    among the versions' files (main and other layouts), rejected files and superseded files.

    A file recorded before layouts were (``layout`` None) does not count as known, so the
    next reconciliation reads its header once more and records its layout and checksum.
    """
    latest: dict[str, LoraFile | RejectedFile] = {}
    entries: list[LoraFile | RejectedFile] = [v.file for v in doc.versions if v.file]
    entries += [c for v in doc.versions for c in v.companions]
    for entry in [*entries, *doc.rejected_files, *doc.superseded_files]:
        current = latest.get(entry.key)
        if current is None or entry.last_seen > current.last_seen:
            latest[entry.key] = entry
    return {
        key: entry.etag for key, entry in latest.items() if not (isinstance(entry, LoraFile) and entry.layout is None)
    }


def files_fingerprint(files: Mapping[str, str], primary: str | None = None) -> str:
    """A short digest of key → ETag pairs and the primary layout (default: the setting
    ``LORA_PRIMARY_FORMAT``): equal digests mean no new or changed file, and ``loraUrl`` already
    names the right layout."""
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(f"{primary or get_settings().primary_format}\n".encode())
    for key in sorted(files):
        digest.update(f"{key}\0{files[key]}\n".encode())
    return digest.hexdigest()[:20]


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def parse_index(current: StoredObject | None) -> RegistryIndex:
    if current is None:
        return RegistryIndex()
    try:
        return RegistryIndex.from_json(current.data)
    except (ValueError, AttributeError, TypeError):
        return RegistryIndex()  # derived data: a broken index is rebuilt from the documents
