"""``lora_registry``: the style's versioned registry document, checked."""

import functools
from dataclasses import dataclass, field, replace

import dagster as dg

from lora_pipeline.defs.jobs import JOB_TAG
from lora_pipeline.defs.partitions import styles_partitions
from lora_pipeline.defs.presentation import OWNERS, md_file_link, store_kind, url_value
from lora_pipeline.defs.resources import StorageResource
from lora_pipeline.registry import checks
from lora_pipeline.registry.layouts import LAYOUTS
from lora_pipeline.registry.models import LoraFile, RegistryDocument, Version, VersionStatus, from_epoch_ms
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.registry_store.lora_files import is_readable_lora
from lora_pipeline.storage.keys import registry_key

CHECKS = {
    "unique_version_names": "No two versions share a name.",
    "unique_job_ids": "No two versions share a RunPod job (suffixes aside).",
    "completed_versions_have_files": "Every completed version's LoRA file is in the store and its header parses.",
    "no_presigned_urls": "No stored URL is a presigned (expiring) URL.",
    "completed_versions_have_both_layouts": "Every completed version has its kohya file (ComfyUI, A1111/Forge, "
    "kohya) and its diffusers file; a warning: versions trained before both were published have one.",
}
WARN_ONLY = {"completed_versions_have_both_layouts"}
# The columns of the `versions_table` metadata, one row per version (the document's fields behind them).
VERSIONS_SCHEMA = dg.TableSchema(
    columns=[
        dg.TableColumn("version", "string", description="`V1`, `V2`, … (`name`)"),
        dg.TableColumn("status", "string", description="pending, starting, training, failed, completed or deleted"),
        dg.TableColumn("created", "string", description="when it was submitted (UTC, `createdAt`)"),
        dg.TableColumn(
            "family",
            "string",
            description="sd1, sd2, sdxl, flux1, sd3, flux2-klein, z-image, qwen-image (`family`: the LoRA's header, "
            "else the worker's result, else the request)",
        ),
        dg.TableColumn("base model", "string", description="what it was trained on (`baseModel`, as `family`)"),
        dg.TableColumn("dataset", "string", description="the dataset version's hash, first 8 (`datasetHash`)"),
        dg.TableColumn("loss", "float", description="the final training loss (`training.finalLoss`)"),
        dg.TableColumn("aliases", "string", description="the aliases pointing at it (production, staging…)"),
        dg.TableColumn(
            "files",
            "string",
            description="kohya (ComfyUI, A1111/Forge, kohya tools), diffusers (`load_lora_weights`), other",
        ),
        dg.TableColumn("job", "string", description="the RunPod job id's first 8 characters (`id`)"),
    ]
)


@dg.asset(
    partitions_def=styles_partitions,
    deps=["trained_lora"],
    group_name="lora",
    kinds={"json", store_kind()},
    owners=OWNERS,
    metadata={"dagster/column_schema": VERSIONS_SCHEMA},
    check_specs=[dg.AssetCheckSpec(name, asset="lora_registry", description=text) for name, text in CHECKS.items()],
)
def lora_registry(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    """Publish the style's training_versions.json and check what users rely on."""
    style = context.partition_key
    store = storage.get_store()
    registry = RegistryStore(store)
    stored = registry.read_stored(style)
    document, _ = registry.read(style)
    raw = stored.data or b"{}"
    stored_doc = stored.document
    readable = functools.partial(is_readable_lora, store)

    problems = {
        "unique_version_names": checks.duplicate_names(stored_doc),
        "unique_job_ids": checks.duplicate_job_ids(stored_doc),
        "completed_versions_have_files": checks.completed_without_readable_file(stored_doc, readable),
        "no_presigned_urls": checks.stored_presigned_urls(raw),
        "completed_versions_have_both_layouts": checks.completed_without_both_layouts(document),
    }
    completed = [v for v in document.versions if v.status == VersionStatus.completed]
    latest = document.latest_completed
    primary = registry.primary
    main = latest.download(primary) if latest else None
    latest_url = main.url if main is not None else (latest.lora_url if latest else None)
    return dg.MaterializeResult(
        metadata={
            "registry_key": registry_key(style),
            "versions": len(document.versions),
            "completed": len(completed),
            "latest_version": latest.name if latest else "",
            "latest_url": url_value(latest_url),
            "primary_format": primary,
            "versions_table": dg.MetadataValue.md(
                versions_markdown(document, read_lineage(context.instance, style, document))
            ),
            "aliases": dg.MetadataValue.md(aliases_markdown(document, primary)),
            "registry_state": registry_state(document),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=name,
                passed=not found,
                severity=dg.AssetCheckSeverity.WARN if name in WARN_ONLY else dg.AssetCheckSeverity.ERROR,
                metadata={"problems": dg.MetadataValue.md("\n".join(f"- `{p}`" for p in found) or "none")},
            )
            for name, found in problems.items()
        ],
    )


def registry_state(document: RegistryDocument) -> str:
    """What an alias move or a deletion changes, as one comparable line: each alias's version and
    the deleted versions. Recorded on every materialization and observation of ``lora_registry``
    (``registry_state``), so ``registry_change_sensor`` sees when the UI shows an older state."""
    aliases = ",".join(f"{alias}={version}" for alias, version in sorted(document.aliases.items()))
    deleted = ",".join(v.name for v in document.versions if v.status is VersionStatus.deleted)
    return f"aliases: {aliases or '-'}; deleted: {deleted or '-'}"


def versions_markdown(document: RegistryDocument, lineage: "Lineage | None" = None) -> str:
    """One narrow row per version (it fits a laptop's screen): status, when, on what family and base model,
    from which dataset, its loss, its aliases, and its files linked by layout (the file names are
    in the registry and the trained_lora metadata). With ``lineage``, the job links to the run that
    trained or recorded it and the dataset to the run that materialized that dataset version."""
    lineage = lineage or Lineage()
    rows = [
        "| " + " | ".join(c.name for c in VERSIONS_SCHEMA.columns) + " |",
        "|" + "---|" * len(VERSIONS_SCHEMA.columns),
    ]
    pointed: dict[str, list[str]] = {}
    for alias, name in sorted(document.aliases.items()):
        pointed.setdefault(name, []).append(alias)
    for v in document.versions:
        header = v.file.metadata if v.file is not None else {}
        loss = v.training.get("finalLoss", header.get("lora_pipeline.final_loss") or "")
        created = from_epoch_ms(v.created_at).strftime("%Y-%m-%d %H:%M") if v.created_at else ""
        cells = [
            v.name,
            v.status.value,
            created,
            v.family.value if v.family else "",
            f"`{v.base_model.value}`" if v.base_model else "",
            _run_link(f"`{v.dataset_hash[:8]}`", lineage.dataset_runs.get(v.dataset_hash)) if v.dataset_hash else "",
            f"{float(loss):.4f}" if loss not in ("", None) else "",
            ", ".join(pointed.get(v.name, [])),
            " · ".join(_files(v)),
            _run_link(f"`{v.id[:8]}`", next((lineage.job_runs[b] for b in v.job_bases if b in lineage.job_runs), None))
            if v.id
            else "",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


@dataclass(frozen=True)
class Lineage:
    """Dagster runs behind the versions: job base id → the run that trained or recorded it,
    dataset hash → the run that materialized that training_dataset version."""

    job_runs: dict[str, str] = field(default_factory=dict)
    dataset_runs: dict[str, str] = field(default_factory=dict)


def read_lineage(instance: dg.DagsterInstance, style: str, document: RegistryDocument, limit: int = 50) -> Lineage:
    """The runs of the newest ``limit`` versions' jobs (by their run tag) and of the style's last
    ``limit`` training_dataset materializations (by their data version)."""
    job_runs: dict[str, str] = {}
    for version in document.versions[-limit:]:
        for base in version.job_bases:
            records = instance.get_run_records(dg.RunsFilter(tags={JOB_TAG: base}), limit=1)
            if records:
                job_runs[base] = records[0].dagster_run.run_id
    dataset_runs: dict[str, str] = {}
    materialized = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("training_dataset"), asset_partitions=[style]), limit=limit
    )
    for record in materialized.records:
        event = record.asset_materialization
        data_version = event.tags.get("dagster/data_version") if event is not None and event.tags else None
        if data_version and data_version not in dataset_runs:
            dataset_runs[data_version] = record.run_id
    return Lineage(job_runs, dataset_runs)


def _run_link(text: str, run_id: str | None) -> str:
    """``text`` linked to the run's page in this UI (a relative link), or as it is."""
    return f"[{text}](/runs/{run_id})" if run_id else text


def _files(v: Version) -> list[str]:
    """The version's files as links named by their layout (kohya, diffusers; other: the file name)."""
    files = v.files()
    cells = [_link(files[layout], layout) for layout in LAYOUTS if layout in files]
    others = [f for layout, f in files.items() if layout not in LAYOUTS]
    if v.file is not None and not v.file.layout:
        others.append(replace(v.file, url=v.lora_url))
    return cells + [_link(f) for f in others]


def aliases_markdown(document: RegistryDocument, primary: str) -> str:
    """One row per alias (production, staging…): the version it points at and that version's
    file in the primary layout, then the last move. What an application serving the alias reads
    is the registry index; this is the same answer for a person."""
    if not document.aliases:
        return "no aliases: promote a version with the `promote_lora_version` job or `registry promote`"
    last = {entry.alias: entry for entry in document.alias_history}
    rows = ["| alias | version | file | last move |", "|---|---|---|---|"]
    for alias, name in sorted(document.aliases.items()):
        version = document.version(name)
        file = version.download(primary) if version else None
        entry = last.get(alias)
        moved = (
            f"{entry.action} by {_short_actor(entry.by)}" + (f": {entry.reason}" if entry.reason else "")
            if entry
            else ""
        )
        rows.append(f"| {alias} | {name} | {_link(file)} | {moved} |")
    return "\n".join(rows)


def _short_actor(by: str) -> str:
    """``dagster run <run id>`` as ``run <first 8>`` (as the UI shortens run ids); anyone else as is."""
    prefix = "dagster run "
    return f"run {by[len(prefix) : len(prefix) + 8]}" if by.startswith(prefix) else by


def _link(f: LoraFile | None, label: str | None = None) -> str:
    if f is None:
        return ""
    return md_file_link(f.key, f.url, label)
