"""RunPod Serverless over HTTP: the endpoint API, hardened against what broke before.

What the legacy system tripped on, and what this client does about it:

* Ids carry a suffix (``-u1``, ``-e2``…) and lookups failed either way: ``status``,
  ``cancel`` and ``retry`` try the id exactly as RunPod returned it first, and on a
  404 the base UUID.
* Results expire (30 minutes after a ``/run`` job ends) and then answer 404: that
  is ``JobNotFound``, a normal outcome the caller settles from the object store.
* 429 and 5xx are transient: retried with exponential backoff and jitter,
  honouring ``Retry-After``. Every call has a timeout. ``POST /run`` is the
  exception: RunPod has no idempotency key, so it is repeated only when RunPod
  certainly did not take it (no connection was made, or 429); any answer that is
  not a clear refusal (a 5xx, a 3xx, a 2xx whose body is not a JSON status body
  with an id, a cut or undecodable body, a 4xx without RunPod's JSON error body
  other than 401/403/404) raises ``SubmitOutcomeUnknown`` and is never repeated.
* 401 is the key, not the network: ``RunPodAuthError`` names RUNPOD_API_KEY.
* An API that is down must not stall every sensor tick: after consecutive
  failures a circuit breaker opens and calls fail at once with
  ``RunPodUnavailable`` until a probe succeeds.

The breaker is the project's own (``lora_pipeline.storage.breaker``) rather than
pybreaker's: pybreaker holds one lock for the whole guarded call, which would
serialise the concurrent status polls of a sensor tick.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
from pydantic import ValidationError
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, stop_after_delay

from lora_pipeline.contracts.problems import describe_validation_error
from lora_pipeline.backends.base import (
    ExecutionPolicy,
    JobNotFound,
    RunPodAuthError,
    RunPodError,
    RunPodRateLimited,
    RunPodRequestError,
    RunPodUnavailable,
    SubmitOutcomeUnknown,
)
from lora_pipeline.contracts.job_status import JobStatus
from lora_pipeline.contracts.training import TrainingRequest
from lora_pipeline.registry.jobids import base_job_id
from lora_pipeline.settings import DEFAULT_RUNPOD_BASE_URL, Settings, get_settings
from lora_pipeline.storage.base import StoreUnavailable
from lora_pipeline.storage.breaker import CircuitBreaker

DEFAULT_BASE_URL = DEFAULT_RUNPOD_BASE_URL
DEFAULT_TIMEOUT = httpx.Timeout(15.0, connect=5.0)
RUN_SYNC_TIMEOUT_S = 120.0


class _Transient(Exception):
    """An attempt that may succeed if repeated: 429, 5xx, a network error or a timeout."""

    def __init__(self, message: str, *, retry_after_s: float | None = None, api_down: bool) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.api_down = api_down


class RunPodClient:
    """A TrainingBackend on one RunPod Serverless endpoint.

    Thread-safe: one instance serves a whole pool of concurrent status polls.
    """

    def __init__(
        self,
        api_key: str,
        endpoint_id: str | None,  # None or "" raises ValueError naming RUNPOD_ENDPOINT_ID
        base_url: str | None = DEFAULT_BASE_URL,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
        *,
        max_attempts: int = 5,
        max_retry_wait_s: float = 30.0,
        max_total_retry_s: float = 60.0,
        backoff_base_s: float = 0.5,
        breaker: CircuitBreaker | None = None,
        breaker_fail_max: int = 5,
        breaker_reset_s: float = 30.0,
        max_connections: int = 64,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """``base_url`` None: the setting RUNPOD_ENDPOINT_BASE_URL (as the runpod SDK reads it)."""
        if not api_key:
            raise RunPodAuthError("no RunPod API key: set RUNPOD_API_KEY")
        if not endpoint_id or "/" in endpoint_id:
            raise ValueError(f"invalid RunPod endpoint id {endpoint_id!r}: set RUNPOD_ENDPOINT_ID")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        base = (base_url or get_settings().runpod_base_url).rstrip("/")
        self.endpoint_id = endpoint_id
        self.base_url = base
        self.max_attempts = max_attempts
        self.max_retry_wait_s = max_retry_wait_s
        self.max_total_retry_s = max_total_retry_s
        self.backoff_base_s = backoff_base_s
        self._sleep = sleep
        self.breaker = breaker or CircuitBreaker(
            f"RunPod endpoint {endpoint_id}", fail_max=breaker_fail_max, reset_timeout=breaker_reset_s
        )
        self._http = httpx.Client(
            base_url=f"{base}/{endpoint_id}",
            headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
            timeout=timeout,
            transport=transport,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **kwargs: Any) -> RunPodClient:
        """Build from the settings (RUNPOD_API_KEY, RUNPOD_ENDPOINT_ID, RUNPOD_ENDPOINT_BASE_URL;
        default ``get_settings()``)."""
        settings = settings or get_settings()
        if not settings.runpod_endpoint_id:
            raise ValueError("RUNPOD_ENDPOINT_ID is not set: the RunPod backend needs an endpoint")
        return cls(
            settings.runpod_api_key or "",
            settings.runpod_endpoint_id,
            base_url=settings.runpod_base_url,
            **kwargs,
        )

    def __repr__(self) -> str:  # never show the key
        return f"RunPodClient(endpoint_id={self.endpoint_id!r}, base_url={self.base_url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RunPodClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- TrainingBackend ------------------------------------------------------------

    def submit(
        self,
        request: TrainingRequest,
        *,
        webhook_url: str | None = None,
        policy: ExecutionPolicy,
    ) -> str:
        """Queue a training job (``POST /run``); returns the id exactly as RunPod returned it."""
        return self.run(request.model_dump(mode="json"), webhook_url=webhook_url, policy=policy).id

    def status(self, job_id: str) -> JobStatus:
        """``GET /status/{id}``, by the id as given and then by its base UUID."""
        return _status_body(self._by_job_id("GET", "status", job_id), f"GET /status/{job_id}")

    def cancel(self, job_id: str) -> JobStatus:
        """``POST /cancel/{id}``; RunPod answers with the job's status."""
        return _status_body(self._by_job_id("POST", "cancel", job_id), f"POST /cancel/{job_id}")

    # -- the rest of the endpoint API --------------------------------------------

    def run(
        self,
        input: dict[str, Any],
        *,
        webhook_url: str | None = None,
        policy: ExecutionPolicy | None = None,
    ) -> JobStatus:
        """``POST /run`` with ``{"input", "webhook", "policy"}``; answers ``{"id", "status"}``.

        Repeated only when RunPod certainly queued nothing: 429, or no connection
        could be made. A read timeout, a dropped connection or a 5xx may come after
        RunPod queued the job, and a repeat would train twice: SubmitOutcomeUnknown.
        """
        body: dict[str, Any] = {"input": input}
        if webhook_url:
            body["webhook"] = webhook_url
        if policy is not None:
            body["policy"] = policy.to_api()
        return _status_body(self._call("POST", "/run", json=body, idempotent=False), "POST /run", accepted=True)

    def run_sync(
        self,
        input: dict[str, Any],
        *,
        policy: ExecutionPolicy | None = None,
        timeout_s: float = RUN_SYNC_TIMEOUT_S,
    ) -> JobStatus:
        """``POST /runsync``: waits for the job (RunPod keeps its result only 1 minute)."""
        body: dict[str, Any] = {"input": input}
        if policy is not None:
            body["policy"] = policy.to_api()
        return _status_body(
            self._call("POST", "/runsync", json=body, timeout=timeout_s, idempotent=False),
            "POST /runsync",
            accepted=True,
        )

    def retry(self, job_id: str) -> JobStatus:
        """``POST /retry/{id}``: requeue a FAILED or TIMED_OUT job (until it expires)."""
        return _status_body(self._by_job_id("POST", "retry", job_id), f"POST /retry/{job_id}")

    def health(self) -> dict[str, Any]:
        """``GET /health``: worker and job counts of the endpoint."""
        return self._call("GET", "/health")

    def purge_queue(self) -> dict[str, Any]:
        """``POST /purge-queue``: drop every queued (not running) job."""
        return self._call("POST", "/purge-queue")

    # -- internals ----------------------------------------------------------------

    def _by_job_id(self, method: str, operation: str, job_id: str) -> dict[str, Any]:
        candidates = [job_id.strip()]
        if base_job_id(job_id) != candidates[0]:
            candidates.append(base_job_id(job_id))
        last: JobNotFound | None = None
        for candidate in candidates:
            try:
                return self._call(method, f"/{operation}/{candidate}", job_id=job_id)
            except JobNotFound as exc:
                last = exc
        assert last is not None
        raise last

    def _call(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        timeout: float | None = None,
        job_id: str | None = None,
        idempotent: bool = True,
    ) -> dict[str, Any]:
        retrying = Retrying(
            stop=stop_after_attempt(self.max_attempts) | stop_after_delay(self.max_total_retry_s),
            wait=self._wait,
            retry=retry_if_exception_type(_Transient),
            sleep=self._sleep,
            reraise=True,
        )
        try:
            return retrying(self._attempt, method, path, json, timeout, job_id, idempotent)
        except _Transient as exc:
            if exc.api_down:
                raise RunPodUnavailable(
                    f"RunPod {method} {path} failed after {self.max_attempts} attempts: {exc}"
                ) from None
            raise RunPodRateLimited(
                f"RunPod {method} {path} still rate limited (429) after {self.max_attempts} attempts"
            ) from None

    def _attempt(
        self,
        method: str,
        path: str,
        json: dict[str, Any] | None,
        timeout: float | None,
        job_id: str | None,
        idempotent: bool,
    ) -> dict[str, Any]:
        """One request and its verdict: the answer's payload, or the exception that decides a repeat.

        ``_call`` repeats only ``_Transient``. For a request that is not idempotent
        (``POST /run``, no idempotency key at RunPod) whatever may have reached
        RunPod becomes SubmitOutcomeUnknown instead, so a job is never trained twice.
        """
        what = f"{method} {path}"
        response = self._send(method, path, json, timeout, idempotent)
        if response.status_code >= 500:
            error = _Transient(
                f"HTTP {response.status_code}: {_excerpt(response)}",
                retry_after_s=_retry_after(response),
                api_down=True,
            )
            self.breaker.record_failure(error)
            if not idempotent:
                raise SubmitOutcomeUnknown(
                    f"RunPod {what} answered HTTP {response.status_code} ({_excerpt(response)}); "
                    "it may have been accepted, so it is not repeated"
                )
            raise error
        self.breaker.record_success()  # it answered: whatever it said, the API is up
        if not idempotent and not _clear_answer(response):
            raise SubmitOutcomeUnknown(
                f"RunPod {what} answered HTTP {response.status_code} with a body that is not RunPod's "
                f"({_excerpt(response) or 'empty'}); it may have been accepted, so it is not repeated"
            )
        refusal = _refusal(response, what, job_id=job_id, endpoint_id=self.endpoint_id)
        if refusal is not None:
            raise refusal
        return _json_object(response, what)

    def _send(
        self,
        method: str,
        path: str,
        json: dict[str, Any] | None,
        timeout: float | None,
        idempotent: bool,
    ) -> httpx.Response:
        """Pass the breaker, then send; a transport failure counts against the API before it is classified.

        An open breaker fails at once with RunPodUnavailable, so a dead API costs no
        timeout per call.
        """
        try:
            self.breaker.before_call()
        except StoreUnavailable as exc:
            raise RunPodUnavailable(str(exc)) from None
        try:
            return self._http.request(
                method, path, json=json, timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT
            )
        except httpx.RequestError as exc:  # no answer, a cut one, or one that cannot be decoded
            self.breaker.record_failure(exc)
            raise _transport_failure(exc, what=f"{method} {path}", idempotent=idempotent) from None

    def _wait(self, state: RetryCallState) -> float:
        """Retry-After when RunPod sends one, else exponential backoff with full jitter."""
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Transient) and exc.retry_after_s is not None:
            return min(exc.retry_after_s, self.max_retry_wait_s)
        ceiling = min(self.max_retry_wait_s, self.backoff_base_s * 2 ** (state.attempt_number - 1))
        return random.uniform(ceiling / 2, ceiling)


def _status_body(payload: dict[str, Any], what: str, *, accepted: bool = False) -> JobStatus:
    """RunPod's answer as a JobStatus, or a RunPodError naming what is wrong with it (never a raw
    ValidationError, which would escape every caller's ``except RunPodError``). An unusable
    answer to a request that queues a job leaves its outcome unknown."""
    try:
        return JobStatus.model_validate(payload)
    except ValidationError as exc:
        problem = describe_validation_error(exc)
        error = SubmitOutcomeUnknown if accepted else RunPodError
        raise error(f"RunPod {what} answered a body that is not a status body ({problem})") from None


# Failures before any byte of the request reached RunPod (no connection was made).
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def _transport_failure(exc: httpx.RequestError, *, what: str, idempotent: bool) -> _Transient | SubmitOutcomeUnknown:
    """A request that got no answer: repeatable, unless it may have reached RunPod and is not idempotent.

    Only a failure to connect (``_NOT_SENT``) proves RunPod saw nothing; a read
    timeout or a dropped connection may come after RunPod queued a ``/run``.
    """
    if isinstance(exc, _NOT_SENT) or idempotent:
        return _Transient(f"{type(exc).__name__}: {exc}", api_down=True)
    return SubmitOutcomeUnknown(
        f"RunPod {what}: {type(exc).__name__} after the request was sent ({exc}); "
        "it may have been accepted, so it is not repeated"
    )


def _refusal(
    response: httpx.Response, what: str, *, job_id: str | None, endpoint_id: str
) -> _Transient | RunPodError | None:
    """The exception a 4xx answer (below 500) stands for, or None when the request succeeded.

    429 is RunPod's pacing, repeated even for ``/run`` (RunPod queued nothing). A
    404 on a job's path is the job (expired or unknown); elsewhere it is the endpoint.
    """
    code = response.status_code
    if code == 429:
        return _Transient("HTTP 429", retry_after_s=_retry_after(response), api_down=False)
    if code in (401, 403):
        return RunPodAuthError(
            f"RunPod refused the API key (HTTP {code}) for endpoint {endpoint_id}: check RUNPOD_API_KEY"
        )
    if code == 404:
        if job_id is not None:
            return JobNotFound(job_id, _excerpt(response))
        return RunPodRequestError(
            f"RunPod answered 404 for {what}: is RUNPOD_ENDPOINT_ID {endpoint_id!r} right? ({_excerpt(response)})",
            404,
        )
    if code >= 400:
        return RunPodRequestError(f"RunPod refused {what} (HTTP {code}): {_excerpt(response)}", code)
    return None


# Answers to a request that queues a job which say, whatever their body, that nothing was
# queued: the key refused, the endpoint unknown, RunPod's pacing.
_REFUSED_WHATEVER_THE_BODY = (401, 403, 404, 429)


def _clear_answer(response: httpx.Response) -> bool:
    """Whether an answer below 500 to ``POST /run`` says for certain what RunPod did.

    A 2xx is RunPod's only if its body is a JSON object (the status body is checked
    next); a 4xx is a refusal if it is one of ``_REFUSED_WHATEVER_THE_BODY`` or carries
    RunPod's JSON error body. Anything else (a proxy's HTML page served with 200, a
    3xx, a 4xx from something in between) may have come after RunPod queued the job.
    """
    code = response.status_code
    if code in _REFUSED_WHATEVER_THE_BODY:
        return True
    if not (200 <= code < 300 or 400 <= code < 500):
        return False
    try:
        return isinstance(response.json(), dict)
    except ValueError:
        return False


def _json_object(response: httpx.Response, what: str) -> dict[str, Any]:
    """The answer's JSON object; anything else is a RunPodError, never a raw decoding error."""
    try:
        payload = response.json()
    except ValueError:
        raise RunPodError(f"RunPod {what} answered non-JSON: {_excerpt(response)}") from None
    if not isinstance(payload, dict):
        raise RunPodError(f"RunPod {what} answered {type(payload).__name__}, not an object")
    return payload


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _excerpt(response: httpx.Response, limit: int = 300) -> str:
    text = response.text.strip()
    return text[:limit] + ("…" if len(text) > limit else "")
