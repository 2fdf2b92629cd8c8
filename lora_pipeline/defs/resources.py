"""Dagster resources: the object store and the training backend, configured from the environment.

Each field defaults to ``None`` meaning "take it from the settings"
(``lora_pipeline.settings.get_settings()``, the environment read once), so the embedded
defaults need no configuration and a deployment can still override every value in the
UI's launchpad or in code.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import boto3
import dagster as dg
from dagster_aws.s3 import S3Resource
from pydantic import Field, PrivateAttr

from lora_pipeline.backends.base import RunPodError, TrainingBackend
from lora_pipeline.backends.factory import open_training_backend
from lora_pipeline.backends.runpod_client import DEFAULT_BASE_URL as DEFAULT_RUNPOD_BASE_URL
from lora_pipeline.backends.runpod_client import RunPodClient
from lora_pipeline.settings import Settings, get_settings
from lora_pipeline.storage import ObjectStore
from lora_pipeline.storage.breaker import CircuitBreaker
from lora_pipeline.storage.factory import open_store, shared_store
from lora_pipeline.storage.s3 import S3Options, build_s3_client
from lora_pipeline.webhook.urls import webhook_url


class LoraS3Resource(S3Resource):
    """dagster-aws's S3Resource plus the knobs a flaky S3-compatible endpoint needs.

    RunPod's S3 API wants path-style addressing; every endpoint deserves explicit
    timeouts and retries. Unset fields fall back to the settings
    (``LORA_S3_*``, ``AWS_*``: see ``S3Options.from_settings``), so the resource and the worker,
    which has no Dagster, build the same client. ``S3Resource.get_client()``
    builds a new client per call, so the storage resource builds one per process and
    settings (``client_for``, through ``shared_store``).
    """

    addressing_style: str | None = Field(default=None, description="auto, path or virtual (LORA_S3_ADDRESSING_STYLE).")
    connect_timeout_s: float | None = Field(default=None, description="Connect timeout (LORA_S3_CONNECT_TIMEOUT, 5 s).")
    read_timeout_s: float | None = Field(default=None, description="Read timeout (LORA_S3_READ_TIMEOUT, 60 s).")
    retry_mode: str | None = Field(default=None, description="botocore retry mode (AWS_RETRY_MODE, standard).")

    def s3_options(self) -> S3Options:
        """The client options: these fields over the settings' (``S3Options.from_settings``)."""
        return S3Options.from_settings(
            get_settings(),
            endpoint_url=self.endpoint_url,
            region=self.region_name,
            addressing_style=self.addressing_style,
            retry_mode=self.retry_mode,
            connect_timeout=self.connect_timeout_s,
            read_timeout=self.read_timeout_s,
            max_attempts=self.max_attempts,
        )

    def client_settings_key(self) -> str:
        """A digest of everything besides ``s3_options()`` that shapes the client
        (credentials, profile, TLS, and the AWS credential variables), so a store
        cached per process is never reused for other credentials. Secrets stay hashed."""
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        env = dict(get_settings().aws_credentials_fingerprint())
        return hashlib.sha256(repr((sorted(fields.items()), sorted(env.items()))).encode()).hexdigest()

    def get_client(self) -> Any:
        return self.client_for(self.s3_options())

    def client_for(self, options: S3Options) -> Any:
        """A boto3 client with ``options`` and this resource's session and credentials."""
        return build_s3_client(
            options,
            session=boto3.session.Session(profile_name=self.profile_name),
            use_ssl=self.use_ssl,
            verify=self.verify,
            aws_access_key_id=self.aws_access_key_id,
            aws_secret_access_key=self.aws_secret_access_key,
            aws_session_token=self.aws_session_token,
        )


class StorageResource(dg.ConfigurableResource):
    """The object store holding datasets, LoRA files, registry documents and webhook files.

    Example::

        StorageResource(storage_url="s3://my-bucket/lora", s3=LoraS3Resource(addressing_style="path"))
    """

    storage_url: str | None = Field(
        default=None, description="s3://bucket/prefix or a local directory; default: LORA_STORAGE_URL or .lora_store"
    )
    public_base_url: str | None = Field(
        default=None, description="Base URL LoRA files are published under; default: LORA_PUBLIC_BASE_URL"
    )
    use_accelerate_endpoint: bool = Field(default=False, description="Record S3 Transfer Acceleration URLs.")
    s3: LoraS3Resource = Field(default_factory=LoraS3Resource)

    _store: ObjectStore | None = PrivateAttr(None)
    _tick_store: ObjectStore | None = PrivateAttr(None)

    def settings(self) -> Settings:
        return get_settings()

    def resolved_url(self) -> str:
        """The store's URL; a local directory made absolute so a worker subprocess finds it."""
        url = self.storage_url or self.settings().storage_url
        if url.startswith("s3://"):
            return url
        return str(Path(url.removeprefix("file://")).resolve())

    def get_store(self) -> ObjectStore:
        """The store for steps: for S3, the process's one checked store for these settings.

        It is built and checked (bucket, credentials, conditional writes) once per
        process through the location's circuit breaker (``shared_store``), not per
        step or tick. A local directory is opened as before.
        """
        if self._store is None:
            self._store = self._open(tick=False)
        return self._store

    def get_sensor_store(self) -> ObjectStore:
        """The store for sensor ticks and schedule evaluations: bounded when S3 is down.

        Same location and breaker as ``get_store``, but the client has the tick
        timeouts and attempts (``S3Options.for_ticks``: LORA_S3_TICK_*), so a request
        to a stalled or refusing endpoint fails within ``failure_bound_s()`` (16 s by
        default) and the tick can skip. For a local directory this is ``get_store()``.
        """
        if not self.resolved_url().startswith("s3://"):
            return self.get_store()
        if self._tick_store is None:
            self._tick_store = self._open(tick=True)
        return self._tick_store

    def _open(self, *, tick: bool) -> ObjectStore:
        url = self.resolved_url()
        public_base_url = self.public_base_url or self.settings().public_base_url
        if not url.startswith("s3://"):
            return open_store(url, public_base_url=public_base_url, accelerate=self.use_accelerate_endpoint)
        options = self.s3.s3_options()
        return shared_store(
            url,
            options=options.for_ticks() if tick else options,
            make_client=self.s3.client_for,
            client_key=self.s3.client_settings_key(),
            public_base_url=public_base_url,
            accelerate=self.use_accelerate_endpoint,
        )


class TrainingBackendResource(dg.ConfigurableResource):
    """Where training runs: a RunPod Serverless endpoint, or this machine (the default).

    With no endpoint id (argument or RUNPOD_ENDPOINT_ID) jobs run in a local
    subprocess that executes the same worker code RunPod runs.
    """

    endpoint_id: str | None = Field(default=None, description="RunPod endpoint id; default RUNPOD_ENDPOINT_ID")
    api_key: str | None = Field(default=None, description="RunPod API key; default RUNPOD_API_KEY")
    base_url: str | None = Field(default=None, description="API base; default RUNPOD_ENDPOINT_BASE_URL")
    local_state_dir: str | None = Field(
        default=None,
        description="Where the local backend keeps job state; default LORA_LOCAL_JOBS_DIR "
        "or .lora_jobs beside the local store",
    )
    webhook_url: str | None = Field(
        default=None, description="Public URL of the webhook receiver (LORA_WEBHOOK_URL); the token is appended."
    )

    def settings(self) -> Settings:
        overrides = {
            "runpod_endpoint_id": self.endpoint_id,
            "runpod_api_key": self.api_key,
            "runpod_base_url": self.base_url,
            "webhook_url": self.webhook_url,
        }
        return get_settings().model_copy(update={k: v for k, v in overrides.items() if v})

    def get_backend(self, store: ObjectStore) -> TrainingBackend:
        settings = self.settings()
        if settings.training_backend == "runpod":
            return _runpod_client(settings.runpod_api_key, settings.runpod_endpoint_id, settings.runpod_base_url)
        state_dir = Path(self.local_state_dir) if self.local_state_dir else None
        return open_training_backend(store, settings, state_dir=state_dir)

    def runpod_breaker(self, store: ObjectStore) -> CircuitBreaker | None:
        """The RunPod client's circuit breaker (shared by this process's clients), or None for the
        local backend or a misconfigured one (the run itself then says what is wrong): what the
        reconciliation schedule and the health check consult before calling RunPod."""
        if self.settings().training_backend != "runpod":
            return None
        try:
            backend = self.get_backend(store)
        except (dg.DagsterInvariantViolationError, RunPodError, ValueError):
            return None
        return getattr(backend, "breaker", None)

    def storage_url_for_worker(self, storage: StorageResource) -> str:
        """The store URL the worker gets in its request; refused when it cannot reach it.

        A worker on RunPod's cloud cannot read a directory on this machine, so
        RunPod with a local store fails here, before anything is submitted, naming
        the setting, instead of inside the worker. (An endpoint at a custom base
        URL, e.g. a self-hosted or test API, is trusted to share the directory.)
        """
        url = storage.resolved_url()
        settings = self.settings()
        on_runpod_cloud = settings.runpod_base_url.rstrip("/") == DEFAULT_RUNPOD_BASE_URL
        if settings.training_backend == "runpod" and on_runpod_cloud and not url.startswith("s3://"):
            raise dg.Failure(
                description=f"LORA_STORAGE_URL is the local directory {url}, which a RunPod worker "
                "cannot reach: set it to s3://bucket/prefix (and the AWS settings) to train on RunPod"
            )
        return url

    def webhook_url_for_jobs(self) -> str | None:
        """The URL RunPod POSTs completions to, with the shared token in its query."""
        settings = self.settings()
        if not settings.webhook_url or settings.training_backend != "runpod":
            return None
        return webhook_url(settings.webhook_url, settings.webhook_token)


@functools.cache
def _runpod_client(api_key: str | None, endpoint_id: str | None, base_url: str) -> TrainingBackend:
    """One client per endpoint and process, so its circuit breaker outlives a sensor tick."""
    if not api_key:
        raise dg.DagsterInvariantViolationError(
            "RUNPOD_ENDPOINT_ID is set but RUNPOD_API_KEY is not: the RunPod backend needs a key"
        )
    return RunPodClient(api_key, endpoint_id, base_url=base_url)
