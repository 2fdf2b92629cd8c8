"""``lora-pipeline registry promote|rollback|aliases|delete`` on the configured store, bad input included."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lora_pipeline.cli import main
from lora_pipeline.storage.local import LocalStore

from .test_aliases_and_tombstones import S, kohya_key, main_key, seed


def seeded_cli_store(tmp_path, monkeypatch) -> LocalStore:
    """The configured store (``LORA_STORAGE_URL``) seeded with versions, the OS user ``oscar``."""
    monkeypatch.setenv("LORA_STORAGE_URL", str(tmp_path / "store"))
    monkeypatch.setenv("USER", "oscar")
    monkeypatch.setenv("LOGNAME", "oscar")
    store = LocalStore(tmp_path / "store")
    seed(store)
    return store


@pytest.fixture
def store(tmp_path, monkeypatch) -> LocalStore:
    return seeded_cli_store(tmp_path, monkeypatch)


def cli(*args: str):
    """``lora-pipeline registry ARGS`` in process."""
    return CliRunner().invoke(main, ["registry", *args], catch_exceptions=False)


def test_promote_rollback_and_aliases(store):
    result = cli("promote", S, "V1", "--reason", "first cut")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"{S} production: (new) → V1"
    assert cli("promote", S, "v2", "--by", "ana").exit_code == 0
    staging = json.loads(cli("promote", S, "V3", "--alias", "staging", "--json").output)
    assert staging == {"style": S, "alias": "staging", "version": "V3", "previous": None, "moved": True}
    again = cli("promote", S, "V2")
    assert again.exit_code == 0 and "already points at V2; nothing changed" in again.output
    back = cli("rollback", S, "--reason", "regression")
    assert back.exit_code == 0 and back.output.strip() == f"{S} production: V2 → V1"
    shown = json.loads(cli("aliases", S, "--json").output)
    assert shown["aliases"] == {"production": "V1", "staging": "V3"}
    assert [(e["seq"], e["action"], e["version"], e["by"], e["reason"]) for e in shown["history"]] == [
        (1, "promote", "V1", "oscar", "first cut"),
        (2, "promote", "V2", "ana", None),
        (3, "promote", "V3", "oscar", None),
        (4, "rollback", "V1", "oscar", "regression"),
    ]
    text = cli("aliases", S).output
    assert "production\tV1" in text and "#4\t" in text and "V2 → V1\tby oscar\tregression" in text
    assert "aliases: production → V1, staging → V3" in cli("show", S).output
    document = json.loads(cli("show", S, "--json").output)
    assert document["aliases"] == {"production": "V1", "staging": "V3"} and len(document["aliasHistory"]) == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("promote", S, "V9"), "geo has no version V9 (it has: V1, V2, V3, V4)"),
        (("promote", S, "V4"), "geo V4 is failed: only a completed version can be production's version"),
        (("promote", S, "next"), "'next' is not a version name like V3"),
        (("promote", S, "V1", "--alias", "PROD"), "invalid alias name 'PROD'"),
        (("promote", "nobody", "V1"), "style 'nobody' has no registry document"),
        (("rollback", S), "geo has no alias 'production' to roll back (its aliases: none)"),
        (("delete", S, "V9"), "geo has no version V9"),
        (("aliases", "nobody"), "style 'nobody' has no registry document"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(store, args, message):
    result = cli(*args)
    assert result.exit_code == 1, result.output
    assert message in result.output


def test_rollback_with_no_earlier_version_is_refused(store):
    cli("promote", S, "V1")
    result = cli("rollback", S)
    assert result.exit_code == 1 and "no earlier version to roll back to" in result.output


def test_delete_refuses_an_aliased_version_and_deletes_with_a_dry_run_first(store):
    cli("promote", S, "V2")
    refused = cli("delete", S, "V2")
    assert refused.exit_code == 1 and "geo V2 is what production point(s) at" in refused.output
    dry = cli("delete", S, "V1", "--dry-run")
    assert dry.exit_code == 0 and "would delete, 2 file(s)" in dry.output and main_key(1) in dry.output
    assert store.head(main_key(1)) is not None
    done = json.loads(cli("delete", S, "V1", "--reason", "off-brand", "--json").output)
    assert done == {
        "style": S,
        "version": "V1",
        "removed": [main_key(1), kohya_key(1)],
        "dryRun": False,
        "alreadyDeleted": False,
    }
    assert store.head(main_key(1)) is None and store.head(kohya_key(1)) is None
    assert "V1\tdeleted\t" in cli("show", S).output and "deleted by oscar: off-brand" in cli("show", S).output
    record = json.loads(cli("show", S, "--json").output)["versions"][0]
    assert record["status"] == "deleted" and record["deleted"]["by"] == "oscar"
    promoted = cli("promote", S, "V1")
    assert promoted.exit_code == 1 and "geo V1 is deleted" in promoted.output
    again = cli("delete", S, "V1")
    assert again.exit_code == 0 and "already deleted" in again.output and "0 file(s)" in again.output


def test_reconcile_applies_the_version_retention(store, monkeypatch):
    monkeypatch.setenv("LORA_KEEP_VERSIONS", "1")
    cli("promote", S, "V1")
    dry = cli("reconcile", "--dry-run", "--no-poll")
    assert dry.exit_code == 0 and "would delete geo V2" in dry.output
    out = json.loads(cli("reconcile", "--no-poll", "--json").output)
    assert out["versionRetention"]["deleted"] == {S: ["V2"]}
    assert out["versionRetention"]["keptAliased"] == {S: ["V1"]}
    assert store.head(main_key(2)) is None and store.head(main_key(3)) is not None


def test_retention_keeps_the_version_a_rollback_returns_to(store, monkeypatch):
    """Issue 22, defect 3: promote V1, promote V2, reconcile with LORA_KEEP_VERSIONS=1 (V3 is the
    newest completed): V1 stays, and ``registry rollback`` returns to it."""
    monkeypatch.setenv("LORA_KEEP_VERSIONS", "1")
    assert cli("promote", S, "V1").exit_code == 0
    assert cli("promote", S, "V2").exit_code == 0

    out = json.loads(cli("reconcile", "--no-poll", "--json").output)

    assert out["versionRetention"]["deleted"] == {}
    assert out["versionRetention"]["keptAliased"] == {S: ["V2", "V1"]}
    assert store.head(main_key(1)) is not None
    back = cli("rollback", S)
    assert back.exit_code == 0 and back.output.strip() == f"{S} production: V2 → V1"
