"""At most one RunPod job per version, whatever the submitters do (issue: "a version sent to
the GPU twice").

Each test plays an adversary against ``submit_training`` on the real RunPod client and the
RunPod double: concurrent submitters, a submitter that dies holding its claim, one whose
lease ran out and was taken over, a ``/run`` whose answer is lost after RunPod queued the
job, a crash between the POST and recording the job id.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

import lora_pipeline.lifecycle.submit as training
from lora_pipeline.clock import Clock
from lora_pipeline.backends.base import RunPodError, RunPodRequestError
from lora_pipeline.backends.runpod_client import RunPodClient
from lora_pipeline.dataset.versions import read_manifest, set_current
from lora_pipeline.lifecycle.reconcile import process_inbox, reconcile
from lora_pipeline.lifecycle.submit import SubmissionInFlight, SubmissionUnknown, submit_training, training_params
from lora_pipeline.registry.models import VersionStatus
from lora_pipeline.registry_store.documents import ClaimLost, RegistryStore
from lora_pipeline.storage.local import LocalStore
from lora_pipeline.webhook.inbox import write_webhook
from lora_pipeline_tests.fakes import handlers
from lora_pipeline_tests.fakes.runpod_api import FakeRunPod
from lora_pipeline_tests.worker.conftest import STYLE, png_bytes, put_dataset

PARAMS = training_params("tiny", {})


@pytest.fixture
def store(tmp_path) -> LocalStore:
    store = LocalStore(tmp_path / "store")
    digest = put_dataset(store, [("a.png", png_bytes((200, 10, 10)), "red square")])
    set_current(store, read_manifest(store, STYLE, digest))
    return store


@pytest.fixture
def fake() -> FakeRunPod:
    with FakeRunPod(handler=handlers.succeed, webhook_retry_delay_s=0.05) as fake:
        yield fake


def client_for(fake: FakeRunPod, **kwargs) -> RunPodClient:
    return RunPodClient(
        fake.api_key, fake.endpoint_id, base_url=fake.base_url, backoff_base_s=0.01, sleep=lambda s: None, **kwargs
    )


def submit(store, backend, **kwargs):
    return submit_training(store=store, backend=backend, style=STYLE, params=PARAMS, **kwargs)


def document(store):
    return RegistryStore(store).read(STYLE)[0]


def test_concurrent_submitters_send_one_job(store, fake):
    """Eight clicks at once (a slow /run widens the window): one POST, one job, one version."""
    fake.latency_s = 0.3
    backend = client_for(fake)
    results, errors = [], []
    start = threading.Barrier(8)

    def click():
        start.wait()
        try:
            results.append(submit(store, backend))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=click) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert fake.requests["run"] == 1 and len(fake.jobs) == 1
    assert {(r.version, r.job_id) for r in results} == {("V1", results[0].job_id)}
    assert sum(not r.reused for r in results) == 1
    (version,) = document(store).versions
    assert len(version.job_ids) == 1


def test_a_claim_whose_holder_died_before_posting_is_taken_over(store, fake):
    registry = RegistryStore(store)
    dead = registry.claim_version(
        STYLE,
        request_id="dead",
        dataset_hash=_current_hash(store),
        params=PARAMS.model_dump(mode="json"),
        owner="dead-run",
        lease=timedelta(seconds=60),
        at=datetime.now(UTC) - timedelta(minutes=5),
    )
    assert dead.kind == "claimed"
    submitted = submit(store, client_for(fake), wait_for_other_s=0)
    assert (submitted.version, submitted.reused) == ("V1", False)
    (version,) = document(store).versions
    assert version.claim.owner != "dead-run" and version.id == submitted.job_id
    assert len(fake.jobs) == 1


def test_a_live_claim_makes_others_wait_and_reuse_its_job(store, fake):
    registry = RegistryStore(store)
    held = registry.claim_version(
        STYLE,
        request_id="holder",
        dataset_hash=_current_hash(store),
        params=PARAMS.model_dump(mode="json"),
        owner="holder",
        lease=timedelta(seconds=60),
    ).version
    with pytest.raises(SubmissionInFlight, match="being submitted by another run"):
        submit(store, client_for(fake), wait_for_other_s=0)
    assert fake.requests["run"] == 0

    def holder_finishes():
        time.sleep(0.3)
        posting = registry.advance_claim(STYLE, held, "posting", lease=timedelta(seconds=60))
        from lora_pipeline.registry.evidence import Submission

        registry.apply(
            STYLE,
            [
                Submission(
                    STYLE,
                    posting.name,
                    posting.request_id,
                    "abc-123-u1",
                    posting.dataset_hash,
                    posting.params,
                    datetime.now(UTC),
                )
            ],
        )

    thread = threading.Thread(target=holder_finishes)
    thread.start()
    waited = submit(store, client_for(fake), wait_for_other_s=10, clock=Clock(sleep=lambda s: time.sleep(0.05)))
    thread.join()
    assert (waited.job_id, waited.reused) == ("abc-123-u1", True) and fake.requests["run"] == 0


def claim(store, owner: str, *, lease_s: float, at: datetime | None = None):
    """``owner`` claims the version for the current dataset and PARAMS (its request id: ``owner``)."""
    return RegistryStore(store).claim_version(
        STYLE,
        request_id=owner,
        dataset_hash=_current_hash(store),
        params=PARAMS.model_dump(mode="json"),
        owner=owner,
        lease=timedelta(seconds=lease_s),
        at=at,
    )


def test_a_holder_whose_lease_was_taken_over_does_not_post(store):
    slow = claim(store, "slow", lease_s=1, at=datetime.now(UTC) - timedelta(seconds=30))
    successor = claim(store, "next", lease_s=60)
    assert (slow.kind, successor.kind) == ("claimed", "claimed")
    assert successor.version.name == slow.version.name
    with pytest.raises(ClaimLost, match="not submitting"):
        RegistryStore(store).advance_claim(STYLE, slow.version, "posting", lease=timedelta(seconds=60))


def test_a_takeover_lands_though_the_released_claim_was_stamped_by_a_clock_running_ahead(store):
    """Found by the simulation: claims merge latest-stamp-wins, so a takeover stamped earlier than
    the claim it replaces (that submitter's clock ran ahead) was merged away and ``claim_version``
    failed with StopIteration."""
    registry = RegistryStore(store)
    now = datetime.now(UTC)
    ahead = claim(store, "ahead", lease_s=60, at=now + timedelta(minutes=5))
    registry.advance_claim(STYLE, ahead.version, "released", note="refused", at=now + timedelta(minutes=5))
    behind = claim(store, "behind", lease_s=60, at=now)
    assert behind.kind == "claimed" and behind.version.name == ahead.version.name
    assert behind.version.claim.owner == "behind" and behind.version.claim.phase == "claimed"
    posting = registry.advance_claim(STYLE, behind.version, "posting", lease=timedelta(seconds=60), at=now)
    assert posting.claim.owner == "behind" and posting.claim.phase == "posting"


def test_a_run_whose_answer_was_lost_is_recorded_unknown_and_never_repeated(store, fake):
    """RunPod queued the job, but the answer timed out: one job, and the webhook attaches it."""
    fake.latency_s = 0.5
    with pytest.raises(SubmissionUnknown, match="will not be sent again"):
        submit(store, client_for(fake, timeout=0.1))
    _wait_for(lambda: len(fake.jobs) == 1)
    (version,) = document(store).versions
    assert version.id is None and version.claim.phase == "unknown"
    assert version.status == VersionStatus.starting

    fake.latency_s = 0.0
    with pytest.raises(SubmissionUnknown):
        submit(store, client_for(fake))  # a second click does not send it again
    assert fake.requests["run"] == 1

    (job,) = fake.jobs.values()
    finished = fake.process(job.id)  # the worker ran; its output names the request
    assert write_webhook(store, _body(finished))
    report = process_inbox(store)
    assert report.webhooks_applied and not report.webhooks_waiting
    (version,) = document(store).versions
    assert version.id == job.id and version.job_status == "COMPLETED"


def test_a_crash_between_the_post_and_recording_its_id_is_healed_by_the_webhook(store, fake, monkeypatch):
    def crash(registry, submission, *, sleep, attempts=4):
        raise KeyboardInterrupt("run killed right after POST /run")

    monkeypatch.setattr(training, "_record_submission", crash)
    with pytest.raises(KeyboardInterrupt):
        submit(store, client_for(fake), posting_lease=timedelta(milliseconds=200))
    monkeypatch.undo()
    assert len(fake.jobs) == 1
    time.sleep(0.3)  # the posting lease runs out: a job may exist, so nobody resubmits
    with pytest.raises(SubmissionUnknown):
        submit(store, client_for(fake))
    assert fake.requests["run"] == 1

    (job,) = fake.jobs.values()
    write_webhook(store, _body(fake.process(job.id)))
    process_inbox(store)
    assert document(store).versions[0].id == job.id


def test_a_run_refused_by_runpod_releases_the_claim_for_the_next_submitter(store, fake):
    fake.script("run", 400, body={"error": "input too large"})
    with pytest.raises(RunPodRequestError):
        submit(store, client_for(fake))
    (version,) = document(store).versions
    assert version.claim.phase == "released" and "input too large" in version.claim.note
    again = submit(store, client_for(fake))
    assert (again.version, again.reused) == ("V1", False) and len(fake.jobs) == 1


def test_an_unknown_submission_with_no_sign_of_a_job_fails_after_the_maximum_age(store, fake):
    fake.latency_s = 0.5
    with pytest.raises(SubmissionUnknown):
        submit(store, client_for(fake, timeout=0.1))
    soon = reconcile(store, max_job_age=timedelta(hours=25))
    assert document(store).versions[0].status == VersionStatus.starting and not soon.changes
    later = reconcile(store, max_job_age=timedelta(hours=25), now=datetime.now(UTC) + timedelta(hours=26))
    (version,) = document(store).versions
    assert version.status == VersionStatus.failed and "unknown outcome" in version.error
    assert [c.version for c in later.changes] == ["V1"]
    # a new submission trains a new version: V1 keeps its one (possible) job
    fake.latency_s = 0.0
    assert submit(store, client_for(fake)).version == "V2"


def _current_hash(store) -> str:
    from lora_pipeline.dataset.versions import current_dataset

    manifest = current_dataset(store, STYLE)
    assert manifest is not None
    return manifest.dataset_hash


def _body(job) -> bytes:
    return json.dumps(job.body()).encode()


def _wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_an_unknown_submission_is_attached_by_its_workers_start_marker(store, fake):
    """A job that fails names no request in its body; the marker its worker wrote at start does."""
    from lora_pipeline.contracts.training import TrainingRequest
    from lora_pipeline.worker.handler import announce_start

    fake.latency_s = 0.5
    with pytest.raises(SubmissionUnknown):
        submit(store, client_for(fake, timeout=0.1))
    _wait_for(lambda: len(fake.jobs) == 1)
    fake.latency_s = 0.0
    (job,) = fake.jobs.values()
    fake.start_job(job.id)
    announce_start(store, TrainingRequest.model_validate(job.input), job.id)  # the worker starts

    client = client_for(fake)
    reconcile(store, status_lookup=client.status)
    assert document(store).versions[0].id == job.id  # attached: from now on it is polled
    reconcile(store, status_lookup=client.status)
    assert document(store).versions[0].status == VersionStatus.training

    write_webhook(store, json.dumps({"id": job.id, "status": "FAILED", "error": "CUDA out of memory"}).encode())
    assert process_inbox(store).webhooks_applied
    (version,) = document(store).versions
    assert version.status == VersionStatus.failed and "out of memory" in version.error


def test_a_start_marker_of_another_request_is_not_attached(store, fake):
    from lora_pipeline.contracts.training import TrainingRequest
    from lora_pipeline.worker.handler import announce_start

    fake.latency_s = 0.5
    with pytest.raises(SubmissionUnknown):
        submit(store, client_for(fake, timeout=0.1))
    _wait_for(lambda: len(fake.jobs) == 1)
    (job,) = fake.jobs.values()
    stranger = TrainingRequest.model_validate({**job.input, "request_id": "someone-else"})
    announce_start(store, stranger, "f00dbabe-0000-4000-8000-000000000000-u1")
    reconcile(store)
    (version,) = document(store).versions
    assert version.id is None


def test_a_refused_run_during_a_store_outage_raises_runpods_error_and_stays_on_the_safe_side(store, fake):
    """Releasing the claim fails too: the RunPod error is what the user sees, and the claim
    (left at posting) counts as "unknown" later, so nothing is ever sent twice."""
    from lora_pipeline.storage.base import StoreUnavailable

    class RegistryWritesFailAfterPosting:
        def __init__(self, inner):
            self.inner, self.posted = inner, False

        def put(self, key, data, **kwargs):
            if self.posted and key.startswith("registry/"):
                raise StoreUnavailable("store down (test)")
            return self.inner.put(key, data, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    flaky = RegistryWritesFailAfterPosting(store)

    class Refusing:
        def submit(self, request, **kwargs):
            flaky.posted = True
            raise RunPodRequestError("RunPod refused POST /run (HTTP 400): input too large", 400)

    with pytest.raises(RunPodRequestError, match="input too large"):
        submit(flaky, Refusing(), posting_lease=timedelta(milliseconds=100))
    (version,) = document(store).versions
    assert version.claim.phase == "posting"
    time.sleep(0.15)
    with pytest.raises(SubmissionUnknown):
        submit(store, client_for(fake))
    assert fake.requests["run"] == 0


# Issue 22, defect 2: every answer to /run that is not a clear refusal leaves the outcome
# unknown, whatever came back; RunPod (the double) queued the job before each of these answers.
NOT_A_CLEAR_REFUSAL = {
    "2xx-html": {"status": 200, "raw": b"<html><body>502 Bad Gateway (proxy)</body></html>"},
    "2xx-empty": {"status": 200, "raw": b""},
    "2xx-json-array": {"status": 200, "raw": b'["queued"]'},
    "2xx-json-without-id": {"status": 200, "body": {"status": "IN_QUEUE"}},
    "2xx-json-blank-id": {"status": 200, "body": {"id": "", "status": "IN_QUEUE"}},
    "3xx": {"status": 302, "raw": b"", "headers": {"Location": "https://login.example/"}},
    "truncated": {"status": 200, "raw": b'{"id": "abcdef-0123-u1", "status": "IN_QUEUE"}', "truncated": True},
    "5xx": {"status": 502, "raw": b"<html>Bad Gateway</html>"},
    "4xx-not-runpods": {"status": 408, "raw": b"<html>Request Timeout</html>"},
}


@pytest.mark.parametrize("answer", NOT_A_CLEAR_REFUSAL.values(), ids=NOT_A_CLEAR_REFUSAL.keys())
def test_an_answer_to_run_that_is_not_a_clear_refusal_is_unknown_and_never_sent_again(store, fake, answer):
    fake.script("run", queued=True, **answer)
    with pytest.raises(SubmissionUnknown, match="will not be sent again"):
        submit(store, client_for(fake))
    (version,) = document(store).versions
    assert version.claim.phase == "unknown", version.claim
    assert len(fake.jobs) == 1

    for _ in range(2):  # the next clicks, or a demo run after it: nothing is sent again
        with pytest.raises(SubmissionUnknown):
            submit(store, client_for(fake))
    assert fake.requests["run"] == 1 and len(fake.jobs) == 1


CLEAR_REFUSALS = {
    "400-runpod-error": (400, {"error": "input too large"}),
    "401": (401, {"error": "Unauthorized"}),
    "429": (429, {"error": "rate limit exceeded"}),
}


@pytest.mark.parametrize("code, body", CLEAR_REFUSALS.values(), ids=CLEAR_REFUSALS.keys())
def test_a_clear_refusal_of_run_releases_the_claim(store, fake, code, body):
    fake.script("run", code, count=10, body=body)
    with pytest.raises(RunPodError):
        submit(store, client_for(fake, max_attempts=2))
    (version,) = document(store).versions
    assert version.claim.phase == "released" and len(fake.jobs) == 0


def test_the_webhook_of_a_job_no_version_can_claim_is_rejected_after_the_maximum_age(store, fake):
    """The soak's seed 7054: the /run answer was lost after RunPod queued the job, and the job failed
    before its worker wrote a start marker, so its FAILED body names no request. It waits in the
    inbox while the version could still be attached; past the maximum job age the version is failed
    and the body goes to rejected/ with its reason: no inbox file stays for ever."""
    fake.latency_s = 0.5
    with pytest.raises(SubmissionUnknown):
        submit(store, client_for(fake, timeout=0.1))
    _wait_for(lambda: len(fake.jobs) == 1)
    (job,) = fake.jobs.values()
    failed = json.dumps({"id": job.id, "status": "FAILED", "error": "CUDA out of memory"}).encode()
    key = write_webhook(store, failed)
    assert key is not None

    soon = reconcile(store, max_job_age=timedelta(hours=25), now=datetime.now(UTC) + timedelta(hours=24))
    assert soon.webhooks_waiting == [key] and not soon.webhooks_rejected
    assert store.head(key) is not None and document(store).versions[0].status == VersionStatus.starting

    later = reconcile(store, max_job_age=timedelta(hours=25), now=datetime.now(UTC) + timedelta(hours=26))
    assert later.webhooks_rejected == [key] and not later.webhooks_waiting
    assert store.head(key) is None
    rejected = key.replace("webhooks/inbox/", "webhooks/rejected/")
    assert store.get(rejected).data == failed
    reason = store.get(rejected + ".reason.txt").data.decode()
    assert f"no version claims job {job.id}" in reason and "maximum job age" in reason
    (version,) = document(store).versions
    assert version.status == VersionStatus.failed and "unknown outcome" in version.error
    assert not reconcile(store, now=datetime.now(UTC) + timedelta(hours=27)).problems  # nothing left to report
