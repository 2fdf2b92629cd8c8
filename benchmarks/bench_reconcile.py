"""Reconciliation at scale: N styles × M versions of LoRA files, local directory and S3 (moto).

For each backend: generate the files, run a full reconciliation (every file's header
read with a ranged GET, one document written per style, the index once), then a
second one that finds nothing new (it must write nothing and read no registry
document). Prints wall and CPU time, peak RSS (and its growth during the run: run one backend per
process for a clean figure), and store requests by kind
(S3: counted with botocore's ``before-call`` event hook; local: calls to the
store). Also times the pure merge of 100,000 versions.

    .venv/bin/python benchmarks/bench_reconcile.py                    # 10,000 × 10, both backends
    .venv/bin/python benchmarks/bench_reconcile.py --styles 1000 --backend s3

Not part of the test run; figures go into the README.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_pipeline.lifecycle.reconcile import reconcile  # noqa: E402
from lora_pipeline.registry.evidence import StoredLora  # noqa: E402
from lora_pipeline.registry.merge import merge  # noqa: E402
from lora_pipeline.registry.models import RegistryDocument  # noqa: E402
from lora_pipeline.storage.local import LocalStore  # noqa: E402
from lora_pipeline_tests.registry.lora_files import lora_bytes  # noqa: E402


class CountingStore:
    """Counts calls to the store by method (the local backend's 'requests')."""

    def __init__(self, inner):
        self.inner, self.calls, self.doc_reads = inner, Counter(), 0

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def counted(*args, **kwargs):
            self.calls[name] += 1
            if name == "get" and str(args[0]).endswith("training_versions.json"):
                self.doc_reads += 1
            return attr(*args, **kwargs)

        return counted


class PeakRss:
    """Samples this process's RSS every 20 ms; ``peak_growth_mb`` over the start value."""

    def __init__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def peak_growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def keys(styles: int, versions: int):
    for s in range(styles):
        style = f"style_{s:05d}"
        for v in range(1, versions + 1):
            spelling = "vV" if v % 2 else "v"  # legacy and canonical names, both counted
            yield f"loras/{style}/{style}_{spelling}{v}.safetensors"


def generate_local(root: Path, styles: int, versions: int) -> None:
    data = lora_bytes({"lora_pipeline.dataset_hash": "ab" * 8, "ss_network_dim": "4"})
    for key in keys(styles, versions):
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def generate_s3(client, bucket: str, styles: int, versions: int) -> None:
    data = lora_bytes({"lora_pipeline.dataset_hash": "ab" * 8, "ss_network_dim": "4"})
    with ThreadPoolExecutor(32) as pool:
        list(
            pool.map(
                lambda k: client.put_object(Bucket=bucket, Key=f"lora/{k}", Body=data),
                keys(styles, versions),
                chunksize=64,
            )
        )


def measure(label: str, run, counts) -> dict:
    counts.reset()
    cpu, wall = time.process_time(), time.perf_counter()
    with PeakRss() as rss:
        report = run()
    row = {
        "run": label,
        "wall_s": round(time.perf_counter() - wall, 2),
        "cpu_s": round(time.process_time() - cpu, 2),
        "peak_rss_mb": round(rss.peak / 2**20, 1),
        "peak_rss_growth_mb": round(rss.peak_growth_mb, 1),
        "changed_versions": report.changed_versions,
        "styles_written": report.styles_written,
        "registry_documents_read": report.styles_read,
        "headers_read": report.headers_read,
        "requests": dict(sorted(counts.snapshot().items())),
    }
    print(json.dumps(row), flush=True)
    return row


class _LocalCounts:
    def __init__(self, store: CountingStore):
        self.store = store

    def reset(self):
        self.store.calls.clear()

    def snapshot(self):
        return dict(self.store.calls)


class _S3Counts:
    def __init__(self, client):
        self.counter: Counter = Counter()
        self.lock = threading.Lock()
        client.meta.events.register("before-call.s3", self._count)

    def _count(self, model, **_kwargs):
        with self.lock:
            self.counter[model.name] += 1

    def reset(self):
        self.counter.clear()

    def snapshot(self):
        return dict(self.counter)


def bench_local(styles: int, versions: int, workers: int) -> list[dict]:
    root = Path(tempfile.mkdtemp(prefix="bench-reconcile-"))
    try:
        t = time.perf_counter()
        generate_local(root, styles, versions)
        print(f"local: generated {styles * versions} files in {time.perf_counter() - t:.1f}s", flush=True)
        store = CountingStore(LocalStore(root))
        counts = _LocalCounts(store)
        rows = [measure(f"local full ({styles}×{versions})", lambda: reconcile(store, workers=workers), counts)]
        rows.append(measure("local second (no-op)", lambda: reconcile(store, workers=workers), counts))
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def moto_server():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def bench_s3(styles: int, versions: int, workers: int) -> list[dict]:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    from lora_pipeline.storage.s3 import S3Options, S3Store, build_s3_client

    with moto_server() as endpoint:
        options = S3Options(
            endpoint_url=endpoint,
            region="us-east-1",
            addressing_style="path",
            max_attempts=3,
            connect_timeout=5.0,
            read_timeout=60.0,
        )
        client = build_s3_client(options)
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        client.create_bucket(Bucket=bucket)
        t = time.perf_counter()
        generate_s3(client, bucket, styles, versions)
        print(f"s3: generated {styles * versions} objects in {time.perf_counter() - t:.1f}s", flush=True)
        counts = _S3Counts(client)
        store = S3Store(client, bucket, "lora", options=options)
        rows = [measure(f"s3 full ({styles}×{versions})", lambda: reconcile(store, workers=workers), counts)]
        rows.append(measure("s3 second (no-op)", lambda: reconcile(store, workers=workers), counts))
        return rows


def bench_merge(total: int = 100_000) -> dict:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    evidence = [
        StoredLora(
            "s",
            f"loras/s/s_v{n}.safetensors",
            n,
            f"https://cdn.example.com/loras/s/s_v{n}.safetensors",
            592,
            "e",
            {"lora_pipeline.dataset_hash": "ab"},
            at,
        )
        for n in range(1, total + 1)
    ]
    row: dict = {"run": f"pure merge of {total} versions (one document)"}
    doc = RegistryDocument("s")
    for label in ("new", "again (no-op)"):  # the second pass merges the same evidence into the result
        cpu, wall = time.process_time(), time.perf_counter()
        doc = merge(doc, evidence)
        row[f"{label} wall_s"] = round(time.perf_counter() - wall, 3)
        row[f"{label} cpu_s"] = round(time.process_time() - cpu, 3)
    per_style = [
        [StoredLora(f"s{i}", f"loras/s{i}/s{i}_v{n}.safetensors", n, None, 592, "e", {}, at) for n in range(1, 11)]
        for i in range(total // 10)
    ]
    cpu, wall = time.process_time(), time.perf_counter()
    for i, batch in enumerate(per_style):
        merge(RegistryDocument(f"s{i}"), batch)
    row[f"{total // 10} documents × 10 wall_s"] = round(time.perf_counter() - wall, 3)
    row[f"{total // 10} documents × 10 cpu_s"] = round(time.process_time() - cpu, 3)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--styles", type=int, default=10_000)
    parser.add_argument("--versions", type=int, default=10)
    parser.add_argument("--backend", choices=["local", "s3", "both", "none"], default="both")
    parser.add_argument("--workers", type=int, default=8, help="styles settled concurrently")
    args = parser.parse_args()
    print(json.dumps({"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "python": sys.version.split()[0]}))
    bench_merge()
    if args.backend in ("local", "both"):
        bench_local(args.styles, args.versions, args.workers)
    if args.backend in ("s3", "both"):
        bench_s3(args.styles, args.versions, args.workers)


if __name__ == "__main__":
    main()
