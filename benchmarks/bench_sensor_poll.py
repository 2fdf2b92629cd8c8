"""One status-poll pass of the job sensor over many pending jobs, against the RunPod double.

The double runs in its own process (so its threads do not share our GIL) and
adds a fixed latency to every request, standing in for the round trip to
api.runpod.ai. For each size we time one `poll_jobs` pass (concurrent, bounded
by a deadline) and, in the same run, a sequential baseline: one `status` call
after another, as the legacy dashboard did. "requests" counts what the double
received. A last row repeats the largest pass with RunPod's documented /status
rate limit (2000 per 10 s) enforced: once unpaced (the client's 429 retries take
over; what is still limited is left for the next tick) and once paced below it.

    .venv/bin/python benchmarks/bench_sensor_poll.py [--sizes 100 1000 5000] [--latency-ms 20]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from typing import Any

from lora_pipeline.backends.poll import poll_jobs
from lora_pipeline.backends.runpod_client import RunPodClient


def _serve(conn: Any, n_jobs: int, latency_s: float, rate_limited: bool) -> None:
    from lora_pipeline_tests.fakes.runpod_api import RUNPOD_RATE_LIMITS, FakeRunPod

    fake = FakeRunPod(latency_s=latency_s, rate_limits=RUNPOD_RATE_LIMITS if rate_limited else None)
    fake.start()
    ids = [fake.add_job({"n": i}).id for i in range(n_jobs)]
    for job_id in ids[::10]:  # a realistic mix: every tenth job has finished
        fake.finish(job_id, {"status": "COMPLETED", "output": {"lora_key": "k"}})
    conn.send((fake.base_url, fake.endpoint_id, fake.api_key, ids))
    while True:
        command = conn.recv()
        if command == "count":
            conn.send(fake.requests["status"])
        else:
            fake.stop()
            conn.send("stopped")
            return


class Double:
    """The double in a child process."""

    def __init__(self, n_jobs: int, latency_s: float, rate_limited: bool = False) -> None:
        self.conn, child = mp.Pipe()
        self.process = mp.get_context("fork").Process(
            target=_serve, args=(child, n_jobs, latency_s, rate_limited), daemon=True
        )
        self.process.start()
        self.base_url, self.endpoint_id, self.api_key, self.ids = self.conn.recv()

    def status_requests(self) -> int:
        self.conn.send("count")
        return self.conn.recv()

    def client(self, **kwargs: Any) -> RunPodClient:
        return RunPodClient(self.api_key, self.endpoint_id, base_url=self.base_url, **kwargs)

    def close(self) -> None:
        self.conn.send("stop")
        self.conn.recv()
        self.process.join(5)


def concurrent_pass(
    double: Double, ids: list[str], workers: int, deadline_s: float, rate: float | None = None
) -> dict[str, Any]:
    client = double.client(max_connections=workers)
    before = double.status_requests()
    started = time.perf_counter()
    result = poll_jobs(client, ids, max_workers=workers, deadline_s=deadline_s, max_rate_per_s=rate)
    wall = time.perf_counter() - started
    client.close()
    return {
        "wall_s": wall,
        "requests": double.status_requests() - before,
        "answered": len(result.statuses),
        "unfinished": len(result.unfinished),
        "errors": len(result.errors),
    }


def sequential_pass(double: Double, ids: list[str]) -> dict[str, Any]:
    client = double.client(max_connections=1)
    before = double.status_requests()
    started = time.perf_counter()
    answered = sum(1 for job_id in ids if client.status(job_id))
    wall = time.perf_counter() - started
    client.close()
    return {
        "wall_s": wall,
        "requests": double.status_requests() - before,
        "answered": answered,
        "unfinished": 0,
        "errors": 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--deadline-s", type=float, default=50.0)
    parser.add_argument(
        "--sequential-max", type=int, default=5000, help="skip the sequential baseline above this many jobs"
    )
    parser.add_argument("--no-rate-limited-row", action="store_true")
    parser.add_argument("--rate-limited-only", action="store_true")
    parser.add_argument("--pace", type=float, default=190.0, help="max_rate_per_s of the paced row")
    args = parser.parse_args()

    latency_s = args.latency_ms / 1000
    rows: list[tuple[str, int, str, dict[str, Any]]] = []
    double = Double(max(args.sizes), latency_s)
    try:
        for size in [] if args.rate_limited_only else args.sizes:
            ids = double.ids[:size]
            for workers in args.workers:
                rows.append(("concurrent", size, str(workers), concurrent_pass(double, ids, workers, args.deadline_s)))
            if size <= args.sequential_max:
                rows.append(("sequential", size, "1", sequential_pass(double, ids)))
    finally:
        double.close()

    if not args.no_rate_limited_row:
        size = max(args.sizes)
        for mode, rate in (("limited, unpaced", None), (f"limited, {args.pace:.0f}/s", args.pace)):
            limited = Double(size, latency_s, rate_limited=True)
            try:
                rows.append(
                    (
                        mode,
                        size,
                        str(args.workers[0]),
                        concurrent_pass(limited, limited.ids, args.workers[0], args.deadline_s, rate),
                    )
                )
            finally:
                limited.close()

    print(f"poll pass over pending jobs; RunPod double with {args.latency_ms:.0f} ms added latency per call")
    print(
        f"{'mode':<17} {'jobs':>5} {'workers':>7} {'wall s':>8} {'requests':>8} {'jobs/s':>8} "
        f"{'answered':>8} {'left':>5} {'errors':>6}"
    )
    for mode, size, workers, r in rows:
        print(
            f"{mode:<17} {size:>5} {workers:>7} {r['wall_s']:>8.2f} {r['requests']:>8} "
            f"{r['answered'] / r['wall_s']:>8.0f} {r['answered']:>8} {r['unfinished']:>5} {r['errors']:>6}"
        )


if __name__ == "__main__":
    main()
