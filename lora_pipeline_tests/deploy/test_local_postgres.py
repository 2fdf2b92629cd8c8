"""The Postgres `make prod-local` and the deployment tests run: started, reachable, stopped."""

from __future__ import annotations

import os

import pytest

from lora_pipeline.deploy.postgres import LocalPostgres
from lora_pipeline_tests.deploy.conftest import free_port

pytestmark = pytest.mark.slow


def test_starts_and_stops_even_after_a_parent_directory_was_closed(tmp_path):
    """Another pytest session makes /tmp/pytest-of-<user> 0700 again: the server (as root, run
    by the user `pgserver`) must still stop, not be left running."""
    pg = LocalPostgres(tmp_path / "outer" / "pgdata", free_port())
    try:
        pg.start()
        assert pg.psql("SELECT current_database()").strip() == "dagster"
        pg.start()  # again: already initialised and running, nothing happens
        if os.geteuid() == 0:
            (tmp_path / "outer").chmod(0o700)
        pg.stop()
        assert not pg.running()
        assert not (pg.data_dir / "postmaster.pid").exists()
    finally:
        pg.stop()
