"""A 200 from the receiver means the body is stored: kill the receiver (SIGKILL, no clean-up)
while deliveries are in flight, right after the first answers came back, and every body
answered 200 is in the inbox, whole. RunPod then delivers again every body it got no 200
for (and some it did): each (job, status) ends in the inbox exactly once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from lora_pipeline.storage.keys import WEBHOOK_INBOX
from lora_pipeline.storage.local import LocalStore
from lora_pipeline.webhook.inbox import parse_webhook_body
from lora_pipeline_tests.conftest import free_port

TOKEN = "crash-token-0123456789abcdef"
DELIVERIES = 96
KILL_AFTER = 12  # answers received before the kill


def body(i: int) -> bytes:
    return json.dumps(
        {"id": f"00000000-0000-4000-8000-{i:012d}-u1", "status": "COMPLETED", "output": {"n": i}}
    ).encode()


def start_receiver(store_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`lora-pipeline webhook serve` in its own process; (process, webhook URL) once healthy."""
    port = free_port()
    env = {**os.environ, "LORA_STORAGE_URL": str(store_dir), "LORA_WEBHOOK_TOKEN": TOKEN}
    command = "from lora_pipeline.cli import main; main()"
    args = ["webhook", "serve", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen([sys.executable, "-c", command, *args], env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process, f"http://127.0.0.1:{port}/webhooks/runpod?token={TOKEN}"
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError("the receiver did not start")


async def deliver_and_kill(url: str, process: subprocess.Popen[bytes]) -> dict[int, int]:
    """Send every body at once; SIGKILL the receiver as the KILL_AFTER-th answer arrives.
    Returns the status code of each delivery that got an answer (body index → code)."""
    answered: dict[int, int] = {}
    killed = asyncio.Event()

    async def send(client: httpx.AsyncClient, i: int) -> None:
        try:
            response = await client.post(url, content=body(i))
        except httpx.HTTPError:
            return  # no answer: RunPod delivers again
        if killed.is_set():
            return  # read after the kill from the socket buffer: still an answer, still counts
        answered[i] = response.status_code
        if len(answered) >= KILL_AFTER:
            process.send_signal(signal.SIGKILL)
            killed.set()

    limits = httpx.Limits(max_connections=DELIVERIES)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        await asyncio.gather(*(send(client, i) for i in range(DELIVERIES)))
    return answered


def inbox(store: LocalStore) -> list[bytes]:
    return [store.get(info.key).data for info in store.list(WEBHOOK_INBOX + "/")]


def test_every_body_answered_200_survives_a_kill_and_redelivery_stores_each_once(tmp_path):
    store_dir = tmp_path / "store"
    process, url = start_receiver(store_dir)
    try:
        answered = asyncio.run(deliver_and_kill(url, process))
    finally:
        process.kill()
        process.wait(30)
    store = LocalStore(store_dir)
    stored = inbox(store)
    ok = {i for i, code in answered.items() if code == 200}
    assert len(ok) >= KILL_AFTER
    assert {body(i) for i in ok} <= set(stored)
    for data in stored:
        parse_webhook_body(data)  # whole bodies only, never half a file

    process, url = start_receiver(store_dir)  # RunPod's retries, and a few repeats of answered ones
    try:

        async def redeliver() -> list[int]:
            async with httpx.AsyncClient(timeout=30) as client:
                sends = [client.post(url, content=body(i)) for i in range(DELIVERIES)]
                return [r.status_code for r in await asyncio.gather(*sends)]

        assert asyncio.run(redeliver()) == [200] * DELIVERIES
    finally:
        process.terminate()
        process.wait(30)
    assert sorted(inbox(store)) == sorted(body(i) for i in range(DELIVERIES))
