"""Versions addressed by alias, as MLflow's ``models:/name@alias`` (issue 23): ``@production``
wherever a version is accepted, and one published pointer per alias
(``loras/<style>/<style>@<alias>.json``) that follows promotions, rollbacks and removals, written
conditionally so that neither a race nor a crash leaves it pointing at an older move."""

from __future__ import annotations

import json
import threading

import pytest
from click.testing import CliRunner

from lora_pipeline.cli import main
from lora_pipeline.lifecycle.reconcile import reconcile
from lora_pipeline.registry.models import UnknownVersion
from lora_pipeline.registry_store.alias_pointers import publish_alias_pointers
from lora_pipeline.registry_store.documents import Refused, RegistryStore
from lora_pipeline.storage import StoreUnavailable
from lora_pipeline.storage.keys import alias_pointer_key

from .test_alias_cli import seeded_cli_store
from .test_aliases_and_tombstones import S, kohya_key, main_key

POINTER = alias_pointer_key(S, "production")


@pytest.fixture
def store(tmp_path, monkeypatch):
    return seeded_cli_store(tmp_path, monkeypatch)


def cli(*args: str):
    return CliRunner().invoke(main, ["registry", *args])


def pointer(store) -> dict:
    return json.loads(store.get(POINTER).data)


def test_resolve_names_versions_and_aliases_and_says_what_is_wrong(store) -> None:
    registry = RegistryStore(store)
    registry.move_alias(S, "production", action="promote", version="V2", by="ana")
    document = registry.read(S)[0]
    assert [document.resolve(r).name for r in ("V2", "v3", "@production", "production", " @production ")] == [
        "V2",
        "V3",
        "V2",
        "V2",
        "V2",
    ]
    for ref, message in [
        ("@staging", "geo has no alias 'staging' (its aliases: @production)"),
        ("latest", "'latest' is not a version name like V3, nor an alias of geo (its aliases: @production)"),
        ("V9", "geo has no version V9 (it has: V1, V2, V3, V4)"),
    ]:
        with pytest.raises(UnknownVersion) as caught:
            document.resolve(ref)
        assert str(caught.value) == message


def test_download_url_show_and_promote_accept_an_alias(store, tmp_path) -> None:
    assert cli("promote", S, "V2").exit_code == 0
    assert cli("promote", S, "V3", "--alias", "staging").exit_code == 0

    out = tmp_path / "prod.safetensors"
    downloaded = cli("download", S, "@production", "--format", "diffusers", "-o", str(out), "--json")
    assert downloaded.exit_code == 0, downloaded.output
    assert json.loads(downloaded.stdout)["version"] == "V2" and out.read_bytes() == store.get(main_key(2)).data
    assert cli("download", S, "production", "-o", str(tmp_path / "k.safetensors")).exit_code == 0  # bare alias too
    assert (tmp_path / "k.safetensors").read_bytes() == store.get(kohya_key(2)).data

    url = cli("url", S, "@staging", "--format", "diffusers")
    assert url.exit_code == 0 and main_key(3).rsplit("/", 1)[-1] in url.output

    shown = cli("show", S, "@production", "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["name"] == "V2"
    assert cli("show", S, "@production").output.splitlines()[1].startswith("V2\tcompleted")

    promoted = cli("promote", S, "@staging")  # production → what staging points at
    assert promoted.exit_code == 0 and promoted.output.strip() == f"{S} production: V2 → V3"

    unknown = cli("download", S, "@nightly")
    assert (
        unknown.exit_code == 1
        and unknown.output.strip() == "Error: geo has no alias 'nightly' (its aliases: @production, @staging)"
    )


def test_the_published_pointer_follows_promote_rollback_and_remove(store) -> None:
    assert store.head(POINTER) is None
    assert cli("promote", S, "V1").exit_code == 0
    first = pointer(store)
    assert (first["style"], first["alias"], first["version"], first["action"]) == (S, "production", "V1", "promote")
    assert first["files"]["diffusers"]["key"] == main_key(1) and first["files"]["kohya"]["key"] == kohya_key(1)
    assert cli("promote", S, "V3").exit_code == 0
    assert pointer(store)["version"] == "V3"
    assert cli("rollback", S).exit_code == 0
    assert (pointer(store)["version"], pointer(store)["action"]) == ("V1", "rollback")
    assert cli("unalias", S, "production").exit_code == 0
    removed = pointer(store)
    assert (removed["version"], removed["files"], removed["action"]) == (None, {}, "remove")
    aliases = json.loads(cli("aliases", S, "--json").stdout)
    assert aliases["pointers"]["production"]["key"] == POINTER


def test_a_slow_writer_never_puts_back_an_older_pointer(store) -> None:
    registry = RegistryStore(store)
    older = registry.move_alias(S, "production", action="promote", version="V1", by="ana").document
    registry.move_alias(S, "production", action="promote", version="V2", by="bo")
    assert publish_alias_pointers(store, older, registry.primary) == []  # the move of V1 arrives late
    assert pointer(store)["version"] == "V2"


def test_concurrent_promotes_leave_the_pointer_at_the_last_move(store) -> None:
    registry = RegistryStore(store)
    start = threading.Barrier(6)

    def move(version: str) -> None:
        start.wait()
        registry.move_alias(S, "production", action="promote", version=version, by=version)

    threads = [threading.Thread(target=move, args=(v,)) for v in ("V1", "V2", "V3") * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    document = registry.read(S)[0]
    last = document.alias_history[-1]
    assert (pointer(store)["version"], pointer(store)["seq"]) == (document.aliases["production"], last.seq)


def test_a_crash_between_the_document_and_the_pointer_is_repaired_by_reconcile(store, monkeypatch) -> None:
    assert cli("promote", S, "V1").exit_code == 0
    real_put = type(store).put

    def put(self, key, data, **kwargs):  # noqa: ANN001, ANN003, ANN202
        if key == POINTER:
            raise StoreUnavailable("the store went away")
        return real_put(self, key, data, **kwargs)

    monkeypatch.setattr(type(store), "put", put)
    moved = cli("promote", S, "V2")
    assert moved.exit_code == 0  # the move stands (the document is the truth)
    assert f"warning: the alias pointer {POINTER} was not updated" in moved.stderr
    assert RegistryStore(store).read(S)[0].aliases == {"production": "V2"} and pointer(store)["version"] == "V1"
    monkeypatch.setattr(type(store), "put", real_put)

    report = reconcile(store)
    assert report.pointers_published == [POINTER] and pointer(store)["version"] == "V2"
    assert reconcile(store).pointers_published == []  # published once


def test_promote_refuses_an_unknown_alias_target(store) -> None:
    with pytest.raises(Refused, match="geo has no alias 'staging'"):
        RegistryStore(store).move_alias(S, "production", action="promote", version="@staging", by="ana")


def test_compare_takes_aliases_and_refuses_one_version_twice(store) -> None:
    from lora_pipeline.worker.compare import ComparisonError, comparison_version, render_comparison

    RegistryStore(store).move_alias(S, "production", action="promote", version="V2", by="ana")
    assert comparison_version(store, S, "@production")[0].name == "V2"
    with pytest.raises(ComparisonError, match=r"^V2 and @production are both geo V2: compare two different versions$"):
        render_comparison(store, S, "V2", "@production")


def test_compare_sets_the_versions_facts_and_differing_params_side_by_side(store) -> None:
    from lora_pipeline.worker.compare import side_by_side

    document = RegistryStore(store).read(S)[0]
    first, second = document.resolve("V1"), document.resolve("V2")
    rows = {what: (a, b) for what, a, b in side_by_side(first, second)}
    assert rows["rank"] == ("1", "2")  # differing params only: the seeded versions differ in rank
    assert rows["dataset"] == ("ab", "ab") and set(rows) >= {"base model", "steps", "final loss"}
    assert "num_sample_images" not in rows and "learning_rate" not in rows


def test_registry_card_prints_a_versions_model_card_by_name_or_alias(store) -> None:
    assert cli("promote", S, "V2", "--reason", "best").exit_code == 0
    by_alias = cli("card", S, "@production")
    assert by_alias.exit_code == 0, by_alias.output
    card = by_alias.stdout
    assert card.startswith(f"# {S} V2\n") and "| aliases | @production |" in card
    for section in ("## Training parameters", "## Dataset", "## Files", "## Lineage"):
        assert section in card
    assert "| rank | 2 |" in card and main_key(2) in card and kohya_key(2) in card
    assert cli("card", S, "V2").stdout == card
    assert cli("card", S, "@nightly").output.strip() == "Error: geo has no alias 'nightly' (its aliases: @production)"


def test_show_prints_no_heartbeat_under_a_finished_version(store) -> None:
    """Issue 23: "progress step 0 training heartbeat 615s ago" under a completed version."""
    from datetime import UTC, datetime

    from lora_pipeline.registry.evidence import JobProgressReport, Submission

    from .test_aliases_and_tombstones import job

    registry = RegistryStore(store)
    now = datetime.now(UTC)
    registry.apply(S, [JobProgressReport(job(1), now, step=0, total=30, phase="training")])
    registry.apply(S, [Submission(S, 5, "r5", job(5), "ab", {"rank": 5}, now)])
    registry.apply(S, [JobProgressReport(job(5), now, step=3, total=30, phase="training")])
    lines = cli("show", S).output.splitlines()
    v1 = lines.index(next(line for line in lines if line.startswith("V1\t")))
    assert not lines[v1 + 1].startswith("\tprogress")  # V1 is completed: its last heartbeat says nothing
    v5 = lines.index(next(line for line in lines if line.startswith("V5\t")))
    assert lines[v5 + 1].startswith("\tprogress\tstep 3/30")
