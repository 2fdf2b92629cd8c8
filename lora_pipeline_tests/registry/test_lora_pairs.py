"""A version's two files (the main diffusers file and its kohya companion) in the registry: the
merge attaches a companion only to a completed version, the document records both (key, size,
checksum, URL each), ``loraUrl`` names the deployment's primary layout, reconciliation and
legacy import understand the pair, the checks look at both, and the CLI downloads either."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_pipeline.cli import main
from lora_pipeline.contracts.job_status import JobStatus
from lora_pipeline.lifecycle.legacy_import import import_legacy
from lora_pipeline.lifecycle.reconcile import reconcile
from lora_pipeline.lifecycle.submit import record_completion
from lora_pipeline.registry.checks import (
    completed_without_both_layouts,
    completed_without_readable_file,
    stored_presigned_urls,
)
from lora_pipeline.registry.evidence import LegacyRecord, RejectedLora, StoredCompanion, StoredLora, Submission
from lora_pipeline.registry.merge import merge
from lora_pipeline.registry.models import RegistryDocument, VersionStatus
from lora_pipeline.registry.names import parse_lora_file
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.settings import SettingsError

from .lora_files import at, pair_bytes

S = "geo"
MAIN = f"loras/{S}/{S}_v3.safetensors"
KOHYA = f"loras/{S}/{S}_v3_kohya.safetensors"
CDN = "https://cdn.example.com/"
REGULAR = "https://b.s3.us-west-1.amazonaws.com/"
SHA_D, SHA_K = "d" * 64, "c" * 64


def main_file(minute=5, url=REGULAR, key=MAIN, layout="diffusers", etag="e1", number=3):
    return StoredLora(
        S, key, number, url + key, 100, etag, {"lora_pipeline.dataset_hash": "ab"}, at(minute), layout, SHA_D
    )


def companion(minute=4, url=REGULAR, key=KOHYA, layout="kohya", etag="k1", number=3, checksum=SHA_K):
    return StoredCompanion(S, key, number, url + key if url else None, 90, etag, layout, checksum, at(minute))


def doc(*evidence) -> RegistryDocument:
    return merge(RegistryDocument(S), list(evidence))


def record(document: RegistryDocument, primary: str = "kohya") -> dict:
    (version,) = document.to_dict(primary)["versions"]
    return version


# -- names -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("geo_v3.safetensors", (3, None)),
        ("geo_vV3.safetensors", (3, None)),
        ("geo_v3_kohya.safetensors", (3, "kohya")),
        ("geo_VV3_Kohya.safetensors", (3, "kohya")),
        ("geo_v3_diffusers.safetensors", (3, "diffusers")),
        ("geo_v3_sample_0.safetensors", None),
        ("geo_kohya.safetensors", None),
        ("ge_v3_kohya.safetensors", None),
        ("geo_v3_kohya.png", None),
    ],
)
def test_a_file_name_says_which_version_and_which_file_of_it(name, parsed) -> None:
    assert parse_lora_file(S, name) == parsed


def test_a_style_named_like_a_suffix_is_still_its_own() -> None:
    assert parse_lora_file("foo_kohya", "foo_kohya_v1.safetensors") == (1, None)
    assert parse_lora_file("foo", "foo_kohya_v1.safetensors") is None


# -- merge -----------------------------------------------------------------------------------------


def test_both_files_of_a_completed_version_are_recorded_and_lora_url_names_the_primary() -> None:
    document = doc(main_file(), companion())
    kohya_first = record(document)
    assert kohya_first["status"] == "completed"
    assert kohya_first["loraUrl"] == REGULAR + KOHYA and kohya_first["s3Key"] == KOHYA
    assert kohya_first["files"] == {
        "diffusers": {
            "key": MAIN,
            "size": 100,
            "etag": "e1",
            "lastModified": kohya_first["files"]["diffusers"]["lastModified"],
            "layout": "diffusers",
            "tensorsSha256": SHA_D,
            "url": REGULAR + MAIN,
        },
        "kohya": {
            "key": KOHYA,
            "size": 90,
            "etag": "k1",
            "lastModified": kohya_first["files"]["kohya"]["lastModified"],
            "layout": "kohya",
            "tensorsSha256": SHA_K,
            "url": REGULAR + KOHYA,
        },
    }
    assert kohya_first["file"]["key"] == MAIN and kohya_first["file"]["url"] == REGULAR + MAIN
    diffusers_first = record(document, "diffusers")
    assert diffusers_first["loraUrl"] == REGULAR + MAIN and diffusers_first["s3Key"] == MAIN
    assert document.superseded_files == () and document.rejected_files == ()


def test_the_primary_is_handed_in_and_the_setting_picks_it(monkeypatch, local_store) -> None:
    document = doc(main_file(), companion())
    assert document.to_dict()["versions"][0]["s3Key"] == KOHYA  # the pure core's default
    assert document.to_dict("diffusers")["versions"][0]["s3Key"] == MAIN
    monkeypatch.setenv("LORA_PRIMARY_FORMAT", "diffusers")
    assert RegistryStore(local_store).primary == "diffusers"  # the registry store hands the setting in
    monkeypatch.setenv("LORA_PRIMARY_FORMAT", "ckpt")
    with pytest.raises(SettingsError, match="^LORA_PRIMARY_FORMAT='ckpt': expected one of kohya, diffusers$"):
        RegistryStore(local_store)


def test_a_kohya_file_alone_creates_no_version_and_stays_accounted_for() -> None:
    """A job that died between its two uploads leaves the kohya file: it proves nothing."""
    document = doc(companion())
    assert document.versions == ()
    (kept,) = document.superseded_files
    assert (kept.key, kept.layout, kept.url) == (KOHYA, "kohya", REGULAR + KOHYA)


def test_a_companion_waits_for_its_version_to_complete_then_attaches() -> None:
    submitted = Submission(S, 3, "req", "job-1-e1", "ab", {}, at(1))
    waiting = doc(submitted, companion())
    assert waiting.version(3).status is VersionStatus.starting and waiting.version(3).companions == ()
    assert [f.key for f in waiting.superseded_files] == [KOHYA]
    completed = merge(waiting, [main_file()])
    assert [c.key for c in completed.version(3).companions] == [KOHYA] and completed.superseded_files == ()
    assert completed.to_json("kohya") == doc(submitted, companion(), main_file()).to_json("kohya")


def test_a_file_of_the_main_files_layout_under_a_kohya_name_is_not_its_kohya_file() -> None:
    document = doc(main_file(), companion(layout="diffusers"))
    assert document.version(3).companions == () and [f.key for f in document.superseded_files] == [KOHYA]
    assert record(document)["loraUrl"] == REGULAR + MAIN  # no kohya file: the main one


def test_of_two_kohya_files_of_one_version_the_newest_is_its_own() -> None:
    other = f"loras/{S}/{S}_vV3_kohya.safetensors"
    document = doc(main_file(), companion(minute=4), companion(minute=6, key=other, etag="k2"))
    assert [c.key for c in document.version(3).companions] == [other]
    assert [f.key for f in document.superseded_files] == [KOHYA]


def test_a_broken_kohya_upload_is_rejected_and_the_main_file_serves() -> None:
    document = doc(main_file(), companion(), RejectedLora(S, KOHYA, "k2", "truncated", at(9)))
    assert document.version(3).companions == ()
    assert [r.key for r in document.rejected_files] == [KOHYA]
    assert record(document)["loraUrl"] == REGULAR + MAIN


@pytest.mark.parametrize("order", [0, 1])
def test_a_kohya_files_url_is_never_downgraded(order: int) -> None:
    seen = [companion(url=CDN), companion(url=REGULAR)]
    document = doc(main_file(), *(seen if order else seen[::-1]))
    assert record(document)["loraUrl"] == CDN + KOHYA
    assert merge(document, [companion(url=REGULAR)]).to_json("kohya") == document.to_json("kohya")


def test_a_presigned_kohya_url_is_stored_plain() -> None:
    signed = StoredCompanion(
        S, KOHYA, 3, REGULAR + KOHYA + "?X-Amz-Signature=abc&X-Amz-Expires=60", 90, "k1", "kohya", SHA_K, at(4)
    )
    data = doc(main_file(), signed).to_json("kohya")
    assert b"X-Amz-Signature" not in data and stored_presigned_urls(data) == []


def test_the_pair_survives_the_json_round_trip() -> None:
    document = doc(main_file(url=CDN), companion(url=REGULAR))
    for primary in ("kohya", "diffusers"):
        again = merge(RegistryDocument.from_json(document.to_json(primary), S), [])
        assert again.to_json(primary) == document.to_json(primary)
        assert again.version(3).lora_url == CDN + MAIN  # loraUrl named another file; the main one's kept


def test_a_document_written_before_pairs_reads_as_it_was() -> None:
    old = {
        "schemaVersion": 1,
        "style": S,
        "versions": [
            {
                "id": None,
                "name": "V3",
                "status": "completed",
                "loraUrl": CDN + MAIN,
                "s3Key": MAIN,
                "file": {"key": MAIN, "size": 100, "etag": "e1", "lastModified": 5},
            }
        ],
    }
    version = RegistryDocument.from_json(json.dumps(old).encode(), S).versions[0]
    assert version.lora_url == CDN + MAIN and version.file.layout is None and version.files() == {}
    assert record(merge(RegistryDocument(S, (version,)), []))["loraUrl"] == CDN + MAIN


def test_a_legacy_url_of_a_kohya_file_is_not_taken_for_the_main_files() -> None:
    legacy = LegacyRecord(S, {"id": "job-9-e1", "name": "V3", "status": "completed", "loraUrl": CDN + KOHYA})
    document = doc(legacy)
    version = document.version(3)
    assert version.lora_url is None and version.extra["legacyLoraUrl"] == CDN + KOHYA
    assert record(document)["loraUrl"] == CDN + KOHYA  # the dashboard keeps its link meanwhile
    reconciled = merge(document, [main_file(url=REGULAR), companion(url=REGULAR)])
    assert reconciled.version(3).lora_url == REGULAR + MAIN
    assert record(reconciled)["loraUrl"] == REGULAR + KOHYA


def test_a_record_of_our_schema_imported_as_legacy_keeps_both_files() -> None:
    ours = record(doc(main_file(), companion()))
    again = doc(LegacyRecord(S, ours))
    assert sorted(again.version(3).files()) == ["diffusers", "kohya"]
    assert record(again)["s3Key"] == KOHYA


# -- checks -----------------------------------------------------------------------------------------


def test_the_checks_look_at_both_files() -> None:
    paired, single = doc(main_file(), companion()), doc(main_file())
    assert completed_without_both_layouts(paired) == []
    assert completed_without_both_layouts(single) == ["geo V3: no kohya file (has: diffusers)"]
    assert completed_without_readable_file(paired, readable=lambda key: key != KOHYA) == [
        f"geo V3: completed but {KOHYA} is missing or unreadable"
    ]
    raw = json.loads(paired.to_json("kohya"))
    raw["versions"][0]["files"]["kohya"]["url"] += "?X-Amz-Signature=abc"
    assert stored_presigned_urls(json.dumps(raw).encode()) == [
        "V3: files.kohya.url is a presigned URL (it expires; store the plain URL)"
    ]


# -- reconciliation, completion, legacy import (a store) -------------------------------------------


def _publish(store, number=3, *, kohya=True, meta=None):
    meta = {"lora_pipeline.request_id": "req", "lora_pipeline.dataset_hash": "ab", **(meta or {})}
    if kohya:
        store.put(f"loras/{S}/{S}_v{number}_kohya.safetensors", pair_bytes("kohya", meta, seed=number))
    store.put(f"loras/{S}/{S}_v{number}.safetensors", pair_bytes("diffusers", meta, seed=number))


def test_reconciliation_records_both_files_and_a_second_run_reads_nothing(store) -> None:
    _publish(store, 3)
    _publish(store, 4, kohya=False)
    store.put(f"loras/{S}/{S}_v5_kohya.safetensors", pair_bytes("kohya"))  # a job died before its main file
    first = reconcile(store)
    document, _ = RegistryStore(store).read(S)
    assert [v.name for v in document.versions] == ["V3", "V4"]
    files = document.version(3).files()
    assert sorted(files) == ["diffusers", "kohya"]
    assert files["kohya"].url == store.url(KOHYA) and files["kohya"].checksum and files["kohya"].size > 0
    assert sorted(document.version(4).files()) == ["diffusers"]
    assert [f.key for f in document.superseded_files] == [f"loras/{S}/{S}_v5_kohya.safetensors"]
    assert first.headers_read == 4
    second = reconcile(store)
    assert second.headers_read == 0 and second.styles_written == 0 and second.changed_versions == 0


def test_a_new_version_number_skips_a_lone_kohya_file(local_store) -> None:
    """Its key belongs to the request that died: a new version must not collide with it."""
    local_store.put(f"loras/{S}/{S}_v7_kohya.safetensors", pair_bytes("kohya"))
    claimed = RegistryStore(local_store).claim_version(
        S, request_id="r", dataset_hash="ab", params={}, owner="o", lease=timedelta(seconds=60)
    )
    assert claimed.version.number == 8


def test_files_recorded_before_layouts_are_read_once_more(local_store) -> None:
    _publish(local_store, 3)
    reconcile(local_store)
    registry = RegistryStore(local_store)
    document, _ = registry.read(S)
    raw = json.loads(document.to_json())
    for key in ("layout", "tensorsSha256", "url"):
        raw["versions"][0]["file"].pop(key)
    raw["versions"][0].pop("files")
    raw["versions"][0]["loraUrl"] = local_store.url(MAIN)
    local_store.put(f"registry/{S}/training_versions.json", json.dumps(raw).encode())
    healed = reconcile(local_store)  # the main file (no layout yet) and its kohya file (not recorded)
    assert healed.headers_read == 2 and healed.changed_versions == 1
    again, _ = registry.read(S)
    assert sorted(again.version(3).files()) == ["diffusers", "kohya"]
    assert reconcile(local_store).headers_read == 0


def test_changing_the_primary_rewrites_lora_url_on_the_next_reconciliation(local_store, monkeypatch) -> None:
    _publish(local_store, 3)
    reconcile(local_store)
    stored = json.loads(local_store.get(f"registry/{S}/training_versions.json").data)
    assert stored["versions"][0]["loraUrl"] == local_store.url(KOHYA)
    monkeypatch.setenv("LORA_PRIMARY_FORMAT", "diffusers")
    report = reconcile(local_store)
    stored = json.loads(local_store.get(f"registry/{S}/training_versions.json").data)
    assert stored["versions"][0]["loraUrl"] == local_store.url(MAIN) and stored["versions"][0]["s3Key"] == MAIN
    assert report.styles_written == 1 and reconcile(local_store).styles_written == 0


def test_a_completion_records_both_files_the_job_output_names(local_store) -> None:
    RegistryStore(local_store).apply(S, [Submission(S, 3, "req", "job-1-e1", "ab", {}, at(0))])
    _publish(local_store, 3)
    status = JobStatus(
        id="job-1-e1",
        status="COMPLETED",
        output={
            "lora_key": MAIN,
            "kohya_key": KOHYA,
            "files": {"kohya": KOHYA, "diffusers": MAIN},
            "style": S,
            "version": "V3",
        },
    )
    completion = record_completion(local_store, S, status, source="webhook")
    assert completion.version.status is VersionStatus.completed
    assert sorted(completion.version.files()) == ["diffusers", "kohya"]


def test_a_completion_never_attaches_a_file_of_another_version_or_style(local_store) -> None:
    RegistryStore(local_store).apply(S, [Submission(S, 3, "req", "job-1-e1", "ab", {}, at(0))])
    _publish(local_store, 3, kohya=False)
    _publish(local_store, 4)
    local_store.put("loras/other/other_v3_kohya.safetensors", pair_bytes("kohya"))
    status = JobStatus(
        id="job-1-e1",
        status="COMPLETED",
        output={
            "lora_key": MAIN,
            "kohya_key": f"loras/{S}/{S}_v4_kohya.safetensors",
            "files": {"kohya": "loras/other/other_v3_kohya.safetensors"},
        },
    )
    completion = record_completion(local_store, S, status, source="poll")
    assert completion.version.status is VersionStatus.completed and completion.version.companions == ()


def test_completion_metadata_shows_both_files() -> None:
    from lora_pipeline.defs.assets.trained_lora import completion_result
    from lora_pipeline.lifecycle.submit import Completion

    version = doc(main_file(url=CDN), companion(url=CDN)).version(3)
    meta, _ = completion_result(Completion(S, version, "completed", MAIN, {"lora_pipeline.steps": "10"}), None)
    assert (meta["kohya_file"], meta["diffusers_file"]) == (KOHYA, MAIN)
    assert (meta["kohya_url"].value, meta["diffusers_url"].value) == (CDN + KOHYA, CDN + MAIN)
    assert (meta["kohya_sha256"], meta["diffusers_sha256"], meta["kohya_size"]) == (SHA_K, SHA_D, 90)
    assert meta["url"].value == CDN + KOHYA and meta["primary_format"] == "kohya"


def test_legacy_import_then_reconciliation_understands_the_pair(tmp_path, local_store) -> None:
    legacy = tmp_path / "legacy" / S / "training_versions.json"
    legacy.parent.mkdir(parents=True)
    legacy.write_text(
        json.dumps(
            {
                "versions": [
                    {
                        "id": "5f0e8a52-1111-4c1e-9b0a-9e0c3f1a0001-e1",
                        "name": "V3",
                        "status": "completed",
                        "loraUrl": f"https://loras-prod.s3-accelerate.amazonaws.com/{MAIN}",
                    },
                    {
                        "id": "5f0e8a52-2222-4c1e-9b0a-9e0c3f1a0002-e1",
                        "name": "V4",
                        "status": "completed",
                        "loraUrl": f"https://loras-prod.s3-accelerate.amazonaws.com/loras/{S}/{S}_v4_kohya.safetensors",
                    },
                ]
            }
        )
    )
    _publish(local_store, 3)
    _publish(local_store, 4)
    import_legacy(local_store, tmp_path / "legacy")
    reconcile(local_store)
    document, _ = RegistryStore(local_store).read(S)
    v3, v4 = document.version(3), document.version(4)
    assert v3.lora_url == f"https://loras-prod.s3-accelerate.amazonaws.com/{MAIN}"  # accelerated main URL kept
    assert v3.download("diffusers").url == v3.lora_url and v3.download("kohya").key == KOHYA
    assert v4.lora_url == local_store.url(f"loras/{S}/{S}_v4.safetensors")  # not the kohya file's URL
    assert v4.download("kohya").key == f"loras/{S}/{S}_v4_kohya.safetensors"
    assert reconcile(local_store).changed_versions == 0


# -- the CLI ----------------------------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path, monkeypatch, local_store):
    monkeypatch.setenv("LORA_STORAGE_URL", str(local_store.root))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    return lambda *args: runner.invoke(main, ["registry", *args], catch_exceptions=False)


def test_download_gets_the_primary_layout_of_the_latest_version_by_default(cli, local_store, tmp_path) -> None:
    _publish(local_store, 3)
    _publish(local_store, 4)
    reconcile(local_store)
    result = cli("download", S, "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    assert (got["version"], got["layout"], got["verified"]) == ("V4", "kohya", True)
    assert Path(got["path"]).read_bytes() == local_store.get(f"loras/{S}/{S}_v4_kohya.safetensors").data
    result = cli("download", S, "V3", "--format", "diffusers", "-o", str(tmp_path / "mine.safetensors"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "mine.safetensors").read_bytes() == local_store.get(MAIN).data
    assert "checksum verified" in result.output


def test_download_into_a_directory_keeps_the_files_name(cli, local_store, tmp_path) -> None:
    _publish(local_store, 3)
    reconcile(local_store)
    (tmp_path / "loras").mkdir()
    assert cli("download", S, "v3", "-o", str(tmp_path / "loras")).exit_code == 0
    assert (tmp_path / "loras" / f"{S}_v3_kohya.safetensors").is_file()


def test_a_corrupted_download_is_refused_and_left_nowhere(cli, local_store, tmp_path) -> None:
    _publish(local_store, 3)
    reconcile(local_store)
    bad = bytearray(local_store.get(KOHYA).data)
    bad[-1] ^= 0xFF  # same size and header, other tensor bytes
    local_store.put(KOHYA, bytes(bad))
    result = cli("download", S, "V3")
    assert result.exit_code != 0 and "checksum mismatch" in result.output
    assert list(tmp_path.glob("*.safetensors")) == [] and list(tmp_path.glob(".*partial")) == []


def test_download_says_what_a_version_lacks(cli, local_store) -> None:
    _publish(local_store, 3, kohya=False)
    reconcile(local_store)
    RegistryStore(local_store).apply(S, [Submission(S, 4, "r4", "job-4-e1", "ab", {}, at(0))])
    lacking = cli("download", S, "V3", "--format", "kohya")
    assert lacking.exit_code != 0 and "no kohya file (it has: diffusers)" in lacking.output
    unfinished = cli("download", S, "V4")
    assert unfinished.exit_code != 0 and "V4 is starting" in unfinished.output
    assert "no version V9" in cli("download", S, "V9").output
    assert "not a version name" in cli("download", S, "latest").output
    assert "no registry document" in cli("download", "nothing").output


def test_download_reads_the_layout_of_a_file_recorded_before_layouts(cli, local_store, tmp_path) -> None:
    _publish(local_store, 3, kohya=False)
    reconcile(local_store)
    raw = json.loads(local_store.get(f"registry/{S}/training_versions.json").data)
    raw["versions"][0]["file"].pop("layout")
    raw["versions"][0].pop("files")
    local_store.put(f"registry/{S}/training_versions.json", json.dumps(raw).encode())
    result = cli("download", S, "--format", "diffusers")
    assert result.exit_code == 0, result.output
    assert (tmp_path / f"{S}_v3.safetensors").is_file()


def test_url_prints_a_temporary_url_of_either_file(cli, local_store) -> None:
    _publish(local_store, 3)
    reconcile(local_store)
    assert cli("url", S).output.strip() == local_store.presigned_url(KOHYA)
    assert cli("url", S, "V3", "--format", "diffusers", "--expires", "60").output.strip() == local_store.presigned_url(
        MAIN
    )


def test_url_of_an_s3_file_is_presigned(s3_store, monkeypatch) -> None:
    import importlib

    registry_cli = importlib.import_module("lora_pipeline.cli.registry")

    _publish(s3_store, 3)
    reconcile(s3_store)
    monkeypatch.setattr(registry_cli, "_open_store", lambda: s3_store)
    result = CliRunner().invoke(main, ["registry", "url", S, "--format", "kohya"], catch_exceptions=False)
    assert result.exit_code == 0 and "X-Amz-Signature" in result.output and f"{S}_v3_kohya" in result.output


def test_show_lists_both_files_of_a_version(cli, local_store) -> None:
    _publish(local_store, 3)
    reconcile(local_store)
    out = cli("show", S).output
    assert f"\tkohya\t{KOHYA}\t" in out and f"\tdiffusers\t{MAIN}\t" in out
    assert json.loads(cli("show", S, "--json").output)["versions"][0]["s3Key"] == KOHYA


def test_the_registry_table_links_both_files_and_an_unread_one_as_other() -> None:
    from dataclasses import replace

    from lora_pipeline.defs.assets.lora_registry import versions_markdown

    paired = doc(main_file(url=CDN), companion(url=CDN))
    row = versions_markdown(paired).splitlines()[-1]
    assert row.startswith("| V3 | completed |")
    # both layouts linked by their layout's name; an unread file by its file name
    assert f"| [kohya]({CDN + KOHYA}) · [diffusers]({CDN + MAIN}) |" in row
    version = doc(main_file(url=CDN)).version(3)
    unread = RegistryDocument(S, (replace(version, file=replace(version.file, layout=None)),))
    name = MAIN.rsplit("/", 1)[-1]
    assert f"| [{name}]({CDN + MAIN}) |" in versions_markdown(unread).splitlines()[-1]
