"""Webhook receiver throughput and latency under a concurrent load generator (loopback only).

Starts the real deployment command, `lora-pipeline webhook serve`, in its own
process on a free 127.0.0.1 port with a fresh local store, then fires a bounded
number of RunPod-shaped webhook POSTs at it from an asyncio load generator with a
fixed number in flight. Every body is distinct except a share of deliberate
duplicates (RunPod redelivers). Each request is timed from send to response;
a 200 means the body is durably in the inbox. At the end the inbox is counted,
so the figures are for deliveries that really landed.

    .venv/bin/python benchmarks/bench_webhook.py [--requests 2000] [--concurrency 8 32 128]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

TOKEN = "bench-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_receiver(store_dir: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "LORA_STORAGE_URL": str(store_dir), "LORA_WEBHOOK_TOKEN": TOKEN}
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from lora_pipeline.cli import main; main()",
            "webhook",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("receiver did not start")


def bodies(n: int, run: int, duplicate_every: int) -> list[bytes]:
    out = []
    for i in range(n):
        k = i - 1 if duplicate_every and i % duplicate_every == 0 and i else i
        out.append(
            json.dumps(
                {
                    "id": f"{run:08x}-0000-4000-8000-{k:012d}-u1",
                    "status": "COMPLETED",
                    "delayTime": 812,
                    "executionTime": 1534021,
                    "output": {"lora_key": f"loras/style_{k}/style_{k}_v1.safetensors", "steps": 1000},
                }
            ).encode()
        )
    return out


async def load(url: str, payloads: list[bytes], concurrency: int) -> tuple[float, list[float], dict[int, int]]:
    latencies: list[float] = []
    codes: dict[int, int] = {}
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for payload in payloads:
        queue.put_nowait(payload)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def worker() -> None:
            while not queue.empty():
                payload = queue.get_nowait()
                started = time.perf_counter()
                response = await client.post(url, content=payload, headers={"Content-Type": "application/json"})
                latencies.append(time.perf_counter() - started)
                codes[response.status_code] = codes.get(response.status_code, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, latencies, codes


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--duplicate-every", type=int, default=10, help="every Nth body repeats the previous one")
    args = parser.parse_args()

    from lora_pipeline.storage.local import LocalStore

    with tempfile.TemporaryDirectory() as tmp:
        store_dir = Path(tmp) / "store"
        port = free_port()
        receiver = start_receiver(store_dir, port)
        url = f"http://127.0.0.1:{port}/webhooks/runpod?token={TOKEN}"
        rows = []
        try:
            asyncio.run(load(url, bodies(50, 0xFFFF, 0), 4))  # warm-up
            for run, concurrency in enumerate(args.concurrency, start=1):
                payloads = bodies(args.requests, run, args.duplicate_every)
                wall, latencies, codes = asyncio.run(load(url, payloads, concurrency))
                rows.append((concurrency, wall, latencies, codes, len(set(payloads))))
        finally:
            receiver.terminate()
            receiver.wait(10)
        store = LocalStore(store_dir)
        landed = sum(1 for _ in store.list("webhooks/inbox/"))

    print(f"webhook receiver (`lora-pipeline webhook serve`, local store, loopback), {args.requests} POSTs per row,")
    print(f"every {args.duplicate_every}th a duplicate delivery")
    print(f"{'in flight':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'codes':>14}")
    for concurrency, wall, latencies, codes, _distinct in rows:
        print(
            f"{concurrency:>9} {len(latencies) / wall:>8.0f} {percentile(latencies, 50) * 1000:>8.1f} "
            f"{percentile(latencies, 99) * 1000:>8.1f} {max(latencies) * 1000:>8.1f} "
            f"{' '.join(f'{c}x{n}' for c, n in sorted(codes.items())):>14}"
        )
    expected = 50 + sum(row[4] for row in rows)
    print(f"inbox files: {landed} (expected {expected}: one per distinct job and status)")


if __name__ == "__main__":
    main()
