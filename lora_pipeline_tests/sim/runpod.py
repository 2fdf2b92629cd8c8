"""RunPod Serverless in memory, answering the real ``RunPodClient`` over an httpx MockTransport.

The client's own classification of answers runs for real: the simulation only decides,
from the seed, what comes back. ``POST /run`` may answer 200 with the job, or (with the
job queued or not, as a proxy or RunPod would) an answer lost to a read timeout, a 5xx,
a 200 that is not JSON (a proxy's error page), a 200 JSON without an id, a 3xx, a body
cut short, a 429 or a refused connection (those two: certainly nothing queued), a 400.
``/status`` answers the job, or 404 once its result expired (each job keeps it for a
seeded time after it ends), or now and then a 5xx or a lost answer. Each call is a
scheduling point, so other actors run while a request is "on the wire".

Workers (``take``/``finish``) are driven by the world; webhooks are the world's too
(``world.deliver``), lost or duplicated as the seed says.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from lora_pipeline.backends.runpod_client import RunPodClient
from lora_pipeline.registry.jobids import base_job_id
from lora_pipeline.storage.breaker import CircuitBreaker
from lora_pipeline_tests.fakes.runpod_api import FakeJob
from lora_pipeline_tests.sim.scheduler import Sim

ENDPOINT = "sim-endpoint"
EXPIRED_BODY = {"error": "redis err: client is nil"}
_PATH = re.compile(r"^/v2/[^/]+/(?P<op>run|status|cancel)(?:/(?P<job>[^/?]+))?$")

# /run answers: (name, weight, whether RunPod queued the job)
RUN_ANSWERS: tuple[tuple[str, float, bool | None], ...] = (
    ("ok", 0.50, True),
    ("lost", 0.06, True),
    ("5xx", 0.06, None),  # None: queued or not, by the seed
    ("html-200", 0.06, True),
    ("no-id", 0.05, True),
    ("3xx", 0.05, None),
    ("truncated", 0.06, True),
    ("429", 0.06, False),
    ("connect", 0.05, False),
    ("400", 0.05, False),
)


@dataclass
class SimJob(FakeJob):
    """The HTTP double's job record (and its status body), with the simulation's bookkeeping."""

    ended_at: float | None = None
    keep_result_s: float = 1800.0
    taken: bool = False  # a worker runs it now (RunPod gives a job to one worker at a time)


@dataclass
class SimRunPod:
    sim: Sim
    jobs: dict[str, SimJob] = field(default_factory=dict)
    answers: dict[str, int] = field(default_factory=dict)
    faulty_status: float = 0.05
    bad_2xx: bool = True  # whether /run may answer html-200, 3xx or a truncated body
    forced: str | None = None  # every /run answered so (a test of one answer class)

    def client(self) -> RunPodClient:
        """The real client, on this double, sleeping and keeping its breaker on simulated time."""
        return RunPodClient(
            "sim-key",
            ENDPOINT,
            base_url="https://api.runpod.invalid/v2",
            transport=httpx.MockTransport(self._handle),
            sleep=self.sim.sleep,
            breaker=CircuitBreaker("RunPod (sim)", fail_max=5, reset_timeout=30.0, clock=lambda: self.sim.t),
        )

    # -- the worker's side -----------------------------------------------------------------

    def queued(self) -> list[SimJob]:
        return [j for j in self.jobs.values() if j.status in ("IN_QUEUE", "IN_PROGRESS") and not j.taken]

    def finish(self, job: SimJob, outcome: dict[str, Any]) -> None:
        job.status = outcome["status"]
        job.output = outcome.get("output")
        job.error = outcome.get("error")
        job.ended_at = self.sim.t
        job.keep_result_s = self.sim.rng.choice([1.0, 60.0, 1800.0, 1800.0])

    # -- HTTP ---------------------------------------------------------------------------------

    def _handle(self, request: httpx.Request) -> httpx.Response:
        actor = self.sim.step()
        faulty = actor is not None and actor.faulty
        match = _PATH.match(request.url.path)
        if match is None:
            return httpx.Response(404, json={"error": "not found"})
        if match["op"] == "run":
            return self._run(request, faulty)
        return self._status(request, match["job"] or "", faulty)

    def _answer(self, name: str) -> str:
        self.answers[name] = self.answers.get(name, 0) + 1
        return name

    def _run(self, request: httpx.Request, faulty: bool) -> httpx.Response:
        rng = self.sim.rng
        if self.forced is not None:
            name, _, queued = next(a for a in RUN_ANSWERS if a[0] == self.forced)
        elif faulty:
            answers = [a for a in RUN_ANSWERS if self.bad_2xx or a[0] not in ("html-200", "3xx", "truncated")]
            name, _, queued = rng.choices(answers, weights=[w for _, w, _ in answers])[0]
        else:
            name, queued = "ok", True
        self._answer(name)
        if queued is None:
            queued = rng.random() < 0.5
        if name == "connect":
            raise httpx.ConnectError("connection refused", request=request)
        job = None
        if queued:
            job_id = f"{uuid.UUID(int=rng.getrandbits(128))}-u1"
            job = SimJob(base_job_id(job_id), job_id, json.loads(request.content)["input"], None, {}, sync=False)
            self.jobs[job.id] = job
        body = json.dumps({"id": job.id if job else "", "status": "IN_QUEUE"})
        if name == "ok":
            return httpx.Response(200, text=body, headers={"Content-Type": "application/json"})
        if name == "lost":
            raise httpx.ReadTimeout("read timed out", request=request)
        if name == "5xx":
            return httpx.Response(rng.choice([500, 502, 503]), text="upstream error")
        if name == "html-200":
            return httpx.Response(200, text="<html><body>Bad gateway (proxy)</body></html>")
        if name == "no-id":
            return httpx.Response(200, json={"status": "IN_QUEUE"})
        if name == "3xx":
            return httpx.Response(302, headers={"Location": "https://login.invalid/"})
        if name == "truncated":
            return httpx.Response(200, text=body[: len(body) // 2], headers={"Content-Type": "application/json"})
        if name == "429":
            return httpx.Response(429, headers={"Retry-After": "1"}, json={"error": "rate limited"})
        return httpx.Response(400, json={"error": "input failed validation"})

    def _status(self, request: httpx.Request, job_id: str, faulty: bool) -> httpx.Response:
        rng = self.sim.rng
        if faulty and rng.random() < self.faulty_status:
            if rng.random() < 0.5:
                raise httpx.ReadTimeout("read timed out", request=request)
            return httpx.Response(503, text="upstream error")
        job = self.jobs.get(job_id) or next((j for j in self.jobs.values() if j.base == base_job_id(job_id)), None)
        if job is None or (job.ended_at is not None and self.sim.t - job.ended_at > job.keep_result_s):
            return httpx.Response(404, json=EXPIRED_BODY)
        return httpx.Response(200, json=job.body())
