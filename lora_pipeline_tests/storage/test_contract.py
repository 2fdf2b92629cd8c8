"""The object-store contract: every behaviour here holds for the local directory and for S3.

S3 runs over HTTP against moto's server, so these are the same requests
production sends.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lora_pipeline.storage import (
    InvalidKey,
    ObjectNotFound,
    ObjectStore,
    PreconditionFailed,
)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_both_backends_satisfy_the_protocol(store):
    assert isinstance(store, ObjectStore)


def test_put_returns_md5_etag_and_get_returns_bytes_with_it(store):
    etag = store.put("registry/a/doc.json", b'{"x": 1}')
    assert etag == md5(b'{"x": 1}')
    got = store.get("registry/a/doc.json")
    assert (got.key, got.data, got.etag) == ("registry/a/doc.json", b'{"x": 1}', etag)


def test_get_of_missing_key_raises_object_not_found(store):
    with pytest.raises(ObjectNotFound) as err:
        store.get("nothing/here.json")
    assert err.value.key == "nothing/here.json"


def test_head_describes_an_object_and_is_none_when_missing(store):
    store.put("a/b.bin", b"12345")
    info = store.head("a/b.bin")
    assert (info.key, info.size, info.etag) == ("a/b.bin", 5, md5(b"12345"))
    assert info.last_modified.tzinfo is not None
    assert store.head("a/missing.bin") is None


def test_if_none_match_creates_only_when_absent(store):
    store.put("doc.json", b"first", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.put("doc.json", b"second", if_none_match=True)
    assert store.get("doc.json").data == b"first"


def test_if_match_writes_only_over_the_version_that_was_read(store):
    etag = store.put("doc.json", b"v1")
    new_etag = store.put("doc.json", b"v2", if_match=etag)
    with pytest.raises(PreconditionFailed):
        store.put("doc.json", b"v3", if_match=etag)  # stale: v2 is there now
    assert store.get("doc.json").data == b"v2"
    assert store.get("doc.json").etag == new_etag


def test_if_match_on_a_missing_object_fails(store):
    with pytest.raises(PreconditionFailed):
        store.put("doc.json", b"v1", if_match=md5(b"v0"))
    assert store.head("doc.json") is None


def test_racing_conditional_writers_have_exactly_one_winner(store):
    etag = store.put("race.json", b"start")
    barrier = threading.Barrier(8)

    def writer(i: int) -> bool:
        barrier.wait()
        try:
            store.put("race.json", f"writer {i}".encode(), if_match=etag)
            return True
        except PreconditionFailed:
            return False

    with ThreadPoolExecutor(8) as pool:
        wins = list(pool.map(writer, range(8)))
    assert wins.count(True) == 1
    assert store.get("race.json").data == f"writer {wins.index(True)}".encode()


def test_listing_is_lexicographic_and_filtered_by_prefix(store):
    for key in ["b/2", "a/10", "a/1", "a/2", "a-b", "ab/1", "c"]:
        store.put(key, key.encode())
    assert [o.key for o in store.list()] == ["a-b", "a/1", "a/10", "a/2", "ab/1", "b/2", "c"]
    assert [o.key for o in store.list("a/")] == ["a/1", "a/10", "a/2"]
    assert [o.key for o in store.list("a")] == ["a-b", "a/1", "a/10", "a/2", "ab/1"]
    assert list(store.list("zzz/")) == []


def test_listing_reports_size_and_etag(store):
    store.put("x/one", b"1")
    (info,) = store.list("x/")
    assert (info.size, info.etag) == (1, md5(b"1"))


def test_ranged_read_returns_the_requested_slice(store):
    data = bytes(range(256)) * 4
    store.put("blob", data)
    assert store.get_range("blob", 0, 8) == data[:8]
    assert store.get_range("blob", 1000, 100) == data[1000:]  # short at the end
    assert store.get_range("blob", 5000, 10) == b""  # past the end
    assert store.get_range("blob", 10, 0) == b""


def test_ranged_read_of_missing_key_raises_object_not_found(store):
    with pytest.raises(ObjectNotFound):
        store.get_range("missing", 0, 8)


def test_delete_removes_and_is_idempotent(store):
    store.put("d/x", b"1")
    store.delete("d/x")
    store.delete("d/x")
    assert store.head("d/x") is None
    assert list(store.list("d/")) == []


@pytest.mark.parametrize(
    "key", ["../escape", "a/../../b", "/abs", "a//b", "a/./b", "dir/", "", "a\x00b", ".lora-store/x"]
)
def test_keys_that_could_escape_their_prefix_are_refused(store, key):
    with pytest.raises(InvalidKey):
        store.put(key, b"x")
    with pytest.raises(InvalidKey):
        store.get(key)


@pytest.mark.parametrize("name", ["copy of body (1).json", "résumé.json", "body (1).json", "a\\b", "%2F+&?#"])
def test_any_key_a_tool_can_write_is_read_listed_moved_and_deleted(store, name):
    """Issue 22: only keys the pipeline builds are shape-checked (``validate_key``); the store
    takes any key it can list, or one odd file would stop every pass that meets it."""
    key = f"webhooks/inbox/{name}"
    store.put(key, b"body")
    assert [info.key for info in store.list("webhooks/inbox/")] == [key]
    assert store.get(key).data == b"body" and store.get_range(key, 1, 2) == b"od"
    assert store.head(key).size == 4
    store.put(f"webhooks/processed/{name}", store.get(key).data, if_none_match=True)
    store.delete(key)
    assert [info.key for info in store.list("webhooks/")] == [f"webhooks/processed/{name}"]


@pytest.mark.parametrize("prefix", ["../", "/abs", "a/../", "a//"])
def test_listing_prefixes_that_escape_are_refused(store, prefix):
    with pytest.raises(InvalidKey):
        list(store.list(prefix))


def test_upload_and_download_file_round_trip(store, tmp_path: Path):
    source = tmp_path / "in.bin"
    source.write_bytes(b"lora" * 10_000)
    etag = store.upload_file("loras/s/s_v1.safetensors", source)
    assert etag == store.head("loras/s/s_v1.safetensors").etag == store.etag_for_file(source)
    target = tmp_path / "out" / "copy.bin"
    store.download_file("loras/s/s_v1.safetensors", target)
    assert target.read_bytes() == source.read_bytes()
    assert [p.name for p in target.parent.iterdir()] == ["copy.bin"]  # no temp file left


def test_download_of_missing_key_raises_and_leaves_no_file(store, tmp_path: Path):
    target_dir = tmp_path / "downloads"
    target_dir.mkdir()
    with pytest.raises(ObjectNotFound):
        store.download_file("missing.bin", target_dir / "x.bin")
    assert list(target_dir.iterdir()) == []


def test_empty_objects_round_trip(store, tmp_path: Path):
    store.put("empty", b"")
    assert store.get("empty").data == b""
    store.download_file("empty", tmp_path / "e")
    assert (tmp_path / "e").read_bytes() == b""


def test_url_is_stable_and_public_base_url_wins(store, tmp_path: Path):
    store.put("loras/s/s_v1.safetensors", b"x")
    assert store.url("loras/s/s_v1.safetensors") == store.url("loras/s/s_v1.safetensors")
    store.public_base_url = "https://cdn.example.com/lora"
    assert store.url("loras/s/s_v1.safetensors") == "https://cdn.example.com/lora/loras/s/s_v1.safetensors"


def test_presigned_url_fetches_the_object(store):
    import urllib.request

    store.put("p/a.bin", b"presigned bytes")
    with urllib.request.urlopen(store.presigned_url("p/a.bin", expires_in=60)) as response:
        assert response.read() == b"presigned bytes"
    with pytest.raises(ValueError):
        store.presigned_url("p/a.bin", expires_in=0)


# -- backend specifics ----------------------------------------------------------------


def test_local_urls_are_file_urls(local_store):
    assert local_store.url("a/b.bin") == (local_store.root / "a" / "b.bin").as_uri()


def test_local_store_hides_its_bookkeeping_from_listings(local_store):
    local_store.put("doc.json", b"1", if_none_match=True)  # creates a lock file
    assert [o.key for o in local_store.list()] == ["doc.json"]


def test_a_local_file_deleted_between_its_stat_and_its_hash_is_simply_absent(local_store, monkeypatch):
    """Listing and head stat a file and then hash it; a concurrent delete (a webhook
    inbox entry consumed by another worker) between the two must not fail the reader."""
    import lora_pipeline.storage.local as local_module

    local_store.put("inbox/a.json", b"a")
    local_store.put("inbox/b.json", b"b")
    real_md5 = local_module.md5_file

    def delete_then_hash(path):
        if path.name == "a.json":
            path.unlink()
        return real_md5(path)

    monkeypatch.setattr(local_module, "md5_file", delete_then_hash)
    assert [o.key for o in local_store.list("inbox/")] == ["inbox/b.json"]
    local_store.put("inbox/a.json", b"a")
    assert local_store.head("inbox/a.json") is None
    assert local_store.head("inbox/b.json").size == 1


def test_a_local_write_returns_only_once_its_bytes_and_its_name_are_synced(local_store, monkeypatch):
    """Durable on return (what the receiver's 200 promises): the file is fsynced before its rename,
    and the folder holding the new name by an fsync begun after the rename, before put returns;
    writers into one folder at once may share that folder fsync (group commit)."""
    import itertools
    import os

    import lora_pipeline.storage.local as local

    ticks = itertools.count()  # one order of events across the threads
    synced: dict[str, list[tuple[int, int]]] = {}  # path → (start, end) of each fsync of it
    renamed: dict[str, tuple[str, int]] = {}  # new path → (temporary path, when)
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        path, start = os.readlink(f"/proc/self/fd/{fd}"), next(ticks)
        real_fsync(fd)
        synced.setdefault(path, []).append((start, next(ticks)))

    def replace(src, dst) -> None:
        real_replace(src, dst)
        renamed[str(dst)] = (str(src), next(ticks))

    monkeypatch.setattr(local.os, "fsync", fsync)
    monkeypatch.setattr(local.os, "replace", replace)

    def put(key: str) -> tuple[str, int]:
        local_store.put(key, key.encode(), if_none_match=True)
        return key, next(ticks)

    with ThreadPoolExecutor(8) as pool:
        returned = dict(pool.map(put, [f"webhooks/inbox/{i:03d}.json" for i in range(24)]))
    folder = synced.get(str(local_store.root / "webhooks" / "inbox"), [])
    for key, done in returned.items():
        temporary, at = renamed[str(local_store.root / key)]
        assert any(end < at for _, end in synced.get(temporary, [])), f"{key}: bytes not synced before the rename"
        assert any(at < start and end < done for start, end in folder), f"{key}: its name was not synced"


def test_local_conditional_writes_hold_across_processes(local_store, tmp_path: Path):
    """The lock is an flock, so separate processes (workers, sensors) get one winner too."""
    import subprocess
    import sys

    etag = local_store.put("race.json", b"start")
    script = (
        "import sys; from lora_pipeline.storage.local import LocalStore; "
        "from lora_pipeline.storage import PreconditionFailed\n"
        f"s = LocalStore({str(local_store.root)!r})\n"
        "try:\n"
        f"    s.put('race.json', sys.argv[1].encode(), if_match={etag!r}); print('won')\n"
        "except PreconditionFailed:\n    print('lost')\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=subprocess.PIPE, text=True) for i in range(4)
    ]
    results = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(results) == ["lost", "lost", "lost", "won"]


def test_s3_prefix_isolates_stores_in_one_bucket(s3_store, s3_client, moto_server):
    from lora_pipeline.storage.s3 import S3Store

    other = S3Store(s3_client, s3_store.bucket, "other", options=s3_store.options)
    s3_store.put("doc.json", b"mine")
    assert other.head("doc.json") is None
    assert [o.key for o in s3_store.list()] == ["doc.json"]
    assert s3_client.get_object(Bucket=s3_store.bucket, Key="lora/doc.json")["Body"].read() == b"mine"


def test_s3_presigned_url_is_signed_and_expires(s3_store):
    url = s3_store.presigned_url("p/a.bin", expires_in=60)
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=60" in url
    assert url != s3_store.url("p/a.bin")


def test_s3_urls_rank_public_then_accelerated_then_endpoint(s3_store):
    s3_store.accelerate = True
    assert s3_store.url("a/b.bin") == f"https://{s3_store.bucket}.s3-accelerate.amazonaws.com/lora/a/b.bin"
    s3_store.public_base_url = "https://cdn.example.com"
    assert s3_store.url("a/b.bin") == "https://cdn.example.com/a/b.bin"


def test_s3_path_style_url_names_endpoint_bucket_and_prefix(s3_store):
    assert s3_store.url("a/b.bin") == f"{s3_store.client.meta.endpoint_url}/{s3_store.bucket}/lora/a/b.bin"


def test_s3_virtual_hosted_url_on_aws(s3_store):
    from lora_pipeline.storage.s3 import S3Options, S3Store, build_s3_client

    client = build_s3_client(S3Options(endpoint_url="https://s3.eu-west-1.amazonaws.com", region="eu-west-1"))
    store = S3Store(client, "my-bucket", "lora")
    assert store.url("a/b.bin") == "https://my-bucket.s3.eu-west-1.amazonaws.com/lora/a/b.bin"


def test_s3_large_upload_is_multipart_and_etag_matches_local_computation(s3_client, s3_bucket, moto_server, tmp_path):
    from lora_pipeline.storage.s3 import MB, S3Store
    from lora_pipeline_tests.conftest import moto_options

    options = moto_options(moto_server, multipart_threshold=5 * MB, multipart_chunksize=5 * MB)
    store = S3Store(s3_client, s3_bucket, "lora", options=options)
    source = tmp_path / "big.bin"
    source.write_bytes(b"\x01" * (11 * MB))
    etag = store.upload_file("big.bin", source)
    assert etag.endswith("-3")
    assert etag == store.etag_for_file(source)
    store.download_file("big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == source.read_bytes()


def test_conditional_upload_creates_only_when_absent(store, tmp_path: Path):
    first, second = tmp_path / "a.bin", tmp_path / "b.bin"
    first.write_bytes(b"first" * 1000)
    second.write_bytes(b"second" * 1000)
    etag = store.upload_file("loras/s/s_v1.safetensors", first, if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.upload_file("loras/s/s_v1.safetensors", second, if_none_match=True)
    stored = store.get("loras/s/s_v1.safetensors")
    assert stored.data == first.read_bytes() and stored.etag == etag


def test_concurrent_conditional_uploads_have_exactly_one_winner(store, tmp_path: Path):
    sources = []
    for i in range(6):
        path = tmp_path / f"{i}.bin"
        path.write_bytes(bytes([i]) * 50_000)
        sources.append(path)

    def attempt(path: Path) -> bool:
        try:
            store.upload_file("loras/s/s_v2.safetensors", path, if_none_match=True)
        except PreconditionFailed:
            return False
        return True

    with ThreadPoolExecutor(6) as pool:
        won = list(pool.map(attempt, sources))
    assert won.count(True) == 1
    winner = sources[won.index(True)]
    assert store.get("loras/s/s_v2.safetensors").data == winner.read_bytes()


def test_s3_large_conditional_upload_is_multipart_and_refused_over_an_object(
    s3_client, s3_bucket, moto_server, tmp_path
):
    from lora_pipeline.storage.s3 import MB, S3Store
    from lora_pipeline_tests.conftest import moto_options

    options = moto_options(moto_server, multipart_threshold=5 * MB, multipart_chunksize=5 * MB)
    store = S3Store(s3_client, s3_bucket, "lora", options=options)
    source = tmp_path / "big.bin"
    source.write_bytes(b"\x02" * (11 * MB))
    etag = store.upload_file("big-c.bin", source, if_none_match=True)
    assert etag.endswith("-3") and etag == store.etag_for_file(source)
    other = tmp_path / "other.bin"
    other.write_bytes(b"\x03" * (6 * MB))
    with pytest.raises(PreconditionFailed):
        store.upload_file("big-c.bin", other, if_none_match=True)
    assert store.head("big-c.bin").etag == etag
    # the losing multipart upload was aborted: no parts left behind
    assert not s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")


def test_list_prefixes_names_the_folders_one_level_down_in_order(store):
    for key in (
        "datasets/b/current.json",
        "datasets/a/1/img.png",
        "datasets/a/2/deep/er.png",
        "datasets/B/x.png",
        "datasets/top.json",
        "registry/s/doc.json",
    ):
        store.put(key, b"x")
    assert list(store.list_prefixes("datasets/")) == ["datasets/B/", "datasets/a/", "datasets/b/"]
    assert list(store.list_prefixes("datasets/a/")) == ["datasets/a/1/", "datasets/a/2/"]
    assert list(store.list_prefixes("datasets/b")) == ["datasets/b/"]  # a partial name, as S3 takes it
    assert list(store.list_prefixes()) == ["datasets/", "registry/"]  # bookkeeping never shows
    assert list(store.list_prefixes("nothing/")) == []
    assert list(store.list_prefixes("datasets/top.json/")) == []


def test_list_prefixes_has_no_empty_folders(store):
    store.put("datasets/a/1/img.png", b"x")
    store.put("datasets/b/current.json", b"x")
    store.delete("datasets/b/current.json")
    assert list(store.list_prefixes("datasets/")) == ["datasets/a/"]


@pytest.mark.parametrize("prefix", ["../", "/abs", "a/../", "a//", ".lora-store/"])
def test_list_prefixes_stays_inside_the_store(store, prefix):
    if prefix == ".lora-store/":
        assert list(store.list_prefixes(prefix)) == []
        return
    with pytest.raises(InvalidKey):
        list(store.list_prefixes(prefix))


def test_list_prefixes_goes_through_the_breaker(tmp_path):
    from lora_pipeline.storage import StoreUnavailable
    from lora_pipeline.storage.breaker import BreakerStore, CircuitBreaker
    from lora_pipeline.storage.local import LocalStore

    breaker = CircuitBreaker("test", fail_max=1, reset_timeout=60)
    store = BreakerStore(LocalStore(tmp_path / "s"), breaker)
    store.put("a/b/c", b"x")
    assert list(store.list_prefixes("a/")) == ["a/b/"]
    breaker.record_failure(ConnectionError("down"))
    with pytest.raises(StoreUnavailable):
        store.list_prefixes("a/")
