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
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from lora_pipeline.storage.base import ObjectNotFound, ObjectStore, PreconditionFailed
from lora_pipeline.storage.keys import WEBHOOK_INBOX, WEBHOOK_PROCESSED

if TYPE_CHECKING:
    from lora_pipeline.registry.evidence import JobReport

WEBHOOK_SEEN = "webhooks/seen"
MAX_BODY_BYTES = 1024 * 1024

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_STATUS = re.compile(r"^[A-Z_]{1,32}$")
_STAMP_FORMAT = "%Y%m%dT%H%M%S%fZ"
_INBOX_NAME = re.compile(r"^(?P<stamp>\d{8}T\d{12}Z)_(?P<job_id>[A-Za-z0-9][A-Za-z0-9_-]*)\.json$")


class InvalidWebhook(ValueError):
    """A body that is not a RunPod status body; the message says what is wrong."""


@dataclass(frozen=True)
class InboxItem:
    """One inbox file. ``body`` is None and ``problem`` says why when it cannot be used.

    Problem files are reported, never deleted: they are evidence of what was
    delivered, and an operator decides what to do with them.
    """

    key: str
    body: dict[str, Any] | None
    problem: str | None = None
    received_at: datetime | None = None

    @property
    def job_id(self) -> str | None:
        return self.body["id"] if self.body else None

    @property
    def status(self) -> str | None:
        return self.body["status"] if self.body else None


def validate_job_id(job_id: Any) -> str:
    """A job id safe to put in an object key (RunPod's are UUIDs with a suffix)."""
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        raise InvalidWebhook(
            f"invalid job id {job_id!r}: expected 1 to 128 letters, digits, '-' or '_' "
            "(RunPod ids look like 60902e6c-08a1-426e-9cb9-9eaec90f5e2b-u1)"
        )
    return job_id


def parse_webhook_body(body: bytes) -> dict[str, Any]:
    """The decoded body, if it is a JSON object with a usable ``id`` and ``status``.

    Raises InvalidWebhook naming the problem otherwise.
    """
    if len(body) > MAX_BODY_BYTES:
        raise InvalidWebhook(f"body is {len(body)} bytes, over the {MAX_BODY_BYTES}-byte limit")
    try:
        decoded = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidWebhook(f"body is not JSON: {exc}") from None
    if not isinstance(decoded, dict):
        raise InvalidWebhook(f"body must be a JSON object, got {type(decoded).__name__}")
    if "id" not in decoded or "status" not in decoded:
        missing = [k for k in ("id", "status") if k not in decoded]
        raise InvalidWebhook(f"body lacks {' and '.join(repr(k) for k in missing)}")
    validate_job_id(decoded["id"])
    status = decoded["status"]
    if not isinstance(status, str) or not _STATUS.match(status.strip().upper()):
        raise InvalidWebhook(f"invalid status {status!r}: expected a RunPod status like COMPLETED")
    return decoded


def inbox_key(job_id: str, received_at: datetime) -> str:
    """``webhooks/inbox/<UTC yyyymmddThhmmssffffffZ>_<job_id>.json``: sorts by arrival."""
    if received_at.tzinfo is None:
        raise ValueError("received_at must be timezone-aware (UTC)")
    stamp = received_at.astimezone(UTC).strftime(_STAMP_FORMAT)
    return f"{WEBHOOK_INBOX}/{stamp}_{validate_job_id(job_id)}.json"


def processed_key(key: str) -> str:
    """Where ``mark_processed`` moves an inbox file."""
    name = _inbox_name(key)
    return f"{WEBHOOK_PROCESSED}/{name}"


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
    decoded = parse_webhook_body(body)
    job_id, status = decoded["id"], decoded["status"].strip().upper()
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
        key = _claimed_key(store, claim, default=key)
        if key is None or _delivered(store, key):
            return None
    try:
        store.put(key, body, if_none_match=True, content_type="application/json")
    except PreconditionFailed:
        return None
    return key


def list_inbox(store: ObjectStore) -> Iterator[InboxItem]:
    """Every inbox file in arrival order, decoded, or with the problem that stops it."""
    for info in store.list(WEBHOOK_INBOX + "/"):
        name = info.key.rsplit("/", 1)[-1]
        match = _INBOX_NAME.match(name)
        received_at = _parse_stamp(match.group("stamp")) if match else None
        try:
            data = store.get(info.key).data
        except ObjectNotFound:
            continue  # processed by someone else between the listing and the read
        try:
            body = parse_webhook_body(data)
        except InvalidWebhook as exc:
            yield InboxItem(info.key, None, str(exc), received_at)
            continue
        if match is None:
            yield InboxItem(info.key, None, f"unexpected inbox file name {name!r}", received_at)
        elif match.group("job_id") != body["id"]:
            yield InboxItem(
                info.key,
                None,
                f"file name names job {match.group('job_id')!r} but the body names {body['id']!r}",
                received_at,
            )
        else:
            yield InboxItem(info.key, body, None, received_at)


def mark_processed(store: ObjectStore, key: str) -> str:
    """Move an inbox file to ``webhooks/processed/`` once its evidence is in the registry.

    Copy first, then delete, so a crash in between leaves the file in both places
    (processed again, harmlessly: merging is idempotent) rather than in neither.
    Returns the processed key.
    """
    target = processed_key(key)
    try:
        data = store.get(key).data
    except ObjectNotFound:
        if store.head(target) is not None:
            return target
        raise
    with contextlib.suppress(PreconditionFailed):
        store.put(target, data, if_none_match=True, content_type="application/json")
    store.delete(key)
    return target


def job_report_from_body(
    body: dict[str, Any], at: datetime, source: Literal["poll", "webhook"] = "webhook"
) -> JobReport:
    """Registry evidence from a decoded webhook body."""
    from lora_pipeline.runpod.backend import JobStatus
    from lora_pipeline.runpod.reports import job_report_from_status

    return job_report_from_status(JobStatus.model_validate(body), at, source)


def _claimed_key(store: ObjectStore, claim: str, *, default: str) -> str | None:
    try:
        marker = json.loads(store.get(claim).data)
        key = marker["inboxKey"]
    except ObjectNotFound:
        return default  # the claim was removed by hand: deliver afresh
    except (ValueError, KeyError, TypeError):
        return None  # an unreadable claim: treat the delivery as seen rather than guess
    return key if isinstance(key, str) and key.startswith(WEBHOOK_INBOX + "/") else None


def _delivered(store: ObjectStore, key: str) -> bool:
    # Inbox first: mark_processed writes the processed copy before deleting this one.
    return store.head(key) is not None or store.head(processed_key(key)) is not None


def _inbox_name(key: str) -> str:
    prefix = WEBHOOK_INBOX + "/"
    if not key.startswith(prefix) or "/" in key[len(prefix):]:
        raise ValueError(f"not an inbox key: {key!r}")
    return key[len(prefix):]


def _parse_stamp(stamp: str) -> datetime | None:
    try:
        return datetime.strptime(stamp, _STAMP_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None
