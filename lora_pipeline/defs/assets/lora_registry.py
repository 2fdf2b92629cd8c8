"""``lora_registry``: the style's versioned registry document, checked."""

import functools

import dagster as dg

from lora_pipeline.defs.partitions import styles_partitions
from lora_pipeline.defs.resources import StorageResource
from lora_pipeline.registry import checks
from lora_pipeline.registry.models import RegistryDocument, VersionStatus
from lora_pipeline.registry.safetensors_header import is_readable_lora
from lora_pipeline.storage.keys import registry_key
from lora_pipeline.storage.registry_io import RegistryStore

CHECKS = {
    "unique_version_names": "No two versions share a name.",
    "unique_job_ids": "No two versions share a RunPod job (suffixes aside).",
    "completed_versions_have_files": "Every completed version's LoRA file is in the store and its header parses.",
    "no_presigned_urls": "No stored URL is a presigned (expiring) URL.",
}


@dg.asset(
    partitions_def=styles_partitions,
    deps=["trained_lora"],
    group_name="lora",
    kinds={"json"},
    check_specs=[dg.AssetCheckSpec(name, asset="lora_registry", description=text) for name, text in CHECKS.items()],
)
def lora_registry(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    """Publish the style's ``training_versions.json`` and check what users rely on."""
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
    }
    completed = [v for v in document.versions if v.status == VersionStatus.completed]
    latest = max(completed, key=lambda v: v.number, default=None)
    return dg.MaterializeResult(
        metadata={
            "registry_key": registry_key(style),
            "versions": len(document.versions),
            "completed": len(completed),
            "latest_version": latest.name if latest else "",
            "latest_url": dg.MetadataValue.url(latest.lora_url) if latest and latest.lora_url else "",
            "versions_table": dg.MetadataValue.md(versions_markdown(document)),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=name,
                passed=not found,
                metadata={"problems": dg.MetadataValue.json(list(found))},
            )
            for name, found in problems.items()
        ],
    )


def versions_markdown(document: RegistryDocument) -> str:
    rows = ["| version | status | job id | file | url |", "|---|---|---|---|---|"]
    for v in document.versions:
        rows.append(
            f"| {v.name} | {v.status.value} | {v.id or ''} | {v.s3_key or ''} | {v.lora_url or ''} |"
        )
    return "\n".join(rows)
