"""The ``reconcile_registry`` job and its schedule: storage and RunPod are the truth.

Every hour (``LORA_RECONCILE_CRON`` to change it) the registry is brought in line
with the LoRA files in the store, the webhook inbox and the status of unfinished
jobs. Changed styles are reported as ``lora_registry`` materializations.
"""

from collections import Counter
from datetime import timedelta

import dagster as dg
from pydantic import Field

from lora_pipeline.defs.outages import store_outage_skip
from lora_pipeline.defs.partitions import STYLES_PARTITIONS_NAME
from lora_pipeline.defs.presentation import store_kind
from lora_pipeline.defs.resources import StorageResource, TrainingBackendResource
from lora_pipeline.lifecycle.housekeeping import HousekeepingReport, Retention, housekeep
from lora_pipeline.lifecycle.reconcile import DEFAULT_MAX_JOB_AGE, ReconcileReport, reconcile
from lora_pipeline.lifecycle.versions import prune_versions
from lora_pipeline.settings import get_settings
from lora_pipeline.storage.base import StorageError
from lora_pipeline.storage.keys import INDEX_KEY


class ReconcileConfig(dg.Config):
    dry_run: bool = Field(False, description="Report what would change; write nothing.")
    max_job_age_hours: float = Field(
        DEFAULT_MAX_JOB_AGE.total_seconds() / 3600,
        description="An unfinished job RunPod no longer knows, with no file in the store, "
        "is marked failed only after this long.",
    )
    poll_status: bool = Field(True, description="Ask the backend about unfinished jobs.")
    housekeeping: bool = Field(
        True,
        description="Then prune old webhook claims and bodies, finished "
        "versions' checkpoints and idle lock files (dry_run: only report).",
    )
    webhook_retention_days: float | None = Field(
        None, description="Keep settled jobs' webhook files this long (default: LORA_WEBHOOK_RETENTION_DAYS, 30)."
    )
    checkpoint_retention_days: float | None = Field(
        None,
        description="Keep a failed version's checkpoints this long (default: "
        "LORA_CHECKPOINT_RETENTION_DAYS, 30); a completed version's go at once.",
    )
    lock_retention_days: float | None = Field(
        None, description="Local store: remove lock files unused this long (default: LORA_LOCK_RETENTION_DAYS, 1)."
    )
    keep_versions: int | None = Field(
        None,
        ge=0,
        description="With housekeeping: delete each style's completed versions but the newest N and "
        "every one an alias points at or can roll back to, leaving tombstones (default: LORA_KEEP_VERSIONS; 0 keeps all; dry_run: only report).",
    )


@dg.op(tags={"kind": store_kind()})
def reconcile_registry_op(
    context: dg.OpExecutionContext,
    config: ReconcileConfig,
    storage: StorageResource,
    training_backend: TrainingBackendResource,
) -> None:
    """Sync LoRA files, inbox files and job statuses into the registry; dedupe versions."""
    store = storage.get_store()
    retention = (
        Retention.from_settings(  # a bad config value fails here, before anything is written
            get_settings(),
            webhooks_days=config.webhook_retention_days,
            failed_checkpoints_days=config.checkpoint_retention_days,
            locks_days=config.lock_retention_days,
        )
        if config.housekeeping
        else None
    )
    backend = training_backend.get_backend(store) if config.poll_status else None
    report = reconcile(
        store,
        status_lookup=backend.status if backend else None,
        max_job_age=timedelta(hours=config.max_job_age_hours),
        dry_run=config.dry_run,
    )
    summary = report.to_dict()
    pruned = None
    if retention is not None:
        pruned = housekeep(store, dry_run=config.dry_run, retention=retention)
        context.log.info(pruned.summary())
        for problem in pruned.problems:
            context.log.warning(problem)
    keep = config.keep_versions if config.keep_versions is not None else get_settings().keep_versions
    metadata = _run_metadata(report, summary, pruned, dry_run=config.dry_run)
    if config.housekeeping and keep:
        kept = prune_versions(store, keep, dry_run=config.dry_run)
        context.log.info(kept.summary())
        for problem in kept.problems:
            context.log.warning(problem)
        metadata.update({"versions_deleted": kept.total, "version_retention": dg.MetadataValue.json(kept.to_dict())})
    context.add_output_metadata(metadata)
    context.log.info(f"reconciliation: {report.changed_versions} versions changed")
    if config.dry_run:
        return
    _materialize_changed_styles(context, report)


def _run_metadata(report: ReconcileReport, summary: dict, pruned: HousekeepingReport | None, *, dry_run: bool) -> dict:
    """The run's output metadata: what changed as a table, problems, and what housekeeping pruned."""
    return {
        "changed_versions": report.changed_versions,
        "dry_run": dry_run,
        "changes": dg.MetadataValue.table(
            records=[dg.TableRecord(row) for row in report.rows()],
            schema=dg.TableSchema(
                columns=[
                    dg.TableColumn(name, "string")
                    for name in ("style", "version", "change", "fields", "status_before", "status_after")
                ]
            ),
        ),
        "problems": dg.MetadataValue.md("\n".join(f"- {p}" for p in report.problems) or "none"),
        "stats": _count_table("what", summary["stats"]),
        **(
            {
                "housekeeping_deleted": pruned.total,
                "housekeeping_kept_needed": sum(pruned.kept_needed.values()),
                "housekeeping_by_kind": dg.MetadataValue.table(
                    records=[
                        dg.TableRecord({"kind": kind, "deleted": n, "kept_needed": pruned.kept_needed.get(kind, 0)})
                        for kind, n in pruned.counts.items()
                    ],
                    schema=dg.TableSchema(
                        columns=[
                            dg.TableColumn("kind", "string"),
                            dg.TableColumn("deleted", "int"),
                            dg.TableColumn("kept_needed", "int"),
                        ]
                    ),
                ),
                "housekeeping": dg.MetadataValue.json(pruned.to_dict()),  # the details: retention, keys, reasons
            }
            if pruned is not None
            else {}
        ),
    }


def _count_table(what: str, counts: dict[str, int]) -> dg.MetadataValue:
    """A flat breakdown as a two-column table rather than a JSON blob."""
    return dg.MetadataValue.table(
        records=[dg.TableRecord({what: key, "count": int(n)}) for key, n in counts.items()],
        schema=dg.TableSchema(columns=[dg.TableColumn(what, "string"), dg.TableColumn("count", "int")]),
    )


def _materialize_changed_styles(context: dg.OpExecutionContext, report: ReconcileReport) -> None:
    """A ``lora_registry`` materialization per style whose versions changed, so the asset's
    partitions show when reconciliation (not a training run) updated them; a style new to
    the registry gets its partition first."""
    changed_by_style = Counter(change.style for change in report.changes)
    changed_styles = sorted(changed_by_style)
    if changed_styles:
        missing = [s for s in changed_styles if not context.instance.has_dynamic_partition(STYLES_PARTITIONS_NAME, s)]
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


@dg.schedule(
    name="reconcile_registry_schedule",
    job=reconcile_registry,
    cron_schedule=get_settings().reconcile_cron,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Hourly by default; set LORA_RECONCILE_CRON to change it. Skips while the "
    "object store or RunPod is down.",
)
def reconcile_registry_schedule(
    context: dg.ScheduleEvaluationContext,
    storage: StorageResource,
    training_backend: TrainingBackendResource,
) -> dg.RunRequest | dg.SkipReason:
    """Request a reconciliation unless the store or RunPod is known to be down.

    Bounded like a sensor tick: the store comes from ``get_sensor_store()`` (tick
    timeouts, checked once per process, behind the breaker) and is probed with one
    HEAD of the registry index; RunPod counts as down while its client's breaker
    is open (the job sensor's polls keep it informed). A run started into an
    outage would only fail.
    """
    try:
        store = storage.get_sensor_store()
        store.head(INDEX_KEY)
    except StorageError as exc:
        return store_outage_skip(exc)
    breaker = training_backend.runpod_breaker(store)
    if breaker is not None and breaker.is_open:
        since = breaker.unavailable_since.isoformat(timespec="seconds") if breaker.unavailable_since else "?"
        return dg.SkipReason(f"RunPod unavailable since {since} (last: {breaker.last_error})")
    return dg.RunRequest()
