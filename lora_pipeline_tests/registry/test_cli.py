"""``lora-pipeline registry …`` on the configured store (LORA_STORAGE_URL)."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_pipeline.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "legacy"


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_STORAGE_URL", str(tmp_path / "store"))
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, ["registry", *args], catch_exceptions=False)

    return invoke


def _copy_bucket(root: Path) -> None:
    for path in (FIXTURE / "bucket").rglob("*.safetensors"):
        target = root / path.relative_to(FIXTURE / "bucket")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())


def test_list_on_an_empty_store_says_so(cli):
    result = cli("list")
    assert result.exit_code == 0 and "no styles" in result.output


def test_import_legacy_then_list_and_show(cli):
    result = cli("import-legacy", str(FIXTURE / "style_images"))
    assert result.exit_code == 0, result.output
    assert "folded 2 records of style_59 V4" in result.output
    listed = json.loads(cli("list", "--json").output)
    assert sorted(listed) == ["style_59", "style_7"]
    shown = json.loads(cli("show", "style_59", "--json").output)
    assert [v["name"] for v in shown["versions"]] == ["V1", "V2", "V3", "V4"]
    assert "V3\tpending" in cli("show", "style_59").output


def test_reconcile_json_prints_one_object_with_integer_changed_versions(cli, tmp_path):
    _copy_bucket(tmp_path / "store")
    result = cli("reconcile", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["changed_versions"] == 6 and isinstance(out["details"], list)
    assert json.loads(cli("reconcile", "--json").output)["changed_versions"] == 0


def test_reconcile_dry_run_writes_nothing(cli, tmp_path):
    _copy_bucket(tmp_path / "store")
    out = json.loads(cli("reconcile", "--dry-run", "--json").output)
    assert out["changed_versions"] == 6 and out["dry_run"] is True
    assert not (tmp_path / "store" / "registry").exists()


def test_public_base_url_drives_the_urls_of_new_files(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_PUBLIC_BASE_URL", "https://cdn.example.com/lora")
    _copy_bucket(tmp_path / "store")
    cli("reconcile")
    shown = json.loads(cli("show", "style_7", "--json").output)
    assert shown["versions"][0]["loraUrl"] == "https://cdn.example.com/lora/loras/style_7/style_7_v1.safetensors"


@pytest.mark.parametrize("bad", ["bad..name", "has space", "x" * 65, "a/b"])
def test_a_bad_style_name_is_refused_naming_it(cli, bad):
    result = cli("show", bad)
    assert result.exit_code != 0
    assert repr(bad) in result.output and "invalid style name" in result.output


def test_show_of_an_unknown_style_fails(cli):
    result = cli("show", "nobody")
    assert result.exit_code != 0 and "'nobody' has no registry document" in result.output


def test_import_legacy_of_a_missing_directory_fails(cli, tmp_path):
    assert cli("import-legacy", str(tmp_path / "nowhere")).exit_code != 0
