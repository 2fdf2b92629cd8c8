"""The train_lora and reconcile_registry jobs, run in process against a local store."""

from __future__ import annotations

import dagster as dg
import pytest

from lora_pipeline.contracts.job_status import JobStatus
from lora_pipeline.dataset.ingest import SAMPLE_TRIGGER_WORD, IngestOptions, ingest_dataset, sample_dataset_path
from lora_pipeline.definitions import defs
from lora_pipeline.defs.jobs import GPU_POOL
from lora_pipeline.demo import error_text
from lora_pipeline.lifecycle.submit import wait_for_job
from lora_pipeline.registry.models import VersionStatus
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline_tests.dagster_layer.conftest import StubBackend
from lora_pipeline_tests.registry.lora_files import lora_bytes

STYLE = "sample_style"
NO_WAIT = {"ops": {"submit_lora_training": {"config": {"wait_for_completion": False}}}}


@pytest.fixture
def dataset(store) -> str:
    report = ingest_dataset(
        store, STYLE, sample_dataset_path(), options=IngestOptions(trigger_word=SAMPLE_TRIGGER_WORD)
    )
    return report.dataset_hash


def run_train_lora(instance, run_config=NO_WAIT) -> dg.ExecuteInProcessResult:
    instance.add_dynamic_partitions("styles", [STYLE])
    return defs.resolve_job_def("train_lora").execute_in_process(
        instance=instance, partition_key=STYLE, run_config=run_config, raise_on_error=False
    )


def test_train_lora_records_a_pending_version_with_the_job_id_as_returned(store, instance, backend, dataset):
    result = run_train_lora(instance)

    assert result.success
    job_id = result.output_for_node("submit_lora_training")
    document, _ = RegistryStore(store).read(STYLE)
    [version] = document.versions
    assert (version.name, version.id, version.dataset_hash) == ("V1", job_id, dataset)
    assert version.status in (VersionStatus.pending, VersionStatus.starting)
    assert backend.submitted[0].version == "V1"


def test_train_lora_again_for_the_same_dataset_submits_no_second_job(store, instance, backend, dataset):
    first = run_train_lora(instance)
    second = run_train_lora(instance)

    assert len(backend.submitted) == 1
    assert second.output_for_node("submit_lora_training") == first.output_for_node("submit_lora_training")


def test_train_lora_without_a_dataset_fails_naming_the_remedy(store, instance, backend):
    result = run_train_lora(instance)

    assert not result.success
    assert "has no dataset yet" in error_text(result.failure_data_for_node("submit_lora_training"))
    assert backend.submitted == []


def test_train_lora_rejects_a_bad_hyperparameter_before_submitting(store, instance, backend, dataset):
    config = {"ops": {"submit_lora_training": {"config": {"wait_for_completion": False, "params": {"rank": 0}}}}}
    result = run_train_lora(instance, config)

    assert not result.success
    assert "rank" in error_text(result.failure_data_for_node("submit_lora_training"))
    assert backend.submitted == []


# A run worker as Dagster starts one: train_lora waiting for its job, in its own process on a
# persistent instance (DAGSTER_HOME). Terminating a run reaches that process as an interrupt
# (the code server's cancel_execution sends it SIGINT), which is what the test sends.
_RUN_WORKER = """
import sys
import dagster as dg
from lora_pipeline.definitions import defs

with dg.DagsterInstance.get() as instance:
    instance.add_dynamic_partitions("styles", [sys.argv[1]])
    config = {"ops": {"submit_lora_training": {"config": {"wait_for_completion": True}}}}
    result = defs.resolve_job_def("train_lora").execute_in_process(
        instance=instance, partition_key=sys.argv[1], run_config=config, raise_on_error=False
    )
    print("RUN", result.run_id)
"""


@pytest.mark.slow
def test_terminating_a_real_run_that_waits_on_a_job_cancels_the_job(store, dataset, tmp_path, monkeypatch):
    """Cancelling the Dagster run that waits on a job cancels the GPU job too: a real run, in its
    own process, on the RunPod double; the job stays queued until the run is terminated."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from lora_pipeline_tests.fakes.runpod_api import FakeRunPod

    home = tmp_path / "dagster_home"
    home.mkdir()
    with FakeRunPod() as fake:
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "RUNPOD_ENDPOINT_ID": fake.endpoint_id,
            "RUNPOD_API_KEY": fake.api_key,
            "RUNPOD_ENDPOINT_BASE_URL": fake.base_url,
        }
        worker = subprocess.Popen(
            [sys.executable, "-c", _RUN_WORKER, STYLE],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 120
            while not fake.jobs and time.monotonic() < deadline and worker.poll() is None:
                time.sleep(0.1)
            assert fake.jobs, worker.communicate(timeout=5)
            (job,) = fake.jobs.values()
            time.sleep(0.5)  # the run is in its wait loop (polling /status)
            assert fake.requests["status"] >= 1 and job.status == "IN_QUEUE"
            worker.send_signal(signal.SIGINT)
            out, err = worker.communicate(timeout=60)
        finally:
            if worker.poll() is None:
                worker.kill()
        assert job.status == "CANCELLED", err[-2000:]
        assert fake.requests["cancel"] == 1
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        [run] = instance.get_runs()
    assert run.status in (dg.DagsterRunStatus.CANCELED, dg.DagsterRunStatus.FAILURE), run.status
    document, _ = RegistryStore(store).read(STYLE)
    assert document.versions[0].id == job.id


def test_a_wait_that_times_out_leaves_the_job_running():
    backend = StubBackend()
    job_id = backend.submit(None, webhook_url=None, policy=None)

    with pytest.raises(TimeoutError):
        wait_for_job(backend, job_id, timeout_s=0, poll_interval_s=0)
    assert backend.cancelled == []


def test_reconcile_registry_adds_a_lora_found_in_storage(store, instance, backend):
    """A file nobody registered (a job that finished while nothing watched) becomes a version."""
    store.put("loras/style_59/style_59_vV5.safetensors", lora_bytes())

    result = defs.resolve_job_def("reconcile_registry").execute_in_process(instance=instance)

    assert result.success
    [materialization] = result.asset_materializations_for_node("reconcile_registry_op")
    assert materialization.partition == "style_59"
    document, _ = RegistryStore(store).read("style_59")
    assert [(v.name, v.status) for v in document.versions] == [("V5", VersionStatus.completed)]


def test_complete_training_run_records_a_finished_job(store, instance, backend, dataset):
    """What a completion sensor's run does: verify the file, complete the version, materialize."""
    job_id = run_train_lora(instance).output_for_node("submit_lora_training")
    store.put("loras/sample_style/sample_style_v1.safetensors", lora_bytes({"lora_pipeline.steps": "30"}))
    status = JobStatus(
        id=job_id,
        status="COMPLETED",
        delayTime=800,
        executionTime=90000,
        output={"lora_key": "loras/sample_style/sample_style_v1.safetensors"},
    )

    result = defs.resolve_job_def("complete_training").execute_in_process(
        instance=instance,
        partition_key=STYLE,
        run_config={"ops": {"trained_lora": {"config": {"status_body": status.model_dump_json()}}}},
    )

    assert result.success
    document, _ = RegistryStore(store).read(STYLE)
    [version] = document.versions
    assert version.status is VersionStatus.completed
    assert version.s3_key == "loras/sample_style/sample_style_v1.safetensors"
    [registry, lora] = sorted(result.get_asset_materialization_events(), key=lambda e: e.asset_key.path)
    assert registry.materialization.metadata["latest_version"].value == "V1"
    assert lora.materialization.metadata["execution_time_s"].value == 90.0
    assert lora.materialization.metadata["steps"].value == 30


def test_a_completion_run_records_without_claiming_a_gpu_slot(store, instance, backend, dataset):
    """complete_training hands trained_lora the finished job: its GPU step is skipped, so a run
    that only records never waits for a runpod_gpu slot (here a pool of 0 slots, which would
    block a claim for ever), while a materialization from the UI claims one."""
    job_id = run_train_lora(instance).output_for_node("submit_lora_training")
    store.put("loras/sample_style/sample_style_v1.safetensors", lora_bytes({"lora_pipeline.steps": "30"}))
    status = JobStatus(
        id=job_id, status="COMPLETED", output={"lora_key": "loras/sample_style/sample_style_v1.safetensors"}
    )
    instance.event_log_storage.set_concurrency_slots(GPU_POOL, 0)

    result = defs.resolve_job_def("complete_training").execute_in_process(
        instance=instance,
        partition_key=STYLE,
        run_config={"ops": {"trained_lora": {"config": {"status_body": status.model_dump_json()}}}},
    )

    assert result.success
    steps = {
        e.step_key: e.event_type_value
        for e in result.all_events
        if e.event_type_value in ("STEP_SKIPPED", "STEP_SUCCESS", "STEP_FAILURE")
    }
    assert steps == {
        "trained_lora.take_training_request": "STEP_SUCCESS",
        "trained_lora.train_on_gpu": "STEP_SKIPPED",
        "trained_lora.record_trained_lora": "STEP_SUCCESS",
        "lora_registry": "STEP_SUCCESS",
        "trained_lora_lora_file_matches_registry": "STEP_SUCCESS",
    }  # the file check, after it
    assert instance.event_log_storage.get_concurrency_info(GPU_POOL).claimed_slots == []
    [version] = RegistryStore(store).read(STYLE)[0].versions
    assert version.status is VersionStatus.completed


def test_complete_training_fails_when_the_completed_job_left_no_readable_file(store, instance, backend, dataset):
    """RunPod can say COMPLETED for a worker that wrote nothing: that is no LoRA."""
    job_id = run_train_lora(instance).output_for_node("submit_lora_training")
    store.put("loras/sample_style/sample_style_v1.safetensors", b"\x00\x01 not a safetensors file")
    status = JobStatus(
        id=job_id, status="COMPLETED", output={"lora_key": "loras/sample_style/sample_style_v1.safetensors"}
    )

    result = defs.resolve_job_def("complete_training").execute_in_process(
        instance=instance,
        partition_key=STYLE,
        raise_on_error=False,
        run_config={"ops": {"trained_lora": {"config": {"status_body": status.model_dump_json()}}}},
    )

    assert not result.success
    assert "sample_style_v1.safetensors" in error_text(result.failure_data_for_node("trained_lora.record_trained_lora"))
