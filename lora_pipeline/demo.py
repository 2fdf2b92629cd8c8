"""The whole chain, headless, on the embedded defaults: what ``lora-pipeline demo`` runs.

It uses the real Definitions (same assets, job, sensors and resources as the
UI) in a temporary Dagster instance, and drives the sensors by hand instead of a
daemon: dataset → train_lora → a completion sensor notices → complete_training.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dagster as dg

from lora_pipeline.defs.partitions import STYLES_PARTITIONS_NAME
from lora_pipeline.registry.models import RegistryDocument
from lora_pipeline.registry_store.documents import RegistryStore

if TYPE_CHECKING:
    from lora_pipeline.defs.resources import StorageResource


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
    timeout_s: float = 300.0,
    poll_interval_s: float = 1.0,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Materialize the dataset, train, let a sensor notice completion, record it."""
    with quiet_dagster():
        return _run_demo(style, base_model, timeout_s=timeout_s, poll_interval_s=poll_interval_s, echo=echo)


def _run_demo(
    style: str, base_model: str, *, timeout_s: float, poll_interval_s: float, echo: Callable[[str], None]
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
                {"ops": {"submit_lora_training": {"config": {"wait_for_completion": False, "base_model": base_model}}}}
            ),
            raise_on_error=False,
        )
        _check("train_lora", train)
        job_id = train.output_for_node("submit_lora_training")
        echo(f"      job {job_id} submitted")

        echo("[3/4] waiting for a completion sensor to notice the job")
        request = _wait_for_completion_request(defs, instance, timeout_s, poll_interval_s, echo)

        echo(f"[4/4] running complete_training (from {request.tags.get('lora_pipeline/source')})")
        _check(
            "complete_training",
            defs.resolve_job_def("complete_training").execute_in_process(
                instance=instance,
                partition_key=request.partition_key,
                run_config=quiet(request.run_config),
                tags=request.tags,
                raise_on_error=False,
            ),
        )
        resources = defs.resources
        assert resources is not None  # the Definitions object names its resources
        storage: StorageResource = resources["storage"]
        store = storage.get_store()
        document, _ = RegistryStore(store).read(style)
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


def _wait_for_completion_request(defs, instance, timeout_s, poll_interval_s, echo) -> dg.RunRequest:
    deadline = time.monotonic() + timeout_s
    cursors: dict[str, str | None] = {}
    resources = defs.resources
    while time.monotonic() < deadline:
        for name in ("runpod_webhook_sensor", "runpod_job_sensor"):
            sensor = defs.resolve_sensor_def(name)
            with dg.build_sensor_context(
                instance=instance, cursor=cursors.get(name), resources=resources, definitions=defs
            ) as context:
                context.log.setLevel(logging.WARNING)  # its console handler prints INFO: not the demo's progress
                result = sensor(context)
            cursors[name] = getattr(result, "cursor", None) or cursors.get(name)
            requests = [r for r in getattr(result, "run_requests", None) or [] if r.job_name == "complete_training"]
            if requests:
                echo(f"      {name} requested a run for job {requests[0].tags.get('lora_pipeline/job')}")
                return requests[0]
        time.sleep(poll_interval_s)
    raise DemoStepFailed("sensors", f"no completion noticed within {timeout_s:.0f}s")
