"""Settings from the environment, each with a default that works on a laptop.

A bad value fails at start with a message naming the variable, instead of a
confusing error deep inside a run.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError, field_validator

from lora_pipeline.registry.layouts import DEFAULT_PRIMARY, PRIMARY_ENV, check_layout


DEFAULT_STORAGE_DIR = ".lora_store"


class SettingsError(ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


class Settings(BaseModel):
    """The pipeline's configuration, read from environment variables."""

    storage_url: str = Field(
        DEFAULT_STORAGE_DIR,
        description="LORA_STORAGE_URL: s3://bucket/prefix, a local directory, or file:// URL.",
    )
    public_base_url: str | None = Field(
        None, description="LORA_PUBLIC_BASE_URL: base URL LoRA files are published under (CDN/accelerated)."
    )
    runpod_api_key: str | None = Field(None, description="RUNPOD_API_KEY")
    runpod_endpoint_id: str | None = Field(None, description="RUNPOD_ENDPOINT_ID")
    runpod_base_url: str = Field(
        "https://api.runpod.ai/v2", description="RUNPOD_ENDPOINT_BASE_URL"
    )
    webhook_token: str | None = Field(None, description="LORA_WEBHOOK_TOKEN")
    webhook_url: str | None = Field(
        None, description="LORA_WEBHOOK_URL: public URL of the webhook receiver's POST route."
    )
    primary_format: str = Field(
        DEFAULT_PRIMARY,
        description="LORA_PRIMARY_FORMAT: kohya or diffusers, the layout the registry's legacy loraUrl "
        "(and `registry download` without --format) names.",
    )

    @field_validator("storage_url")
    @classmethod
    def _storage_url(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        if value.startswith("s3://") and len(value) <= len("s3://"):
            raise ValueError("s3:// URL needs a bucket, e.g. s3://my-bucket/lora")
        if "://" in value and not value.startswith(("s3://", "file://")):
            raise ValueError(f"unsupported scheme in {value!r}: use s3://, file:// or a plain path")
        return value

    @field_validator("public_base_url", "webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http(s) URL, got {value!r}")
        return value or None

    @field_validator("primary_format")
    @classmethod
    def _primary_format(cls, value: str) -> str:
        return check_layout(value)

    @property
    def training_backend(self) -> str:
        """RunPod when an endpoint is configured, else the local backend."""
        return "runpod" if self.runpod_endpoint_id else "local"

    @property
    def local_storage_dir(self) -> Path | None:
        if self.storage_url.startswith("s3://"):
            return None
        return Path(self.storage_url.removeprefix("file://"))


_ENV = {
    "storage_url": "LORA_STORAGE_URL",
    "public_base_url": "LORA_PUBLIC_BASE_URL",
    "runpod_api_key": "RUNPOD_API_KEY",
    "runpod_endpoint_id": "RUNPOD_ENDPOINT_ID",
    "runpod_base_url": "RUNPOD_ENDPOINT_BASE_URL",
    "webhook_token": "LORA_WEBHOOK_TOKEN",
    "webhook_url": "LORA_WEBHOOK_URL",
    "primary_format": PRIMARY_ENV,
}


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Read settings from ``environ`` (default: the process environment)."""
    env = os.environ if environ is None else environ
    values = {field: env[var] for field, var in _ENV.items() if env.get(var)}
    try:
        return Settings(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_ENV.get(str(err['loc'][0]), err['loc'][0])}: {err['msg']}" for err in exc.errors()
        )
        raise SettingsError(f"invalid configuration: {problems}") from None
