"""A seeded fault campaign: every actor at once, crashes between any two store calls.

Submitters (one at a time and in bursts), RunPod workers, webhook deliveries
(duplicated, reordered, poisoned), status polls that record completions, inbox
passes, reconciliations and legacy imports run in a random order chosen by a seed.
Each call may "die" at its Nth store call (a ``Crash``, which no ``except Exception``
catches, as a killed process would); ``/run`` answers are sometimes lost after RunPod
queued the job. Against S3 the same runs through the fault proxy, which adds 503s,
resets and responses dropped after the write was applied.

Then the world drains: no more crashes, every job runs to its end, every webhook is
delivered, and the registry is reconciled (at once, and again a day later). After
that the invariants the README promises must hold:

* each version has at most one RunPod job, and each job is in exactly one version;
* every finished job is settled: its version is completed iff its LoRA file parses;
* no inbox file is lost: each is applied (processed/) or in rejected/ with a reason;
* the index agrees with the documents.

The deterministic simulation (``lora_pipeline_tests/sim/``) runs the same actors and more
(aliases, deletes, the retention, sensor ticks, clock skew) in thousands of seeded schedules
on an in-memory store; this campaign stays for what a simulation cannot show: real threads
racing on the local store's file locks, and S3 over HTTP (moto) behind a proxy that drops
connections. ``LORA_CAMPAIGN_SEEDS`` / ``LORA_CAMPAIGN_STEPS`` make it longer (``make soak-real``).
"""

from __future__ import annotations

import json
import os
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from lora_pipeline.backends.base import RunPodError
from lora_pipeline.backends.runpod_client import RunPodClient
from lora_pipeline.contracts.training import TrainingRequest
from lora_pipeline.dataset.versions import read_manifest, set_current
from lora_pipeline.lifecycle.legacy_import import import_legacy
from lora_pipeline.lifecycle.reconcile import process_inbox, reconcile
from lora_pipeline.lifecycle.submit import (
    SubmissionInFlight,
    SubmissionUnknown,
    record_completion,
    submit_training,
    training_params,
)
from lora_pipeline.registry.merge import merge
from lora_pipeline.registry.models import VersionStatus
from lora_pipeline.registry.safetensors_header import InvalidLoraFile
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.registry_store.index import StyleSummary
from lora_pipeline.registry_store.lora_files import read_header
from lora_pipeline.storage.base import PreconditionFailed, StorageError
from lora_pipeline.storage.keys import WEBHOOK_INBOX, WEBHOOK_PROCESSED, WEBHOOK_REJECTED, lora_key
from lora_pipeline.webhook.inbox import InvalidWebhook, write_webhook
from lora_pipeline.worker.handler import announce_start
from lora_pipeline_tests.fakes.runpod_api import FakeRunPod
from lora_pipeline_tests.registry.lora_files import lora_bytes
from lora_pipeline_tests.worker.conftest import png_bytes, put_dataset

STYLES = ("alpha", "beta")
LEGACY = Path(__file__).parent / "fixtures" / "legacy"
SEEDS = [int(s) for s in os.environ.get("LORA_CAMPAIGN_SEEDS", "1,2").split(",")]
STEPS = int(os.environ.get("LORA_CAMPAIGN_STEPS", "60"))
POISONS = (
    b'{"id": "5d9f0c1e-aaaa-4bbb-8ccc-000000000001", "status": "COMPLETED", "delayTime": "soon"}',
    b'{"id": "5d9f0c1e-aaaa-4bbb-8ccc-000000000002", "status": "COMPLETED", "output": 5}',
    b"this is not json",
    b'["a list"]',
)


class Crash(BaseException):
    """The process died here (BaseException: no ``except Exception`` handler survives it)."""


class CrashingStore:
    """The store, except that its ``crash_at``-th call raises Crash before reaching it."""

    def __init__(self, inner: Any, crash_at: int | None) -> None:
        self.inner, self.crash_at, self.calls = inner, crash_at, 0
        self.lock = threading.Lock()

    def _tick(self) -> None:
        with self.lock:
            self.calls += 1
            if self.calls == self.crash_at:
                raise Crash(f"killed at store call {self.calls}")

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in ("get", "get_range", "head", "put", "delete", "upload_file", "download_file"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self._tick()
            return attr(*args, **kwargs)

        return call

    def list(self, prefix: str = "") -> Iterator[Any]:
        self._tick()
        yield from self.inner.list(prefix)


@dataclass
class World:
    store: Any
    fake: FakeRunPod
    rng: random.Random
    tmp: Path
    client: RunPodClient = field(init=False)
    written: set[str] = field(default_factory=set)  # every inbox key a body was written to
    crashes: int = 0

    def __post_init__(self) -> None:
        self.client = RunPodClient(
            self.fake.api_key,
            self.fake.endpoint_id,
            base_url=self.fake.base_url,
            timeout=5.0,
            backoff_base_s=0.001,
            sleep=lambda s: None,
        )

    def maybe_crashing(self, chance: float = 0.3) -> Any:
        if self.rng.random() < chance:
            return CrashingStore(self.store, self.rng.randint(1, 12))
        return self.store

    # -- actors ---------------------------------------------------------------------

    def submit(self, store: Any = None) -> None:
        style = self.rng.choice(STYLES)
        params = training_params("tiny", {"rank": self.rng.choice([4, 8, 16])})
        force = self.rng.random() < 0.3  # "train again": a new version even for the same dataset
        lost_answer = self.rng.random() < 0.1
        client = self.client
        if lost_answer:  # RunPod queues the job but the answer is lost (read timeout)
            self.fake.latency_s = 0.3
            client = RunPodClient(
                self.fake.api_key, self.fake.endpoint_id, base_url=self.fake.base_url, timeout=0.1, sleep=lambda s: None
            )
        try:
            submit_training(
                store=store or self.maybe_crashing(),
                backend=client,
                style=style,
                params=params,
                claim_lease=timedelta(milliseconds=50),
                posting_lease=timedelta(milliseconds=100),
                wait_for_other_s=0.3,
                force=force,
            )
        except (SubmissionInFlight, SubmissionUnknown, RunPodError, StorageError):
            pass
        finally:
            if lost_answer:
                self.fake.latency_s = 0.0

    def burst(self) -> None:
        """Three submitters at once (two clicks and a sensor)."""
        threads = [threading.Thread(target=self._guarded, args=(self.submit,)) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _guarded(self, fn) -> None:
        try:
            fn()
        except Crash:
            self.crashes += 1

    def work(self, finish_all: bool = False) -> None:
        """A RunPod worker takes a queued job: announces itself, trains, publishes, returns."""
        queued = [j for j in self.fake.jobs.values() if j.status in ("IN_QUEUE", "IN_PROGRESS")]
        if not queued:
            return
        for job in queued if finish_all else [self.rng.choice(queued)]:
            store = self.store if finish_all else self.maybe_crashing(0.2)
            request = TrainingRequest.model_validate(job.input)
            if job.status == "IN_QUEUE":
                self.fake.start_job(job.id)
            announce_start(store, request, job.id)
            if not finish_all and self.rng.random() < 0.15:
                continue  # the worker is slow: still IN_PROGRESS
            self.fake.finish(job.id, self._train(store, request, job.id, fail=self.rng.random() < 0.2))

    def _train(self, store: Any, request: TrainingRequest, job_id: str, *, fail: bool) -> dict[str, Any]:
        if fail:
            return {"status": "FAILED", "error": "CUDA out of memory"}
        number = int(request.version[1:])
        key = lora_key(request.style, number)
        path = self.tmp / f"{job_id}.safetensors"
        path.write_bytes(
            lora_bytes(
                {
                    "lora_pipeline.request_id": request.request_id,
                    "lora_pipeline.job_id": job_id,
                    "lora_pipeline.dataset_hash": request.dataset_hash,
                }
            )
        )
        try:
            store.upload_file(key, path, if_none_match=True)  # create-only, as the worker does
        except PreconditionFailed:
            return {"status": "FAILED", "error": f"{key} already exists"}
        return {
            "status": "COMPLETED",
            "output": {
                "style": request.style,
                "version": request.version,
                "lora_key": key,
                "dataset_hash": request.dataset_hash,
                "request_id": request.request_id,
                "steps": 1,
            },
        }

    def deliver(self, store: Any = None, job: Any = None) -> None:
        finished = [j for j in self.fake.jobs.values() if j.status in ("COMPLETED", "FAILED")]
        if not finished:
            return
        job = job or self.rng.choice(finished)
        for _ in range(self.rng.choice([1, 1, 2])):  # RunPod redelivers
            key = write_webhook(store or self.maybe_crashing(), json.dumps(job.body()).encode())
            if key:
                self.written.add(key)

    def poison(self) -> None:
        name = self.rng.choice(["stray.json", f"{self.rng.randrange(10**6)}.json", "legacy-copy.json"])
        key = f"{WEBHOOK_INBOX}/{name}"
        self.store.put(key, self.rng.choice(POISONS))
        self.written.add(key)

    def poll(self) -> None:
        """The polling sensor's run: a terminal status is recorded by complete_training."""
        registry = RegistryStore(self.store)
        index, _ = registry.fresh_index()
        jobs = [(style, j.job_id) for style, s in index.styles.items() for j in s.unfinished.values()]
        if not jobs:
            return
        style, job_id = self.rng.choice(jobs)
        try:
            status = self.client.status(job_id)
        except RunPodError:
            return
        if status.is_terminal:
            record_completion(self.maybe_crashing(), style, status, source="poll")

    def inbox(self) -> None:
        process_inbox(self.maybe_crashing())

    def reconcile(self, store: Any = None, now: datetime | None = None) -> None:
        reconcile(store or self.maybe_crashing(), status_lookup=self.client.status, now=now, workers=2)

    def legacy(self) -> None:
        import_legacy(self.maybe_crashing(), LEGACY / "style_images")

    def step(self) -> None:
        actions = [
            self.submit,
            self.submit,
            self.burst,
            self.work,
            self.work,
            self.deliver,
            self.deliver,
            self.poison,
            self.poll,
            self.inbox,
            self.reconcile,
            self.legacy,
        ]
        try:
            self.rng.choice(actions)()
        except Crash:
            self.crashes += 1
        except (StorageError, InvalidWebhook):
            pass  # a store fault that outlasted its retries: the call failed, as a real one would

    def drain(self) -> None:
        """No more crashes: every job ends, every webhook is delivered, reconcile now and later.

        A POST whose answer was lost may still be queuing its job in the fake; RunPod would
        run that job, so the drain waits for it to exist before working every job."""
        self.fake.wait_idle()
        self.work(finish_all=True)
        for job in list(self.fake.jobs.values()):
            self.deliver(store=self.store, job=job)
        process_inbox(self.store)
        self.reconcile(store=self.store)
        process_inbox(self.store)
        self.reconcile(store=self.store, now=datetime.now(UTC) + timedelta(hours=26))
        self.reconcile(store=self.store)


def check_invariants(world: World) -> None:
    store, registry = world.store, RegistryStore(world.store)
    docs = {style: registry.read(style)[0] for style in registry.styles()}

    # each version at most one job; each job in exactly one version
    jobs_per_version: dict[tuple[str, str], list[str]] = {}
    for job in world.fake.jobs.values():
        key = (job.input["style"], job.input["version"])
        jobs_per_version.setdefault(key, []).append(job.id)
        holders = [v for v in docs[job.input["style"]].versions if job.base in v.job_bases]
        assert len(holders) == 1, f"job {job.id} is in {len(holders)} versions"
        assert holders[0].name == job.input["version"], f"job {job.id} landed in {holders[0].name}"
    assert all(len(ids) == 1 for ids in jobs_per_version.values()), jobs_per_version
    ours = [v for style in STYLES if style in docs for v in docs[style].versions]
    for v in ours:
        assert len(v.job_ids) <= 1, f"{v.name} holds jobs {v.job_ids}"

    # every finished job settled: completed iff its file parses
    for job in world.fake.jobs.values():
        style, name = job.input["style"], job.input["version"]
        version = docs[style].version(name)
        assert version.status.finished, f"{style} {name} ({job.status}) is still {version.status.value}"
        try:
            read_header(store, lora_key(style, version.number))
            parses = True
        except InvalidLoraFile:
            parses = False
        assert (version.status is VersionStatus.completed) == parses, (
            f"{style} {name}: {version.status.value}, file parses: {parses}, job {job.status}"
        )
    for v in ours:  # the drain settles every version: a job's end, or no job within the maximum age
        assert v.status.finished, f"{v.name} is left {v.status.value} (claim {v.claim})"

    # no inbox file lost: each applied or rejected with its reason
    inbox = {i.key for i in store.list(WEBHOOK_INBOX + "/")}
    assert not inbox, f"left in the inbox after the drain: {sorted(inbox)}"
    processed = {i.key.rsplit("/", 1)[1] for i in store.list(WEBHOOK_PROCESSED + "/")}
    rejected = {i.key.rsplit("/", 1)[1] for i in store.list(WEBHOOK_REJECTED + "/")}
    for key in world.written:
        name = key.rsplit("/", 1)[1]
        assert name in processed or (name in rejected and f"{name}.reason.txt" in rejected), f"{key} was lost"

    # the index agrees with the documents
    index, stale = registry.fresh_index(repair=False)
    assert stale == []
    for style in docs:
        stored = registry.read_stored(style)
        assert index.styles[style] == StyleSummary.of(merge(stored.document, ()), stored.etag)


def prepare(store: Any) -> None:
    for i, style in enumerate(STYLES):
        digest = put_dataset(store, [("a.png", png_bytes((40 * i, 90, 10)), f"{style} square")], style=style)
        set_current(store, read_manifest(store, style, digest))
    bucket = LEGACY / "bucket"
    for path in sorted(bucket.rglob("*.safetensors")):
        store.put(path.relative_to(bucket).as_posix(), path.read_bytes())


def run_campaign(store: Any, seed: int, tmp_path: Path, steps: int = STEPS) -> World:
    prepare(store)
    with FakeRunPod() as fake:
        world = World(store, fake, random.Random(seed), tmp_path)
        for _ in range(steps):
            world.step()
        world.drain()
        check_invariants(world)
    return world


@pytest.mark.parametrize("seed", SEEDS)
def test_campaign_on_the_local_store(local_store, seed, tmp_path):
    world = run_campaign(local_store, seed, tmp_path)
    assert world.crashes > 0  # the campaign did crash things; the invariants held anyway


@pytest.mark.parametrize("seed", SEEDS)
def test_campaign_on_s3_behind_the_fault_proxy(faulty_s3_store, fault_proxy, seed, tmp_path):
    rng = random.Random(seed * 7919)
    faults = ["503", "500", "reset", "drop-response"]
    injected: list[str] = []

    class Flaky:
        """Before each call, now and then schedule a fault for the next request."""

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            attr = getattr(self.inner, name)
            if callable(attr) and rng.random() < 0.08:
                injected.append(rng.choice(faults))
                fault_proxy.inject(injected[-1], times=1)
            return attr

    world = run_campaign(Flaky(faulty_s3_store), seed, tmp_path, steps=max(20, STEPS // 2))
    fault_proxy.clear()
    assert world.crashes > 0 and len(set(injected)) >= 3  # the store really misbehaved, in several ways
