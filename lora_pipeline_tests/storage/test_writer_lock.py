"""Issue 22, defect 5: an S3 endpoint that ignores conditional writes.

The start-up probe detects it; registry writers then refuse to run with one clear line,
unless LORA_WRITER_LOCK_DIR opts into the writer lock, which is proven here with
concurrent writers (threads and processes) against an endpoint that really ignores the
headers (the fault proxy drops them), and shown to be needed: without it the same
writers lose updates.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
import warnings

import pytest
from click.testing import CliRunner

from lora_pipeline.cli import main
from lora_pipeline.registry.evidence import Submission
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.storage import documents
from lora_pipeline.storage.documents import update_json
from lora_pipeline.storage.keys import registry_key
from lora_pipeline.storage.s3 import ConditionalWritesUnsupported, S3Store, build_s3_client
from lora_pipeline.storage.writer_lock import WritersNotSerialized

from lora_pipeline_tests.conftest import moto_options
from lora_pipeline_tests.registry.lora_files import at
from lora_pipeline_tests.registry.test_aliases_and_tombstones import S, seed

WRITERS, INCREMENTS = 6, 4


def ignoring_store(endpoint: str, bucket: str) -> S3Store:
    """An S3Store through the proxy, checked at start like every store (the probe runs)."""
    options = moto_options(endpoint)
    store = S3Store(build_s3_client(options), bucket, "lora", options=options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConditionalWritesUnsupported)
        return store.check()


@pytest.fixture
def ignoring(fault_proxy, s3_bucket) -> S3Store:
    fault_proxy.drop_headers = {"if-match", "if-none-match"}
    store = ignoring_store(fault_proxy.endpoint, s3_bucket)
    assert store.supports_conditional_writes is False  # detected by the probe, not configured
    return store


def test_registry_writers_refuse_with_one_line_and_write_nothing(ignoring):
    registry = RegistryStore(ignoring)
    with pytest.raises(WritersNotSerialized) as refused:
        registry.apply("geo", [Submission("geo", "V1", "r", "job-1", "ab", {}, at(0))])
    line = str(refused.value)
    assert "\n" not in line and "ignores conditional writes" in line and "LORA_WRITER_LOCK_DIR" in line
    assert ignoring.head(registry_key("geo")) is None
    assert registry.read("geo")[1] is None  # reading still works


def test_the_cli_says_the_one_line_and_exits_1(ignoring, s3_store, fault_proxy, s3_bucket, monkeypatch):
    seed(s3_store)  # written straight to moto: three completed versions of geo
    monkeypatch.setenv("LORA_STORAGE_URL", f"s3://{s3_bucket}/lora")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", fault_proxy.endpoint)
    result = CliRunner().invoke(main, ["registry", "delete", S, "V1"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "ignores conditional writes" in result.output and "LORA_WRITER_LOCK_DIR" in result.output


def _slow_heads(store: S3Store) -> None:
    """Widen the HEAD-then-PUT window the endpoint leaves open, so a lost update is near-certain
    without the lock."""
    head = store.head

    def slow(key: str):
        info = head(key)
        time.sleep(0.05)
        return info

    store.head = slow  # type: ignore[method-assign]


def _increment(store: S3Store, key: str, writer: int) -> None:
    for _ in range(INCREMENTS):
        update_json(store, key, lambda doc: {**(doc or {}), "n": (doc or {}).get("n", 0) + 1, f"w{writer}": True})


def _threads(store: S3Store, key: str) -> None:
    threads = [threading.Thread(target=_increment, args=(store, key, w)) for w in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_without_the_lock_concurrent_writers_lose_updates(ignoring, monkeypatch):
    """The control: what the refusal prevents (the lock bypassed, the endpoint's check only)."""
    import contextlib

    monkeypatch.setattr(documents, "serialized_writes", lambda store, key: contextlib.nullcontext())
    _slow_heads(ignoring)
    _threads(ignoring, "counter.json")
    assert json.loads(ignoring.get("counter.json").data)["n"] < WRITERS * INCREMENTS


def test_with_the_lock_concurrent_threads_lose_nothing(ignoring, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_WRITER_LOCK_DIR", str(tmp_path / "locks"))
    _slow_heads(ignoring)
    _threads(ignoring, "counter.json")
    doc = json.loads(ignoring.get("counter.json").data)
    assert doc["n"] == WRITERS * INCREMENTS and all(doc[f"w{w}"] for w in range(WRITERS))


def _process_writer(endpoint: str, bucket: str, writer: int, start) -> None:
    store = ignoring_store(endpoint, bucket)
    _slow_heads(store)
    start.wait()
    _increment(store, "counter.json", writer)


def test_with_the_lock_concurrent_processes_lose_nothing(ignoring, fault_proxy, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_WRITER_LOCK_DIR", str(tmp_path / "locks"))
    context = multiprocessing.get_context("fork")
    start = context.Barrier(WRITERS)
    processes = [
        context.Process(target=_process_writer, args=(fault_proxy.endpoint, s3_bucket, w, start))
        for w in range(WRITERS)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert [p.exitcode for p in processes] == [0] * WRITERS
    assert json.loads(ignoring.get("counter.json").data)["n"] == WRITERS * INCREMENTS


def test_registry_writes_run_under_the_lock(ignoring, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_WRITER_LOCK_DIR", str(tmp_path / "locks"))
    registry = RegistryStore(ignoring)
    _slow_heads(ignoring)

    def submit(n: int) -> None:
        registry.apply("geo", [Submission("geo", f"V{n}", f"r{n}", f"job-{n}", "ab", {}, at(n))])

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [v.name for v in registry.read("geo")[0].versions] == ["V1", "V2", "V3", "V4"]
