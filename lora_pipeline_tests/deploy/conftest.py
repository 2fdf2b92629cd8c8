"""A real Postgres and the deployment's processes, started the way `make prod-local` starts them."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from unittest import mock

import pytest

from lora_pipeline.deploy.local import LocalDeployment


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """Postgres (pgserver's binaries), `deploy init`, code server, webserver, daemon: four processes.

    The store is a local directory shared by every process; training runs on the local backend
    (the worker in a subprocess, the tiny built-in model). The test process's own environment
    points at the same instance, so the test can read it directly.
    """
    root = tmp_path_factory.mktemp("prod")
    store = root / "store"
    cache = tmp_path_factory.getbasetemp() / "demo-model-cache"  # shared with test_demo
    dep = LocalDeployment(
        root,
        pg_port=free_port(),
        code_port=free_port(),
        web_port=free_port(),
        gpu_pool_limit=1,
        # The processes keep these; the test's own environment is cleared of LORA_* for each test
        # (lora_pipeline_tests/conftest.py), so tests read them from here.
        extra_env={
            "LORA_STORAGE_URL": str(store),
            "LORA_LOCAL_JOBS_DIR": str(root / "jobs"),
            "LORA_PIPELINE_CACHE": str(cache),
        },
    )
    env = {k: v for k, v in dep.env().items() if k not in os.environ or os.environ[k] != v}
    with mock.patch.dict(os.environ, env):
        try:
            dep.up()
            yield dep
        finally:
            _dump_logs(root)
            dep.down()


def _dump_logs(root: Path) -> None:
    for log in sorted((root / "logs").glob("*.log")):
        tail = log.read_text(errors="replace")[-1500:]
        print(f"--- {log.name} (tail) ---\n{tail}")
