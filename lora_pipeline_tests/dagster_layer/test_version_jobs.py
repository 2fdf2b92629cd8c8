"""The promote_lora_version and delete_lora_version jobs, and the version retention of
reconcile_registry, run in process with config against a local store."""

from __future__ import annotations

import dagster as dg
import pytest

from lora_pipeline.definitions import defs
from lora_pipeline.registry.models import VersionStatus
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline_tests.registry.test_aliases_and_tombstones import S, main_key, seed


def run(instance, job: str, op: str, config: dict, tags: dict | None = None) -> dg.ExecuteInProcessResult:
    return defs.resolve_job_def(job).execute_in_process(
        instance=instance, run_config={"ops": {op: {"config": config}}}, raise_on_error=False, tags=tags
    )


def promote(instance, **config) -> dg.ExecuteInProcessResult:
    return run(instance, "promote_lora_version", "move_lora_alias", {"style": S, **config})


def failure(result: dg.ExecuteInProcessResult) -> str:
    [event] = [e for e in result.all_events if e.is_step_failure]
    return str(event.step_failure_data.user_failure_data.description)  # type: ignore[union-attr]


def test_promote_then_rollback_records_the_run_as_who(store, instance):
    seed(store)
    first = promote(instance, version="V1", reason="first cut")
    assert first.success
    second = run(
        instance,
        "promote_lora_version",
        "move_lora_alias",
        {"style": S, "version": "V2"},
        tags={"dagster/user": "ana@example.com"},
    )
    assert second.success
    back = promote(instance, action="rollback", reason="regression")
    assert back.success
    doc, _ = RegistryStore(store).read(S)
    assert doc.aliases == {"production": "V1"}
    who = [e.by for e in doc.alias_history]
    assert who == [f"dagster run {first.run_id}", "ana@example.com", f"dagster run {back.run_id}"]
    assert [e.reason for e in doc.alias_history] == ["first cut", None, "regression"]


def test_remove_action_unsets_the_alias_and_records_it(store, instance):
    seed(store)
    assert promote(instance, version="V2").success
    removed = promote(instance, action="remove", reason="pulled")
    assert removed.success
    [materialized] = [e for e in removed.all_events if e.event_type_value == "STEP_OUTPUT"]
    metadata = materialized.event_specific_data.metadata  # type: ignore[union-attr]
    assert (metadata["version"].value, metadata["previous"].value) == ("", "V2")
    doc, _ = RegistryStore(store).read(S)
    assert doc.aliases == {}
    assert [(e.action, e.reason) for e in doc.alias_history][-1] == ("remove", "pulled")
    again = promote(instance, action="remove")
    assert not again.success and "remove refused" in failure(again)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"action": "rollback"}, "rollback refused: geo has no alias 'production' to roll back"),
        ({"action": "rollback", "alias": "staging"}, "rollback refused: geo has no alias 'staging'"),
    ],
)
def test_promote_job_refusals_fail_the_run_with_the_reason(store, instance, config, message):
    seed(store)
    result = promote(instance, **config)
    assert not result.success
    assert message in failure(result)
    assert RegistryStore(store).read(S)[0].alias_history == ()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"version": "V9"}, "promote_lora_version config: geo has no version V9 (it has: V1, V2, V3, V4)"),
        ({"version": "V4"}, "promote_lora_version config: geo V4 is failed: only a completed version can be promoted"),
        ({"version": "@staging"}, "promote_lora_version config: geo has no alias 'staging' (its aliases: none)"),
        ({"version": "V1", "alias": "Bad Alias"}, "promote_lora_version config: invalid alias name 'Bad Alias'"),
        ({}, "promote_lora_version config: version: promote needs a version, e.g. V3, or an alias as @staging"),
        ({"version": "V1", "style": "no/such"}, "promote_lora_version config: invalid style name 'no/such'"),
    ],
)
def test_a_bad_promote_is_refused_at_launch_in_one_line(store, instance, config, message):
    """Issue 23: a wrong version failed only after launch; the config mapping refuses it when the
    run is created, as trained_lora's params are, and no run exists."""
    seed(store)
    with pytest.raises(dg.DagsterInvalidConfigError) as caught:
        promote(instance, **config)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    assert instance.get_runs() == [] and RegistryStore(store).read(S)[0].alias_history == ()


def test_delete_job_refuses_an_aliased_version_and_deletes_another(store, instance):
    seed(store)
    assert promote(instance, version="V2").success
    refused = run(instance, "delete_lora_version", "delete_lora_version_op", {"style": S, "version": "V2"})
    assert not refused.success and "V2 is what production point" in failure(refused)
    dry = run(instance, "delete_lora_version", "delete_lora_version_op", {"style": S, "version": "V1", "dry_run": True})
    assert dry.success and store.head(main_key(1)) is not None
    done = run(
        instance, "delete_lora_version", "delete_lora_version_op", {"style": S, "version": "V1", "reason": "off-brand"}
    )
    assert done.success and store.head(main_key(1)) is None
    v1 = RegistryStore(store).read(S)[0].version("V1")
    assert v1 is not None and v1.status is VersionStatus.deleted and v1.deletion is not None
    assert (v1.deletion.by, v1.deletion.reason) == (f"dagster run {done.run_id}", "off-brand")


def test_reconcile_job_applies_the_version_retention(store, instance):
    seed(store, completed=(1, 2, 3), failed=())
    assert promote(instance, version="V1").success
    config = {"poll_status": False, "keep_versions": 1}
    dry = run(instance, "reconcile_registry", "reconcile_registry_op", {**config, "dry_run": True})
    assert dry.success and store.head(main_key(2)) is not None
    result = run(instance, "reconcile_registry", "reconcile_registry_op", config)
    assert result.success
    statuses = {v.name: v.status for v in RegistryStore(store).read(S)[0].versions}
    assert statuses == {"V1": VersionStatus.completed, "V2": VersionStatus.deleted, "V3": VersionStatus.completed}


def test_the_jobs_are_registered():
    assert {"promote_lora_version", "delete_lora_version"} <= {j.name for j in defs.resolve_all_job_defs()}


def _observations(instance, style: str) -> list[dg.AssetObservation]:
    records = instance.fetch_observations(dg.AssetKey("lora_registry"), limit=20).records
    return [r.asset_observation for r in records if r.partition_key == style]


def test_alias_moves_and_deletes_show_on_the_registry_asset_as_observations(store, instance):
    seed(store)
    instance.add_dynamic_partitions("styles", [S])
    assert promote(instance, version="V2", reason="best FID").success
    assert promote(instance, version="V2").success  # unchanged: nothing new to show
    done = run(instance, "delete_lora_version", "delete_lora_version_op", {"style": S, "version": "V1"})
    assert done.success
    observed = _observations(instance, S)
    assert [o.metadata["change"].value for o in observed] == [
        f"{S} V1: deleted 2 file(s)",
        f"{S} production: (new) → V2",
    ]
    aliases = observed[-1].metadata["aliases"].value
    assert f"| production | V2 | `{S}_v2_kohya.safetensors` | promote by run " in aliases
    assert aliases.rstrip().endswith(": best FID |")
    assert "| V1 | deleted |" in observed[0].metadata["versions_table"].value


def test_a_style_without_a_partition_is_changed_but_not_observed(store, instance):
    seed(store)
    assert promote(instance, version="V1").success
    assert RegistryStore(store).read(S)[0].aliases == {"production": "V1"}
    assert _observations(instance, S) == []


def test_the_registry_materialization_lists_the_aliases(store, instance):
    from lora_pipeline.defs.assets.lora_registry import aliases_markdown

    seed(store)
    document = RegistryStore(store).read(S)[0]
    assert aliases_markdown(document, "kohya").startswith("no aliases")
    assert promote(instance, version="V3").success
    document = RegistryStore(store).read(S)[0]
    assert f"| production | V3 | `{S}_v3_kohya.safetensors` |" in aliases_markdown(document, "kohya")
    assert f"`{S}_v3.safetensors`" in aliases_markdown(document, "diffusers")
