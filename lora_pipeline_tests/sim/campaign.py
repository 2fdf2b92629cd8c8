"""Many schedules at once: one process per core, a summary, and a replay line per failure."""

from __future__ import annotations

import hashlib
import multiprocessing
import resource
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline_tests.sim.invariants import check
from lora_pipeline_tests.sim.world import World, run_schedule


@dataclass(frozen=True)
class Outcome:
    """One schedule's result: its violations and how hard it was hit."""

    seed: int
    violations: tuple[str, ...]
    faults: Counter[str]
    actions: Counter[str]
    fingerprint: str  # the schedule's path and end state, less the ids the real code draws at random


def replay_command(seed: int, steps: int, without: frozenset[str]) -> str:
    skip = f" --without {','.join(sorted(without))}" if without else ""
    return f".venv/bin/python -m lora_pipeline_tests.sim --seed {seed} --steps {steps}{skip}"


def run_one(seed: int, steps: int, without: frozenset[str] = frozenset()) -> Outcome:
    world = run_schedule(seed, steps, without=without)
    faults: Counter[str] = Counter(world.store.injected)
    faults.pop("multipart", None)
    faults["crash"] = world.sim.crashes
    faults.update({f"run:{k}": n for k, n in world.runpod.answers.items() if k != "ok"})
    actions = Counter(world.ledger.actions)
    actions["multipart"] = world.store.injected.get("multipart", 0)
    return Outcome(seed, tuple(check(world)), faults, actions, fingerprint(world))


def fingerprint(world: World) -> str:
    """A digest of how the schedule went (scheduling points, final keys, each version's status):
    two runs of one seed, in one process or two, must agree on it."""
    registry = RegistryStore(world.store)
    versions = [
        (style, v.name, v.status.value, v.job_ids)
        for style in registry.styles()
        for v in registry.read(style)[0].versions
    ]
    state = (world.sim.switches, world.sim.t, tuple(world.store.keys), tuple(versions))
    return hashlib.sha256(repr(state).encode()).hexdigest()[:16]


def _star(args: tuple[int, int, frozenset[str]]) -> Outcome:
    return run_one(*args)


@dataclass
class Summary:
    steps: int
    without: frozenset[str]
    outcomes: list[Outcome] = field(default_factory=list)
    elapsed_s: float = 0.0
    cpu_s: float = 0.0  # CPU time of the schedules (all processes): unlike elapsed, not inflated by load

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.violations]

    def faults(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for o in self.outcomes:
            total.update(o.faults)
        return total

    def report(self) -> str:
        """The benchmark-style printout: schedules, rate, faults per schedule, violations and seeds."""
        n = len(self.outcomes) or 1
        faults = self.faults()
        actions: Counter[str] = Counter()
        for o in self.outcomes:
            actions.update(o.actions)
        lines = [
            f"simulation: {len(self.outcomes)} schedules of {self.steps} actions in {self.elapsed_s:.1f} s "
            f"({len(self.outcomes) / max(self.elapsed_s, 1e-9):.1f} schedules/s; "
            f"{1000 * self.cpu_s / n:.0f} ms CPU per schedule)",
            f"  faults per schedule: {sum(faults.values()) / n:.2f} "
            f"({', '.join(f'{k} {v / n:.2f}' for k, v in sorted(faults.items()))})",
            f"  actions per schedule: {', '.join(f'{k} {v / n:.1f}' for k, v in sorted(actions.items()))}",
            f"  parts left out: {', '.join(sorted(self.without)) or 'nothing'}",
            f"  violations: {sum(len(o.violations) for o in self.outcomes)} in {len(self.failed)} schedules",
        ]
        for o in self.failed[:20]:
            lines.append(f"  seed {o.seed}: {o.violations[0].splitlines()[0][:300]}")
            lines.append(f"    replay: {replay_command(o.seed, self.steps, self.without)}")
        return "\n".join(lines)


def run_many(seeds: Iterable[int], steps: int, *, without: frozenset[str] = frozenset(), processes: int = 1) -> Summary:
    summary = Summary(steps, without)
    started, cpu = time.perf_counter(), _cpu_s()
    jobs = [(seed, steps, without) for seed in seeds]
    if processes > 1:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            summary.outcomes = pool.map(_star, jobs, chunksize=16)
    else:
        summary.outcomes = [_star(job) for job in jobs]
    summary.elapsed_s = time.perf_counter() - started
    summary.cpu_s = _cpu_s() - cpu
    return summary


def _cpu_s() -> float:
    """CPU seconds of this process and of its finished children (the pool's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
