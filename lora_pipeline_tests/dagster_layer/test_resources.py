"""The Dagster resources build the same stores and backends the rest of the code uses."""

from __future__ import annotations

import pytest

from lora_pipeline.backends.local import LocalBackend
from lora_pipeline.defs.resources import LoraS3Resource, StorageResource, TrainingBackendResource
from lora_pipeline.settings import SettingsError


def test_storage_resource_reaches_s3_through_dagster_aws(moto_server, s3_bucket):
    """The S3 path: dagster-aws's S3Resource settings, our timeouts, moto over HTTP."""
    resource = StorageResource(
        storage_url=f"s3://{s3_bucket}/lora",
        s3=LoraS3Resource(endpoint_url=moto_server, addressing_style="path", read_timeout_s=5),
    )
    store = resource.get_store()

    store.put("registry/index.json", b"{}")

    assert store.get("registry/index.json").data == b"{}"
    assert store.url("registry/index.json").endswith(f"/{s3_bucket}/lora/registry/index.json")


def test_storage_resource_defaults_to_the_local_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    resource = StorageResource()

    assert resource.resolved_url() == str(tmp_path / ".lora_store")


def test_a_bad_storage_setting_fails_naming_the_variable(monkeypatch):
    monkeypatch.setenv("LORA_STORAGE_URL", "ftp://somewhere")

    with pytest.raises(SettingsError, match="LORA_STORAGE_URL"):
        StorageResource().get_store()


def test_training_backend_is_local_without_an_endpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_STORAGE_URL", str(tmp_path / "store"))
    store = StorageResource().get_store()

    backend = TrainingBackendResource().get_backend(store)

    assert isinstance(backend, LocalBackend)


def test_runpod_backend_without_a_key_names_the_missing_setting(tmp_path, monkeypatch):
    store = StorageResource(storage_url=str(tmp_path)).get_store()
    with pytest.raises(Exception, match="RUNPOD_API_KEY"):  # an endpoint given as config, no key anywhere
        TrainingBackendResource(endpoint_id="abc123").get_backend(store)

    monkeypatch.setenv("RUNPOD_ENDPOINT_ID", "abc123")
    with pytest.raises(SettingsError, match="^RUNPOD_ENDPOINT_ID='abc123': RUNPOD_API_KEY is not set"):
        TrainingBackendResource().get_backend(store)


def test_webhook_url_carries_the_token_encoded(monkeypatch):
    monkeypatch.setenv("RUNPOD_ENDPOINT_ID", "abc123")
    monkeypatch.setenv("RUNPOD_API_KEY", "key")
    monkeypatch.setenv("LORA_STORAGE_URL", "s3://bucket/prefix")
    monkeypatch.setenv("LORA_WEBHOOK_URL", "https://hooks.example.com/webhooks/runpod")
    monkeypatch.setenv("LORA_WEBHOOK_TOKEN", "a+b/c")

    url = TrainingBackendResource().webhook_url_for_jobs()

    assert url == "https://hooks.example.com/webhooks/runpod?token=a%2Bb%2Fc"


def test_runpod_with_a_local_store_is_refused_naming_the_setting(tmp_path, monkeypatch):
    """A worker on RunPod's cloud cannot read a directory on this machine: say so before submitting
    (the settings refuse the pairing at start; this is a store overridden in the launchpad)."""
    import dagster as dg

    monkeypatch.setenv("RUNPOD_ENDPOINT_ID", "abc123")
    monkeypatch.setenv("RUNPOD_API_KEY", "key")
    monkeypatch.setenv("LORA_STORAGE_URL", "s3://bucket/prefix")
    storage = StorageResource(storage_url=str(tmp_path / "store"))

    with pytest.raises(dg.Failure, match="LORA_STORAGE_URL"):
        TrainingBackendResource().storage_url_for_worker(storage)


def test_the_local_backend_gets_the_local_store_as_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = StorageResource(storage_url="relative_store")

    assert TrainingBackendResource().storage_url_for_worker(storage) == str(tmp_path / "relative_store")
