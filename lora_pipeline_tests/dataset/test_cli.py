"""``lora-pipeline dataset add / list / show`` against a local store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_pipeline.cli.dataset import dataset
from lora_pipeline.dataset.ingest import sample_dataset_path
from lora_pipeline_tests.dataset.builders import write_files


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("LORA_STORAGE_URL", str(tmp_path / "store"))
    return CliRunner()


def test_add_stores_the_dataset_and_says_the_style_is_registered(runner: CliRunner) -> None:
    result = runner.invoke(dataset, ["add", "sample", str(sample_dataset_path())])
    assert result.exit_code == 0, result.output
    assert "8 images" in result.output and "new version" in result.output
    assert "registered" in result.output


def test_add_json_prints_the_report(runner: CliRunner) -> None:
    result = runner.invoke(dataset, ["add", "sample", str(sample_dataset_path()), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["stats"]["image_count"] == 8 and len(report["datasetHash"]) == 64


def test_add_refuses_an_unsafe_style_name(runner: CliRunner) -> None:
    result = runner.invoke(dataset, ["add", "../etc", str(sample_dataset_path())])
    assert result.exit_code == 2
    assert "invalid style name '../etc'" in result.output


def test_add_with_no_usable_images_fails_and_lists_the_files(runner: CliRunner, tmp_path: Path) -> None:
    source = write_files(tmp_path / "src", {"a.png": b"", "b.jpg": b"not a jpeg"})
    result = runner.invoke(dataset, ["add", "s", str(source)])
    assert result.exit_code == 1
    assert "no usable images" in result.output
    assert "a.png: empty file (0 bytes)" in result.output and "b.jpg: not an image" in result.output
    assert result.output.count("a.png: empty file") == 1  # listed once (issue 23: it was twice)
    assert result.output.splitlines()[-1] == f"Error: no usable images in {source} (2 file(s) rejected, listed above)"


def test_add_warns_when_fewer_images_than_the_check_wants_are_accepted(runner: CliRunner, tmp_path: Path) -> None:
    source = tmp_path / "three"
    source.mkdir()
    for path in sorted(p for p in sample_dataset_path().iterdir() if p.suffix == ".png")[:3]:
        (source / path.name).write_bytes(path.read_bytes())
    result = runner.invoke(dataset, ["add", "three", str(source)])
    assert result.exit_code == 0, result.output
    assert "warning: only 3 image(s) accepted; the enough_images check wants at least 4" in result.stderr
    full = runner.invoke(dataset, ["add", "eight", str(sample_dataset_path())])
    assert "warning" not in full.stderr


def test_list_and_show_describe_the_stored_dataset(runner: CliRunner) -> None:
    runner.invoke(dataset, ["add", "sample", str(sample_dataset_path())])
    listed = runner.invoke(dataset, ["list"])
    assert listed.exit_code == 0 and listed.output.startswith("sample ") and "8 images" in listed.output
    shown = runner.invoke(dataset, ["show", "sample"])
    assert shown.exit_code == 0 and "geo_01.png" in shown.output and "96x96" in shown.output


def test_show_of_an_unknown_style_is_an_error(runner: CliRunner) -> None:
    result = runner.invoke(dataset, ["show", "ghost"])
    assert result.exit_code == 1 and "no dataset for style 'ghost'" in result.output
