"""The receiver: 200 only once the body is stored; bad requests write nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from lora_pipeline.storage.keys import WEBHOOK_INBOX
from lora_pipeline.webhook.app import create_app
from lora_pipeline.webhook.inbox import list_inbox
from lora_pipeline_tests.fakes.stores import FailingStore

TOKEN = "s3cret-token-0123456789"
JOB = "26945dbf-4e87-4574-ad26-b1f71e865942-e2"


def body(job_id: str = JOB, status: str = "COMPLETED", **extra) -> bytes:
    return json.dumps({"id": job_id, "status": status, **extra}).encode()


def post(app, content, *, token: str | None = TOKEN, headers=None) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://receiver") as client:
            params = {"token": token} if token is not None else {}
            return await client.post("/webhooks/runpod", params=params, content=content, headers=headers)

    return asyncio.run(go())


def stored(store) -> list[bytes]:
    return [store.get(info.key).data for info in store.list(WEBHOOK_INBOX + "/")]


def written(store) -> list[str]:
    return [info.key for info in store.list("")]


def test_a_delivery_is_stored_exactly_as_sent(local_store):
    raw = b'{"id": "%s", "status": "COMPLETED", "output": {"lora_key": "k"}}\n' % JOB.encode()
    response = post(create_app(local_store, TOKEN), raw)
    assert response.status_code == 200 and response.json()["stored"] is True
    assert stored(local_store) == [raw]


def test_the_receiver_works_on_s3_too(s3_store):
    assert post(create_app(s3_store, TOKEN), body()).status_code == 200
    assert stored(s3_store) == [body()]


def test_a_duplicate_delivery_is_acknowledged_and_not_stored_again(local_store):
    app = create_app(local_store, TOKEN)
    post(app, body())
    response = post(app, body())
    assert response.status_code == 200 and response.json()["stored"] is False
    assert len(stored(local_store)) == 1


def test_out_of_order_statuses_are_all_kept_for_the_merge_to_order(local_store):
    app = create_app(local_store, TOKEN)
    assert post(app, body(status="COMPLETED", output={"lora_key": "k"})).status_code == 200
    assert post(app, body(status="IN_PROGRESS")).status_code == 200
    assert post(app, body(status="FAILED", error="late")).status_code == 200
    assert sorted(item.status for item in list_inbox(local_store)) == ["COMPLETED", "FAILED", "IN_PROGRESS"]


@pytest.mark.parametrize("token", ["wrong", "", None, TOKEN[:-1]])
def test_a_wrong_or_missing_token_is_401_and_writes_nothing(local_store, token):
    response = post(create_app(local_store, TOKEN), body(), token=token)
    assert response.status_code == 401
    assert written(local_store) == []


def test_without_a_configured_token_any_caller_is_accepted(local_store):
    assert post(create_app(local_store, None), body(), token=None).status_code == 200


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"[]", b'{"status": "COMPLETED"}', b'{"id": "%s"}' % JOB.encode(), b""],
)
def test_a_malformed_webhook_is_400_and_writes_nothing(local_store, raw):
    response = post(create_app(local_store, TOKEN), raw)
    assert response.status_code == 400 and response.json()["error"]
    assert written(local_store) == []


@pytest.mark.parametrize(
    "fields, problem",
    [
        ({"delayTime": "soon"}, "delayTime"),
        ({"executionTime": [1]}, "executionTime"),
        ({"delayTime": True}, "delayTime"),
        ({"delayTime": float("inf")}, "delayTime"),
        ({"output": 5}, "output"),
        ({"output": "loras/s/s_v1.safetensors"}, "output"),
        ({"output": [{"lora_key": "k"}]}, "output"),
    ],
)
def test_a_body_outside_the_status_schema_is_400_and_writes_nothing(local_store, fields, problem):
    """The receiver checks the whole status schema (JobStatus), not just id and status: a body
    the sensor could not use must never reach the inbox (issue 11, item 5)."""
    raw = json.dumps({"id": JOB, "status": "COMPLETED", **fields}).encode()
    response = post(create_app(local_store, TOKEN), raw)
    assert response.status_code == 400
    assert problem in response.json()["error"]
    assert written(local_store) == []


def test_a_2_mib_body_is_413_and_writes_nothing(local_store):
    big = body(output={"blob": "x" * (2 * 1024 * 1024)})
    response = post(create_app(local_store, TOKEN), big)
    assert response.status_code == 413
    assert written(local_store) == []


def test_a_streamed_oversized_body_is_refused_without_reading_it_all(local_store):
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(64):  # 4 MiB in 64 KiB chunks, no Content-Length
            sent += 65536
            yield b" " * 65536

    response = post(create_app(local_store, TOKEN), chunks())
    assert response.status_code == 413
    assert sent <= 1024 * 1024 + 2 * 65536
    assert written(local_store) == []


def test_a_store_failure_is_503_so_runpod_delivers_again(local_store):
    flaky = FailingStore(local_store)
    app = create_app(flaky, TOKEN)
    assert post(app, body()).status_code == 503
    flaky.failing = False
    assert post(app, body()).status_code == 200
    assert stored(local_store) == [body()]


def test_a_failure_after_the_claim_is_finished_by_the_redelivery(local_store):
    flaky = FailingStore(local_store, fail_keys_with=WEBHOOK_INBOX)
    app = create_app(flaky, TOKEN)
    assert post(app, body()).status_code == 503
    flaky.failing = False
    assert post(app, body()).status_code == 200
    assert stored(local_store) == [body()]


def test_healthz_answers(local_store):
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(local_store, TOKEN))
        async with httpx.AsyncClient(transport=transport, base_url="http://receiver") as client:
            return await client.get("/healthz")

    assert asyncio.run(go()).json()["status"] == "ok"
