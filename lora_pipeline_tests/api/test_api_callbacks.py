"""Signed callbacks: verified by an independent receiver (the `standardwebhooks` package) over real
HTTP; retried with backoff; at least once across crashes, with one id per training and outcome."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from standardwebhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from lora_pipeline.lifecycle.callbacks import (
    BACKOFF,
    CallbackPump,
    RunFacts,
    Watch,
    save_watch,
    watch_training,
)
from lora_pipeline.storage.base import StorageError
from lora_pipeline.storage.keys import API_DEAD, API_OUTBOX, API_TRAININGS
from lora_pipeline_tests.fakes.uvicorn_thread import serve_in_thread

from ..registry.test_aliases_and_tombstones import S, seed
from .conftest import SECRET


class Receiver:
    """An app's webhook endpoint: verifies each delivery as Standard Webhooks says, answers
    ``answers`` in turn (then 200), keeps what it verified."""

    def __init__(self, answers: list[int] | None = None) -> None:
        self.answers = list(answers or [])
        self.verified: list[tuple[str, dict]] = []
        self.refused: list[str] = []
        self.lock = threading.Lock()

    def app(self) -> Starlette:
        async def hook(request: Request) -> JSONResponse:
            body = await request.body()
            try:
                event = Webhook(SECRET).verify(body, dict(request.headers))
            except WebhookVerificationError as exc:
                self.refused.append(str(exc))
                return JSONResponse({"error": "bad signature"}, status_code=400)
            with self.lock:
                self.verified.append((request.headers["webhook-id"], event))
                status = self.answers.pop(0) if self.answers else 200
            return JSONResponse({}, status_code=status)

        return Starlette(routes=[Route("/hook", hook, methods=["POST"])])


@pytest.fixture
def receiver():
    with serve_in_thread((r := Receiver()).app()) as url:
        r.url = url + "/hook"
        yield r


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def http_post(url: str, body: bytes, headers: dict[str, str]) -> int:
    return httpx.post(url, content=body, headers=headers, timeout=10).status_code


def pump_for(store, runs: dict[str, RunFacts], clock: Clock | None = None, post=http_post) -> CallbackPump:
    return CallbackPump(store, SECRET, run_facts=runs.get, post=post, clock=clock or Clock())


def watched(store, url: str, run_id: str = "run-1", training: str = "trn_1") -> Watch:
    watch = watch_training(store, training, S, url)
    watch = Watch(**{**watch.__dict__, "run_id": run_id})
    save_watch(store, watch)
    return watch


def test_a_completed_version_is_posted_once_signed_as_standard_webhooks(local_store, receiver):
    seed(local_store)
    watched(local_store, receiver.url)
    pump = pump_for(local_store, {"run-1": RunFacts("SUCCESS", "V2")})
    report = pump.run_once()
    assert report.queued == report.delivered == ["msg_trn_1_completed"] and not report.problems
    [(message_id, event)] = receiver.verified
    assert message_id == "msg_trn_1_completed" and event["type"] == "training.completed"
    data = event["data"]
    assert (data["style"], data["version"], data["runId"], data["status"]) == (S, "V2", "run-1", "completed")
    assert set(data["files"]) == {"kohya", "diffusers"} and data["record"]["name"] == "V2"
    assert not list(local_store.list(API_TRAININGS + "/")) and not list(local_store.list(API_OUTBOX + "/"))
    assert pump.run_once().delivered == [] and len(receiver.verified) == 1


def test_the_verifier_refuses_a_tampered_body_or_another_secret():
    from lora_pipeline.lifecycle.callbacks import signed_headers

    body = b'{"type":"training.completed"}'
    headers = signed_headers(SECRET, "msg_x", body)
    assert Webhook(SECRET).verify(body, headers) == {"type": "training.completed"}
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body.replace(b"completed", b"failed"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY").verify(body, headers)


def test_a_failed_version_and_a_run_that_died_before_its_job_are_told(local_store, receiver):
    seed(local_store)
    watched(local_store, receiver.url, "run-1", "trn_a")
    watched(local_store, receiver.url, "run-2", "trn_b")
    runs = {
        "run-1": RunFacts("SUCCESS", "V4"),
        "run-2": RunFacts("FAILURE", None, "the Dagster run run-2 ended FAILURE"),
    }
    pump_for(local_store, runs).run_once()
    events = {event["data"]["trainingId"]: event for _id, event in receiver.verified}
    assert events["trn_a"]["type"] == "training.failed" and "CUDA out of memory" in events["trn_a"]["data"]["error"]
    assert events["trn_b"]["type"] == "training.failed" and events["trn_b"]["data"]["version"] is None


def test_a_training_still_running_is_not_told_yet(local_store, receiver):
    seed(local_store)
    watched(local_store, receiver.url)
    pump = pump_for(local_store, {"run-1": RunFacts("STARTED", None)})
    assert pump.run_once().queued == []
    pump.run_facts = {"run-1": RunFacts("STARTED", "V1")}.get
    assert pump.run_once().delivered == ["msg_trn_1_completed"]


def test_failed_deliveries_are_retried_with_backoff_under_the_same_id(local_store, receiver):
    seed(local_store)
    receiver.answers = [500, 503]
    watched(local_store, receiver.url)
    clock = Clock()
    pump = pump_for(local_store, {"run-1": RunFacts("SUCCESS", "V1")}, clock)
    assert pump.run_once().retried == ["msg_trn_1_completed"]
    assert pump.run_once().retried == []  # not due yet: the first retry waits BACKOFF[0]
    clock.now += BACKOFF[0]
    assert pump.run_once().retried == ["msg_trn_1_completed"]
    stored = json.loads(local_store.get(f"{API_OUTBOX}/msg_trn_1_completed.json").data)
    assert stored["attempts"] == 2 and stored["last_error"] == "HTTP 503"
    assert datetime.fromisoformat(stored["next_attempt_at"]) == clock.now + BACKOFF[1]
    clock.now += BACKOFF[1]
    assert pump.run_once().delivered == ["msg_trn_1_completed"]
    assert [i for i, _ in receiver.verified] == ["msg_trn_1_completed"] * 3


def test_an_unreachable_endpoint_is_retried_then_given_up_on(local_store, free_url):
    seed(local_store)
    watched(local_store, free_url)
    clock = Clock()
    pump = pump_for(local_store, {"run-1": RunFacts("SUCCESS", "V1")}, clock)
    for delay in (timedelta(0), *BACKOFF):
        clock.now += delay
        report = pump.run_once()
    assert report.dead == ["msg_trn_1_completed"]
    dead = json.loads(local_store.get(f"{API_DEAD}/msg_trn_1_completed.json").data)
    assert dead["attempts"] == len(BACKOFF) + 1 and "ConnectError" in dead["last_error"]
    assert not list(local_store.list(API_OUTBOX + "/"))


@pytest.fixture
def free_url():
    from lora_pipeline_tests.conftest import free_port

    return f"http://127.0.0.1:{free_port()}/hook"


class CrashOnce:
    """A store whose first delete of a key under ``prefix`` fails (a crash between two writes)."""

    def __init__(self, inner, prefix: str) -> None:
        self.inner, self.prefix, self.crashed = inner, prefix, False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def delete(self, key: str) -> None:
        if key.startswith(self.prefix) and not self.crashed:
            self.crashed = True
            raise StorageError("crash")
        self.inner.delete(key)


def test_a_crash_after_queueing_queues_nothing_twice(local_store, receiver):
    seed(local_store)
    watched(local_store, receiver.url)
    crashing = CrashOnce(local_store, API_TRAININGS)
    pump = pump_for(crashing, {"run-1": RunFacts("SUCCESS", "V1")})
    first = pump.run_once()
    assert first.queued == ["msg_trn_1_completed"] and first.problems and receiver.verified == []
    second = pump.run_once()
    assert second.queued == [] and second.delivered == ["msg_trn_1_completed"]
    assert len(receiver.verified) == 1


def test_a_crash_after_a_delivery_repeats_it_with_the_same_id(local_store, receiver):
    seed(local_store)
    watched(local_store, receiver.url)
    pump = pump_for(CrashOnce(local_store, API_OUTBOX), {"run-1": RunFacts("SUCCESS", "V1")})
    assert pump.run_once().problems
    assert pump.run_once().delivered == ["msg_trn_1_completed"]
    ids = [i for i, _ in receiver.verified]
    assert ids == ["msg_trn_1_completed", "msg_trn_1_completed"]  # at least once; the receiver dedups by id


def test_concurrent_pumps_deliver_every_message_with_one_id_each(local_store, receiver):
    seed(local_store)
    for n in range(6):
        watched(local_store, receiver.url, f"run-{n}", f"trn_{n}")
    runs = {f"run-{n}": RunFacts("SUCCESS", f"V{1 + n % 3}") for n in range(6)}
    pumps = [pump_for(local_store, runs) for _ in range(3)]
    threads = [threading.Thread(target=p.run_once) for p in pumps]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in pumps:
        p.run_once()
    assert {i for i, _ in receiver.verified} == {f"msg_trn_{n}_completed" for n in range(6)}
    assert not list(local_store.list(API_OUTBOX + "/")) and not list(local_store.list(API_TRAININGS + "/"))


def test_a_watch_whose_run_was_never_launched_fails_after_the_grace(local_store, receiver):
    watch_training(local_store, "trn_z", S, receiver.url)
    clock = Clock()
    pump = pump_for(local_store, {}, clock)
    assert pump.run_once().queued == []
    clock.now += timedelta(minutes=11)
    assert pump.run_once().delivered == ["msg_trn_z_failed"]
    assert receiver.verified[0][1]["data"]["error"] == "the run was never launched"


def test_queued_messages_go_out_while_dagster_is_down(local_store, receiver):
    seed(local_store)
    watched(local_store, receiver.url, "run-1", "trn_1")
    pump_for(local_store, {"run-1": RunFacts("SUCCESS", "V1")}, post=lambda *_a: 500).run_once()
    watched(local_store, receiver.url, "run-2", "trn_2")

    def dagster_down(_run_id):
        raise ConnectionError("Dagster is down")

    pump = CallbackPump(
        local_store, SECRET, run_facts=dagster_down, post=http_post, clock=lambda: Clock().now + BACKOFF[0]
    )
    report = pump.run_once()
    assert report.delivered == ["msg_trn_1_completed"] and "Dagster is down" in report.problems[0]
    assert local_store.head(f"{API_TRAININGS}/trn_2.json") is not None  # waits for the next pass
