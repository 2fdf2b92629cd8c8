"""What a Dagster user sees: owners, kinds, schemas, code references, descriptions that render,
readable tables, links a browser opens, and the trained_lora file check."""

from __future__ import annotations

import importlib
from dataclasses import replace

import dagster as dg
import pytest

from lora_pipeline.contracts.job_status import JobStatus
from lora_pipeline.definitions import defs
from lora_pipeline.dataset.ingest import sample_dataset_path
from lora_pipeline.dataset.versions import current_dataset
from lora_pipeline.defs.assets.lora_registry import read_lineage, versions_markdown
from lora_pipeline.defs.presentation import md_file_link, url_value
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline_tests.dagster_layer.conftest import submit_pending
from lora_pipeline_tests.registry.lora_files import lora_bytes

ASSETS = ("training_dataset", "trained_lora", "lora_registry")
STYLE = "style_59"
JOB = "26945dbf-4e87-4574-ad26-b1f71e865942"
KEY = f"loras/{STYLE}/{STYLE}_v1.safetensors"


def _config_descriptions(config_type, path):
    from dagster._config import ConfigTypeKind

    if ConfigTypeKind.has_fields(config_type.kind):
        for name, field in config_type.fields.items():
            yield f"{path}.{name}", field.description
            yield from _config_descriptions(field.config_type, f"{path}.{name}")


def all_descriptions():
    repo = defs.get_repository_def()
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        yield f"asset {key.to_user_string()}", graph.get(key).description
    for check in graph.asset_check_keys:
        yield f"check {check.name}", graph.get(check).description
    for job in repo.get_all_jobs():
        yield f"job {job.name}", job.description
        for node in job.graph.iterate_node_defs():
            yield f"op {node.name}", node.description
            if isinstance(node, dg.OpDefinition) and node.config_schema is not None:
                yield from _config_descriptions(node.config_schema.config_type, f"op {node.name} config")
    for sensor in repo.sensor_defs:
        yield f"sensor {sensor.name}", sensor.description
    for schedule in repo.schedule_defs:
        yield f"schedule {schedule.name}", schedule.description
    for name, resource in (defs.resources or {}).items():
        if not isinstance(resource, dg.ConfigurableResource):  # declared_styles: a mapping, no fields
            continue
        for field, info in type(resource).model_fields.items():
            yield f"resource {name}.{field}", info.description


def test_no_description_the_ui_renders_has_rst_double_backticks():
    raw = [where for where, text in all_descriptions() if text and "``" in text]
    assert raw == [], "use Markdown single backticks in these docstrings/descriptions"


def test_every_asset_has_owners_a_column_schema_and_a_code_reference():
    graph = defs.resolve_asset_graph()
    for name in ASSETS:
        spec = graph.get(dg.AssetKey(name))
        assert spec.owners == ["team:lora"], name
        assert isinstance(spec.metadata["dagster/column_schema"], dg.TableSchema), name
        [reference] = spec.metadata["dagster/code_references"].code_references
        assert reference.file_path.endswith(".py") and reference.line_number > 0


def reloaded_kinds(monkeypatch, storage_url: str) -> dict[str, set[str]]:
    """The assets' kinds as Definitions built under ``storage_url`` have them (kinds are static)."""
    from lora_pipeline.defs.assets import lora_registry, trained_lora, training_dataset

    monkeypatch.setenv("LORA_STORAGE_URL", storage_url)
    modules = [importlib.reload(m) for m in (training_dataset, trained_lora, lora_registry)]
    try:
        return {
            name: set(getattr(m, name).specs_by_key[dg.AssetKey(name)].kinds)
            for name, m in zip(ASSETS, modules, strict=True)
        }
    finally:
        monkeypatch.delenv("LORA_STORAGE_URL")
        for m in modules:
            importlib.reload(m)


def test_kinds_follow_the_configured_store(monkeypatch, tmp_path):
    local = reloaded_kinds(monkeypatch, str(tmp_path))
    assert local["training_dataset"] == {"file", "pillow"} and local["lora_registry"] == {"json", "file"}
    assert "runpod" not in local["trained_lora"]  # the local backend
    s3 = reloaded_kinds(monkeypatch, "s3://bucket/prefix")
    assert s3["training_dataset"] == {"s3", "pillow"} and s3["lora_registry"] == {"json", "s3"}


def test_a_local_file_url_is_shown_as_a_path_and_an_http_one_as_a_link():
    assert url_value("file:///data/store/loras/a%20b.safetensors") == dg.MetadataValue.path(
        "/data/store/loras/a b.safetensors"
    )
    assert url_value("https://cdn.example/x.safetensors") == dg.MetadataValue.url("https://cdn.example/x.safetensors")
    assert url_value(None) == ""
    assert md_file_link("loras/s/s_v1.safetensors", "file:///x/loras/s/s_v1.safetensors") == "`s_v1.safetensors`"
    assert md_file_link("loras/s/s_v1.safetensors", "https://cdn/x") == "[s_v1.safetensors](https://cdn/x)"


def complete_v1(store, instance, tags: dict | None = None, header: dict | None = None) -> dg.ExecuteInProcessResult:
    instance.add_dynamic_partitions("styles", [STYLE])
    submit_pending(store, STYLE, JOB)
    store.put(KEY, lora_bytes({"lora_pipeline.steps": "30", **(header or {})}))
    status = JobStatus(id=JOB, status="COMPLETED", output={"lora_key": KEY})
    return defs.resolve_job_def("complete_training").execute_in_process(
        instance=instance,
        partition_key=STYLE,
        run_config={"ops": {"trained_lora": {"config": {"status_body": status.model_dump_json()}}}},
        tags=tags,
    )


def test_a_version_links_to_its_run_and_its_dataset_materialization_and_has_a_model_card(store, instance, backend):
    """Issue 23, lineage as links: the versions table links a version's job to the run that recorded
    it (the completion sensors tag it with the job) and its dataset to the run that materialized
    that training_dataset version; the model card is stored beside the files and shown."""
    from lora_pipeline.defs.jobs import JOB_TAG
    from lora_pipeline.storage.keys import model_card_key

    instance.add_dynamic_partitions("styles", [STYLE])
    dataset_run = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance,
        partition_key=STYLE,
        asset_selection=[dg.AssetKey("training_dataset")],
        run_config={"ops": {"training_dataset": {"config": {"source": str(sample_dataset_path())}}}},
    )
    digest = current_dataset(store, STYLE).dataset_hash
    result = complete_v1(store, instance, tags={JOB_TAG: JOB})
    events = {e.asset_key.path[-1]: e.materialization.metadata for e in result.get_asset_materialization_events()}
    assert f"[`{JOB[:8]}`](/runs/{result.run_id})" in events["lora_registry"]["versions_table"].value

    document = RegistryStore(store).read(STYLE)[0]
    trained_on = replace(document, versions=(replace(document.versions[0], dataset_hash=digest),))
    table = versions_markdown(trained_on, read_lineage(instance, STYLE, trained_on))
    assert f"[`{digest[:8]}`](/runs/{dataset_run.run_id})" in table

    card = events["trained_lora"]["model_card"].value
    assert card.startswith(f"# {STYLE} V1\n") and "## Lineage" in card and JOB in card
    assert events["trained_lora"]["model_card_key"].value == model_card_key(STYLE, 1)
    assert store.get(model_card_key(STYLE, 1)).data.decode() == card


def test_the_family_and_base_model_show_in_the_metadata_the_tags_and_the_versions_table(store, instance, backend):
    """A version trained on tiny-sdxl (its header says so) is shown as sdxl on `tiny-sdxl`: the
    trained_lora materialization's metadata and its `lora_pipeline/family` tag, and the registry's
    versions table, whose family and base model columns come from the registry document."""
    header = {"lora_pipeline.family": "sdxl", "lora_pipeline.base_model": "tiny-sdxl"}
    result = complete_v1(store, instance, header=header)
    events = {e.asset_key.path[-1]: e.materialization for e in result.get_asset_materialization_events()}
    lora = events["trained_lora"]
    assert (lora.metadata["family"].value, lora.metadata["base_model"].value) == ("sdxl", "tiny-sdxl")
    assert lora.tags is not None and lora.tags["lora_pipeline/family"] == "sdxl"
    rows = events["lora_registry"].metadata["versions_table"].value.splitlines()
    assert rows[2].startswith("| V1 | completed | ") and "| sdxl | `tiny-sdxl` |" in rows[2]


def test_metadata_is_readable_tables_short_ids_and_no_file_urls(store, instance, backend):
    result = complete_v1(store, instance)

    assert result.success
    events = {e.asset_key.path[-1]: e.materialization.metadata for e in result.get_asset_materialization_events()}
    lora, registry = events["trained_lora"], events["lora_registry"]
    assert isinstance(lora["lora_header"], dg.TableMetadataValue)
    assert not any(
        isinstance(v, dg.UrlMetadataValue) and v.url.startswith("file://") for m in events.values() for v in m.values()
    )
    assert isinstance(lora["url"], dg.PathMetadataValue)
    table = registry["versions_table"].value
    assert f"`{JOB[:8]}`" in table and JOB not in table and "file://" not in table
    assert "| `diffusers` |" in table and KEY not in table  # linked by layout; the key is in the registry
    problems = [e.metadata["problems"] for e in result.get_asset_check_evaluations() if "problems" in e.metadata]
    assert problems and all(isinstance(p, dg.MarkdownMetadataValue) for p in problems)


def test_the_trained_lora_check_passes_after_recording_and_fails_for_a_replaced_file(store, instance, backend):
    result = complete_v1(store, instance)
    [check] = [e for e in result.get_asset_check_evaluations() if e.check_name == "lora_file_matches_registry"]
    assert check.passed and isinstance(check.metadata["files"], dg.TableMetadataValue)

    store.put(KEY, lora_bytes({"lora_pipeline.steps": "30"}, tensors=3))  # replaced after it was recorded
    job = defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_check_selection={dg.AssetCheckKey(dg.AssetKey("trained_lora"), "lora_file_matches_registry")},
        asset_selection=set(),
    )
    again = job.execute_in_process(instance=instance, raise_on_error=False)

    [failed] = again.get_asset_check_evaluations()
    assert not failed.passed
    assert "ETag differs" in failed.description or "size differs" in failed.description
    assert "reconcile_registry" in failed.description


def test_the_versions_table_lists_a_version_without_a_job_id(store):
    submit_pending(store, STYLE, JOB)
    document, _ = RegistryStore(store).read(STYLE)
    rows = versions_markdown(document).splitlines()
    assert rows[0] == "| version | status | created | family | base model | dataset | loss | aliases | files | job |"
    assert len(rows) == 3 and rows[2].startswith("| V1 | starting | ") and rows[2].endswith(f"| `{JOB[:8]}` |")


def test_the_versions_table_shows_when_on_what_from_which_dataset_its_loss_and_aliases():
    """Issue 23: the table was cut off at 1440 px and lacked these columns; the files are linked by
    layout name, not by their long file names."""
    from lora_pipeline.registry.aliases import AliasEntry
    from lora_pipeline.registry.models import Attested, LoraFile, RegistryDocument, Version, VersionStatus

    header = {"lora_pipeline.family": "sd1", "lora_pipeline.base_model": "tiny", "lora_pipeline.layout": "diffusers"}
    version = Version(
        family=Attested("sd1", "file"),
        base_model=Attested("tiny", "file"),
        number=2,
        status=VersionStatus.completed,
        created_at=1_765_000_000_000,
        dataset_hash="ab12cd34" * 8,
        training={"finalLoss": 0.123456},
        file=LoraFile("loras/geo/geo_v2.safetensors", 10, "e", 0, header, "diffusers"),
        lora_url="https://cdn.example.com/loras/geo/geo_v2.safetensors",
        job_ids=(JOB,),
    )
    history = (AliasEntry(1, "production", "V2", "promote", "ana", 0),)
    table = versions_markdown(RegistryDocument("geo", versions=(version,), alias_history=history))
    row = table.splitlines()[2]
    assert row == (
        "| V2 | completed | 2025-12-06 05:46 | sd1 | `tiny` | `ab12cd34` | 0.1235 | production "
        f"| [diffusers](https://cdn.example.com/loras/geo/geo_v2.safetensors) | `{JOB[:8]}` |"
    )


def test_the_demo_runs_steps_without_dagster_debug_events(store, instance, capfd):
    from lora_pipeline.demo import quiet

    instance.add_dynamic_partitions("styles", ["sample_style"])
    result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance,
        partition_key="sample_style",
        asset_selection=[dg.AssetKey("training_dataset")],
        run_config=quiet(),
    )

    assert result.success
    err = capfd.readouterr().err
    assert " - DEBUG - " not in err and "STEP_START" not in err


def test_a_bad_configuration_fails_loading_with_one_line_naming_the_variable(monkeypatch):
    from lora_pipeline.settings import SettingsError, get_settings

    monkeypatch.setenv("RUNPOD_ENDPOINT_ID", "abc123")
    get_settings.cache_clear()
    with pytest.raises(SettingsError) as raised:
        get_settings()
    [line] = str(raised.value).splitlines()
    assert line.startswith("RUNPOD_ENDPOINT_ID='abc123': RUNPOD_API_KEY is not set")


def test_reconciliation_reports_its_breakdowns_as_tables(store, instance, backend):
    store.put(KEY, lora_bytes())

    result = defs.resolve_job_def("reconcile_registry").execute_in_process(instance=instance)

    [output] = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    metadata = output.event_specific_data.metadata
    assert isinstance(metadata["stats"], dg.TableMetadataValue)
    assert isinstance(metadata["housekeeping_by_kind"], dg.TableMetadataValue)
    assert {r.data["what"] for r in metadata["stats"].records} >= {"styles_seen", "headers_read"}


def test_descriptions_the_catalog_lists_carry_no_markdown_backticks():
    """Issue 23: the Catalog and the Jobs and Checks lists show descriptions as plain text, so a
    backtick shows as a backtick."""
    graph = defs.resolve_asset_graph()
    texts = {key.to_user_string(): graph.get(key).description or "" for key in graph.get_all_asset_keys()}
    texts.update({job.name: job.description or "" for job in defs.resolve_all_job_defs()})
    for assets_def in graph.assets_defs:
        texts.update({str(spec.key): spec.description or "" for spec in assets_def.check_specs})
    assert {name: text for name, text in texts.items() if "`" in text} == {}
