"""Aliases (``production``, ``staging``…): names that point at one version of a style.

An alias is moved by an operator (``registry promote``/``rollback``, the
``promote_lora_version`` job), never by evidence from RunPod or the store. Every move
is an ``AliasEntry`` in the document's ``aliasHistory``: who, when, why, from which
version to which. The history is a set ordered by ``seq`` (assigned under the
document's conditional write, so two racing moves get consecutive numbers); the
merge only ever adds to it, and where an alias points is derived from it by
replaying it: a promote pushes a version, a rollback pops back to the one before, a
remove ends the alias (its entry names the version it pointed at) and starts its stack
afresh: a rollback right after a removal is refused, a later promote sets it again.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

AliasAction = Literal["promote", "rollback", "remove"]
ALIAS_ACTIONS: tuple[AliasAction, ...] = ("promote", "rollback", "remove")
_ALIAS = re.compile(r"[a-z][a-z0-9_-]{0,31}")


class InvalidAliasName(ValueError):
    """An alias outside ``[a-z][a-z0-9_-]{0,31}``; the message names the offending value."""


def validate_alias(alias: str) -> str:
    """Return ``alias`` unchanged if it is a safe alias name, else raise InvalidAliasName."""
    if not isinstance(alias, str) or not _ALIAS.fullmatch(alias):
        raise InvalidAliasName(
            f"invalid alias name {alias!r}: use a lowercase letter then up to 31 lowercase letters, "
            "digits, '_' or '-' (e.g. production, staging)"
        )
    return alias


@dataclass(frozen=True, slots=True)
class AliasEntry:
    """One move of an alias: ``alias`` now points at ``version`` (a name, ``V3``), it pointed at
    ``previous`` before (None: it was new); ``by`` whom, ``at`` when (ms), ``reason`` why.
    A ``remove`` ends the alias: ``version`` and ``previous`` name the version it pointed at."""

    seq: int
    alias: str
    version: str
    action: AliasAction
    by: str
    at: int
    previous: str | None = None
    reason: str | None = None

    @property
    def order(self) -> tuple[int, int, str, str, str, str, str, str]:
        """History order: by sequence number (write order), then by content (a total order)."""
        return (
            self.seq,
            self.at,
            self.alias,
            self.version,
            self.action,
            self.by,
            self.previous or "",
            self.reason or "",
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "alias": self.alias,
            "action": self.action,
            "version": self.version,
            "previous": self.previous,
            "by": self.by,
            "at": self.at,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, raw: Any) -> AliasEntry | None:
        if not isinstance(raw, Mapping) or raw.get("action") not in ALIAS_ACTIONS:
            return None
        alias, version, seq, at = raw.get("alias"), raw.get("version"), raw.get("seq"), raw.get("at")
        if not (isinstance(alias, str) and isinstance(version, str) and isinstance(seq, int) and isinstance(at, int)):
            return None
        return cls(
            seq,
            alias,
            version,
            raw["action"],
            str(raw.get("by") or ""),
            at,
            str(raw["previous"]) if raw.get("previous") else None,
            str(raw["reason"]) if raw.get("reason") else None,
        )


def join_history(*histories: Iterable[AliasEntry]) -> tuple[AliasEntry, ...]:
    """The union of alias histories, in history order (never rewritten: entries are only added)."""
    return tuple(sorted({e for h in histories for e in h}, key=lambda e: e.order))


def alias_stacks(history: Iterable[AliasEntry]) -> dict[str, list[str]]:
    """alias → the versions it pointed at, oldest first, the current one last, by replaying the
    history: a promote pushes its version, a rollback pops back to the version it names, a
    remove empties the stack (the alias is gone; what it pointed at before stays in the history)."""
    stacks: dict[str, list[str]] = {}
    for entry in sorted(history, key=lambda e: e.order):
        stack = stacks.setdefault(entry.alias, [])
        if entry.action == "remove":
            stack.clear()
        elif entry.action == "rollback" and stack:
            stack.pop()
            if not stack or stack[-1] != entry.version:
                stack.append(entry.version)
        elif not stack or stack[-1] != entry.version:
            stack.append(entry.version)
    return stacks


def reachable_versions(history: Iterable[AliasEntry]) -> dict[str, list[str]]:
    """version → the aliases that point at it now or can roll back to it (it is on their stack:
    back to each alias's last ``remove``). What the version retention must keep."""
    reachable: dict[str, list[str]] = {}
    for alias, stack in sorted(alias_stacks(history).items()):
        for version in dict.fromkeys(stack):
            reachable.setdefault(version, []).append(alias)
    return reachable


def current_aliases(history: Iterable[AliasEntry]) -> dict[str, str]:
    """alias → the version it points at now."""
    return {alias: stack[-1] for alias, stack in sorted(alias_stacks(history).items()) if stack}
