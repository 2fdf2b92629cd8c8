"""Batch transfers, zip streaming and optimistic document updates, on both backends."""

from __future__ import annotations

import io
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lora_pipeline.settings import SettingsError
from lora_pipeline.storage import StorageError
from lora_pipeline.storage.documents import TooManyConflicts, update_json, update_object
from lora_pipeline.storage.local import LocalStore
from lora_pipeline.storage.transfer import download_prefix, iter_zip, upload_files, upload_tree, write_zip


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "dataset"
    (root / "images").mkdir(parents=True)
    for i in range(12):
        (root / "images" / f"img{i:02d}.png").write_bytes(bytes([i]) * (500 + i))
        (root / "images" / f"img{i:02d}.txt").write_text(f"caption {i}")
    (root / ".DS_Store").write_bytes(b"junk")
    return root


def test_upload_tree_puts_every_file_under_the_prefix_with_relative_keys(store, dataset):
    report = upload_tree(store, dataset, "datasets/s/abc")
    assert report.ok and len(report.transferred) == 24
    keys = [o.key for o in store.list("datasets/s/abc/")]
    assert keys == sorted(f"datasets/s/abc/images/img{i:02d}.{ext}" for i in range(12) for ext in ("png", "txt"))
    assert store.get("datasets/s/abc/images/img03.txt").data == b"caption 3"


def test_a_second_upload_skips_files_with_the_same_size_and_checksum(store, dataset):
    upload_tree(store, dataset, "d")
    (dataset / "images" / "img00.txt").write_text("caption X")  # same size, new content
    report = upload_tree(store, dataset, "d")
    assert report.transferred == ["d/images/img00.txt"]
    assert len(report.skipped) == 23
    assert store.get("d/images/img00.txt").data == b"caption X"


def test_failed_files_are_reported_and_the_others_still_transfer(tmp_path, dataset):
    class Refusing(LocalStore):
        def upload_file(self, key, path):
            if key.endswith("img05.png"):
                raise StorageError("disk on fire")
            return super().upload_file(key, path)

    store = Refusing(tmp_path / "s")
    report = upload_tree(store, dataset, "d", attempts=2)
    assert [f.key for f in report.failed] == ["d/images/img05.png"]
    assert "disk on fire" in report.failed[0].error
    assert len(report.transferred) == 23
    with pytest.raises(StorageError, match="1 file"):
        report.raise_for_failures()


def test_a_transient_failure_is_retried_per_file(tmp_path, dataset):
    failures = {"d/images/img01.png": 1}
    lock = threading.Lock()

    class Hiccup(LocalStore):
        def upload_file(self, key, path):
            with lock:
                if failures.get(key):
                    failures[key] -= 1
                    raise StorageError("503 SlowDown")
            return super().upload_file(key, path)

    report = upload_tree(Hiccup(tmp_path / "s"), dataset, "d")
    assert report.ok and len(report.transferred) == 24


def test_a_missing_local_file_is_reported_not_retried(store, tmp_path):
    report = upload_files(store, [("a/b.bin", tmp_path / "nope.bin")], attempts=5)
    assert [f.key for f in report.failed] == ["a/b.bin"]
    assert "FileNotFoundError" in report.failed[0].error


def test_progress_is_reported_once_per_file_with_running_totals(store, dataset):
    events = []
    lock = threading.Lock()

    def progress(event):
        with lock:
            events.append(event)

    upload_tree(store, dataset, "d", progress=progress)
    assert len(events) == 24
    last = max(events, key=lambda e: e.files_done)
    assert (last.files_done, last.files_total) == (24, 24)
    assert last.bytes_done == last.bytes_total == sum(p.stat().st_size for p in (dataset / "images").iterdir())


def test_download_prefix_recreates_the_tree_and_skips_what_is_there(store, dataset, tmp_path):
    upload_tree(store, dataset, "d")
    out = tmp_path / "out"
    first = download_prefix(store, "d", out)
    assert first.ok and len(first.transferred) == 24
    assert (out / "images" / "img07.png").read_bytes() == (dataset / "images" / "img07.png").read_bytes()
    second = download_prefix(store, "d/", out)
    assert len(second.skipped) == 24 and not second.transferred
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(p.name for p in (dataset / "images").iterdir())


def test_write_zip_streams_a_prefix_into_a_valid_zip(store, dataset):
    upload_tree(store, dataset, "loras/s")
    buffer = io.BytesIO()
    written = write_zip(store, "loras/s", buffer)
    assert written == len(buffer.getvalue())
    archive = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    assert archive.testzip() is None
    assert len(archive.namelist()) == 24
    assert archive.read("images/img02.png") == (dataset / "images" / "img02.png").read_bytes()


def test_zip_reads_objects_in_bounded_chunks_and_emits_as_it_goes(tmp_path):
    reads = []

    class Recording(LocalStore):
        def get(self, key):
            raise AssertionError("zip must not read whole objects")

        def get_range(self, key, start, length):
            reads.append(length)
            return super().get_range(key, start, length)

    store = Recording(tmp_path / "s")
    store.put("big/a.bin", b"a" * 100_000)
    chunks = [len(c) for c in iter_zip(store, "big", chunk_size=10_000) if c]
    assert max(reads) == 10_000 and len(reads) == 10
    assert max(chunks) < 20_000  # never the whole object at once
    assert sum(chunks) > 100_000


class Unseekable(io.RawIOBase):
    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.data += b
        return len(b)


def test_zip_of_chosen_keys_to_an_unseekable_stream(store):
    store.put("loras/s/s_v1.safetensors", b"one")
    store.put("loras/s/s_v2.safetensors", b"two")
    sink = Unseekable()
    write_zip(store, "loras/s", sink, keys=["loras/s/s_v2.safetensors"])
    archive = zipfile.ZipFile(io.BytesIO(bytes(sink.data)))
    assert archive.namelist() == ["s_v2.safetensors"]
    assert archive.read("s_v2.safetensors") == b"two"


def test_update_json_creates_then_updates_a_document(store):
    assert update_json(store, "jobs/a.json", lambda doc: {"n": 1}) == {"n": 1}
    assert update_json(store, "jobs/a.json", lambda doc: {"n": doc["n"] + 1}) == {"n": 2}


def test_concurrent_json_updates_lose_nothing(store):
    def increment(_):
        update_json(store, "counter.json", lambda doc: {"n": (doc or {"n": 0})["n"] + 1})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(increment, range(24)))
    assert update_json(store, "counter.json", lambda doc: doc) == {"n": 24}


def test_an_unchanged_document_is_not_rewritten(store):
    store.put("doc.bin", b"same")
    etag = store.head("doc.bin").etag
    result = update_object(store, "doc.bin", lambda current: current.data)
    assert result.etag == etag and store.head("doc.bin").etag == etag


def test_an_update_that_always_loses_gives_up_with_a_clear_error(local_store):
    def meddle(current):
        local_store.put("doc.bin", (current.data if current else b"") + b"!")  # someone else wins
        return b"mine"

    local_store.put("doc.bin", b"x")
    with pytest.raises(TooManyConflicts, match="doc.bin"):
        update_object(local_store, "doc.bin", meddle, max_attempts=3, backoff=0)


def test_a_bad_concurrency_setting_names_the_variable(store, dataset, monkeypatch):
    monkeypatch.setenv("LORA_TRANSFER_CONCURRENCY", "lots")
    with pytest.raises(SettingsError, match="^LORA_TRANSFER_CONCURRENCY='lots': expected a whole number"):
        upload_tree(store, dataset, "d")
