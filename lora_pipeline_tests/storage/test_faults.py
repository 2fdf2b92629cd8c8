"""The S3 backend under the faults real endpoints produce, injected by a proxy in front of moto."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lora_pipeline.storage import StorageError, StoreUnavailable
from lora_pipeline.storage.breaker import BreakerStore, CircuitBreaker
from lora_pipeline.storage.documents import read_json, update_json
from lora_pipeline.storage.s3 import MB, S3Store, build_s3_client
from lora_pipeline.storage.transfer import upload_files
from lora_pipeline_tests.conftest import moto_options
from lora_pipeline_tests.storage.fault_proxy import Request


@pytest.fixture
def store_via(boto_session):
    """Build an S3Store on ``bucket`` through ``proxy`` with client option overrides."""

    def build(proxy, bucket: str, **overrides) -> S3Store:
        options = moto_options(proxy.endpoint, **overrides)
        return S3Store(build_s3_client(options, session=boto_session), bucket, "lora", options=options)

    return build


def puts(request: Request) -> bool:
    return request.method == "PUT"


def test_a_503_slowdown_is_retried_and_the_write_succeeds(faulty_s3_store, fault_proxy):
    fault_proxy.inject("503", match=puts)
    faulty_s3_store.put("doc.json", b"after a slowdown")
    assert [fault for fault, _ in fault_proxy.injected] == ["503"]
    assert faulty_s3_store.get("doc.json").data == b"after a slowdown"


def test_500s_on_reads_are_retried_and_the_read_succeeds(faulty_s3_store, fault_proxy):
    faulty_s3_store.put("doc.json", b"content")
    fault_proxy.inject("500", times=2, match=lambda r: r.method == "GET")
    assert faulty_s3_store.get("doc.json").data == b"content"
    assert len(fault_proxy.injected) == 2


def test_a_reset_connection_is_retried(faulty_s3_store, fault_proxy):
    fault_proxy.inject("reset", match=puts)
    faulty_s3_store.put("doc.json", b"after a reset")
    assert faulty_s3_store.get("doc.json").data == b"after a reset"
    assert [fault for fault, _ in fault_proxy.injected] == ["reset"]


def test_a_single_stall_is_cut_by_the_read_timeout_and_retried(faulty_s3_store, fault_proxy):
    faulty_s3_store.put("doc.json", b"content")
    fault_proxy.inject("stall", match=lambda r: r.method == "GET")
    assert faulty_s3_store.get("doc.json").data == b"content"
    assert len(fault_proxy.injected) == 1


def test_a_persistent_stall_fails_with_a_read_timeout_instead_of_hanging(store_via, fault_proxy, s3_bucket):
    store = store_via(fault_proxy, s3_bucket, max_attempts=1, read_timeout=0.5)
    store.put("doc.json", b"content")
    fault_proxy.always("stall", match=lambda r: r.method == "GET")
    with pytest.raises(StorageError, match="(?i)read timeout"):
        store.get("doc.json")


def test_errors_that_outlast_the_retries_surface_as_storage_error(store_via, fault_proxy, s3_bucket):
    store = store_via(fault_proxy, s3_bucket, max_attempts=2)
    fault_proxy.always("500")
    with pytest.raises(StorageError, match="InternalError"):
        store.get("doc.json")
    assert len(fault_proxy.injected) == 2  # both attempts were made


def test_sustained_faults_open_the_breaker_which_recovers_after_a_probe(store_via, fault_proxy, s3_bucket):
    store = BreakerStore(
        store_via(fault_proxy, s3_bucket, max_attempts=1),
        CircuitBreaker("test store", fail_max=3, reset_timeout=0.5),
    )
    fault_proxy.always("500")
    for _ in range(3):
        with pytest.raises(StorageError):
            store.get("doc.json")
    sent = len(fault_proxy.requests)
    with pytest.raises(StoreUnavailable, match="unavailable since"):
        store.get("doc.json")
    assert len(fault_proxy.requests) == sent  # failed fast: nothing was sent
    assert store.breaker.is_open

    fault_proxy.clear()
    time.sleep(0.6)
    assert store.head("doc.json") is None  # the probe succeeds ...
    assert store.breaker.state == "closed"  # ... and closes the breaker
    store.put("doc.json", b"back")


def test_an_interrupted_multipart_upload_leaves_no_object_and_no_open_upload(
    store_via, fault_proxy, s3_bucket, s3_client, tmp_path: Path
):
    store = store_via(fault_proxy, s3_bucket, max_attempts=2, multipart_threshold=5 * MB, multipart_chunksize=5 * MB)
    source = tmp_path / "big.safetensors"
    source.write_bytes(b"\x07" * (11 * MB))
    fault_proxy.always("500", match=lambda r: r.method == "PUT" and "partNumber=2" in r.path)

    report = upload_files(store, [("loras/s/s_v1.safetensors", source)], attempts=2)

    assert [f.key for f in report.failed] == ["loras/s/s_v1.safetensors"]
    assert store.head("loras/s/s_v1.safetensors") is None
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_concurrent_updates_under_faults_lose_and_duplicate_nothing(store_via, fault_proxy, s3_bucket):
    """40 updates from 4 threads, with ~15% of requests failing, some after being applied."""
    store = store_via(fault_proxy, s3_bucket, max_attempts=6)
    rng = random.Random(7)
    rng_lock = threading.Lock()

    def unlucky(request: Request) -> bool:
        with rng_lock:
            return rng.random() < 0.05

    for fault in ("500", "reset", "drop-response"):
        fault_proxy.always(fault, match=unlucky)

    def add(item: str) -> None:
        update_json(
            store,
            "jobs/state.json",
            lambda doc: (
                (doc or {"items": []})
                if item in (doc or {"items": []})["items"]
                else {"items": (doc or {"items": []})["items"] + [item]}
            ),
        )

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(add, [f"update-{i}" for i in range(40)]))

    fault_proxy.clear()
    doc, _ = read_json(store, "jobs/state.json")
    assert sorted(doc["items"]) == sorted(f"update-{i}" for i in range(40))
    assert len(doc["items"]) == 40
    assert {fault for fault, _ in fault_proxy.injected} == {"500", "reset", "drop-response"}
