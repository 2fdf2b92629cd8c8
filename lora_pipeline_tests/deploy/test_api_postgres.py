"""The app's API on the Postgres shape: the deployment's processes on a real Postgres (pgserver),
the local store (upload and download URLs served by the API itself)."""

from __future__ import annotations

import pytest

from lora_pipeline.storage.local import LocalStore
from lora_pipeline_tests.api.app_flow import images_to_downloadable_lora
from lora_pipeline_tests.api.conftest import running_api
from lora_pipeline_tests.api.test_api_callbacks import Receiver
from lora_pipeline_tests.fakes.uvicorn_thread import serve_in_thread

pytestmark = pytest.mark.slow


def test_images_to_a_downloadable_lora_on_postgres(deployment):
    store = LocalStore(deployment.extra_env["LORA_STORAGE_URL"])
    receiver = Receiver()
    with serve_in_thread(receiver.app()) as hook:
        receiver.url = hook + "/hook"
        with running_api(store, deployment.url, pump_interval_s=1, version_wait_s=30) as api:
            version = images_to_downloadable_lora(api, receiver, deployment.url)
    assert version["status"] == "completed"
