"""The training_dataset asset: what a user sees in the UI after materializing a style."""

from __future__ import annotations

import dagster as dg

from lora_pipeline.dataset.versions import current_dataset
from lora_pipeline.definitions import defs


def materialize(instance, style, config=None) -> dg.ExecuteInProcessResult:
    instance.add_dynamic_partitions("styles", [style])
    return defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance,
        partition_key=style,
        asset_selection=[dg.AssetKey("training_dataset")],
        run_config={"ops": {"training_dataset": {"config": config or {}}}},
        raise_on_error=False,
    )


def test_sample_style_materializes_with_its_hash_as_data_version(store, instance):
    result = materialize(instance, "sample_style")

    assert result.success
    [event] = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    manifest = current_dataset(store, "sample_style")
    assert metadata["dataset_hash"].value == manifest.dataset_hash
    assert metadata["images"].value == len(manifest.images) == 8
    assert "thumbnails" in metadata and "rejected_files" in metadata
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"enough_images": True, "caption_coverage": True}


def test_a_folder_source_with_a_broken_image_lists_it_as_rejected(store, instance, tmp_path):
    from lora_pipeline.dataset.ingest import sample_dataset_path

    source = tmp_path / "src"
    source.mkdir()
    for path in sorted(sample_dataset_path().iterdir())[:10]:
        (source / path.name).write_bytes(path.read_bytes())
    (source / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")

    result = materialize(instance, "mystyle", {"source": str(source)})

    assert result.success
    [event] = result.get_asset_materialization_events()
    rows = event.materialization.metadata["rejected_files"].value.records
    assert [row.data["file"] for row in rows] == ["broken.png"]


def test_a_style_without_a_source_fails_with_the_remedy(store, instance):
    result = materialize(instance, "nothing_here")

    assert not result.success
    failure = result.failure_data_for_node("training_dataset")
    assert "incoming/nothing_here/" in failure.user_failure_data.description


def test_a_new_dataset_version_requests_training_once(store, instance):
    """With new_dataset_version_sensor on, each dataset hash starts train_lora exactly once."""
    from lora_pipeline.defs.declared_styles import DECLARED_STYLES, declared_styles
    from lora_pipeline.defs.discovery_sensors import new_dataset_version_sensor

    materialize(instance, "sample_style")
    resources = {DECLARED_STYLES: declared_styles()}
    with dg.build_sensor_context(instance=instance, resources=resources) as context:
        first = new_dataset_version_sensor(context)
    with dg.build_sensor_context(instance=instance, cursor=first.cursor, resources=resources) as context:
        second = new_dataset_version_sensor(context)

    [request] = first.run_requests
    manifest = current_dataset(store, "sample_style")
    assert (request.partition_key, request.run_key) == ("sample_style", f"train:sample_style:{manifest.dataset_hash}")
    assert second.run_requests == []


def test_a_style_added_with_dataset_add_materializes_its_stored_version(store, instance, tmp_path):
    """Issue 23: `lora-pipeline dataset add` then materialize, with no new source: the style's
    current stored version is what training_dataset records (no 'no source' failure)."""
    from lora_pipeline.dataset.ingest import IngestOptions, ingest_dataset, sample_dataset_path

    added = ingest_dataset(store, "added_style", sample_dataset_path(), options=IngestOptions(trigger_word="geo"))
    before = store.head("datasets/added_style/current.json")

    result = materialize(instance, "added_style")

    assert result.success, result.failure_data_for_node("training_dataset")
    [event] = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    assert metadata["dataset_hash"].value == added.dataset_hash
    assert event.materialization.tags["dagster/data_version"] == added.dataset_hash
    assert metadata["images"].value == 8 and metadata["source"].value.startswith("the stored version ")
    assert metadata["thumbnails"].value.count("data:image/png;base64,") == 4
    assert metadata["thumbnails"].value.endswith("4 of 8 images shown (`lora-pipeline dataset show` lists every one).")
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"enough_images": True, "caption_coverage": True}
    assert store.head("datasets/added_style/current.json") == before  # nothing rewritten
