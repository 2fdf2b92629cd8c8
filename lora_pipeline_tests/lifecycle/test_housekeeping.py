"""Housekeeping: old webhook files of settled jobs, finished versions' checkpoints and idle
lock files go; anything an unfinished (or not yet known) job may still need stays, and a
redelivery after its claim was pruned leaves the registry unchanged."""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest
from click.testing import CliRunner

import lora_pipeline.storage.local as local_module
from lora_pipeline.cli import main
from lora_pipeline.definitions import defs
from lora_pipeline.lifecycle.housekeeping import (
    CHECKPOINT,
    PROCESSED,
    REJECTED,
    SEEN,
    Retention,
    claim_job_ids,
    housekeep,
)
from lora_pipeline.lifecycle.reconcile import reconcile
from lora_pipeline.registry.evidence import Submission
from lora_pipeline.registry.models import VersionStatus
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.settings import SettingsError, load_settings
from lora_pipeline.storage.base import PreconditionFailed, StoreUnavailable
from lora_pipeline.storage.documents import read_json, update_json
from lora_pipeline.storage.keys import (
    WEBHOOK_INBOX,
    WEBHOOK_PROCESSED,
    WEBHOOK_REJECTED,
    WEBHOOK_SEEN,
    checkpoint_prefix,
    registry_key,
)
from lora_pipeline.storage.local import LocalStore
from lora_pipeline.webhook.inbox import seen_key, write_webhook

from lora_pipeline_tests.registry.lora_files import lora_bytes

STYLE = "s"
DONE = "11111111-1111-4111-8111-111111111111-e1"  # V1: completed
FAILED = "22222222-2222-4222-8222-222222222222-e1"  # V2: failed
RUNNING = "33333333-3333-4333-8333-333333333333-e1"  # V3: training
UNKNOWN = "44444444-4444-4444-8444-444444444444-e1"  # no document holds it
LATER = timedelta(days=40)  # past the default 30-day retention

BODIES = {
    DONE: {
        "id": DONE,
        "status": "COMPLETED",
        "delayTime": 800,
        "executionTime": 90000,
        "output": {"lora_key": f"loras/{STYLE}/{STYLE}_v1.safetensors"},
    },
    FAILED: {"id": FAILED, "status": "FAILED", "error": "CUDA out of memory"},
    RUNNING: {"id": RUNNING, "status": "IN_PROGRESS"},
    UNKNOWN: {"id": UNKNOWN, "status": "FAILED", "error": "boom"},
}


def now() -> datetime:
    return datetime.now(UTC)


def deliver(store, job_id: str, body: dict | None = None) -> str | None:
    return write_webhook(store, json.dumps(body or BODIES[job_id]).encode())


def keys(store, prefix: str) -> list[str]:
    return [i.key for i in store.list(prefix + "/")]


@pytest.fixture
def settled(store):
    """V1 completed, V2 failed, V3 training (each through its webhook), and a webhook for a
    job no document holds; reconciled, so the known jobs' bodies sit in processed/."""
    registry = RegistryStore(store)
    for number, job in ((1, DONE), (2, FAILED), (3, RUNNING)):
        registry.apply(STYLE, [Submission(STYLE, number, f"req-{number}", job, "ab", {}, now() - timedelta(hours=1))])
    store.put(f"loras/{STYLE}/{STYLE}_v1.safetensors", lora_bytes())
    for job in BODIES:
        assert deliver(store, job) is not None
    reconcile(store)
    doc, _ = registry.read(STYLE)
    assert [v.status for v in doc.versions] == [VersionStatus.completed, VersionStatus.failed, VersionStatus.training]
    assert len(keys(store, WEBHOOK_PROCESSED)) == 3 and len(keys(store, WEBHOOK_INBOX)) == 1
    return store


# -- webhook files ---------------------------------------------------------------------


def test_old_files_of_settled_jobs_go_and_those_of_unfinished_and_unknown_jobs_stay(settled):
    store = settled
    report = housekeep(store, now=now() + LATER)

    assert sorted(keys(store, WEBHOOK_SEEN)) == sorted([seen_key(RUNNING, "IN_PROGRESS"), seen_key(UNKNOWN, "FAILED")])
    [processed] = keys(store, WEBHOOK_PROCESSED)
    assert processed.endswith(f"_{RUNNING}.json")
    assert len(keys(store, WEBHOOK_INBOX)) == 1  # the unknown job's body: never pruned
    assert report.counts[SEEN] == 2 and report.counts[PROCESSED] == 2
    assert report.kept[SEEN] == {"unfinished": 1, "unknown": 1}
    assert report.kept[PROCESSED] == {"unfinished": 1}
    assert report.kept_needed == {SEEN: 2, PROCESSED: 1}
    assert report.problems == []


def test_young_files_stay_whatever_their_job(settled):
    before = {p: keys(settled, p) for p in (WEBHOOK_SEEN, WEBHOOK_PROCESSED)}
    report = housekeep(settled, now=now() + timedelta(days=29))

    assert {p: keys(settled, p) for p in before} == before
    assert report.counts[SEEN] == report.counts[PROCESSED] == 0
    assert report.kept[SEEN] == {"young": 4} and report.kept[PROCESSED] == {"young": 3}


def test_the_webhook_retention_is_settable(settled, monkeypatch):
    monkeypatch.setenv("LORA_WEBHOOK_RETENTION_DAYS", "2")
    assert housekeep(settled, now=now() + timedelta(days=1)).counts[SEEN] == 0
    assert housekeep(settled, now=now() + timedelta(days=3)).counts[SEEN] == 2


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan", "inf"])
def test_a_bad_retention_fails_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("LORA_CHECKPOINT_RETENTION_DAYS", value)
    with pytest.raises(SettingsError, match=f"^LORA_CHECKPOINT_RETENTION_DAYS={value!r}: expected a number of days"):
        Retention.from_settings()


def test_retention_from_config_overrides_the_environment():
    retention = Retention.from_settings(
        load_settings({"LORA_WEBHOOK_RETENTION_DAYS": "7", "LORA_LOCK_RETENTION_DAYS": "0.5"}), webhooks_days=3
    )
    assert retention == Retention(webhooks=timedelta(days=3), locks=timedelta(hours=12))


def test_a_dry_run_deletes_nothing_and_lists_what_would_go(settled):
    store = settled
    lock_dir = Path(store.root) / ".lora-store" / "locks" if isinstance(store, LocalStore) else None
    locks_before = sorted(os.listdir(lock_dir)) if lock_dir else None
    everything = keys(store, "webhooks")
    deletes = []
    store.delete = lambda key: deletes.append(key)  # an instance attribute: fails the test if used

    report = housekeep(store, dry_run=True, now=now() + LATER)

    assert deletes == [] and keys(store, "webhooks") == everything
    assert (sorted(os.listdir(lock_dir)) if lock_dir else None) == locks_before
    out = report.to_dict()
    assert out["dry_run"] and out["deleted"][SEEN] == 2
    assert sorted(out["would_delete"][SEEN]) == sorted([seen_key(DONE, "COMPLETED"), seen_key(FAILED, "FAILED")])
    if lock_dir:
        assert out["deleted"]["locks"] == len(locks_before) > 0  # would go; still there
    assert "would delete" in report.summary()


@pytest.mark.parametrize(
    "job, body",
    [
        (DONE, BODIES[DONE]),
        (FAILED, BODIES[FAILED]),
        (DONE, {"id": DONE, "status": "IN_PROGRESS"}),  # a stale report, redelivered late
        (DONE, {"id": DONE.removesuffix("-e1"), "status": "FAILED", "error": "late"}),  # unsuffixed
    ],
    ids=["completed", "failed", "stale-in-progress", "late-failure"],
)
def test_a_redelivery_after_its_claim_was_pruned_leaves_the_registry_unchanged(settled, job, body):
    store = settled
    if body is BODIES[job]:
        assert deliver(store, job) is None  # while the claim exists, a redelivery writes nothing
    housekeep(store, now=now() + LATER)
    document = store.get(registry_key(STYLE)).data
    index = store.get("registry/index.json").data

    key = deliver(store, job, body)
    assert key is not None  # claim gone: the body is stored again…
    report = reconcile(store)

    assert report.webhooks_applied == [key]  # …applied…
    assert report.changed_versions == 0  # …and changes nothing
    assert store.get(registry_key(STYLE)).data == document
    assert store.get("registry/index.json").data == index
    assert keys(store, WEBHOOK_INBOX) == [k for k in keys(store, WEBHOOK_INBOX) if UNKNOWN in k]


def test_an_ambiguous_claim_name_is_read_to_find_its_job(store):
    job = "job_X"  # not a RunPod id: 'job' + status 'X_FAILED' reads as well as 'job_X' + 'FAILED'
    assert claim_job_ids(seen_key(job, "FAILED")) == ["job", "job_X"]
    RegistryStore(store).apply(STYLE, [Submission(STYLE, 1, "req", job, "ab", {}, now())])
    deliver(store, job, {"id": job, "status": "FAILED", "error": "boom"})
    reconcile(store)

    report = housekeep(store, now=now() + LATER)

    assert keys(store, WEBHOOK_SEEN) == [] and report.counts[SEEN] == 1


def test_a_claim_that_cannot_be_read_stays(store):
    store.put(f"{WEBHOOK_SEEN}/not-a-claim.txt", b"?")
    store.put(f"{WEBHOOK_SEEN}/a_B_FAILED.json", b"{broken")  # ambiguous and unreadable
    report = housekeep(store, now=now() + LATER)
    assert len(keys(store, WEBHOOK_SEEN)) == 2 and report.kept[SEEN] == {"unrecognized": 2}


def test_rejected_bodies_go_with_their_reason_once_both_are_old(settled):
    store = settled
    name = f"{WEBHOOK_REJECTED}/20260101T000000000000Z_{DONE}.json"
    store.put(name, b"{broken")
    store.put(name + ".reason.txt", b"body is not JSON\n")
    young = AgedStore(store, {name: now() - LATER})  # the reason is young: the pair stays

    assert housekeep(young, now=now()).kept[REJECTED] == {"young": 2}
    assert keys(store, WEBHOOK_REJECTED) == [name, name + ".reason.txt"]
    report = housekeep(store, now=now() + LATER)
    assert keys(store, WEBHOOK_REJECTED) == [] and report.counts[REJECTED] == 2


def test_a_job_the_index_cannot_route_is_treated_as_unknown(settled):
    """The documents are the truth but the index routes: a stale index only keeps more."""
    store = settled
    store.delete("registry/index.json")
    report = housekeep(store, now=now() + LATER)
    assert report.counts[SEEN] == 0 and report.kept[SEEN] == {"unknown": 4}


def test_a_store_failure_stops_the_pruning_and_is_reported(settled):
    store = DeleteFailsAfter(settled, 1)
    report = housekeep(store, now=now() + LATER)
    assert report.total == 1 + report.counts["locks"] + report.counts["tmp"]
    assert any("stopped at" in p and "the next run carries on" in p for p in report.problems)
    assert housekeep(settled, now=now() + LATER).counts[SEEN] + report.counts[SEEN] == 2


# -- checkpoints -----------------------------------------------------------------------


def put_checkpoints(store, version: str, request_id: str, steps=(100, 200)) -> list[str]:
    prefix = checkpoint_prefix(STYLE, version, request_id)
    for step in steps:
        store.put(f"{prefix}step-{step:09d}.pt", b"state")
    return [f"{prefix}step-{step:09d}.pt" for step in steps]


def test_checkpoints_go_when_the_version_is_completed_and_stay_while_it_is_unfinished(settled):
    store = settled
    completed = put_checkpoints(store, "V1", "req-1")
    running = put_checkpoints(store, "V3", "req-3")
    unknown = put_checkpoints(store, "V9", "req-9")
    store.put("checkpoints/s/stray.pt", b"?")

    report = housekeep(store, now=now())  # completed: at once, however young
    assert report.counts[CHECKPOINT] == len(completed)
    assert not set(completed) & set(keys(store, "checkpoints"))

    report = housekeep(store, now=now() + timedelta(days=3650))  # unfinished: never
    assert set(running + unknown) <= set(keys(store, "checkpoints"))
    assert report.kept[CHECKPOINT] == {"unfinished": 2, "unknown": 2, "unrecognized": 1}


def test_a_failed_versions_checkpoints_stay_for_the_retention_in_case_a_retry_resumes(settled, monkeypatch):
    store = settled
    failed = put_checkpoints(store, "V2", "req-2")

    assert housekeep(store, now=now() + timedelta(days=20)).kept[CHECKPOINT] == {"young": 2}
    # one fresh checkpoint (a retry resuming) keeps the whole request's folder
    aged = AgedStore(store, {failed[0]: now() - LATER})
    assert housekeep(aged, now=now()).kept[CHECKPOINT] == {"young": 2}
    monkeypatch.setenv("LORA_CHECKPOINT_RETENTION_DAYS", "10")
    assert housekeep(store, now=now() + timedelta(days=20)).counts[CHECKPOINT] == 2
    assert keys(store, "checkpoints") == []


def test_a_completed_versions_checkpoints_go_whichever_request_wrote_them(store):
    RegistryStore(store).apply(STYLE, [Submission(STYLE, 1, "req-1", DONE, "ab", {}, now())])
    store.put(f"loras/{STYLE}/{STYLE}_v1.safetensors", lora_bytes())
    reconcile(store)
    ckpt = put_checkpoints(store, "V1", "some-other-request")
    assert housekeep(store, now=now()).counts[CHECKPOINT] == len(ckpt)


# -- lock files (local store) ----------------------------------------------------------


def lock_files(store: LocalStore) -> list[str]:
    return sorted(os.listdir(store.root / ".lora-store" / "locks"))


def age(path: Path, by: timedelta = LATER) -> None:
    then = time.time() - by.total_seconds()
    os.utime(path, (then, then))


def test_idle_lock_files_and_orphaned_temp_files_go_held_and_recent_ones_stay(local_store):
    for key in ("a.json", "b.json", "c.json"):
        local_store.put(key, b"{}", if_none_match=True)
    locks = local_store.root / ".lora-store" / "locks"
    age(locks / "a.json.lock")
    age(locks / "b.json.lock")
    orphan = local_store.root / ".lora-store" / "tmp" / "put-crashed"
    orphan.write_bytes(b"half")
    age(orphan)

    with local_store._locked("b.json"):  # a write in progress (it also marks the lock used now)
        age(locks / "b.json.lock")
        counts = local_store.prune_lock_files(datetime.now(UTC) - timedelta(days=1))

    assert counts == {"locks": 1, "locks_busy": 1, "tmp": 1}
    assert lock_files(local_store) == ["b.json.lock", "c.json.lock"]
    assert not orphan.exists()
    local_store.put("a.json", b"{}", if_match=local_store.head("a.json").etag)  # a lock comes back
    assert "a.json.lock" in lock_files(local_store)


def test_housekeep_reports_lock_files_on_the_local_store_only(store):
    store.put("a.json", b"{}", if_none_match=True)
    report = housekeep(store, retention=Retention(locks=timedelta(seconds=1)), now=now() + timedelta(minutes=1))
    assert report.counts["locks"] == (1 if isinstance(store, LocalStore) else 0)


def test_a_writer_that_opened_a_lock_file_just_before_it_was_pruned_retries_on_the_new_one(local_store, monkeypatch):
    """The interleaving that would give two holders: A opens the lock file, the pruner
    unlinks it, B creates a new one and locks it, A locks the unlinked one. A must notice
    and wait for B, so exactly one of the two conditional writes wins."""
    key = "registry/s/training_versions.json"
    with local_store._locked(key):
        pass
    age(local_store.root / ".lora-store" / "locks" / lock_files(local_store)[0])
    a_opened, go_a, b_inside, go_b = (threading.Event() for _ in range(4))

    class PausingFcntl:  # A pauses between opening the lock file and locking it
        def __getattr__(self, name):
            return getattr(fcntl, name)

        def flock(self, fd, operation):
            if threading.current_thread().name == "A" and not a_opened.is_set():
                a_opened.set()
                go_a.wait(10)
            return fcntl.flock(fd, operation)

    real_write = local_store._write_via_rename

    def write(path, fill):  # B pauses inside its critical section (checked, not yet written)
        if threading.current_thread().name == "B":
            b_inside.set()
            go_b.wait(10)
        return real_write(path, fill)

    monkeypatch.setattr(local_module, "fcntl", PausingFcntl())
    monkeypatch.setattr(local_store, "_write_via_rename", write)
    results = {}

    def put(name):
        try:
            local_store.put(key, name.encode(), if_none_match=True)
            results[name] = "won"
        except PreconditionFailed:
            results[name] = "lost"

    a = threading.Thread(target=put, args=("A",), name="A")
    a.start()
    assert a_opened.wait(10)
    assert local_store.prune_lock_files(datetime.now(UTC))["locks"] == 1
    b = threading.Thread(target=put, args=("B",), name="B")
    b.start()
    assert b_inside.wait(10)
    go_a.set()
    a.join(1.0)
    assert a.is_alive(), "A entered the critical section while B held the lock"
    go_b.set()
    a.join(10)
    b.join(10)
    assert results == {"A": "lost", "B": "won"}
    assert local_store.get(key).data == b"B"


def test_lock_pruning_racing_conditional_writers_never_lets_two_writes_win(local_store):
    stop = threading.Event()
    wins: Counter[str] = Counter()
    wins_lock = threading.Lock()
    pruned = []
    race_keys = [f"race/k{i}.json" for i in range(40)]

    def prune():
        while not stop.is_set():  # every lock not held right now is eligible
            pruned.append(local_store.prune_lock_files(datetime.now(UTC) + timedelta(days=1))["locks"])

    def create():
        for key in race_keys:
            try:
                local_store.put(key, b"x", if_none_match=True)
            except PreconditionFailed:
                continue
            with wins_lock:
                wins[key] += 1

    def increment():
        for _ in range(15):
            update_json(
                local_store, "race/counter.json", lambda d: {"n": (d or {"n": 0})["n"] + 1}, max_attempts=10_000
            )

    pruners = [threading.Thread(target=prune) for _ in range(2)]
    writers = [threading.Thread(target=create) for _ in range(4)] + [
        threading.Thread(target=increment) for _ in range(4)
    ]
    for t in pruners + writers:
        t.start()
    for t in writers:
        t.join(60)
    stop.set()
    for t in pruners:
        t.join(10)

    assert sum(pruned) > 0  # the pruner did remove lock files mid-race
    assert all(wins[key] == 1 for key in race_keys), wins
    assert read_json(local_store, "race/counter.json")[0] == {"n": 60}  # no lost update


# -- the job and the command line ------------------------------------------------------


@pytest.fixture
def failed_job_store(tmp_path, monkeypatch) -> LocalStore:
    """The configured store: a failed job, its webhook applied, its files past the retention."""
    monkeypatch.setenv("LORA_STORAGE_URL", str(tmp_path / "store"))
    store = LocalStore(tmp_path / "store")
    RegistryStore(store).apply(STYLE, [Submission(STYLE, 1, "req-1", FAILED, "ab", {}, now())])
    deliver(store, FAILED)
    reconcile(store)
    for path in (tmp_path / "store" / "webhooks").rglob("*.json"):
        age(path)
    return store


def test_the_reconcile_job_prunes_and_reports_counts_in_its_metadata(failed_job_store):
    store = failed_job_store
    config = {"webhook_retention_days": 10, "poll_status": False}

    with dg.instance_for_test() as instance:
        dry = defs.resolve_job_def("reconcile_registry").execute_in_process(
            instance=instance, run_config={"ops": {"reconcile_registry_op": {"config": {**config, "dry_run": True}}}}
        )
        assert len(keys(store, WEBHOOK_SEEN)) == 1
        result = defs.resolve_job_def("reconcile_registry").execute_in_process(
            instance=instance, run_config={"ops": {"reconcile_registry_op": {"config": config}}}
        )

    assert dry.success and result.success
    assert output_metadata(dry)["housekeeping"].value["would_delete"][SEEN] == [seen_key(FAILED, "FAILED")]
    entries = output_metadata(result)
    assert entries["housekeeping_deleted"].value == 2
    assert entries["housekeeping"].value["deleted"][SEEN] == entries["housekeeping"].value["deleted"][PROCESSED] == 1
    assert entries["housekeeping"].value["retention_days"]["webhooks"] == 10
    assert keys(store, WEBHOOK_SEEN) == [] and keys(store, WEBHOOK_PROCESSED) == []


def output_metadata(result: dg.ExecuteInProcessResult) -> dict:
    [event] = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    return event.step_output_data.metadata


@pytest.fixture
def cli(failed_job_store):
    store = failed_job_store
    runner = CliRunner()
    return store, lambda *args: runner.invoke(main, ["registry", "reconcile", *args], catch_exceptions=False)


def test_registry_reconcile_prunes_and_says_what_it_deleted_and_kept(cli):
    store, invoke = cli
    dry = invoke("--dry-run")
    assert dry.exit_code == 0, dry.output
    assert f"would delete {seen_key(FAILED, 'FAILED')}" in dry.output
    assert len(keys(store, WEBHOOK_SEEN)) == 1

    out = json.loads(invoke("--json").output)
    assert out["housekeeping"]["deleted"][SEEN] == 1 and out["housekeeping"]["deleted"][PROCESSED] == 1
    assert keys(store, WEBHOOK_SEEN) == []


def test_registry_reconcile_without_housekeeping_prunes_nothing(cli):
    store, invoke = cli
    out = json.loads(invoke("--json", "--no-housekeeping").output)
    assert "housekeeping" not in out and len(keys(store, WEBHOOK_SEEN)) == 1


def test_registry_reconcile_refuses_a_bad_retention_naming_it(cli, monkeypatch):
    _, invoke = cli
    monkeypatch.setenv("LORA_WEBHOOK_RETENTION_DAYS", "a month")
    result = invoke()
    assert result.exit_code != 0 and "LORA_WEBHOOK_RETENTION_DAYS" in result.output


# -- store wrappers ----------------------------------------------------------------------


class AgedStore:
    """Delegates to ``inner``; listings report the given keys as last modified at the given times."""

    def __init__(self, inner, times):
        self.inner, self.times = inner, times

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def list(self, prefix=""):
        for info in self.inner.list(prefix):
            yield replace(info, last_modified=self.times.get(info.key, info.last_modified))


class DeleteFailsAfter:
    """Delegates to ``inner``; deletes fail (store down) after the first ``n``."""

    def __init__(self, inner, n):
        self.inner, self.left = inner, n

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def delete(self, key):
        if self.left <= 0:
            raise StoreUnavailable(f"store down (test) deleting {key}")
        self.left -= 1
        return self.inner.delete(key)


def test_start_markers_go_once_their_jobs_version_is_finished(settled):
    """runs/<style>/<version>/<job>.json: kept while the job's version is unfinished or the job
    is not attached yet (the marker is what attaches it), deleted after the retention otherwise."""
    from lora_pipeline.lifecycle.housekeeping import RUN_MARKERS
    from lora_pipeline.storage.keys import run_marker_key

    for version, job in (("V1", DONE), ("V2", FAILED), ("V3", RUNNING), ("V4", UNKNOWN)):
        settled.put(run_marker_key(STYLE, version, job), b'{"jobId": "x", "requestId": "y"}')
    assert housekeep(settled, now=now()).counts[RUN_MARKERS] == 0  # young: all stay
    report = housekeep(settled, now=now() + LATER)
    assert sorted(keys(settled, "runs")) == sorted(
        [run_marker_key(STYLE, "V3", RUNNING), run_marker_key(STYLE, "V4", UNKNOWN)]
    )
    assert report.counts[RUN_MARKERS] == 2
    assert report.kept[RUN_MARKERS] == {"unfinished": 1, "unknown": 1}
