"""Lag and health checks on ``lora_registry``, shown in the UI's checks tab.

Five non-blocking asset checks, each one overall result with a per-style table, and an
observation of ``lora_registry[style]`` for each style with unfinished work: the oldest
unfinished job, the jobs waiting for a final status, the webhook inbox, the circuit breakers,
and the last successful reconciliation. They are cheap (one read of the registry index, its
lagging entries rebuilt; one listing of the inbox; one run query) and run three ways: alone
from the asset's checks tab, every 10 minutes in the ``pipeline_health`` job
(``LORA_HEALTH_CRON``), and with a ``lora_registry`` materialized by hand. Each threshold is a
setting (``LORA_HEALTH_*``); a failed check says what to do and links its runbook entry in
docs/operations.md (a section per check).
"""

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from lora_pipeline.defs.partitions import STYLES_PARTITIONS_NAME
from lora_pipeline.defs.reconcile import reconcile_registry
from lora_pipeline.defs.resources import StorageResource, TrainingBackendResource
from lora_pipeline.registry.models import from_epoch_ms
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.registry_store.index import RegistryIndex
from lora_pipeline.settings import Settings, get_settings
from lora_pipeline.storage.base import ObjectStore, StorageError
from lora_pipeline.storage.breaker import CircuitBreaker
from lora_pipeline.webhook.inbox import inbox_listing

ASSET = "lora_registry"
RUNBOOK = "docs/operations.md"
HEALTH_CHECKS = {
    "oldest_unfinished_job": "No training job (or submission without a job id) is unfinished for longer than "
    "LORA_HEALTH_MAX_JOB_AGE_HOURS.",
    "jobs_waiting_for_status": "At most LORA_HEALTH_MAX_WAITING_JOBS jobs wait for a final status.",
    "webhook_inbox": "The webhook inbox holds at most LORA_HEALTH_MAX_INBOX_FILES files and none waits longer "
    "than LORA_HEALTH_MAX_INBOX_AGE_MINUTES.",
    "circuit_breakers": "The object store's and RunPod's circuit breakers are closed (as this run and the "
    "completion sensors' last ticks saw them).",
    "recent_reconciliation": "A reconcile_registry run succeeded within LORA_HEALTH_MAX_RECONCILE_AGE_HOURS.",
}
HEALTH_CHECK_KEYS = [dg.AssetCheckKey(dg.AssetKey(ASSET), name) for name in HEALTH_CHECKS]
COMPLETION_SENSORS = ("runpod_job_sensor", "runpod_webhook_sensor")
OUTAGE_SKIPS = ("object store unavailable", "RunPod unavailable")

_STYLE_SCHEMA = dg.TableSchema(
    columns=[
        dg.TableColumn("style", "string"),
        dg.TableColumn("unfinished_jobs", "int", description="versions with a job id, not completed or failed"),
        dg.TableColumn("submitting", "int", description="versions claimed for submission, no job id yet"),
        dg.TableColumn("oldest", "string", description="the oldest unfinished version (and its job, short)"),
        dg.TableColumn("oldest_age_hours", "float"),
    ]
)
_BREAKER_SCHEMA = dg.TableSchema(
    columns=[
        dg.TableColumn("breaker", "string"),
        dg.TableColumn("seen_by", "string"),
        dg.TableColumn("state", "string"),
        dg.TableColumn("detail", "string"),
    ]
)


@dataclass(frozen=True)
class StyleLag:
    style: str
    unfinished: int
    submitting: int
    oldest: str
    oldest_age_h: float | None


def _ms_age_hours(ms: int | None, now: datetime) -> float | None:
    if ms is None:
        return None
    return max(0.0, (now - from_epoch_ms(ms)).total_seconds() / 3600)


def style_lags(index: RegistryIndex, now: datetime) -> list[StyleLag]:
    """Per style: its unfinished jobs and submissions, and the oldest of them with its age."""
    lags = []
    for style, summary in sorted(index.styles.items()):
        aged: list[tuple[float, str]] = []
        for job in summary.unfinished.values():
            age = _ms_age_hours(job.created_at, now)
            if age is not None:
                aged.append((age, f"{job.version} (job {job.job_id[:8]})"))
        for version, at in summary.submitting.items():
            age = _ms_age_hours(at, now)
            if age is not None:
                aged.append((age, f"{version} (no job id yet)"))
        oldest = max(aged, default=None)
        lags.append(
            StyleLag(
                style,
                len(summary.unfinished),
                len(summary.submitting),
                oldest[1] if oldest else "",
                round(oldest[0], 2) if oldest else None,
            )
        )
    return lags


def _style_table(lags: list[StyleLag]) -> dg.MetadataValue:
    return dg.MetadataValue.table(
        records=[
            dg.TableRecord(
                {
                    "style": lag.style,
                    "unfinished_jobs": lag.unfinished,
                    "submitting": lag.submitting,
                    "oldest": lag.oldest,
                    "oldest_age_hours": lag.oldest_age_h,
                }
            )
            for lag in lags
            if lag.unfinished or lag.submitting
        ],
        schema=_STYLE_SCHEMA,
    )


def _result(
    name: str,
    passed: bool,
    description: str,
    metadata: dict[str, Any],
    severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR,
) -> dg.AssetCheckResult:
    if not passed:
        description = f"{description} — runbook: {RUNBOOK}#{name}"
    return dg.AssetCheckResult(
        asset_key=ASSET, check_name=name, passed=passed, severity=severity, description=description, metadata=metadata
    )


def check_unfinished_jobs(lags: list[StyleLag], settings: Settings) -> Iterator[dg.AssetCheckResult]:
    """``oldest_unfinished_job`` and ``jobs_waiting_for_status``."""
    table = _style_table(lags)
    limit_h = settings.health_max_job_age_hours
    oldest = max(
        (lag for lag in lags if lag.oldest_age_h is not None), key=lambda lag: lag.oldest_age_h or 0.0, default=None
    )
    age = oldest.oldest_age_h if oldest else None
    late = [lag.style for lag in lags if lag.oldest_age_h is not None and lag.oldest_age_h > limit_h]
    if oldest is None:
        text = "no unfinished job"
    elif late:
        text = (
            f"{len(late)} style(s) have a job unfinished for over {limit_h:g} h "
            f"(LORA_HEALTH_MAX_JOB_AGE_HOURS): {', '.join(late)}; the oldest is {oldest.style} "
            f"{oldest.oldest} at {age:.1f} h. Look at it with `lora-pipeline registry show STYLE --json`, "
            "then run reconcile_registry"
        )
    else:
        text = f"the oldest unfinished job is {oldest.style} {oldest.oldest}, {age:.1f} h old"
    yield _result(
        "oldest_unfinished_job",
        not late,
        text,
        {
            "oldest_age_hours": dg.MetadataValue.float(age if age is not None else 0.0),
            "limit_hours": dg.MetadataValue.float(limit_h),
            "styles_over_limit": dg.MetadataValue.int(len(late)),
            "by_style": table,
        },
    )
    unfinished = sum(lag.unfinished for lag in lags)
    submitting = sum(lag.submitting for lag in lags)
    waiting = unfinished + submitting
    limit = settings.health_max_waiting_jobs
    passed = waiting <= limit
    text = f"{waiting} jobs wait for a final status ({unfinished} with a job id, {submitting} without)"
    if not passed:
        text += (
            f", over {limit} (LORA_HEALTH_MAX_WAITING_JOBS): the endpoint is not keeping up or the job "
            "sensor is not running; check its ticks under Automation and the endpoint's workers"
        )
    yield _result(
        "jobs_waiting_for_status",
        passed,
        text,
        {
            "waiting": dg.MetadataValue.int(waiting),
            "without_job_id": dg.MetadataValue.int(submitting),
            "limit": dg.MetadataValue.int(limit),
            "by_style": table,
        },
    )


def check_inbox(store: ObjectStore, settings: Settings, now: datetime) -> dg.AssetCheckResult:
    """``webhook_inbox``: how many files wait, and for how long the oldest has."""
    listed = inbox_listing(store)
    depth = len(listed)
    oldest_min = max(0.0, (now - listed[0][0]).total_seconds() / 60) if listed else 0.0
    problems = []
    if depth > settings.health_max_inbox_files:
        problems.append(f"{depth} files, over {settings.health_max_inbox_files} (LORA_HEALTH_MAX_INBOX_FILES)")
    if listed and oldest_min > settings.health_max_inbox_age_minutes:
        problems.append(
            f"the oldest ({listed[0][1]}) waits {oldest_min:.0f} min, over "
            f"{settings.health_max_inbox_age_minutes:g} (LORA_HEALTH_MAX_INBOX_AGE_MINUTES)"
        )
    if problems:
        text = (
            "webhook inbox: " + "; ".join(problems) + ". Is runpod_webhook_sensor running? A file for a job the "
            "registry does not know stays until reconcile_registry applies it"
        )
    else:
        text = f"{depth} webhook files waiting" + (f", the oldest {oldest_min:.0f} min" if listed else "")
    return _result(
        "webhook_inbox",
        not problems,
        text,
        {
            "inbox_files": dg.MetadataValue.int(depth),
            "oldest_file_age_minutes": dg.MetadataValue.float(round(oldest_min, 1)),
            "oldest_file": dg.MetadataValue.text(listed[0][1] if listed else ""),
        },
    )


def _breaker_row(name: str, breaker: CircuitBreaker | None) -> dict[str, str]:
    if breaker is None:
        return {"breaker": name, "seen_by": "this run", "state": "none", "detail": "not used by this configuration"}
    since = breaker.unavailable_since.isoformat(timespec="seconds") if breaker.unavailable_since else ""
    detail = f"unavailable since {since}: {breaker.last_error}" if since else ""
    return {"breaker": name, "seen_by": "this run", "state": breaker.state, "detail": detail}


def last_sensor_skips(instance: dg.DagsterInstance) -> dict[str, str]:
    """The completion sensors' latest tick's skip reason (by sensor name), where it names an outage:
    the breakers live in the daemon's process, and its ticks say when one is open."""
    from dagster._core.scheduler.instigation import InstigatorType

    skips: dict[str, str] = {}
    try:
        states = instance.all_instigator_state(instigator_type=InstigatorType.SENSOR)
        for state in states:
            if state.instigator_name not in COMPLETION_SENSORS:
                continue
            ticks = instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=1)
            reason = ticks[0].skip_reason if ticks else None
            if reason and reason.startswith(OUTAGE_SKIPS):
                skips[state.instigator_name] = reason
    except Exception:  # noqa: BLE001 - best effort: an instance without schedule storage has no ticks
        return skips
    return skips


def check_breakers(rows: list[dict[str, str]], skips: dict[str, str]) -> dg.AssetCheckResult:
    """``circuit_breakers``: open in this run's process, or the sensors' last tick skipped on an outage."""
    rows = rows + [
        {"breaker": "sensor tick", "seen_by": name, "state": "skipped", "detail": reason}
        for name, reason in sorted(skips.items())
    ]
    down = [r for r in rows if r["state"] in ("open", "half-open", "skipped")]
    if down:
        text = (
            "outage: "
            + "; ".join(f"{r['breaker']} ({r['seen_by']}) {r['state']}: {r['detail']}" for r in down)
            + ". Check the endpoint (S3 or RunPod); nothing needs doing once it is back"
        )
    else:
        text = "every circuit breaker is closed"
    return _result(
        "circuit_breakers",
        not down,
        text,
        {
            "open": dg.MetadataValue.int(len(down)),
            "breakers": dg.MetadataValue.table(records=[dg.TableRecord(r) for r in rows], schema=_BREAKER_SCHEMA),
        },
    )


def check_reconciliation(instance: dg.DagsterInstance, settings: Settings, now: datetime) -> dg.AssetCheckResult:
    """``recent_reconciliation``: how long ago the last successful ``reconcile_registry`` run ended.
    Before the first one, the instance's first run is the baseline: a new deployment is not late."""
    records = instance.get_run_records(
        filters=dg.RunsFilter(job_name=reconcile_registry.name, statuses=[dg.DagsterRunStatus.SUCCESS]), limit=1
    )
    limit_h = settings.health_max_reconcile_age_hours
    ended = records[0].end_time if records else None
    if ended is None:
        first = instance.get_run_records(limit=1, ascending=True)
        since_h = max(0.0, (now.timestamp() - first[0].create_timestamp.timestamp()) / 3600) if first else 0.0
        late = since_h > limit_h
        text = f"no reconcile_registry run has succeeded yet (the first run here was {since_h:.1f} h ago)"
        if late:
            text += ": turn on reconcile_registry_schedule under Automation, or launch the job"
        return _result(
            "recent_reconciliation",
            not late,
            text,
            {
                "hours_since": dg.MetadataValue.float(round(since_h, 2)),
                "limit_hours": dg.MetadataValue.float(limit_h),
            },
        )
    age_h = max(0.0, (now.timestamp() - ended) / 3600)
    passed = age_h <= limit_h
    text = f"the last successful reconciliation ended {age_h:.1f} h ago"
    if not passed:
        text += (
            f", over {limit_h:g} h (LORA_HEALTH_MAX_RECONCILE_AGE_HOURS): is reconcile_registry_schedule on, "
            "and do its runs fail? Look at its latest run"
        )
    return _result(
        "recent_reconciliation",
        passed,
        text,
        {
            "hours_since": dg.MetadataValue.float(round(age_h, 2)),
            "limit_hours": dg.MetadataValue.float(limit_h),
            "last_run_id": dg.MetadataValue.text(records[0].dagster_run.run_id),
        },
    )


def _store_down(name: str, exc: StorageError) -> dg.AssetCheckResult:
    return _result(name, False, f"object store unavailable, nothing measured: {exc}", {})


def lag_observations(lags: list[StyleLag], instance: dg.DagsterInstance, limit_h: float) -> list[dg.AssetObservation]:
    """The per-style view of the lag: one observation of ``lora_registry[style]`` for each style
    with a job or a submission unfinished (a style with none has nothing to say, and hundreds of
    idle styles must not add an event every 10 minutes). Styles the instance has no partition
    for are left to the overall table."""
    known = set(instance.get_dynamic_partitions(STYLES_PARTITIONS_NAME))
    observations = []
    for lag in lags:
        if not (lag.unfinished or lag.submitting) or lag.style not in known:
            continue
        late = lag.oldest_age_h is not None and lag.oldest_age_h > limit_h
        observations.append(
            dg.AssetObservation(
                asset_key=ASSET,
                partition=lag.style,
                description=f"{lag.style}: {lag.unfinished + lag.submitting} unfinished, the oldest {lag.oldest}"
                + (f", over {limit_h:g} h (LORA_HEALTH_MAX_JOB_AGE_HOURS)" if late else ""),
                metadata={
                    "unfinished_jobs": lag.unfinished,
                    "submitting": lag.submitting,
                    "oldest": lag.oldest,
                    "oldest_age_hours": dg.MetadataValue.float(lag.oldest_age_h or 0.0),
                    "over_limit": late,
                },
            )
        )
    return observations


@dataclass(frozen=True)
class Health:
    """The checks' results and the per-style lag observations of one evaluation."""

    results: list[dg.AssetCheckResult]
    observations: list[dg.AssetObservation]


def evaluate_health(
    store: ObjectStore,
    instance: dg.DagsterInstance,
    *,
    runpod_breaker: CircuitBreaker | None = None,
    settings: Settings | None = None,
    now: datetime | None = None,
) -> Health:
    """Every health check's result and the lagging styles' observations: the store is read twice
    (index, inbox listing), the instance twice (partitions, runs)."""
    settings = settings or get_settings()
    now = now or datetime.now(UTC)
    results: list[dg.AssetCheckResult] = []
    observations: list[dg.AssetObservation] = []
    try:
        index, _ = RegistryStore(store).fresh_index(repair=False)
        lags = style_lags(index, now)
        results.extend(check_unfinished_jobs(lags, settings))
        observations = lag_observations(lags, instance, settings.health_max_job_age_hours)
    except StorageError as exc:
        results += [_store_down("oldest_unfinished_job", exc), _store_down("jobs_waiting_for_status", exc)]
    try:
        results.append(check_inbox(store, settings, now))
    except StorageError as exc:
        results.append(_store_down("webhook_inbox", exc))
    rows = [_breaker_row("object store", getattr(store, "breaker", None)), _breaker_row("RunPod", runpod_breaker)]
    results.append(check_breakers(rows, last_sensor_skips(instance)))
    results.append(check_reconciliation(instance, settings, now))
    return Health(results, observations)


@dg.multi_asset_check(
    specs=[
        dg.AssetCheckSpec(name, asset=ASSET, description=text, blocking=False) for name, text in HEALTH_CHECKS.items()
    ],
    can_subset=True,
    name="pipeline_health_checks",
)
def pipeline_health_checks(
    context: dg.AssetCheckExecutionContext, storage: StorageResource, training_backend: TrainingBackendResource
) -> Iterator[dg.AssetCheckResult]:
    """Lag and health of the whole pipeline, one result per check (per-style tables in the metadata)."""
    selected = {key.name for key in context.selected_asset_check_keys}
    try:
        store = storage.get_sensor_store()  # bounded timeouts: a check must not hang on a stalled store
    except StorageError as exc:
        yield from (_store_down(name, exc) for name in HEALTH_CHECKS if name in selected)
        return
    health = evaluate_health(store, context.instance, runpod_breaker=training_backend.runpod_breaker(store))
    if "oldest_unfinished_job" in selected:
        for observation in health.observations:
            context.op_execution_context.log_event(observation)
    yield from (r for r in health.results if r.check_name in selected)


pipeline_health = dg.define_asset_job(
    "pipeline_health",
    selection=dg.AssetSelection.checks(*HEALTH_CHECK_KEYS),
    description="The lag and health checks of lora_registry alone (no materialization).",
    tags={"lora_pipeline/kind": "health"},
)


@dg.schedule(
    job=pipeline_health,
    cron_schedule=get_settings().health_cron,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every 10 minutes by default (LORA_HEALTH_CRON): the lag and health checks.",
)
def pipeline_health_schedule() -> dg.RunRequest:
    return dg.RunRequest()
