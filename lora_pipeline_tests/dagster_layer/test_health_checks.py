"""The lag and health checks on lora_registry (defs/health.py): thresholds, messages, where they run."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest

from lora_pipeline.definitions import defs
from lora_pipeline.defs.health import HEALTH_CHECKS, evaluate_health
from lora_pipeline.storage.breaker import CircuitBreaker
from lora_pipeline.webhook.inbox import write_webhook
from lora_pipeline_tests.dagster_layer.conftest import submit_pending

JOB = "0000000a-1111-4222-8333-444455556666-u1"


def by_name(health) -> dict[str, dg.AssetCheckResult]:
    return {r.check_name: r for r in health.results}


def test_a_job_unfinished_past_the_threshold_fails_naming_the_setting_and_the_runbook(store, instance):
    submit_pending(store, "style_a", JOB)
    later = datetime.now(UTC) + timedelta(hours=7)

    results = by_name(evaluate_health(store, instance, now=later))

    oldest = results["oldest_unfinished_job"]
    assert not oldest.passed
    assert "style_a" in oldest.description and "LORA_HEALTH_MAX_JOB_AGE_HOURS" in oldest.description
    assert "docs/operations.md#oldest_unfinished_job" in oldest.description
    table = oldest.metadata["by_style"]
    assert isinstance(table, dg.TableMetadataValue)
    [row] = table.records
    assert row.data["style"] == "style_a" and row.data["unfinished_jobs"] == 1
    assert "0000000a" in row.data["oldest"] and JOB not in row.data["oldest"]  # the short job id
    assert isinstance(oldest.metadata["oldest_age_hours"], dg.FloatMetadataValue)
    assert results["jobs_waiting_for_status"].passed  # 1 of at most 50


def test_each_lagging_style_is_observed_on_its_registry_partition(store, instance, backend):
    submit_pending(store, "style_a", JOB)
    submit_pending(store, "style_b", JOB.replace("a", "b", 1))
    instance.add_dynamic_partitions("styles", ["style_a", "style_idle"])  # style_b: no partition yet

    health = evaluate_health(store, instance, now=datetime.now(UTC) + timedelta(hours=7))
    [observed] = health.observations
    assert (observed.partition, observed.metadata["unfinished_jobs"].value) == ("style_a", 1)
    assert observed.metadata["over_limit"].value is True
    assert "LORA_HEALTH_MAX_JOB_AGE_HOURS" in (observed.description or "")

    result = defs.resolve_job_def("pipeline_health").execute_in_process(instance=instance)
    assert result.success
    records = instance.fetch_observations(dg.AssetKey("lora_registry"), limit=10).records
    assert [r.partition_key for r in records] == ["style_a"]
    assert records[0].asset_observation.metadata["over_limit"].value is False  # young, in real time


def test_a_young_job_passes_and_the_waiting_count_has_its_own_threshold(store, instance, monkeypatch):
    monkeypatch.setenv("LORA_HEALTH_MAX_WAITING_JOBS", "1")
    submit_pending(store, "style_a", JOB)
    submit_pending(store, "style_b", JOB.replace("a", "b", 1))

    results = by_name(evaluate_health(store, instance))

    assert results["oldest_unfinished_job"].passed
    waiting = results["jobs_waiting_for_status"]
    assert not waiting.passed and "LORA_HEALTH_MAX_WAITING_JOBS" in waiting.description
    assert waiting.metadata["waiting"] == dg.MetadataValue.int(2)


def test_the_inbox_check_counts_files_and_ages_the_oldest_from_one_listing(store, instance, monkeypatch):
    body = json.dumps({"id": JOB, "status": "COMPLETED"}).encode()
    old = datetime.now(UTC) - timedelta(hours=2)
    write_webhook(store, body, received_at=old)

    result = by_name(evaluate_health(store, instance))["webhook_inbox"]

    assert not result.passed
    assert "LORA_HEALTH_MAX_INBOX_AGE_MINUTES" in result.description
    assert result.metadata["inbox_files"] == dg.MetadataValue.int(1)
    assert result.metadata["oldest_file_age_minutes"].value >= 119

    monkeypatch.setenv("LORA_HEALTH_MAX_INBOX_AGE_MINUTES", "600")
    assert by_name(evaluate_health(store, instance))["webhook_inbox"].passed


def test_an_open_breaker_fails_the_breaker_check_with_its_last_error(store, instance):
    breaker = CircuitBreaker("RunPod endpoint e1", fail_max=1)
    breaker.record_failure(ConnectionError("connection refused"))

    result = by_name(evaluate_health(store, instance, runpod_breaker=breaker))["circuit_breakers"]

    assert not result.passed
    assert "RunPod" in result.description and "connection refused" in result.description
    assert isinstance(result.metadata["breakers"], dg.TableMetadataValue)


def test_reconciliation_recency_counts_from_the_first_run_before_any_reconciliation(store, instance, backend):
    assert by_name(evaluate_health(store, instance))["recent_reconciliation"].passed  # a new deployment
    assert defs.resolve_job_def("pipeline_health").execute_in_process(instance=instance).success
    later = by_name(evaluate_health(store, instance, now=datetime.now(UTC) + timedelta(hours=4)))
    assert not later["recent_reconciliation"].passed
    assert "reconcile_registry_schedule" in later["recent_reconciliation"].description


def test_reconciliation_recency_passes_after_a_reconciliation_and_fails_when_it_is_old(store, instance, backend):
    assert defs.resolve_job_def("reconcile_registry").execute_in_process(instance=instance).success

    after = by_name(evaluate_health(store, instance))["recent_reconciliation"]
    assert after.passed and after.metadata["hours_since"].value < 1
    late = by_name(evaluate_health(store, instance, now=datetime.now(UTC) + timedelta(hours=4)))
    assert not late["recent_reconciliation"].passed
    assert "LORA_HEALTH_MAX_RECONCILE_AGE_HOURS" in late["recent_reconciliation"].description


def test_the_pipeline_health_job_evaluates_every_check_alone(store, instance, backend):
    result = defs.resolve_job_def("pipeline_health").execute_in_process(instance=instance)

    assert result.success
    evaluations = result.get_asset_check_evaluations()
    assert sorted(e.check_name for e in evaluations) == sorted(HEALTH_CHECKS)
    assert not result.get_asset_materialization_events()


def test_a_single_health_check_can_run_alone(store, instance, backend):
    job = defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_check_selection={dg.AssetCheckKey(dg.AssetKey("lora_registry"), "webhook_inbox")},
        asset_selection=set(),
    )
    result = job.execute_in_process(instance=instance)

    assert [e.check_name for e in result.get_asset_check_evaluations()] == ["webhook_inbox"]


def test_completion_runs_leave_the_health_checks_out():
    keys = defs.resolve_job_def("complete_training").asset_layer.asset_graph.asset_check_keys
    names = {key.name for key in keys}
    assert names.isdisjoint(HEALTH_CHECKS) and "unique_job_ids" in names


@pytest.mark.parametrize("variable", ["LORA_HEALTH_MAX_JOB_AGE_HOURS", "LORA_HEALTH_MAX_INBOX_FILES"])
def test_a_bad_threshold_is_one_line_naming_the_variable(monkeypatch, variable):
    from lora_pipeline.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match=f"^{variable}='-1': "):
        load_settings({variable: "-1"})


def test_materializing_the_registry_by_hand_also_runs_the_health_checks(store, instance, backend):
    instance.add_dynamic_partitions("styles", ["style_a"])
    job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection={dg.AssetKey("lora_registry")})

    result = job.execute_in_process(instance=instance, partition_key="style_a")

    names = {e.check_name for e in result.get_asset_check_evaluations()}
    assert set(HEALTH_CHECKS) <= names and "unique_job_ids" in names
