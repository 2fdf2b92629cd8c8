"""Schedules per second: the deterministic simulation against the real-server fault campaign.

Runs N seeded schedules of the simulation (lora_pipeline_tests/sim/) on this process, then, as
the baseline in the same run, K schedules of the real-server campaign
(lora_pipeline_tests/registry/test_fault_campaign.py) on the local store with the same number of
actions each: threads, file locks, the RunPod double over HTTP, real sleeps. Prints wall and CPU
time per schedule, schedules/s, faults per schedule, and the ratio. `make soak` needs the
simulation's rate: 10,000 schedules in under 15 minutes on 2 cores is 5.6 schedules/s per core.

    .venv/bin/python benchmarks/bench_simulation.py [--schedules 200] [--baseline 2] [--steps 60]

Not part of the test run; figures go into docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lora_pipeline.storage.local import LocalStore  # noqa: E402
from lora_pipeline_tests.registry.test_fault_campaign import run_campaign  # noqa: E402
from lora_pipeline_tests.sim.campaign import run_many  # noqa: E402


def simulation(schedules: int, steps: int) -> dict:
    summary = run_many(range(1, schedules + 1), steps, processes=1)
    faults = summary.faults()
    return {
        "what": "simulation",
        "schedules": schedules,
        "wall_s_per_schedule": round(summary.elapsed_s / schedules, 4),
        "cpu_s_per_schedule": round(summary.cpu_s / schedules, 4),
        "schedules_per_s": round(schedules / summary.elapsed_s, 2),
        "faults_per_schedule": round(sum(faults.values()) / schedules, 2),
        "violations": sum(len(o.violations) for o in summary.outcomes),
    }


def real_campaign(schedules: int, steps: int) -> dict:
    started, cpu = time.perf_counter(), time.process_time()
    crashes = 0
    for seed in range(1, schedules + 1):
        with tempfile.TemporaryDirectory(prefix="bench-campaign-") as tmp:
            world = run_campaign(LocalStore(Path(tmp) / "store"), seed, Path(tmp), steps=steps)
            crashes += world.crashes
    wall = time.perf_counter() - started
    return {
        "what": "real-server campaign (local store)",
        "schedules": schedules,
        "wall_s_per_schedule": round(wall / schedules, 4),
        "cpu_s_per_schedule": round((time.process_time() - cpu) / schedules, 4),  # this process's threads
        "schedules_per_s": round(schedules / wall, 3),
        "crashes_per_schedule": round(crashes / schedules, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", type=int, default=200)
    parser.add_argument("--baseline", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    print(json.dumps({"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "python": sys.version.split()[0]}))
    sim = simulation(args.schedules, args.steps)
    print(json.dumps(sim), flush=True)
    real = real_campaign(args.baseline, args.steps)
    print(json.dumps(real), flush=True)
    print(
        json.dumps(
            {
                "speedup_wall": round(real["wall_s_per_schedule"] / sim["wall_s_per_schedule"], 1),
                "projected_soak_10000_on_2_idle_cores_min": round(10_000 * sim["cpu_s_per_schedule"] / 2 / 60, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
