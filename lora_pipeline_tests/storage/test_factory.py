"""Opening the configured store: URL parsing, start-up checks and their error messages."""

from __future__ import annotations

import uuid

import pytest

from lora_pipeline.settings import SettingsError, load_settings
from lora_pipeline.storage import StorageError
from lora_pipeline.storage.breaker import BreakerStore
from lora_pipeline.storage.factory import open_configured_store, open_store, parse_storage_url
from lora_pipeline.storage.local import LocalStore
from lora_pipeline.storage.s3 import ConditionalWritesUnsupported, S3Options, S3Store, build_s3_client
from lora_pipeline_tests.conftest import moto_options


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        ("s3://bucket/some/prefix/", ("s3", "bucket", "some/prefix")),
        ("s3://bucket", ("s3", "bucket", "")),
        ("file:///srv/lora", ("file", "/srv/lora", "")),
        ("./.lora_store", ("file", "./.lora_store", "")),
    ],
)
def test_storage_urls_name_a_backend_and_location(url, parsed):
    assert parse_storage_url(url) == parsed


@pytest.mark.parametrize("url", ["", "s3://", "s3:///prefix", "gs://bucket", "file://relative/path"])
def test_bad_storage_urls_are_refused_naming_the_setting(url):
    with pytest.raises(StorageError, match="LORA_STORAGE_URL"):
        parse_storage_url(url)


def test_a_plain_path_opens_a_local_store_behind_a_breaker(tmp_path):
    store = open_store(str(tmp_path / "store"))
    assert isinstance(store, BreakerStore) and isinstance(store.inner, LocalStore)
    store.put("a", b"1")
    assert (tmp_path / "store" / "a").read_bytes() == b"1"


def test_configured_store_follows_lora_storage_url(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_STORAGE_URL", (tmp_path / "configured").as_uri())
    monkeypatch.setenv("LORA_PUBLIC_BASE_URL", "https://cdn.example.com")
    store = open_configured_store()
    assert store.describe() == str(tmp_path / "configured")
    assert store.url("a/b") == "https://cdn.example.com/a/b"


def test_s3_url_opens_a_checked_s3_store_from_standard_aws_variables(moto_env, s3_client):
    bucket = f"open-{uuid.uuid4().hex[:8]}"
    s3_client.create_bucket(Bucket=bucket)
    store = open_store(f"s3://{bucket}/lora", read_timeout=7)
    assert isinstance(store.inner, S3Store)
    assert store.supports_conditional_writes is True
    assert store.client.meta.config.read_timeout == 7
    store.put("x.json", b"{}")
    assert s3_client.get_object(Bucket=bucket, Key="lora/x.json")["Body"].read() == b"{}"
    assert [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]] == ["lora/x.json"]


def test_a_missing_bucket_is_one_clear_error_at_start(moto_env):
    with pytest.raises(StorageError, match=r"bucket 'no-such-bucket' does not exist.*LORA_STORAGE_URL"):
        open_store("s3://no-such-bucket/lora")


def test_wrong_credentials_are_one_clear_error_at_start(moto_env, monkeypatch):
    from moto import settings as moto_settings

    monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks keys now
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    with pytest.raises(StorageError, match="AWS credentials.*AWS_ACCESS_KEY_ID"):
        open_store("s3://any-bucket/lora")


def test_an_unreachable_endpoint_names_the_endpoint_setting(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    with pytest.raises(StorageError, match="AWS_ENDPOINT_URL_S3"):
        open_store("s3://bucket/lora", connect_timeout=1, max_attempts=1)


def test_an_endpoint_ignoring_conditional_writes_is_detected_and_said(fault_proxy, s3_bucket):
    fault_proxy.drop_headers = {"if-match", "if-none-match"}
    options = moto_options(fault_proxy.endpoint)
    store = S3Store(build_s3_client(options), s3_bucket, "lora", options=options)
    with pytest.warns(ConditionalWritesUnsupported, match="LORA_WRITER_LOCK_DIR"):
        store.check()
    assert store.supports_conditional_writes is False
    # Not silent last-writer-wins: what can be checked is still checked.
    store.put("doc.json", b"v1", if_none_match=True)
    from lora_pipeline.storage import PreconditionFailed

    with pytest.raises(PreconditionFailed):
        store.put("doc.json", b"v2", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.put("doc.json", b"v2", if_match="0" * 32)
    assert list(store.list()) and [o.key for o in store.list()] == ["doc.json"]  # probe cleaned up


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LORA_S3_READ_TIMEOUT", "soon"),
        ("AWS_MAX_ATTEMPTS", "0"),
        ("LORA_S3_ADDRESSING_STYLE", "sideways"),
        ("AWS_RETRY_MODE", "forever"),
        ("LORA_S3_ACCELERATE", "maybe"),
        ("AWS_ENDPOINT_URL_S3", "s3.example.com"),
    ],
)
def test_bad_client_settings_fail_naming_the_variable(name, value):
    with pytest.raises(SettingsError, match=f"^{name}={value!r}: expected "):
        load_settings({name: value})


def test_client_settings_come_from_the_environment():
    options = S3Options.from_settings(
        load_settings(
            {
                "AWS_ENDPOINT_URL_S3": "https://s3api-eu-ro-1.runpod.io",
                "AWS_REGION": "eu-ro-1",
                "LORA_S3_ADDRESSING_STYLE": "path",
                "AWS_MAX_ATTEMPTS": "8",
                "LORA_S3_CONNECT_TIMEOUT": "3",
                "LORA_S3_READ_TIMEOUT": "120",
                "LORA_S3_ACCELERATE": "true",
            }
        )
    )
    client = build_s3_client(options)
    config = client.meta.config
    assert client.meta.endpoint_url == "https://s3api-eu-ro-1.runpod.io"
    assert (config.region_name, config.connect_timeout, config.read_timeout) == ("eu-ro-1", 3.0, 120.0)
    assert config.retries == {"mode": "standard", "total_max_attempts": 8}
    assert config.s3["addressing_style"] == "path"
    assert options.accelerate is True


def test_stores_opened_for_one_location_share_one_breaker(tmp_path):
    """Dagster rebuilds resources every tick; the breaker must remember the outage across them."""
    first = open_store(str(tmp_path / "s"))
    second = open_store(str(tmp_path / "s"))
    other = open_store(str(tmp_path / "t"))
    assert first.breaker is second.breaker
    assert other.breaker is not first.breaker
