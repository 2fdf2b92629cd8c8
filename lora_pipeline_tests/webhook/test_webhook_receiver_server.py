"""The receiver under a real uvicorn server: concurrency, and RunPod's own deliveries."""

from __future__ import annotations

import asyncio
import json

import httpx

from lora_pipeline.storage.keys import WEBHOOK_INBOX
from lora_pipeline.webhook.app import create_app
from lora_pipeline.webhook.urls import webhook_url
from lora_pipeline_tests.fakes.runpod_api import FakeRunPod
from lora_pipeline_tests.fakes.stores import FailingStore
from lora_pipeline_tests.fakes.uvicorn_thread import serve_in_thread

TOKEN = "s3cret-token-0123456789"


def job_body(i: int) -> bytes:
    return json.dumps(
        {"id": f"00000000-0000-4000-8000-{i:012d}-u1", "status": "COMPLETED", "output": {"n": i}}
    ).encode()


def test_200_concurrent_deliveries_land_exactly_once(local_store):
    bodies = [job_body(i) for i in range(200)]
    # Under a loaded CI machine a burst of 400 requests can outlast uvicorn's 5 s keep-alive:
    # a pooled connection then closes as the client reuses it (a client-side ReadError that
    # says nothing about the receiver). Keep connections open for the whole burst.
    with serve_in_thread(create_app(local_store, TOKEN), timeout_keep_alive=120, backlog=1024) as base:
        url = webhook_url(base, TOKEN)

        async def deliver_all() -> list[int]:
            limits = httpx.Limits(max_connections=200)
            async with httpx.AsyncClient(limits=limits, timeout=60) as client:
                # every body twice, all at once: duplicates race their originals
                sends = [client.post(url, content=b) for b in bodies + bodies]
                return [r.status_code for r in await asyncio.gather(*sends)]

        codes = asyncio.run(deliver_all())
    assert codes == [200] * 400
    inbox = sorted(local_store.get(info.key).data for info in local_store.list(WEBHOOK_INBOX + "/"))
    assert inbox == sorted(bodies)


def test_runpods_webhook_reaches_the_inbox(local_store):
    with serve_in_thread(create_app(local_store, TOKEN)) as base, FakeRunPod() as fake:
        job = fake.add_job({"style": "s"}, webhook=webhook_url(base, TOKEN))
        fake.finish(job.id, {"status": "COMPLETED", "output": {"lora_key": "k"}})
        (attempt,) = fake.wait_for_webhooks(1)
    assert attempt.status_code == 200
    (info,) = list(local_store.list(WEBHOOK_INBOX + "/"))
    assert json.loads(local_store.get(info.key).data) == job.body()


def test_runpod_redelivers_after_a_503_and_the_body_lands_once(local_store):
    flaky = FailingStore(local_store)
    with serve_in_thread(create_app(flaky, TOKEN)) as base, FakeRunPod(webhook_retry_delay_s=0.2) as fake:
        job = fake.add_job({}, webhook=webhook_url(base, TOKEN))
        fake.finish(job.id, {"status": "FAILED", "error": "CUDA out of memory"})
        fake.wait_for_webhooks(1)
        flaky.failing = False
        attempts = fake.wait_for_webhooks(2)
    assert [a.status_code for a in attempts] == [503, 200]
    assert len(list(local_store.list(WEBHOOK_INBOX + "/"))) == 1


def test_runpod_gives_up_after_two_retries(local_store):
    flaky = FailingStore(local_store)
    with serve_in_thread(create_app(flaky, TOKEN)) as base, FakeRunPod(webhook_retry_delay_s=0.05) as fake:
        job = fake.add_job({}, webhook=webhook_url(base, TOKEN))
        fake.finish(job.id, {"status": "COMPLETED", "output": {}})
        attempts = fake.wait_for_webhooks(3)
    assert [a.attempt for a in attempts] == [1, 2, 3]
    assert list(local_store.list(WEBHOOK_INBOX + "/")) == []


def test_a_failed_attempt_and_its_completed_retry_both_land(local_store):
    with serve_in_thread(create_app(local_store, TOKEN)) as base, FakeRunPod(webhook_id_form="base") as fake:
        job = fake.add_job({}, webhook=webhook_url(base, TOKEN))
        fake.finish(job.id, {"status": "FAILED", "error": "oom"})
        fake.wait_for_webhooks(1)
        fake.finish(job.id, {"status": "COMPLETED", "output": {"lora_key": "k"}})
        fake.wait_for_webhooks(2)
    bodies = [json.loads(local_store.get(i.key).data) for i in local_store.list(WEBHOOK_INBOX + "/")]
    assert sorted(b["status"] for b in bodies) == ["COMPLETED", "FAILED"]
    assert {b["id"] for b in bodies} == {job.base}  # the legacy shape: the bare UUID


def test_connections_holding_partial_bodies_are_dropped_after_the_body_timeout(local_store):
    """Issue 22: 300 connections with a valid token each send headers and half a body, then
    stall (slowloris). Each gets 408 and is closed once the body-read timeout passes, nothing
    is written, and a good delivery still lands meanwhile."""
    import socket
    import time

    timeout_s = 1.0
    body = job_body(1)
    with serve_in_thread(
        create_app(local_store, TOKEN, body_read_timeout_s=timeout_s), timeout_keep_alive=120, backlog=1024
    ) as base:
        host, port = base.removeprefix("http://").split(":")
        head = (
            f"POST /webhooks/runpod?token={TOKEN} HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        sockets = []
        for _ in range(300):
            sock = socket.create_connection((host, int(port)), timeout=30)
            sock.sendall(head + body[: len(body) // 2])
            sockets.append(sock)
        started = time.monotonic()
        good = httpx.post(webhook_url(base, TOKEN), content=job_body(2), timeout=30)
        answers = []
        for sock in sockets:
            answer = b""
            while chunk := sock.recv(4096):  # until the server closes the connection
                answer += chunk
            answers.append(answer)
            sock.close()
        elapsed = time.monotonic() - started
    assert good.status_code == 200
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), {a[:40] for a in answers}
    assert elapsed < 20  # all closed at the timeout, not held open (the recv loop ends on close)
    assert [info.key.endswith(".json") for info in local_store.list(WEBHOOK_INBOX + "/")] == [True]
