"""Fixtures for the RunPod client tests: the API double and a client pointed at it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lora_pipeline.backends.runpod_client import RunPodClient
from lora_pipeline_tests.fakes.runpod_api import FakeRunPod


@pytest.fixture
def fake_runpod() -> Iterator[FakeRunPod]:
    with FakeRunPod(webhook_retry_delay_s=0.05) as fake:
        yield fake


@pytest.fixture
def sleeps() -> list[float]:
    """The waits the client asked for between retries (recorded, not slept)."""
    return []


@pytest.fixture
def client(fake_runpod: FakeRunPod, sleeps: list[float]) -> Iterator[RunPodClient]:
    with RunPodClient(
        fake_runpod.api_key,
        fake_runpod.endpoint_id,
        base_url=fake_runpod.base_url,
        timeout=5.0,
        backoff_base_s=0.01,
        sleep=sleeps.append,
    ) as client:
        yield client
