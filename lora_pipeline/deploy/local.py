"""``make prod-local``: the production shape on one machine, without containers.

Four processes, as in the Compose stack and on Kubernetes: Postgres (``postgres.LocalPostgres``),
the code server (``dagster code-server start``: gRPC, loads ``lora_pipeline.definitions``), the
webserver and the daemon (both load code only from the code server, deploy/workspace.yaml).
Runs are launched by the code server as subprocesses (DefaultRunLauncher).

Each process is started in its own session (``setsid``), so its process id is its process
group id; it is recorded under ``<root>/pids/<name>.json`` with what identifies it (its start
time since boot, its command line, the port it listens on) and stopped by signalling the whole
group: SIGTERM, then SIGKILL after a grace period. ``down`` trusts the record, not the ports it
is called with: a stack started on other ports stops all the same. (A ``dagster code-server`` backgrounded from a
non-interactive shell ignores SIGTERM, and a stale one keeps serving old code on its port; so
a start refuses a port that is already taken instead of quietly talking to the old server.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from lora_pipeline.deploy.postgres import LocalPostgres

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROCESSES = ("code-server", "webserver", "daemon")


class DeploymentError(RuntimeError):
    pass


def port_busy(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat`` field 22): with the
    pid, it names one process for the machine's whole uptime (a reused pid starts later)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[19])  # fields after "(comm)": state is field 3


@dataclass(frozen=True)
class ProcessRecord:
    """What ``start`` wrote about one process: enough to find it again, and only it."""

    pgid: int
    start_ticks: int | None
    command: list[str]
    port: int | None

    def to_json(self) -> str:
        return json.dumps(
            {"pgid": self.pgid, "start_ticks": self.start_ticks, "command": self.command, "port": self.port}
        )

    @classmethod
    def from_json(cls, text: str) -> ProcessRecord:
        data = json.loads(text)
        return cls(int(data["pgid"]), data.get("start_ticks"), list(data.get("command", [])), data.get("port"))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class LocalDeployment:
    root: Path
    pg_port: int = 5433
    code_port: int = 4266
    web_port: int = 3000
    host: str = "127.0.0.1"
    gpu_pool_limit: int = 2
    #: The instance file copied into DAGSTER_HOME; one without Postgres storage (the benchmark's
    #: SQLite comparison) starts no Postgres.
    instance_yaml: Path = DEPLOY / "dagster.yaml"
    extra_env: dict[str, str] = field(default_factory=dict)
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def postgres(self) -> LocalPostgres:
        return LocalPostgres(self.root / "pgdata", self.pg_port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.web_port}"

    @property
    def uses_postgres(self) -> bool:
        import yaml

        return "postgres" in (yaml.safe_load(self.instance_yaml.read_text()).get("storage") or {})

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            **(self.postgres.env if self.uses_postgres else {}),
            "DAGSTER_HOME": str(self.home),
            "DAGSTER_CODE_SERVER_HOST": self.host,
            "DAGSTER_CODE_SERVER_PORT": str(self.code_port),
            "LORA_GPU_POOL_LIMIT": str(self.gpu_pool_limit),
            **self.extra_env,
        }

    def command(self, name: str) -> list[str]:
        bindir = Path(sys.executable).parent
        workspace = str(DEPLOY / "workspace.yaml")
        return {
            "code-server": [
                str(bindir / "dagster"),
                "code-server",
                "start",
                "-m",
                "lora_pipeline.definitions",
                "--location-name",
                "lora_pipeline",
                "-h",
                self.host,
                "-p",
                str(self.code_port),
            ],
            "webserver": [
                str(bindir / "dagster-webserver"),
                "-w",
                workspace,
                "-h",
                self.host,
                "-p",
                str(self.web_port),
            ],
            "daemon": [str(bindir / "dagster-daemon"), "run", "-w", workspace],
        }[name]

    def _pidfile(self, name: str) -> Path:
        return self.root / "pids" / f"{name}.json"

    def record(self, name: str) -> ProcessRecord | None:
        """The record ``start`` wrote for ``name`` (None: never started, or stopped since)."""
        pidfile = self._pidfile(name)
        legacy = pidfile.with_suffix(".pgid")  # before the records: a bare group id, nothing to check it by
        if not pidfile.exists() and legacy.exists():
            raise DeploymentError(
                f"{legacy} is from an older lora-pipeline: check and stop that process group by hand "
                f"(kill -TERM -{legacy.read_text().strip()}), then delete the file"
            )
        if not pidfile.exists():
            return None
        try:
            return ProcessRecord.from_json(pidfile.read_text())
        except (ValueError, KeyError, TypeError) as exc:
            raise DeploymentError(f"{pidfile} is not a process record ({exc}): stop that process by hand") from None

    def _port(self, name: str) -> int | None:
        return {"code-server": self.code_port, "webserver": self.web_port}.get(name)

    # -- the whole deployment -------------------------------------------------------------
    def up(self, timeout_s: float = 180) -> None:
        """Postgres, the instance (schema, pool limits, partitions), then the three Dagster processes."""
        self.home.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.instance_yaml, self.home / "dagster.yaml")
        if self.uses_postgres:
            self.postgres.start()
        self.init()
        self.start("code-server")
        self.wait_port(self.code_port, timeout_s)
        self.start("webserver")
        self.start("daemon")
        self.wait_webserver(timeout_s)

    def down(self) -> list[str]:
        """Stop every process recorded under ``root`` (whatever ports this object was given),
        then Postgres; one line per process saying what was stopped and what was already gone."""
        report = [f"{name}: {self.stop(name)}" for name in reversed(PROCESSES)]
        if self.uses_postgres and (self.postgres.data_dir / "PG_VERSION").exists():
            was_running = self.postgres.running()
            self.postgres.stop()
            report.append("postgres: " + ("stopped" if was_running else "already gone"))
        return report

    def init(self) -> str:
        """``lora-pipeline deploy init`` in its own process, as the Compose init service runs it."""
        result = subprocess.run(
            [str(Path(sys.executable).parent / "lora-pipeline"), "deploy", "init"],
            cwd=REPO,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            raise DeploymentError(f"deploy init failed: {result.stderr[-3000:]}")
        return result.stdout

    # -- one process ----------------------------------------------------------------------
    def _recorded_group(self, name: str) -> int | None:
        """The process group recorded for ``name``, if it is still the one ``start`` started.

        A record that outlived its process (a reboot, a kill -9) may name a group id the system
        has since given to an unrelated process: that one starts later than recorded, and is
        never signalled. A leader that is gone (or a zombie) with its group still alive is ours:
        the kernel never reuses the id of a group that still has members.
        """
        record = self.record(name)
        if record is None:
            return None
        started = _start_ticks(record.pgid)
        if started is None:
            return record.pgid if _group_alive(record.pgid) else None
        return record.pgid if started == record.start_ticks else None

    def running(self, name: str) -> bool:
        proc = self._procs.get(name)
        if proc is not None and proc.poll() is not None:
            return False
        pgid = self._recorded_group(name)
        return pgid is not None and _group_alive(pgid)

    def start(self, name: str) -> int:
        if self.running(name):
            raise DeploymentError(f"{name} is already running (process group {self._recorded_group(name)})")
        port = self._port(name)
        if port is not None and port_busy(self.host, port):
            raise DeploymentError(f"port {port} for the {name} is taken: a stale process? (make prod-stop)")
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self._pidfile(name).parent.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                self.command(name),
                cwd=REPO,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._procs[name] = proc
        record = ProcessRecord(proc.pid, _start_ticks(proc.pid), self.command(name), port)
        self._pidfile(name).write_text(record.to_json())
        return proc.pid

    def stop(self, name: str, grace_s: float = 20) -> str:
        """Signal the process's whole group: SIGTERM, then SIGKILL once ``grace_s`` has passed.
        Says what it did: stopped, already gone, or never started."""
        pidfile = self._pidfile(name)
        record = self.record(name)
        if record is None:
            return "not started"
        proc = self._procs.pop(name, None)
        pgid = proc.pid if proc is not None else self._recorded_group(name)  # ours: trust our own pid
        if pgid is None or not _group_alive(pgid):  # stale: nothing of ours left to stop
            pidfile.unlink()
            return "already gone"
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if proc is not None:
                    proc.poll()  # reap our own child, else it lingers as a zombie in the group
                if not _group_alive(pgid):
                    break
                time.sleep(0.2)
            else:
                continue
            break
        if proc is not None:
            proc.wait(timeout=10)
        pidfile.unlink()
        if record.port is not None:  # the port it was started on, not this object's
            deadline = time.monotonic() + 10
            while port_busy(self.host, record.port) and time.monotonic() < deadline:
                time.sleep(0.2)
        return f"stopped (process group {pgid})"

    # -- readiness ------------------------------------------------------------------------
    def _check_alive(self, name: str) -> None:
        if not self.running(name):
            log = self.root / "logs" / f"{name}.log"
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise DeploymentError(f"{name} exited: {tail}")

    def wait_port(self, port: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not port_busy(self.host, port):
            self._check_alive("code-server")
            if time.monotonic() > deadline:
                raise DeploymentError(f"nothing listens on {port} after {timeout_s:.0f}s")
            time.sleep(0.5)

    def wait_webserver(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_alive("webserver")
            try:
                if httpx.get(f"{self.url}/server_info", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise DeploymentError(f"the webserver did not answer within {timeout_s:.0f}s")
            time.sleep(0.5)
