"""The worker's progress updates: stamped, throttled, sent through RunPod's SDK (or the local sink)."""

from __future__ import annotations

from typing import Any

import pytest
import runpod.serverless

import lora_pipeline.worker.progress as progress_module
from lora_pipeline.backends.runpod_client import RunPodClient
from lora_pipeline.contracts.job_status import progress_of
from lora_pipeline.worker.progress import progress_sink, runpod_progress
from lora_pipeline_tests.fakes.runpod_api import FakeRunPod


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Every call of the real SDK's ``runpod.serverless.progress_update``, on a worker 'on RunPod'."""
    calls: list[tuple[dict[str, Any], dict[str, Any]]] = []
    monkeypatch.setattr(runpod.serverless, "progress_update", lambda job, update: calls.append((job, update)))
    monkeypatch.setattr(progress_module, "under_runpod", lambda: True)
    return calls


def step(n: int, total: int = 100) -> dict[str, Any]:
    return {"phase": "training", "step": n, "total": total, "loss": 0.5}


def test_on_runpod_each_update_goes_to_progress_update_with_the_workers_time(sent) -> None:
    job = {"id": "job-1-u1", "input": {}}
    runpod_progress(job)({"phase": "checking"})
    assert len(sent) == 1
    assert sent[0][0] is job
    update = sent[0][1]
    assert update["phase"] == "checking" and update["at"].endswith("+00:00")


def test_training_steps_are_throttled_to_one_per_five_seconds_but_the_last_always_goes(sent) -> None:
    clock = Clock()
    report = runpod_progress({"id": "j"}, clock=clock)
    for n in range(1, 100):  # 99 steps within 3 s
        clock.now = n * 0.03
        report(step(n))
    clock.now = 3.01
    report(step(100))  # the last one
    report({"phase": "saving"})  # a phase change
    assert [u.get("step") for _, u in sent] == [1, 100, None]
    clock.now = 9.0
    report(step(5, 10))
    assert sent[-1][1]["step"] == 5


def test_off_runpod_without_a_sink_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runpod.serverless, "progress_update", lambda *a: pytest.fail("sent off RunPod"))
    runpod_progress({"id": "j"})(step(1))


def test_a_local_sink_takes_the_updates_instead_of_the_sdk(sent) -> None:
    got: list[dict[str, Any]] = []
    with progress_sink(lambda job, update: got.append(update)):
        runpod_progress({"id": "j"})(step(1))
    assert [u["step"] for u in got] == [1] and sent == []


def test_a_failing_progress_update_never_fails_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(job: dict[str, Any], update: dict[str, Any]) -> None:
        raise ConnectionError("RunPod is unreachable")

    monkeypatch.setattr(runpod.serverless, "progress_update", broken)
    monkeypatch.setattr(progress_module, "under_runpod", lambda: True)
    runpod_progress({"id": "j"})(step(1))  # logged, not raised


def test_through_the_api_double_status_answers_in_progress_with_the_update_as_output(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with FakeRunPod() as fake:
        monkeypatch.setattr(runpod.serverless, "progress_update", fake.progress_update)
        monkeypatch.setattr(progress_module, "under_runpod", lambda: True)
        job = fake.add_job({"style": "s"})
        fake.start_job(job.id)
        runpod_progress({"id": job.id, "input": job.input})(step(40))
        with RunPodClient(fake.api_key, fake.endpoint_id, base_url=fake.base_url, timeout=5.0) as client:
            status = client.status(job.id)
            assert status.status == "IN_PROGRESS"
            progress = progress_of(status)
            assert progress is not None and (progress.step, progress.total, progress.loss) == (40, 100, 0.5)
            fake.finish(job.id, {"status": "COMPLETED", "output": {"ok": True}})
            assert client.status(job.id).output == {"ok": True}
