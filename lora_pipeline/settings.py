"""Every environment variable the project reads, in one pydantic-settings object.

One place to look: each field below is one variable (its exact name, or names when it has
fallbacks), with its type, default, description and validation, grouped by concern. Nothing
else in ``lora_pipeline`` reads the environment: entry points (the Dagster definitions, the
``lora-pipeline`` command, the webhook server, the worker handler) call ``get_settings()`` at
start and hand the values down; a bad value fails there with one line naming the variable::

    LORA_S3_READ_TIMEOUT='abc': expected a number of seconds above 0

Variables only third-party code reads (``DAGSTER_*`` by Dagster, ``HF_*`` by huggingface_hub)
are not fields; they are listed in ``PASS_THROUGH`` for the README's table. Fields marked
``runs`` are what a Dagster run needs: the run launchers of deploy/ pass each of them to run
containers (lora_pipeline_tests/deploy/test_deploy_files.py checks them).

The README's configuration table is rendered from here::

    python -m lora_pipeline.settings --write-readme
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
import re
import sys
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from lora_pipeline.registry.layouts import DEFAULT_PRIMARY, LAYOUTS

DEFAULT_STORAGE_DIR = ".lora_store"
DEFAULT_LOCAL_JOBS_DIR = ".lora_jobs"
DEFAULT_RUNPOD_BASE_URL = "https://api.runpod.ai/v2"
DEFAULT_RECONCILE_CRON = "0 * * * *"
DEFAULT_HEALTH_CRON = "*/10 * * * *"
MAX_RETENTION_DAYS = 36_500

README_BEGIN = "<!-- BEGIN settings-table -->"
README_END = "<!-- END settings-table -->"
WRITE_README_COMMAND = "python -m lora_pipeline.settings --write-readme"


class SettingsError(ValueError):
    """A configuration value is malformed; the message names the variable (one line each)."""


# -- the one storage-URL check ------------------------------------------------------------------


def parse_storage_url(url: str) -> tuple[str, str, str]:
    """``s3://bucket/prefix`` → ("s3", bucket, prefix); a path or file:// URL → ("file", dir, "").

    The one check of a storage URL (the setting, a request's URL, the store factory's);
    raises ValueError saying what is wrong, without naming a variable (callers do)."""
    if not url or not url.strip():
        raise ValueError("empty: use s3://bucket/prefix or a local directory")
    url = url.strip()
    if url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError("no bucket: use s3://bucket/prefix")
        return "s3", bucket, prefix.strip("/")
    if url.startswith("file://"):
        path = url[len("file://") :]
        if path.startswith("localhost/"):
            path = path[len("localhost") :]
        if not path.startswith("/"):
            raise ValueError("a file:// URL needs an absolute path")
        return "file", path, ""
    if "://" in url:
        raise ValueError("unsupported scheme: use s3://, file:// or a plain path")
    if _MISTYPED_URL.match(url):
        raise ValueError(
            f"{url!r} looks like a mistyped URL: use s3://bucket/prefix, file:///absolute/path or a plain path"
        )
    return "file", url, ""


# ``s3:/bucket``, ``s3:bucket``, ``file:/x``: a scheme with too few slashes, never a folder name a user means.
_MISTYPED_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")


# -- fields -------------------------------------------------------------------------------------


def _env(
    default: Any,
    name: str,
    description: str,
    *,
    expected: str,
    also: tuple[str, ...] = (),
    runs: bool = False,
    secret: bool = False,
    shown: str | None = None,
    **constraints: Any,
) -> Any:
    """A field read from the variable ``name`` (then each of ``also``).

    ``expected``: what a valid value is, for the error line; ``runs``: Dagster runs need it (the
    deploy run launchers must pass it); ``secret``: never shown; ``shown``: the default as the
    README's table gives it, when the value alone would not say it."""
    return Field(
        default,
        validation_alias=AliasChoices(name, *also) if also else name,
        description=description,
        repr=not secret,
        json_schema_extra={"env": [name, *also], "expected": expected, "runs": runs, "secret": secret, "shown": shown},
        **constraints,
    )


_SECONDS = "a number of seconds above 0"
_COUNT = "a whole number of at least 1"
_DAYS = f"a number of days above 0 (up to {MAX_RETENTION_DAYS})"
_HTTP_URL = "an http(s) URL"
# Five fields, or one of the @ nicknames (what Dagster's schedules accept), matched whole; also a
# declared style's `schedule`.
CRON_PATTERN = r"^(@(hourly|daily|weekly|monthly|yearly|annually|midnight)|(\S+\s+){4}\S+)$"
_CRON = re.compile(CRON_PATTERN)
_HOST = "set by RunPod on its workers, not by you"


class Settings(BaseSettings):
    """The pipeline's configuration. Build it with ``get_settings()`` (or ``load_settings``)."""

    model_config = SettingsConfigDict(
        case_sensitive=True,
        env_ignore_empty=True,  # NAME= (an empty value) means unset: Compose passes unset ones so
        populate_by_name=True,  # tests and resources may give values by field name
        extra="ignore",
        frozen=True,
    )

    # -- store ---------------------------------------------------------------------------------
    storage_url: str = _env(
        DEFAULT_STORAGE_DIR,
        "LORA_STORAGE_URL",
        "where everything is kept: `s3://bucket/prefix`, a local directory, or a `file://` URL (absolute path)",
        expected="s3://bucket/prefix, a local directory or a file:// URL",
        runs=True,
    )
    public_base_url: str | None = _env(
        None,
        "LORA_PUBLIC_BASE_URL",
        "http(s) URL the store's root is published under (a CDN or S3 Transfer Acceleration endpoint); "
        "recorded URLs become `<base>/<key>`",
        expected=_HTTP_URL,
        runs=True,
    )
    writer_lock_dir: str | None = _env(
        None,
        "LORA_WRITER_LOCK_DIR",
        "only for an S3 endpoint that ignores conditional writes: a folder every registry writer shares "
        "(one host); its lock files serialize them. Unset, registry writes refuse to run on such an endpoint",
        expected="an absolute folder path",
        runs=True,
        shown="unset",
    )
    primary_format: str = _env(
        DEFAULT_PRIMARY,
        "LORA_PRIMARY_FORMAT",
        "`kohya` or `diffusers`: the layout the registry's `loraUrl`/`s3Key`, and `registry download`/`url` "
        "without `--format`, name",
        expected=f"one of {', '.join(LAYOUTS)}",
        runs=True,
    )

    # -- S3 client (boto3 reads the AWS_* ones too) ----------------------------------------------
    s3_endpoint_url: str | None = _env(
        None,
        "AWS_ENDPOINT_URL_S3",
        "S3-compatible endpoint, e.g. `https://s3api-eu-ro-1.runpod.io`",
        also=("AWS_ENDPOINT_URL",),
        expected=_HTTP_URL,
        runs=True,
        shown="AWS",
    )
    aws_region: str | None = _env(
        None,
        "AWS_REGION",
        "region, e.g. `eu-ro-1` for RunPod",
        also=("AWS_DEFAULT_REGION",),
        expected="a region name",
        runs=True,
        shown="from the AWS config",
    )
    s3_addressing_style: Literal["auto", "path", "virtual"] = _env(
        "auto",
        "LORA_S3_ADDRESSING_STYLE",
        "`path` (RunPod's S3 API needs it), `virtual` or `auto`",
        expected="one of auto, path, virtual",
        runs=True,
    )
    aws_retry_mode: Literal["standard", "adaptive", "legacy"] = _env(
        "standard",
        "AWS_RETRY_MODE",
        "botocore retry mode: `standard`, `adaptive`, `legacy`",
        expected="one of standard, adaptive, legacy",
        runs=True,
    )
    aws_max_attempts: int = _env(
        5, "AWS_MAX_ATTEMPTS", "attempts per S3 request, the first included", expected=_COUNT, runs=True, ge=1
    )
    s3_connect_timeout: float = _env(
        5.0,
        "LORA_S3_CONNECT_TIMEOUT",
        "S3 connect timeout",
        expected=_SECONDS,
        runs=True,
        shown="`5` (s)",
        gt=0,
        allow_inf_nan=False,
    )
    s3_read_timeout: float = _env(
        60.0,
        "LORA_S3_READ_TIMEOUT",
        "S3 read timeout: a stalled response fails the attempt",
        expected=_SECONDS,
        runs=True,
        shown="`60` (s)",
        gt=0,
        allow_inf_nan=False,
    )
    s3_tick_connect_timeout: float = _env(
        2.0,
        "LORA_S3_TICK_CONNECT_TIMEOUT",
        "connect timeout in sensor ticks and schedule evaluations (never above `LORA_S3_CONNECT_TIMEOUT`)",
        expected=_SECONDS,
        runs=True,
        shown="`2` (s)",
        gt=0,
        allow_inf_nan=False,
    )
    s3_tick_read_timeout: float = _env(
        5.0,
        "LORA_S3_TICK_READ_TIMEOUT",
        "read timeout in ticks (never above `LORA_S3_READ_TIMEOUT`)",
        expected=_SECONDS,
        runs=True,
        shown="`5` (s)",
        gt=0,
        allow_inf_nan=False,
    )
    s3_tick_max_attempts: int = _env(
        2,
        "LORA_S3_TICK_MAX_ATTEMPTS",
        "attempts per request in ticks (never above `AWS_MAX_ATTEMPTS`); with the two above a failing request "
        "ends within 16 s",
        expected=_COUNT,
        runs=True,
        ge=1,
    )
    s3_max_pool_connections: int = _env(
        64, "LORA_S3_MAX_POOL_CONNECTIONS", "HTTP connections kept per S3 client", expected=_COUNT, runs=True, ge=1
    )
    s3_multipart_threshold_mb: int = _env(
        16,
        "LORA_S3_MULTIPART_THRESHOLD_MB",
        "files from this size go up and down in parts",
        expected="a whole number of MB, at least 1",
        runs=True,
        ge=1,
    )
    s3_multipart_chunksize_mb: int = _env(
        16, "LORA_S3_MULTIPART_CHUNKSIZE_MB", "part size", expected="a whole number of MB, at least 1", runs=True, ge=1
    )
    transfer_concurrency: int = _env(
        16,
        "LORA_TRANSFER_CONCURRENCY",
        "files in flight in batch transfers, and parts in flight per large file",
        expected=_COUNT,
        runs=True,
        ge=1,
    )
    s3_accelerate: bool = _env(
        False,
        "LORA_S3_ACCELERATE",
        "record S3 Transfer Acceleration URLs (when `LORA_PUBLIC_BASE_URL` is unset)",
        expected="true or false",
        runs=True,
    )
    store_breaker_failures: int = _env(
        5,
        "LORA_STORE_BREAKER_FAILURES",
        "consecutive failed store calls that open the circuit breaker",
        expected=_COUNT,
        runs=True,
        ge=1,
    )
    store_breaker_reset_s: float = _env(
        30.0,
        "LORA_STORE_BREAKER_RESET_S",
        "seconds before an open breaker lets a probe through",
        expected=_SECONDS,
        runs=True,
        gt=0,
        allow_inf_nan=False,
    )

    # -- AWS credentials: boto3 reads them; the project only fingerprints them (a cached store
    # is never reused for other credentials) ------------------------------------------------------
    aws_access_key_id: str | None = _env(
        None,
        "AWS_ACCESS_KEY_ID",
        "S3 access key id (read by boto3)",
        expected="a key id",
        runs=True,
        secret=True,
        shown="the AWS credential chain",
    )
    aws_secret_access_key: str | None = _env(
        None,
        "AWS_SECRET_ACCESS_KEY",
        "S3 secret key (read by boto3)",
        expected="a secret key",
        runs=True,
        secret=True,
        shown="the AWS credential chain",
    )
    aws_session_token: str | None = _env(
        None,
        "AWS_SESSION_TOKEN",
        "S3 session token, for temporary credentials (read by boto3)",
        expected="a token",
        secret=True,
    )
    aws_profile: str | None = _env(
        None, "AWS_PROFILE", "the AWS profile credentials come from (read by boto3)", expected="a profile name"
    )
    aws_config_file: str | None = _env(
        None, "AWS_CONFIG_FILE", "the AWS config file (read by boto3)", expected="a path", shown="`~/.aws/config`"
    )
    aws_shared_credentials_file: str | None = _env(
        None,
        "AWS_SHARED_CREDENTIALS_FILE",
        "the AWS credentials file (read by boto3)",
        expected="a path",
        shown="`~/.aws/credentials`",
    )

    # -- RunPod ----------------------------------------------------------------------------------
    runpod_endpoint_id: str | None = _env(
        None,
        "RUNPOD_ENDPOINT_ID",
        "the RunPod Serverless endpoint to train on (needs an `s3://` store); unset → the local backend",
        expected="an endpoint id (no '/' or spaces)",
        runs=True,
        pattern=r"^[^/\s]+$",
    )
    runpod_api_key: str | None = _env(
        None,
        "RUNPOD_API_KEY",
        "RunPod API key; required with an endpoint",
        expected="an API key",
        runs=True,
        secret=True,
    )
    runpod_base_url: str = _env(
        DEFAULT_RUNPOD_BASE_URL,
        "RUNPOD_ENDPOINT_BASE_URL",
        "RunPod API base (as the `runpod` SDK reads it)",
        expected=_HTTP_URL,
        runs=True,
    )

    # -- webhook ---------------------------------------------------------------------------------
    webhook_url: str | None = _env(
        None,
        "LORA_WEBHOOK_URL",
        "public http(s) URL of the webhook receiver's route, given to RunPod with `?token=` appended; "
        "unset → polling only",
        expected=_HTTP_URL,
        runs=True,
    )
    webhook_token: str | None = _env(
        None,
        "LORA_WEBHOOK_TOKEN",
        "the receiver's shared secret; `webhook serve` refuses to start without it unless `--insecure-no-token`",
        expected="a secret",
        runs=True,
        secret=True,
    )

    # -- the app's HTTP API (`lora-pipeline api serve`) ---------------------------------------------
    api_token: str | None = _env(
        None,
        "LORA_API_TOKEN",
        "the API's bearer token (every route); `api serve` refuses to start without it",
        expected="a secret",
        secret=True,
    )
    api_admin_token: str | None = _env(
        None,
        "LORA_API_ADMIN_TOKEN",
        "the API's bearer token for promote, rollback and delete; unset → those routes are refused",
        expected="a secret",
        secret=True,
    )
    dagster_url: str = _env(
        "http://127.0.0.1:3000",
        "LORA_DAGSTER_URL",
        "the Dagster webserver the API launches and cancels trainings through (GraphQL)",
        expected=_HTTP_URL,
    )
    api_public_url: str | None = _env(
        None,
        "LORA_API_PUBLIC_URL",
        "the API's public http(s) base URL, for the upload and download URLs it serves itself "
        "(local store); unset → the URL the request came in on",
        expected=_HTTP_URL,
    )
    api_webhook_secret: str | None = _env(
        None,
        "LORA_API_WEBHOOK_SECRET",
        "`whsec_…` secret the API signs training callbacks with (Standard Webhooks); unset → a "
        "training with a `webhook` is refused",
        expected="whsec_ followed by base64",
        secret=True,
    )
    api_upload_ttl_hours: float = _env(
        24.0,
        "LORA_API_UPLOAD_TTL_HOURS",
        "an upload not completed this long after it was created is abandoned: its URLs expire and "
        "housekeeping removes its files",
        expected="a number of hours above 0 (up to 168)",
        gt=0,
        le=168,
    )

    # -- reconciliation and retention --------------------------------------------------------------
    reconcile_cron: str = _env(
        DEFAULT_RECONCILE_CRON,
        "LORA_RECONCILE_CRON",
        "the reconciliation schedule",
        expected="a cron expression of 5 fields, e.g. '0 * * * *'",
    )
    webhook_retention_days: float = _env(
        30.0,
        "LORA_WEBHOOK_RETENTION_DAYS",
        "settled jobs' webhook claims, applied bodies and start markers, and rejected bodies, are deleted once older",
        expected=_DAYS,
        runs=True,
        gt=0,
        le=MAX_RETENTION_DAYS,
        allow_inf_nan=False,
    )
    checkpoint_retention_days: float = _env(
        30.0,
        "LORA_CHECKPOINT_RETENTION_DAYS",
        "a failed version's checkpoints are kept this long (a completed version's go at once, an unfinished "
        "one's never)",
        expected=_DAYS,
        runs=True,
        gt=0,
        le=MAX_RETENTION_DAYS,
        allow_inf_nan=False,
    )
    lock_retention_days: float = _env(
        1.0,
        "LORA_LOCK_RETENTION_DAYS",
        "local store: lock files unused this long are removed (never one in use)",
        expected=_DAYS,
        runs=True,
        gt=0,
        le=MAX_RETENTION_DAYS,
        allow_inf_nan=False,
    )
    keep_versions: int = _env(
        0,
        "LORA_KEEP_VERSIONS",
        "reconciliation deletes each style's completed versions but the newest N and every "
        "one an alias points at or can roll back to (a tombstone stays); 0 keeps all",
        expected="a whole number (0: keep all)",
        runs=True,
        ge=0,
    )

    # -- health checks (docs/operations.md#health-checks) -------------------------------------------
    health_cron: str = _env(
        DEFAULT_HEALTH_CRON,
        "LORA_HEALTH_CRON",
        "the `pipeline_health` schedule (the lag and health checks)",
        expected="a cron expression of 5 fields, e.g. '*/10 * * * *'",
    )
    health_max_job_age_hours: float = _env(
        6.0,
        "LORA_HEALTH_MAX_JOB_AGE_HOURS",
        "`oldest_unfinished_job` fails when a job is unfinished for longer",
        expected="a number of hours above 0",
        runs=True,
        shown="`6` (h)",
        gt=0,
        allow_inf_nan=False,
    )
    health_max_waiting_jobs: int = _env(
        50,
        "LORA_HEALTH_MAX_WAITING_JOBS",
        "`jobs_waiting_for_status` fails when more jobs (and submissions without a job id) wait for a final status",
        expected=_COUNT,
        runs=True,
        ge=1,
    )
    health_max_inbox_files: int = _env(
        200,
        "LORA_HEALTH_MAX_INBOX_FILES",
        "`webhook_inbox` fails when the inbox holds more files",
        expected=_COUNT,
        runs=True,
        ge=1,
    )
    health_max_inbox_age_minutes: float = _env(
        30.0,
        "LORA_HEALTH_MAX_INBOX_AGE_MINUTES",
        "`webhook_inbox` fails when its oldest file waits longer",
        expected="a number of minutes above 0",
        runs=True,
        shown="`30` (min)",
        gt=0,
        allow_inf_nan=False,
    )
    health_max_reconcile_age_hours: float = _env(
        3.0,
        "LORA_HEALTH_MAX_RECONCILE_AGE_HOURS",
        "`recent_reconciliation` fails when the last successful `reconcile_registry` run ended longer ago",
        expected="a number of hours above 0",
        runs=True,
        shown="`3` (h)",
        gt=0,
        allow_inf_nan=False,
    )

    # -- training progress (docs/operations.md#training-progress-and-stalled-jobs) ------------------
    stall_after_s: float = _env(
        1800.0,
        "LORA_STALL_AFTER_S",
        "a running job with no progress update (heartbeat) for longer is reported stalled",
        expected=_SECONDS,
        runs=True,
        shown="`1800` (s)",
        gt=0,
        allow_inf_nan=False,
    )
    cancel_stalled: bool = _env(
        False,
        "LORA_CANCEL_STALLED",
        "cancel a stalled job at the backend (its outcome is recorded as reported)",
        expected="true or false",
        runs=True,
    )

    # -- local backend ---------------------------------------------------------------------------
    local_jobs_dir: Path | None = _env(
        None,
        "LORA_LOCAL_JOBS_DIR",
        "the local backend's job state and logs",
        expected="a directory",
        runs=True,
        shown="`.lora_jobs` beside the local store",
    )

    # -- worker and training -----------------------------------------------------------------------
    pipeline_cache: Path | None = _env(
        None,
        "LORA_PIPELINE_CACHE",
        "base models (the tiny one included); the worker image sets `/runpod-volume/lora_pipeline/cache`",
        expected="a directory",
        runs=True,
        shown="`~/.cache/lora_pipeline`",
    )
    train_levers: str = _env(
        "",
        "LORA_TRAIN_LEVERS",
        "worker speed levers, e.g. `fuse_qkv=1,compile=regional` ([docs/worker.md](docs/worker.md#speed-levers))",
        expected="comma-separated name=value pairs",
        runs=True,
        shown="— (the levers' defaults)",
    )
    runpod_pod_id: str | None = _env(None, "RUNPOD_POD_ID", f"the worker's pod ({_HOST})", expected="a pod id")
    runpod_webhook_post_output: str | None = _env(
        None,
        "RUNPOD_WEBHOOK_POST_OUTPUT",
        f"where the SDK posts job results ({_HOST}); with `RUNPOD_POD_ID`: the worker runs on RunPod",
        expected="a URL",
    )
    runpod_webhook_get_job: str | None = _env(
        None,
        "RUNPOD_WEBHOOK_GET_JOB",
        f"where the SDK takes jobs ({_HOST}); unset → `python handler.py` runs its local test",
        expected="a URL",
    )

    # -- Dagster deployment ------------------------------------------------------------------------
    gpu_pool_limit: int = _env(
        2,
        "LORA_GPU_POOL_LIMIT",
        "`deploy init`: slots of the `runpod_gpu` pool (GPU jobs in flight)",
        expected="a whole number from 1 to 10000",
        ge=1,
        le=10_000,
    )

    # -- validation ------------------------------------------------------------------------------

    @field_validator("storage_url")
    @classmethod
    def _storage_url(cls, value: str) -> str:
        parse_storage_url(value)
        return value.strip()

    @field_validator(
        "public_base_url", "s3_endpoint_url", "runpod_base_url", "webhook_url", "dagster_url", "api_public_url"
    )
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"expected {_HTTP_URL}")
        return value or None

    @field_validator("api_webhook_secret")
    @classmethod
    def _whsec(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith("whsec_"):
            raise ValueError("expected whsec_ followed by base64")
        try:
            if len(base64.b64decode(value[len("whsec_") :], validate=True)) < 16:
                raise ValueError("expected a key of at least 16 bytes after whsec_")
        except binascii.Error:
            raise ValueError("expected whsec_ followed by base64") from None
        return value

    @field_validator("primary_format")
    @classmethod
    def _layout(cls, value: str) -> str:
        if value not in LAYOUTS:
            raise ValueError(f"expected one of {', '.join(LAYOUTS)}")
        return value

    @field_validator("reconcile_cron", "health_cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        if not _CRON.fullmatch(value.strip()):
            raise ValueError("expected a cron expression of 5 fields, e.g. '0 * * * *'")
        return value.strip()

    @field_validator("train_levers")
    @classmethod
    def _levers(cls, value: str) -> str:
        for item in filter(None, (part.strip() for part in value.split(","))):
            if "=" not in item or not item.partition("=")[0].strip():
                raise ValueError(f"expected comma-separated name=value pairs, {item!r} is not one")
        return value

    @model_validator(mode="after")
    def _runpod_needs_a_key(self) -> Settings:
        # On a RunPod worker the platform sets RUNPOD_ENDPOINT_ID itself; the worker needs no key
        # and gets its store in each request. Elsewhere a RunPod pairing that cannot work fails
        # here, at start, in one line, not in the first training run.
        if self.runpod_pod_id:
            return self
        if self.runpod_endpoint_id and not self.runpod_api_key:
            raise ValueError(
                f"RUNPOD_ENDPOINT_ID={self.runpod_endpoint_id!r}: RUNPOD_API_KEY is not set "
                "(the RunPod backend needs a key)"
            )
        if self.runpod_api_key and not self.runpod_endpoint_id:
            raise ValueError(
                "RUNPOD_API_KEY is set but RUNPOD_ENDPOINT_ID is not: training would run on the local "
                "backend; set RUNPOD_ENDPOINT_ID to train on RunPod, or unset RUNPOD_API_KEY"
            )
        on_runpod_cloud = self.runpod_base_url.rstrip("/") == DEFAULT_RUNPOD_BASE_URL
        if self.runpod_endpoint_id and on_runpod_cloud and not self.storage_url.strip().startswith("s3://"):
            raise ValueError(
                f"RUNPOD_ENDPOINT_ID is set but LORA_STORAGE_URL is the local directory {self.storage_url!r}, "
                "which a RunPod worker cannot reach: set it to s3://bucket/prefix"
            )
        return self

    # -- derived values --------------------------------------------------------------------------

    @property
    def training_backend(self) -> str:
        """RunPod when an endpoint is configured, else the local backend."""
        return "runpod" if self.runpod_endpoint_id else "local"

    def summary(self) -> str:
        """One line: the store and the training backend in use (what ``make dev`` prints first)."""
        backend = (
            f"RunPod endpoint {self.runpod_endpoint_id}"
            if self.training_backend == "runpod"
            else "the local backend (this machine; set RUNPOD_ENDPOINT_ID and RUNPOD_API_KEY for RunPod)"
        )
        return f"store: {self.storage_url}; training: {backend}"

    @property
    def local_storage_dir(self) -> Path | None:
        """The store's directory; None for S3."""
        scheme, location, _ = parse_storage_url(self.storage_url)
        return Path(location) if scheme == "file" else None

    @property
    def storage_url_is_set(self) -> bool:
        """Whether LORA_STORAGE_URL was given (the worker has no default store)."""
        return "storage_url" in self.model_fields_set

    @property
    def local_jobs_dir_or_default(self) -> Path:
        """LORA_LOCAL_JOBS_DIR, else ``.lora_jobs`` beside a local store (the working directory for S3)."""
        if self.local_jobs_dir is not None:
            return self.local_jobs_dir
        local = self.local_storage_dir
        return (local.parent if local else Path(".")) / DEFAULT_LOCAL_JOBS_DIR

    @property
    def cache_dir(self) -> Path:
        """LORA_PIPELINE_CACHE, else ``~/.cache/lora_pipeline``."""
        return self.pipeline_cache or Path.home() / ".cache" / "lora_pipeline"

    @property
    def under_runpod(self) -> bool:
        """True inside a deployed RunPod worker (the SDK's job-result URL is configured)."""
        return bool(self.runpod_webhook_post_output) and bool(self.runpod_pod_id)

    def aws_credentials_fingerprint(self) -> tuple[tuple[str, str | None], ...]:
        """The AWS credential variables as given (for a cache key; hash it before showing it)."""
        return tuple(
            (name, getattr(self, name))
            for name in (
                "aws_access_key_id",
                "aws_secret_access_key",
                "aws_session_token",
                "aws_profile",
                "aws_config_file",
                "aws_shared_credentials_file",
            )
        )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keyword arguments, then the environment (``load_settings``'s mapping when it gives one).
        No .env or secret files: the process environment is the one input."""
        return init_settings, _EnvironSource(settings_cls)


# -- reading ------------------------------------------------------------------------------------

_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("lora_pipeline_settings_environ", default=None)


class _EnvironSource(EnvSettingsSource):
    """pydantic-settings' environment source, reading ``load_settings``'s mapping when given."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        environ = _ENVIRON.get()
        if environ is None:
            environ = os.environ
        return {name: value for name, value in environ.items() if value != ""}


def env_names(field: str) -> list[str]:
    """The variable names of ``field``, the first one preferred."""
    return list(_extra(field)["env"])


def _extra(field: str) -> dict[str, Any]:
    extra = Settings.model_fields[field].json_schema_extra
    assert isinstance(extra, dict)
    return extra


def _field_of(location: str) -> str | None:
    if location in Settings.model_fields:
        return location
    return next((f for f in Settings.model_fields if location in env_names(f)), None)


def _problem(err: Any, environ: Mapping[str, str]) -> str:
    """One line: ``NAME='value': what is wrong``, in our words, not pydantic's."""
    loc = err.get("loc") or ()
    field = _field_of(str(loc[0])) if loc else None
    reason = str(err.get("ctx", {}).get("error", "")) if err.get("type") == "value_error" else ""
    if field is None:  # a check across fields: its message names the variables
        return reason or str(err.get("msg"))
    extra = _extra(field)
    names = extra["env"]
    name = next((n for n in names if environ.get(n)), names[0])
    value = "<hidden>" if extra["secret"] else repr(environ.get(name, err.get("input")))
    if not reason:
        reason = f"expected {extra['expected']}"
    return f"{name}={value}: {reason}"


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``environ`` (default: the process environment); SettingsError, one line per
    bad variable, for bad values. Prefer ``get_settings()``, which parses once per environment."""
    token = _ENVIRON.set(environ)
    try:
        return Settings()
    except ValidationError as exc:
        source = os.environ if environ is None else environ
        lines = list(dict.fromkeys(_problem(err, source) for err in exc.errors()))
        raise SettingsError("\n".join(lines)) from None
    finally:
        _ENVIRON.reset(token)


def _all_env_names() -> tuple[str, ...]:
    return tuple(name for field in Settings.model_fields for name in env_names(field))


_ENV_NAMES = _all_env_names()


@functools.lru_cache(maxsize=16)
def _settings_for(values: tuple[str | None, ...]) -> Settings:
    return load_settings({name: value for name, value in zip(_ENV_NAMES, values, strict=True) if value is not None})


def get_settings() -> Settings:
    """The settings of this process's environment, parsed once (and again only if a variable
    changes, as tests do with monkeypatch). Raises SettingsError naming each bad variable.
    ``get_settings.cache_clear()`` forgets what was parsed."""
    return _settings_for(tuple(os.environ.get(name) for name in _ENV_NAMES))


get_settings.cache_clear = _settings_for.cache_clear  # type: ignore[attr-defined]


def settings_or_exit(prog: str | None = None) -> Settings:
    """``get_settings()`` for a process entry point: on a bad value, its line(s) on stderr and exit 2
    (no traceback)."""
    try:
        return get_settings()
    except SettingsError as exc:
        prefix = f"{prog}: " if prog else ""
        print("\n".join(prefix + line for line in str(exc).splitlines()), file=sys.stderr)
        raise SystemExit(2) from None


def run_fields() -> list[str]:
    """The fields a Dagster run needs (the run launchers must pass each one's first variable)."""
    return [field for field in Settings.model_fields if _extra(field)["runs"]]


# -- the README's table -------------------------------------------------------------------------

# Variables read only by third-party code: documented, not fields.
PASS_THROUGH: tuple[tuple[str, str, str], ...] = (
    (
        "`HF_HOME`, `HF_TOKEN`",
        "the hub's defaults",
        "worker, hub base models: cache folder and token for gated models (read by huggingface_hub)",
    ),
    (
        "`DAGSTER_HOME`, `DAGSTER_PG_HOST`/`_PORT`/`_USERNAME`/`_PASSWORD`/`_DB`, `DAGSTER_CODE_SERVER_HOST`/`_PORT`",
        "—",
        "past one machine: the Dagster instance and code server ([docs/deploy.md](docs/deploy.md); read by Dagster)",
    ),
)


def _shown_default(field: str) -> str:
    extra = _extra(field)
    if extra["shown"]:
        return extra["shown"]
    default = Settings.model_fields[field].default
    if default is None or default == "":
        return "—"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, float) and default.is_integer():
        default = int(default)
    return f"`{default}`"


def _rows() -> Iterator[tuple[str, str, str]]:
    for field, info in Settings.model_fields.items():
        first, *others = env_names(field)
        name = f"`{first}`" + (f" (else {', '.join(f'`{o}`' for o in others)})" if others else "")
        yield name, _shown_default(field), str(info.description)
    yield from PASS_THROUGH


def settings_table() -> str:
    """The README's configuration table (markdown), one row per variable."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    lines += [f"| {name} | {default} | {meaning} |" for name, default, meaning in _rows()]
    return "\n".join(lines) + "\n"


def readme_with_table(text: str) -> str:
    """``text`` (the README) with the block between the settings-table markers replaced."""
    start, end = text.index(README_BEGIN) + len(README_BEGIN), text.index(README_END)
    return text[:start] + "\n" + settings_table() + text[end:]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lora_pipeline.settings", description=__doc__.splitlines()[0])
    parser.add_argument("--write-readme", action="store_true", help="rewrite README.md's settings table")
    parser.add_argument("--readme", type=Path, default=Path(__file__).resolve().parents[1] / "README.md")
    parser.add_argument(
        "--check", action="store_true", help="check the settings (one line per bad value, exit 2) and say what is used"
    )
    args = parser.parse_args(argv)
    if args.check:
        print(settings_or_exit(parser.prog).summary())
        return 0
    if not args.write_readme:
        sys.stdout.write(settings_table())
        return 0
    text = args.readme.read_text()
    updated = readme_with_table(text)
    if updated != text:
        args.readme.write_text(updated)
        print(f"rewrote the settings table in {args.readme}")
    else:
        print(f"{args.readme}: the settings table is up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
