"""``registry list`` aliases, ``registry unalias``, ``registry show`` progress and the reconciliation
of an interrupted delete, through the CLI on the configured store, bad input included."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from lora_pipeline.registry.aliases import AliasEntry, alias_stacks, current_aliases
from lora_pipeline.registry.evidence import JobProgressReport, Submission
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.storage.local import LocalStore

from .lora_files import pair_bytes
from .test_alias_cli import cli, seeded_cli_store
from .test_aliases_and_tombstones import S, job, kohya_key, main_key


@pytest.fixture
def store(tmp_path, monkeypatch) -> LocalStore:
    return seeded_cli_store(tmp_path, monkeypatch)


def test_list_shows_each_styles_aliases(store):
    assert "aliases" not in cli("list").output
    assert json.loads(cli("list", "--json").output)[S]["aliases"] == {}
    cli("promote", S, "V2")
    cli("promote", S, "V3", "--alias", "staging")
    assert "\taliases: production → V2, staging → V3" in cli("list").output
    assert json.loads(cli("list", "--json").output)[S]["aliases"] == {"production": "V2", "staging": "V3"}


def test_unalias_removes_an_alias_in_one_recorded_move(store):
    cli("promote", S, "V1")
    cli("promote", S, "V2")
    cli("promote", S, "V3", "--alias", "staging")
    result = cli("unalias", S, "production", "--reason", "recall", "--by", "ana")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"{S} production: removed (it pointed at V2)"
    shown = json.loads(cli("aliases", S, "--json").output)
    assert shown["aliases"] == {"staging": "V3"}
    assert shown["history"][-1] | {"at": 0} == {
        "seq": 4,
        "alias": "production",
        "action": "remove",
        "version": "V2",
        "previous": "V2",
        "by": "ana",
        "at": 0,
        "reason": "recall",
    }
    assert "V2 → (removed)\tby ana\trecall" in cli("aliases", S).output
    assert json.loads(cli("list", "--json").output)[S]["aliases"] == {"staging": "V3"}
    # the version is no longer aliased: it can be deleted
    assert cli("delete", S, "V2").exit_code == 0
    # a removal is not rolled back; a promote sets the alias again, with a fresh history
    back = cli("rollback", S)
    assert back.exit_code == 1 and "geo production was removed (it pointed at V2)" in back.output
    again = json.loads(cli("promote", S, "V1", "--json").output)
    assert again == {"style": S, "alias": "production", "version": "V1", "previous": None, "moved": True}
    assert "no earlier version to roll back to" in cli("rollback", S).output
    assert json.loads(cli("unalias", S, "staging", "--json").output) == {
        "style": S,
        "alias": "staging",
        "removed": "V3",
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("unalias", S, "production"), "geo has no alias 'production' to remove (its aliases: staging)"),
        (("unalias", S, "Prod!"), "invalid alias name 'Prod!'"),
        (("unalias", "Bad Style", "production"), "Invalid value for 'STYLE'"),
        (("unalias", "nostyle", "production"), "style 'nostyle' has no registry document"),
        (("unalias", S), "Missing argument 'ALIAS'"),
    ],
)
def test_unalias_refuses_bad_input(store, args, message):
    cli("promote", S, "V3", "--alias", "staging")
    result = cli(*args)
    assert result.exit_code != 0 and message in result.output, result.output
    assert json.loads(cli("aliases", S, "--json").output)["aliases"] == {"staging": "V3"}


def test_unalias_twice_is_refused_and_writes_once(store):
    cli("promote", S, "V1")
    assert cli("unalias", S, "production").exit_code == 0
    etag = RegistryStore(store).read(S)[1]
    second = cli("unalias", S, "production")
    assert second.exit_code == 1 and "no alias 'production' to remove (its aliases: none)" in second.output
    assert RegistryStore(store).read(S)[1] == etag


def test_show_prints_a_running_versions_progress(store):
    registry = RegistryStore(store)
    now = datetime.now(UTC)
    registry.apply(S, [Submission(S, 5, "r5", job(5), "ab", {"rank": 5}, now - timedelta(minutes=5))])
    assert "progress" not in cli("show", S).output
    registry.apply(S, [JobProgressReport(job(5), now - timedelta(seconds=90), 120, 400, 0.08125, "training")])
    lines = cli("show", S).output.splitlines()
    line = lines[lines.index(next(x for x in lines if x.startswith("V5\t"))) + 1]
    assert line.startswith("\tprogress\tstep 120/400\tloss 0.08125\ttraining\theartbeat ")
    assert 89 <= int(line.split("heartbeat ")[1].split("s ago")[0]) <= 150 and "STALLED" not in line
    registry.apply(S, [JobProgressReport(job(5), now - timedelta(seconds=90), stalled="no heartbeat for 600 s")])
    assert "\tSTALLED: no heartbeat for 600 s" in cli("show", S).output


def _interrupted_delete(store, monkeypatch, version: str) -> None:
    """``registry delete`` that stops after its tombstone: no object is removed."""
    with monkeypatch.context() as patch:
        patch.setattr(LocalStore, "delete", lambda self, key: None)
        assert cli("delete", S, version).exit_code == 0
    assert json.loads(cli("show", S, "--json").output)["versions"][0]["status"] == "deleted"


def test_reconcile_removes_files_left_by_an_interrupted_delete(store, monkeypatch):
    _interrupted_delete(store, monkeypatch, "V1")
    assert store.head(main_key(1)) is not None and store.head(kohya_key(1)) is not None
    dry = cli("reconcile", "--no-poll", "--no-housekeeping", "--dry-run")
    assert dry.exit_code == 0 and f"would remove {main_key(1)} (left behind" in dry.output
    assert store.head(main_key(1)) is not None
    out = json.loads(cli("reconcile", "--no-poll", "--no-housekeeping", "--json").output)
    assert out["leftovers_removed"] == [main_key(1), kohya_key(1)] and out["problems"] == []
    assert store.head(main_key(1)) is None and store.head(kohya_key(1)) is None
    again = json.loads(cli("reconcile", "--no-poll", "--no-housekeeping", "--json").output)
    assert again["leftovers_removed"] == [] and again["changed_versions"] == 0
    record = json.loads(cli("show", S, "--json").output)["versions"][0]
    assert record["status"] == "deleted" and "file" not in record


def test_reconcile_keeps_a_file_uploaded_again_after_the_delete(store, monkeypatch):
    _interrupted_delete(store, monkeypatch, "V1")
    store.put(main_key(1), pair_bytes("diffusers", seed=41))  # a new upload: another ETag
    text = cli("reconcile", "--no-poll", "--no-housekeeping")
    assert text.exit_code == 0 and f"removed {kohya_key(1)}" in text.output and main_key(1) not in text.output
    assert store.head(main_key(1)) is not None and store.head(kohya_key(1)) is None
    document = json.loads(cli("show", S, "--json").output)
    assert document["versions"][0]["status"] == "deleted"
    assert main_key(1) in {f["key"] for f in document.get("supersededFiles", [])}
    assert json.loads(cli("reconcile", "--no-poll", "--no-housekeeping", "--json").output)["leftovers_removed"] == []


def test_a_remove_ends_the_alias_and_starts_its_stack_afresh():
    history = [
        AliasEntry(1, "production", "V1", "promote", "ana", 1),
        AliasEntry(2, "production", "V2", "promote", "ana", 2, "V1"),
        AliasEntry(3, "production", "V2", "remove", "ana", 3, "V2"),
        AliasEntry(4, "staging", "V2", "promote", "ana", 4),
    ]
    assert alias_stacks(history) == {"production": [], "staging": ["V2"]}
    assert current_aliases(reversed(history)) == {"staging": "V2"}  # order-independent: replayed by seq
    assert alias_stacks([*history, AliasEntry(5, "production", "V1", "promote", "bo", 5)])["production"] == ["V1"]
    raw = history[2].to_dict()
    assert raw["action"] == "remove" and AliasEntry.from_dict(raw) == history[2]


def test_list_and_show_name_each_versions_family_and_base_model(store):
    """The request's family and base model show from submission on; the file's header corrects them."""
    registry = RegistryStore(store)
    registry.apply(S, [Submission(S, 5, "r5", job(5), "ab", {}, datetime.now(UTC), "flux1", "/models/flux-dev")])
    line = next(x for x in cli("show", S).output.splitlines() if x.startswith("V5\t"))
    assert line.startswith(f"V5\tstarting\tflux1 on /models/flux-dev\t{job(5)}\t")
    assert next(x for x in cli("list").output.splitlines() if x.startswith(S)).startswith(
        f"{S}\tlatest V5 (flux1 on /models/flux-dev)\t"
    )
    listed = json.loads(cli("list", "--json").output)[S]
    assert (listed["latestFamily"], listed["latestBaseModel"]) == ("flux1", "/models/flux-dev")
    shown = json.loads(cli("show", S, "V5", "--json").output)
    assert (shown["family"], shown["familyFrom"], shown["baseModel"]) == ("flux1", "request", "/models/flux-dev")
    assert "\t- on -\t" in next(x for x in cli("show", S).output.splitlines() if x.startswith("V1\t"))
