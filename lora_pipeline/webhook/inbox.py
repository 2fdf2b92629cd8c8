"""The webhook inbox: raw RunPod webhook bodies as files in the object store.

The receiver's only job is to put the body somewhere durable before it answers
200; everything else (matching the job, updating the registry) happens later in a
sensor that reads this inbox, so a slow registry write can never make RunPod drop
a webhook. Bodies are stored byte for byte as delivered, for debugging and replay.

Idempotency: RunPod redelivers on any non-200 and the local backend, the receiver
and an operator replaying files may all write the same completion. A delivery is
identified by (job id as delivered, status). The first writer claims it with a
conditional write (If-None-Match) of a small marker under ``webhooks/seen/`` that
names the inbox key it will use; later deliveries find the claim and write nothing.
A writer that claimed but failed to write the body (store error, crash) leaves a
claim whose inbox file is missing; the next delivery finishes that claim with a
conditional write on the same deterministic key, so exactly one body lands.

What the inbox accepts: any ``.json`` object under ``webhooks/inbox/`` whose body
is a RunPod status body (``webhook_status``: the ``JobStatus`` schema plus a job id
and status safe to put in a key), whoever wrote it: the receiver, the local
backend, ``lora-pipeline webhook replay``, another receiver or an operator's copy.
The receiver's ``<stamp>_<job id>.json`` name only orders the files; a file named
otherwise is ordered by the object's last-modified time. A file that cannot be
used moves to ``webhooks/rejected/`` with its reason beside it (``reject``), so it
never blocks the files behind it and is never lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from lora_pipeline.contracts.problems import describe_validation_error, short_repr
from lora_pipeline.contracts.job_status import JobStatus, job_report_from_status
from lora_pipeline.registry.evidence import JobReport
from lora_pipeline.storage.base import ObjectInfo, ObjectNotFound, ObjectStore, PreconditionFailed, StorageError
from lora_pipeline.storage.breaker import is_outage
from lora_pipeline.registry.names import InvalidStyleName, validate_style
from lora_pipeline.storage.keys import LORAS, WEBHOOK_INBOX, WEBHOOK_PROCESSED, WEBHOOK_REJECTED, WEBHOOK_SEEN

REASON_SUFFIX = ".reason.txt"
MAX_BODY_BYTES = 1024 * 1024

_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_STATUS = re.compile(r"[A-Z_]{1,32}")
_STAMP_FORMAT = "%Y%m%dT%H%M%S%fZ"
# The receiver's names: the stamp orders them. Any other name is ordered by the object's time.
_STAMPED_NAME = re.compile(r"(?P<stamp>[0-9]{8}T[0-9]{12}Z)_")


class InvalidWebhook(ValueError):
    """A body that is not a RunPod status body; the message says what is wrong."""


@dataclass(frozen=True)
class InboxItem:
    """One inbox file. ``body`` is None and ``problem`` says why when it cannot be used.

    Problem files are never deleted: they are evidence of what was delivered. The
    sensor and reconciliation move them to ``webhooks/rejected/`` with the problem
    beside them (``reject``), and an operator decides what to do with them.
    ``received_at`` is the stamp of a receiver-named file, else the object's time;
    ``job_status`` is the validated body.
    """

    key: str
    body: dict[str, Any] | None
    problem: str | None = None
    received_at: datetime | None = None
    job_status: JobStatus | None = None

    @property
    def name(self) -> str:
        """The key below ``webhooks/inbox/`` (kept when the file moves)."""
        return inbox_name(self.key)

    @property
    def job_id(self) -> str | None:
        return self.body["id"] if self.body else None

    @property
    def status(self) -> str | None:
        return self.body["status"] if self.body else None

    def usable_status(self) -> tuple[JobStatus | None, str]:
        """The validated status body, or None and why the file cannot be used (then it belongs in
        ``webhooks/rejected/``): what the webhook sensor and reconciliation both ask of a file."""
        if self.job_status is not None:
            return self.job_status, ""
        if self.body is None:
            return None, self.problem or "unusable webhook body"
        try:
            return webhook_status(self.body), ""
        except InvalidWebhook as exc:
            return None, str(exc)


def route_style(job_styles: Mapping[str, str], status: JobStatus) -> str | None:
    """The style a finished job belongs to: the registry's (``job_styles``: base job id → style,
    from the index), else the one its output names. None: the registry does not know the job
    yet, and its file stays in the inbox."""
    return job_styles.get(status.base_id) or style_from_output(status.output)


def style_from_output(output: dict[str, Any] | None) -> str | None:
    """The style a job's output names (``style``, or the folder of ``lora_key``), if valid."""
    if not isinstance(output, dict):
        return None
    candidates: tuple[Any, ...] = (output.get("style"),)
    key = output.get("lora_key")
    if isinstance(key, str) and key.startswith(LORAS + "/") and key.count("/") == 2:
        candidates = (*candidates, key.split("/")[1])
    for candidate in candidates:
        if isinstance(candidate, str):
            try:
                return validate_style(candidate)
            except InvalidStyleName:
                continue
    return None


def validate_job_id(job_id: Any) -> str:
    """A job id safe to put in an object key (RunPod's are UUIDs with a suffix)."""
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise InvalidWebhook(
            f"invalid job id {job_id!r}: expected 1 to 128 letters, digits, '-' or '_' "
            "(RunPod ids look like 60902e6c-08a1-426e-9cb9-9eaec90f5e2b-u1)"
        )
    return job_id


def parse_webhook_body(body: bytes) -> dict[str, Any]:
    """The decoded body, if it is a RunPod status body (``webhook_status``).

    Raises InvalidWebhook naming the problem otherwise. This is the one validator
    of the receiver, the inbox (sensor, reconciliation) and ``webhook replay``.
    """
    return _parse(body)[0]


def webhook_status(decoded: Any) -> JobStatus:
    """A decoded webhook body checked against the full status schema (``JobStatus``).

    Beyond the schema, the job id and status must be safe in an object key (they
    name the inbox file and the delivery claim). Raises InvalidWebhook naming the
    first problems; never anything else, whatever the body holds.
    """
    if not isinstance(decoded, Mapping):
        raise InvalidWebhook(f"body must be a JSON object, got {_json_type(decoded)}")
    if "id" not in decoded or "status" not in decoded:
        missing = [k for k in ("id", "status") if k not in decoded]
        raise InvalidWebhook(f"body lacks {' and '.join(repr(k) for k in missing)}")
    validate_job_id(decoded["id"])
    status = decoded["status"]
    if not isinstance(status, str) or not _STATUS.fullmatch(status.strip().upper()):
        raise InvalidWebhook(f"invalid status {short_repr(status)}: expected a RunPod status like COMPLETED")
    try:
        parsed = JobStatus.model_validate(dict(decoded))
        parsed.model_dump_json()  # what the sensor hands to the recording run must serialise
    except ValidationError as exc:
        raise InvalidWebhook(f"not a RunPod status body: {describe_validation_error(exc)}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise InvalidWebhook(f"not a RunPod status body: {type(exc).__name__}: {short_repr(str(exc))}") from None
    return parsed


def _parse(body: bytes) -> tuple[dict[str, Any], JobStatus]:
    if len(body) > MAX_BODY_BYTES:
        raise InvalidWebhook(f"body is {len(body)} bytes, over the {MAX_BODY_BYTES}-byte limit")
    try:
        decoded = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidWebhook(f"body is not JSON: {exc}") from None
    except RecursionError:
        raise InvalidWebhook("body is not usable JSON: nested too deeply") from None
    return decoded, webhook_status(decoded)


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def inbox_key(job_id: str, received_at: datetime) -> str:
    """``webhooks/inbox/<UTC yyyymmddThhmmssffffffZ>_<job_id>.json``: sorts by arrival."""
    if received_at.tzinfo is None:
        raise ValueError("received_at must be timezone-aware (UTC)")
    stamp = received_at.astimezone(UTC).strftime(_STAMP_FORMAT)
    return f"{WEBHOOK_INBOX}/{stamp}_{validate_job_id(job_id)}.json"


def inbox_name(key: str) -> str:
    """``key`` below ``webhooks/inbox/``, whatever its form; ValueError outside the inbox."""
    prefix = WEBHOOK_INBOX + "/"
    name = key[len(prefix) :] if key.startswith(prefix) else ""
    if not name or name.endswith("/") or any(part in ("", ".", "..") for part in name.split("/")):
        raise ValueError(f"not an inbox key: {key!r}")
    return name


def processed_key(key: str) -> str:
    """Where ``mark_processed`` moves an inbox file: ``webhooks/processed/<same name>``."""
    return f"{WEBHOOK_PROCESSED}/{inbox_name(key)}"


def rejected_key(key: str) -> str:
    """Where ``reject`` moves an inbox file: ``webhooks/rejected/<same name>``."""
    return f"{WEBHOOK_REJECTED}/{inbox_name(key)}"


def seen_key(job_id: str, status: str) -> str:
    """The claim marker of one (job id, status) delivery."""
    return f"{WEBHOOK_SEEN}/{validate_job_id(job_id)}_{status.strip().upper()}.json"


def write_webhook(store: ObjectStore, body: bytes, *, received_at: datetime | None = None) -> str | None:
    """Store a webhook body in the inbox exactly as delivered; idempotent.

    Returns the new inbox key, or None when this (job id, status) was already
    delivered. Raises InvalidWebhook for a body that is not a status body (nothing
    is written), and lets StorageError through so the receiver answers 5xx and
    RunPod delivers again.
    """
    parsed = _parse(body)[1]
    job_id, status = parsed.id, parsed.status
    received_at = received_at or datetime.now(UTC)
    key = inbox_key(job_id, received_at)
    claim = seen_key(job_id, status)
    marker = json.dumps(
        {"inboxKey": key, "jobId": job_id, "status": status, "receivedAt": received_at.isoformat()},
        sort_keys=True,
    ).encode()
    try:
        store.put(claim, marker, if_none_match=True, content_type="application/json")
    except PreconditionFailed:
        claimed = _claimed_key(store, claim, default=key)
        if claimed is None or _delivered(store, claimed):
            return None
        key = claimed
    try:
        store.put(key, body, if_none_match=True, content_type="application/json")
    except PreconditionFailed:
        return None
    return key


def inbox_listing(store: ObjectStore) -> list[tuple[datetime, str, ObjectInfo]]:
    """The inbox's files as (arrival, key, info) in arrival order, from one listing and no reads:
    what ``list_inbox`` decodes, and what the health checks count. Dot-files (a copy or an
    upload in progress) and folder markers are left out."""
    listed: list[tuple[datetime, str, ObjectInfo]] = []
    for info in store.list(WEBHOOK_INBOX + "/"):
        try:
            name = inbox_name(info.key)
        except ValueError:
            continue  # a folder marker ("webhooks/inbox/" or "…/sub/")
        if name.rsplit("/", 1)[-1].startswith("."):
            continue
        listed.append((_arrival(name, info), info.key, info))
    listed.sort(key=lambda entry: (entry[0], entry[1]))
    return listed


def list_inbox(store: ObjectStore) -> Iterator[InboxItem]:
    """Every inbox file in arrival order, decoded, or with the problem that stops it.

    Arrival is the stamp of a receiver-named file, else the object's last-modified
    time; any ``.json`` file whose body is a status body is usable, whatever its
    name. Dot-files (a copy or an upload in progress) and folder markers are
    skipped; any other file is listed with its problem.
    """
    for received_at, key, info in inbox_listing(store):
        if not key.lower().endswith(".json"):
            yield InboxItem(
                key, None, "not a .json file: the inbox takes RunPod status bodies as <name>.json", received_at
            )
            continue
        if info.size > MAX_BODY_BYTES:  # not read: it could be anything, of any size
            yield InboxItem(key, None, f"body is {info.size} bytes, over the {MAX_BODY_BYTES}-byte limit", received_at)
            continue
        try:
            data = store.get(key).data
        except ObjectNotFound:
            continue  # processed by someone else between the listing and the read
        except (StorageError, OSError) as exc:
            if is_outage(exc):
                raise  # the store is failing: the caller skips the pass, not this file
            yield InboxItem(key, None, f"unreadable: {type(exc).__name__}: {exc}", received_at)
            continue
        try:
            body, status = _parse(data)
        except InvalidWebhook as exc:
            yield InboxItem(key, None, str(exc), received_at)
            continue
        yield InboxItem(key, body, None, received_at, status)


def reject(store: ObjectStore, key: str, reason: str) -> str:
    """Move an unusable inbox file to ``webhooks/rejected/`` with ``<name>.reason.txt`` beside it.

    Nothing is lost: the copy and the reason are written before the inbox file is
    deleted (a crash in between leaves it in both places, and the next pass
    finishes the move), and a different file already rejected under the same name
    is kept: this one then goes to ``<stem>.<hash of its bytes><suffix>``. A file
    over the body size limit is copied through a temporary file, never held in
    memory. Returns the rejected key. Lets StorageError through.
    """
    target = rejected_key(key)
    info = store.head(key)
    if info is None:
        return target  # moved by someone else since it was listed
    try:
        if info.size > MAX_BODY_BYTES:
            target = _copy_large(store, key, target)
        else:
            target = _copy_small(store, key, target)
    except ObjectNotFound:
        return target
    store.put(
        target + REASON_SUFFIX,
        (reason.rstrip("\n") + "\n").encode("utf-8", errors="backslashreplace"),
        content_type="text/plain",
    )
    store.delete(key)
    return target


def _copy_small(store: ObjectStore, key: str, target: str) -> str:
    data = store.get(key).data
    if _put_once(store, target, data):
        return target
    hashed = _hashed(target, hashlib.sha256(data).hexdigest())
    if _put_once(store, hashed, data):
        return hashed
    unique = _hashed(target, uuid.uuid4().hex)  # only if something else took that name too
    store.put(unique, data, if_none_match=True, content_type="application/octet-stream")
    return unique


def _copy_large(store: ObjectStore, key: str, target: str) -> str:
    with tempfile.TemporaryDirectory(prefix="lora-reject-") as tmp:
        path = Path(tmp) / "body"
        store.download_file(key, path)
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        hashed = _hashed(target, digest.hexdigest())  # content-addressed: a clash is the same bytes
        with contextlib.suppress(PreconditionFailed):
            store.upload_file(hashed, path, if_none_match=True)
        return hashed


def _hashed(target: str, digest: str) -> str:
    """``dir/name.json`` → ``dir/name.<digest[:12]>.json``."""
    head, dot, suffix = target.rpartition(".")
    if not dot or "/" in suffix:
        return f"{target}.{digest[:12]}"
    return f"{head}.{digest[:12]}.{suffix}"


def _put_once(store: ObjectStore, key: str, data: bytes, content_type: str = "application/octet-stream") -> bool:
    """Write ``key`` unless it exists; True when it now holds ``data``."""
    try:
        store.put(key, data, if_none_match=True, content_type=content_type)
    except PreconditionFailed:
        try:
            return store.get(key).data == data
        except ObjectNotFound:
            return _put_once(store, key, data, content_type)
    return True


def mark_processed(store: ObjectStore, key: str) -> str:
    """Move an inbox file to ``webhooks/processed/`` once its evidence is in the registry.

    Any inbox name works: the file keeps it (``webhooks/processed/<same name>``).
    Copy first, then delete, so a crash in between leaves the file in both places
    (processed again, harmlessly: merging is idempotent) rather than in neither.
    A different file processed earlier under the same name (two ``status.json``
    drops) is kept: this one goes to ``<stem>.<hash of its bytes>.json``.
    Returns the processed key.
    """
    target = processed_key(key)
    try:
        data = store.get(key).data
    except ObjectNotFound:
        if store.head(target) is not None:
            return target
        raise
    if not _put_once(store, target, data, "application/json"):
        target = _hashed(target, hashlib.sha256(data).hexdigest())
        _put_once(store, target, data, "application/json")  # a clash here is the same bytes
    store.delete(key)
    return target


def job_report_from_body(
    body: dict[str, Any], at: datetime, source: Literal["poll", "webhook"] = "webhook"
) -> JobReport:
    """Registry evidence from a decoded webhook body."""
    return job_report_from_status(webhook_status(body), at, source)


def _claimed_key(store: ObjectStore, claim: str, *, default: str) -> str | None:
    try:
        marker = json.loads(store.get(claim).data)
        key = marker["inboxKey"]
    except ObjectNotFound:
        return default  # the claim was removed by hand: deliver afresh
    except (ValueError, KeyError, TypeError):
        return None  # an unreadable claim: treat the delivery as seen rather than guess
    if not isinstance(key, str):
        return None
    try:
        inbox_name(key)
    except ValueError:
        return None
    return key


def _delivered(store: ObjectStore, key: str) -> bool:
    # Inbox first: mark_processed writes the processed copy before deleting this one.
    return store.head(key) is not None or store.head(processed_key(key)) is not None


def _arrival(name: str, info: ObjectInfo) -> datetime:
    """The stamp of a receiver-named file, else when the object was last written."""
    match = _STAMPED_NAME.match(name.rsplit("/", 1)[-1])
    stamp = _parse_stamp(match.group("stamp")) if match else None
    if stamp is not None:
        return stamp
    when = info.last_modified
    if when is None:
        return datetime.min.replace(tzinfo=UTC)
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _parse_stamp(stamp: str) -> datetime | None:
    try:
        return datetime.strptime(stamp, _STAMP_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None
