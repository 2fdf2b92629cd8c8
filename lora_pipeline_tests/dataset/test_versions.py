"""The current-version pointer, style listing and discovery of incoming styles."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from lora_pipeline.dataset.manifest import DatasetManifest, ImageEntry, dataset_hash
from lora_pipeline.dataset.versions import current_dataset, discover_incoming, list_styles, read_pointer, set_current


def _manifest(style: str, n: int) -> DatasetManifest:
    images = [
        ImageEntry(
            file=f"images/{i:064x}.png",
            sha256=f"{i:064x}",
            width=64,
            height=64,
            size=1,
            caption=f"c{n}",
            source=f"{i}.png",
        )
        for i in range(n)
    ]
    return DatasetManifest(
        style=style, dataset_hash=dataset_hash(images), created_at="2024-01-01T00:00:00+00:00", images=images
    )


def test_setting_the_current_version_twice_writes_once(store) -> None:
    manifest = _manifest("s", 2)
    assert set_current(store, manifest) == (True, None)
    etag = store.head("datasets/s/current.json").etag
    assert set_current(store, manifest) == (False, manifest.dataset_hash)
    assert store.head("datasets/s/current.json").etag == etag


def test_racing_ingests_lose_no_version_from_the_history(local_store) -> None:
    manifests = [_manifest("s", n) for n in range(1, 13)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda m: set_current(local_store, m), manifests))
    pointer, _ = read_pointer(local_store, "s")
    assert {h.dataset_hash for h in pointer.history} == {m.dataset_hash for m in manifests}
    assert pointer.dataset_hash == pointer.history[0].dataset_hash


def test_a_style_never_ingested_has_no_current_dataset(local_store) -> None:
    assert current_dataset(local_store, "nobody") is None


def test_list_styles_names_styles_with_a_current_version_only(local_store) -> None:
    set_current(local_store, _manifest("b", 1))
    set_current(local_store, _manifest("a", 1))
    local_store.put("datasets/c/0123/manifest.json", b"{}")  # a version never made current
    assert list_styles(local_store) == ["a", "b"]


def test_discover_incoming_finds_style_folders_and_skips_bad_names(store) -> None:
    store.put("incoming/cats/a.png", b"x")
    store.put("incoming/cats/b.png", b"x")
    store.put("incoming/dogs/sub/a.png", b"x")
    store.put("incoming/loose.png", b"x")
    store.put("incoming/bad@name/a.png", b"x")
    assert discover_incoming(store) == ["cats", "dogs"]
    assert discover_incoming(store, prefix="nothing-here/") == []
