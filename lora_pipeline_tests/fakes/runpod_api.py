"""A RunPod Serverless API double: a real HTTP server that follows the documented contract.

RunPod cannot be reached from tests, so the client, the sensors and the webhook
receiver are exercised against this server instead of mocks: real sockets, real
JSON, real status codes. What it reproduces (DESIGN.md, "RunPod Serverless, as
documented"):

* ``/v2/{endpoint_id}/run``, ``/runsync``, ``/status/{id}``, ``/cancel/{id}``,
  ``/retry/{id}``, ``/health``, ``/purge-queue`` with Bearer auth (401 otherwise);
* ids with a suffix (``<uuid>-u1`` by default); which id forms ``/status`` accepts
  is configurable (``"either"``, only the id as returned ``"full"``, or only the
  base UUID ``"base"``, as the legacy notes believed);
* IN_QUEUE → IN_PROGRESS → COMPLETED / FAILED / CANCELLED / TIMED_OUT, driven by
  the test (``process``) or by a background worker (``auto=True``);
* results that expire (``result_ttl_s`` after a /run job ends, ``runsync_ttl_s``
  for /runsync) and then answer 404 with the body RunPod gave the legacy system;
* scripted 429s (with ``Retry-After``) and 5xx answers, added latency, a switch
  for "the API is down";
* webhook delivery of the status body on completion, retried up to 2 more times
  (configurable spacing) on a non-200 answer;
* outcomes from a script, or from a handler callable (the real worker's, or a stub);
* progress updates (``progress_update``, the SDK's signature): ``/status`` answers
  IN_PROGRESS with the last one as ``output`` until the job ends.
"""

from __future__ import annotations

import collections
import contextlib
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from lora_pipeline.registry.jobids import base_job_id

# DESIGN.md: /run 1000 per 10 s, /status 2000 per 10 s, /cancel 100 per 10 s.
RUNPOD_RATE_LIMITS: dict[str, tuple[int, float]] = {"run": (1000, 10.0), "status": (2000, 10.0), "cancel": (100, 10.0)}
EXPIRED_BODY = {"error": "redis err: client is nil"}
UNKNOWN_BODY = {"error": "request does not exist"}
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}
TRUNCATE = "X-Fake-Truncate"  # internal: the handler cuts the answer short (never sent)

_PATH = re.compile(
    r"^/v2/(?P<endpoint>[^/]+)/(?P<op>run|runsync|status|cancel|retry|health|purge-queue|stream)(?:/(?P<job>[^/?]+))?/?$"
)

Outcome = dict[
    str, Any
]  # {"status": "COMPLETED", "output": …} | {"status": "FAILED", "error": …} | {"status": "TIMED_OUT"}


@dataclass
class FakeJob:
    base: str
    id: str
    input: dict[str, Any]
    webhook: str | None
    policy: dict[str, Any]
    sync: bool
    status: str = "IN_QUEUE"
    created_at: float = 0.0
    started_at: float | None = None
    completed_at: float | None = None
    output: Any = None
    error: str | None = None
    retries: int = 0

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "status": self.status}
        if self.started_at is not None:
            body["delayTime"] = int((self.started_at - self.created_at) * 1000)
        if self.completed_at is not None and self.started_at is not None:
            body["executionTime"] = int((self.completed_at - self.started_at) * 1000)
        if self.output is not None:
            body["output"] = self.output
        if self.error is not None:
            body["error"] = self.error
        return body


@dataclass
class WebhookAttempt:
    url: str
    job_id: str
    attempt: int
    status_code: int | None
    error: str | None = None


@dataclass
class _Scripted:
    op: str
    status: int
    remaining: int
    retry_after: str | None
    body: dict[str, Any] = field(default_factory=dict)
    raw: bytes | None = None  # sent as is instead of ``body`` (an HTML error page, a cut JSON)
    truncated: bool = False  # Content-Length promises more than is sent, then the connection closes
    queued: bool = False  # RunPod did the work (queued the job) before this answer replaced its own
    headers: dict[str, str] = field(default_factory=dict)


class FakeRunPod:
    """The server; use as a context manager or call ``start()``/``stop()``."""

    def __init__(
        self,
        *,
        endpoint_id: str = "fake-endpoint",
        api_key: str = "test-key",
        id_suffix: str = "u1",
        status_lookup: str = "either",
        result_ttl_s: float = 1800.0,
        runsync_ttl_s: float = 60.0,
        latency_s: float = 0.0,
        handler: Callable[[dict[str, Any]], Any] | None = None,
        outcomes: list[Outcome] | None = None,
        auto: bool = False,
        queue_delay_s: float = 0.0,
        execution_s: float = 0.0,
        retry_suffix: str | None = None,
        webhook_retries: int = 2,
        webhook_retry_delay_s: float = 10.0,
        webhook_timeout_s: float = 10.0,
        webhook_statuses: frozenset[str] = frozenset({"COMPLETED", "FAILED", "TIMED_OUT"}),
        webhook_id_form: str = "full",
        rate_limits: dict[str, tuple[int, float]] | None = None,
    ) -> None:
        if status_lookup not in ("either", "full", "base"):
            raise ValueError(f"status_lookup must be either, full or base, got {status_lookup!r}")
        self.endpoint_id = endpoint_id
        self.api_key = api_key
        self.id_suffix = id_suffix
        self.status_lookup = status_lookup
        self.result_ttl_s = result_ttl_s
        self.runsync_ttl_s = runsync_ttl_s
        self.latency_s = latency_s
        self.handler = handler
        self.outcomes: collections.deque[Outcome] = collections.deque(outcomes or [])
        self.auto = auto
        self.queue_delay_s = queue_delay_s
        self.execution_s = execution_s
        self.retry_suffix = retry_suffix
        self.webhook_retries = webhook_retries
        self.webhook_retry_delay_s = webhook_retry_delay_s
        self.webhook_timeout_s = webhook_timeout_s
        self.webhook_statuses = webhook_statuses
        self.webhook_id_form = webhook_id_form  # "base": the webhook names the bare UUID (legacy notes)
        # op -> (requests, per seconds); RUNPOD_RATE_LIMITS is what the docs state.
        self.rate_limits = dict(rate_limits or {})
        self._windows: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self.down = False  # every request answers 503 while True
        self.jobs: dict[str, FakeJob] = {}
        self.requests: collections.Counter[str] = collections.Counter()
        self.webhook_attempts: list[WebhookAttempt] = []
        self._scripted: list[_Scripted] = []
        self._clock_offset = 0.0
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._work = threading.Condition(self._lock)
        self._in_flight = 0
        self._last_started = 0.0
        self._idle = threading.Condition(self._lock)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> FakeRunPod:
        fake = self

        class Handler(_RequestHandler):
            server_fake = fake

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._spawn(lambda: self._server.serve_forever(poll_interval=0.02), "fake-runpod-http")
        if self.auto:
            self._spawn(self._auto_worker, "fake-runpod-worker")
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._work:
            self._work.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeRunPod:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        """What RUNPOD_ENDPOINT_BASE_URL would be: ``http://127.0.0.1:<port>/v2``."""
        return f"http://127.0.0.1:{self.port}/v2"

    # -- test controls ---------------------------------------------------------

    def now(self) -> float:
        return time.time() + self._clock_offset

    def advance(self, seconds: float) -> None:
        """Move the fake's clock forward (result expiry) without sleeping."""
        with self._lock:
            self._clock_offset += seconds

    def script(
        self,
        op: str,
        status: int,
        count: int = 1,
        *,
        retry_after: float | str | None = None,
        body: dict[str, Any] | None = None,
        raw: bytes | None = None,
        truncated: bool = False,
        queued: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        """The next ``count`` requests to ``op`` (``"status"``, ``"run"``… or ``"*"``) answer ``status``.

        ``raw`` replaces the JSON body byte for byte, ``truncated`` cuts the answer short of its
        Content-Length, and ``queued`` has the request do its work first (a proxy's answer
        after RunPod queued the job)."""
        with self._lock:
            self._scripted.append(
                _Scripted(
                    op,
                    status,
                    count,
                    None if retry_after is None else str(retry_after),
                    body or {},
                    raw,
                    truncated,
                    queued,
                    dict(headers or {}),
                )
            )

    def add_job(
        self,
        input: dict[str, Any] | None = None,
        *,
        webhook: str | None = None,
        policy: dict[str, Any] | None = None,
        job_id: str | None = None,
    ) -> FakeJob:
        """Queue a job directly (as if /run had been called), e.g. 5,000 for a benchmark."""
        with self._lock:
            base = str(uuid.uuid4())
            job = FakeJob(
                base=base_job_id(job_id) if job_id else base,
                id=job_id or f"{base}-{self.id_suffix}",
                input=input or {},
                webhook=webhook,
                policy=policy or {},
                sync=False,
                created_at=self.now(),
            )
            self.jobs[job.base] = job
            self._work.notify_all()
            return job

    def job(self, job_id: str) -> FakeJob:
        return self.jobs[base_job_id(job_id)]

    def process(self, job_id: str | None = None, outcome: Outcome | None = None) -> FakeJob:
        """Run one queued job (the oldest, or ``job_id``) to its end, synchronously."""
        with self._lock:
            if job_id is None:
                queued = [j for j in self.jobs.values() if j.status == "IN_QUEUE"]
                if not queued:
                    raise LookupError("no queued job")
                job = min(queued, key=lambda j: j.created_at)
            else:
                job = self.job(job_id)
            if job.status != "IN_QUEUE":
                raise ValueError(f"job {job.id} is {job.status}, not IN_QUEUE")
            job.status, job.started_at = "IN_PROGRESS", self.now()
        final = outcome or self._outcome(job)
        return self._finish(job, final)

    def process_all(self) -> list[FakeJob]:
        done = []
        while any(j.status == "IN_QUEUE" for j in self.jobs.values()):
            done.append(self.process())
        return done

    def start_job(self, job_id: str) -> FakeJob:
        """Move a queued job to IN_PROGRESS (and leave it there)."""
        with self._lock:
            job = self.job(job_id)
            job.status, job.started_at = "IN_PROGRESS", self.now()
            return job

    def progress_update(self, job: dict[str, Any], progress: Any) -> None:
        """What ``runpod.serverless.progress_update(job, progress)`` does on a worker: while the
        job is IN_PROGRESS, ``/status`` answers with ``progress`` as its ``output`` (RunPod's
        docs: "progress updates will be available when the status is polled"). Its final
        status replaces it; an update for a job that is not running is dropped."""
        json.dumps(progress)  # the SDK sends it as JSON
        with self._lock:
            fake = self.job(job["id"])
            if fake.status == "IN_PROGRESS":
                fake.output = progress

    def finish(self, job_id: str, outcome: Outcome) -> FakeJob:
        """End a job with ``outcome`` now, delivering its webhook."""
        job = self.job(job_id)
        with self._lock:
            if job.started_at is None:
                job.started_at = self.now()
            job.status = "IN_PROGRESS"
        return self._finish(job, outcome)

    def wait_for_webhooks(self, count: int, timeout_s: float = 10.0) -> list[WebhookAttempt]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.webhook_attempts) >= count:
                    return list(self.webhook_attempts)
            time.sleep(0.01)
        raise TimeoutError(f"{len(self.webhook_attempts)} webhook attempts, expected {count}")

    # -- the job life ------------------------------------------------------------

    def _outcome(self, job: FakeJob) -> Outcome:
        with self._lock:
            if self.outcomes:
                return self.outcomes.popleft()
        if self.handler is None:
            return {"status": "COMPLETED", "output": {"ok": True}}
        try:
            result = self.handler({"id": job.id, "input": job.input})
        except Exception as exc:  # noqa: BLE001 - RunPod reports a raising handler as FAILED
            return {"status": "FAILED", "error": f"handler: {exc}"}
        if isinstance(result, dict) and "error" in result:
            return {"status": "FAILED", "error": str(result["error"])}
        return {"status": "COMPLETED", "output": result}

    def _finish(self, job: FakeJob, outcome: Outcome) -> FakeJob:
        with self._lock:
            if job.status in FINAL:
                return job  # cancelled meanwhile
            job.status = outcome["status"]
            job.output = outcome.get("output")
            job.error = outcome.get("error")
            if job.status == "TIMED_OUT" and job.error is None:
                job.error = "execution timeout exceeded"
            job.completed_at = self.now()
            body = job.body()
            if self.webhook_id_form == "base":
                body["id"] = job.base
            webhook = job.webhook if job.status in self.webhook_statuses else None
        if webhook:
            self._spawn(lambda: self._deliver(webhook, body), "fake-runpod-webhook")
        return job

    def _deliver(self, url: str, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        for attempt in range(1 + self.webhook_retries):
            if attempt and self._stopping.wait(self.webhook_retry_delay_s):
                return
            try:
                response = httpx.post(
                    url, content=payload, headers={"Content-Type": "application/json"}, timeout=self.webhook_timeout_s
                )
                record = WebhookAttempt(url, body["id"], attempt + 1, response.status_code)
            except httpx.HTTPError as exc:
                record = WebhookAttempt(url, body["id"], attempt + 1, None, f"{type(exc).__name__}: {exc}")
            with self._lock:
                self.webhook_attempts.append(record)
            if record.status_code == 200:
                return

    def _auto_worker(self) -> None:
        while not self._stopping.is_set():
            with self._work:
                queued = [j for j in self.jobs.values() if j.status == "IN_QUEUE"]
                if not queued:
                    self._work.wait(0.05)
                    continue
                job = min(queued, key=lambda j: j.created_at)
                job.status = "IN_PROGRESS"
            if self._stopping.wait(self.queue_delay_s):
                return
            with self._lock:
                job.started_at = self.now()
            timeout_ms = job.policy.get("executionTimeout")
            if timeout_ms is not None and self.execution_s * 1000 > timeout_ms:
                self._stopping.wait(timeout_ms / 1000)
                self._finish(job, {"status": "TIMED_OUT"})
                continue
            if self._stopping.wait(self.execution_s):
                return
            self._finish(job, self._outcome(job))

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # -- the HTTP API ------------------------------------------------------------

    def wait_idle(self, timeout_s: float = 10.0, quiet_s: float = 0.2) -> None:
        """Wait until no request is being handled and none has started for ``quiet_s`` (one
        still in the listen backlog): a POST /run whose client gave up (a lost answer) still
        queues its job, as RunPod does, and only then does the job exist."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while True:
                quiet_for = time.monotonic() - self._last_started
                if self._in_flight == 0 and quiet_for >= quiet_s:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self._in_flight} request(s) still in flight after {timeout_s}s")
                self._idle.wait(min(left, max(quiet_s - quiet_for, 0.01)))

    def handle(
        self, method: str, path: str, auth: str | None, body: bytes
    ) -> tuple[int, dict[str, Any] | bytes, dict[str, str]]:
        """One request → (status code, JSON body, extra headers)."""
        with self._lock:
            self._in_flight += 1
            self._last_started = time.monotonic()
        try:
            return self._handle(method, path, auth, body)
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def _handle(
        self, method: str, path: str, auth: str | None, body: bytes
    ) -> tuple[int, dict[str, Any] | bytes, dict[str, str]]:
        match = _PATH.match(path.split("?", 1)[0])
        op = match.group("op") if match else "unknown"
        with self._lock:
            self.requests[op] += 1
            self.requests["total"] += 1
        if self.latency_s:
            time.sleep(self.latency_s)
        if self.down:
            return 503, {"error": "service unavailable"}, {}
        if auth != f"Bearer {self.api_key}":
            return 401, {"error": "Unauthorized"}, {}
        if match is None or match.group("endpoint") != self.endpoint_id:
            return 404, {"error": "endpoint not found"}, {}
        limited = self._rate_limited(op)
        if limited is not None:
            return 429, {"error": "rate limit exceeded"}, {"Retry-After": limited}
        scripted = self._take_scripted(op)
        if scripted is not None:
            if scripted.queued and op in ("run", "runsync"):
                self._run(body, sync=op == "runsync")
            headers = {"Retry-After": scripted.retry_after} if scripted.retry_after is not None else {}
            headers.update(scripted.headers)
            if scripted.truncated:
                headers[TRUNCATE] = "1"
            if scripted.raw is not None:
                return scripted.status, scripted.raw, headers
            return scripted.status, scripted.body or {"error": f"scripted {scripted.status}"}, headers
        expected = {
            "run": "POST",
            "runsync": "POST",
            "status": "GET",
            "cancel": "POST",
            "retry": "POST",
            "health": "GET",
            "purge-queue": "POST",
            "stream": "GET",
        }[op]
        if method != expected and not (op == "status" and method == "POST"):
            return 405, {"error": f"{method} not allowed on /{op}"}, {}
        if op in ("run", "runsync"):
            return self._run(body, sync=op == "runsync")
        if op == "health":
            return 200, self._health(), {}
        if op == "purge-queue":
            return 200, self._purge(), {}
        job = self._lookup(match.group("job") or "")
        if isinstance(job, tuple):
            return job
        if op in ("status", "stream"):
            return 200, job.body(), {}
        if op == "cancel":
            with self._lock:
                if job.status not in FINAL:
                    job.status, job.completed_at = "CANCELLED", self.now()
                return 200, {"id": job.id, "status": job.status}, {}
        return self._retry(job)

    def _rate_limited(self, op: str) -> str | None:
        """A Retry-After value when ``op`` is over its documented rate, else None."""
        if op not in self.rate_limits:
            return None
        limit, per_s = self.rate_limits[op]
        now = time.monotonic()
        with self._lock:
            window = self._windows[op]
            while window and window[0] <= now - per_s:
                window.popleft()
            if len(window) >= limit:
                return f"{max(0.01, window[0] + per_s - now):.2f}"
            window.append(now)
        return None

    def _take_scripted(self, op: str) -> _Scripted | None:
        with self._lock:
            for scripted in self._scripted:
                if scripted.remaining > 0 and scripted.op in (op, "*"):
                    scripted.remaining -= 1
                    return scripted
        return None

    def _run(self, raw: bytes, *, sync: bool) -> tuple[int, dict[str, Any], dict[str, str]]:
        try:
            request = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            return 400, {"error": "invalid JSON body"}, {}
        if not isinstance(request, dict) or not isinstance(request.get("input"), dict):
            return 400, {"error": "body must be an object with an 'input' object"}, {}
        policy = request.get("policy") or {}
        if not isinstance(policy, dict) or any(
            not isinstance(policy.get(k, 0), int) for k in ("executionTimeout", "ttl")
        ):
            return 400, {"error": "policy must hold integer executionTimeout and ttl (ms)"}, {}
        job = self.add_job(request["input"], webhook=request.get("webhook"), policy=policy)
        job.sync = sync
        if sync:
            self.process(job.id)
            return 200, job.body(), {}
        return 200, {"id": job.id, "status": job.status}, {}

    def _lookup(self, requested: str) -> FakeJob | tuple[int, dict[str, Any], dict[str, str]]:
        with self._lock:
            job = self.jobs.get(base_job_id(requested))
            if job is None:
                return 404, UNKNOWN_BODY, {}
            accepted = {
                "either": {job.id, job.base},
                "full": {job.id},
                "base": {job.base},
            }[self.status_lookup]
            if requested not in accepted:
                return 404, UNKNOWN_BODY, {}
            if job.completed_at is not None:
                ttl = self.runsync_ttl_s if job.sync else self.result_ttl_s
                if self.now() > job.completed_at + ttl:
                    return 404, EXPIRED_BODY, {}
            return job

    def _retry(self, job: FakeJob) -> tuple[int, dict[str, Any], dict[str, str]]:
        with self._lock:
            if job.status not in ("FAILED", "TIMED_OUT"):
                return 400, {"error": f"job is {job.status}; only FAILED or TIMED_OUT jobs can be retried"}, {}
            job.retries += 1
            if self.retry_suffix:
                job.id = f"{job.base}-{self.retry_suffix}"
            job.status, job.output, job.error = "IN_QUEUE", None, None
            job.started_at = job.completed_at = None
            job.created_at = self.now()
            self._work.notify_all()
            return 200, {"id": job.id, "status": job.status}, {}

    def _health(self) -> dict[str, Any]:
        with self._lock:
            counts = collections.Counter(j.status for j in self.jobs.values())
            return {
                "jobs": {
                    "completed": counts["COMPLETED"],
                    "failed": counts["FAILED"] + counts["TIMED_OUT"],
                    "inProgress": counts["IN_PROGRESS"],
                    "inQueue": counts["IN_QUEUE"],
                    "retried": sum(j.retries for j in self.jobs.values()),
                },
                "workers": {"idle": 0 if counts["IN_PROGRESS"] else 1, "running": min(1, counts["IN_PROGRESS"])},
            }

    def _purge(self) -> dict[str, Any]:
        with self._lock:
            queued = [base for base, j in self.jobs.items() if j.status == "IN_QUEUE"]
            for base in queued:
                del self.jobs[base]
            return {"removed": len(queued), "status": "completed"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # listen() backlog: the default 5 drops SYNs under a burst (1 s retransmit)


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go in two writes: no 40 ms delayed-ACK stall
    server_fake: FakeRunPod

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        code, payload, headers = self.server_fake.handle(method, self.path, self.headers.get("Authorization"), body)
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        truncated = headers.pop(TRUNCATE, None) is not None
        self.send_response(code)
        self.send_header("Content-Type", "application/json" if isinstance(payload, dict) else "text/html")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up
            self.wfile.write(data[: len(data) // 2] if truncated else data)
        if truncated:
            self.close_connection = True

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")
