"""Sources list their files safely: nothing outside the dataset is ever read or written."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_pipeline.dataset.sources import FolderSource, SourceError, StorePrefixSource, ZipSource, open_source
from lora_pipeline_tests.dataset.builders import image_bytes, write_files, write_zip


def test_zip_members_with_parent_or_absolute_paths_are_refused(tmp_path: Path) -> None:
    archive = write_zip(
        tmp_path / "d.zip",
        {"ok.png": image_bytes(), "../evil.png": image_bytes(), "/etc/abs.png": image_bytes(), "a/../../b.png": b"x"},
    )
    listing = ZipSource(archive).listing()
    assert [f.name for f in listing.files] == ["ok.png"]
    reasons = {r.name: r.reason for r in listing.refused}
    assert "'..'" in reasons["../evil.png"] and "'..'" in reasons["a/../../b.png"]
    assert "absolute path" in reasons["/etc/abs.png"]


def test_an_oversized_zip_member_is_refused_before_it_is_inflated(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "d.zip", {"big.png": b"\0" * 5000, "small.png": image_bytes()})
    listing = ZipSource(archive, max_file_bytes=4000).listing()
    assert [f.name for f in listing.files] == ["small.png"]
    assert "over the 4,000-byte limit" in listing.refused[0].reason


def test_hidden_and_system_files_are_listed_as_refused_not_dropped(tmp_path: Path) -> None:
    root = write_files(
        tmp_path / "src", {"a.png": image_bytes(), ".DS_Store": b"x", ".git/config": b"x", "Thumbs.db": b"x"}
    )
    listing = FolderSource(root).listing()
    assert [f.name for f in listing.files] == ["a.png"]
    assert sorted(r.name for r in listing.refused) == [".DS_Store", ".git/", "Thumbs.db"]


def test_a_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        open_source(tmp_path / "nope")


def test_a_file_that_is_not_a_zip_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4")
    with pytest.raises(SourceError, match="not a zip archive"):
        open_source(tmp_path / "notes.pdf")


def test_a_store_prefix_source_names_files_relative_to_the_prefix(local_store) -> None:
    local_store.put("incoming/cats/a.png", image_bytes())
    local_store.put("incoming/cats/sub/a.txt", b"cat")
    source = open_source("store:incoming/cats", store=local_store)
    assert isinstance(source, StorePrefixSource)
    assert [f.name for f in source.listing().files] == ["a.png", "sub/a.txt"]
    assert source.read("sub/a.txt") == b"cat"


def test_an_empty_store_prefix_is_a_clear_error(local_store) -> None:
    with pytest.raises(SourceError, match="nothing found under"):
        open_source("store:incoming/ghost/", store=local_store).listing()


def test_a_symlinked_folder_is_listed_as_refused_not_followed(tmp_path: Path) -> None:
    outside = write_files(tmp_path / "outside", {"secret.png": image_bytes()})
    root = write_files(tmp_path / "src", {"a.png": image_bytes()})
    (root / "link").symlink_to(outside, target_is_directory=True)
    listing = FolderSource(root).listing()
    assert [f.name for f in listing.files] == ["a.png"]
    assert [(r.name, r.reason) for r in listing.refused] == [("link/", "symlinked folder, not followed")]
