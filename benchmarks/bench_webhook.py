"""Webhook receiver throughput and latency under a concurrent load generator (loopback only).

Starts the real deployment command, `lora-pipeline webhook serve`, in its own
process on a free 127.0.0.1 port with a fresh local store, then fires a bounded
number of RunPod-shaped webhook POSTs at it from an asyncio load generator with a
fixed number in flight. Every body is distinct except a share of deliberate
duplicates (RunPod redelivers). Each request is timed from send to response;
a 200 means the body is durably in the inbox. At the end the inbox is counted,
so the figures are for deliveries that really landed.

The load generator is a plain asyncio HTTP/1.1 client (one keep-alive connection per
request in flight, about 0.1 ms of CPU a request), so that the figures are the receiver's:
httpx's client costs about 5 ms of CPU a request at 128 connections, on the same two cores
as the receiver, and made the receiver look slow as load grew (``--client httpx`` measures
with it, as this benchmark did before). ``--baseline-src DIR`` also measures the receiver
of another checkout (``/work/main``, say) in the same run, row by row in turns, and prints
the ratios: on a shared machine only figures taken together compare.

    .venv/bin/python benchmarks/bench_webhook.py [--requests 2000] [--concurrency 8 32 128]
        [--baseline-src ../main] [--client lean|httpx]
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


def start_receiver(store_dir: Path, port: int, src: Path | None = None) -> subprocess.Popen[bytes]:
    """`lora-pipeline webhook serve` on ``port``; ``src``: the code of that checkout instead."""
    env = {**os.environ, "LORA_STORAGE_URL": str(store_dir), "LORA_WEBHOOK_TOKEN": TOKEN}
    if src is not None:
        env["PYTHONPATH"] = str(src)
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
    """The load through httpx's client (``--client httpx``)."""
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


async def lean_load(url: str, payloads: list[bytes], concurrency: int) -> tuple[float, list[float], dict[int, int]]:
    """The same load from plain asyncio streams: each worker keeps one HTTP/1.1 connection,
    sends a request, reads the status line, headers and Content-Length body, and times it."""
    parsed = httpx.URL(url)
    host, port = parsed.host, parsed.port or 80
    target = parsed.raw_path.decode()
    latencies: list[float] = []
    codes: dict[int, int] = {}
    pending = list(reversed(payloads))

    async def worker() -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        while pending:
            payload = pending.pop()
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            assert reader is not None
            head = (
                f"POST {target} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n"
            ).encode()
            started = time.perf_counter()
            writer.write(head + payload)
            lines = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)).split(b"\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:] if line)}
            await reader.readexactly(int(headers.get(b"content-length", b"0")))
            latencies.append(time.perf_counter() - started)
            code = int(lines[0].split()[1])
            codes[code] = codes.get(code, 0) + 1
            if headers.get(b"connection", b"").lower() == b"close":
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies, codes


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1] if len(values) > 1 else values[0]


Row = tuple[int, float, list[float], dict[int, int], int]


def measure(src: Path | None, args: argparse.Namespace, store_dir: Path, concurrency: int, run: int) -> Row:
    """One row: a fresh receiver (of ``src``'s code, or this checkout's), warmed up, then the load."""
    port = free_port()
    receiver = start_receiver(store_dir, port, src)
    url = f"http://127.0.0.1:{port}/webhooks/runpod?token={TOKEN}"
    generate = lean_load if args.client == "lean" else load
    try:
        asyncio.run(generate(url, bodies(50, 0xFFFF0000 + run, 0), 4))  # warm-up
        payloads = bodies(args.requests, run, args.duplicate_every)
        wall, latencies, codes = asyncio.run(generate(url, payloads, concurrency))
    finally:
        receiver.terminate()
        receiver.wait(10)
    return concurrency, wall, latencies, codes, 50 + len(set(payloads))


def row_text(label: str, row: Row) -> str:
    concurrency, wall, latencies, codes, _distinct = row
    return (
        f"{label:>9} {concurrency:>9} {len(latencies) / wall:>8.0f} {percentile(latencies, 50) * 1000:>8.1f} "
        f"{percentile(latencies, 99) * 1000:>8.1f} {max(latencies) * 1000:>8.1f} "
        f"{' '.join(f'{c}x{n}' for c, n in sorted(codes.items())):>14}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--duplicate-every", type=int, default=10, help="every Nth body repeats the previous one")
    parser.add_argument("--client", choices=["lean", "httpx"], default="lean")
    parser.add_argument("--baseline-src", type=Path, help="also measure this checkout's receiver, in turns")
    args = parser.parse_args()

    from lora_pipeline.storage.local import LocalStore

    sides: list[tuple[str, Path | None]] = [("this", None)]
    if args.baseline_src is not None:
        sides.insert(0, ("baseline", args.baseline_src.resolve()))
    load_before = os.getloadavg()
    rows: dict[str, list[Row]] = {label: [] for label, _ in sides}
    landed: dict[str, tuple[int, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run, concurrency in enumerate(args.concurrency, start=1):
            order = sides if run % 2 else sides[::-1]  # alternate who goes first
            for label, src in order:
                rows[label].append(measure(src, args, Path(tmp) / label, concurrency, run))
        for label, _ in sides:
            store = LocalStore(Path(tmp) / label)
            landed[label] = (sum(1 for _ in store.list("webhooks/inbox/")), sum(r[4] for r in rows[label]))
    load_after = os.getloadavg()

    print(f"webhook receiver (`lora-pipeline webhook serve`, local store, loopback), {args.requests} POSTs per row,")
    print(
        f"every {args.duplicate_every}th a duplicate delivery; load generator: {args.client}; a fresh receiver per row"
    )
    print(
        f"load average (1, 5, 15 min) before {' '.join(f'{x:.1f}' for x in load_before)}, "
        f"after {' '.join(f'{x:.1f}' for x in load_after)} (cores: {os.cpu_count()})"
    )
    print(f"{'receiver':>9} {'in flight':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'codes':>14}")
    for i in range(len(args.concurrency)):
        for label, _ in sides:
            print(row_text(label, rows[label][i]))
        if len(sides) == 2:
            base, this = rows["baseline"][i], rows["this"][i]
            speed = (len(this[2]) / this[1]) / (len(base[2]) / base[1])
            p99 = percentile(this[2], 99) / percentile(base[2], 99)
            print(f"{'ratio':>9} {this[0]:>9} {speed:>7.2f}x {'':>8} {p99:>7.2f}x   (this / baseline)")
    for label, (count, expected) in landed.items():
        print(f"inbox files ({label}): {count} (expected {expected}: one per distinct job and status)")


if __name__ == "__main__":
    main()
