"""Submitting a training job and recording its outcome: the steps every path shares.

The training op, the ``trained_lora`` asset, both completion sensors' runs and the
demo all go through these functions, so a job is submitted, recorded and
completed the same way whichever path runs it. Dagster-free: the Dagster layer
wraps these and reports metadata.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

from lora_pipeline.clock import SYSTEM_CLOCK, Clock
from lora_pipeline.backends.base import ExecutionPolicy, RunPodError, SubmitOutcomeUnknown, TrainingBackend
from lora_pipeline.contracts.job_status import JobStatus, job_report_from_status
from lora_pipeline.contracts.families import check_timestep_shift
from lora_pipeline.contracts.presets import preset_for
from lora_pipeline.contracts.training import TINY_MODELS, ModelFamily, TrainingParams, TrainingRequest
from lora_pipeline.dataset.versions import current_dataset
from lora_pipeline.lifecycle.base_models import launch_family
from lora_pipeline.lifecycle.progress import ProgressWatch
from lora_pipeline.registry.evidence import StoredLora, Submission
from lora_pipeline.registry.jobids import base_job_id
from lora_pipeline.registry.merge import find_version_by_job
from lora_pipeline.registry.models import Version, VersionStatus
from lora_pipeline.registry.names import parse_version_name
from lora_pipeline.registry.safetensors_header import InvalidLoraFile
from lora_pipeline.registry_store.documents import ClaimLost, ClaimResult, RegistryStore
from lora_pipeline.registry_store.lora_files import read_header
from lora_pipeline.storage import ObjectStore, StorageError
from lora_pipeline.storage.keys import lora_key

# How long a claim that has not reached POST /run keeps others off (then it is taken over),
# and how long a POST may take before others stop waiting for its job id.
CLAIM_LEASE = timedelta(seconds=60)
POSTING_LEASE = timedelta(seconds=300)
WAIT_FOR_OTHER_SUBMITTER_S = 330.0


class NoDatasetError(RuntimeError):
    """Training was asked for a style that has no dataset version yet."""


class SubmissionInFlight(RuntimeError):
    """Another submitter holds the claim on this version and has not recorded a job yet."""


class SubmissionUnknown(RuntimeError):
    """A POST /run for this version may have queued a job whose id was never learned.

    Never resubmitted (that could train twice): the job's webhook or output, which
    name its request id, attaches it; reconciliation fails the version if nothing
    appears within the maximum job age. ``force`` trains a new version meanwhile.
    """

    def __init__(self, style: str, version: Version) -> None:
        note = version.claim.note if version.claim and version.claim.note else "a submission was under way"
        super().__init__(
            f"{style} {version.name}: RunPod may or may not have queued its job ({note}); it is "
            "recorded as submitted with an unknown id and will not be sent again. Its webhook, its "
            "output or reconciliation attaches the job; if none appears within the maximum job age "
            "it is marked failed. Train a new version meanwhile with force=true."
        )
        self.style = style
        self.version = version


@dataclass(frozen=True)
class Submitted:
    """The outcome of a submission: which version, which job, and whether it was new."""

    style: str
    version: str
    job_id: str
    dataset_hash: str
    reused: bool


@dataclass(frozen=True)
class Completion:
    """What recording a finished job established."""

    style: str
    version: Version | None
    status: str
    lora_key: str | None
    lora_metadata: dict[str, str] = field(default_factory=dict)
    problem: str | None = None


def submit_training(
    *,
    store: ObjectStore,
    backend: TrainingBackend,
    style: str,
    params: TrainingParams,
    base_model: str = "tiny",
    family: ModelFamily | None = None,
    storage_url: str | None = None,
    webhook_url: str | None = None,
    force: bool = False,
    claim_lease: timedelta = CLAIM_LEASE,
    posting_lease: timedelta = POSTING_LEASE,
    wait_for_other_s: float = WAIT_FOR_OTHER_SUBMITTER_S,
    clock: Clock = SYSTEM_CLOCK,
    new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
) -> Submitted:
    """Claim the version, submit its job and record the id: at most one job per version.

    Idempotent: a version already submitted (or completed, unless ``force``) for this
    dataset and these settings is returned instead of a new job. When another
    submitter holds the claim (a second click, a sensor and a click) this waits up to
    ``wait_for_other_s`` for its job id and reuses it. The claim and each step after
    it are in the registry before the next one happens, so a run that dies anywhere
    leaves evidence: a claim that never reached ``posting`` is taken over once its
    lease runs out; a POST whose answer was lost is recorded as "submitted, id
    unknown" (SubmissionUnknown) and never repeated. ``clock`` stamps the claim and the
    submission and paces the waits; ``new_id`` makes the claim's owner and request ids (a
    simulation draws them from its seed). ``family``: the base model's family as the launch
    check found it (``launch_choice``); the request names it, so the worker refuses another.
    """
    # Long only in lines: a keyword-only signature and docstring of 25 lines; claim and post are
    # named steps (_claim_version, _post_job).
    manifest = current_dataset(store, style)
    if manifest is None:
        raise NoDatasetError(
            f"style {style!r} has no dataset yet: materialize training_dataset for it "
            "or run `lora-pipeline dataset add`"
        )
    registry = RegistryStore(store, clock=clock)
    param_dict = params.model_dump(mode="json")
    owner = new_id()
    claimed = _claim_version(
        registry,
        style,
        manifest.dataset_hash,
        param_dict,
        owner=owner,
        force=force,
        claim_lease=claim_lease,
        wait_for_other_s=wait_for_other_s,
        clock=clock,
        new_id=new_id,
        model=(family, base_model),
    )
    version = claimed.version
    if claimed.kind == "existing":
        return Submitted(style, version.name, version.id or "", manifest.dataset_hash, reused=True)
    request = TrainingRequest(
        style=style,
        version=version.name,
        dataset_hash=manifest.dataset_hash,
        base_model=base_model,
        model_family=family or "auto",
        params=params,
        storage_url=storage_url,
        request_id=version.request_id or owner,
    )
    job_id, version = _post_job(
        registry, backend, style, version, request, params, webhook_url=webhook_url, posting_lease=posting_lease
    )
    _record_submission(
        registry,
        Submission(
            style=style,
            version=version.name,
            request_id=request.request_id,
            job_id=job_id,
            dataset_hash=manifest.dataset_hash,
            params=param_dict,
            at=clock.now(),
            family=None if request.model_family == "auto" else request.model_family,
            base_model=base_model,
        ),
        sleep=clock.sleep,
    )
    return Submitted(style, version.name, job_id, manifest.dataset_hash, reused=False)


def _claim_version(
    registry: RegistryStore,
    style: str,
    dataset_hash: str,
    param_dict: dict[str, Any],
    *,
    owner: str,
    force: bool,
    claim_lease: timedelta,
    wait_for_other_s: float,
    clock: Clock,
    new_id: Callable[[], str],
    model: tuple[str | None, str | None] = (None, None),
) -> ClaimResult:
    """The claim on the version to submit (kind ``claimed``), or the version that already has a
    job (kind ``existing``); waits while another submitter holds the claim.

    Raises SubmissionUnknown for a version whose POST may have queued a job (never sent
    twice), SubmissionInFlight when the other submitter's job id does not appear in time.
    """
    deadline = clock.monotonic() + wait_for_other_s
    while True:
        claimed = registry.claim_version(
            style,
            request_id=new_id(),
            dataset_hash=dataset_hash,
            params=param_dict,
            owner=owner,
            lease=claim_lease,
            reuse_completed=not force,
            family=model[0],
            base_model=model[1],
        )
        version = claimed.version
        if claimed.kind in ("existing", "claimed"):
            return claimed
        if claimed.kind == "unknown":
            raise SubmissionUnknown(style, version)
        if clock.monotonic() >= deadline:
            raise SubmissionInFlight(
                f"{style} {version.name} is being submitted by another run (claim of "
                f"{version.claim.owner if version.claim else '?'}); its job id did not appear within "
                f"{wait_for_other_s:.0f}s: look at the registry, or retry"
            )
        clock.sleep(0.25)


def _post_job(
    registry: RegistryStore,
    backend: TrainingBackend,
    style: str,
    version: Version,
    request: TrainingRequest,
    params: TrainingParams,
    *,
    webhook_url: str | None,
    posting_lease: timedelta,
) -> tuple[str, Version]:
    """POST /run under a claim moved to ``posting`` first; returns (job id, the version as claimed).

    A failed POST is recorded on the claim: ``unknown`` when a job may have been queued
    (SubmissionUnknown: never repeated), ``released`` when it certainly was not.
    """
    policy = ExecutionPolicy.from_training(params.max_train_steps)
    try:
        version = registry.advance_claim(style, version, "posting", lease=posting_lease)
    except ClaimLost as exc:
        raise SubmissionInFlight(str(exc)) from None
    # Recording the outcome of a failed POST is best effort: if the store fails too, the
    # claim stays "posting", which once its lease ends reads as "unknown" (the safe side).
    try:
        job_id = backend.submit(request, webhook_url=webhook_url, policy=policy)
    except SubmitOutcomeUnknown as exc:
        with contextlib.suppress(StorageError):
            version = registry.advance_claim(style, version, "unknown", note=str(exc))
        raise SubmissionUnknown(style, version) from exc
    except RunPodError as exc:  # refused, rate limited or unreachable: certainly not queued
        with contextlib.suppress(StorageError):
            registry.advance_claim(style, version, "released", note=f"{type(exc).__name__}: {exc}")
        raise
    return job_id, version


def _record_submission(
    registry: RegistryStore, submission: Submission, *, sleep: Callable[[float], None], attempts: int = 4
) -> None:
    """Record a new job id, retrying a failing store: the job exists now, and until its id is
    recorded only its webhook or output (which name the request) can attach it."""
    for attempt in range(attempts):
        try:
            registry.apply(submission.style, [submission])
            return
        except StorageError:
            if attempt == attempts - 1:
                raise
            sleep(0.5 * 2**attempt)


def wait_for_job(
    backend: TrainingBackend,
    job_id: str,
    *,
    timeout_s: float,
    poll_interval_s: float = 2.0,
    on_status: Callable[[JobStatus], None] | None = None,
    log: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
    stall_after_s: float | None = None,
    cancel_stalled: bool = False,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> JobStatus:
    """Poll until the job is terminal or ``timeout_s`` passes (TimeoutError).

    Each new progress update of the running job is one ``log`` line (step/total, loss);
    a bad update is a ``warn`` line and is ignored. A job with no new update for
    ``stall_after_s`` is reported stalled (``warn``, once) and, with ``cancel_stalled``,
    cancelled: the backend's answer is returned as the job's outcome.

    If the wait is interrupted (the Dagster run is cancelled, Ctrl-C) the job is
    cancelled too: nobody would be waiting for it. A timeout or an error while
    polling leaves it running, for the sensors and reconciliation to finish.
    """
    deadline = clock() + timeout_s
    last: str | None = None
    say = log or (lambda _msg: None)
    alarm = warn or say
    watch = ProgressWatch(stall_after_s=stall_after_s, clock=clock)
    try:
        while True:
            status = backend.status(job_id)
            if on_status and status.status != last:
                on_status(status)
                last = status.status
            if status.is_terminal:
                return status
            stalled = watch.observe(status, say, alarm)
            if stalled is not None:
                alarm(stalled + ("; cancelling it (LORA_CANCEL_STALLED)" if cancel_stalled else ""))
                if cancel_stalled:
                    answer = backend.cancel(job_id)
                    alarm(f"job {job_id}: the backend answered the cancel with {answer.status}")
                    if answer.is_terminal:
                        return answer
            if clock() >= deadline:
                raise TimeoutError(f"job {job_id} still {status.status} after {timeout_s:.0f}s")
            sleep(poll_interval_s)
    except Exception:
        raise
    except BaseException:
        backend.cancel(job_id)
        raise


def _with_sample_urls(store: ObjectStore, status: JobStatus) -> JobStatus:
    """``status`` with the store's stable URL on each sample image its output lists without one
    (an older worker's bare ``sample_keys`` become ``samples`` entries), so the registry links them."""
    output = status.output if isinstance(status.output, dict) else None
    if not output or not (output.get("samples") or output.get("sample_keys")):
        return status
    listed = output.get("samples") or [{"key": k} for k in output.get("sample_keys") or [] if isinstance(k, str)]
    samples = []
    for entry in listed:
        if isinstance(entry, dict) and isinstance(entry.get("key"), str):
            try:
                entry = {**entry, "url": entry.get("url") or store.url(entry["key"])}
            except ValueError:  # a key the store refuses stays without a URL
                pass
        samples.append(entry)
    return status.model_copy(update={"output": {**output, "samples": samples}})


def record_completion(
    store: ObjectStore,
    style: str,
    status: JobStatus,
    *,
    source: Literal["poll", "webhook"],
    clock: Clock = SYSTEM_CLOCK,
) -> Completion:
    """Apply a terminal status report to the registry, with the LoRA file as proof.

    Completion counts only when the file is in the store and its header parses: a
    job that ends COMPLETED with no output, or with an ``error`` in its output, is
    recorded as failed unless the file proves otherwise.
    """
    registry = RegistryStore(store, clock=clock)
    at = clock.now()
    report = job_report_from_status(_with_sample_urls(store, status), at=at, source=source)
    document, _ = registry.read(style)
    known = find_version_by_job(document, report.job_id)
    key = _expected_lora_key(style, status, known)
    evidence: list = [report]
    metadata: dict[str, str] = {}
    problem = None
    if key is not None:
        try:
            header = read_header(store, key)
        except InvalidLoraFile as exc:
            problem = str(exc)
        else:
            info = store.head(key)
            number = (parse_version_name(known.name) if known else None) or _number_from_key(style, key)
            evidence.append(
                StoredLora(
                    style=style,
                    key=key,
                    version_number=number,
                    url=store.url(key),
                    size=info.size if info else 0,
                    etag=info.etag if info else "",
                    metadata=header.metadata,
                    at=info.last_modified if info else at,
                    layout=header.layout,
                    checksum=header.checksum,
                )
            )
            metadata = header.metadata
            evidence.extend(_companion_evidence(store, style, number, status.output))
    result = registry.apply(style, evidence)
    version = find_version_by_job(result.document, report.job_id)
    if version is None and metadata:
        # The webhook beat the submitting run's write of the job id: the file completed
        # the version reserved for it, which gets its job id when the submission lands.
        version = next((v for v in result.document.versions if v.s3_key == key and v.id is None), None)
    return Completion(
        style=style,
        version=version,
        status=version.status.value if version else report.status,
        lora_key=key if metadata else None,
        lora_metadata=metadata,
        problem=problem,
    )


def completion_from_store(store: ObjectStore, style: str, job_id: str) -> JobStatus | None:
    """How a job RunPod no longer knows (its status expired: 404) ended, read from the store.

    COMPLETED when the version holding the job has its file at its key, readable, and written for
    it (the header names the version's request id, or this job): the worker publishes the file,
    create-only, only after training succeeded and just before it returns, so the file is the
    job's completion whatever RunPod has forgotten. The status carries the file as its output,
    so recording it (``record_completion``) verifies the file again and completes the version.
    None when there is no such file (yet): the caller settles the job otherwise (reconciliation
    completes it if the file lands later, or fails it after the maximum job age). Lets
    StorageError through.
    """
    document, _ = RegistryStore(store).read(style)
    version = find_version_by_job(document, job_id)
    number = parse_version_name(version.name) if version is not None else None
    if version is None or number is None:
        return None
    key = lora_key(style, number)
    try:
        metadata = read_header(store, key).metadata
    except InvalidLoraFile:
        return None
    written_for = metadata.get("lora_pipeline.request_id")
    by_job = metadata.get("lora_pipeline.job_id")
    if not (
        (version.request_id and written_for == version.request_id)
        or (by_job and base_job_id(by_job) == base_job_id(job_id))
    ):
        return None  # another request's file under this version's name: not this job's evidence
    output = {"style": style, "version": version.name, "lora_key": key}
    if written_for:
        output["request_id"] = written_for
    return JobStatus(id=job_id, status="COMPLETED", output=output)


def _expected_lora_key(style: str, status: JobStatus, known: Version | None) -> str | None:
    output = status.output
    if isinstance(output, dict) and isinstance(output.get("lora_key"), str):
        return output["lora_key"]
    if known is not None:
        number = parse_version_name(known.name)
        if number is not None:
            return lora_key(style, number)
    return None


def _companion_evidence(store: ObjectStore, style: str, number: int, output: object) -> list:
    """The version's files in its other layouts, as the job's output names them (``files``,
    ``kohya_key``) or by the naming rule (``…_v<N>_kohya.safetensors``). Only this version's
    file names of this style count; one that is missing or unreadable is left for
    reconciliation (the main file alone completes the version)."""
    from lora_pipeline.lifecycle.reconcile import stored_evidence
    from lora_pipeline.registry.names import parse_lora_file
    from lora_pipeline.storage.keys import companion_key, lora_prefix

    named: list[object] = [companion_key(style, number, "kohya")]
    if isinstance(output, dict):
        named.append(output.get("kohya_key"))
        if isinstance(output.get("files"), dict):
            named.extend(output["files"].values())
    found = []
    for key in dict.fromkeys(k for k in named if isinstance(k, str)):
        name = key[len(lora_prefix(style)) :] if key.startswith(lora_prefix(style)) else ""
        parsed = parse_lora_file(style, name) if "/" not in name else None
        if parsed is None or parsed[1] is None or parsed[0] != number:
            continue
        info = store.head(key)
        if info is None:
            continue
        try:
            header = read_header(store, key, size=info.size)
        except InvalidLoraFile:
            continue
        found.append(stored_evidence(store, style, key, parsed, header, info))
    return found


def _number_from_key(style: str, key: str) -> int:
    from lora_pipeline.registry.names import parse_lora_filename

    number = parse_lora_filename(style, key.rsplit("/", 1)[-1])
    if number is None:
        raise ValueError(f"{key!r} is not a LoRA file of style {style!r}")
    return number


def job_run_key(job_id: str, status: str) -> str:
    """The run key of the run that completes a job: one per job and terminal status."""
    return f"complete:{base_job_id(job_id)}:{status}"


@dataclass(frozen=True)
class LaunchChoice:
    """What a run trains, checked before anything is submitted: the base model, its family as far
    as the orchestrator can read it (None: only the worker can tell, a hub id), and the params
    (the family's preset under the run's own)."""

    base_model: str
    family: ModelFamily | None
    params: TrainingParams


def launch_choice(
    base_model: str, overrides: dict, *, model_family: str = "auto", store: ObjectStore | None = None
) -> LaunchChoice:
    """The run's base model, family and params: the family's preset (``contracts/presets.py``),
    the tiny-model preset for a model built in code, then the run's ``overrides``.

    Raises BaseModelRefused (one line naming both) for a base no family trains or one of another
    family than ``model_family``, and pydantic's ValidationError naming a bad field; ``store``
    lets a ``store:<prefix>`` base be read too.
    """
    family = launch_family(base_model, model_family, store=store)
    params = TrainingParams.model_validate({**preset_for(family, tiny=base_model in TINY_MODELS), **overrides})
    if family is not None:
        check_timestep_shift(params.timestep_shift, family, base_model)
    return LaunchChoice(base_model, family, params)


def training_params(
    base_model: str, overrides: dict, *, model_family: str = "auto", store: ObjectStore | None = None
) -> TrainingParams:
    """The hyperparameters a run trains with (``launch_choice``'s params): validated here, so a
    bad value fails the run before anything is submitted, with a message naming the field."""
    return launch_choice(base_model, overrides, model_family=model_family, store=store).params


def submit_and_wait(
    *,
    store: ObjectStore,
    backend: TrainingBackend,
    style: str,
    base_model: str,
    params: dict,
    model_family: str = "auto",
    force: bool = False,
    timeout_s: float,
    poll_interval_s: float,
    storage_url: str | None = None,
    webhook_url: str | None = None,
    log: Callable[[str], None] = lambda _msg: None,
    warn: Callable[[str], None] | None = None,
    stall_after_s: float | None = None,
    cancel_stalled: bool = False,
    on_submitted: Callable[[Submitted], None] | None = None,
) -> tuple[Submitted, JobStatus | None]:
    """Submit (idempotently) and wait for the job to end; record nothing.

    ``on_submitted`` is told the job before the wait starts (the Dagster step tags its run
    with it, so the completion sensors leave the job to this run).

    The status is None when the submission reused a version that is already completed:
    there is no job to wait for (``completed_version`` reads its outcome). Recording is
    the caller's next step (``record_completion``), so that a GPU slot is held only while
    a job runs.
    """
    choice = launch_choice(base_model, params, model_family=model_family, store=store)
    submitted = submit_training(
        store=store,
        backend=backend,
        style=style,
        params=choice.params,
        base_model=base_model,
        family=choice.family,
        storage_url=storage_url,
        webhook_url=webhook_url,
        force=force,
    )
    log(
        f"{'reusing' if submitted.reused else 'submitted'} job {submitted.job_id} for "
        f"{style} {submitted.version} (dataset {submitted.dataset_hash[:12]})"
    )
    if submitted.reused and completed_version(store, style, submitted.version) is not None:
        return submitted, None
    if on_submitted is not None:
        on_submitted(submitted)
    status = wait_for_job(
        backend,
        submitted.job_id,
        timeout_s=timeout_s,
        poll_interval_s=poll_interval_s,
        on_status=lambda s: log(f"job {s.id}: {s.status}"),
        log=log,
        warn=warn,
        stall_after_s=stall_after_s,
        cancel_stalled=cancel_stalled,
    )
    return submitted, status


def completed_version(store: ObjectStore, style: str, version_name: str) -> Completion | None:
    """The recorded outcome of an already completed version (one a submission reused), or
    None when it is not completed or its file does not parse."""
    document, _ = RegistryStore(store).read(style)
    version = next((v for v in document.versions if v.name == version_name), None)
    if version is None or version.status != VersionStatus.completed:
        return None
    metadata: dict[str, str] = {}
    if version.s3_key:
        try:
            metadata = read_header(store, version.s3_key).metadata
        except InvalidLoraFile:
            return None
    return Completion(style, version, version.status.value, version.s3_key, metadata)
