"""The simulated world: the actors of a schedule, run by the real domain code, and its drain.

Actions (each an actor, spawned at a point the seed picks, with its own clock skew,
maybe a crash point, maybe faulty store and RunPod calls):

* ``submit`` (one, or a burst of three at once: two clicks and a sensor), sometimes ``force``;
* ``work``: a RunPod worker takes a queued job, writes its start marker, and publishes its
  LoRA create-only (multipart when large) or fails; RunPod then posts the webhook 0, 1 or 2
  times (lost, delivered, duplicated), each delivery an actor of its own;
* ``webhook_tick`` and ``poll_tick``: the completion sensors' decisions (route, reject,
  skip what is settled, request one completion run per job and status; a job RunPod
  forgot is completed from its file in the store on the tick, or else requests a
  reconciliation), the runs they request executing as actors;
* ``reconcile_job``: reconciliation, housekeeping and the version retention, as the
  ``reconcile_registry`` job runs them; ``inbox``: the inbox pass alone; ``legacy``;
* ``promote``, ``rollback``, ``unalias``, ``delete``, ``retention`` (an operator);
* ``outside``: a file dropped by another tool (odd names, poisoned or copied bodies).

Everything an actor expects to fail with (a store error that outlasted its retries, a
refusal, a submission in flight or unknown) ends it quietly; anything else is a finding.
"""

from __future__ import annotations

import json
import random
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from lora_pipeline.backends.base import JobNotFound, RunPodError
from lora_pipeline.contracts.job_status import JobStatus
from lora_pipeline.contracts.training import TrainingRequest
from lora_pipeline.dataset.versions import read_manifest, set_current
from lora_pipeline.defs.completion_sensors import _completion_from_store, _reject_unusable, unfinished_jobs
from lora_pipeline.lifecycle.housekeeping import Retention, housekeep
from lora_pipeline.lifecycle.legacy_import import import_legacy
from lora_pipeline.lifecycle.reconcile import process_inbox, reconcile
from lora_pipeline.lifecycle.submit import (
    SubmissionInFlight,
    SubmissionUnknown,
    job_run_key,
    record_completion,
    submit_training,
    training_params,
)
from lora_pipeline.lifecycle.versions import prune_versions
from lora_pipeline.registry.merge import find_version_by_job
from lora_pipeline.registry.models import VersionStatus
from lora_pipeline.registry.safetensors_header import InvalidLoraFile
from lora_pipeline.registry_store.documents import ClaimLost, Refused, RegistryStore
from lora_pipeline.registry_store.lora_files import read_header
from lora_pipeline.storage.base import PreconditionFailed, StorageError
from lora_pipeline.storage.keys import WEBHOOK_INBOX, lora_key, lora_prefix
from lora_pipeline.webhook.inbox import InvalidWebhook, list_inbox, mark_processed, route_style, write_webhook
from lora_pipeline.worker.handler import announce_start
from lora_pipeline_tests.registry.lora_files import lora_bytes
from lora_pipeline_tests.sim.runpod import SimJob, SimRunPod
from lora_pipeline_tests.sim.scheduler import Sim
from lora_pipeline_tests.sim.store import SimStore
from lora_pipeline_tests.worker.conftest import png_bytes, put_dataset

STYLES = ("alpha", "beta")
ALIASES = ("prod", "staging")
LEGACY = Path(__file__).resolve().parent.parent / "registry" / "fixtures" / "legacy"
POISONS = (
    b'{"id": "5d9f0c1e-aaaa-4bbb-8ccc-000000000001", "status": "COMPLETED", "delayTime": "soon"}',
    b'{"id": "5d9f0c1e-aaaa-4bbb-8ccc-000000000002", "status": "COMPLETED", "output": 5}',
    b"this is not json",
    b'["a list"]',
)
# Names other tools give files: a copy in a file manager, a person, `aws s3 cp` of a download.
ODD_NAMES = ("copy of body (1).json", "résumé.json", "body (1).json", "notes.txt", "x y.json", "stray.json")
# Parts of the world a campaign can leave out (``--without``, ``World(..., without=...)``): while
# a defect that one of them meets is being fixed, the campaign runs without it and its failing
# seed stays in view; the invariants stay whole. Each part met one of issue 22's defects.
FEATURES = {
    "odd_names": "files dropped by outside tools under names the pipeline never builds (issue 22, defect 1)",
    "bad_2xx": "/run answers 2xx-not-JSON, 3xx, or cut short, after RunPod queued the job (issue 22, defect 2)",
    "retention": "the version retention while aliases have a history (issue 22, defect 3)",
}
RETENTION = Retention(webhooks=timedelta(hours=12), failed_checkpoints=timedelta(hours=12), locks=timedelta(days=1))
# Expected endings of an action: the real code's answers to faults and to refused requests.
EXPECTED = (StorageError, RunPodError, SubmissionInFlight, SubmissionUnknown, Refused, ClaimLost, InvalidWebhook)


@dataclass
class Ledger:
    """What the world did, for the invariants to hold the registry to."""

    inbox_written: set[str] = field(default_factory=set)  # every inbox key a body landed at
    dropped: set[str] = field(default_factory=set)  # inbox files written by outside tools
    completed_seen: dict[tuple[str, str], str] = field(default_factory=dict)  # (style, version) → file key
    pruned: set[str] = field(default_factory=set)  # keys housekeeping removed
    retention_deleted: set[tuple[str, str]] = field(default_factory=set)
    unexpected: list[str] = field(default_factory=list)  # exceptions no caller expects
    actions: dict[str, int] = field(default_factory=dict)


class World:
    """One schedule: the store, RunPod, the scheduler, and the actors the seed starts."""

    def __init__(self, seed: int, steps: int, tmp: Path, *, without: frozenset[str] = frozenset()) -> None:
        self.without = without
        self.steps = steps
        self.rng = random.Random(seed)
        self.sim = Sim(random.Random(seed * 1_000_003 + 1))
        self.store = SimStore(self.sim)
        self.runpod = SimRunPod(self.sim, bad_2xx="bad_2xx" not in without)
        self.client = self.runpod.client()
        self.clock = self.sim.clock()
        self.tmp = tmp
        self.ledger = Ledger()
        self.runs: set[str] = set()  # run keys requested (Dagster runs each key once)
        self._observed: dict[str, str] = {}  # style → ETag of its document when last observed
        self.started = 0
        self.budget = steps
        self.keep_versions = self.rng.choice([0, 1, 2]) if "retention" not in without else 0
        self.actions: list[tuple[str, Callable[[], None], float]] = [
            ("submit", self.submit, 4),
            ("burst", self.burst, 1),
            ("work", self.work, 4),
            ("webhook_tick", self.webhook_tick, 2),
            ("poll_tick", self.poll_tick, 2),
            ("inbox", self.inbox, 1),
            ("reconcile_job", self.reconcile_job, 1.5),
            ("legacy", self.legacy, 0.3),
            ("promote", self.promote, 3),
            ("rollback", self.rollback, 1.5),
            ("unalias", self.unalias, 0.3),
            ("delete", self.delete, 0.7),
            ("retention", self.retention, 1 if "retention" not in without else 0),
            ("outside", self.outside, 1),
        ]

    # -- running -----------------------------------------------------------------------------

    def run(self) -> None:
        """Two rounds of actions with a settling in between (so that the second round has completed
        versions to promote, roll back, delete and prune), then the drain."""
        self.prepare()
        self.sim.after_actor = self.observe
        self.budget = self.steps // 2
        self.sim.run(self._start_next)
        self.settle()
        self.budget = self.steps
        self.sim.run(self._start_next)
        self.drain()

    def prepare(self) -> None:
        for i, style in enumerate(STYLES):
            digest = put_dataset(self.store, [("a.png", png_bytes((40 * i, 90, 10)), f"{style} square")], style=style)
            set_current(self.store, read_manifest(self.store, style, digest), now=self.sim.true_now())
        bucket = LEGACY / "bucket"
        for path in sorted(bucket.rglob("*.safetensors")):
            self.store.put(path.relative_to(bucket).as_posix(), path.read_bytes())

    def _start_next(self) -> bool:
        if self.started >= self.budget:
            return False
        self.started += 1
        names = [a[0] for a in self.actions]
        name = self.rng.choices(names, weights=[a[2] for a in self.actions])[0]
        self.spawn(name, dict((a[0], a[1]) for a in self.actions)[name])
        return True

    def spawn(self, name: str, task: Callable[[], None], *, delay: float = 0.0, reliable: bool = False) -> None:
        """Start an actor: its skew, crash point and faultiness from the seed (``reliable``: none)."""
        rng = self.rng
        roll = rng.random()
        seconds = rng.uniform(-2, 2) if roll < 0.8 else rng.uniform(-60, 60) if roll < 0.95 else rng.uniform(-900, 900)
        crash_at = None if reliable or rng.random() >= 0.25 else rng.randint(1, 15)
        self.ledger.actions[name] = self.ledger.actions.get(name, 0) + 1
        self.sim.spawn(
            name,
            self._guarded(name, task),
            skew=timedelta(seconds=seconds),
            crash_at=crash_at,
            faulty=not reliable and rng.random() < 0.7,
        )
        if delay:
            self.sim.actors[-1].wake_at = self.sim.t + delay

    def _guarded(self, name: str, task: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                task()
            except EXPECTED:
                pass
            except Exception:  # noqa: BLE001 - a finding: the real code raised what no caller expects
                self.ledger.unexpected.append(f"{name}: {traceback.format_exc(limit=6)}")

        return run

    # -- actions -------------------------------------------------------------------------------

    def submit(self) -> None:
        submit_training(
            store=self.store,
            backend=self.client,
            style=self.rng.choice(STYLES),
            params=training_params("tiny", {"rank": self.rng.choice([4, 8, 16])}),
            force=self.rng.random() < 0.5,
            claim_lease=timedelta(seconds=10),  # short, so that crashed holders' claims are taken over
            posting_lease=timedelta(seconds=30),
            wait_for_other_s=15.0,
            clock=self.clock,
            new_id=lambda: f"{self.rng.getrandbits(128):032x}",  # from the seed: a replay is exact
        )

    def burst(self) -> None:
        for _ in range(3):
            self.spawn("submit", self.submit)

    def work(self, job: SimJob | None = None, *, reliable: bool = False) -> None:
        queued = self.runpod.queued()
        if job is None:
            if not queued:
                return
            job = self.rng.choice(queued)
        job.taken = True
        try:
            self._work(job, reliable)
        finally:  # a worker that died gives the job back (RunPod hands it to another)
            job.taken = False

    def _work(self, job: SimJob, reliable: bool) -> None:
        request = TrainingRequest.model_validate(job.input)
        job.status = "IN_PROGRESS"
        announce_start(self.store, request, job.id)
        if not reliable and self.rng.random() < 0.15:
            return  # slow: still IN_PROGRESS, another worker tick (or the drain) finishes it
        outcome = self._train(request, job, fail=not reliable and self.rng.random() < 0.15)
        self.runpod.finish(job, outcome)
        deliveries = 1 if reliable else self.rng.choice([0, 1, 1, 1, 2])  # lost, delivered, duplicated
        for _ in range(deliveries):
            self.spawn("deliver", lambda job=job: self.deliver(job), delay=self.rng.uniform(0, 30), reliable=reliable)

    def _train(self, request: TrainingRequest, job: SimJob, *, fail: bool) -> dict[str, Any]:
        if fail:
            return {"status": "FAILED", "error": "CUDA out of memory"}
        key = lora_key(request.style, int(request.version[1:]))
        metadata = {
            "lora_pipeline.request_id": request.request_id,
            "lora_pipeline.job_id": job.id,
            "lora_pipeline.dataset_hash": request.dataset_hash,
        }
        path = self.tmp / f"{job.base}.safetensors"
        path.write_bytes(lora_bytes(metadata, tensors=self.rng.choice([2, 2, 40])))  # 40 tensors: multipart
        try:
            self.store.upload_file(key, path, if_none_match=True)  # create-only, as the worker publishes
        except PreconditionFailed:
            try:  # the worker's own upload, whose answer was lost, or another request's file?
                owner = read_header(self.store, key).metadata.get("lora_pipeline.request_id")
            except InvalidLoraFile:
                owner = None
            if owner != request.request_id:
                return {"status": "FAILED", "error": f"{key} already exists"}
        output = {"style": request.style, "version": request.version, "lora_key": key}
        output.update(dataset_hash=request.dataset_hash, request_id=request.request_id, steps=1)
        return {"status": "COMPLETED", "output": output}

    def deliver(self, job: SimJob) -> None:
        """The receiver stores one delivery of the job's webhook."""
        key = write_webhook(
            self.store, json.dumps(job.body()).encode(), received_at=self.clock.now().replace(microsecond=0)
        )
        if key:
            self.ledger.inbox_written.add(key)

    def webhook_tick(self) -> None:
        """The webhook sensor's decisions, each requested run executing as its own actor."""
        registry = RegistryStore(self.store, clock=self.clock)
        routes = registry.fresh_index()[0].jobs
        for item in list(list_inbox(self.store)):
            status, problem = item.usable_status()
            if status is None:
                _reject_unusable(self.store, item.key, problem)  # the sensor's own: an outage ends the tick
                continue
            style = route_style(routes, status)
            if style is None:
                continue
            if self._settled(registry, style, status):
                mark_processed(self.store, item.key)
                continue
            self._request_completion(style, status, source="webhook", inbox_key=item.key)

    def _settled(self, registry: RegistryStore, style: str, status: JobStatus) -> bool:
        version = find_version_by_job(registry.read(style)[0], status.id)
        if version is None:
            return False
        if version.status is VersionStatus.completed:
            return job_run_key(status.id, status.status) in self.runs
        return version.status is VersionStatus.failed and not status.succeeded

    def _request_completion(self, style: str, status: JobStatus, *, source: str, inbox_key: str | None) -> None:
        run_key = job_run_key(status.id, status.status)
        if run_key in self.runs:
            return
        self.runs.add(run_key)

        def complete() -> None:
            record_completion(self.store, style, status, source=source, clock=self.clock)  # type: ignore[arg-type]
            if inbox_key:
                mark_processed(self.store, inbox_key)

        self.spawn("completion_run", complete)

    def poll_tick(self) -> None:
        """The job sensor's decisions: poll the unfinished jobs, request completions and settling."""
        unfinished = unfinished_jobs(RegistryStore(self.store, clock=self.clock))  # the sensor's own
        expired = []
        for job_id, style in sorted(unfinished.items()):
            try:
                status = self.client.status(job_id)
            except JobNotFound:
                status = _completion_from_store(self.store, style, job_id, self.clock)  # the sensor's own: its file
                if status is None:
                    expired.append(job_id)
                else:
                    self._request_completion(style, status, source="poll", inbox_key=None)
                continue
            if status.is_terminal:
                self._request_completion(style, status, source="poll", inbox_key=None)
        if expired:
            run_key = f"settle-expired:{int(self.sim.t // 3600)}:{','.join(sorted(expired))}"
            if run_key not in self.runs:
                self.runs.add(run_key)
                self.spawn("reconcile_job", self.reconcile_job)

    def inbox(self) -> None:
        process_inbox(self.store, workers=1, clock=self.clock)

    def reconcile_job(self) -> None:
        """``reconcile_registry``: reconcile, housekeeping, then the version retention."""
        reconcile(self.store, status_lookup=self.client.status, workers=1, clock=self.clock)
        self._housekeep()
        if self.keep_versions:
            self._prune(self.keep_versions)

    def _housekeep(self) -> None:
        report = housekeep(self.store, retention=RETENTION, now=self.clock.now())
        self.ledger.pruned.update(k for keys in report.deleted.values() for k in keys)

    def _prune(self, keep: int) -> None:
        report = prune_versions(self.store, keep, clock=self.clock)
        for style, versions in report.deleted.items():
            self.ledger.retention_deleted.update((style, v) for v in versions)

    def retention(self) -> None:
        self._prune(self.rng.choice([1, 2]))

    def legacy(self) -> None:
        import_legacy(self.store, LEGACY / "style_images", apply_inbox=False, clock=self.clock)
        process_inbox(self.store, workers=1, clock=self.clock)

    def _document(self, style: str) -> Any:
        return RegistryStore(self.store, clock=self.clock).read(style)[0]

    def promote(self) -> None:
        style, alias = self.rng.choice(STYLES), self.rng.choice(ALIASES)
        doc = self._document(style)
        completed = [v.name for v in doc.versions if v.status is VersionStatus.completed]
        others = [name for name in completed if name != doc.aliases.get(alias)]  # a move, mostly
        if completed:
            self._move(style, "promote", self.rng.choice(others or completed), alias)

    def rollback(self) -> None:
        self._move(self.rng.choice(STYLES), "rollback", None)

    def unalias(self) -> None:
        self._move(self.rng.choice(STYLES), "remove", None)

    def _move(self, style: str, action: str, version: str | None, alias: str | None = None) -> None:
        RegistryStore(self.store, clock=self.clock).move_alias(
            style,
            alias or self.rng.choice(ALIASES),
            action=action,
            by="sim",
            version=version,  # type: ignore[arg-type]
        )

    def delete(self) -> None:
        style = self.rng.choice(STYLES)
        versions = [v.name for v in self._document(style).versions]
        if versions:
            RegistryStore(self.store, clock=self.clock).delete_version(style, self.rng.choice(versions), by="sim")

    def outside(self) -> None:
        """Another tool drops a file: a copied webhook body or junk under an odd name, or a stray LoRA."""
        rng = self.rng
        if rng.random() < 0.2 and "odd_names" not in self.without:
            style = rng.choice(STYLES)
            self.store.drop(f"{lora_prefix(style)}{style}_v{rng.randint(1, 9)} (copy).safetensors", lora_bytes())
            return
        finished = [j for j in self.runpod.jobs.values() if j.ended_at is not None]
        body = (
            json.dumps(rng.choice(finished).body()).encode() if finished and rng.random() < 0.5 else rng.choice(POISONS)
        )
        names = ODD_NAMES if "odd_names" not in self.without else ("stray.json", "legacy-copy.json")
        key = f"{WEBHOOK_INBOX}/{rng.choice(names)}"
        if key in self.store.objects:
            key = key.replace(".", f".{rng.randrange(10**6)}.", 1)
        self.store.drop(key, body)
        self.ledger.dropped.add(key)

    # -- the end -------------------------------------------------------------------------------

    def observe(self) -> None:
        """Note every completed version and its file (after each actor ends, and in the drain);
        a document is parsed again only when it changed."""
        registry = RegistryStore(self.store, primary="diffusers")
        for style in STYLES:
            stored = self.store.objects.get(f"registry/{style}/training_versions.json")
            if stored is None or self._observed.get(style) == stored.etag:
                continue
            self._observed[style] = stored.etag
            try:
                doc = registry.read(style)[0]
            except ValueError:
                continue
            for v in doc.versions:
                if v.status is VersionStatus.completed and v.file is not None:
                    self.ledger.completed_seen.setdefault((style, v.name), v.file.key)

    def settle(self) -> None:
        """No faults: every job ends, its webhook is delivered once more, the inbox is applied and
        the registry reconciled."""
        for job in self.runpod.queued():
            self._drain_step("work", lambda job=job: self.work(job, reliable=True))
        self.sim.run(lambda: False)  # the deliveries just spawned
        for job in list(self.runpod.jobs.values()):
            self._drain_step("deliver", lambda job=job: self.deliver(job))
        lookup = self.client.status
        self._drain_step("inbox", lambda: process_inbox(self.store, workers=1, clock=self.clock))
        self._drain_step("reconcile", lambda: reconcile(self.store, status_lookup=lookup, workers=1, clock=self.clock))
        self._drain_step("inbox", lambda: process_inbox(self.store, workers=1, clock=self.clock))
        self.observe()

    def drain(self) -> None:
        """Settle, then reconcile a day later (past the maximum job age), twice."""
        self.settle()
        self.sim.t += 26 * 3600
        lookup = self.client.status
        for _ in range(2):
            self._drain_step(
                "reconcile", lambda: reconcile(self.store, status_lookup=lookup, workers=1, clock=self.clock)
            )
        self.observe()

    def _drain_step(self, name: str, step: Callable[[], object]) -> None:
        """One drain step; with no faults left, any exception is a finding (and the drain goes on)."""
        try:
            step()
        except Exception:  # noqa: BLE001 - reported by the invariants
            self.ledger.unexpected.append(f"drain {name}: {traceback.format_exc(limit=6)}")


def run_schedule(seed: int, steps: int, *, without: frozenset[str] = frozenset()) -> World:
    """Run one schedule. The real code's back-off jitter draws from the global ``random``: it is
    seeded too (and put back after), so that a seed replays the same waits."""
    state = random.getstate()
    random.seed(seed)
    try:
        with tempfile.TemporaryDirectory(prefix="lora-sim-") as tmp:
            world = World(seed, steps, Path(tmp), without=without)
            world.run()
    finally:
        random.setstate(state)
    return world
