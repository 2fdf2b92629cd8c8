"""Registry documents in the object store: optimistic concurrency and the derived index.

Every write is read-merge-write with the document's ETag (If-Match, or
If-None-Match for a new document); a writer that loses the race re-reads and
merges again, so concurrent writers (a reconciliation, a webhook, a submission)
never lose each other's evidence: merging is idempotent and order-independent,
so re-merging is always safe. A document is written only when its content
changed. ``registry/index.json`` is derived from the documents (styles, latest
version, unfinished jobs, a fingerprint of each style's known files) so a
webhook can be routed and a reconciliation can skip styles with nothing new.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from lora_pipeline.registry.evidence import Claim, Evidence, Submission
from lora_pipeline.registry.jobids import base_job_id
from lora_pipeline.registry.merge import merge, next_version_number
from lora_pipeline.registry.models import (
    UNFINISHED_STATUSES,
    InvalidRecord,
    LoraFile,
    RegistryDocument,
    Version,
    VersionStatus,
)
from lora_pipeline.registry.layouts import primary_layout
from lora_pipeline.registry.names import parse_lora_file, validate_style
from lora_pipeline.storage.base import ObjectStore, PreconditionFailed, StoredObject
from lora_pipeline.storage.documents import JSON, read_object, update_object
from lora_pipeline.storage.keys import INDEX_KEY, REGISTRY, lora_prefix, registry_key

INDEX_SCHEMA_VERSION = 1
_DOC_NAME = "training_versions.json"


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
            "style": self.style, "version": self.version, "change": self.kind,
            "fields": list(self.fields), "statusBefore": self.before, "statusAfter": self.after,
            "foldedRecords": self.folded,
        }


@dataclass(frozen=True)
class ApplyResult:
    document: RegistryDocument
    changed: bool
    changes: list[VersionChange] = field(default_factory=list)
    etag: str | None = None


class ClaimLost(RuntimeError):
    """The submit claim this caller held was taken over (its lease ran out); it must not POST."""


@dataclass(frozen=True)
class ClaimResult:
    """What ``claim_version`` decided: existing | claimed | busy | unknown, and the version."""

    kind: str
    version: Version


@dataclass(frozen=True)
class UnfinishedJob:
    """An unfinished version's job, as the index records it for routing and polling."""

    job_id: str
    version: str
    job_status: str | None
    created_at: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.job_id, "version": self.version, "jobStatus": self.job_status,
                "createdAt": self.created_at}


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

    @classmethod
    def of(cls, doc: RegistryDocument, etag: str | None = None) -> StyleSummary:
        statuses: dict[str, int] = {}
        for v in doc.versions:
            statuses[v.status.value] = statuses.get(v.status.value, 0) + 1
        unfinished = {
            base_job_id(v.id): UnfinishedJob(v.id, v.name, v.job_status, v.created_at)
            for v in doc.versions if v.id and v.status in UNFINISHED_STATUSES
        }
        return cls(
            style=doc.style,
            revision=doc.revision,
            latest_version=doc.versions[-1].name if doc.versions else None,
            statuses=statuses,
            files_fingerprint=files_fingerprint(known_files(doc)),
            unfinished=unfinished,
            jobs=tuple(sorted({b for v in doc.versions for b in v.job_bases})),
            submitting={
                v.name: v.claim.at for v in doc.versions
                if v.claim and not v.id and v.status in UNFINISHED_STATUSES
            },
            etag=etag,
        )

    def to_dict(self) -> dict[str, Any]:
        out = {
            "revision": self.revision, "latestVersion": self.latest_version, "statuses": self.statuses,
            "filesFingerprint": self.files_fingerprint,
            "unfinished": {b: j.to_dict() for b, j in sorted(self.unfinished.items())},
            "jobs": list(self.jobs),
            "etag": self.etag,
        }
        if self.submitting:
            out["submitting"] = dict(sorted(self.submitting.items()))
        return out

    @classmethod
    def from_dict(cls, style: str, raw: Mapping[str, Any]) -> StyleSummary:
        return cls(
            style=style,
            revision=int(raw.get("revision") or 0),
            latest_version=raw.get("latestVersion"),
            statuses=dict(raw.get("statuses") or {}),
            files_fingerprint=str(raw.get("filesFingerprint") or ""),
            unfinished={
                b: UnfinishedJob(j.get("id", b), j.get("version", ""), j.get("jobStatus"), j.get("createdAt"))
                for b, j in (raw.get("unfinished") or {}).items()
            },
            jobs=tuple(raw.get("jobs") or ()),
            submitting={str(k): int(v) for k, v in (raw.get("submitting") or {}).items()},
            etag=raw.get("etag"),
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
    latest: dict[str, Any] = {}
    entries = [v.file for v in doc.versions if v.file] + [c for v in doc.versions for c in v.companions]
    for entry in [*entries, *doc.rejected_files, *doc.superseded_files]:
        current = latest.get(entry.key)
        if current is None or entry.last_seen > current.last_seen:
            latest[entry.key] = entry
    return {key: entry.etag for key, entry in latest.items()
            if not (isinstance(entry, LoraFile) and entry.layout is None)}


def files_fingerprint(files: Mapping[str, str]) -> str:
    """A short digest of key → ETag pairs and the primary layout (``LORA_PRIMARY_FORMAT``): equal
    digests mean no new or changed file, and ``loraUrl`` already names the right layout."""
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(f"{primary_layout()}\n".encode())
    for key in sorted(files):
        digest.update(f"{key}\0{files[key]}\n".encode())
    return digest.hexdigest()[:20]


def diff_versions(old: RegistryDocument, new: RegistryDocument) -> list[VersionChange]:
    """What a write changes, version by version (updatedAt alone is not a change)."""
    stored: dict[int, list[Version]] = {}
    for v in old.versions:
        for n in v.numbers:
            stored.setdefault(n, []).append(v)
    changes = []
    for v in new.versions:
        olds = list({id(o): o for n in v.numbers for o in stored.get(n, [])}.values())
        after = _comparable(v.to_dict())
        if not olds:
            changes.append(VersionChange(new.style, v.name, "created", (), None, v.status.value))
            continue
        before = _comparable(olds[0].to_dict())
        fields = tuple(k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k))
        if len(olds) > 1:
            changes.append(VersionChange(new.style, v.name, "folded", fields, olds[0].status.value,
                                         v.status.value, folded=len(olds)))
        elif fields:
            changes.append(VersionChange(new.style, v.name, "updated", fields, olds[0].status.value,
                                         v.status.value))
    return changes


def _comparable(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "updatedAt"}


def _content(document: Mapping[str, Any]) -> dict[str, Any]:
    """A stored document minus what does not count as a change (revision, updatedAt)."""
    out = {k: v for k, v in document.items() if k != "revision"}
    out["versions"] = [
        _comparable(v) if isinstance(v, dict) else v for v in document.get("versions") or []
    ]
    return out


@dataclass(frozen=True)
class StoredDocument:
    """A document as read, with what a conditional write needs (ETag, raw content)."""

    document: RegistryDocument  # as stored, duplicates included
    etag: str | None
    raw: dict[str, Any] | None
    data: bytes | None


class RegistryStore:
    """The registry on top of an ObjectStore. Safe to share between threads."""

    def __init__(self, store: ObjectStore, *, max_attempts: int = 100,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.store = store
        self.max_attempts = max_attempts
        self.clock = clock

    # -- reading ---------------------------------------------------------------------

    def read(self, style: str) -> tuple[RegistryDocument, str | None]:
        """The style's document, duplicates folded, and the ETag it was read at (None: absent)."""
        stored = self.read_stored(style)
        return merge(stored.document, ()), stored.etag

    def read_stored(self, style: str) -> StoredDocument:
        """The document exactly as stored (duplicates not folded: what asset checks inspect),
        with its ETag and bytes. Raises InvalidRecord for a document that cannot be read."""
        return _parse(style, read_object(self.store, registry_key(style)))

    def styles(self) -> list[str]:
        """Every style with a registry document (from the listing: the documents are the truth)."""
        return list(self.document_etags())

    def document_etags(self) -> dict[str, str]:
        """style → ETag of every registry document, from one listing of ``registry/``."""
        found: dict[str, str] = {}
        for info in self.store.list(REGISTRY + "/"):
            parts = info.key.split("/")
            if len(parts) == 3 and parts[2] == _DOC_NAME:
                try:
                    found[validate_style(parts[1])] = info.etag
                except ValueError:
                    continue
        return found

    def read_index(self) -> tuple[RegistryIndex, str | None]:
        """The index as stored; it may lag the documents (see ``fresh_index``)."""
        current = read_object(self.store, INDEX_KEY)
        return _parse_index(current), current.etag if current else None

    def fresh_index(self, *, repair: bool = True, problems: list[str] | None = None) -> tuple[RegistryIndex, list[str]]:
        """The index with every stale entry rebuilt from its document; and the stale styles.

        The index is written after its document, so a crash or a store error between
        the two leaves it behind: a submitted job in no "unfinished" list is never
        polled and its webhook never routed. Each summary records the ETag of the
        document it was derived from; one listing of ``registry/`` shows which
        documents changed since (or that the index lacks), and only those are read.
        Every reader that routes or polls by the index goes through here, so a lagging
        index costs one extra read, never a stranded job. ``repair`` writes the
        rebuilt summaries back. A document that cannot be read is reported in
        ``problems`` and keeps its old summary.
        """
        index, _ = self.read_index()  # before the listing: a style it names was listed too
        listed = self.document_etags()
        stale = sorted(
            style for style, etag in listed.items()
            if style not in index.styles or index.styles[style].etag != etag
        )
        gone = [style for style in index.styles if style not in listed]  # documents removed by hand
        summaries = []
        for style in stale:
            try:
                stored = self.read_stored(style)
            except InvalidRecord as exc:
                if problems is not None:
                    problems.append(str(exc))
                continue
            summaries.append(StyleSummary.of(merge(stored.document, ()), stored.etag))
        if (summaries or gone) and repair:
            self.update_index(summaries, remove=gone)
        styles = {style: summary for style, summary in index.styles.items() if style not in gone}
        styles.update((summary.style, summary) for summary in summaries)
        return RegistryIndex(styles), stale

    def find_style_for_job(self, job_id: str) -> str | None:
        """The style whose document holds ``job_id`` (by base UUID), via the index."""
        index, _ = self.fresh_index()
        return index.jobs.get(base_job_id(job_id))

    # -- writing ---------------------------------------------------------------------

    def apply(self, style: str, evidence: Iterable[Evidence], *, update_index: bool = True,
              dry_run: bool = False) -> ApplyResult:
        """Merge ``evidence`` into the style's document and write it if it changed."""
        evidence = list(evidence)
        return self.apply_with(style, lambda _doc: evidence, update_index=update_index, dry_run=dry_run)

    def apply_with(self, style: str, gather: Callable[[RegistryDocument], list[Evidence]], *,
                   update_index: bool = True, dry_run: bool = False) -> ApplyResult:
        """Like ``apply``, with evidence that depends on the document (``gather(current)``;
        called again on the newer document after a lost race), e.g. headers of the files
        the document does not know yet."""
        result, _ = self._update(style, lambda doc: (gather(doc), None), update_index, dry_run)
        return result

    def claim_version(self, style: str, *, request_id: str, dataset_hash: str, params: dict[str, Any],
                      owner: str, lease: timedelta, reuse_completed: bool = False,
                      at: datetime | None = None) -> ClaimResult:
        """Find or reserve the version for this training, and claim the right to submit it:
        one conditional write, so of any number of concurrent submitters one holds the claim.

        The version is an existing one with the same request id, or an unfinished one
        (also a completed one when ``reuse_completed``) with the same dataset hash and
        params; otherwise the next free number (past LoRA files no document mentions
        yet, so a new version never takes an old file for its own). The answer:

        * ``existing``: it has a job (or is completed); submit nothing.
        * ``claimed``: this caller holds the claim (new, or taken over from a holder
          whose lease ran out before it POSTed); go on with ``start_posting``.
        * ``busy``: another submitter holds a live claim; its job id will appear.
        * ``unknown``: a POST for it is under way or had a lost answer; a job may exist,
          so nobody submits it again (the webhook, the job's output and reconciliation
          settle it).
        """
        validate_style(style)
        wanted = {VersionStatus.completed} if reuse_completed else set()
        wanted |= UNFINISHED_STATUSES
        now = at or self.clock()
        now_ms = int(now.timestamp() * 1000)

        def decide(doc: RegistryDocument) -> tuple[list[Evidence], ClaimResult | None]:
            match = next((v for v in reversed(doc.versions) if v.request_id == request_id or (
                v.status in wanted and v.dataset_hash == dataset_hash and v.params == params)), None)
            if match is not None:
                claim = match.claim
                if match.id or match.status == VersionStatus.completed:
                    return [], ClaimResult("existing", match)
                if claim is not None and claim.live(now_ms):
                    return [], ClaimResult("busy", match)
                if claim is not None and claim.maybe_submitted:
                    return [], ClaimResult("unknown", match)
                number = match.number
                evidence: list[Evidence] = []
            else:
                number = max(next_version_number(doc), self._next_file_number(style))
                evidence = [Submission(style, number, request_id, None, dataset_hash, dict(params), now)]
            evidence.append(Claim(style, number, owner, "claimed", now, now + lease))
            return evidence, None

        result, decided = self._update(style, decide, True, False)
        if decided is not None:
            return decided
        version = next(v for v in result.document.versions
                       if v.claim is not None and v.claim.owner == owner and v.claim.at == now_ms)
        return ClaimResult("claimed", version)

    def advance_claim(self, style: str, version: Version, phase: str, *, lease: timedelta | None = None,
                      note: str | None = None, at: datetime | None = None) -> Version:
        """Move this caller's claim on ``version`` to ``phase`` (posting, released or unknown).

        ``posting`` is written only while the claim is still this caller's and live (the
        last step before POST /run): a holder whose lease ran out and was taken over gets
        ClaimLost and must not POST. ``released`` and ``unknown`` record the outcome.
        """
        claim = version.claim
        if claim is None:
            raise ValueError(f"{style} {version.name} holds no claim to advance")
        now = at or self.clock()
        now_ms = int(now.timestamp() * 1000)
        lease_until = now + lease if lease is not None else datetime.fromtimestamp(claim.lease_until / 1000, UTC)
        claim_at = datetime.fromtimestamp(claim.at / 1000, UTC)

        def decide(doc: RegistryDocument) -> tuple[list[Evidence], ClaimResult | None]:
            current = doc.version(version.number)
            held = current is not None and current.claim is not None and (
                current.claim.owner, current.claim.at) == (claim.owner, claim.at)
            if phase == "posting" and held and current.claim.phase == "posting":
                return [], ClaimResult("existing", current)  # our own write landed, its answer was lost
            if phase == "posting" and not (held and current.claim.phase == "claimed" and current.claim.live(now_ms)):
                raise ClaimLost(f"{style} {version.name}: the submit claim of {claim.owner} was lost "
                                "(its lease ran out and another submitter took it over); not submitting")
            if not held:
                return [], ClaimResult("existing", current or version)  # a successor owns it now
            return [Claim(style, version.number, claim.owner, phase, claim_at, lease_until, note)], None

        result, decided = self._update(style, decide, True, False)
        if decided is not None:
            return decided.version
        updated = result.document.version(version.number)
        assert updated is not None
        return updated

    def _next_file_number(self, style: str) -> int:
        """One past every version number a LoRA file names, a lone kohya file of a job that
        died before its main upload included (its key belongs to that version's request)."""
        numbers = [
            (parse_lora_file(style, info.key.rsplit("/", 1)[-1]) or (0, None))[0]
            for info in self.store.list(lora_prefix(style))
        ]
        return max(numbers, default=0) + 1

    def _update(self, style: str, decide, update_index: bool, dry_run: bool):
        """One optimistic read-merge-write (storage.documents.update_object does the loop).

        ``decide(folded_document)`` returns (evidence, None), or ([], answer) to
        answer without writing anything.
        """
        outcome: dict[str, Any] = {}

        def rewrite(current: StoredObject | None) -> bytes | None:
            stored = _parse(style, current)
            old = stored.document
            folded = merge(old, ())
            evidence, existing = decide(folded)
            outcome.update(existing=existing, result=ApplyResult(folded, False, [], stored.etag))
            if existing is not None:
                return None
            new = merge(old, evidence)
            if (stored.raw is None and not new.versions and not new.rejected_files) or (
                stored.raw is not None and _content(stored.raw) == _content(new.to_dict())
            ):
                outcome["result"] = ApplyResult(new, False, [], stored.etag)
                return None
            outcome["result"] = ApplyResult(new, True, diff_versions(old, new), stored.etag)
            if dry_run:
                return None
            new = replace(new, revision=old.revision + 1)
            outcome["result"] = replace(outcome["result"], document=new)
            if old.legacy and stored.data is not None:
                self._backup(style, stored)
            return new.to_json()

        written = update_object(self.store, registry_key(style), rewrite,
                                max_attempts=self.max_attempts, content_type=JSON)
        result: ApplyResult = outcome["result"]
        if result.changed and not dry_run:
            result = replace(result, etag=written.etag if written else None)
            if update_index:
                self.update_index([StyleSummary.of(result.document, result.etag)])
        return result, outcome["existing"]

    def _backup(self, style: str, stored: StoredDocument) -> str:
        """Keep the legacy bytes before the first rewrite (named by their ETag: idempotent)."""
        backup = f"{REGISTRY}/{style}/backups/training_versions.legacy-{stored.etag}.json"
        try:
            self.store.put(backup, stored.data or b"", if_none_match=True, content_type="application/json")
        except PreconditionFailed:
            pass  # the same bytes are already kept
        return backup

    def update_index(self, summaries: Iterable[StyleSummary], *, remove: Iterable[str] = ()) -> bool:
        """Put newer summaries into the index (optimistic loop). A summary older than the one
        there (lower document revision) is skipped, so racing writers cannot roll it back.
        Returns whether the index was written."""
        summaries = list(summaries)
        remove = set(remove)
        wrote = False

        def rewrite(current: StoredObject | None) -> bytes | None:
            nonlocal wrote
            index = _parse_index(current)
            styles = dict(index.styles)
            for s in summaries:
                known = styles.get(s.style)
                if known is None or known.revision < s.revision or (known.revision == s.revision and known != s):
                    styles[s.style] = s
            for style in remove:
                styles.pop(style, None)
            wrote = styles != index.styles or current is None
            return RegistryIndex(styles).to_json() if wrote else None

        update_object(self.store, INDEX_KEY, rewrite, max_attempts=self.max_attempts, content_type=JSON)
        return wrote


def _parse(style: str, current: StoredObject | None) -> StoredDocument:
    if current is None:
        return StoredDocument(RegistryDocument(style), None, None, None)
    document = RegistryDocument.from_json(current.data, style)
    return StoredDocument(document, current.etag, json.loads(current.data), current.data)


def _parse_index(current: StoredObject | None) -> RegistryIndex:
    if current is None:
        return RegistryIndex()
    try:
        return RegistryIndex.from_json(current.data)
    except (ValueError, AttributeError, TypeError):
        return RegistryIndex()  # derived data: a broken index is rebuilt from the documents
