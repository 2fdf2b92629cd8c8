"""Reconciliation: bring every registry document in line with the store and RunPod.

Sources of evidence, in the order they are gathered: the webhook inbox (bodies
RunPod POSTed), the LoRA files under ``loras/`` (a file counts only if its
safetensors header parses, read with a ranged GET), and status polls of the
unfinished jobs. A job RunPod no longer knows is settled from the store: completed
if its file is there (the listing proves it), failed with a clear reason only
after ``max_job_age``. Only documents whose content changes are written, and a
style with no new evidence is not even read: the index's file fingerprints and
unfinished-job list answer for it. Runs as the ``reconcile_registry`` job, the
``registry reconcile`` command, and (inbox only) ``process_inbox`` for the webhook
sensor and the legacy import.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from lora_pipeline.backends.base import JobNotFound, RunPodError
from lora_pipeline.clock import SYSTEM_CLOCK, Clock
from lora_pipeline.contracts.job_status import JobStatus, job_report_from_status
from lora_pipeline.registry.evidence import (
    Evidence,
    JobExpired,
    JobReport,
    RejectedLora,
    StoredCompanion,
    StoredLora,
    Submission,
    SubmissionLost,
)
from lora_pipeline.registry.jobids import base_job_id
from lora_pipeline.registry.merge import find_version_by_job, merge
from lora_pipeline.registry.models import UNFINISHED_STATUSES, InvalidRecord, RegistryDocument, epoch_ms, from_epoch_ms
from lora_pipeline.registry.names import InvalidStyleName, parse_lora_file, validate_style
from lora_pipeline.registry.safetensors_header import InvalidLoraFile, SafetensorsHeader
from lora_pipeline.registry_store.alias_pointers import publish_alias_pointers
from lora_pipeline.registry_store.changes import VersionChange
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.registry_store.index import RegistryIndex, StyleSummary, files_fingerprint, known_files
from lora_pipeline.registry_store.lora_files import read_header
from lora_pipeline.storage.base import ObjectInfo, ObjectNotFound, ObjectStore, StorageError
from lora_pipeline.storage.documents import TooManyConflicts
from lora_pipeline.storage.keys import LORAS, lora_prefix, run_marker_prefix
from lora_pipeline.webhook.inbox import (
    WEBHOOK_REJECTED,
    InboxItem,
    list_inbox,
    route_style,
    mark_processed,
    reject,
)

DEFAULT_MAX_JOB_AGE = timedelta(hours=25)  # RunPod's default job TTL is 24 h
_UNKNOWN_TIME = datetime.min.replace(tzinfo=UTC)  # list_inbox's arrival of a file with no time

StatusLookup = Callable[[str], JobStatus | None]


@dataclass
class ReconcileReport:
    """What a reconciliation found and changed. ``changed_versions`` counts versions
    created, updated or folded; ``problems`` are things an operator should look at."""

    dry_run: bool = False
    changes: list[VersionChange] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    styles_seen: int = 0
    styles_read: int = 0
    styles_written: int = 0
    headers_read: int = 0
    polls: int = 0
    webhooks_applied: list[str] = field(default_factory=list)
    webhooks_waiting: list[str] = field(default_factory=list)
    webhooks_rejected: list[str] = field(default_factory=list)
    index_rebuilt: list[str] = field(default_factory=list)  # styles whose index entry lagged
    # objects a deleted version's tombstone names (same key and ETag) still in the store: a delete
    # interrupted between its tombstone and the removals; removed (dry run: would be)
    leftovers_removed: list[str] = field(default_factory=list)
    # alias pointers (loras/<style>/<style>@<alias>.json) behind their document, published again
    pointers_published: list[str] = field(default_factory=list)

    @property
    def changed_versions(self) -> int:
        return len(self.changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "changed_versions": self.changed_versions,
            "dry_run": self.dry_run,
            "details": [c.to_dict() for c in self.changes],
            "problems": list(self.problems),
            "leftovers_removed": list(self.leftovers_removed),
            "pointers_published": list(self.pointers_published),
            "stats": {
                "styles_seen": self.styles_seen,
                "styles_read": self.styles_read,
                "styles_written": self.styles_written,
                "headers_read": self.headers_read,
                "polls": self.polls,
                "webhooks_applied": len(self.webhooks_applied),
                "webhooks_waiting": len(self.webhooks_waiting),
                "webhooks_rejected": len(self.webhooks_rejected),
                "index_rebuilt": len(self.index_rebuilt),
                "leftovers_removed": len(self.leftovers_removed),
            },
        }

    def rows(self) -> list[dict[str, str]]:
        """One row per changed version, for a Dagster table (TableRecord(**row))."""
        return [
            {
                "style": c.style,
                "version": c.version,
                "change": c.kind,
                "fields": ", ".join(c.fields),
                "status_before": c.before or "",
                "status_after": c.after,
            }
            for c in self.changes
        ]


@dataclass
class _StyleWork:
    """Everything gathered for one style before its document is read."""

    evidence: list[Evidence] = field(default_factory=list)
    inbox: list[tuple[InboxItem, JobReport]] = field(default_factory=list)
    files: dict[str, ObjectInfo] | None = None  # files to check; None: none listed for it
    verify: bool = False  # settle COMPLETED jobs without a file even with no new evidence


@dataclass
class _StyleOutcome:
    summary: StyleSummary | None = None
    changes: list[VersionChange] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    written: bool = False
    headers_read: int = 0
    documents_read: int = 0
    leftovers: list[str] = field(default_factory=list)  # keys a tombstone names, still listed
    matched: list[InboxItem] = field(default_factory=list)
    waiting: list[InboxItem] = field(default_factory=list)


def reconcile(
    store: ObjectStore,
    *,
    status_lookup: StatusLookup | None = None,
    max_job_age: timedelta = DEFAULT_MAX_JOB_AGE,
    dry_run: bool = False,
    now: datetime | None = None,
    workers: int = 8,
    clock: Clock = SYSTEM_CLOCK,
) -> ReconcileReport:
    """Full reconciliation: inbox, every LoRA file, polls of unfinished jobs.

    ``status_lookup(job_id)`` returns RunPod's status body, None when the status is
    unknown, or raises JobNotFound (result expired); without one, unfinished jobs
    are settled from the store and their age alone. ``now`` (default ``clock.now()``)
    is when the run happens; ``workers`` 1 settles the styles one after another.
    """
    return _Run(store, dry_run=dry_run, now=now, workers=workers, clock=clock).run(
        full=True, status_lookup=status_lookup, max_job_age=max_job_age
    )


def process_inbox(
    store: ObjectStore,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
    workers: int = 4,
    clock: Clock = SYSTEM_CLOCK,
) -> ReconcileReport:
    """Apply the webhook inbox only (the webhook sensor, and after a legacy import).

    A COMPLETED report is checked against the style's files in the store; a body
    for a job no document holds stays in the inbox until one does; a body that
    cannot be used moves to ``webhooks/rejected/`` with its reason beside it.
    """
    return _Run(store, dry_run=dry_run, now=now, workers=workers, clock=clock).run(
        full=False, status_lookup=None, max_job_age=DEFAULT_MAX_JOB_AGE
    )


class _Run:
    def __init__(self, store: ObjectStore, *, dry_run: bool, now: datetime | None, workers: int, clock: Clock) -> None:
        self.store = store
        self.registry = RegistryStore(store, clock=clock)
        self.dry_run = dry_run
        self.now = now or clock.now()
        self.workers = max(1, workers)
        self.report = ReconcileReport(dry_run=dry_run)
        self.full = True
        self.max_job_age = DEFAULT_MAX_JOB_AGE
        self.pointer_styles: set[str] = set()  # styles with an alias pointer in the store

    def run(self, *, full: bool, status_lookup: StatusLookup | None, max_job_age: timedelta) -> ReconcileReport:
        self.full = full
        self.max_job_age = max_job_age
        # The index may lag its documents (written second): rebuild what is stale first,
        # so every job is routed and polled.
        index, stale = self.registry.fresh_index(repair=not self.dry_run, problems=self.report.problems)
        self.report.index_rebuilt = stale
        self.report.styles_read += len(stale)
        work: dict[str, _StyleWork] = defaultdict(_StyleWork)
        routes = index.jobs
        self._gather_inbox(routes, work)
        if full:
            # Poll first, list second: a job that finishes between the two is then seen
            # with its file, never settled as "COMPLETED without a file".
            self._gather_polls(index, work, status_lookup, max_job_age)
            self._gather_files(index, work)
        else:
            for style, style_work in work.items():
                if any(r.status == "COMPLETED" for _, r in style_work.inbox):
                    style_work.files = self._list_style_files(style)
        self.report.styles_seen = len(set(index.styles) | set(work))
        outcomes = self._settle_styles(work)
        summaries = []
        for style in sorted(outcomes):
            outcome = outcomes[style]
            self.report.changes.extend(outcome.changes)
            self.report.problems.extend(outcome.problems)
            self.report.headers_read += outcome.headers_read
            self.report.styles_read += outcome.documents_read
            self.report.styles_written += outcome.written
            self._remove_leftovers(outcome)
            if outcome.summary is not None:
                summaries.append(outcome.summary)
            for item in outcome.matched:
                if not self.dry_run:
                    mark_processed(self.store, item.key)
                self.report.webhooks_applied.append(item.key)
            for item in outcome.waiting:
                self._wait_or_reject(item, item.job_id)
        if summaries and not self.dry_run:
            self.registry.update_index(summaries)
        if full and not self.dry_run:
            self._publish_pointers({s for s, summary in index.styles.items() if summary.aliases} | self.pointer_styles)
        return self.report

    def _publish_pointers(self, styles: set[str]) -> None:
        """Publish alias pointers a crash left behind their document (the move wrote the document,
        then died before the pointer): one read of each aliased style's document."""
        for style in sorted(styles):
            try:
                document, _ = self.registry.read(style)
                self.report.pointers_published += publish_alias_pointers(self.store, document, self.registry.primary)
            except (StorageError, TooManyConflicts) as exc:
                self.report.problems.append(f"{style}: alias pointers not checked: {exc}")

    # -- gathering ------------------------------------------------------------------

    def _gather_inbox(self, routes: dict[str, str], work: dict[str, _StyleWork]) -> None:
        for item in list_inbox(self.store):
            status, problem = item.usable_status()
            if status is None:
                self._reject(item, problem)
                continue
            report = job_report_from_status(status, item.received_at or self.now, source="webhook")
            style = route_style(routes, status)
            if style is None:
                self._wait_or_reject(item, report.job_id)
                continue
            work[style].evidence.append(report)
            work[style].inbox.append((item, report))

    def _gather_files(self, index: RegistryIndex, work: dict[str, _StyleWork]) -> None:
        """List ``loras/`` once; a style whose files differ from what its document accounts
        for (fingerprint in the index) has new evidence."""
        by_style: dict[str, dict[str, ObjectInfo]] = defaultdict(dict)
        for info in self.store.list(LORAS + "/"):
            parts = info.key.split("/")
            if len(parts) == 3 and parts[2].startswith(f"{parts[1]}@") and parts[2].endswith(".json"):
                self.pointer_styles.add(parts[1])  # an alias pointer: checked after the documents
            if len(parts) != 3 or not parts[2].lower().endswith(".safetensors"):
                continue
            try:
                style = validate_style(parts[1])
            except InvalidStyleName as exc:
                self.report.problems.append(f"{info.key}: skipped: {exc}")
                continue
            if (parse_lora_file(style, parts[2]) or (0, None))[0] < 1:
                continue  # another style's name (style_5_vV1 in style_59/) or no version
            by_style[style][info.key] = info
        for style, files in by_style.items():
            summary = index.styles.get(style)
            fingerprint = files_fingerprint({k: i.etag for k, i in files.items()}, self.registry.primary)
            if summary is None or summary.files_fingerprint != fingerprint:
                work[style].files = files
        for style in work:
            if work[style].files is None and style in by_style:
                work[style].files = by_style[style]
        for style, summary in index.styles.items():
            if style not in by_style and summary.files_fingerprint != files_fingerprint({}, self.registry.primary):
                work[style].files = {}  # files the document knows have gone: recheck

    def _gather_polls(
        self,
        index: RegistryIndex,
        work: dict[str, _StyleWork],
        status_lookup: StatusLookup | None,
        max_job_age: timedelta,
    ) -> None:
        reported = {base_job_id(r.job_id) for w in work.values() for _, r in w.inbox}
        for style, summary in index.styles.items():
            for base, job in summary.unfinished.items():
                if base in reported:
                    continue
                status: JobStatus | None = None
                if status_lookup is not None:
                    self.report.polls += 1
                    try:
                        status = status_lookup(job.job_id)
                    except JobNotFound:
                        status = None
                    except RunPodError as exc:
                        self.report.problems.append(f"{style} {job.version}: status of {job.job_id} unknown: {exc}")
                        continue
                if status is not None:
                    report = job_report_from_status(status, self.now, source="poll")
                    if report.status != job.job_status or report.status == "COMPLETED":
                        work[style].evidence.append(report)
                    continue
                age = self.now - from_epoch_ms(job.created_at) if job.created_at else None
                if age is None or age > max_job_age:
                    why = (
                        "RunPod no longer knows it (results expire 30 minutes after completion)"
                        if status_lookup is not None
                        else "no status lookup is configured"
                    )
                    work[style].evidence.append(
                        JobExpired(
                            job.job_id,
                            self.now,
                            f"job {job.job_id} never reported an end: {why}, and no LoRA file for "
                            f"{style} {job.version} appeared in the store within the maximum job age "
                            f"({max_job_age})",
                        )
                    )
                if job.job_status == "COMPLETED":
                    work[style].verify = True  # finished at RunPod: is its file there?
            if summary.submitting:
                work[style].verify = True  # a POST with a lost answer: look for its job's start marker

    def _list_style_files(self, style: str) -> dict[str, ObjectInfo]:
        files = {}
        for info in self.store.list(lora_prefix(style)):
            name = info.key.rsplit("/", 1)[-1]
            if info.key.count("/") == 2 and (parse_lora_file(style, name) or (0, None))[0] >= 1:
                files[info.key] = info
        return files

    def _remove_leftovers(self, outcome: _StyleOutcome) -> None:
        """Finish an interrupted delete: remove the objects its tombstone names, once the
        document holding the tombstone is read (deleting a missing key is no error)."""
        for key in outcome.leftovers:
            if not self.dry_run:
                try:
                    self.store.delete(key)
                except StorageError as exc:
                    self.report.problems.append(f"{key}: left behind by a delete, not removed: {exc}")
                    continue
            self.report.leftovers_removed.append(key)

    def _wait_or_reject(self, item: InboxItem, job_id: str | None) -> None:
        """A body whose job no version holds waits in the inbox for the evidence that attaches it
        (its version's record of the job id, a start marker, a file), but not for ever: once it is
        older than the maximum job age, the version it could belong to has been failed (its
        submission was lost) and nothing can attach it any more, so a full reconciliation moves it
        to ``webhooks/rejected/`` with that reason. Every inbox file ends processed or rejected."""
        arrived = item.received_at
        if self.full and arrived is not None and arrived > _UNKNOWN_TIME and self.now - arrived > self.max_job_age:
            self._reject(
                item,
                f"no version claims job {job_id}: the body arrived {self.now - arrived} ago, over the maximum "
                f"job age ({self.max_job_age}), and nothing links the job to a version (no recorded job id, no "
                "request id in its body, no start marker, no LoRA file); a version whose /run answer was lost "
                "has been failed by now",
            )
            return
        self.report.webhooks_waiting.append(item.key)
        self.report.problems.append(f"{item.key}: job {job_id} is in no registry document yet; kept in the inbox")

    def _reject(self, item: InboxItem, reason: str) -> None:
        """Move an unusable inbox file to webhooks/rejected/, its reason beside it; never delete."""
        self.report.webhooks_rejected.append(item.key)
        self.report.problems.append(f"{item.key}: rejected: {reason}")
        if self.dry_run:
            return
        try:
            reject(self.store, item.key, reason)
        except (StorageError, OSError) as exc:  # an outage, or a file even the move cannot read
            self.report.problems.append(f"{item.key}: could not move to {WEBHOOK_REJECTED}/: {exc}")

    # -- settling -------------------------------------------------------------------

    def _settle_styles(self, work: dict[str, _StyleWork]) -> dict[str, _StyleOutcome]:
        pending = {s: w for s, w in work.items() if w.evidence or w.files is not None or w.verify}
        if self.workers == 1 or len(pending) < 2:
            return {s: self._settle(s, w) for s, w in pending.items()}
        with ThreadPoolExecutor(self.workers) as pool:
            futures = {s: pool.submit(self._settle, s, w) for s, w in pending.items()}
            return {s: f.result() for s, f in futures.items()}

    def _settle(self, style: str, work: _StyleWork) -> _StyleOutcome:
        outcome = _StyleOutcome()
        headers: dict[tuple[str, str], Evidence] = {}  # header reads survive a lost write race
        markers: dict[str, list[tuple[str, str, datetime]]] = {}  # version → its jobs' start markers

        def gather(doc: RegistryDocument) -> list[Evidence]:
            outcome.documents_read += 1
            outcome.problems.clear()
            evidence = list(work.evidence)
            if work.files is not None:
                outcome.leftovers[:] = _leftovers(doc, work.files)
                evidence += self._file_evidence(style, doc, work.files, outcome, headers)
            if self.full:
                evidence += self._started_jobs(style, doc, markers)
            return evidence + self._verdicts(style, merge(doc, evidence), work)

        try:
            result = self.registry.apply_with(style, gather, update_index=False, dry_run=self.dry_run)
        except (InvalidRecord, StorageError) as exc:
            outcome.problems.append(f"{style}: not reconciled: {exc}")
            return outcome
        outcome.changes = result.changes
        outcome.written = result.changed and not self.dry_run
        outcome.summary = StyleSummary.of(result.document, result.etag, self.registry.primary)
        for item, report in work.inbox:
            if find_version_by_job(result.document, report.job_id) is not None:
                outcome.matched.append(item)
            else:
                outcome.waiting.append(item)
        return outcome

    def _file_evidence(
        self,
        style: str,
        doc: RegistryDocument,
        files: dict[str, ObjectInfo],
        outcome: _StyleOutcome,
        headers: dict[tuple[str, str], Evidence],
    ) -> list[Evidence]:
        """Evidence for each file the document does not account for yet (ranged header reads)."""
        known = known_files(doc)
        found: list[Evidence] = []
        for key, info in sorted(files.items()):
            if known.get(key) == info.etag:
                continue
            if (key, info.etag) not in headers:
                headers[(key, info.etag)] = self._read_file(style, key, info, outcome)
            evidence = headers[(key, info.etag)]
            if isinstance(evidence, RejectedLora):
                outcome.problems.append(evidence.reason)
            found.append(evidence)
        return found

    def _read_file(self, style: str, key: str, info: ObjectInfo, outcome: _StyleOutcome) -> Evidence:
        parsed = parse_lora_file(style, key.rsplit("/", 1)[-1])
        assert parsed is not None
        outcome.headers_read += 1
        try:
            header = read_header(self.store, key, size=info.size)
        except InvalidLoraFile as exc:
            return RejectedLora(style, key, info.etag, str(exc), info.last_modified)
        return stored_evidence(self.store, style, key, parsed, header, info)

    def _started_jobs(
        self, style: str, doc: RegistryDocument, markers: dict[str, list[tuple[str, str, datetime]]]
    ) -> list[Evidence]:
        """The job of each version submitted with an unknown id, from the start marker its
        worker wrote (``runs/<style>/<version>/<job>.json``), when the request ids agree."""
        found: list[Evidence] = []
        for v in doc.versions:
            if v.id or not (v.claim and v.claim.maybe_submitted) or v.status not in UNFINISHED_STATUSES:
                continue
            if v.name not in markers:
                markers[v.name] = self._read_markers(style, v.name)
            for job_id, request_id, started in markers[v.name]:
                if request_id == v.request_id:
                    found.append(
                        Submission(
                            style, v.number, request_id, job_id, v.dataset_hash or "", dict(v.params or {}), started
                        )
                    )
        return found

    def _read_markers(self, style: str, version: str) -> list[tuple[str, str, datetime]]:
        out = []
        for info in self.store.list(run_marker_prefix(style, version)):
            try:
                body = json.loads(self.store.get(info.key).data)
                out.append((str(body["jobId"]), str(body["requestId"]), info.last_modified))
            except (ObjectNotFound, ValueError, KeyError, TypeError):
                self.report.problems.append(f"{info.key}: not a readable start marker; ignored")
        return out

    def _verdicts(self, style: str, merged, work: _StyleWork) -> list[Evidence]:
        """A job RunPod reported COMPLETED whose version still has no readable file in the
        store failed: the worker returned without a usable LoRA."""
        if work.files is None and not self.full:
            return []  # inbox-only run that did not list this style's files: cannot tell
        verdicts: list[Evidence] = []
        now_ms = epoch_ms(self.now)
        for v in merged.versions:
            if v.status in UNFINISHED_STATUSES and v.job_status == "COMPLETED" and v.id and v.file is None:
                verdicts.append(
                    JobExpired(
                        v.id,
                        self.now,
                        f"RunPod reported job {v.id} COMPLETED but no readable LoRA file for "
                        f"{style} {v.name} is in the store",
                    )
                )
            claim = v.claim
            if (
                v.status in UNFINISHED_STATUSES
                and not v.id
                and claim is not None
                and not claim.live(now_ms)
                and now_ms - claim.at > self.max_job_age.total_seconds() * 1000
            ):
                if claim.maybe_submitted:
                    why = (
                        f"the submission of {style} {v.name} had an unknown outcome "
                        f"({claim.note or 'its submitter stopped while posting'})"
                    )
                else:
                    why = (
                        f"{style} {v.name} was reserved but never sent to RunPod "
                        f"({claim.note or 'its submitter stopped before posting'})"
                    )
                verdicts.append(
                    SubmissionLost(
                        style,
                        v.number,
                        self.now,
                        f"{why}, and no job, webhook or LoRA file appeared within the maximum job age "
                        f"({self.max_job_age}); submit again to train a new version",
                    )
                )
        return verdicts


def _leftovers(doc: RegistryDocument, files: dict[str, ObjectInfo]) -> list[str]:
    """Listed objects a deleted version's tombstone names (same key, ETag and last-modified time):
    left behind by a delete that stopped after its tombstone. An object uploaded again under such a
    key (another ETag or time) is not one: it stays, among the superseded files (docs/registry.md,
    tombstones)."""
    removed = {f for v in doc.versions if v.deletion is not None for f in v.deletion.files}
    return sorted(key for key, info in files.items() if (key, info.etag, epoch_ms(info.last_modified)) in removed)


def stored_evidence(
    store: ObjectStore,
    style: str,
    key: str,
    parsed: tuple[int, str | None],
    header: SafetensorsHeader,
    info: ObjectInfo,
) -> StoredLora | StoredCompanion:
    """What a readable LoRA file in the store proves: a version's main file (``parsed`` from
    ``parse_lora_file``: no suffix) completes it; a file in its other layout is attached to it."""
    number, suffix = parsed
    if suffix is None:
        return StoredLora(
            style,
            key,
            number,
            store.url(key),
            info.size,
            info.etag,
            header.metadata,
            info.last_modified,
            header.layout,
            header.checksum,
        )
    return StoredCompanion(
        style, key, number, store.url(key), info.size, info.etag, header.layout, header.checksum, info.last_modified
    )
