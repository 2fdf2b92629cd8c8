"""Operations the concurrency tests run at once, in threads or in separate processes.

Module-level functions taking a picklable store spec, so a spawned process can
rebuild its own store (its own boto3 client, its own file handles).
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

from lora_pipeline.lifecycle.reconcile import process_inbox, reconcile
from lora_pipeline.registry.evidence import Submission
from lora_pipeline.registry_store.documents import RegistryStore
from lora_pipeline.webhook.inbox import write_webhook

STYLE = "style_59"


def open_spec(spec: tuple):
    if spec[0] == "local":
        from lora_pipeline.storage.local import LocalStore

        return LocalStore(spec[1])
    from lora_pipeline.storage.s3 import S3Store, build_s3_client
    from lora_pipeline_tests.conftest import moto_options

    _, endpoint, bucket, prefix = spec
    options = moto_options(endpoint)
    return S3Store(build_s3_client(options), bucket, prefix, options=options)


def _wait(start_at: float) -> None:
    time.sleep(max(0.0, start_at - time.time()))


def op_reconcile(spec: tuple, start_at: float) -> int:
    store = open_spec(spec)
    _wait(start_at)
    return reconcile(store, workers=2).changed_versions


def op_webhook(spec: tuple, start_at: float, body: bytes) -> int:
    store = open_spec(spec)
    _wait(start_at)
    write_webhook(store, body)
    return len(process_inbox(store).webhooks_applied)


def op_submit(spec: tuple, start_at: float, request_id: str) -> tuple[str, str]:
    """Reserve a version and record its job, as the training op does."""
    store = open_spec(spec)
    registry = RegistryStore(store)
    _wait(start_at)
    version = registry.claim_version(
        STYLE,
        request_id=request_id,
        dataset_hash=uuid.uuid4().hex[:16],
        params={"rank": 4},
        owner=request_id,
        lease=timedelta(seconds=60),
    ).version
    job_id = f"{uuid.uuid4()}-e1"
    registry.apply(
        STYLE,
        [
            Submission(
                STYLE, version.name, request_id, job_id, version.dataset_hash or "", {"rank": 4}, datetime.now(UTC)
            )
        ],
    )
    return version.name, job_id


def warm(seconds: float) -> int:
    """Occupy a worker for a moment, so every process of a pool is started (and has imported
    this module) before the timed start."""
    time.sleep(seconds)
    return 0
