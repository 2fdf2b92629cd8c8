"""Simulated time and cooperative actors: every interleaving is the seed's choice.

Each actor (one submitter, one worker, one sensor tick…) runs in its own greenlet on
the one OS thread. It gives control back to the scheduler at every store and RunPod
call (``Sim.step``) and when the real code sleeps (``Clock.sleep``), and the scheduler
picks, from the seeded RNG, which runnable actor goes next and how much simulated time
passes. So races (two submitters, a delete and a promote) happen as they would between
processes, yet the same seed replays the same run, and no real time is spent waiting.
An actor dies at a chosen call (``Crash``: a BaseException, as a killed process, that no
``except Exception`` survives).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import greenlet

from lora_pipeline.clock import Clock

EPOCH = datetime(2026, 3, 1, tzinfo=UTC)


class Crash(BaseException):
    """The process died here (BaseException: no ``except Exception`` handler survives it)."""


@dataclass(eq=False)
class Actor:
    """One simulated process: a name, its clock's skew, and where it may crash."""

    name: str
    skew: timedelta
    crash_at: int | None  # the store/RunPod call at which it dies (None: it does not)
    faulty: bool  # whether its calls see injected faults
    task: Callable[[], None]
    calls: int = 0
    wake_at: float = 0.0
    glet: greenlet.greenlet | None = None
    outcome: str = "running"


@dataclass
class Sim:
    """The seeded scheduler and the simulated true time ``t`` (seconds since EPOCH)."""

    rng: random.Random
    t: float = 0.0
    actors: list[Actor] = field(default_factory=list)
    current: Actor | None = None
    crashes: int = 0
    switches: int = 0
    hub: greenlet.greenlet | None = None
    after_actor: Callable[[], None] | None = None  # called (outside any actor) as each one ends

    # -- time --------------------------------------------------------------------------

    def true_now(self) -> datetime:
        return EPOCH + timedelta(seconds=self.t)

    def clock(self) -> Clock:
        """The clock every actor's real code gets: the current actor's view of the time."""
        return Clock(now=self._now, monotonic=self._monotonic, sleep=self.sleep)

    def _now(self) -> datetime:
        skew = self.current.skew if self.current is not None else timedelta(0)
        return self.true_now() + skew

    def _monotonic(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        """The current actor waits ``seconds`` of simulated time; others run meanwhile."""
        actor = self.current
        if actor is None:  # the drain runs alone: time just passes
            self.t += max(0.0, seconds)
            return
        actor.wake_at = self.t + max(0.0, seconds)
        self._yield()

    # -- interleaving ---------------------------------------------------------------------

    def step(self) -> Actor | None:
        """A call by the current actor is about to happen: it may crash here, and others may go first.

        Returns the actor (None outside any actor: the drain and the checks run alone)."""
        actor = self.current
        if actor is None:
            return None
        actor.calls += 1
        if actor.crash_at is not None and actor.calls >= actor.crash_at:
            self.crashes += 1
            raise Crash(f"{actor.name} killed at call {actor.calls}")
        self._yield()
        return actor

    def _yield(self) -> None:
        assert self.hub is not None
        self.hub.switch()

    def spawn(
        self, name: str, task: Callable[[], None], *, skew: timedelta, crash_at: int | None, faulty: bool
    ) -> None:
        self.actors.append(Actor(name, skew, crash_at, faulty, task, wake_at=self.t))

    def run(self, start_next: Callable[[], bool], *, spawn_chance: float = 0.35) -> None:
        """Run until no actor is left and ``start_next()`` (which spawns one) returns False."""
        self.hub = greenlet.getcurrent()
        more = True
        while True:
            runnable = [a for a in self.actors if a.wake_at <= self.t]
            if more and (not runnable or self.rng.random() < spawn_chance):
                more = start_next()
                continue
            if not runnable:
                if not self.actors:
                    return
                self.t = min(a.wake_at for a in self.actors)
                continue
            actor = self.rng.choice(runnable)
            self.t += self.rng.expovariate(20.0)  # about 50 ms pass per call
            self._resume(actor)

    def _resume(self, actor: Actor) -> None:
        if actor.glet is None:
            actor.glet = greenlet.greenlet(self._body(actor))
        self.current = actor
        self.switches += 1
        try:
            actor.glet.switch()
        finally:
            self.current = None
        if actor.glet.dead:
            self.actors.remove(actor)
            if self.after_actor is not None:
                self.after_actor()

    def _body(self, actor: Actor) -> Callable[[], None]:
        def body() -> None:
            try:
                actor.task()
                actor.outcome = "done"
            except Crash:
                actor.outcome = "crashed"

        return body
