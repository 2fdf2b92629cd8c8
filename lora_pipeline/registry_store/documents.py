"""Registry documents in the object store: optimistic concurrency, submit claims.

Every write is read-merge-write with the document's ETag (If-Match, or
If-None-Match for a new document); a writer that loses the race re-reads and
merges again, so concurrent writers (a reconciliation, a webhook, a submission)
never lose each other's evidence: merging is idempotent and order-independent,
so re-merging is always safe. A document is written only when its content
changed. After each write the style's line in ``registry/index.json``
(``registry_store.index``) is brought up to date; ``fresh_index`` repairs one that lags.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, TypedDict

from lora_pipeline.clock import SYSTEM_CLOCK, Clock
from lora_pipeline.contracts.training import version_identity
from lora_pipeline.registry.aliases import AliasAction, alias_stacks, reachable_versions, validate_alias
from lora_pipeline.registry.evidence import AliasMove, Claim, ClaimPhase, Evidence, Submission, VersionDeleted
from lora_pipeline.registry.jobids import base_job_id
from lora_pipeline.registry.merge import merge, next_version_number
from lora_pipeline.registry.models import (
    epoch_ms,
    from_epoch_ms,
    UNFINISHED_STATUSES,
    InvalidRecord,
    LoraFile,
    RegistryDocument,
    RejectedFile,
    UnknownVersion,
    Version,
    VersionStatus,
)
from lora_pipeline.registry.names import parse_lora_file, parse_version_name, validate_style
from lora_pipeline.registry.tombstones import DeletedObject
from lora_pipeline.registry_store.changes import VersionChange, diff_versions, document_content
from lora_pipeline.registry_store.alias_pointers import publish_alias_pointers
from lora_pipeline.registry_store.index import RegistryIndex, StyleSummary, parse_index
from lora_pipeline.registry_store.lora_files import is_readable_lora
from lora_pipeline.settings import get_settings
from lora_pipeline.storage.base import ObjectStore, PreconditionFailed, StorageError, StoredObject
from lora_pipeline.storage.documents import JSON, TooManyConflicts, read_object, update_object
from lora_pipeline.storage.keys import INDEX_KEY, REGISTRY, alias_pointer_key, lora_prefix, registry_key

_DOC_NAME = "training_versions.json"


@dataclass(frozen=True)
class ApplyResult:
    document: RegistryDocument
    changed: bool
    changes: list[VersionChange] = field(default_factory=list)
    etag: str | None = None


class Refused(ValueError):
    """An operator's request the registry refuses (unknown version or alias, a version that
    cannot be promoted or deleted…); the message says why, naming the style and version."""


@dataclass(frozen=True)
class AliasResult:
    """What ``move_alias`` did: ``moved`` (False: the alias already pointed there), the
    alias, where it points now and where it pointed before, and the document after."""

    alias: str
    version: str
    previous: str | None
    moved: bool
    document: RegistryDocument
    pointer_problem: str | None = None  # why the alias's published pointer was not updated


@dataclass(frozen=True)
class DeleteResult:
    """What ``delete_version`` did (or, ``dry_run``, would do): the objects removed, whether the
    version was already deleted (then only leftovers were removed), and the document after."""

    style: str
    version: str
    removed: list[str]
    already_deleted: bool
    dry_run: bool
    document: RegistryDocument


class ClaimLost(RuntimeError):
    """The submit claim this caller held was taken over (its lease ran out); it must not POST."""


@dataclass(frozen=True)
class ClaimResult:
    """What ``claim_version`` decided: existing | claimed | busy | unknown, and the version."""

    kind: str
    version: Version


class _Outcome(TypedDict, total=False):
    """What ``_update``'s rewrite decided on its last read: the result, and an answer given
    instead of a write."""

    result: ApplyResult
    existing: ClaimResult | None


Decide = Callable[[RegistryDocument], tuple[list[Evidence], ClaimResult | None]]


@dataclass(frozen=True)
class StoredDocument:
    """A document as read, with what a conditional write needs (ETag, raw content)."""

    document: RegistryDocument  # as stored, duplicates included
    etag: str | None
    raw: dict[str, Any] | None
    data: bytes | None


class RegistryStore:
    """The registry on top of an ObjectStore. Safe to share between threads."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        max_attempts: int = 100,
        clock: Clock = SYSTEM_CLOCK,
        primary: str | None = None,
    ) -> None:
        """``primary``: the layout documents' ``loraUrl`` names (default: the setting LORA_PRIMARY_FORMAT);
        ``clock``: what claims, alias moves and deletions are stamped with, and how a lost write
        race backs off."""
        self.store = store
        self.primary = primary or get_settings().primary_format
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
        return parse_index(current), current.etag if current else None

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
            style for style, etag in listed.items() if style not in index.styles or index.styles[style].etag != etag
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
            summaries.append(StyleSummary.of(merge(stored.document, ()), stored.etag, self.primary))
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

    def apply(
        self, style: str, evidence: Iterable[Evidence], *, update_index: bool = True, dry_run: bool = False
    ) -> ApplyResult:
        """Merge ``evidence`` into the style's document and write it if it changed."""
        evidence = list(evidence)
        return self.apply_with(style, lambda _doc: evidence, update_index=update_index, dry_run=dry_run)

    def apply_with(
        self,
        style: str,
        gather: Callable[[RegistryDocument], list[Evidence]],
        *,
        update_index: bool = True,
        dry_run: bool = False,
    ) -> ApplyResult:
        """Like ``apply``, with evidence that depends on the document (``gather(current)``;
        called again on the newer document after a lost race), e.g. headers of the files
        the document does not know yet."""
        result, _ = self._update(style, lambda doc: (gather(doc), None), update_index, dry_run)
        return result

    def claim_version(
        self,
        style: str,
        *,
        request_id: str,
        dataset_hash: str,
        params: dict[str, Any],
        owner: str,
        lease: timedelta,
        reuse_completed: bool = False,
        at: datetime | None = None,
        family: str | None = None,
        base_model: str | None = None,
    ) -> ClaimResult:
        """Find or reserve the version for this training, and claim the right to submit it:
        one conditional write, so of any number of concurrent submitters one holds the claim.

        The version is an existing one with the same request id, or an unfinished one
        (also a completed one when ``reuse_completed``) with the same dataset hash and
        params, sample settings aside (``version_identity``); otherwise the next free number (past LoRA files no document mentions
        yet, so a new version never takes an old file for its own). The answer:

        * ``existing``: it has a job (or is completed); submit nothing.
        * ``claimed``: this caller holds the claim (new, or taken over from a holder
          whose lease ran out before it POSTed); go on with ``start_posting``.
        * ``busy``: another submitter holds a live claim; its job id will appear.
        * ``unknown``: a POST for it is under way or had a lost answer; a job may exist,
          so nobody submits it again (the webhook, the job's output and reconciliation
          settle it).

        A new version records the request's ``family`` and ``base_model`` from the start; a version
        trained on another base model is another training (one recorded without a base model, before
        the field existed, matches any).
        """
        # Long only in lines: a keyword-only signature and docstring of 27 lines; the decision is `decide`.
        validate_style(style)
        wanted = {VersionStatus.completed} if reuse_completed else set()
        wanted |= UNFINISHED_STATUSES
        now = at or self.clock.now()
        now_ms = epoch_ms(now)
        stamped = [now_ms]  # when the claim written last is stamped (see below)

        identity = version_identity(params)

        def decide(doc: RegistryDocument) -> tuple[list[Evidence], ClaimResult | None]:
            match = next(
                (
                    v
                    for v in reversed(doc.versions)
                    if v.status is not VersionStatus.deleted
                    and (
                        v.request_id == request_id
                        or (
                            v.status in wanted
                            and v.dataset_hash == dataset_hash
                            and version_identity(v.params or {}) == identity
                            and _same_base(v, base_model)
                        )
                    )
                ),
                None,
            )
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
                evidence = [
                    Submission(style, number, request_id, None, dataset_hash, dict(params), now, family, base_model)
                ]
            # Claims merge latest-stamp-wins: a takeover is stamped after the claim it replaces even
            # when that one's submitter had a clock running ahead of ours, or it would not land.
            since = match.claim.at + 1 if match is not None and match.claim is not None else now_ms
            stamped[0] = max(now_ms, since)
            start = from_epoch_ms(stamped[0])
            evidence.append(Claim(style, number, owner, "claimed", start, start + lease))
            return evidence, None

        result, decided = self._update(style, decide, True, False)
        if decided is not None:
            return decided
        version = next(
            v
            for v in result.document.versions
            if v.claim is not None and v.claim.owner == owner and v.claim.at == stamped[0]
        )
        return ClaimResult("claimed", version)

    def advance_claim(
        self,
        style: str,
        version: Version,
        phase: ClaimPhase,
        *,
        lease: timedelta | None = None,
        note: str | None = None,
        at: datetime | None = None,
    ) -> Version:
        """Move this caller's claim on ``version`` to ``phase`` (posting, released or unknown).

        ``posting`` is written only while the claim is still this caller's and live (the
        last step before POST /run): a holder whose lease ran out and was taken over gets
        ClaimLost and must not POST. ``released`` and ``unknown`` record the outcome.
        """
        claim = version.claim
        if claim is None:
            raise ValueError(f"{style} {version.name} holds no claim to advance")
        now = at or self.clock.now()
        now_ms = epoch_ms(now)
        lease_until = now + lease if lease is not None else from_epoch_ms(claim.lease_until)
        claim_at = from_epoch_ms(claim.at)

        def lost() -> ClaimLost:
            return ClaimLost(
                f"{style} {version.name}: the submit claim of {claim.owner} was lost "
                "(its lease ran out and another submitter took it over); not submitting"
            )

        def decide(doc: RegistryDocument) -> tuple[list[Evidence], ClaimResult | None]:
            current = doc.version(version.number)
            if (
                current is None
                or current.claim is None
                or (current.claim.owner, current.claim.at) != (claim.owner, claim.at)
            ):  # not held
                if phase == "posting":
                    raise lost()
                return [], ClaimResult("existing", current or version)  # a successor owns it now
            if phase == "posting" and current.claim.phase == "posting":
                return [], ClaimResult("existing", current)  # our own write landed, its answer was lost
            if phase == "posting" and not (current.claim.phase == "claimed" and current.claim.live(now_ms)):
                raise lost()
            return [Claim(style, version.number, claim.owner, phase, claim_at, lease_until, note)], None

        result, decided = self._update(style, decide, True, False)
        if decided is not None:
            return decided.version
        updated = result.document.version(version.number)
        assert updated is not None
        return updated

    def move_alias(
        self,
        style: str,
        alias: str,
        *,
        action: AliasAction,
        by: str,
        version: str | None = None,
        reason: str | None = None,
        at: datetime | None = None,
    ) -> AliasResult:
        """Point ``alias`` at ``version`` (``promote``), back at the version it pointed at before
        its current one (``rollback``), or nowhere (``remove``: the alias ends): one conditional
        write, recorded in the alias history.

        Only a completed version whose files parse can be an alias's target. Raises Refused for an
        unknown style, version or alias, a version that is not completed (or whose file is not
        readable), and a rollback with nothing to roll back to (a removal starts an alias's
        history afresh: nothing before it is rolled back to)."""
        validate_style(style)
        try:
            validate_alias(alias)
        except ValueError as exc:
            raise Refused(str(exc)) from None
        if action == "promote" and not version:
            raise Refused("promote needs a version: V3, or an alias as @staging")
        now = at or self.clock.now()

        def decide(doc: RegistryDocument) -> tuple[list[Evidence], ClaimResult | None]:
            if not doc.versions:
                raise Refused(f"style {style!r} has no registry document (or no versions)")
            stack = alias_stacks(doc.alias_history).get(alias, [])
            current = stack[-1] if stack else None
            seq = max((e.seq for e in doc.alias_history), default=0) + 1
            if action == "remove":
                if current is None:
                    known = ", ".join(sorted(doc.aliases)) or "none"
                    raise Refused(f"{style} has no alias {alias!r} to remove (its aliases: {known})")
                pointed = doc.version(current)
                assert pointed is not None  # an alias points at a version of the document
                return [AliasMove(style, alias, pointed.number, action, by, now, seq, current, reason)], None
            target = _alias_target(doc, style, alias, stack, version if action == "promote" else None)
            self._check_promotable(style, alias, target)
            if current == target.name:
                return [], ClaimResult("unchanged", target)
            return [AliasMove(style, alias, target.number, action, by, now, seq, current, reason)], None

        result, unchanged = self._update(style, decide, True, False)
        problem = self._publish_pointer(result.document, alias)
        if unchanged is not None:
            return AliasResult(alias, unchanged.version.name, unchanged.version.name, False, result.document, problem)
        entry = next(e for e in reversed(result.document.alias_history) if e.alias == alias)
        return AliasResult(alias, entry.version, entry.previous, True, result.document, problem)

    def _publish_pointer(self, document: RegistryDocument, alias: str) -> str | None:
        """Publish the alias's pointer (``loras/<style>/<style>@<alias>.json``) after the document;
        the reason when that failed (the move stands; ``registry reconcile`` publishes it)."""
        try:
            publish_alias_pointers(self.store, document, self.primary, [alias])
        except (StorageError, TooManyConflicts) as exc:
            return (
                f"the alias pointer {alias_pointer_key(document.style, alias)} was not updated ({exc}); "
                "`lora-pipeline registry reconcile` publishes it"
            )
        return None

    def _check_promotable(self, style: str, alias: str, version: Version) -> None:
        if version.status is not VersionStatus.completed:
            raise Refused(
                f"{style} {version.name} is {version.status.value}: only a completed version can be {alias}'s version"
            )
        files = [f for f in (version.file, *version.companions) if f is not None]
        if not files:
            raise Refused(f"{style} {version.name} has no LoRA file recorded")
        for f in files:
            if not is_readable_lora(self.store, f.key):
                raise Refused(
                    f"{style} {version.name}: its file {f.key} is missing or not a readable "
                    "safetensors LoRA; run `registry reconcile`, then try again"
                )

    def delete_version(
        self,
        style: str,
        version: str,
        *,
        by: str,
        reason: str | None = None,
        dry_run: bool = False,
        at: datetime | None = None,
        keep_rollback_targets: bool = False,
    ) -> DeleteResult:
        """Delete a version's files (every layout, every spelling of its name) and leave a tombstone.

        The tombstone is written first (one conditional write, which refuses a version an alias
        points at, or one still training, and with ``keep_rollback_targets`` (the retention) one
        an alias can roll back to), then the objects go; a crash in between leaves files the
        next delete of the same version removes. Nothing brings a deleted version back, and its
        number is never reused. Raises Refused."""
        # Long only in lines: the signature and docstring take 17; the rest is one decide + the file removal.
        validate_style(style)
        if parse_version_name(version) is None:
            raise Refused(f"{version!r} is not a version name like V3")
        now = at or self.clock.now()
        listed: dict[int, list[DeletedObject]] = {}
        for info in self.store.list(lora_prefix(style)):
            parsed = parse_lora_file(style, info.key.rsplit("/", 1)[-1])
            if parsed is not None and info.key.count("/") == 2:
                listed.setdefault(parsed[0], []).append((info.key, info.etag, epoch_ms(info.last_modified)))
        planned: list[DeletedObject] = []
        chosen: list[str] = []

        def decide(doc: RegistryDocument) -> tuple[list[Evidence], ClaimResult | None]:
            target = doc.version(version)
            if target is None:
                names = ", ".join(v.name for v in doc.versions) or "none"
                raise Refused(f"{style} has no version {version} (it has: {names})")
            aliases = doc.aliases_of(target)
            if aliases:
                raise Refused(
                    f"{style} {target.name} is what {', '.join(aliases)} point(s) at: promote another "
                    "version (or roll back) first"
                )
            targets = reachable_versions(doc.alias_history).get(target.name) if keep_rollback_targets else None
            if targets:
                raise Refused(f"{style} {target.name} is in the rollback history of {', '.join(targets)}: kept")
            if target.status not in (VersionStatus.completed, VersionStatus.failed, VersionStatus.deleted):
                raise Refused(f"{style} {target.name} is {target.status.value}: wait until it finishes")
            objects: set[DeletedObject] = {o for n in target.numbers for o in listed.get(n, [])}
            recorded: list[LoraFile | RejectedFile] = [f for f in (target.file, *target.companions) if f is not None]
            others: list[LoraFile | RejectedFile] = [*doc.superseded_files, *doc.rejected_files]
            recorded += [
                f
                for f in others
                if (parse_lora_file(style, f.key.rsplit("/", 1)[-1]) or (0, None))[0] in target.numbers
            ]
            objects.update((f.key, f.etag, f.last_modified) for f in recorded)
            planned[:] = sorted(objects)
            chosen[:] = [target.name]
            if target.deletion is not None and objects <= set(target.deletion.files):
                return [], ClaimResult("deleted", target)
            return [VersionDeleted(style, target.number, by, now, reason, tuple(planned))], None

        written, already = self._update(style, decide, True, dry_run)
        keys = sorted({key for key, _, _ in planned})  # already deleted: the leftovers still listed
        if not dry_run:
            for key in keys:
                self.store.delete(key)
        return DeleteResult(style, chosen[0], keys, already is not None, dry_run, written.document)

    def _next_file_number(self, style: str) -> int:
        """One past every version number a LoRA file names, a lone kohya file of a job that
        died before its main upload included (its key belongs to that version's request)."""
        numbers = [
            (parse_lora_file(style, info.key.rsplit("/", 1)[-1]) or (0, None))[0]
            for info in self.store.list(lora_prefix(style))
        ]
        return max(numbers, default=0) + 1

    def _update(
        self, style: str, decide: Decide, update_index: bool, dry_run: bool
    ) -> tuple[ApplyResult, ClaimResult | None]:
        """One optimistic read-merge-write (storage.documents.update_object does the loop).

        ``decide(folded_document)`` returns (evidence, None), or ([], answer) to
        answer without writing anything.
        """
        outcome: _Outcome = {}

        def rewrite(current: StoredObject | None) -> bytes | None:
            stored = _parse(style, current)
            old = stored.document
            folded = merge(old, ())
            evidence, existing = decide(folded)
            outcome["existing"] = existing
            outcome["result"] = ApplyResult(folded, False, [], stored.etag)
            if existing is not None:
                return None
            new = merge(old, evidence)
            if (stored.raw is None and not new.versions and not new.rejected_files) or (
                stored.raw is not None and document_content(stored.raw) == document_content(new.to_dict(self.primary))
            ):
                outcome["result"] = ApplyResult(new, False, [], stored.etag)
                return None
            outcome["result"] = ApplyResult(new, True, diff_versions(old, new, self.primary), stored.etag)
            if dry_run:
                return None
            new = replace(new, revision=old.revision + 1)
            outcome["result"] = replace(outcome["result"], document=new)
            if old.legacy and stored.data is not None:
                self._backup(style, stored)
            return new.to_json(self.primary)

        written = update_object(
            self.store,
            registry_key(style),
            rewrite,
            max_attempts=self.max_attempts,
            content_type=JSON,
            sleep=self.clock.sleep,
        )
        result: ApplyResult = outcome["result"]
        if result.changed and not dry_run:
            result = replace(result, etag=written.etag if written else None)
            if update_index:
                self.update_index([StyleSummary.of(result.document, result.etag, self.primary)])
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
            index = parse_index(current)
            styles = dict(index.styles)
            for s in summaries:
                known = styles.get(s.style)
                if known is None or known.revision < s.revision or (known.revision == s.revision and known != s):
                    styles[s.style] = s
            for style in remove:
                styles.pop(style, None)
            wrote = styles != index.styles or current is None
            return RegistryIndex(styles).to_json() if wrote else None

        update_object(
            self.store, INDEX_KEY, rewrite, max_attempts=self.max_attempts, content_type=JSON, sleep=self.clock.sleep
        )
        return wrote


def _parse(style: str, current: StoredObject | None) -> StoredDocument:
    if current is None:
        return StoredDocument(RegistryDocument(style), None, None, None)
    document = RegistryDocument.from_json(current.data, style)
    return StoredDocument(document, current.etag, json.loads(current.data), current.data)


def _alias_target(doc: RegistryDocument, style: str, alias: str, stack: list[str], version: str | None) -> Version:
    """The version a promote (``version`` given) or a rollback (``version`` None: the one before
    the alias's current one in ``stack``) points the alias at; Refused, saying why, when none."""
    if version is not None:
        try:
            return doc.resolve(version)
        except UnknownVersion as exc:
            raise Refused(str(exc)) from None
    if not stack:
        known = ", ".join(sorted(doc.aliases)) or "none"
        removed = next((e for e in reversed(doc.alias_history) if e.alias == alias), None)
        if removed is not None and removed.action == "remove":
            raise Refused(
                f"{style} {alias} was removed (it pointed at {removed.version}); a removal is not "
                f"rolled back: promote a version to set it again (its aliases: {known})"
            )
        raise Refused(f"{style} has no alias {alias!r} to roll back (its aliases: {known})")
    if len(stack) < 2:
        raise Refused(
            f"{style} {alias} has no earlier version to roll back to (it has only ever pointed at {stack[-1]})"
        )
    target = doc.version(stack[-2])
    if target is None:
        raise Refused(f"{style} {alias}: its earlier version {stack[-2]} is not in the document")
    return target


def _same_base(version: Version, base_model: str | None) -> bool:
    """Whether ``version`` was trained on ``base_model`` (as far as either says)."""
    return base_model is None or version.base_model is None or version.base_model.value == base_model
