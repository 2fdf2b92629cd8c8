"""``python -m lora_pipeline_tests.sim``: replay one seed, or run many (``make soak``).

--seed N                 one schedule, every violation printed in full (exit 1 if any)
--schedules N --start S  N schedules from seed S, over --processes cores (exit 1 if any fails)
--steps K                actions per schedule; --without a,b leaves known-defect parts out
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from lora_pipeline_tests.sim.campaign import replay_command, run_many, run_one
from lora_pipeline_tests.sim.world import FEATURES

DEFAULT_STEPS = 60


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_pipeline_tests.sim", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int)
    parser.add_argument("--schedules", type=int, default=100)
    parser.add_argument("--start", type=int, default=1)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--without", default="", help=f"comma-separated, of: {', '.join(FEATURES)}")
    args = parser.parse_args(argv)
    without = frozenset(w for w in args.without.split(",") if w)
    unknown = without - set(FEATURES)
    if unknown:
        parser.error(f"--without: unknown part(s) {sorted(unknown)}; known: {', '.join(FEATURES)}")
    logging.disable(logging.WARNING)  # the real code's warnings about injected faults
    if args.seed is not None:
        outcome = run_one(args.seed, args.steps, without)
        print(
            f"seed {args.seed} (fingerprint {outcome.fingerprint}): faults {dict(outcome.faults)}; actions {dict(outcome.actions)}"
        )
        for violation in outcome.violations:
            print(f"- {violation}")
        print(f"{len(outcome.violations)} violation(s); replay: {replay_command(args.seed, args.steps, without)}")
        return 1 if outcome.violations else 0
    summary = run_many(
        range(args.start, args.start + args.schedules), args.steps, without=without, processes=args.processes
    )
    print(summary.report())
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
