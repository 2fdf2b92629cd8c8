"""Aliases (promote, roll back) and tombstones (delete, retention) on a store: each is one
conditional write of the style's document through the merge; a deleted version never comes back
(late webhook, re-uploaded file, reconciliation) and its number is never reused."""

from __future__ import annotations

import json
from collections.abc import Callable
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_pipeline.lifecycle.reconcile import reconcile
from lora_pipeline.lifecycle.versions import prune_versions
from lora_pipeline.registry.evidence import AliasMove, JobReport, StoredLora, Submission, VersionDeleted
from lora_pipeline.registry.merge import merge, next_version_number
from lora_pipeline.registry.models import RegistryDocument, VersionStatus
from lora_pipeline.registry_store.documents import AliasResult, DeleteResult, Refused, RegistryStore
from lora_pipeline.storage.keys import registry_key

from .lora_files import at, pair_bytes
from .test_merge_properties import STYLE as P_STYLE
from .test_merge_properties import evidence_lists, minutes, numbers

S = "geo"


def job(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}-e1"


def main_key(n: int) -> str:
    return f"loras/{S}/{S}_v{n}.safetensors"


def kohya_key(n: int) -> str:
    return f"loras/{S}/{S}_v{n}_kohya.safetensors"


def move_alias(store, style: str, alias: str, **kwargs) -> AliasResult:
    return RegistryStore(store).move_alias(style, alias, **kwargs)


def delete_version(store, style: str, version: str, **kwargs) -> DeleteResult:
    return RegistryStore(store).delete_version(style, version, **kwargs)


def all_at_once(act: Callable[[int], None], n: int) -> list[BaseException]:
    """``act(0)`` … ``act(n - 1)`` in ``n`` threads released together; what they raised."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            act(i)
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def seed(store, completed=(1, 2, 3), failed=(4,)) -> RegistryStore:
    """Versions with a job each: ``completed`` ones with both files in the store, ``failed`` ones without."""
    registry = RegistryStore(store)
    for n in (*completed, *failed):
        registry.apply(S, [Submission(S, n, f"r{n}", job(n), "ab", {"rank": n}, at(n))])
    for n in completed:
        store.put(main_key(n), pair_bytes("diffusers", seed=n))
        store.put(kohya_key(n), pair_bytes("kohya", seed=n))
    for n in failed:
        registry.apply(S, [JobReport(job(n), "FAILED", None, "CUDA out of memory", 1, 2, at(10), "webhook")])
    reconcile(store)
    return registry


def read(store) -> RegistryDocument:
    return RegistryStore(store).read(S)[0]


# -- aliases -----------------------------------------------------------------------------------------


def test_promote_records_who_when_why_and_the_index_carries_the_urls(local_store):
    seed(local_store)
    result = move_alias(
        local_store, S, "production", action="promote", version="v2", by="ana", reason="best FID", at=at(60)
    )
    assert (result.version, result.previous, result.moved) == ("V2", None, True)
    stored = json.loads(local_store.get(registry_key(S)).data)
    assert stored["aliases"] == {"production": "V2"}
    assert stored["aliasHistory"] == [
        {
            "seq": 1,
            "alias": "production",
            "action": "promote",
            "version": "V2",
            "previous": None,
            "by": "ana",
            "at": int(at(60).timestamp() * 1000),
            "reason": "best FID",
        }
    ]
    index, _ = RegistryStore(local_store).fresh_index()
    pointer = index.styles[S].aliases["production"]
    assert pointer.version == "V2" and pointer.by == "ana"
    assert pointer.s3_key == kohya_key(2) and pointer.lora_url and pointer.lora_url.endswith(kohya_key(2))
    assert {layout: f["key"] for layout, f in pointer.files.items()} == {
        "diffusers": main_key(2),
        "kohya": kohya_key(2),
    }
    raw_index = json.loads(local_store.get("registry/index.json").data)["styles"][S]
    assert raw_index["aliases"]["production"]["version"] == "V2"
    assert raw_index["latestVersion"] == "V4" and raw_index["statuses"] == {"completed": 3, "failed": 1}


def test_promote_again_to_the_same_version_writes_nothing(local_store):
    seed(local_store)
    move_alias(local_store, S, "production", action="promote", version="V2", by="ana")
    etag = local_store.head(registry_key(S)).etag
    again = move_alias(local_store, S, "production", action="promote", version="V2", by="bo")
    assert not again.moved and local_store.head(registry_key(S)).etag == etag


@pytest.mark.parametrize(
    ("alias", "version", "message"),
    [
        ("production", "V9", "geo has no version V9 (it has: V1, V2, V3, V4)"),
        ("production", "latest", "'latest' is not a version name"),
        ("production", "V4", "geo V4 is failed: only a completed version"),
        ("Prod!", "V1", "invalid alias name 'Prod!'"),
    ],
)
def test_promote_refuses_with_a_clear_message(local_store, alias, version, message):
    seed(local_store)
    with pytest.raises(Refused, match=message.replace("(", r"\(").replace(")", r"\)")):
        move_alias(local_store, S, alias, action="promote", version=version, by="ana")
    assert read(local_store).alias_history == ()


def test_promote_refuses_a_version_whose_file_is_gone_or_broken(local_store):
    seed(local_store)
    local_store.put(main_key(1), b"not a lora")
    with pytest.raises(Refused, match="not a readable safetensors LoRA"):
        move_alias(local_store, S, "production", action="promote", version="V1", by="ana")
    local_store.delete(kohya_key(2))
    with pytest.raises(Refused, match=f"{kohya_key(2)} is missing"):
        move_alias(local_store, S, "production", action="promote", version="V2", by="ana")


def test_promote_on_an_unknown_style_is_refused(local_store):
    with pytest.raises(Refused, match="'nobody' has no registry document"):
        move_alias(local_store, "nobody", "production", action="promote", version="V1", by="ana")


def test_rollback_walks_back_the_history_and_refuses_when_there_is_nothing_before(local_store):
    seed(local_store)
    with pytest.raises(Refused, match="geo has no alias 'production' to roll back"):
        move_alias(local_store, S, "production", action="rollback", by="ana")
    move_alias(local_store, S, "production", action="promote", version="V1", by="ana", at=at(60))
    with pytest.raises(Refused, match="no earlier version to roll back to"):
        move_alias(local_store, S, "production", action="rollback", by="ana")
    move_alias(local_store, S, "production", action="promote", version="V2", by="ana", at=at(61))
    move_alias(local_store, S, "staging", action="promote", version="V3", by="bo", at=at(62))
    back = move_alias(local_store, S, "production", action="rollback", by="cy", reason="artifacts", at=at(63))
    assert (back.version, back.previous) == ("V1", "V2")
    move_alias(local_store, S, "production", action="promote", version="V3", by="ana", at=at(64))
    assert move_alias(local_store, S, "production", action="rollback", by="cy", at=at(65)).version == "V1"
    doc = read(local_store)
    assert doc.aliases == {"production": "V1", "staging": "V3"}
    assert [(e.seq, e.alias, e.action, e.version, e.previous, e.by) for e in doc.alias_history] == [
        (1, "production", "promote", "V1", None, "ana"),
        (2, "production", "promote", "V2", "V1", "ana"),
        (3, "staging", "promote", "V3", None, "bo"),
        (4, "production", "rollback", "V1", "V2", "cy"),
        (5, "production", "promote", "V3", "V1", "ana"),
        (6, "production", "rollback", "V1", "V3", "cy"),
    ]


def test_rollback_to_a_deleted_version_is_refused(local_store):
    seed(local_store)
    move_alias(local_store, S, "production", action="promote", version="V1", by="ana")
    move_alias(local_store, S, "production", action="promote", version="V2", by="ana")
    delete_version(local_store, S, "V1", by="bo")  # allowed: production points at V2
    with pytest.raises(Refused, match="geo V1 is deleted: only a completed version"):
        move_alias(local_store, S, "production", action="rollback", by="ana")
    assert read(local_store).aliases == {"production": "V2"}


def test_racing_promotions_lose_no_update_and_the_history_shows_each_in_order(store):
    seed(store, completed=(1, 2), failed=())

    def promote(i: int) -> None:
        move_alias(store, S, "production", action="promote", version=f"V{1 + i % 2}", by=f"u{i}")

    assert all_at_once(promote, 6) == []
    history = read(store).alias_history
    assert [e.seq for e in history] == list(range(1, len(history) + 1))
    # Each recorded move saw the one before it: where it pointed is the previous entry's version.
    assert [e.previous for e in history] == [None, *[e.version for e in history[:-1]]]
    assert all(e.version != e.previous for e in history)
    assert read(store).aliases["production"] == history[-1].version


def test_a_removal_racing_promotions_is_ordered_and_the_alias_follows_the_last_move(store):
    """Removes and promotes of one alias at once: each move is one conditional write, so the
    history is gap-free, a remove names what it removed, and the alias ends where the last move
    left it (absent after a remove). A remove that finds the alias gone is refused, not lost."""
    seed(store, completed=(1, 2), failed=())
    move_alias(store, S, "production", action="promote", version="V1", by="seed")

    def act(i: int) -> None:
        if i % 2:
            move_alias(store, S, "production", action="remove", by=f"u{i}")
        else:
            move_alias(store, S, "production", action="promote", version=f"V{1 + i % 4 // 2}", by=f"u{i}")

    errors = all_at_once(act, 6)
    assert all(isinstance(e, Refused) and "no alias 'production' to remove" in str(e) for e in errors), errors
    history = read(store).alias_history
    assert [e.seq for e in history] == list(range(1, len(history) + 1))
    pointing: str | None = None
    for e in history:  # each move saw the one before it
        if e.action == "remove":
            assert pointing is not None and e.version == e.previous == pointing
            pointing = None
        else:
            assert e.previous == pointing and e.version != pointing
            pointing = e.version
    assert read(store).aliases.get("production") == pointing


# -- delete and tombstones ---------------------------------------------------------------------------


def test_delete_refuses_an_aliased_version_and_an_unknown_one(local_store):
    seed(local_store)
    move_alias(local_store, S, "production", action="promote", version="V2", by="ana")
    with pytest.raises(Refused, match="geo V2 is what production point"):
        delete_version(local_store, S, "V2", by="ana")
    with pytest.raises(Refused, match="geo has no version V7"):
        delete_version(local_store, S, "V7", by="ana")
    assert local_store.head(main_key(2)) is not None


def test_delete_dry_run_changes_nothing(local_store):
    seed(local_store)
    etag = local_store.head(registry_key(S)).etag
    result = delete_version(local_store, S, "V1", by="ana", dry_run=True)
    assert result.removed == [main_key(1), kohya_key(1)] and result.dry_run
    assert local_store.head(registry_key(S)).etag == etag and local_store.head(main_key(1)) is not None


def test_delete_removes_every_file_and_leaves_a_tombstone_nothing_resurrects(local_store):
    registry = seed(local_store)
    result = delete_version(local_store, S, "v1", by="ana", reason="leaks a logo", at=at(70))
    assert result.version == "V1" and result.removed == [main_key(1), kohya_key(1)]
    assert local_store.head(main_key(1)) is None and local_store.head(kohya_key(1)) is None
    record = json.loads(local_store.get(registry_key(S)).data)["versions"][0]
    assert record["status"] == "deleted" and record["loraUrl"] is None and "files" not in record
    assert record["deleted"]["by"] == "ana" and record["deleted"]["reason"] == "leaks a logo"
    assert sorted(f["key"] for f in record["deleted"]["files"]) == [main_key(1), kohya_key(1)]
    assert record["jobIds"] == [job(1)]  # the job stays known: its late webhook is routed, and ignored

    # A late COMPLETED webhook, the same files uploaded again, and two reconciliations.
    registry.apply(S, [JobReport(job(1), "COMPLETED", {"lora_key": main_key(1)}, None, 1, 2, at(80), "webhook")])
    local_store.put(main_key(1), pair_bytes("diffusers", seed=1))
    local_store.put(kohya_key(1), pair_bytes("kohya", seed=1))
    reconcile(local_store)
    second = reconcile(local_store)
    assert second.changed_versions == 0 and second.headers_read == 0 and second.styles_read == 0
    doc = read(local_store)
    v1 = doc.version("V1")
    assert v1 is not None and v1.status is VersionStatus.deleted and v1.file is None and v1.companions == ()
    assert sorted(f.key for f in doc.superseded_files) == [main_key(1), kohya_key(1)]  # accounted, not V1's
    # Its number is never reused.
    assert next_version_number(doc) == 5
    claim = registry.claim_version(
        S, request_id="r1", dataset_hash="ab", params={"rank": 1}, owner="me", lease=at(1) - at(0)
    )
    assert claim.kind == "claimed" and claim.version.number == 5


def test_a_reconciliation_after_the_files_went_reads_nothing_again(local_store):
    seed(local_store)
    delete_version(local_store, S, "V3", by="ana")
    reconcile(local_store)
    again = reconcile(local_store)
    assert again.styles_read == 0 and again.headers_read == 0 and again.changed_versions == 0


def test_an_interrupted_delete_is_finished_by_deleting_again(local_store):
    registry = seed(local_store)
    doc = read(local_store)
    v1 = doc.version("V1")
    assert v1 is not None and v1.file is not None
    files = tuple((f.key, f.etag, f.last_modified) for f in (v1.file, *v1.companions))
    registry.apply(S, [VersionDeleted(S, 1, "ana", at(70), "crashed before the files went", files)])
    # lists the files still there: they are the deleted ones (a real run removes them: test_registry_product_cli)
    assert reconcile(local_store, dry_run=True).leftovers_removed == [main_key(1), kohya_key(1)]
    assert read(local_store).version("V1").status is VersionStatus.deleted  # type: ignore[union-attr]
    result = delete_version(local_store, S, "V1", by="bo")
    assert result.already_deleted and result.removed == [main_key(1), kohya_key(1)]
    assert local_store.head(main_key(1)) is None
    assert read(local_store).version("V1").deletion.by == "ana"  # type: ignore[union-attr]


def test_two_racing_deletes_leave_one_tombstone_and_no_file(store):
    seed(store)
    results = []

    def delete(i: int) -> None:
        results.append(delete_version(store, S, "V1", by=("ana", "bo")[i]))

    assert all_at_once(delete, 2) == [] and len(results) == 2
    v1 = read(store).version("V1")
    assert v1 is not None and v1.status is VersionStatus.deleted and v1.deletion is not None
    assert {k for k, _, _ in v1.deletion.files} == {main_key(1), kohya_key(1)}
    assert store.head(main_key(1)) is None and store.head(kohya_key(1)) is None


def test_a_promotion_racing_a_delete_never_leaves_an_alias_on_a_deleted_version(local_store):
    seed(local_store)
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def promote() -> None:
        barrier.wait()
        try:
            move_alias(local_store, S, "production", action="promote", version="V1", by="ana")
            outcomes.append("promoted")
        except Refused:
            outcomes.append("promote refused")

    def delete() -> None:
        barrier.wait()
        try:
            delete_version(local_store, S, "V1", by="bo")
            outcomes.append("deleted")
        except Refused:
            outcomes.append("delete refused")

    threads = [threading.Thread(target=promote), threading.Thread(target=delete)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    doc = read(local_store)
    v1 = doc.version("V1")
    assert v1 is not None
    assert sorted(outcomes) in (["delete refused", "promoted"], ["deleted", "promote refused"])
    assert (doc.aliases.get("production") == "V1") == (v1.status is VersionStatus.completed)


def test_the_tombstone_wins_in_every_order():
    base = RegistryDocument(S)
    stored = StoredLora(S, main_key(1), 1, "https://x/" + main_key(1), 100, "e1", {}, at(1), "diffusers", None)
    later = StoredLora(S, main_key(1), 1, "https://x/" + main_key(1), 100, "e2", {}, at(9), "diffusers", None)
    tomb = VersionDeleted(S, 1, "ana", at(5), "why", ((main_key(1), "e1", int(at(1).timestamp() * 1000)),))
    move = AliasMove(S, "production", 1, "promote", "ana", at(2), 1)
    evidence = [
        Submission(S, 1, "r1", job(1), "ab", {}, at(0)),
        stored,
        tomb,
        later,
        move,
        JobReport(job(1), "COMPLETED", None, None, 1, 2, at(8), "webhook"),
    ]
    docs = [merge(base, order) for order in (evidence, evidence[::-1], evidence[2:] + evidence[:2])]
    assert docs[0] == docs[1] == docs[2]
    (v1,) = docs[0].versions
    assert v1.status is VersionStatus.deleted and v1.file is None
    assert [f.etag for f in docs[0].superseded_files] == ["e2"]  # the later upload: accounted, not V1's
    assert merge(docs[0], []) == docs[0] and merge(docs[0], evidence) == docs[0]
    assert docs[0].alias_history[0].version == "V1"


# -- retention ---------------------------------------------------------------------------------------


def test_retention_keeps_the_last_n_completed_and_every_aliased_version(local_store):
    seed(local_store, completed=(1, 2, 3, 4), failed=(5,))
    move_alias(local_store, S, "production", action="promote", version="V1", by="ana")
    dry = prune_versions(local_store, 2, dry_run=True)
    assert dry.deleted == {S: ["V2"]} and dry.kept_aliased == {S: ["V1"]} and dry.total == 1
    assert local_store.head(main_key(2)) is not None
    report = prune_versions(local_store, 2)
    assert report.deleted == {S: ["V2"]} and sorted(report.removed) == [main_key(2), kohya_key(2)]
    statuses = {v.name: v.status.value for v in read(local_store).versions}
    assert statuses == {"V1": "completed", "V2": "deleted", "V3": "completed", "V4": "completed", "V5": "failed"}
    assert read(local_store).version("V2").deletion.by == "retention"  # type: ignore[union-attr]
    assert prune_versions(local_store, 2).total == 0
    assert prune_versions(local_store, 0).total == 0


# -- merge properties with tombstones and alias moves -------------------------------------------------

tombstones = st.builds(
    lambda n, m, spelling, etag, m2, by: VersionDeleted(
        P_STYLE,
        n,
        by,
        at(m),
        "why",
        ((f"loras/{P_STYLE}/{P_STYLE}_{spelling}{n}.safetensors", etag, int(at(m2).timestamp() * 1000)),),
    ),
    numbers,
    minutes,
    st.sampled_from(["v", "vV"]),
    st.sampled_from(["e1", "e2"]),
    minutes,
    st.sampled_from(["a", "b"]),
)
alias_moves = st.builds(
    lambda alias, n, action, m, seq, previous: AliasMove(P_STYLE, alias, n, action, "ana", at(m), seq, previous),
    st.sampled_from(["production", "staging"]),
    numbers,
    st.sampled_from(["promote", "rollback"]),
    minutes,
    st.integers(1, 4),
    st.sampled_from([None, "V1", "V2"]),
)
operator_lists = st.builds(lambda a, b: a + b, evidence_lists, st.lists(st.one_of(tombstones, alias_moves), max_size=4))


@settings(max_examples=200, deadline=None)
@given(operator_lists, st.randoms(use_true_random=False))
def test_tombstones_and_alias_moves_keep_the_merge_idempotent_and_order_independent(evidence, random):
    once = merge(RegistryDocument(P_STYLE), evidence)
    shuffled = list(evidence)
    random.shuffle(shuffled)
    assert merge(RegistryDocument(P_STYLE), shuffled).to_json() == once.to_json()
    assert merge(once, evidence).to_json() == once.to_json() and merge(once, []).to_json() == once.to_json()
    for item in evidence:
        if isinstance(item, VersionDeleted):
            version = once.version(item.version_number)
            assert version is not None and version.status is VersionStatus.deleted and version.file is None


def test_housekeeping_removes_a_deleted_versions_checkpoints_at_once(local_store):
    from lora_pipeline.lifecycle.housekeeping import housekeep

    seed(local_store)
    key = f"checkpoints/{S}/V4/r4/step_10.safetensors"  # V4 failed: its young checkpoints are kept
    local_store.put(key, b"x")
    housekeep(local_store)
    assert local_store.head(key) is not None
    delete_version(local_store, S, "V4", by="ana")
    housekeep(local_store)
    assert local_store.head(key) is None


def test_a_completed_webhook_through_the_inbox_after_the_delete_leaves_the_version_deleted(local_store):
    from lora_pipeline.lifecycle.reconcile import process_inbox
    from lora_pipeline.webhook.inbox import write_webhook

    seed(local_store)
    delete_version(local_store, S, "V2", by="ana")
    body = {"id": job(2), "status": "COMPLETED", "output": {"style": S, "lora_key": main_key(2)}}
    assert write_webhook(local_store, json.dumps(body).encode())
    report = process_inbox(local_store)
    assert len(report.webhooks_applied) == 1
    assert [(c.before, c.after, c.fields) for c in report.changes] == [("deleted", "deleted", ("jobStatus",))]
    reconcile(local_store)
    v2 = read(local_store).version("V2")
    assert v2 is not None and v2.status is VersionStatus.deleted and v2.id == job(2)


def test_a_deleted_legacy_version_names_no_url():
    from lora_pipeline.registry.evidence import LegacyRecord

    record = {"id": job(1), "name": "V1", "status": "completed", "loraUrl": f"https://x.example.com/{kohya_key(1)}"}
    doc = merge(RegistryDocument(S), [LegacyRecord(S, record), VersionDeleted(S, 1, "ana", at(5))])
    stored = doc.to_dict()["versions"][0]
    assert stored["status"] == "deleted" and stored["loraUrl"] is None and "legacyLoraUrl" not in stored


def test_retention_keeps_each_aliass_history_back_to_its_last_remove(local_store):
    """Issue 22, defect 3: what a rollback can return to survives; what lies before a remove does not."""
    seed(local_store, completed=(1, 2, 3, 4, 5, 6))
    for alias, version, action in [
        ("production", "V1", "promote"),
        ("production", "V2", "remove"),
        ("production", "V2", "promote"),
        ("production", "V3", "promote"),
        ("staging", "V4", "promote"),
    ]:
        move_alias(local_store, S, alias, action=action, version=None if action == "remove" else version, by="ana")
    report = prune_versions(local_store, 1)
    assert report.deleted == {S: ["V5", "V1"]}  # V1 lies before production's remove: no rollback reaches it
    assert report.kept_aliased == {S: ["V4", "V3", "V2"]}
    statuses = {v.name: v.status.value for v in read(local_store).versions}
    assert [n for n, s in statuses.items() if s == "deleted"] == ["V1", "V5"]
    assert move_alias(local_store, S, "production", action="rollback", by="ana").version == "V2"


def test_retention_refuses_a_rollback_target_under_the_documents_write(local_store):
    """The check runs in the conditional write, so a promote between retention's read and its delete
    (which makes the old target a rollback target) wins."""
    seed(local_store, completed=(1, 2, 3))
    move_alias(local_store, S, "production", action="promote", version="V1", by="ana")
    move_alias(local_store, S, "production", action="promote", version="V2", by="ana")
    registry = RegistryStore(local_store)
    with pytest.raises(Refused, match="rollback history of production"):
        registry.delete_version(S, "V1", by="retention", keep_rollback_targets=True)
    assert registry.delete_version(S, "V1", by="ana").version == "V1"  # an operator's delete still may
