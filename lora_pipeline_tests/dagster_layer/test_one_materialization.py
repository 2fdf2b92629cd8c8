"""One click, one materialization: "Materialize selected" on the three assets records each
version once, whatever the completion sensors see while the run waits for the job and after."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from lora_pipeline.contracts.job_status import JobStatus
from lora_pipeline.definitions import defs
from lora_pipeline.defs.completion_sensors import runpod_job_sensor, runpod_webhook_sensor
from lora_pipeline.defs.jobs import JOB_TAG
from lora_pipeline.defs.resources import TrainingBackendResource
from lora_pipeline.registry.jobids import base_job_id
from lora_pipeline.registry.models import VersionStatus
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.storage.keys import WEBHOOK_INBOX
from lora_pipeline.webhook.inbox import write_webhook
from lora_pipeline_tests.dagster_layer.conftest import StubBackend, submit_pending
from lora_pipeline_tests.registry.lora_files import lora_bytes

STYLE = "sample_style"
LORA_KEY = f"loras/{STYLE}/{STYLE}_v1.safetensors"
ASSETS = ("training_dataset", "trained_lora", "lora_registry")
FAST = {"ops": {"trained_lora": {"config": {"poll_interval_s": 0.01}}}}


class FinishingBackend(StubBackend):
    """A job that is done at its first status poll: the file is in the store and a webhook
    arrived. ``during_wait`` runs then, as a sensor tick would while the run still waits."""

    def __init__(self, store) -> None:
        super().__init__()
        self.store = store
        self.during_wait = None
        self._inside = False

    def status(self, job_id: str) -> JobStatus:
        if job_id in self.answers and self.answers[job_id].status == "IN_QUEUE":
            self.store.put(LORA_KEY, lora_bytes({"lora_pipeline.steps": "30"}))
            self.answers[job_id] = JobStatus(id=job_id, status="COMPLETED", output={"lora_key": LORA_KEY})
            write_webhook(self.store, self.answers[job_id].model_dump_json().encode())
            if self.during_wait is not None and not self._inside:
                self._inside = True  # the job sensor polls this backend too
                try:
                    self.during_wait()
                finally:
                    self._inside = False
        return super().status(job_id)


@pytest.fixture
def finishing(store, monkeypatch) -> FinishingBackend:
    stub = FinishingBackend(store)
    monkeypatch.setattr(TrainingBackendResource, "get_backend", lambda self, store: stub)
    return stub


def tick(sensor, instance) -> dg.SensorResult:
    with dg.build_sensor_context(
        instance=instance,
        resources={"storage": defs.resources["storage"], "training_backend": defs.resources["training_backend"]},
    ) as context:
        return sensor(context)


def materialize_selected(instance) -> dg.ExecuteInProcessResult:
    """What the UI's "Materialize selected" on the three assets launches."""
    instance.add_dynamic_partitions("styles", [STYLE])
    job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection={dg.AssetKey(a) for a in ASSETS})
    return job.execute_in_process(instance=instance, partition_key=STYLE, run_config=FAST)


def materializations(instance, asset: str) -> list[str]:
    """The recorded version of each materialization of ``asset`` (the registry's latest one)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[STYLE]), limit=100
    ).records
    field = "version" if asset == "trained_lora" else "latest_version"
    return [r.asset_materialization.metadata[field].value for r in records]


def test_sensor_ticks_while_the_ui_run_waits_request_no_second_recording(store, instance, finishing):
    seen: list[dg.SensorResult] = []
    finishing.during_wait = lambda: seen.extend(
        [tick(runpod_webhook_sensor, instance), tick(runpod_job_sensor, instance)]
    )

    result = materialize_selected(instance)
    after = [tick(runpod_webhook_sensor, instance), tick(runpod_job_sensor, instance)]

    assert result.success
    assert len(seen) == 2 and all(not r.run_requests for r in seen + after)
    assert materializations(instance, "trained_lora") == ["V1"]
    assert materializations(instance, "lora_registry") == ["V1"]
    [job_id] = finishing.answers
    assert instance.get_run_by_id(result.run_id).tags[JOB_TAG] == base_job_id(job_id)
    assert list(store.list(WEBHOOK_INBOX + "/")) == []  # the webhook was archived, not replayed


def test_a_ui_run_that_failed_before_recording_leaves_the_job_to_the_sensors(store, instance, finishing):
    def fail_the_wait() -> None:
        raise RuntimeError("the run process died")

    finishing.during_wait = fail_the_wait
    instance.add_dynamic_partitions("styles", [STYLE])
    job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection={dg.AssetKey(a) for a in ASSETS})
    result = job.execute_in_process(instance=instance, partition_key=STYLE, run_config=FAST, raise_on_error=False)

    assert not result.success
    [request] = tick(runpod_webhook_sensor, instance).run_requests
    assert request.partition_key == STYLE and request.job_name == "complete_training"


def test_a_version_reconciliation_completed_still_gets_its_one_materialization(store, instance, backend):
    job_id = "26945dbf-4e87-4574-ad26-b1f71e865942"
    submit_pending(store, STYLE, job_id)
    store.put(LORA_KEY, lora_bytes())
    assert defs.resolve_job_def("reconcile_registry").execute_in_process(instance=instance).success
    [version] = RegistryStore(store).read(STYLE)[0].versions
    assert version.status is VersionStatus.completed and not materializations(instance, "trained_lora")
    write_webhook(store, json.dumps({"id": job_id, "status": "COMPLETED", "output": {"lora_key": LORA_KEY}}).encode())

    [request] = tick(runpod_webhook_sensor, instance).run_requests
    run = defs.resolve_job_def("complete_training").execute_in_process(
        instance=instance, partition_key=STYLE, run_config=request.run_config, tags=request.tags
    )

    assert run.success
    assert not tick(runpod_webhook_sensor, instance).run_requests
    assert materializations(instance, "trained_lora") == ["V1"]


def test_a_job_whose_recording_run_failed_and_reconciliation_completed_is_archived(store, instance, backend):
    """Its run key was used: a second request would never run, so the webhook file is archived."""
    job_id = "26945dbf-4e87-4574-ad26-b1f71e865942"
    submit_pending(store, STYLE, job_id)
    instance.add_dynamic_partitions("styles", [STYLE])
    store.put(LORA_KEY, b"not yet a safetensors file")
    write_webhook(store, json.dumps({"id": job_id, "status": "COMPLETED", "output": {"lora_key": LORA_KEY}}).encode())
    [request] = tick(runpod_webhook_sensor, instance).run_requests
    failed = defs.resolve_job_def("complete_training").execute_in_process(
        instance=instance, partition_key=STYLE, run_config=request.run_config, tags=request.tags, raise_on_error=False
    )
    assert not failed.success
    store.put(LORA_KEY, lora_bytes())
    assert defs.resolve_job_def("reconcile_registry").execute_in_process(instance=instance).success
    late = {"id": job_id, "status": "COMPLETED", "output": {"lora_key": LORA_KEY}, "delayTime": 1}
    store.put(f"{WEBHOOK_INBOX}/late.json", json.dumps(late).encode())  # a late second delivery
    assert list(store.list(WEBHOOK_INBOX + "/"))

    assert not tick(runpod_webhook_sensor, instance).run_requests
    assert list(store.list(WEBHOOK_INBOX + "/")) == []


def test_other_sample_settings_render_samples_for_the_existing_version_without_training(
    store, instance, finishing, monkeypatch
):
    """Issue 23: asking for samples trained a whole new V2 whose tensors equalled V1's. Sample
    settings are no part of a version's identity: the run reuses V1 and renders its samples."""
    from datetime import UTC, datetime

    import lora_pipeline.defs.jobs as jobs
    from lora_pipeline.registry.evidence import SamplesRendered
    from lora_pipeline.registry.models import SampleImage

    rendered: list[tuple[str, int, int]] = []

    def render(storage_url, style, version, params):  # noqa: ANN001, ANN202 - the subprocess, as it records
        rendered.append((version.name, params.num_sample_images, params.sample_inference_steps))
        samples = tuple(SampleImage(f"loras/{style}/{style}_v1_sample_{i}.png", "p", i) for i in range(3))
        RegistryStore(store).apply(style, [SamplesRendered(style, version.name, samples, datetime.now(UTC))])
        return 3

    monkeypatch.setattr(jobs, "render_missing_samples", render)
    assert materialize_selected(instance).success
    assert len(finishing.submitted) == 1 and finishing.submitted[0].params.num_sample_images == 2  # tiny preset

    config = {"ops": {"trained_lora": {"config": {"poll_interval_s": 0.01, "params": {"num_sample_images": 3}}}}}
    job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection={dg.AssetKey("trained_lora")})
    again = job.execute_in_process(instance=instance, partition_key=STYLE, run_config=config)

    assert again.success
    assert len(finishing.submitted) == 1  # nothing trained again
    assert rendered == [("V1", 3, 20)]
    [event] = again.get_asset_materialization_events()
    assert event.materialization.metadata["version"].value == "V1"
    assert event.materialization.metadata["sample_count"].value == 3
    assert [v.name for v in RegistryStore(store).read(STYLE)[0].versions] == ["V1"]
