"""Tombstones: what a deleted version leaves in its document.

A deleted version keeps its number (never reused) and its record, with status
``deleted`` and a ``Deletion``: when, by whom, why, and exactly which objects were
removed (key, ETag, last-modified time). ``deleted`` outranks every other status in
the merge, so no later evidence (a late webhook, a file re-uploaded under the same
name, a reconciliation that listed the files before they went) brings the version
back. The removed objects are no longer accounted for by the document; an object
uploaded again under one of those keys (another ETag or time) is kept among the
superseded files, never as the version's file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DeletedObject = tuple[str, str, int]  # key, ETag, last-modified (ms)


@dataclass(frozen=True, slots=True)
class Deletion:
    """Who deleted a version, when (ms), why, and the objects removed."""

    at: int
    by: str
    reason: str | None = None
    files: tuple[DeletedObject, ...] = ()

    @property
    def order(self) -> tuple[int, str, str]:
        return (self.at, self.by, self.reason or "")

    def join(self, other: Deletion | None) -> Deletion:
        """The earliest deletion's who/when/why, and every object either removed (a join)."""
        if other is None or other == self:
            return self
        first = min(self, other, key=lambda d: d.order)
        return Deletion(first.at, first.by, first.reason, tuple(sorted({*self.files, *other.files})))

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "by": self.by,
            "reason": self.reason,
            "files": [{"key": k, "etag": e, "lastModified": m} for k, e, m in self.files],
        }

    @classmethod
    def from_dict(cls, raw: Any) -> Deletion | None:
        if not isinstance(raw, Mapping) or not isinstance(raw.get("at"), int):
            return None
        files = tuple(
            sorted(
                (str(f["key"]), str(f.get("etag") or ""), int(f.get("lastModified") or 0))
                for f in raw.get("files") or []
                if isinstance(f, Mapping) and isinstance(f.get("key"), str)
            )
        )
        return cls(raw["at"], str(raw.get("by") or ""), str(raw["reason"]) if raw.get("reason") else None, files)
