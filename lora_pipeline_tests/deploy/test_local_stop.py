"""`make prod-stop` (`lora-pipeline deploy local down`) stops what `up` recorded under --root,
whatever ports it is given, and never signals a process that merely inherited a recorded id."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_pipeline.deploy.local import PROCESSES, LocalDeployment, ProcessRecord, _group_alive, _start_ticks, port_busy
from lora_pipeline.deploy.postgres import LocalPostgres
from lora_pipeline_tests.deploy.conftest import free_port

CLI = str(Path(sys.executable).parent / "lora-pipeline")


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "120"], start_new_session=True)


def _record(root: Path, name: str, record: ProcessRecord) -> None:
    (root / "pids").mkdir(parents=True, exist_ok=True)
    (root / "pids" / f"{name}.json").write_text(record.to_json())


def test_a_record_whose_id_now_names_another_process_is_never_signalled(tmp_path: Path) -> None:
    stranger = _sleeper()  # took a recorded id after the recorded process died (a reboot, kill -9)
    try:
        started = _start_ticks(stranger.pid)
        _record(tmp_path, "daemon", ProcessRecord(stranger.pid, started - 1, ["dagster-daemon", "run"], None))
        report = LocalDeployment(tmp_path).down()
        assert report[0] == "daemon: already gone"
        assert stranger.poll() is None  # still running: not ours
        assert not (tmp_path / "pids" / "daemon.json").exists()  # the stale record is gone
    finally:
        stranger.kill()
        stranger.wait()


def test_a_recorded_group_is_stopped_whole_even_after_its_leader_died(tmp_path: Path) -> None:
    # The leader starts a child in its group and exits: the group lives on, leaderless.
    leader = subprocess.Popen(
        ["sh", "-c", "sleep 120 & echo $!; exit 0"], stdout=subprocess.PIPE, start_new_session=True
    )
    child = int(leader.stdout.readline())
    started = _start_ticks(leader.pid)
    leader.wait()
    _record(tmp_path, "webserver", ProcessRecord(leader.pid, started, ["dagster-webserver"], None))
    assert _group_alive(leader.pid)
    report = LocalDeployment(tmp_path, web_port=1).down()  # another port than recorded: no matter
    assert report[1] == f"webserver: stopped (process group {leader.pid})"
    deadline = time.monotonic() + 10
    while _start_ticks(child) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(leader.pid)


def test_a_damaged_record_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "pids").mkdir()
    (tmp_path / "pids" / "code-server.json").write_text("4242")  # an older version's bare number
    done = subprocess.run([CLI, "deploy", "local", "down", "--root", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 1
    assert "code-server.json is not a process record" in done.stderr and "by hand" in done.stderr
    (tmp_path / "pids" / "code-server.json").unlink()
    (tmp_path / "pids" / "daemon.pgid").write_text("4242\n")  # what an older version wrote
    done = subprocess.run([CLI, "deploy", "local", "down", "--root", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 1 and "daemon.pgid is from an older lora-pipeline" in done.stderr
    assert "kill -TERM -4242" in done.stderr


def test_nothing_recorded_says_so(tmp_path: Path) -> None:
    assert LocalDeployment(tmp_path).down() == [f"{name}: not started" for name in reversed(PROCESSES)]


@pytest.mark.slow
def test_a_stack_started_on_other_ports_stops_whole_with_the_default_ports(tmp_path: Path) -> None:
    """The issue's reproduction: `make prod-local PORT=…` then `make prod-stop` (defaults)."""
    root = tmp_path / "prod"
    ports = {"--pg-port": free_port(), "--code-port": free_port(), "--port": free_port()}
    env = {
        **os.environ,
        "LORA_STORAGE_URL": str(tmp_path / "store"),
        "LORA_LOCAL_JOBS_DIR": str(tmp_path / "jobs"),
        "LORA_PIPELINE_CACHE": str(tmp_path / "cache"),
    }
    up = [CLI, "deploy", "local", "up", "--root", str(root), *[str(x) for kv in ports.items() for x in kv]]
    started = subprocess.run(up, env=env, capture_output=True, text=True, timeout=400)
    deployment = LocalDeployment(root)
    records = {name: deployment.record(name) for name in PROCESSES}
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        assert all(records.values()) and all(_group_alive(r.pgid) for r in records.values())
        assert port_busy("127.0.0.1", ports["--port"]) and port_busy("127.0.0.1", ports["--code-port"])

        down = subprocess.run(
            [CLI, "deploy", "local", "down", "--root", str(root)], env=env, capture_output=True, text=True
        )
        assert down.returncode == 0, down.stderr
        lines = down.stdout.splitlines()
        for name in PROCESSES:
            assert f"{name}: stopped (process group {records[name].pgid})" in lines
        assert "postgres: stopped" in lines
        assert not any(_group_alive(r.pgid) for r in records.values())  # no process left
        assert not any(port_busy("127.0.0.1", port) for port in ports.values())  # no port left open
        assert not LocalPostgres(root / "pgdata", ports["--pg-port"]).running()

        again = subprocess.run(
            [CLI, "deploy", "local", "down", "--root", str(root)], env=env, capture_output=True, text=True
        )
        assert again.stdout.splitlines() == [f"{name}: not started" for name in reversed(PROCESSES)] + [
            "postgres: already gone"
        ]
    finally:
        for record in records.values():
            if record is not None and _group_alive(record.pgid):
                os.killpg(record.pgid, signal.SIGKILL)
        LocalPostgres(root / "pgdata", ports["--pg-port"]).stop()
