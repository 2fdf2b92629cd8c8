"""Concurrent writers on one style lose nothing: a reconciliation, webhook registrations and
new submissions at once, in threads and in processes, on both backends."""

import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import pytest

from lora_pipeline.registry.evidence import Submission
from lora_pipeline.registry.models import VersionStatus
from lora_pipeline.registry_store.documents import RegistryStore

from .concurrent_ops import STYLE, op_reconcile, op_submit, op_webhook, warm
from .lora_files import at, lora_bytes

FAILED_JOBS = [f"c3d1f7aa-5b0e-4e0f-8d55-7a4e3b2c9f1{i}" for i in range(3)]
SUBMITTERS = 4


def _prepare(store) -> None:
    """V1 trained (its file is in the store, not yet recorded); V2–V4 running, about to fail."""
    registry = RegistryStore(store)
    registry.apply(STYLE, [Submission(STYLE, "V1", "r1", "26945dbf-4e87-4574-ad26-b1f71e865942-e2", "aa", {}, at(0))])
    registry.apply(
        STYLE,
        [Submission(STYLE, f"V{i + 2}", f"f{i}", f"{job}-e1", "bb", {}, at(1)) for i, job in enumerate(FAILED_JOBS)],
    )
    store.put(f"loras/{STYLE}/{STYLE}_vV1.safetensors", lora_bytes())


def _spec(kind: str, request):
    if kind == "local":
        store = request.getfixturevalue("local_store")
        return store, ("local", str(store.root))
    store = request.getfixturevalue("s3_store")
    return store, ("s3", request.getfixturevalue("moto_server"), store.bucket, "lora")


def _run_all(executor, spec) -> list:
    start_at = time.time() + 1.0
    futures = [executor.submit(op_reconcile, spec, start_at)]
    futures += [
        executor.submit(
            op_webhook, spec, start_at, json.dumps({"id": job, "status": "FAILED", "error": f"oom {job[-1]}"}).encode()
        )
        for job in FAILED_JOBS
    ]
    futures += [executor.submit(op_submit, spec, start_at, f"new-{i}") for i in range(SUBMITTERS)]
    return [f.result(timeout=120) for f in futures]


def _assert_nothing_lost(store, submitted: list[tuple[str, str]]) -> None:
    registry = RegistryStore(store)
    doc, _ = registry.read(STYLE)
    assert doc.version("V1").status is VersionStatus.completed
    for i, job in enumerate(FAILED_JOBS):
        version = doc.version(f"V{i + 2}")
        assert (version.status, version.error) == (VersionStatus.failed, f"oom {job[-1]}")
    names = [name for name, _ in submitted]
    assert len(set(names)) == SUBMITTERS, names
    for name, job in submitted:
        assert doc.version(name).id == job and doc.version(name).status is VersionStatus.starting
    assert len(doc.versions) == 1 + len(FAILED_JOBS) + SUBMITTERS
    summary = registry.read_index()[0].styles[STYLE]
    assert summary.revision == doc.revision
    assert {registry.find_style_for_job(job) for _, job in submitted} == {STYLE}


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_concurrent_writers_in_threads_lose_nothing(kind, request):
    store, spec = _spec(kind, request)
    _prepare(store)
    with ThreadPoolExecutor(1 + len(FAILED_JOBS) + SUBMITTERS) as pool:
        results = _run_all(pool, spec)
    _assert_nothing_lost(store, results[1 + len(FAILED_JOBS) :])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_concurrent_writers_in_processes_lose_nothing(kind, request):
    store, spec = _spec(kind, request)
    _prepare(store)
    context = multiprocessing.get_context("spawn")
    workers = 1 + len(FAILED_JOBS) + SUBMITTERS
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        list(pool.map(warm, [1.0] * workers))
        results = _run_all(pool, spec)
    _assert_nothing_lost(store, results[1 + len(FAILED_JOBS) :])
