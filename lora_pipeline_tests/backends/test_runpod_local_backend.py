"""The local backend keeps RunPod's contract: ids, statuses, bodies, webhook files, restarts."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from lora_pipeline.backends.base import ExecutionPolicy, JobNotFound
from lora_pipeline.backends.local import LocalBackend
from lora_pipeline.backends.local_state import JobStateDir, utcnow_iso
from lora_pipeline.contracts.training import TrainingRequest
from lora_pipeline.registry.jobids import base_job_id, job_id_suffix
from lora_pipeline.webhook.inbox import list_inbox

STUBS = "lora_pipeline_tests.fakes.handlers"
POLICY = ExecutionPolicy(execution_timeout_ms=120_000, ttl_ms=240_000)


@pytest.fixture
def store(local_store):
    return local_store


def backend(store, tmp_path, handler: str, **kwargs) -> LocalBackend:
    return LocalBackend(store, tmp_path / "jobs", handler=f"{STUBS}:{handler}", webhook_retry_delay_s=0.1, **kwargs)


def request() -> TrainingRequest:
    return TrainingRequest(style="style_59", version="V5", dataset_hash="ab" * 8, request_id="r1")


def submit(b: LocalBackend) -> str:
    return b.submit(request(), webhook_url=None, policy=POLICY)


def test_ids_look_like_runpods_with_a_suffix(store, tmp_path):
    b = backend(store, tmp_path, "succeed")
    job_id = submit(b)
    assert job_id_suffix(job_id) == "u1" and base_job_id(job_id) != job_id
    b.wait(job_id, timeout_s=60)


def test_a_successful_handler_completes_with_its_output(store, tmp_path):
    b = backend(store, tmp_path, "succeed")
    status = b.wait(submit(b), timeout_s=60)
    assert status.status == "COMPLETED"
    assert status.output["lora_key"] == "loras/style_59/style_59_v5.safetensors"
    assert status.executionTime is not None and status.delayTime is not None


def test_completion_drops_the_status_body_in_the_webhook_inbox(store, tmp_path):
    b = backend(store, tmp_path, "succeed")
    job_id = submit(b)
    status = b.wait(job_id, timeout_s=60)
    deadline = time.monotonic() + 30
    while not (items := list(list_inbox(store))) and time.monotonic() < deadline:
        time.sleep(0.1)
    (item,) = items
    assert item.body == status.to_body()


def test_a_handler_returning_an_error_dict_fails_the_job(store, tmp_path):
    b = backend(store, tmp_path, "return_error")
    status = b.wait(submit(b), timeout_s=60)
    assert status.status == "FAILED" and status.error == "CUDA out of memory"


def test_a_handler_that_raises_fails_the_job_with_the_exception(store, tmp_path):
    b = backend(store, tmp_path, "raise_error")
    status = b.wait(submit(b), timeout_s=60)
    assert status.status == "FAILED" and "boom in the handler" in status.error


def test_a_runner_that_vanishes_is_reported_failed(store, tmp_path):
    b = backend(store, tmp_path, "die")
    status = b.wait(submit(b), timeout_s=60)
    assert status.status == "FAILED" and "exited without reporting" in status.error


def test_cancel_kills_the_running_handler(store, tmp_path):
    marker = tmp_path / "running"
    b = backend(store, tmp_path, "sleep_forever", env={"STUB_RUNNING_MARKER": str(marker)})
    job_id = submit(b)
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = json.loads((tmp_path / "jobs" / f"{job_id}.json").read_text())["pid"]
    assert b.cancel(job_id).status == "CANCELLED"
    assert b.status(job_id).status == "CANCELLED"
    assert not b._alive(job_id, pid)


def test_cancel_of_a_finished_job_keeps_its_status(store, tmp_path):
    b = backend(store, tmp_path, "succeed")
    job_id = submit(b)
    b.wait(job_id, timeout_s=60)
    assert b.cancel(job_id).status == "COMPLETED"


def test_status_survives_a_restart_of_the_backend(store, tmp_path):
    job_id = submit(b := backend(store, tmp_path, "succeed"))
    b.wait(job_id, timeout_s=60)
    assert backend(store, tmp_path, "succeed").status(job_id).status == "COMPLETED"


def test_status_is_found_by_the_base_uuid_too(store, tmp_path):
    b = backend(store, tmp_path, "succeed")
    job_id = submit(b)
    b.wait(job_id, timeout_s=60)
    assert b.status(base_job_id(job_id)).id == job_id


def test_an_unknown_job_is_not_found(store, tmp_path):
    with pytest.raises(JobNotFound):
        backend(store, tmp_path, "succeed").status("60902e6c-08a1-426e-9cb9-9eaec90f5e2b-u1")


def test_a_job_past_its_execution_timeout_ends_timed_out(tmp_path):
    jobs = JobStateDir(tmp_path / "jobs")
    job_id = "60902e6c-08a1-426e-9cb9-9eaec90f5e2b-u1"
    jobs.create(
        {
            "id": job_id,
            "status": "IN_QUEUE",
            "input": {},
            "policy": {"executionTimeout": 300, "ttl": 600},
            "handler": f"{STUBS}:sleep_forever",
            "createdAt": utcnow_iso(),
        }
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_pipeline.backends.local_runner",
            "--state-dir",
            str(jobs.root),
            "--job-id",
            job_id,
        ],
        timeout=60,
        check=False,
    )
    assert jobs.read(job_id)["status"] == "TIMED_OUT"


def test_a_running_job_survives_a_restart_of_the_backend_and_can_be_cancelled(store, tmp_path):
    marker = tmp_path / "running"
    first = backend(store, tmp_path, "sleep_forever", env={"STUB_RUNNING_MARKER": str(marker)})
    job_id = submit(first)
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    restarted = backend(store, tmp_path, "sleep_forever")  # a new Dagster process
    assert restarted.status(job_id).status == "IN_PROGRESS"
    assert restarted.cancel(job_id).status == "CANCELLED"
    first._children[job_id].wait(timeout=10)  # the runner is gone


def test_a_job_recorded_in_another_process_table_is_neither_failed_nor_signalled_here(store, tmp_path):
    """A state directory shared between containers (one volume): the pid another container
    recorded names an unrelated process here (here: one whose command line even carries the
    job id). Seen from this side, the job is not declared dead, and cancelling it marks it
    cancelled without signalling that process."""
    job_id = "60902e6c-08a1-426e-9cb9-9eaec90f5e2b-u1"
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", job_id], start_new_session=True)
    try:
        JobStateDir(tmp_path / "jobs").create(
            {
                "id": job_id,
                "status": "IN_PROGRESS",
                "input": {},
                "policy": {"executionTimeout": 600_000},
                "handler": f"{STUBS}:succeed",
                "createdAt": utcnow_iso(),
                "startedAt": utcnow_iso(),
                "pid": bystander.pid,
                "host": "another-container:pid:[4026531836]",
            }
        )
        here = backend(store, tmp_path, "succeed")
        assert here.status(job_id).status == "IN_PROGRESS"
        assert here.cancel(job_id).status == "CANCELLED"
        time.sleep(0.3)
        assert bystander.poll() is None  # never signalled
    finally:
        bystander.kill()
        bystander.wait()


def test_the_factory_picks_local_without_an_endpoint(store, tmp_path):
    from lora_pipeline.backends.factory import open_training_backend
    from lora_pipeline.settings import load_settings

    chosen = open_training_backend(store, load_settings({}), state_dir=tmp_path / "jobs")
    assert isinstance(chosen, LocalBackend)


def test_a_running_jobs_status_carries_its_last_progress_update_as_runpods_does(store, tmp_path):
    release = tmp_path / "release"
    b = backend(store, tmp_path, "report_progress_then_wait", env={"STUB_RELEASE": str(release)})
    job_id = submit(b)
    deadline = time.monotonic() + 60
    status = b.status(job_id)
    while status.output is None and time.monotonic() < deadline:
        time.sleep(0.05)
        status = b.status(job_id)
    assert status.status == "IN_PROGRESS"
    assert status.output == {
        "phase": "training",
        "step": 3,
        "total": 10,
        "loss": 0.25,
        "at": "2026-11-29T10:00:00+00:00",
    }
    release.write_text("go")
    final = b.wait(job_id, timeout_s=60)
    assert final.status == "COMPLETED" and final.output["final_loss"] == 0.125  # its own output, not the update


def test_a_final_status_drops_the_last_progress_update(tmp_path):
    jobs = JobStateDir(tmp_path / "jobs")
    jobs.create({"id": "j-u1", "status": "IN_PROGRESS", "createdAt": utcnow_iso(), "output": {"step": 3}})
    state, _ = jobs.finish("j-u1", status="CANCELLED")
    assert state["status"] == "CANCELLED" and "output" not in state
