"""What a registry write changed, version by version (what reports and Dagster show)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lora_pipeline.registry.models import RegistryDocument, Version


@dataclass(frozen=True)
class VersionChange:
    """One version created, updated or folded by a write (what reports and Dagster show)."""

    style: str
    version: str
    kind: str  # created | updated | folded
    fields: tuple[str, ...]
    before: str | None
    after: str
    folded: int = 0  # how many stored records became this one

    def to_dict(self) -> dict[str, Any]:
        return {
            "style": self.style,
            "version": self.version,
            "change": self.kind,
            "fields": list(self.fields),
            "statusBefore": self.before,
            "statusAfter": self.after,
            "foldedRecords": self.folded,
        }


def diff_versions(old: RegistryDocument, new: RegistryDocument, primary: str | None = None) -> list[VersionChange]:
    """What a write changes, version by version (updatedAt alone is not a change); ``primary``: the
    layout ``loraUrl`` names."""
    stored: dict[int, list[Version]] = {}
    for v in old.versions:
        for n in v.numbers:
            stored.setdefault(n, []).append(v)
    changes = []
    for v in new.versions:
        olds = list({id(o): o for n in v.numbers for o in stored.get(n, [])}.values())
        after = _comparable(v.to_dict(primary))
        if not olds:
            changes.append(VersionChange(new.style, v.name, "created", (), None, v.status.value))
            continue
        before = _comparable(olds[0].to_dict(primary))
        fields = tuple(k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k))
        if len(olds) > 1:
            changes.append(
                VersionChange(
                    new.style, v.name, "folded", fields, olds[0].status.value, v.status.value, folded=len(olds)
                )
            )
        elif fields:
            changes.append(VersionChange(new.style, v.name, "updated", fields, olds[0].status.value, v.status.value))
    return changes


def _comparable(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "updatedAt"}


def document_content(document: Mapping[str, Any]) -> dict[str, Any]:
    """A stored document minus what does not count as a change (revision, updatedAt)."""
    out = {k: v for k, v in document.items() if k != "revision"}
    out["versions"] = [_comparable(v) if isinstance(v, dict) else v for v in document.get("versions") or []]
    return out
