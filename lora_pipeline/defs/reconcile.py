"""The ``reconcile_registry`` job and its schedule: storage and RunPod are the truth.

Every hour (``LORA_RECONCILE_CRON`` to change it) the registry is brought in line
with the LoRA files in the store, the webhook inbox and the status of unfinished
jobs. Changed styles are reported as ``lora_registry`` materializations.
"""


import os
from collections import Counter
from datetime import timedelta

import dagster as dg
from pydantic import Field

from lora_pipeline.defs.partitions import STYLES_PARTITIONS_NAME
from lora_pipeline.defs.resources import StorageResource, TrainingBackendResource
from lora_pipeline.reconcile import DEFAULT_MAX_JOB_AGE, reconcile

DEFAULT_CRON = "0 * * * *"


class ReconcileConfig(dg.Config):
    dry_run: bool = Field(False, description="Report what would change; write nothing.")
    max_job_age_hours: float = Field(
        DEFAULT_MAX_JOB_AGE.total_seconds() / 3600, description="An unfinished job RunPod no longer knows, with no file in the store, "
        "is marked failed only after this long.",
    )
    poll_status: bool = Field(True, description="Ask the backend about unfinished jobs.")


@dg.op(tags={"kind": "s3"})
def reconcile_registry_op(
    context: dg.OpExecutionContext,
    config: ReconcileConfig,
    storage: StorageResource,
    training_backend: TrainingBackendResource,
) -> None:
    """Sync LoRA files, inbox files and job statuses into the registry; dedupe versions."""
    store = storage.get_store()
    backend = training_backend.get_backend(store) if config.poll_status else None
    report = reconcile(
        store,
        status_lookup=backend.status if backend else None,
        max_job_age=timedelta(hours=config.max_job_age_hours),
        dry_run=config.dry_run,
    )
    summary = report.to_dict()
    context.add_output_metadata(
        {
            "changed_versions": report.changed_versions,
            "dry_run": config.dry_run,
            "changes": dg.MetadataValue.table(
                records=[dg.TableRecord(row) for row in report.rows()],
                schema=dg.TableSchema(
                    columns=[dg.TableColumn(name, "string") for name in
                             ("style", "version", "change", "fields", "status_before", "status_after")]
                ),
            ),
            "problems": dg.MetadataValue.md("\n".join(f"- {p}" for p in report.problems) or "none"),
            "summary": dg.MetadataValue.json(summary),
        }
    )
    context.log.info(f"reconciliation: {report.changed_versions} versions changed")
    if config.dry_run:
        return
    changed_by_style = Counter(change.style for change in report.changes)
    changed_styles = sorted(changed_by_style)
    if changed_styles:
        missing = [
            s for s in changed_styles
            if not context.instance.has_dynamic_partition(STYLES_PARTITIONS_NAME, s)
        ]
        if missing:
            context.instance.add_dynamic_partitions(STYLES_PARTITIONS_NAME, missing)
    for style in changed_styles:
        context.log_event(
            dg.AssetMaterialization(
                asset_key="lora_registry",
                partition=style,
                description="updated by reconcile_registry",
                metadata={"changed_versions": changed_by_style[style]},
            )
        )


@dg.job(tags={"lora_pipeline/kind": "reconcile"})
def reconcile_registry() -> None:
    """Bring the registry in line with storage, the webhook inbox and RunPod."""
    reconcile_registry_op()


reconcile_registry_schedule = dg.ScheduleDefinition(
    name="reconcile_registry_schedule",
    job=reconcile_registry,
    cron_schedule=os.environ.get("LORA_RECONCILE_CRON", DEFAULT_CRON),
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Hourly by default; set LORA_RECONCILE_CRON to change it.",
)
