"""Signed completion callbacks to the app: a watch per training, a durable outbox, retries.

When the app's API launches a training with a ``webhook``, it records a *watch*
(``api/trainings/<training id>.json``: the style, the Dagster run, the URL). A pump
(``CallbackPump.run_once``, run by the API server every few seconds) turns each watch whose
training has ended into one *message* in the outbox (``api/outbox/<message id>.json``) and
then delivers every message that is due: a POST of the JSON event, signed as Standard
Webhooks specifies (``webhook-id``, ``webhook-timestamp``, ``webhook-signature: v1,<base64
HMAC-SHA256 of "<id>.<timestamp>.<body>">`` under the ``whsec_`` secret). A 2xx answer
deletes the message; anything else schedules the next attempt (``BACKOFF``, the schedule
Standard Webhooks suggests); after the last one the message moves to ``api/outbox-dead/``.

Why from the API's process and the store, not from a Dagster sensor or the recording step:
the watch and the outbox are objects in the store, so a restart (of the API, the daemon, the
machine) loses nothing and the next pass carries on; the signing secret stays with the one
process that needs it; and a training's end is read from the registry, the one place every
path into it (the completion sensors, the webhook inbox, reconciliation) ends, so no
recording path needs to know about apps. At least once: the message id is fixed per
training and outcome (``msg_<training id>_<outcome>``), written with If-None-Match, and a
message is deleted only after a 2xx, so a crash anywhere repeats a delivery with the same
``webhook-id`` (receivers deduplicate by it) and never drops one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from lora_pipeline.registry.models import RegistryDocument, Version, VersionStatus
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.storage.base import ObjectNotFound, ObjectStore, PreconditionFailed, StorageError
from lora_pipeline.storage.keys import API_DEAD, API_OUTBOX, API_TRAININGS

log = logging.getLogger(__name__)

# Delay before each retry (Standard Webhooks' suggested schedule): 8 attempts over ~27 hours.
BACKOFF = (
    timedelta(seconds=5),
    timedelta(minutes=5),
    timedelta(minutes=30),
    timedelta(hours=2),
    timedelta(hours=5),
    timedelta(hours=10),
    timedelta(hours=10),
)
# A watch whose run id was never recorded (the API died between the two writes) is failed after this.
LAUNCH_GRACE = timedelta(minutes=10)
_ENDED_RUN = ("FAILURE", "CANCELED")


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,`` + base64 HMAC-SHA256 of ``<id>.<timestamp>.<body>``
    under the key the ``whsec_`` secret encodes (Standard Webhooks, symmetric scheme)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def signed_headers(secret: str, message_id: str, body: bytes, *, timestamp: int | None = None) -> dict[str, str]:
    """The three headers of one delivery attempt (a fresh timestamp each attempt)."""
    when = int(time.time()) if timestamp is None else timestamp
    return {
        "content-type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(when),
        "webhook-signature": sign(secret, message_id, when, body),
    }


@dataclass(frozen=True)
class Watch:
    """A training whose end the app wants to be told of."""

    id: str
    style: str
    webhook: str
    created_at: str
    run_id: str | None = None
    version: str | None = None

    @property
    def key(self) -> str:
        return f"{API_TRAININGS}/{self.id}.json"

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()


def new_training_id() -> str:
    return f"trn_{uuid.uuid4().hex}"


def watch_training(store: ObjectStore, training_id: str, style: str, webhook: str) -> Watch:
    """Record the watch before the run is launched, so no launched training goes unwatched."""
    watch = Watch(training_id, style, webhook, datetime.now(UTC).isoformat())
    store.put(watch.key, watch.to_json(), if_none_match=True, content_type="application/json")
    return watch


def save_watch(store: ObjectStore, watch: Watch) -> None:
    store.put(watch.key, watch.to_json(), content_type="application/json")


@dataclass(frozen=True)
class RunFacts:
    """What the pump needs from Dagster about a run: its status and the version it claimed."""

    status: str
    version: str | None
    error: str | None = None


@dataclass
class Message:
    """One callback in the outbox."""

    id: str
    url: str
    payload: dict[str, Any]
    created_at: str
    attempts: int = 0
    next_attempt_at: str = ""
    last_error: str | None = None

    @property
    def key(self) -> str:
        return f"{API_OUTBOX}/{self.id}.json"

    def body(self) -> bytes:
        return json.dumps(self.payload, sort_keys=True, separators=(",", ":")).encode()

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()


def version_event(watch: Watch, version: Version | None, run: RunFacts | None, primary: str) -> dict[str, Any] | None:
    """The event for a training that has ended, or None while it has not (pure).

    Ended: its version completed, failed or was deleted; or its run failed or was cancelled
    before a job was submitted (no version, or a version with no job id), which no registry
    path will ever settle."""
    if version is not None and version.status.finished:
        status = version.status
        outcome = {"completed": "completed", "failed": "failed", "deleted": "failed"}[version.status.value]
        error = version.error or ("the version was deleted" if status is VersionStatus.deleted else None)
        files = {layout: {"key": f.key, "url": f.url, "size": f.size} for layout, f in version.files().items()}
        data = {"status": outcome, "error": error, "files": files, "record": version.to_dict(primary)}
    elif run is not None and run.status in _ENDED_RUN and (version is None or version.id is None):
        outcome = "canceled" if run.status == "CANCELED" else "failed"
        data = {"status": outcome, "error": run.error or f"the Dagster run ended {run.status} before a job ran"}
    else:
        return None
    return {
        "type": f"training.{outcome}",
        "timestamp": datetime.now(UTC).isoformat(),
        "data": {"trainingId": watch.id, "style": watch.style, "version": watch.version, "runId": watch.run_id, **data},
    }


@dataclass
class PumpReport:
    queued: list[str] = field(default_factory=list)
    delivered: list[str] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


Post = Callable[[str, bytes, dict[str, str]], int]


class CallbackPump:
    """One pass: settle ended trainings into messages, then deliver the due messages.

    ``run_facts(run_id)`` asks Dagster (None: unknown); ``post(url, body, headers)`` returns the
    HTTP status (raising is a failed attempt). Every step is one conditional write of one
    object, so concurrent pumps and crashes only ever repeat a delivery."""

    def __init__(
        self,
        store: ObjectStore,
        secret: str,
        *,
        run_facts: Callable[[str], RunFacts | None],
        post: Post,
        primary: str = "kohya",
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.secret = secret
        self.run_facts = run_facts
        self.post = post
        self.primary = primary
        self.clock = clock

    def run_once(self) -> PumpReport:
        report = PumpReport()
        try:
            self._settle(report)
            self._deliver(report)
        except StorageError as exc:
            report.problems.append(f"callbacks: the store failed (the next pass carries on): {exc}")
        return report

    def _settle(self, report: PumpReport) -> None:
        registry = RegistryStore(self.store, primary=self.primary)
        documents: dict[str, RegistryDocument] = {}
        for info in list(self.store.list(API_TRAININGS + "/")):
            try:
                watch = Watch(**json.loads(self.store.get(info.key).data))
            except (ObjectNotFound, ValueError, TypeError) as exc:
                report.problems.append(f"callbacks: {info.key} unreadable, left alone: {exc}")
                continue
            try:
                run = self.run_facts(watch.run_id) if watch.run_id else None
            except Exception as exc:  # noqa: BLE001 - Dagster down: this watch waits, deliveries go on
                report.problems.append(f"callbacks: run {watch.run_id} not read (next pass retries): {exc}")
                run = None
            if watch.version is None and run is not None and run.version:
                watch = replace(watch, version=run.version)
                save_watch(self.store, watch)
            version = None
            if watch.version is not None:
                if watch.style not in documents:
                    try:
                        documents[watch.style] = registry.read(watch.style)[0]
                    except ValueError as exc:  # InvalidRecord: this style's watches wait for a repair
                        report.problems.append(f"callbacks: {watch.style}'s registry unreadable: {exc}")
                        continue
                version = documents[watch.style].version(watch.version)
            event = version_event(watch, version, run, self.primary)
            if event is None and watch.run_id is None:
                if datetime.fromisoformat(watch.created_at) + LAUNCH_GRACE <= self.clock():
                    event = version_event(watch, None, RunFacts("FAILURE", None, "the run was never launched"), "")
            if event is None:
                continue
            message = Message(
                id=f"msg_{watch.id}_{event['data']['status']}",
                url=watch.webhook,
                payload=event,
                created_at=self.clock().isoformat(),
                next_attempt_at=self.clock().isoformat(),
            )
            try:
                self.store.put(message.key, message.to_json(), if_none_match=True, content_type="application/json")
                report.queued.append(message.id)
            except PreconditionFailed:
                pass  # queued by an earlier pass that died before removing the watch
            self.store.delete(watch.key)

    def _deliver(self, report: PumpReport) -> None:
        now = self.clock()
        for info in list(self.store.list(API_OUTBOX + "/")):
            try:
                stored = self.store.get(info.key)
                message = Message(**json.loads(stored.data))
            except ObjectNotFound:
                continue  # delivered by another pump meanwhile
            except (ValueError, TypeError) as exc:
                report.problems.append(f"callbacks: {info.key} unreadable, left alone: {exc}")
                continue
            if message.next_attempt_at and datetime.fromisoformat(message.next_attempt_at) > now:
                continue
            body = message.body()
            try:
                status = self.post(message.url, body, signed_headers(self.secret, message.id, body))
                error = None if 200 <= status < 300 else f"HTTP {status}"
            except Exception as exc:  # noqa: BLE001 - any failure of the app's endpoint is a failed attempt
                error = f"{type(exc).__name__}: {exc}"
            if error is None:
                self.store.delete(message.key)
                report.delivered.append(message.id)
                continue
            message.attempts += 1
            message.last_error = error
            if message.attempts > len(BACKOFF):
                self.store.put(f"{API_DEAD}/{message.id}.json", message.to_json(), content_type="application/json")
                self.store.delete(message.key)
                report.dead.append(message.id)
                log.warning(
                    "callback %s to %s given up after %d attempts: %s", message.id, message.url, message.attempts, error
                )
                continue
            message.next_attempt_at = (now + BACKOFF[message.attempts - 1]).isoformat()
            try:
                self.store.put(message.key, message.to_json(), if_match=stored.etag)
                report.retried.append(message.id)
            except (PreconditionFailed, ObjectNotFound):
                pass  # another pump moved it on
