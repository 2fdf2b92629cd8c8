"""A fresh clone's `make install`, and `make dev` until the UI answers: the lock with uv vs the
ranges with pip, in the same run.

Each variant clones this repository into a temporary folder (the committed HEAD, and
``--baseline-ref``: the last commit that installed ranges with pip) and times ``make install``
twice: with an empty package cache (cold: everything downloaded, from PyPI or this machine's
local wheel folder), then with the venv removed and the cache kept (warm). Then, for HEAD with
the warm cache, a fresh clone's ``make dev`` until ``/server_info`` answers (what a newcomer
waits for before the browser shows the UI). Each cache lives under the temporary folder
(``UV_CACHE_DIR`` / ``PIP_CACHE_DIR``), so the machine's own caches are neither used nor
changed.

    python3 benchmarks/bench_install.py [--baseline-ref a400346] [--skip-baseline] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import urllib.request

REPO = Path(__file__).resolve().parents[1]
BASELINE_REF = "a400346"  # the last commit before locks/: ranges, `pip install -e .[train,dev,deploy]`


def clone(ref: str, into: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(REPO), str(into)], check=True)
    subprocess.run(["git", "-C", str(into), "checkout", "-q", ref], check=True)
    return into


def timed_install(checkout: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(["make", "install"], cwd=checkout, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"make install failed in {checkout}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return elapsed


def cold_and_warm(ref: str, work: Path, label: str) -> dict[str, float]:
    """make install with an empty cache, then again with the venv gone and the cache kept."""
    cache = work / f"{label}-cache"
    env = dict(os.environ, UV_CACHE_DIR=str(cache / "uv"), PIP_CACHE_DIR=str(cache / "pip"))
    checkout = clone(ref, work / label)
    cold = timed_install(checkout, env)
    subprocess.run(["rm", "-rf", str(checkout / ".venv")], check=True)
    warm = timed_install(checkout, env)
    return {"cold_s": cold, "warm_s": warm, "cache": str(cache), "venv_mb": folder_mb(checkout / ".venv")}


def folder_mb(path: Path) -> float:
    done = subprocess.run(["du", "-sm", str(path)], capture_output=True, text=True, check=True)
    return float(done.stdout.split()[0])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dev_until_ui(ref: str, work: Path, cache: str, timeout: float = 600) -> float:
    """A fresh clone's `make dev` (install included) until the webserver's /server_info answers."""
    checkout = clone(ref, work / "dev")
    port = free_port()
    env = dict(os.environ, UV_CACHE_DIR=f"{cache}/uv", PIP_CACHE_DIR=f"{cache}/pip")
    log = (work / "dev.log").open("w")
    started = time.perf_counter()
    process = subprocess.Popen(
        ["make", "dev", f"PORT={port}"],
        cwd=checkout,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        while time.perf_counter() - started < timeout:
            if process.poll() is not None:
                raise SystemExit(f"make dev exited with {process.returncode}: see {work / 'dev.log'}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2) as answer:
                    if answer.status == 200:
                        return time.perf_counter() - started
            except OSError:
                time.sleep(0.25)
        raise SystemExit(f"the UI did not answer within {timeout} s")
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-ref", default=BASELINE_REF)
    parser.add_argument("--ref", default="HEAD", help="the commit measured (default: HEAD, committed work only)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-install-") as tmp:
        work = Path(tmp)
        results: dict[str, dict[str, float]] = {}
        if not args.skip_baseline:
            results["ranges + pip (baseline)"] = cold_and_warm(args.baseline_ref, work, "baseline")
        results["lock + uv"] = cold_and_warm(args.ref, work, "lock")
        dev = dev_until_ui(args.ref, work, results["lock + uv"]["cache"])
    if args.json:
        print(json.dumps({"install": results, "make_dev_to_ui_warm_s": dev}, indent=2, default=str))
        return 0
    print(f"fresh clone `make install` ({os.cpu_count()} cores, Python {sys.version.split()[0]})")
    print(f"{'variant':<26}{'cold (s)':>10}{'warm (s)':>10}{'.venv (MB)':>12}")
    for label, row in results.items():
        print(f"{label:<26}{row['cold_s']:>10.1f}{row['warm_s']:>10.1f}{row['venv_mb']:>12.0f}")
    base = results.get("ranges + pip (baseline)")
    if base:
        lock = results["lock + uv"]
        print(f"speed-up, lock + uv over the baseline: cold ×{base['cold_s'] / lock['cold_s']:.1f}, ", end="")
        print(f"warm ×{base['warm_s'] / lock['warm_s']:.1f}")
    print(f"fresh clone `make dev` until /server_info answers, warm cache: {dev:.1f} s (goal: under 90 s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
