"""A real Postgres server on this machine, no container and no system package.

The binaries come from the ``pgserver`` wheel (PyPI, the ``dev`` extra); this module only runs
``initdb`` and ``pg_ctl`` with TCP on 127.0.0.1, so Dagster connects to it exactly as it does
to the Compose or Kubernetes Postgres. Postgres refuses to run as root: as root the server runs
as the system user ``pgserver`` (created by pgserver's own helper, as ``useradd`` would).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PG_USER = "postgres"


def _bin(name: str) -> str:
    from pgserver._commands import POSTGRES_BIN_PATH  # the wheel's own initdb/pg_ctl/postgres

    return str(POSTGRES_BIN_PATH / name)


def _system_user() -> str | None:
    if os.geteuid() != 0:
        return None
    from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists
    from pgserver._commands import POSTGRES_BIN_PATH
    import stat

    ensure_user_exists("pgserver")
    ensure_prefix_permissions(POSTGRES_BIN_PATH)
    readable = stat.S_IRGRP | stat.S_IROTH
    ensure_folder_permissions(POSTGRES_BIN_PATH, readable | stat.S_IXGRP | stat.S_IXOTH)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", readable)
    return "pgserver"


@dataclass
class LocalPostgres:
    """One Postgres cluster in ``data_dir`` listening on 127.0.0.1:``port`` (trust auth, local only)."""

    data_dir: Path
    port: int
    db_name: str = "dagster"

    @property
    def env(self) -> dict[str, str]:
        """The DAGSTER_PG_* variables deploy/dagster.yaml reads."""
        return {
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_USERNAME": PG_USER,
            "DAGSTER_PG_PASSWORD": "local-trust-auth",  # ignored: trust auth on 127.0.0.1 only
            "DAGSTER_PG_DB": self.db_name,
        }

    def _run(self, args: list[str], user: str | None, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(args, user=user, check=True, capture_output=True, text=True, **kwargs)

    def start(self) -> None:
        """initdb on first use, start the server (waits until it accepts connections), create the db."""
        user = _system_user()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if user is not None:
            from pgserver.utils import ensure_prefix_permissions
            import pwd

            ensure_prefix_permissions(self.data_dir)
            entry = pwd.getpwnam(user)
            os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                [_bin("initdb"), "-D", str(self.data_dir), "--auth=trust", "--encoding=utf8", "-U", PG_USER], user
            )
        if not self.running():
            self._run(
                [
                    _bin("pg_ctl"),
                    "-D",
                    str(self.data_dir),
                    "-w",
                    "-t",
                    "60",
                    "-l",
                    str(self.data_dir / "server.log"),
                    "-o",
                    f"-h 127.0.0.1 -p {self.port} -k {self.data_dir} -c max_connections=200",
                    "start",
                ],
                user,
                timeout=90,
                stdin=subprocess.DEVNULL,
            )
        exists = self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{self.db_name}'", db="postgres")
        if exists.strip() != "1":
            self.psql(f'CREATE DATABASE "{self.db_name}"', db="postgres")

    def psql(self, sql: str, db: str | None = None) -> str:
        return self._run(
            [
                _bin("psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                PG_USER,
                "-d",
                db or self.db_name,
                "-tAc",
                sql,
            ],
            None,
        ).stdout

    def _reopen_path(self) -> str | None:
        """The system user to run as, with the data directory's parents traversable again.

        Something else may have narrowed a parent's mode since start (pytest, for one, makes
        /tmp/pytest-of-<user> 0700 at every session): pg_ctl would then fail to reach the data
        directory and the server would be left running.
        """
        user = _system_user()
        if user is not None and self.data_dir.exists():
            from pgserver.utils import ensure_prefix_permissions

            ensure_prefix_permissions(self.data_dir)
        return user

    def running(self) -> bool:
        result = subprocess.run(
            [_bin("pg_ctl"), "-D", str(self.data_dir), "status"], capture_output=True, user=self._reopen_path()
        )
        return result.returncode == 0

    def stop(self, timeout_s: float = 60) -> None:
        """pg_ctl's fast shutdown; failing that, SIGINT (the same) to the postmaster itself."""
        if not (self.data_dir / "PG_VERSION").exists():
            return
        result = subprocess.run(
            [_bin("pg_ctl"), "-D", str(self.data_dir), "-w", "-m", "fast", "stop"],
            capture_output=True,
            user=self._reopen_path(),
            timeout=timeout_s,
        )
        pidfile = self.data_dir / "postmaster.pid"
        if result.returncode == 0 or not pidfile.exists():
            return
        pid = int(pidfile.read_text().split("\n", 1)[0])
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
