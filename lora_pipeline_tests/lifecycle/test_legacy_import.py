"""Legacy import refuses bad input clearly, by path, and still imports the rest."""

import json

from lora_pipeline.lifecycle.legacy_import import import_legacy
from lora_pipeline.registry_store.documents import RegistryStore


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return path


GOOD = {"versions": [{"id": "aa11bb22-cc33-4d44-8e55-ff6677889900-e1", "name": "V1", "status": "completed"}]}


def test_a_file_that_is_not_json_is_reported_by_path_and_skipped(tmp_path, local_store):
    bad = write(tmp_path / "legacy" / "broken" / "training_versions.json", b"{nope")
    write(tmp_path / "legacy" / "good" / "training_versions.json", GOOD)
    report = import_legacy(local_store, tmp_path / "legacy")
    assert report.imported == ["good"]
    assert any(str(bad) in p and "JSON" in p for p in report.problems)
    assert RegistryStore(local_store).styles() == ["good"]


def test_a_file_of_the_wrong_shape_is_reported_and_skipped(tmp_path, local_store):
    bad = write(tmp_path / "legacy" / "listy" / "training_versions.json", [1, 2])
    report = import_legacy(local_store, tmp_path / "legacy")
    assert report.imported == [] and any(str(bad) in p and "'versions' list" in p for p in report.problems)


def test_a_style_directory_with_a_bad_name_is_refused_by_name(tmp_path, local_store):
    write(tmp_path / "legacy" / "bad name" / "training_versions.json", GOOD)
    write(tmp_path / "legacy" / "good" / "training_versions.json", GOOD)
    report = import_legacy(local_store, tmp_path / "legacy")
    assert report.imported == ["good"]
    assert any("'bad name'" in p for p in report.problems)


def test_a_record_without_a_usable_name_is_skipped_and_the_rest_imported(tmp_path, local_store):
    content = {"versions": [{"id": "x", "status": "completed"}, *GOOD["versions"]]}
    path = write(tmp_path / "legacy" / "s" / "training_versions.json", content)
    report = import_legacy(local_store, tmp_path / "legacy")
    assert any(f"{path}: versions[0] skipped" in p for p in report.problems)
    assert [v.name for v in RegistryStore(local_store).read("s")[0].versions] == ["V1"]


def test_importing_twice_changes_nothing_the_second_time(tmp_path, local_store):
    write(tmp_path / "legacy" / "s" / "training_versions.json", GOOD)
    assert import_legacy(local_store, tmp_path / "legacy").changed_versions == 1
    assert import_legacy(local_store, tmp_path / "legacy").changed_versions == 0
