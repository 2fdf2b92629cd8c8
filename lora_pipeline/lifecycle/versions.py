"""The version retention (keep the last N completed versions of each style, and every version an
alias points at or can roll back to: its history back to its last ``remove``) and who an operator's action is recorded as.

Moving an alias and deleting a version are ``RegistryStore.move_alias`` / ``delete_version``
(one conditional write each), called as they are by ``lora-pipeline registry
promote|rollback|unalias|delete`` and the ``promote_lora_version`` / ``delete_lora_version``
jobs. The retention runs in the ``reconcile_registry`` job and ``registry reconcile``
(``LORA_KEEP_VERSIONS``); see docs/registry.md.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from lora_pipeline.clock import SYSTEM_CLOCK, Clock
from lora_pipeline.registry.aliases import reachable_versions
from lora_pipeline.registry.models import VersionStatus
from lora_pipeline.registry_store.documents import Refused, RegistryStore
from lora_pipeline.storage.base import ObjectStore

__all__ = ["PruneReport", "default_actor", "prune_versions"]


def default_actor() -> str:
    """Who acts, when nobody says: the OS user (``getpass.getuser()``: ``LOGNAME``, ``USER``… or the
    password database), else ``unknown``."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (a container)
        return "unknown"


@dataclass
class PruneReport:
    """What the version retention deleted (or, ``dry_run``, would delete): style → versions, the
    objects removed, and the versions kept only because an alias points at them or can roll back
    to them."""

    keep: int
    dry_run: bool = False
    deleted: dict[str, list[str]] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    kept_aliased: dict[str, list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.deleted.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "keep": self.keep,
            "dryRun": self.dry_run,
            "deleted": self.deleted,
            "removedObjects": self.removed,
            "keptAliased": self.kept_aliased,
            "problems": self.problems,
        }

    def summary(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        return (
            f"version retention (keep {self.keep}): {verb} {self.total} version(s) in {len(self.deleted)} "
            f"style(s), {len(self.removed)} object(s)"
        )


def prune_versions(
    store: ObjectStore,
    keep: int,
    *,
    by: str = "retention",
    dry_run: bool = False,
    at: datetime | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> PruneReport:
    """Delete every completed version of each style but the ``keep`` newest, and those an alias
    points at or can roll back to (``keep`` 0: keep everything). Styles with at most ``keep`` completed versions
    (index counts) are not read. ``at`` (default ``clock.now()``) stamps the tombstones."""
    report = PruneReport(keep=keep, dry_run=dry_run)
    if keep <= 0:
        return report
    registry = RegistryStore(store, clock=clock)
    index, _ = registry.fresh_index(repair=not dry_run, problems=report.problems)
    reason = f"retention: keep the last {keep} completed versions (LORA_KEEP_VERSIONS)"
    for style, summary in sorted(index.styles.items()):
        if summary.statuses.get(VersionStatus.completed.value, 0) <= keep:
            continue
        doc, _ = registry.read(style)
        aliased = set(reachable_versions(doc.alias_history))
        completed = sorted(
            (v for v in doc.versions if v.status is VersionStatus.completed), key=lambda v: v.number, reverse=True
        )
        for version in completed[keep:]:
            if version.name in aliased:
                report.kept_aliased.setdefault(style, []).append(version.name)
                continue
            try:
                result = registry.delete_version(
                    style, version.name, by=by, reason=reason, dry_run=dry_run, at=at, keep_rollback_targets=True
                )
            except Refused as exc:  # an alias moved onto it since the read
                report.problems.append(str(exc))
                continue
            report.deleted.setdefault(style, []).append(result.version)
            report.removed.extend(result.removed)
    return report
