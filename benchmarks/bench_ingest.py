"""Ingest benchmark: N photo-sized JPEGs (~300 KB) with captions into moto's S3 server.

Compares, in the same run and against the same server:

* **naive** — what a straightforward script does: for each file in turn, decode
  it fully with Pillow (verify, load, EXIF transpose, convert to RGB), hash it,
  read its caption, upload it (``S3Store.upload_file``), then write a manifest;
* **ingest** — ``lora_pipeline.dataset.ingest.ingest_dataset`` (thread-pooled
  checks with reduced-scale JPEG decoding, concurrent batch upload);
* **reingest** — the same data again: nothing should be uploaded;
* optionally **ingest at N/4** (``--scaling``), to show peak memory does not grow
  with the number of images.

Each mode runs in its own child process against a freshly started moto server
(moto's server app in its own process, see ``_moto_rtt.py``), so wall time and
peak RSS (``ru_maxrss`` of the child) are the mode's alone. Prints a table and,
with ``--json``, the figures as JSON.

On one machine a request to moto costs server CPU on the same cores, not a
network round trip as real S3 does; ``--rtt-ms`` makes the server sleep that
long before every request (no CPU) to stand for the round trip.

    python benchmarks/bench_ingest.py                 # 2,000 images (≈600 MB)
    python benchmarks/bench_ingest.py --count 400     # smaller, quicker
    python benchmarks/bench_ingest.py --rtt-ms 20     # with a simulated 20 ms round trip
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _moto_rtt import start_server  # noqa: E402 - benchmarks/, next to this file

BUCKET = "bench"
# moto accepts any credentials; never let a developer's real ones reach the server.
os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
os.environ.pop("AWS_SESSION_TOKEN", None)
os.environ.pop("AWS_PROFILE", None)
STYLE = "benchstyle"


# -- data ---------------------------------------------------------------------------


def _photo_like(seed: int, size: tuple[int, int], quality: int) -> bytes:
    """A smooth, photo-like JPEG (gradients, soft shapes, mild grain)."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = random.Random(seed)
    width, height = size
    base = Image.linear_gradient("L").resize(size).convert("RGB")
    tint = Image.new("RGB", size, tuple(rng.randrange(40, 220) for _ in range(3)))
    image = Image.blend(base, tint, 0.6)
    pen = ImageDraw.Draw(image)
    for _ in range(40):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randrange(20, width // 4)
        pen.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    image = image.filter(ImageFilter.GaussianBlur(6))
    grain = Image.effect_noise(size, 18).convert("RGB")
    image = Image.blend(image, grain, 0.12)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def make_dataset(folder: Path, count: int, target_kb: int) -> int:
    """``count`` distinct JPEGs of about ``target_kb`` each, plus captions; returns total bytes.

    A handful of base pictures is encoded once; each file is a base with a
    unique JPEG comment segment, so every file has its own content hash and
    costs a full decode, without spending minutes encoding 2,000 images.
    """
    folder.mkdir(parents=True, exist_ok=True)
    bases = []
    for seed in range(8):
        quality, data = 90, b""
        for quality in (92, 88, 84, 80, 75, 70):
            data = _photo_like(seed, (1600, 1200), quality)
            if len(data) <= target_kb * 1024 * 1.1:
                break
        bases.append(data)
    total = 0
    for i in range(count):
        base = bases[i % len(bases)]
        comment = f"bench image {i}".encode()
        segment = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
        data = base[:2] + segment + base[2:]
        (folder / f"img_{i:05d}.jpg").write_bytes(data)
        (folder / f"img_{i:05d}.txt").write_text(f"benchstyle, picture {i % 8}, variant {i}\n", encoding="utf-8")
        total += len(data)
    return total


# -- moto -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoServer:
    def __init__(self, rtt_ms: float = 0.0) -> None:
        self.rtt_ms = rtt_ms
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.cpu_seconds = 0.0

    def __enter__(self) -> MotoServer:
        self.process = start_server(self.port, self.rtt_ms)
        client = _client(self.endpoint)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.create_bucket(Bucket=BUCKET)
                return self
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    self.__exit__()  # never leave a server behind
                    raise
                time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            _, status, usage = os.wait4(self.process.pid, 0)
            self.process.returncode = status
            self.cpu_seconds = usage.ru_utime + usage.ru_stime


def _options(endpoint: str):
    from lora_pipeline.storage.s3 import S3Options

    return S3Options(endpoint_url=endpoint, region="us-east-1", addressing_style="path", max_attempts=3)


def _client(endpoint: str):
    from lora_pipeline.storage.s3 import build_s3_client

    return build_s3_client(_options(endpoint))


def _store(endpoint: str):
    from lora_pipeline.storage.s3 import S3Store

    return S3Store(_client(endpoint), BUCKET, "lora", options=_options(endpoint))


# -- the two ways ----------------------------------------------------------------------


def run_naive(store, folder: Path) -> dict:
    """Sequential: decode, hash, read caption, upload, one file after the other."""
    import hashlib

    from PIL import Image, ImageOps

    from lora_pipeline.dataset.manifest import DatasetManifest, ImageEntry, dataset_hash

    entries, uploaded = [], 0
    prefix = f"datasets/{STYLE}/naive/"
    for path in sorted(folder.glob("*.jpg")):
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            rgb = ImageOps.exif_transpose(image).convert("RGB")
            width, height = rgb.size
        sha = hashlib.sha256(data).hexdigest()
        caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        store.upload_file(f"{prefix}images/{sha}.jpg", path)
        uploaded += 1
        entries.append(
            ImageEntry(
                file=f"images/{sha}.jpg",
                sha256=sha,
                width=width,
                height=height,
                size=len(data),
                caption=caption,
                source=path.name,
            )
        )
    manifest = DatasetManifest(style=STYLE, dataset_hash=dataset_hash(entries), created_at="-", images=entries)
    store.put(prefix + "manifest.json", manifest.to_json())
    return {"images": len(entries), "uploaded": uploaded, "dataset_hash": manifest.dataset_hash}


def run_ingest(store, folder: Path) -> dict:
    from lora_pipeline.dataset.ingest import ingest_dataset

    report = ingest_dataset(store, STYLE, folder)
    return {
        "images": report.stats.image_count,
        "uploaded": report.uploaded,
        "skipped": report.skipped,
        "rejected": len(report.rejected),
        "dataset_hash": report.dataset_hash,
    }


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def child(mode: str, endpoint: str, folder: Path, repeat: bool) -> None:
    """One measured run in this process; prints a JSON line."""
    store = _store(endpoint)
    import PIL.Image  # noqa: F401 - imports are not part of the measurement

    import lora_pipeline.dataset.ingest  # noqa: F401

    if repeat:  # the re-ingest case: first put the data there, unmeasured
        run_ingest(store, folder)
    baseline = _rss_kb()
    started = time.perf_counter()
    result = run_naive(store, folder) if mode == "naive" else run_ingest(store, folder)
    result["seconds"] = time.perf_counter() - started
    result["rss_baseline_kb"] = baseline
    print("RESULT " + json.dumps(result), flush=True)


def measure(mode: str, folder: Path, *, repeat: bool = False, rtt_ms: float = 0.0) -> dict:
    with MotoServer(rtt_ms) as moto:
        process = subprocess.Popen(
            [sys.executable, __file__, "--child", mode, "--endpoint", moto.endpoint, "--data", str(folder)]
            + (["--repeat"] if repeat else []),
            stdout=subprocess.PIPE,
            text=True,
        )
        out = process.stdout.read()  # type: ignore[union-attr]
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = status
        if status != 0:
            raise SystemExit(f"{mode} run failed (status {status}):\n{out}")
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    result["client_cpu_s"] = usage.ru_utime + usage.ru_stime
    result["server_cpu_s"] = moto.cpu_seconds
    result["peak_rss_mb"] = usage.ru_maxrss / 1024
    result["peak_over_baseline_mb"] = (usage.ru_maxrss - result["rss_baseline_kb"]) / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size-kb", type=int, default=300)
    parser.add_argument("--scaling", action="store_true", help="also ingest count/4 images to compare peak memory")
    parser.add_argument("--workdir", type=Path, help="where to write the images (default: a temp folder, removed)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="alternate naive/ingest this many times; keep each one's fastest"
    )
    parser.add_argument(
        "--rtt-ms", type=float, default=0.0, help="delay added to every request (simulated network round trip)"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", choices=["naive", "ingest"], help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--repeat", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.endpoint, args.data, args.repeat)
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        started = time.perf_counter()
        total = make_dataset(workdir / "full", args.count, args.size_kb)
        print(
            f"{args.count} images, {total / 1e6:.0f} MB ({total / args.count / 1024:.0f} KB each) "
            f"made in {time.perf_counter() - started:.0f} s; {os.cpu_count()} CPUs; "
            f"added round trip {args.rtt_ms:g} ms per request",
            flush=True,
        )
        results = {
            "count": args.count,
            "bytes": total,
            "cpus": os.cpu_count(),
            "rtt_ms": args.rtt_ms,
            "load_before": os.getloadavg()[0],
        }
        for _ in range(args.rounds):  # alternating, so a busy spell on the machine hits both
            for mode in ("naive", "ingest"):
                result = measure(mode, workdir / "full", rtt_ms=args.rtt_ms)
                if mode not in results or result["seconds"] < results[mode]["seconds"]:
                    results[mode] = result
        results["reingest"] = measure("ingest", workdir / "full", repeat=True, rtt_ms=args.rtt_ms)
        if args.scaling:
            quarter = workdir / "quarter"
            quarter.mkdir()
            for path in sorted((workdir / "full").iterdir())[: args.count // 4 * 2]:
                shutil.copy(path, quarter / path.name)
            results["ingest_quarter"] = measure("ingest", quarter, rtt_ms=args.rtt_ms)
        results["load_after"] = os.getloadavg()[0]
        assert results["naive"]["dataset_hash"] == results["ingest"]["dataset_hash"], "the two ways disagree"
        _print(results)
        if args.json:
            print(json.dumps(results, indent=2))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def _print(results: dict) -> None:
    print(
        f"{'mode':<16}{'images':>8}{'uploaded':>10}{'wall s':>9}{'img/s':>8}{'client CPU s':>14}"
        f"{'moto CPU s':>12}{'peak RSS MB':>13}{'over start MB':>15}"
    )
    for mode in ("naive", "ingest", "reingest", "ingest_quarter"):
        if mode not in results:
            continue
        r = results[mode]
        print(
            f"{mode:<16}{r['images']:>8}{r['uploaded']:>10}{r['seconds']:>9.2f}{r['images'] / r['seconds']:>8.0f}"
            f"{r['client_cpu_s']:>14.1f}{r['server_cpu_s']:>12.1f}"
            f"{r['peak_rss_mb']:>13.0f}{r['peak_over_baseline_mb']:>15.0f}"
        )
    print(f"1-min load average before/after: {results['load_before']:.1f} / {results['load_after']:.1f}")
    print(f"speed-up ingest vs naive: {results['naive']['seconds'] / results['ingest']['seconds']:.1f}x")


if __name__ == "__main__":
    main()
