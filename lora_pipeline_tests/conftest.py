"""Shared fixtures: a hermetic environment, a real S3 server (moto, over HTTP), stores.

* Every test runs with fake AWS credentials and a dead default endpoint, and with
  every LORA_* / RUNPOD_* variable cleared, so no test reads the developer's
  configuration or reaches real AWS or RunPod.
* ``moto_server`` is one ThreadedMotoServer per session on 127.0.0.1; tests talk
  to it over HTTP with a real boto3 client (``s3_client``), the same code path as
  production. Each ``s3_store`` gets a fresh bucket, removed afterwards.
* ``store`` runs a test once per backend (local directory and S3).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lora_pipeline.settings import get_settings
from lora_pipeline.storage.local import LocalStore
from lora_pipeline.storage.s3 import S3Options, S3Store, build_s3_client

MOTO_REGION = "us-east-1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Fake AWS credentials, no AWS config files, no LORA_*/RUNPOD_* settings."""
    for name in list(os.environ):
        if name.startswith(("LORA_", "RUNPOD_", "AWS_")):
            monkeypatch.delenv(name, raising=False)
    nowhere = tmp_path_factory.getbasetemp() / "no-aws-config"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_REGION", MOTO_REGION)
    monkeypatch.setenv("AWS_DEFAULT_REGION", MOTO_REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(nowhere))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nowhere))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # A client built without an explicit endpoint hits a closed local port, never AWS.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    # get_settings() parses again whenever a variable changes; clearing keeps tests independent.
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A moto S3 server on a free local port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def moto_env(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the standard AWS variables at the moto server (for code that builds its own client)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server)
    monkeypatch.setenv("LORA_S3_ADDRESSING_STYLE", "path")
    return moto_server


def moto_options(endpoint: str, **overrides) -> S3Options:
    """Client options for tests: path-style, short timeouts, few attempts."""
    values = dict(
        endpoint_url=endpoint,
        region=MOTO_REGION,
        addressing_style="path",
        max_attempts=3,
        connect_timeout=2.0,
        read_timeout=10.0,
    )
    values.update(overrides)
    return S3Options(**values)


@pytest.fixture(scope="session")
def boto_session():
    """One boto3 session with fake credentials, so clients are cheap to build in tests.

    Credentials are explicit: a session-scoped fixture may be created before the
    autouse environment fixture of the first test runs.
    """
    import boto3

    return boto3.session.Session(
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        aws_session_token="testing",
        region_name=MOTO_REGION,
    )


def moto_client(boto_session, endpoint: str, **overrides):
    """A client for ``endpoint`` (moto or a proxy in front of it) with moto_options."""
    return build_s3_client(moto_options(endpoint, **overrides), session=boto_session)


@pytest.fixture(scope="session")
def s3_client(moto_server: str, boto_session):
    """A boto3 S3 client talking to the moto server over HTTP (thread-safe, shared)."""
    return moto_client(boto_session, moto_server)


@pytest.fixture
def s3_bucket(s3_client) -> Iterator[str]:
    """A fresh, empty bucket, emptied and deleted after the test."""
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=bucket)
    yield bucket
    _drop_bucket(s3_client, bucket)


def _drop_bucket(client, bucket: str) -> None:
    try:
        for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
        client.delete_bucket(Bucket=bucket)
    except Exception:  # noqa: BLE001 - cleanup must not mask the test's own result
        pass


@pytest.fixture
def s3_store(s3_client, s3_bucket: str, moto_server: str) -> S3Store:
    """An S3Store on a fresh bucket (under a prefix, as in production), start-up checked."""
    store = S3Store(s3_client, s3_bucket, "lora", options=moto_options(moto_server))
    # The conditional-write probe is covered by the factory tests; skip it here.
    return store.check(probe_conditional_writes=False)


@pytest.fixture
def local_store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest):
    """The same test against both backends."""
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture
def fault_proxy(moto_server: str):
    """A FaultProxy in front of the moto server (see storage/fault_proxy.py)."""
    from lora_pipeline_tests.storage.fault_proxy import FaultProxy

    with FaultProxy(moto_server, stall_seconds=3.0) as proxy:
        yield proxy


@pytest.fixture
def proxy(moto_server: str):
    """A FaultProxy whose stalls outlast every timeout in the tests (stalled-endpoint tests)."""
    from lora_pipeline_tests.storage.fault_proxy import FaultProxy

    with FaultProxy(moto_server, stall_seconds=600) as running:
        yield running


@pytest.fixture
def faulty_s3_store(fault_proxy, s3_bucket: str, boto_session) -> S3Store:
    """An S3Store on ``s3_bucket`` whose requests go through ``fault_proxy``.

    Short timeouts (1 s connect and read) and 4 attempts, so faults show quickly.
    """
    options = moto_options(fault_proxy.endpoint, max_attempts=4, connect_timeout=1.0, read_timeout=1.0)
    return S3Store(build_s3_client(options, session=boto_session), s3_bucket, "lora", options=options)
