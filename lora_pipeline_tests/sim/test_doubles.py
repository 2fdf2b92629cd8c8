"""The simulation's doubles hold to what they stand for.

``SimStore`` passes the storage contract tests every real store passes (those that need
no threads, processes or URLs), and its faults do what they claim; ``SimRunPod`` answers
each ``/run`` class so that the real client reads it as RunPod's documented behaviour
requires (a clear refusal, or an outcome it must not repeat).
"""

from __future__ import annotations

import json
import random
from datetime import timedelta

import pytest

from lora_pipeline.backends.base import (
    ExecutionPolicy,
    JobNotFound,
    RunPodRateLimited,
    RunPodRequestError,
    RunPodUnavailable,
    SubmitOutcomeUnknown,
)
from lora_pipeline.storage.base import PreconditionFailed, StorageError
from lora_pipeline_tests.sim.runpod import SimRunPod
from lora_pipeline_tests.sim.scheduler import Crash, Sim
from lora_pipeline_tests.sim.store import MULTIPART_THRESHOLD, FaultRates, SimStore
from lora_pipeline_tests.storage import test_contract as contract

CONTRACT = [
    contract.test_both_backends_satisfy_the_protocol,
    contract.test_put_returns_md5_etag_and_get_returns_bytes_with_it,
    contract.test_get_of_missing_key_raises_object_not_found,
    contract.test_head_describes_an_object_and_is_none_when_missing,
    contract.test_if_none_match_creates_only_when_absent,
    contract.test_if_match_writes_only_over_the_version_that_was_read,
    contract.test_if_match_on_a_missing_object_fails,
    contract.test_listing_is_lexicographic_and_filtered_by_prefix,
    contract.test_listing_reports_size_and_etag,
    contract.test_ranged_read_returns_the_requested_slice,
    contract.test_ranged_read_of_missing_key_raises_object_not_found,
    contract.test_delete_removes_and_is_idempotent,
    contract.test_list_prefixes_names_the_folders_one_level_down_in_order,
    contract.test_list_prefixes_has_no_empty_folders,
]
WITH_TMP = [
    contract.test_upload_and_download_file_round_trip,
    contract.test_download_of_missing_key_raises_and_leaves_no_file,
    contract.test_empty_objects_round_trip,
    contract.test_conditional_upload_creates_only_when_absent,
]


def sim_store(**faults: float) -> SimStore:
    return SimStore(Sim(random.Random(0)), FaultRates(**faults) if faults else FaultRates())


@pytest.mark.parametrize("check", CONTRACT, ids=lambda f: f.__name__)
def test_the_sim_store_keeps_the_store_contract(check):
    check(sim_store())


@pytest.mark.parametrize("check", WITH_TMP, ids=lambda f: f.__name__)
def test_the_sim_store_keeps_the_file_contract(check, tmp_path):
    check(sim_store(), tmp_path)


def in_actor(sim: Sim, task, *, crash_at: int | None = None, faulty: bool = True) -> list[BaseException]:
    """Run ``task`` as the only actor; what it raised."""
    raised: list[BaseException] = []

    def body() -> None:
        try:
            task()
        except Exception as exc:  # noqa: BLE001 - collected for the test
            raised.append(exc)

    sim.spawn("t", body, skew=timedelta(0), crash_at=crash_at, faulty=faulty)
    sim.run(lambda: False)
    return raised


def test_a_lost_answer_was_applied_and_a_failed_call_was_not():
    lost = sim_store(error=0.0, stall=0.0, lost_answer=1.0)
    raised = in_actor(lost.sim, lambda: lost.put("a/b.json", b"1", if_none_match=True))
    assert isinstance(raised[0], (StorageError, PreconditionFailed)) and lost.info("a/b.json") is not None
    failed = sim_store(error=1.0, stall=0.0, lost_answer=0.0)
    raised = in_actor(failed.sim, lambda: failed.put("a/b.json", b"1"))
    assert isinstance(raised[0], StorageError) and failed.info("a/b.json") is None


def test_a_crash_stops_the_actor_between_two_calls():
    store = sim_store(error=0.0, stall=0.0, lost_answer=0.0)

    def two_writes() -> None:
        store.put("a/1", b"1")
        store.put("a/2", b"2")

    in_actor(store.sim, two_writes, crash_at=2)
    assert (store.info("a/1") is not None, store.info("a/2")) == (True, None)
    assert store.sim.crashes == 1 and issubclass(Crash, BaseException) and not issubclass(Crash, Exception)


def test_a_multipart_upload_appears_whole_at_completion_with_the_s3_etag(tmp_path):
    store = sim_store(error=0.0, stall=0.0, lost_answer=0.0)
    data = bytes(range(256)) * 3
    assert len(data) >= MULTIPART_THRESHOLD
    path = tmp_path / "big"
    path.write_bytes(data)
    seen_before_completion: list[object] = []

    def upload() -> None:
        store.upload_file("loras/x/x_v1.safetensors", path, if_none_match=True)

    def watch() -> None:
        for _ in range(3):
            seen_before_completion.append(store.info("loras/x/x_v1.safetensors"))
            store.sim.sleep(0)

    store.sim.spawn("up", upload, skew=timedelta(0), crash_at=None, faulty=False)
    store.sim.spawn("watch", watch, skew=timedelta(0), crash_at=None, faulty=False)
    store.sim.run(lambda: False)
    info = store.info("loras/x/x_v1.safetensors")
    assert info is not None and info.etag.endswith("-3") and store.objects[info.key].data == data
    assert None in seen_before_completion  # another actor saw nothing while the parts went up


def _post(runpod: SimRunPod, answer: str) -> BaseException | str:
    """POST /run once with the double answering ``answer``: the job id, or what the client raised."""
    client = runpod.client()
    runpod.forced = answer
    result: list[BaseException | str] = []

    def post() -> None:
        try:
            result.append(client.run({"style": "s"}, policy=ExecutionPolicy()).id)
        except Exception as exc:  # noqa: BLE001 - the answer under test
            result.append(exc)

    runpod.sim.spawn("post", post, skew=timedelta(0), crash_at=None, faulty=True)
    runpod.sim.run(lambda: False)
    runpod.forced = None
    return result[0]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("ok", str),
        ("lost", SubmitOutcomeUnknown),
        ("5xx", SubmitOutcomeUnknown),
        ("html-200", SubmitOutcomeUnknown),
        ("no-id", SubmitOutcomeUnknown),
        ("3xx", SubmitOutcomeUnknown),
        ("truncated", SubmitOutcomeUnknown),
        ("429", RunPodRateLimited),
        ("connect", RunPodUnavailable),
        ("400", RunPodRequestError),
    ],
)
def test_each_run_answer_is_read_by_the_real_client_as_runpod_requires(answer, expected):
    outcome = _post(SimRunPod(Sim(random.Random(0))), answer)
    assert isinstance(outcome, expected), outcome


def test_a_status_expires_after_the_job_kept_it():
    sim = Sim(random.Random(0))
    runpod = SimRunPod(sim)
    client = runpod.client()
    job_id = _post(runpod, "ok")
    assert isinstance(job_id, str)
    job = runpod.jobs[job_id]
    runpod.finish(job, {"status": "COMPLETED", "output": {"x": 1}})
    job.keep_result_s = 60.0
    answers: list[object] = []

    def poll() -> None:
        answers.append(client.status(job_id).status)
        sim.sleep(61)
        try:
            client.status(job_id)
        except JobNotFound as exc:
            answers.append(type(exc).__name__)

    sim.spawn("poll", poll, skew=timedelta(0), crash_at=None, faulty=False)
    sim.run(lambda: False)
    assert answers == ["COMPLETED", "JobNotFound"]
    assert json.dumps(job.body())  # the webhook body is JSON
