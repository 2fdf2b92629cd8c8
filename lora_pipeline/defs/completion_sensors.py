"""The completion sensors: notice finished training jobs by webhook file or by status poll.

Both completion sensors turn a finished job into one ``complete_training`` run for
its style, whichever of them sees it first: a run already queued, running or done
for the job (tag ``lora_pipeline/job``: a completion run's, or a hand materialization
of ``trained_lora`` waiting for the job), or a version already settled in the registry
and, if completed, materialized, means nothing is requested again: one
materialization per version. Each tick does bounded work and keeps a
cursor, as Dagster advises, rather than asking for a longer tick timeout.
"""

import hashlib
from collections.abc import Iterable
from datetime import UTC, datetime

import dagster as dg

from lora_pipeline.backends.base import RunPodUnavailable, TrainingBackend
from lora_pipeline.backends.poll import poll_jobs
from lora_pipeline.clock import SYSTEM_CLOCK, Clock
from lora_pipeline.contracts.job_status import JobStatus
from lora_pipeline.defs.jobs import JOB_TAG, complete_training
from lora_pipeline.defs.outages import store_outage_skip
from lora_pipeline.defs.partitions import STYLES_PARTITIONS_NAME
from lora_pipeline.defs.reconcile import reconcile_registry
from lora_pipeline.defs.resources import StorageResource, TrainingBackendResource
from lora_pipeline.lifecycle.progress import record_progress, running_statuses
from lora_pipeline.lifecycle.submit import completion_from_store, job_run_key, record_completion
from lora_pipeline.registry.jobids import base_job_id
from lora_pipeline.registry.merge import find_version_by_job
from lora_pipeline.registry.models import VersionStatus
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.settings import get_settings
from lora_pipeline.storage.base import ObjectStore, StorageError
from lora_pipeline.storage.breaker import is_outage
from lora_pipeline.webhook.inbox import (
    WEBHOOK_REJECTED,
    InboxItem,
    list_inbox,
    route_style,
    mark_processed,
    reject,
)

ACTIVE_RUN_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.SUCCESS,
]
MAX_WEBHOOKS_PER_TICK = 200
POLL_DEADLINE_S = 30.0
POLL_WORKERS = 32
# RunPod allows 2000 /status calls per 10 s; stay under it with room for other callers.
POLL_RATE_PER_S = 150.0
# What fits in one tick at that rate, inside Dagster's 60 s sensor timeout.
MAX_POLLS_PER_TICK = int(POLL_RATE_PER_S * POLL_DEADLINE_S * 0.9)


def settle_expired_request(job_ids: Iterable[str], now: datetime) -> dg.RunRequest:
    """A reconciliation that settles jobs RunPod forgot: completed if their file is in the
    store, failed once older than the maximum job age. At most one per hour for a set."""
    digest = hashlib.sha256("\n".join(sorted(base_job_id(j) for j in job_ids)).encode()).hexdigest()[:16]
    return dg.RunRequest(
        job_name=reconcile_registry.name,
        run_key=f"settle-expired:{now:%Y%m%dT%H}:{digest}",
        tags={"lora_pipeline/source": "poll"},
    )


def completion_request(style: str, status: JobStatus, *, source: str, inbox_key: str | None = None) -> dg.RunRequest:
    """The run that records one finished job: keyed by job and status, so it happens once."""
    return dg.RunRequest(
        job_name=complete_training.name,
        run_key=job_run_key(status.id, status.status),
        partition_key=style,
        tags={JOB_TAG: base_job_id(status.id), "lora_pipeline/source": source},
        run_config={
            "ops": {
                "trained_lora": {
                    "config": {
                        "status_body": status.model_dump_json(),
                        "source": source,
                        "inbox_key": inbox_key,
                    }
                }
            }
        },
    )


def _run_exists(instance: dg.DagsterInstance, job_id: str) -> bool:
    records = instance.get_run_records(
        filters=dg.RunsFilter(tags={JOB_TAG: base_job_id(job_id)}, statuses=ACTIVE_RUN_STATUSES),
        limit=1,
    )
    return bool(records)


def _settled(instance: dg.DagsterInstance, registry: RegistryStore, style: str, status: JobStatus) -> bool:
    """Whether nothing is left to do for this outcome: the registry holds it and, for a completed
    version, ``trained_lora`` was materialized for it (by a completion run, or by the hand
    materialization that waited for the job) or a run for the job was already made (its run key
    would not be run again). A version completed without either (reconciliation found its file)
    still gets its one recording run."""
    document, _ = registry.read(style)
    version = find_version_by_job(document, status.id)
    if version is None:
        return False
    if version.status == VersionStatus.completed:
        return _materialized(instance, style, version.name) or _any_run(instance, status.id)
    return version.status == VersionStatus.failed and not status.succeeded


def _any_run(instance: dg.DagsterInstance, job_id: str) -> bool:
    """Whether any run, in any state, was made for the job."""
    return bool(instance.get_run_records(filters=dg.RunsFilter(tags={JOB_TAG: base_job_id(job_id)}), limit=1))


MATERIALIZATIONS_LOOKED_AT = 50


def _materialized(instance: dg.DagsterInstance, style: str, version: str) -> bool:
    """Whether one of the style's latest ``trained_lora`` materializations is of ``version``."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("trained_lora"), asset_partitions=[style]),
        limit=MATERIALIZATIONS_LOOKED_AT,
    ).records
    for record in records:
        materialization = record.asset_materialization
        value = materialization.metadata.get("version") if materialization is not None else None
        if value is not None and value.value == version:
            return True
    return False


def unfinished_jobs(registry: RegistryStore) -> dict[str, str]:
    """Every unfinished job (id as RunPod returned it) → its style, from the registry index
    (its lagging entries rebuilt from their documents first, so no job is left unpolled)."""
    index, _ = registry.fresh_index()
    return {job.job_id: style for style, summary in index.styles.items() for job in summary.unfinished.values()}


def ensure_partitions(instance: dg.DagsterInstance, styles: Iterable[str]) -> None:
    missing = [s for s in set(styles) if not instance.has_dynamic_partition(STYLES_PARTITIONS_NAME, s)]
    if missing:
        instance.add_dynamic_partitions(STYLES_PARTITIONS_NAME, sorted(missing))


@dg.sensor(
    job=complete_training,
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Reads RunPod webhook files from the inbox and records finished jobs.",
)
def runpod_webhook_sensor(context: dg.SensorEvaluationContext, storage: StorageResource) -> dg.SensorResult:
    """Each webhook file becomes one recording run, at most MAX_WEBHOOKS_PER_TICK a tick.

    The cursor is the position (arrival time and key) of the last file a full
    tick examined: the next tick starts after it, so a burst larger than one tick
    is worked through in turn rather than the same head of the inbox being
    re-examined. Files for jobs the registry does not know yet stay in the inbox
    and are looked at again later. A file that cannot be used (not JSON, not a
    status body) never stops the tick: it moves to ``webhooks/rejected/`` with its
    reason beside it, and the files behind it are handled as usual.
    """
    try:
        store = storage.get_sensor_store()
    except StorageError as exc:
        return dg.SensorResult(skip_reason=store_outage_skip(exc))
    registry = RegistryStore(store)
    requests: list[dg.RunRequest] = []
    notes: list[str] = []
    rejected = 0
    last_examined: InboxItem | None = None
    try:
        job_styles = registry.fresh_index()[0].jobs  # a lagging index must not strand a webhook
        for item in _after_cursor(list(list_inbox(store)), context.cursor):
            if len(requests) + rejected >= MAX_WEBHOOKS_PER_TICK:
                break  # rejections are store work too: a flood of bad files is spread over ticks
            last_examined = item
            status, problem = item.usable_status()
            if status is None:
                notes.append(_reject_unusable(store, item.key, problem))
                rejected += 1
                continue
            style = route_style(job_styles, status)
            if style is None:
                notes.append(f"{item.key}: job {status.id} is not in the registry yet; kept for later")
                continue
            if _settled(context.instance, registry, style, status):
                mark_processed(store, item.key)
                continue
            if _run_exists(context.instance, status.id):
                continue
            requests.append(completion_request(style, status, source="webhook", inbox_key=item.key))
    except StorageError as exc:
        return dg.SensorResult(skip_reason=store_outage_skip(exc))
    for note in notes:
        context.log.warning(note)
    ensure_partitions(context.instance, (r.partition_key for r in requests if r.partition_key))
    full = len(requests) + rejected >= MAX_WEBHOOKS_PER_TICK
    cursor = _inbox_cursor(last_examined) if full and last_examined is not None else None
    if not requests:
        counts = [f"{n} {what}" for n, what in ((len(notes) - rejected, "kept"), (rejected, "rejected")) if n]
        detail = f" ({', '.join(counts)})" if counts else ""
        return dg.SensorResult(skip_reason=dg.SkipReason(f"no new webhook files{detail}"), cursor=cursor)
    return dg.SensorResult(run_requests=requests, cursor=cursor)


def _reject_unusable(store: ObjectStore, key: str, reason: str) -> str:
    """Move an unusable inbox file to webhooks/rejected/ (reason beside it); the note to log."""
    try:
        target = reject(store, key, reason)
    except (StorageError, OSError) as exc:  # an outage, or a file even the move cannot read
        if is_outage(exc):
            raise  # the store is failing: skip the tick now, not after one timeout per file
        return f"{key}: {reason}; could not move it to {WEBHOOK_REJECTED}/ (tried again next tick): {exc}"
    return f"{key}: rejected, moved to {target}: {reason}"


def _inbox_position(item: InboxItem) -> tuple[datetime, str]:
    return (item.received_at or datetime.min.replace(tzinfo=UTC), item.key)


def _inbox_cursor(item: InboxItem) -> str:
    """``<arrival time ISO> <key>``: the inbox is in arrival order, and keys tie-break."""
    when, key = _inbox_position(item)
    return f"{when.isoformat()} {key}"


def _after_cursor(items: list[InboxItem], cursor: str | None) -> list[InboxItem]:
    """The inbox in arrival order, starting after ``cursor`` and wrapping round.

    A cursor that is a bare key (written before files were ordered by arrival
    time) starts from the head once.
    """
    if not cursor:
        return items
    when, _, key = cursor.partition(" ")
    try:
        after = (datetime.fromisoformat(when), key)
    except ValueError:
        return items
    if after[0].tzinfo is None or not key:
        return items
    start = next((i for i, item in enumerate(items) if _inbox_position(item) > after), len(items))
    return items[start:] + items[:start]


@dg.sensor(
    jobs=[complete_training, reconcile_registry],
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Polls the status of unfinished training jobs and records finished ones.",
)
def runpod_job_sensor(
    context: dg.SensorEvaluationContext,
    storage: StorageResource,
    training_backend: TrainingBackendResource,
) -> dg.SensorResult:
    try:
        store = storage.get_sensor_store()
        unfinished = unfinished_jobs(RegistryStore(store))
    except StorageError as exc:
        return dg.SensorResult(skip_reason=store_outage_skip(exc))
    if not unfinished:
        return dg.SensorResult(skip_reason=dg.SkipReason("no unfinished jobs"))
    backend = training_backend.get_backend(store)
    batch, start = _round_robin(sorted(unfinished), context.cursor, MAX_POLLS_PER_TICK)
    try:
        result = poll_jobs(
            backend, batch, max_workers=POLL_WORKERS, deadline_s=POLL_DEADLINE_S, max_rate_per_s=POLL_RATE_PER_S
        )
    except RunPodUnavailable as exc:
        return dg.SensorResult(skip_reason=dg.SkipReason(f"RunPod unavailable: {exc}"))
    if result.unavailable:
        return dg.SensorResult(skip_reason=dg.SkipReason(f"RunPod unavailable: {result.unavailable_reason}"))
    answered = len(result.statuses) + len(result.not_found) + len(result.errors)
    if not answered:  # stalled (or rate limited): the pass gave up at its deadline, so does the tick
        return dg.SensorResult(
            skip_reason=dg.SkipReason(
                f"RunPod unavailable: no status answered within {POLL_DEADLINE_S:.0f} s "
                f"({len(batch)} jobs are polled again next tick)"
            ),
            cursor=context.cursor,
        )
    cursor = str((start + answered) % len(unfinished))
    _track_progress(context, store, backend, result.statuses, unfinished)
    requests = []
    registry = RegistryStore(store)
    for job_id, status in result.terminal.items():
        if _run_exists(context.instance, job_id):
            continue
        try:  # recorded since the index was read (a hand materialization that waited for it)
            if _settled(context.instance, registry, unfinished[job_id], status):
                continue
        except StorageError as exc:
            return dg.SensorResult(skip_reason=store_outage_skip(exc))
        requests.append(completion_request(unfinished[job_id], status, source="poll"))
    expired: list[str] = []
    for job_id in sorted(result.not_found):
        try:  # RunPod forgot it: its file in the store, if there, settles it now
            stored = _completion_from_store(store, unfinished[job_id], job_id)
        except StorageError as exc:
            return dg.SensorResult(skip_reason=store_outage_skip(exc))
        if stored is None:
            expired.append(job_id)
            continue
        context.log.info(f"job {job_id}: unknown to the backend; completed from its file {stored.output}")
        if not _run_exists(context.instance, job_id):
            requests.append(completion_request(unfinished[job_id], stored, source="poll"))
    if expired:
        requests.append(settle_expired_request(expired, datetime.now(UTC)))
        context.log.info(
            f"{len(expired)} jobs are unknown to the backend (results expire 30 min after completion) "
            "and have no file in the store yet; requested reconcile_registry to settle them"
        )
    context.log.info(
        f"polled {len(result.statuses)} of {len(unfinished)} unfinished jobs (from #{start}); "
        f"{len(requests)} finished, {len(result.not_found)} unknown, {len(result.errors)} errors"
    )
    ensure_partitions(context.instance, (r.partition_key for r in requests if r.partition_key))
    if not requests:
        return dg.SensorResult(skip_reason=dg.SkipReason(f"{len(unfinished)} jobs still running"), cursor=cursor)
    return dg.SensorResult(run_requests=requests, cursor=cursor)


def _completion_from_store(
    store: ObjectStore, style: str, job_id: str, clock: Clock = SYSTEM_CLOCK
) -> JobStatus | None:
    """Settle, on this tick, a job RunPod forgot whose file is in the store: the registry records
    it completed at once (``record_completion`` verifies the file), and the status returned is
    handed to the one recording run that materializes ``trained_lora``. None: no file for it."""
    status = completion_from_store(store, style, job_id)
    if status is not None:
        record_completion(store, style, status, source="poll", clock=clock)
    return status


def _track_progress(
    context: dg.SensorEvaluationContext,
    store: ObjectStore,
    backend: TrainingBackend,
    statuses: dict[str, JobStatus],
    styles: dict[str, str],
) -> None:
    """Record running jobs' progress on their versions and flag (or cancel) stalled ones.

    Best effort: a store failure here is logged and the tick goes on with its completions."""
    running = running_statuses(statuses, styles)
    if not running:
        return
    settings = get_settings()
    try:
        tick = record_progress(
            RegistryStore(store),
            backend,
            running,
            now=datetime.now(UTC),
            stall_after_s=settings.stall_after_s,
            cancel_stalled=settings.cancel_stalled,
        )
    except StorageError as exc:
        context.log.warning(f"progress of {len(running)} running jobs not recorded this tick: {exc}")
        return
    for line in (*tick.stalled, *tick.problems):
        context.log.warning(line)
    for job_id, answer in tick.cancelled.items():
        context.log.warning(
            f"job {job_id}: cancelled as stalled (LORA_CANCEL_STALLED); the backend reports {answer.status}"
        )
    if tick.recorded:
        context.log.info(f"recorded the progress of {len(tick.recorded)} running jobs")


def _round_robin(jobs: list[str], cursor: str | None, limit: int) -> tuple[list[str], int]:
    """Up to ``limit`` jobs starting at the cursor's offset, wrapping round.

    With more unfinished jobs than one tick can poll, each tick continues where
    the last one stopped, so every job is polled in turn.
    """
    start = int(cursor) % len(jobs) if cursor and cursor.isdigit() else 0
    return (jobs[start:] + jobs[:start])[:limit], start
