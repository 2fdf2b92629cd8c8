"""Transfer benchmark: this storage layer vs a naive boto3 loop vs the AWS CLI (and s5cmd).

Against one moto S3 server (started here, in its own process so it does not
share our GIL), upload and download:

* many small files (default 1,000 files of ~300 KB), the shape of a dataset;
* one big file (default 512 MiB, ``--big-mb`` to shrink), the shape of a checkpoint.

Methods: ``layer`` (lora_pipeline.storage.transfer with S3Store), ``naive``
(sequential put_object / get_object), ``awscli`` (``aws s3 cp --recursive``, if
installed) and ``s5cmd`` (if installed). Prints MB/s per method and phase and the
ratio to the naive loop and to the AWS CLI.

    .venv/bin/python benchmarks/bench_transfer.py [--files 1000] [--file-kb 300] [--big-mb 512] [--rtt-ms 20]

moto keeps objects in memory and runs in one Python process, so absolute figures
say more about moto than about S3; the ratios are the point. ``--rtt-ms`` delays
every request at the server to stand for a network round trip (see _moto_rtt.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_pipeline.storage.s3 import MB, S3Options, S3Store, build_s3_client  # noqa: E402
from lora_pipeline.storage.transfer import download_prefix, upload_tree  # noqa: E402

from _moto_rtt import start_server  # noqa: E402 - benchmarks/, next to this file


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_moto(rtt_ms: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = start_server(port, rtt_ms)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def make_files(root: Path, count: int, size: int) -> list[Path]:
    (root).mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = root / f"img_{i:05d}.bin"
        path.write_bytes(os.urandom(size))
        paths.append(path)
    return paths


def make_big(path: Path, size_mb: int) -> Path:
    with open(path, "wb") as handle:
        block = os.urandom(MB)
        for i in range(size_mb):
            handle.write(block[:-8] + i.to_bytes(8, "big"))
    return path


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def empty_bucket(client, bucket: str) -> None:
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--file-kb", type=int, default=300)
    parser.add_argument("--big-mb", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--skip", nargs="*", default=[], help="methods to leave out")
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds (method order rotated each round); medians are printed"
    )
    parser.add_argument(
        "--rtt-ms", type=float, default=0.0, help="delay added to every request (simulated network round trip)"
    )
    args = parser.parse_args()

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ["AWS_DEFAULT_REGION"] = os.environ["AWS_REGION"] = "us-east-1"

    proc, endpoint = start_moto(args.rtt_ms)
    work = Path(tempfile.mkdtemp(prefix="bench_transfer_"))
    try:
        small_dir = work / "small"
        make_files(small_dir, args.files, args.file_kb * 1024)
        big = make_big(work / "big.bin", args.big_mb)
        small_bytes = args.files * args.file_kb * 1024
        big_bytes = args.big_mb * MB

        options = S3Options(
            endpoint_url=endpoint,
            region="us-east-1",
            addressing_style="path",
            transfer_concurrency=args.concurrency,
        )
        client = build_s3_client(options)
        bucket = "bench"
        client.create_bucket(Bucket=bucket)
        store = S3Store(client, bucket, "", options=options)

        def layer() -> dict[str, float]:
            out = work / "out_layer"
            times = {
                "small up": timed(
                    lambda: upload_tree(store, small_dir, "small", concurrency=args.concurrency).raise_for_failures()
                ),
                "small down": timed(
                    lambda: download_prefix(store, "small", out, concurrency=args.concurrency).raise_for_failures()
                ),
                "big up": timed(lambda: store.upload_file("big/big.bin", big)),
                "big down": timed(lambda: store.download_file("big/big.bin", out / "big.bin")),
            }
            return times

        def naive() -> dict[str, float]:
            out = work / "out_naive"
            out.mkdir()
            files = sorted(small_dir.iterdir())

            def up_small():
                for path in files:
                    client.put_object(Bucket=bucket, Key=f"small/{path.name}", Body=path.read_bytes())

            def down_small():
                for path in files:
                    body = client.get_object(Bucket=bucket, Key=f"small/{path.name}")["Body"].read()
                    (out / path.name).write_bytes(body)

            def up_big():
                with open(big, "rb") as handle:
                    client.put_object(Bucket=bucket, Key="big/big.bin", Body=handle)

            def down_big():
                response = client.get_object(Bucket=bucket, Key="big/big.bin")
                with open(out / "big.bin", "wb") as handle:
                    shutil.copyfileobj(response["Body"], handle, MB)

            return {
                "small up": timed(up_small),
                "small down": timed(down_small),
                "big up": timed(up_big),
                "big down": timed(down_big),
            }

        def cli(argv_for) -> dict[str, float]:
            def run(*argv: str) -> None:
                subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)

            out = work / f"out_{argv_for.__name__}"
            return {phase: timed(lambda cmd=cmd: run(*cmd)) for phase, cmd in argv_for(out).items()}

        aws = shutil.which("aws") or str(Path(sys.executable).with_name("aws"))
        s5cmd = shutil.which("s5cmd") or str(Path(sys.executable).with_name("s5cmd"))

        def awscli(out: Path) -> dict[str, list[str]]:
            base = [aws, "--endpoint-url", endpoint, "s3", "cp", "--quiet", "--only-show-errors"]
            return {
                "small up": base + ["--recursive", str(small_dir), f"s3://{bucket}/small"],
                "small down": base + ["--recursive", f"s3://{bucket}/small", str(out / "small")],
                "big up": base + [str(big), f"s3://{bucket}/big/big.bin"],
                "big down": base + [f"s3://{bucket}/big/big.bin", str(out / "big.bin")],
            }

        def s5(out: Path) -> dict[str, list[str]]:
            base = [s5cmd, "--endpoint-url", endpoint, "cp"]
            return {
                "small up": base + [f"{small_dir}/*", f"s3://{bucket}/small/"],
                "small down": base + [f"s3://{bucket}/small/*", f"{out}/small/"],
                "big up": base + [str(big), f"s3://{bucket}/big/big.bin"],
                "big down": base + [f"s3://{bucket}/big/big.bin", str(out / "big.bin")],
            }

        candidates = {"layer": layer, "naive": naive}
        if Path(aws).exists():
            candidates["awscli"] = lambda: cli(awscli)
        else:
            print("awscli not installed: skipping (pip install awscli)")
        if Path(s5cmd).exists():
            candidates["s5cmd"] = lambda: cli(s5)
        names = [name for name in candidates if name not in args.skip]
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        for round_no in range(args.repeat):
            shift = round_no % len(names)
            for name in names[shift:] + names[:shift]:
                empty_bucket(client, bucket)
                for old in work.glob("out_*"):
                    shutil.rmtree(old)
                print(f"round {round_no + 1}: running {name} ...", flush=True)
                runs[name].append(candidates[name]())
        methods = {
            name: {phase: statistics.median(run[phase] for run in results) for phase in results[0]}
            for name, results in runs.items()
        }

        sizes = {"small up": small_bytes, "small down": small_bytes, "big up": big_bytes, "big down": big_bytes}
        phases = list(sizes)
        print()
        print(
            f"moto S3 at {endpoint}; {args.files} files x {args.file_kb} KB = {small_bytes / MB:.0f} MiB; "
            f"one file of {args.big_mb} MiB; concurrency {args.concurrency}; {os.cpu_count()} CPUs; "
            f"added round trip {args.rtt_ms:g} ms; median of {args.repeat} round(s)"
        )
        header = f"{'method':<8}" + "".join(f"{p:>14}" for p in phases)
        print(header + "   (MB/s; seconds in brackets)")
        for name, times in methods.items():
            row = f"{name:<8}"
            for phase in phases:
                seconds = times[phase]
                row += f"{sizes[phase] / 1e6 / seconds:>8.1f} ({seconds:>4.1f})"
            print(row)
        for base in ("naive", "awscli"):
            if base not in methods or "layer" not in methods:
                continue
            ratios = "  ".join(f"{phase}: {methods[base][phase] / methods['layer'][phase]:.2f}x" for phase in phases)
            print(f"layer vs {base}: {ratios}")
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
