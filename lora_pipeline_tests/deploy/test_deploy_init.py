"""`lora-pipeline deploy init`: the pool limits set explicitly, and the style partitions a new
(e.g. Postgres) instance lacks re-created from the store. Idempotent."""

from __future__ import annotations

from datetime import UTC, datetime

import dagster as dg
from click.testing import CliRunner

from lora_pipeline.cli import main
from lora_pipeline.dataset.ingest import ingest_dataset, sample_dataset_path
from lora_pipeline.defs.jobs import GPU_POOL
from lora_pipeline.defs.partitions import STYLES_PARTITIONS_NAME
from lora_pipeline.registry.evidence import Submission
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.storage.local import LocalStore


def _laptop_store(path) -> LocalStore:
    """What a laptop's store holds: a dataset, a registry with a job in flight, an incoming drop."""
    store = LocalStore(path)
    ingest_dataset(store, "alpha", sample_dataset_path())
    RegistryStore(store).apply(
        "beta",
        [
            Submission(
                "beta", 1, "req-1", "11111111-2222-4333-8444-555566667777-u1", "ab" * 32, {"rank": 4}, datetime.now(UTC)
            )
        ],
    )
    store.put("incoming/gamma/a.png", b"not checked here")
    store.put("incoming/x..y/a.png", b"x")
    return store


def test_init_sets_the_pool_and_recreates_partitions_idempotently(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("LORA_STORAGE_URL", str(tmp_path / "store"))
    _laptop_store(tmp_path / "store")

    first = CliRunner().invoke(main, ["deploy", "init", "--gpu-pool-limit", "3"], catch_exceptions=False)
    assert first.exit_code == 0, first.output
    assert "4 added" in first.output and "unfinished jobs the job sensor will poll: 1" in first.output
    with dg.DagsterInstance.get() as instance:
        assert sorted(instance.get_dynamic_partitions(STYLES_PARTITIONS_NAME)) == [
            "alpha",
            "beta",
            "gamma",
            "sample_style",
        ]
        info = instance.event_log_storage.get_concurrency_info(GPU_POOL)
        assert (info.slot_count, info.using_default_limit) == (3, False)

    monkeypatch.setenv("LORA_GPU_POOL_LIMIT", "5")
    again = CliRunner().invoke(main, ["deploy", "init"], catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert "(0 added)" in again.output
    with dg.DagsterInstance.get() as instance:
        assert len(instance.get_dynamic_partitions(STYLES_PARTITIONS_NAME)) == 4
        assert instance.event_log_storage.get_concurrency_info(GPU_POOL).slot_count == 5


def test_init_refuses_a_bad_pool_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.setenv("LORA_GPU_POOL_LIMIT", "many")
    result = CliRunner().invoke(main, ["deploy", "init"])
    assert result.exit_code == 2 and "LORA_GPU_POOL_LIMIT" in result.output


def test_init_adds_the_declared_styles_before_any_sensor_tick(tmp_path):
    """A declared style is a partition from the start, as the sample is: `dg launch --partition
    <style>` works on a fresh instance (docs/dg.md)."""
    from lora_pipeline.defs.declared_styles import StyleDeclaration, declared_styles
    from lora_pipeline.deploy.init import init_instance

    declared = declared_styles([StyleDeclaration(style="watercolor"), StyleDeclaration(style="ink")])
    with dg.instance_for_test() as instance:
        report = init_instance(instance, LocalStore(tmp_path / "store"), {GPU_POOL: 2}, declared)
        assert sorted(instance.get_dynamic_partitions(STYLES_PARTITIONS_NAME)) == ["ink", "sample_style", "watercolor"]
    assert report.partitions_added == ["ink", "sample_style", "watercolor"]
