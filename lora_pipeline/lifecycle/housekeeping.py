"""Housekeeping: prune what idempotency and resumption needed, once nothing needs it.

Run by the ``reconcile_registry`` job and ``registry reconcile`` right after the
registry is reconciled. What grows without it, and when each thing goes:

* ``webhooks/seen/<job>_<STATUS>.json`` (delivery claims) and ``webhooks/processed/``
  (applied bodies): after the webhook retention, and only when a registry document
  holds the job and its version is finished (completed or failed). A job whose
  version is unfinished, or that no document holds yet (its body may be waiting in
  the inbox to be matched), keeps its files however old. Losing a settled job's
  claim is harmless: a late redelivery is stored once more and re-applied, and the
  merge is idempotent, so the document does not change.
* ``runs/<style>/<version>/<job>.json`` (the start markers workers write, which attach a
  job whose ``/run`` answer was lost): like delivery claims, after the webhook
  retention once the job's version is finished.
* ``webhooks/rejected/`` (unusable bodies, each with its ``.reason.txt``): after the
  webhook retention, body and reason together. Each was reported as a problem by
  the run that rejected it; the retention is the operator's window to look.
* ``checkpoints/<style>/<version>/<request>/``: at once when the version is completed
  (its LoRA file is verified in the store: nothing will resume); for a failed
  version, once its newest checkpoint and the version's last update are older than
  the checkpoint retention (a RunPod retry of the job may still resume from them);
  never for an unfinished version or one no document holds.
* The local store's lock files (``<root>/.lora-store/locks/``) unused for the lock
  retention, and temporary files a killed writer left in ``.lora-store/tmp/``
  (``LocalStore.prune_lock_files``: a lock in use is never removed, and a writer
  that opened one as it went retries on the new file).

The webhook inbox is never pruned: everything there is work still to do.

Decisions are pure functions of listings (``ObjectInfo.last_modified`` gives the
age) and of facts read from the registry documents (the truth; the index only
routes a job to its style, and a stale index can only make more files stay).
``housekeep`` gathers those, applies the plan (or, in a dry run, only reports it),
and returns counts: deleted per kind and kept per kind and reason.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from lora_pipeline.registry.jobids import base_job_id
from lora_pipeline.registry.models import RegistryDocument, VersionStatus, from_epoch_ms
from lora_pipeline.registry.names import InvalidStyleName, validate_style, version_name
from lora_pipeline.settings import MAX_RETENTION_DAYS, Settings, SettingsError, get_settings
from lora_pipeline.storage.base import ObjectInfo, ObjectNotFound, ObjectStore, StorageError
from lora_pipeline.storage.breaker import is_outage
from lora_pipeline.storage.keys import (
    CHECKPOINTS,
    RUNS,
    WEBHOOK_PROCESSED,
    WEBHOOK_REJECTED,
    WEBHOOK_SEEN,
    checkpoint_prefix,
)

DEFAULT_WEBHOOK_RETENTION = timedelta(days=30)
DEFAULT_CHECKPOINT_RETENTION = timedelta(days=30)
DEFAULT_LOCK_RETENTION = timedelta(days=1)

# Each kind's setting (LORA_WEBHOOK_RETENTION_DAYS, LORA_CHECKPOINT_RETENTION_DAYS, LORA_LOCK_RETENTION_DAYS).
RETENTION_SETTINGS = {
    "webhooks": "webhook_retention_days",
    "failed_checkpoints": "checkpoint_retention_days",
    "locks": "lock_retention_days",
}

# Kinds of things pruned (keys of the report's counts).
SEEN, PROCESSED, REJECTED, RUN_MARKERS, CHECKPOINT, LOCKS, TMP = (
    "seen",
    "processed",
    "rejected",
    "run_markers",
    "checkpoints",
    "locks",
    "tmp",
)
KINDS = (SEEN, PROCESSED, REJECTED, RUN_MARKERS, CHECKPOINT, LOCKS, TMP)

# Why something old enough stays. The first four are "needed".
UNFINISHED = "unfinished"  # its job's (or checkpoint's) version is not finished
UNKNOWN = "unknown"  # no registry document holds the job or version (yet)
UNRECOGNIZED = "unrecognized"  # a name (or claim) we cannot read: left to an operator
BUSY = "busy"  # a lock held right now
YOUNG = "young"  # within its retention
NEEDED = (UNFINISHED, UNKNOWN, UNRECOGNIZED, BUSY)

REASON_SUFFIX = ".reason.txt"
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_STATUS = re.compile(r"[A-Z_]{1,32}")
_KEYS_SHOWN = 1000  # keys listed per kind in a dry run's report


# -- settings ------------------------------------------------------------------------


@dataclass(frozen=True)
class Retention:
    """How long each kind of file is kept after it stops changing."""

    webhooks: timedelta = DEFAULT_WEBHOOK_RETENTION
    failed_checkpoints: timedelta = DEFAULT_CHECKPOINT_RETENTION
    locks: timedelta = DEFAULT_LOCK_RETENTION

    @classmethod
    def from_settings(
        cls,
        settings: Settings | None = None,
        *,
        webhooks_days: float | None = None,
        failed_checkpoints_days: float | None = None,
        locks_days: float | None = None,
    ) -> Retention:
        """Retention from the settings' ``LORA_*_RETENTION_DAYS`` (default ``get_settings()``;
        checked there), each overridden by the matching argument when given (the Dagster job
        config; SettingsError naming it for a bad value)."""
        settings = settings or get_settings()
        given = {"webhooks": webhooks_days, "failed_checkpoints": failed_checkpoints_days, "locks": locks_days}
        return cls(
            **{
                name: _days(given[name], f"{name} retention")
                if given[name] is not None
                else timedelta(days=getattr(settings, field))
                for name, field in RETENTION_SETTINGS.items()
            }
        )

    def to_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) / timedelta(days=1) for name in RETENTION_SETTINGS}


def _days(value: Any, name: str) -> timedelta:
    try:
        days = float(value)
    except (TypeError, ValueError):
        days = math.nan
    if not math.isfinite(days) or days <= 0 or days > MAX_RETENTION_DAYS:
        raise SettingsError(f"{name}={value!r}: expected a number of days above 0 (up to {MAX_RETENTION_DAYS})")
    return timedelta(days=days)


# -- facts and names -----------------------------------------------------------------


@dataclass(frozen=True)
class RegistryFacts:
    """What the registry documents say, as far as housekeeping needs it.

    ``jobs``: job base UUID → status of the version holding it. ``versions``:
    (style, checkpoint version segment) → (status, last update). Anything absent
    is unknown, and unknown is kept.
    """

    jobs: Mapping[str, VersionStatus] = field(default_factory=dict)
    versions: Mapping[tuple[str, str], tuple[VersionStatus, datetime | None]] = field(default_factory=dict)

    @classmethod
    def of(cls, documents: Iterable[RegistryDocument]) -> RegistryFacts:
        jobs: dict[str, VersionStatus] = {}
        versions: dict[tuple[str, str], tuple[VersionStatus, datetime | None]] = {}
        for doc in documents:
            for v in doc.versions:
                for base in v.job_bases:
                    jobs[base] = v.status
                updated = from_epoch_ms(v.updated_at) if v.updated_at else None
                for number in v.numbers:
                    versions[(doc.style, checkpoint_version_segment(doc.style, version_name(number)))] = (
                        v.status,
                        updated,
                    )
        return cls(jobs, versions)


def checkpoint_version_segment(style: str, version: str) -> str:
    """The version's folder under ``checkpoints/<style>/`` (as the worker names it)."""
    return checkpoint_prefix(style, version, "r").split("/")[2]


def claim_job_ids(key: str) -> list[str]:
    """The job ids a claim's name ``<job id>_<STATUS>.json`` can be read as. One for
    RunPod's ids; more when the id holds ``_`` (then the claim's content decides)."""
    name = key.rsplit("/", 1)[-1]
    if not name.endswith(".json"):
        return []
    stem = name[: -len(".json")]
    found = []
    for i, char in enumerate(stem):
        if char == "_" and _JOB_ID.fullmatch(stem[:i]) and _STATUS.fullmatch(stem[i + 1 :]):
            found.append(stem[:i])
    return found


@dataclass(frozen=True)
class WebhookFile:
    """A claim or processed body with the job it is about (None: unreadable)."""

    info: ObjectInfo
    job_id: str | None


# -- planning (pure) -----------------------------------------------------------------


@dataclass
class Plan:
    """Keys to delete per kind, and how many objects stay, per kind and reason."""

    delete: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    kept: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))

    def extend(self, other: Plan) -> Plan:
        for kind, keys in other.delete.items():
            self.delete[kind].extend(keys)
        for kind, reasons in other.kept.items():
            self.kept[kind].update(reasons)
        return self


def is_old(info: ObjectInfo, now: datetime, retention: timedelta) -> bool:
    return now - info.last_modified > retention


def plan_webhooks(
    seen: Iterable[WebhookFile],
    processed: Iterable[WebhookFile],
    rejected: Iterable[ObjectInfo],
    facts: RegistryFacts,
    *,
    now: datetime,
    retention: timedelta,
    markers: Iterable[WebhookFile] = (),
) -> Plan:
    """Claims, processed bodies and start markers go when old and their job's version is
    finished; rejected bodies go with their reason when both are old."""
    plan = Plan()
    for kind, files in ((SEEN, seen), (PROCESSED, processed), (RUN_MARKERS, markers)):
        for item in files:
            reason = _webhook_keep_reason(item, facts, now, retention)
            if reason is None:
                plan.delete[kind].append(item.info.key)
            else:
                plan.kept[kind][reason] += 1
    groups: dict[str, list[ObjectInfo]] = defaultdict(list)
    for info in rejected:
        groups[info.key.removesuffix(REASON_SUFFIX)].append(info)
    for _, infos in sorted(groups.items()):
        if all(is_old(i, now, retention) for i in infos):
            plan.delete[REJECTED].extend(sorted(i.key for i in infos))
        else:
            plan.kept[REJECTED][YOUNG] += len(infos)
    return plan


def _webhook_keep_reason(item: WebhookFile, facts: RegistryFacts, now: datetime, retention: timedelta) -> str | None:
    if not is_old(item.info, now, retention):
        return YOUNG
    if item.job_id is None:
        return UNRECOGNIZED
    status = facts.jobs.get(base_job_id(item.job_id))
    if status is None:
        return UNKNOWN
    if not status.finished:
        return UNFINISHED
    return None


def checkpoint_group(key: str) -> tuple[str, str, str] | None:
    """(style, version segment, group prefix) of ``checkpoints/<style>/<v>/<request>/…``."""
    parts = key.split("/")
    if len(parts) < 5 or parts[0] != CHECKPOINTS:
        return None
    try:
        style = validate_style(parts[1])
    except InvalidStyleName:
        return None
    return style, parts[2], "/".join(parts[:4]) + "/"


def plan_checkpoints(
    listing: Iterable[ObjectInfo],
    facts: RegistryFacts,
    *,
    now: datetime,
    retention: timedelta,
) -> Plan:
    """A request's checkpoints go at once when its version is completed; for a failed
    version once the newest of them and the version's last update are older than
    ``retention``; never while the version is unfinished or unknown."""
    plan = Plan()
    groups: dict[tuple[str, str, str], list[ObjectInfo]] = defaultdict(list)
    for info in listing:
        group = checkpoint_group(info.key)
        if group is None:
            plan.kept[CHECKPOINT][UNRECOGNIZED] += 1
        else:
            groups[group].append(info)
    for (style, segment, _prefix), infos in sorted(groups.items()):
        known = facts.versions.get((style, segment))
        reason: str | None
        if known is None:
            reason = UNKNOWN
        elif known[0] in (VersionStatus.completed, VersionStatus.deleted):  # nothing will resume either
            reason = None
        elif known[0] is VersionStatus.failed:
            newest = max([i.last_modified for i in infos] + ([known[1]] if known[1] else []))
            reason = None if now - newest > retention else YOUNG
        else:
            reason = UNFINISHED
        if reason is None:
            plan.delete[CHECKPOINT].extend(sorted(i.key for i in infos))
        else:
            plan.kept[CHECKPOINT][reason] += len(infos)
    return plan


# -- the report ----------------------------------------------------------------------


@dataclass
class HousekeepingReport:
    """What was pruned (``deleted``: kind → keys; what would be, in a dry run), what
    stayed (``kept``: kind → reason → count) and any problem on the way."""

    dry_run: bool = False
    retention: Retention = field(default_factory=Retention)
    deleted: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS if k not in (LOCKS, TMP)})
    local_deleted: dict[str, int] = field(default_factory=dict)  # locks, tmp: no keys
    kept: dict[str, dict[str, int]] = field(default_factory=dict)
    documents_read: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        """Deleted (or, in a dry run, to delete) per kind."""
        out = {kind: len(keys) for kind, keys in self.deleted.items()}
        out.update(self.local_deleted)
        return {kind: out.get(kind, 0) for kind in KINDS}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def kept_needed(self) -> dict[str, int]:
        """Per kind, old enough to go but kept because something may still need it."""
        return {
            kind: sum(n for r, n in reasons.items() if r in NEEDED)
            for kind, reasons in self.kept.items()
            if any(r in NEEDED for r in reasons)
        }

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dry_run": self.dry_run,
            "retention_days": self.retention.to_dict(),
            "deleted": self.counts,
            "kept": {kind: dict(sorted(r.items())) for kind, r in sorted(self.kept.items())},
            "kept_needed": self.kept_needed,
            "documents_read": self.documents_read,
            "problems": list(self.problems),
        }
        if self.dry_run:
            out["would_delete"] = {kind: keys[:_KEYS_SHOWN] for kind, keys in self.deleted.items() if keys}
        return out

    def summary(self) -> str:
        """One line for logs and the command line."""
        verb = "would delete" if self.dry_run else "deleted"
        done = ", ".join(f"{n} {kind}" for kind, n in self.counts.items() if n) or "nothing"
        needed = ", ".join(f"{n} {kind}" for kind, n in self.kept_needed.items())
        return f"housekeeping: {verb} {done}" + (f"; kept (still needed) {needed}" if needed else "")


# -- doing it ------------------------------------------------------------------------


def housekeep(
    store: ObjectStore,
    *,
    retention: Retention | None = None,
    dry_run: bool = False,
    now: datetime | None = None,
) -> HousekeepingReport:
    """Prune old webhook files, finished versions' checkpoints and (local store) idle
    lock files, as the module docstring says. Never raises StorageError: a failure
    stops the pruning (the next run carries on) and is reported as a problem."""
    retention = retention or Retention.from_settings()
    now = now or datetime.now(UTC)
    report = HousekeepingReport(dry_run=dry_run, retention=retention)
    try:
        plan = _plan(store, report, retention, now)
    except StorageError as exc:
        report.problems.append(f"housekeeping skipped: {exc}")
        return report
    report.kept = {kind: dict(reasons) for kind, reasons in plan.kept.items() if reasons}
    _apply(store, plan, report)
    _prune_local(store, report, now - retention.locks)
    return report


def _plan(store: ObjectStore, report: HousekeepingReport, retention: Retention, now: datetime) -> Plan:
    from lora_pipeline.registry_store.documents import RegistryStore

    old = retention.webhooks
    seen = [
        WebhookFile(i, _claim_job(store, i) if is_old(i, now, old) else None) for i in store.list(WEBHOOK_SEEN + "/")
    ]
    processed = [
        WebhookFile(i, _body_job(store, i) if is_old(i, now, old) else None)
        for i in store.list(WEBHOOK_PROCESSED + "/")
    ]
    rejected = list(store.list(WEBHOOK_REJECTED + "/"))
    markers = [WebhookFile(i, marker_job(i.key)) for i in store.list(RUNS + "/")]
    checkpoints = list(store.list(CHECKPOINTS + "/"))

    # Read only the documents a decision needs: the styles of old files' jobs (routed
    # by the index) and of the checkpoints. A job the index cannot route stays.
    registry = RegistryStore(store)
    wanted_jobs = {base_job_id(f.job_id) for f in (*seen, *processed) if f.job_id}
    styles: set[str] = {g[0] for g in map(checkpoint_group, (i.key for i in checkpoints)) if g}
    styles |= {f.info.key.split("/")[1] for f in markers if f.job_id and is_old(f.info, now, old)}
    if wanted_jobs:
        routes = registry.read_index()[0].jobs
        styles |= {routes[b] for b in wanted_jobs if b in routes}
    documents = []
    for style in sorted(styles):
        try:
            doc, etag = registry.read(style)
        except ValueError as exc:  # InvalidRecord, InvalidStyleName: keep its files
            report.problems.append(f"housekeeping: {style}: document unreadable, its files kept: {exc}")
            continue
        if etag is not None:
            report.documents_read += 1
            documents.append(doc)
    facts = RegistryFacts.of(documents)
    return plan_webhooks(seen, processed, rejected, facts, now=now, retention=old, markers=markers).extend(
        plan_checkpoints(checkpoints, facts, now=now, retention=retention.failed_checkpoints)
    )


def marker_job(key: str) -> str | None:
    """The job a start marker ``runs/<style>/<version>/<job>.json`` names (None: not one)."""
    parts = key.split("/")
    if len(parts) != 4 or not parts[3].endswith(".json"):
        return None
    try:
        validate_style(parts[1])
    except InvalidStyleName:
        return None
    job = parts[3][: -len(".json")]
    return job if _JOB_ID.fullmatch(job) else None


def _claim_job(store: ObjectStore, info: ObjectInfo) -> str | None:
    candidates = claim_job_ids(info.key)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        return None
    try:  # ambiguous name (an id with '_'): the claim says which job it is
        job = json.loads(store.get(info.key).data).get("jobId")
    except (ObjectNotFound, ValueError, AttributeError):
        return None
    return job if job in candidates else None


def _body_job(store: ObjectStore, info: ObjectInfo) -> str | None:
    """The job a processed body is about: its ``id`` (the name need not say)."""
    try:
        job = json.loads(store.get(info.key).data).get("id")
    except (ObjectNotFound, ValueError, AttributeError, RecursionError):
        return None
    return job if isinstance(job, str) and _JOB_ID.fullmatch(job) else None


def _apply(store: ObjectStore, plan: Plan, report: HousekeepingReport) -> None:
    for kind in (SEEN, PROCESSED, REJECTED, RUN_MARKERS, CHECKPOINT):
        for key in plan.delete.get(kind, []):
            if not report.dry_run:
                try:
                    store.delete(key)
                except (StorageError, OSError) as exc:
                    if is_outage(exc):
                        report.problems.append(f"housekeeping stopped at {key} (the next run carries on): {exc}")
                        return
                    report.problems.append(f"housekeeping: {key} not deleted (the others were): {exc}")
                    continue
            report.deleted[kind].append(key)


def _prune_local(store: ObjectStore, report: HousekeepingReport, older_than: datetime) -> None:
    prune = getattr(store, "prune_lock_files", None)  # the local store only (S3 has no locks)
    if not callable(prune):
        return
    try:
        counts = prune(older_than, dry_run=report.dry_run)
    except OSError as exc:
        report.problems.append(f"housekeeping: lock files not pruned: {exc}")
        return
    report.local_deleted = {LOCKS: counts.get("locks", 0), TMP: counts.get("tmp", 0)}
    if counts.get("locks_busy"):
        report.kept.setdefault(LOCKS, {})[BUSY] = counts["locks_busy"]
