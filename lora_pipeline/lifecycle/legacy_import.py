"""Import the legacy dashboard's registry files (``resources/style_images/<style>/training_versions.json``).

The input is only read, never modified. Each record becomes a LegacyRecord and
goes through the one merge function, so duplicates fold (the legacy file holds V4
twice), ids keep their suffix, accelerated URLs are kept, and importing again
changes nothing. A registry document in the store that is itself a legacy file
is backed up before its first rewrite (RegistryStore does that). Webhook bodies
waiting in the inbox for these jobs are applied right after.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_pipeline.lifecycle.reconcile import process_inbox
from lora_pipeline.registry.evidence import LegacyRecord
from lora_pipeline.registry.models import InvalidRecord, Version, legacy_version_records
from lora_pipeline.registry.names import InvalidStyleName, validate_style
from lora_pipeline.registry_store.changes import VersionChange
from lora_pipeline.clock import SYSTEM_CLOCK, Clock
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.storage.base import ObjectStore

LEGACY_FILE = "training_versions.json"


@dataclass(frozen=True)
class FoldedRecords:
    """Several legacy records of one style that were the same version."""

    style: str
    version: str
    records: int

    def to_dict(self) -> dict[str, Any]:
        return {"style": self.style, "version": self.version, "records": self.records}


@dataclass
class ImportReport:
    imported: list[str] = field(default_factory=list)  # styles whose file was read
    folded: list[FoldedRecords] = field(default_factory=list)
    changes: list[VersionChange] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # path: reason, for skipped files/records
    webhooks_applied: int = 0

    @property
    def changed_versions(self) -> int:
        return len(self.changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "imported": list(self.imported),
            "folded": [f.to_dict() for f in self.folded],
            "changed_versions": self.changed_versions,
            "details": [c.to_dict() for c in self.changes],
            "problems": list(self.problems),
            "webhooks_applied": self.webhooks_applied,
        }


def import_legacy(
    store: ObjectStore, legacy_dir: Path, *, apply_inbox: bool = True, clock: Clock = SYSTEM_CLOCK
) -> ImportReport:
    """Merge every ``legacy_dir/<style>/training_versions.json`` into the registry.

    A style directory with a bad name, a file that is not JSON or not the expected
    shape, and a record without a usable name or status are reported (by path)
    and skipped; the other styles and records are still imported.
    """
    legacy_dir = Path(legacy_dir)
    if not legacy_dir.is_dir():
        raise FileNotFoundError(f"legacy directory {legacy_dir} does not exist or is not a directory")
    registry = RegistryStore(store, clock=clock)
    report = ImportReport()
    for style_dir in sorted(p for p in legacy_dir.iterdir() if p.is_dir()):
        path = style_dir / LEGACY_FILE
        if not path.is_file():
            continue
        try:
            style = validate_style(style_dir.name)
        except InvalidStyleName as exc:
            report.problems.append(f"{path}: skipped: {exc}")
            continue
        records = _read_records(path, style, report)
        if records is None:
            continue
        report.imported.append(style)
        result = registry.apply(style, [LegacyRecord(style, r) for r in records])
        report.changes.extend(result.changes)
    if apply_inbox:
        report.webhooks_applied = len(process_inbox(store, clock=clock).webhooks_applied)
    return report


def _read_records(path: Path, style: str, report: ImportReport) -> list[dict[str, Any]] | None:
    try:
        raw = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        report.problems.append(f"{path}: skipped: not a readable JSON file: {exc}")
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("versions"), list):
        report.problems.append(f"{path}: skipped: expected an object with a 'versions' list")
        return None
    good: list[dict[str, Any]] = []
    numbers: Counter[int] = Counter()
    for position, record in enumerate(legacy_version_records(raw)):
        try:
            version = Version.from_dict(record)
        except InvalidRecord as exc:
            report.problems.append(f"{path}: versions[{position}] skipped: {exc}")
            continue
        numbers[version.number] += 1
        good.append(record)
    report.folded.extend(FoldedRecords(style, f"V{n}", count) for n, count in sorted(numbers.items()) if count > 1)
    return good
