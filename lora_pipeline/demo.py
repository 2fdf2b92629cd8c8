"""The whole chain, headless, on the embedded defaults: what ``lora-pipeline demo`` runs.

It uses the real Definitions (same assets, job, sensors and resources as the
UI) in a temporary Dagster instance, and drives the sensors by hand as the daemon
would (``SensorDaemon``): dataset → train_lora → the completion sensors' ticks, every
run they request executed (``complete_training``, and the ``reconcile_registry`` that
settles a job RunPod forgot from its file in the store) until the version is settled.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from lora_pipeline.contracts.families import BaseModelRefused
from lora_pipeline.defs.partitions import STYLES_PARTITIONS_NAME
from lora_pipeline.lifecycle.base_models import launch_family
from lora_pipeline.registry.merge import find_version_by_job
from lora_pipeline.registry.models import RegistryDocument, VersionStatus
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.storage.factory import open_configured_store

# Dagster's console logger prints every event at DEBUG to stderr, where the demo's own
# "[n/4]" lines go: keep its warnings and errors only (a failed step is reported by _check).
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def quiet(run_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``run_config`` with the console logger at WARNING."""
    return {**(run_config or {}), **QUIET}


@contextlib.contextmanager
def quiet_dagster() -> Iterator[None]:
    """Loading the definitions warns about beta APIs, and Dagster logs through the ``dagster``
    logger: neither is the demo's progress. Warnings and errors still show."""
    logger = logging.getLogger("dagster")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dg.BetaWarning)
            warnings.simplefilter("ignore", dg.PreviewWarning)
            yield
    finally:
        logger.setLevel(level)


class DemoStepFailed(RuntimeError):
    """One step of the demo failed; ``step`` names it for the exit message."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"demo step '{step}' failed: {reason}")
        self.step = step


@dataclass(frozen=True)
class DemoResult:
    style: str
    job_id: str
    document: RegistryDocument
    seconds: float


def run_demo(
    style: str = "sample_style",
    *,
    base_model: str = "tiny",
    model_family: str = "auto",
    timeout_s: float = 300.0,
    poll_interval_s: float = 1.0,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Materialize the dataset, train, let a sensor notice completion, record it. A base model no
    family trains, or one of another family than ``model_family``, fails before anything runs."""
    try:
        launch_family(base_model, model_family)
    except BaseModelRefused as exc:
        raise DemoStepFailed("launch check", str(exc)) from None
    with quiet_dagster():
        return _run_demo(
            style, base_model, model_family, timeout_s=timeout_s, poll_interval_s=poll_interval_s, echo=echo
        )


def _run_demo(
    style: str,
    base_model: str,
    model_family: str,
    *,
    timeout_s: float,
    poll_interval_s: float,
    echo: Callable[[str], None],
) -> DemoResult:
    from lora_pipeline.definitions import defs

    started = time.monotonic()
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(STYLES_PARTITIONS_NAME, [style])

        echo(f"[1/4] materializing training_dataset for {style}")
        _check(
            "training_dataset",
            defs.resolve_implicit_global_asset_job_def().execute_in_process(
                instance=instance,
                partition_key=style,
                asset_selection=[dg.AssetKey("training_dataset")],
                run_config=quiet(),
                raise_on_error=False,
            ),
        )

        echo(f"[2/4] running train_lora on {base_model} (submits the job to the training backend)")
        train = defs.resolve_job_def("train_lora").execute_in_process(
            instance=instance,
            partition_key=style,
            run_config=quiet(
                {
                    "ops": {
                        "submit_lora_training": {
                            "config": {
                                "wait_for_completion": False,
                                "base_model": base_model,
                                "model_family": model_family,
                            }
                        }
                    }
                }
            ),
            raise_on_error=False,
        )
        _check("train_lora", train)
        job_id = train.output_for_node("submit_lora_training")
        echo(f"      job {job_id} submitted")

        echo("[3/4] ticking the completion sensors, running every run they request")
        daemon = SensorDaemon(defs, instance)
        registry = RegistryStore(open_configured_store())  # what the Definitions' resources open
        document = _run_until_settled(daemon, registry, style, job_id, timeout_s, poll_interval_s, echo)
        echo(f"[4/4] recorded: {', '.join(f'{v.name} {v.status.value}' for v in document.versions)}")
    return DemoResult(style, job_id, document, time.monotonic() - started)


def _check(step: str, result: dg.ExecuteInProcessResult) -> None:
    if result.success:
        return
    failures = [
        error_text(event.event_specific_data)
        for event in result.all_events
        if event.is_step_failure and event.event_specific_data is not None
    ]
    raise DemoStepFailed(step, "; ".join(failures) or "run failed")


def error_text(failure: Any) -> str:
    """A step failure's own message: a dg.Failure's description, else the exception chain."""
    if failure.user_failure_data is not None and failure.user_failure_data.description:
        return failure.user_failure_data.description
    error, parts = failure.error, []
    while error is not None:
        parts.append(error.message.strip())
        error = error.cause
    return " ← ".join(parts[1:] or parts)


COMPLETION_SENSORS = ("runpod_webhook_sensor", "runpod_job_sensor")
RUN_KEY_TAG = "dagster/run_key"
SENSOR_TAG = "dagster/sensor_name"


@dataclass
class Tick:
    """One sensor evaluation: what it answered, what it requested, the runs it launched."""

    sensor: str
    result: Any  # what the sensor returned: a SensorResult, a SkipReason, None
    requests: list[dg.RunRequest]
    runs: list[dg.ExecuteInProcessResult]

    @property
    def skip_message(self) -> str | None:
        skip = getattr(self.result, "skip_reason", None) or (
            self.result if isinstance(self.result, dg.SkipReason) else None
        )
        return skip.skip_message if skip else None


@dataclass
class SensorDaemon:
    """Evaluates sensors as Dagster's daemon does: cursor carried from tick to tick, a run
    key already launched by the same sensor is not launched again, and every requested run
    (whatever its job) executes in process with the request's partition, run config and tags."""

    defs: dg.Definitions
    instance: dg.DagsterInstance
    cursors: dict[str, str | None] = field(default_factory=dict)
    launched: dict[str, set[str]] = field(default_factory=dict)
    ticks: list[Tick] = field(default_factory=list)

    def tick(self, sensor_name: str) -> Tick:
        sensor = self.defs.resolve_sensor_def(sensor_name)
        with dg.build_sensor_context(
            instance=self.instance,
            resources=self.defs.resources,
            cursor=self.cursors.get(sensor_name),
            definitions=self.defs,
        ) as context:
            context.log.setLevel(logging.WARNING)  # its console handler prints INFO: not the demo's progress
            result = sensor(context)
        cursor = getattr(result, "cursor", None)
        if cursor is not None:
            self.cursors[sensor_name] = cursor
        requests = list(getattr(result, "run_requests", None) or [])
        runs = []
        seen = self.launched.setdefault(sensor_name, set())
        for request in requests:
            if request.run_key is not None and request.run_key in seen:
                continue
            if request.run_key is not None:
                seen.add(request.run_key)
            runs.append(self.launch(request, sensor_name))
        tick = Tick(sensor_name, result, requests, runs)
        self.ticks.append(tick)
        return tick

    def launch(self, request: dg.RunRequest, sensor_name: str) -> dg.ExecuteInProcessResult:
        tags = {**request.tags, SENSOR_TAG: sensor_name}
        if request.run_key is not None:
            tags[RUN_KEY_TAG] = request.run_key
        if request.job_name is None:  # every request of the completion sensors names its job
            raise DemoStepFailed(sensor_name, f"a run request without a job: {request}")
        return self.defs.resolve_job_def(request.job_name).execute_in_process(
            instance=self.instance,
            partition_key=request.partition_key,
            run_config=quiet(request.run_config),
            tags=tags,
            raise_on_error=False,
        )


def _run_until_settled(
    daemon: SensorDaemon,
    registry: RegistryStore,
    style: str,
    job_id: str,
    timeout_s: float,
    poll_interval_s: float,
    echo: Callable[[str], None],
) -> RegistryDocument:
    """Tick both completion sensors, running every run they request, until the job's version
    is settled (completed or failed) and one more round requests nothing new."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        launched = 0
        for name in COMPLETION_SENSORS:
            tick = daemon.tick(name)
            for run in tick.runs:
                echo(f"      {name} → {run.job_def.name} ({run.dagster_run.tags.get('lora_pipeline/source', '?')})")
                _check(run.job_def.name, run)
            launched += len(tick.runs)
        document, _ = registry.read(style)
        version = find_version_by_job(document, job_id)
        if version is not None and version.status in (VersionStatus.completed, VersionStatus.failed) and not launched:
            return document
        if not launched:
            time.sleep(poll_interval_s)
    raise DemoStepFailed("sensors", f"job {job_id} not settled within {timeout_s:.0f}s")
