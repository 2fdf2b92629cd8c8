"""Alias moves and deletions made outside Dagster (the CLI, code) show in the UI (issue 23):
``registry_change_sensor`` observes ``lora_registry[style]`` when the partition's latest event
shows an older state, once per change, and never for what a job already observed."""

from __future__ import annotations

from click.testing import CliRunner

import dagster as dg

from lora_pipeline.cli import main
from lora_pipeline.defs.registry_sensor import registry_change_sensor, shown_state
from lora_pipeline.storage import StoreUnavailable
from lora_pipeline_tests.dagster_layer.test_sensors import evaluate
from lora_pipeline_tests.dagster_layer.test_version_jobs import promote
from lora_pipeline_tests.registry.test_aliases_and_tombstones import S, seed


def tick(instance, resources, cursor):
    """One tick, its observations stored as the daemon stores them; returns (result, cursor)."""
    result = evaluate(registry_change_sensor, instance, resources, cursor)
    for event in result.asset_events:
        instance.report_runless_asset_event(event)
    return result, result.cursor


def test_a_cli_promote_and_delete_show_without_a_materialization(store, instance, resources, monkeypatch):
    seed(store)
    instance.add_dynamic_partitions("styles", [S])
    quiet, cursor = tick(instance, resources, None)
    assert quiet.asset_events == []  # no alias, nothing deleted: nothing to show

    monkeypatch.setenv("LORA_STORAGE_URL", str(store.root))
    assert CliRunner().invoke(main, ["registry", "promote", S, "V2"]).exit_code == 0
    moved, cursor = tick(instance, resources, cursor)
    [observation] = moved.asset_events
    assert observation.asset_key == dg.AssetKey("lora_registry") and observation.partition == S
    assert observation.metadata["registry_state"].value == "aliases: production=V2; deleted: -"
    assert shown_state(instance, S) == "aliases: production=V2; deleted: -"

    again, cursor = tick(instance, resources, cursor)
    assert again.asset_events == []  # once per change

    assert CliRunner().invoke(main, ["registry", "delete", S, "V1"]).exit_code == 0
    deleted, cursor = tick(instance, resources, cursor)
    assert [e.metadata["registry_state"].value for e in deleted.asset_events] == ["aliases: production=V2; deleted: V1"]


def test_a_change_a_job_observed_is_not_observed_again(store, instance, resources):
    seed(store)
    instance.add_dynamic_partitions("styles", [S])
    _, cursor = tick(instance, resources, None)
    assert promote(instance, version="V3").success  # the job records its own observation
    after, _ = tick(instance, resources, cursor)
    assert after.asset_events == []
    assert shown_state(instance, S) == "aliases: production=V3; deleted: -"


def test_a_first_tick_shows_an_alias_the_ui_never_saw(store, instance, resources, monkeypatch):
    seed(store)
    monkeypatch.setenv("LORA_STORAGE_URL", str(store.root))
    assert CliRunner().invoke(main, ["registry", "promote", S, "V1"]).exit_code == 0
    none_yet, _ = tick(instance, resources, None)
    assert none_yet.asset_events == []  # no partition yet: nothing to observe, nothing remembered
    instance.add_dynamic_partitions("styles", [S])
    first, _ = tick(instance, resources, none_yet.cursor)
    assert [e.metadata["registry_state"].value for e in first.asset_events] == ["aliases: production=V1; deleted: -"]


def test_the_sensor_skips_while_the_store_is_unavailable(store, instance, resources, monkeypatch):
    seed(store)
    instance.add_dynamic_partitions("styles", [S])

    def down(self, prefix=""):  # noqa: ANN001, ANN202
        raise StoreUnavailable("store down")

    monkeypatch.setattr(type(store), "list", down)
    result = evaluate(registry_change_sensor, instance, resources, None)
    assert result.asset_events == [] and "store" in str(result.skip_reason)
