"""Ingest: a source in, a validated, versioned dataset in the store out, every rejection explained."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lora_pipeline.dataset.captions import build_caption_index
from lora_pipeline.dataset.ingest import (
    SAMPLE_TRIGGER_WORD,
    EmptyDatasetError,
    IngestOptions,
    current_dataset,
    ingest_dataset,
    read_manifest,
    read_pointer,
    _accept_images,
    _sort_listing,
    sample_dataset_path,
)
from lora_pipeline.dataset.manifest import dataset_hash
from lora_pipeline.dataset.sources import Listing, Refusal, SourceFile
from lora_pipeline.dataset.validate import ImageFacts, Rejection
from lora_pipeline.dataset.versions import DatasetNotFound
from lora_pipeline.registry.names import InvalidStyleName
from lora_pipeline.storage.keys import dataset_manifest_key, dataset_prefix
from lora_pipeline_tests.dataset.builders import good_images, image_bytes, png_bomb, write_files, write_zip


def _keys(store, prefix: str = "") -> list[str]:
    return [info.key for info in store.list(prefix)]


def test_the_sample_is_stored_byte_for_byte_with_its_captions(store) -> None:
    report = ingest_dataset(
        store, "sample", sample_dataset_path(), options=IngestOptions(trigger_word=SAMPLE_TRIGGER_WORD)
    )
    manifest = current_dataset(store, "sample")
    assert manifest is not None and manifest.dataset_hash == report.dataset_hash
    assert len(manifest.images) == 8 and report.rejected == []
    prefix = dataset_prefix("sample", manifest.dataset_hash)
    for entry in manifest.images:
        original = (sample_dataset_path() / entry.source).read_bytes()
        assert store.get(prefix + entry.file).data == original
        assert entry.caption == (sample_dataset_path() / entry.source).with_suffix(".txt").read_text().strip()
    assert manifest.trigger_word == SAMPLE_TRIGGER_WORD
    assert report.stats.caption_coverage == 1.0


def test_reingesting_the_same_data_uploads_nothing_and_leaves_the_pointer_alone(store) -> None:
    first = ingest_dataset(store, "sample", sample_dataset_path())
    pointer_before = store.head("datasets/sample/current.json")
    second = ingest_dataset(store, "sample", sample_dataset_path())
    assert second.dataset_hash == first.dataset_hash
    assert (second.uploaded, second.skipped, second.new_version, second.current_changed) == (0, 8, False, False)
    assert store.head("datasets/sample/current.json").etag == pointer_before.etag


def test_an_interrupted_version_is_completed_without_resending_what_is_there(local_store) -> None:
    report = ingest_dataset(local_store, "sample", sample_dataset_path())
    local_store.delete(dataset_manifest_key("sample", report.dataset_hash))
    local_store.delete(dataset_prefix("sample", report.dataset_hash) + report.manifest.images[0].file)
    again = ingest_dataset(local_store, "sample", sample_dataset_path())
    assert (again.uploaded, again.skipped, again.new_version) == (1, 7, True)


def test_the_hash_ignores_file_names_and_order(tmp_path: Path, local_store) -> None:
    files = good_images(3)
    renamed = {name.replace("img_", "other_"): content for name, content in reversed(list(files.items()))}
    a = ingest_dataset(local_store, "s", write_files(tmp_path / "a", files))
    b = ingest_dataset(local_store, "s", write_files(tmp_path / "b", renamed))
    assert a.dataset_hash == b.dataset_hash == dataset_hash(a.manifest.images)


def test_changed_data_gives_a_new_version_and_moves_the_pointer(tmp_path: Path, store) -> None:
    first = ingest_dataset(store, "s", write_files(tmp_path / "a", good_images(3)))
    second = ingest_dataset(store, "s", write_files(tmp_path / "b", good_images(4)))
    assert second.dataset_hash != first.dataset_hash
    assert (second.new_version, second.current_changed, second.previous_hash) == (True, True, first.dataset_hash)
    pointer, _ = read_pointer(store, "s")
    assert [h.dataset_hash for h in pointer.history] == [second.dataset_hash, first.dataset_hash]
    assert read_manifest(store, "s", first.dataset_hash).dataset_hash == first.dataset_hash


def test_a_caption_change_alone_gives_a_new_version(tmp_path: Path, local_store) -> None:
    files = good_images(2)
    first = ingest_dataset(local_store, "s", write_files(tmp_path / "a", files))
    files["img_000.txt"] = "a different caption"
    second = ingest_dataset(local_store, "s", write_files(tmp_path / "b", files))
    assert second.dataset_hash != first.dataset_hash


def test_every_bad_file_is_rejected_with_its_reason_and_the_rest_is_stored(tmp_path: Path, store) -> None:
    jpeg = image_bytes((256, 256), fmt="JPEG", quality=95)
    files = {
        **good_images(2),
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.txt": "cut off",
        "png_named.jpg": image_bytes((96, 96), (1, 2, 3)),
        "png_named.txt": "a png in disguise",
        "zero.png": b"",
        "bomb.png": png_bomb(20_000, 20_000),
        "tiny.png": image_bytes((32, 32), (9, 9, 9)),
        "latin.png": image_bytes((96, 96), (4, 5, 6)),
        "latin.txt": "café crème".encode("cp1252"),
        "zz_copy.png": good_images(1)["img_000.png"],
        "notes.pdf": b"%PDF-1.4",
        "orphan.txt": "no image for me",
    }
    report = ingest_dataset(store, "s", write_files(tmp_path / "src", files))
    reasons = {r.source: r.reason for r in report.rejected}
    assert "truncated" in reasons["truncated.jpg"]
    assert reasons["zero.png"] == "empty file (0 bytes)"
    assert "decompression bomb" in reasons["bomb.png"]
    assert "too small: 32×32" in reasons["tiny.png"]
    assert "exact duplicate of img_000.png" in reasons["zz_copy.png"]
    assert "not an image, caption or metadata file" in reasons["notes.pdf"]
    assert "caption file with no image" in reasons["orphan.txt"]
    assert len(reasons) == 7
    accepted = {e.source: e for e in report.manifest.images}
    assert sorted(accepted) == ["img_000.png", "img_001.png", "latin.png", "png_named.jpg"]
    assert accepted["png_named.jpg"].file.endswith(".png") and "content is PNG" in accepted["png_named.jpg"].note
    assert accepted["latin.png"].caption == "café crème" and "cp1252" in accepted["latin.png"].note
    assert {r.source for r in current_dataset(store, "s").rejected} == set(reasons)
    stored = _keys(store, dataset_prefix("s", report.dataset_hash))
    assert len(stored) == 5  # four images and the manifest


def test_a_zip_with_escaping_paths_stores_the_rest_and_writes_nothing_outside(
    tmp_path: Path, store, monkeypatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    members = {**good_images(2), "../evil.png": image_bytes(colour=(5, 5, 5)), "/tmp/abs_evil.png": image_bytes()}
    (tmp_path / "in").mkdir()
    report = ingest_dataset(store, "z", write_zip(tmp_path / "in" / "in.zip", members))
    reasons = {r.source: r.reason for r in report.rejected}
    assert set(reasons) == {"../evil.png", "/tmp/abs_evil.png"}
    assert all("refused, nothing extracted" in r for r in reasons.values())
    assert len(report.manifest.images) == 2
    assert not Path("/tmp/abs_evil.png").exists()
    assert not [p for p in tmp_path.rglob("*evil*")]
    assert [p.name for p in (tmp_path / "in").iterdir()] == ["in.zip"] and not any(work.iterdir())
    assert not any("evil" in key for key in _keys(store))


def test_a_store_prefix_is_a_source(store) -> None:
    for name, content in good_images(3).items():
        store.put(f"incoming/cats/{name}", content.encode() if isinstance(content, str) else content)
    report = ingest_dataset(store, "cats", "store:incoming/cats/")
    assert len(report.manifest.images) == 3 and report.stats.caption_coverage == 1.0
    assert report.manifest.images[0].caption == "teststyle, picture number 0"


def test_a_source_with_no_images_fails_listing_every_file(tmp_path: Path, local_store) -> None:
    source = write_files(tmp_path / "src", {"readme.md": "hi", "a.txt": "caption"})
    with pytest.raises(EmptyDatasetError, match="no usable images") as caught:
        ingest_dataset(local_store, "s", source)
    assert {r.source for r in caught.value.report.rejected} == {"readme.md", "a.txt"}
    assert current_dataset(local_store, "s") is None
    assert _keys(local_store) == []


def test_an_empty_folder_fails_saying_it_holds_no_files(tmp_path: Path, local_store) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptyDatasetError, match="holds no files"):
        ingest_dataset(local_store, "s", tmp_path / "empty")


def test_missing_captions_are_filled_with_the_trigger_word(tmp_path: Path, local_store) -> None:
    files = good_images(2)
    del files["img_000.txt"]
    files["img_001.txt"] = "   "
    report = ingest_dataset(
        local_store, "s", write_files(tmp_path / "src", files), options=IngestOptions(trigger_word="zzstyle")
    )
    assert [e.caption for e in report.manifest.images] == ["zzstyle", "zzstyle"]
    assert report.stats.caption_coverage == 0.0 and report.stats.filled_captions == 2
    assert "filled with the trigger word" in report.manifest.images[0].note


def test_missing_captions_are_rejected_when_configured(tmp_path: Path, local_store) -> None:
    files = good_images(2)
    del files["img_000.txt"]
    report = ingest_dataset(
        local_store, "s", write_files(tmp_path / "src", files), options=IngestOptions(missing_captions="reject")
    )
    assert [e.source for e in report.manifest.images] == ["img_001.png"]
    assert "no caption" in report.rejected[0].reason and "set to reject" in report.rejected[0].reason


def test_a_non_utf8_caption_rejects_its_image_when_legacy_encodings_are_off(tmp_path: Path, local_store) -> None:
    files = good_images(2)
    files["img_000.txt"] = "café".encode("latin-1")
    report = ingest_dataset(
        local_store, "s", write_files(tmp_path / "src", files), options=IngestOptions(legacy_caption_encodings=False)
    )
    assert [r.source for r in report.rejected] == ["img_000.png"]
    assert "img_000.txt is not valid UTF-8" in report.rejected[0].reason


def test_captions_come_from_metadata_jsonl(tmp_path: Path, local_store) -> None:
    files = {k: v for k, v in good_images(2).items() if k.endswith(".png")}
    files["metadata.jsonl"] = (
        '{"file_name": "img_000.png", "text": "zero"}\n{"file_name": "img_001.png", "text": "one"}\n{"file_name": "gone.png", "text": "?"}\n'
    )
    report = ingest_dataset(local_store, "s", write_files(tmp_path / "src", files))
    assert [(e.caption, e.caption_source) for e in report.manifest.images] == [
        ("zero", "metadata.jsonl"),
        ("one", "metadata.jsonl"),
    ]
    assert [r.source for r in report.rejected] == ["gone.png"]


def test_an_unsafe_style_name_is_refused_before_anything_is_read(tmp_path: Path, local_store) -> None:
    with pytest.raises(InvalidStyleName, match="'../x'"):
        ingest_dataset(local_store, "../x", tmp_path / "does-not-matter")


def test_progress_reports_both_stages_to_their_totals(local_store) -> None:
    seen: dict[str, tuple[int, int]] = {}
    ingest_dataset(
        local_store,
        "s",
        sample_dataset_path(),
        progress=lambda stage, done, total: seen.__setitem__(stage, (max(done, seen.get(stage, (0, 0))[0]), total)),
    )
    assert seen == {"check": (8, 8), "upload": (8, 8)}


def test_the_report_carries_thumbnails_and_rejected_rows(tmp_path: Path, local_store) -> None:
    source = tmp_path / "src"
    shutil.copytree(sample_dataset_path(), source)
    (source / "zero.png").write_bytes(b"")
    report = ingest_dataset(local_store, "s", source)
    assert len(report.thumbnails) == 4 and report.thumbnails[0].data_uri.startswith("data:image/png;base64,")
    assert report.rejected_rows() == [{"file": "zero.png", "reason": "empty file (0 bytes)"}]
    assert "zero.png" in report.rejected_markdown()
    as_dict = report.to_dict()
    assert as_dict["stats"]["image_count"] == 8 and as_dict["datasetHash"] == report.dataset_hash


def test_reading_an_unknown_version_names_it(local_store) -> None:
    with pytest.raises(DatasetNotFound, match="no dataset version abc123 for style 's'"):
        read_manifest(local_store, "s", "abc123")


def test_a_damaged_zip_member_is_rejected_and_the_rest_is_stored(tmp_path: Path, local_store) -> None:
    archive = write_zip(tmp_path / "in.zip", {**good_images(2), "broken.png": image_bytes(colour=(7, 7, 7))})
    raw = bytearray(archive.read_bytes())
    at = raw.index(b"broken.png") + len("broken.png") + 50  # inside the member's data
    raw[at] ^= 0xFF
    archive.write_bytes(bytes(raw))
    report = ingest_dataset(local_store, "z", archive)
    assert [r.source for r in report.rejected] == ["broken.png"]
    assert "damaged zip member" in report.rejected[0].reason
    assert len(report.manifest.images) == 2


def test_an_s3_url_is_a_source(moto_env: str, s3_client, s3_bucket: str, local_store) -> None:
    for name, content in good_images(2).items():
        body = content.encode() if isinstance(content, str) else content
        s3_client.put_object(Bucket=s3_bucket, Key=f"drop/cats/{name}", Body=body)
    report = ingest_dataset(local_store, "cats", f"s3://{s3_bucket}/drop/cats")
    assert [e.source for e in report.manifest.images] == ["img_000.png", "img_001.png"]
    assert report.manifest.source == f"s3://{s3_bucket}/drop/cats"


def test_reingest_does_not_decode_images_the_current_version_holds(local_store, monkeypatch) -> None:
    ingest_dataset(local_store, "sample", sample_dataset_path(), options=IngestOptions(thumbnails=0))
    decoded: list[str] = []
    from lora_pipeline.dataset import ingest as ingest_module

    real = ingest_module.inspect_image
    monkeypatch.setattr(
        ingest_module, "inspect_image", lambda data, **kw: decoded.append(kw["name"]) or real(data, **kw)
    )
    again = ingest_dataset(local_store, "sample", sample_dataset_path(), options=IngestOptions(thumbnails=0))
    assert decoded == [] and again.uploaded == 0


def test_reused_checks_still_apply_this_runs_minimum_side(local_store) -> None:
    ingest_dataset(local_store, "sample", sample_dataset_path())
    with pytest.raises(EmptyDatasetError):
        ingest_dataset(local_store, "sample", sample_dataset_path(), options=IngestOptions(min_side=200, thumbnails=0))


def test_dagster_metadata_carries_the_hash_thumbnails_and_rejected_table(tmp_path: Path, local_store) -> None:
    import dagster as dg

    source = tmp_path / "src"
    shutil.copytree(sample_dataset_path(), source)
    (source / "zero.png").write_bytes(b"")
    metadata = ingest_dataset(local_store, "s", source).dagster_metadata()
    assert len(metadata["dataset_hash"].value) == 64 and metadata["images"].value == 8
    assert metadata["thumbnails"].value.count("data:image/png;base64,") == 4
    assert isinstance(metadata["rejected_files"], dg.TableMetadataValue)
    assert [r.data for r in metadata["rejected_files"].records] == [
        {"file": "zero.png", "reason": "empty file (0 bytes)"}
    ]
    dg.MaterializeResult(metadata=metadata)  # Dagster accepts every value


def test_the_trigger_word_is_prepended_to_captions_lacking_it_when_asked(tmp_path: Path, local_store) -> None:
    files = good_images(2)
    files["img_001.txt"] = "ZZ, already has it"
    options = IngestOptions(trigger_word="zz", prepend_trigger_word=True)
    report = ingest_dataset(local_store, "s", write_files(tmp_path / "src", files), options=options)
    assert [e.caption for e in report.manifest.images] == ["zz, teststyle, picture number 0", "ZZ, already has it"]


def test_the_sample_hash_is_stable_across_runs_and_releases(local_store) -> None:
    # Pinned: a change here means every stored version would look new and retrain.
    # Only the hashing rules (manifest.dataset_hash, caption normalisation) or the
    # committed sample files can move it.
    report = ingest_dataset(local_store, "sample", sample_dataset_path())
    assert report.dataset_hash == "be91308eeeceaa320659da1cbb5b421383b7960f3c8794442293a94c09d5533b"


# -- pass 1's steps alone -------------------------------------------------------------


def test_the_listing_is_sorted_by_kind_and_every_other_file_is_explained() -> None:
    listing = Listing(
        files=[SourceFile(n, 1) for n in ("a.png", "a.txt", "metadata.jsonl", "notes.docx", "README")],
        refused=[Refusal("../escape.png", "outside the source")],
    )
    files = _sort_listing(listing)
    assert [f.name for f in files.images] == ["a.png"]
    assert (files.caption_names, files.metadata_names) == (["a.txt"], ["metadata.jsonl"])
    assert [r.source for r in files.rejected] == ["../escape.png", "notes.docx", "README"]
    assert "extension .docx" in files.rejected[1].reason and ".png" in files.rejected[1].reason
    assert "extension (none)" in files.rejected[2].reason


def _facts(sha: str) -> ImageFacts:
    return ImageFacts(sha256=sha, size=10, format="PNG", extension="png", width=64, height=64, mode="RGB")


def test_an_exact_duplicate_is_kept_once_under_its_first_name() -> None:
    sha = "ab" * 32
    outcomes = [
        ("a.png", _facts(sha), Path("staged-a")),
        ("copy.png", _facts(sha), Path("staged-b")),
        ("bad.png", Rejection("corrupt image data (truncated)"), None),
    ]
    checked = _accept_images(outcomes, build_caption_index({}, {}), IngestOptions(), "geo", rejected=[])
    assert [e.source for e in checked.entries] == ["a.png"] and checked.entries[0].caption == "geo"
    assert checked.paths == {f"images/{sha}.png": Path("staged-a")}
    assert [(r.source, r.reason) for r in checked.rejected] == [
        ("copy.png", "exact duplicate of a.png (same content); kept once"),
        ("bad.png", "corrupt image data (truncated)"),
    ]


def test_an_image_without_a_caption_stays_out_when_captions_are_required() -> None:
    outcomes = [("a.png", _facts("cd" * 32), Path("staged-a"))]
    checked = _accept_images(
        outcomes, build_caption_index({}, {}), IngestOptions(missing_captions="reject"), "geo", rejected=[]
    )
    assert checked.entries == [] and checked.paths == {}
    assert "no caption" in checked.rejected[0].reason and "reject" in checked.rejected[0].reason
