"""Dagster resources: the object store and the training backend, configured from the environment.

Each field defaults to ``None`` meaning "take it from the environment"
(``lora_pipeline.settings``), so the embedded defaults need no configuration and
a deployment can still override every value in the UI's launchpad or in code.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import boto3
import dagster as dg
from dagster_aws.s3 import S3Resource
from pydantic import Field, PrivateAttr

from lora_pipeline.runpod.backend import TrainingBackend
from lora_pipeline.runpod.client import DEFAULT_BASE_URL as DEFAULT_RUNPOD_BASE_URL
from lora_pipeline.runpod.client import RunPodClient
from lora_pipeline.runpod.factory import open_training_backend
from lora_pipeline.settings import Settings, load_settings
from lora_pipeline.storage import ObjectStore
from lora_pipeline.storage.factory import open_store
from lora_pipeline.storage.s3 import S3Options, build_s3_client
from lora_pipeline.webhook.urls import webhook_url


class LoraS3Resource(S3Resource):
    """dagster-aws's S3Resource plus the knobs a flaky S3-compatible endpoint needs.

    RunPod's S3 API wants path-style addressing; every endpoint deserves explicit
    timeouts and retries. Unset fields fall back to the environment
    (``LORA_S3_*``, ``AWS_*``: see ``S3Options``), so the resource and the worker,
    which has no Dagster, build the same client. ``S3Resource.get_client()``
    builds a new client per call, so the storage resource calls it once per step.
    """

    addressing_style: str | None = Field(None, description="auto, path or virtual (LORA_S3_ADDRESSING_STYLE).")
    connect_timeout_s: float | None = Field(None, description="Connect timeout (LORA_S3_CONNECT_TIMEOUT, 5 s).")
    read_timeout_s: float | None = Field(None, description="Read timeout (LORA_S3_READ_TIMEOUT, 60 s).")
    retry_mode: str | None = Field(None, description="botocore retry mode (AWS_RETRY_MODE, standard).")

    def get_client(self) -> Any:
        options = S3Options.from_env(
            endpoint_url=self.endpoint_url,
            region=self.region_name,
            addressing_style=self.addressing_style,
            retry_mode=self.retry_mode,
            connect_timeout=self.connect_timeout_s,
            read_timeout=self.read_timeout_s,
            max_attempts=self.max_attempts,
        )
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
        None, description="s3://bucket/prefix or a local directory; default: LORA_STORAGE_URL or .lora_store"
    )
    public_base_url: str | None = Field(
        None, description="Base URL LoRA files are published under; default: LORA_PUBLIC_BASE_URL"
    )
    use_accelerate_endpoint: bool = Field(False, description="Record S3 Transfer Acceleration URLs.")
    s3: LoraS3Resource = Field(default_factory=LoraS3Resource)

    _store: ObjectStore | None = PrivateAttr(None)

    def settings(self) -> Settings:
        return load_settings()

    def resolved_url(self) -> str:
        """The store's URL; a local directory made absolute so a worker subprocess finds it."""
        url = self.storage_url or self.settings().storage_url
        if url.startswith("s3://"):
            return url
        return str(Path(url.removeprefix("file://")).resolve())

    def get_store(self) -> ObjectStore:
        """One store (and one boto3 client) per resource instance, i.e. per step or tick."""
        if self._store is None:
            url = self.resolved_url()
            self._store = open_store(
                url,
                s3_client=self.s3.get_client() if url.startswith("s3://") else None,
                public_base_url=self.public_base_url or self.settings().public_base_url,
                accelerate=self.use_accelerate_endpoint,
            )
        return self._store


class TrainingBackendResource(dg.ConfigurableResource):
    """Where training runs: a RunPod Serverless endpoint, or this machine (the default).

    With no endpoint id (argument or RUNPOD_ENDPOINT_ID) jobs run in a local
    subprocess that executes the same worker code RunPod runs.
    """

    endpoint_id: str | None = Field(None, description="RunPod endpoint id; default RUNPOD_ENDPOINT_ID")
    api_key: str | None = Field(None, description="RunPod API key; default RUNPOD_API_KEY")
    base_url: str | None = Field(None, description="API base; default RUNPOD_ENDPOINT_BASE_URL")
    local_state_dir: str | None = Field(
        None, description="Where the local backend keeps job state; default LORA_LOCAL_JOBS_DIR "
        "or .lora_jobs beside the local store"
    )
    webhook_url: str | None = Field(
        None, description="Public URL of the webhook receiver (LORA_WEBHOOK_URL); the token is appended."
    )

    def settings(self) -> Settings:
        overrides = {
            "runpod_endpoint_id": self.endpoint_id,
            "runpod_api_key": self.api_key,
            "runpod_base_url": self.base_url,
            "webhook_url": self.webhook_url,
        }
        return load_settings().model_copy(update={k: v for k, v in overrides.items() if v})

    def get_backend(self, store: ObjectStore) -> TrainingBackend:
        settings = self.settings()
        if settings.training_backend == "runpod":
            return _runpod_client(settings.runpod_api_key, settings.runpod_endpoint_id, settings.runpod_base_url)
        state_dir = Path(self.local_state_dir) if self.local_state_dir else None
        return open_training_backend(store, settings, state_dir=state_dir)

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
