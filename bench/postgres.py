"""A throwaway PostgreSQL cluster for scenario 6, from Debian's binaries (as tests/postgres.py does).

initdb + postgres from PATH or the newest /usr/lib/postgresql/*/bin, listening on 127.0.0.1 and a
free port only (and a Unix socket in its own directory), trust authentication, superuser
`postgres`. Durability is left at PostgreSQL's defaults (fsync and synchronous_commit on), as a
production registry would run. PostgreSQL refuses to run as root: as root the cluster belongs to
Debian's `postgres` system user and the binaries are exec'd with its uid and gid. `stop()` is a
fast shutdown (SIGINT), then SIGQUIT, then SIGKILL, each bounded; the directory is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .procs import HOST, BenchError, free_port

SYSTEM_USER = "postgres"
SUPERUSER = "postgres"


def find_binaries() -> tuple[Path, Path] | None:
    """(initdb, postgres) from one directory: PATH first, then the newest Debian versioned dir."""
    initdb, postgres = shutil.which("initdb"), shutil.which("postgres")
    if initdb and postgres:
        return Path(initdb), Path(postgres)

    def version(bindir: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name)) or (-1,)

    for bindir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True):
        if os.access(bindir / "initdb", os.X_OK) and os.access(bindir / "postgres", os.X_OK):
            return bindir / "initdb", bindir / "postgres"
    return None


def unavailable_reason() -> str | None:
    """Why no cluster can be started here, or None when one can."""
    if find_binaries() is None:
        return "PostgreSQL binaries (initdb, postgres) not found on PATH or in /usr/lib/postgresql/*/bin"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            return f"running as root but the {SYSTEM_USER!r} system user is missing"
    return None


class PostgresCluster:
    def __init__(self, timeout: float = 60.0, settings: dict[str, str] | None = None) -> None:
        binaries = find_binaries()
        if binaries is None:
            raise BenchError("PostgreSQL binaries not found")
        initdb, postgres = binaries
        self.version = subprocess.run(
            [str(postgres), "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        run_as: dict[str, Any] = {}
        if os.geteuid() == 0:
            account = pwd.getpwnam(SYSTEM_USER)
            run_as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        # /tmp, not the harness's 0700 directory: the postgres user must reach its files.
        self.base = Path(tempfile.mkdtemp(prefix="gateway-bench-pg-", dir="/tmp"))
        if run_as:
            os.chown(self.base, run_as["user"], run_as["group"])
        self.data = self.base / "data"
        self.log = self.base / "postgres.log"
        env = {**os.environ, "LC_ALL": "C", "TZ": "UTC", "HOME": str(self.base)}
        self.process: subprocess.Popen[bytes] | None = None
        try:
            done = subprocess.run(
                [str(initdb), "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-locale"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.base,
                timeout=120,
                **run_as,
            )
            if done.returncode != 0:
                raise BenchError(f"initdb failed ({done.returncode}): {done.stdout.decode(errors='replace')[-2000:]}")
            self.port = free_port()
            with self.log.open("ab") as log:
                self.process = subprocess.Popen(
                    [
                        str(postgres),
                        "-D",
                        str(self.data),
                        "-h",
                        HOST,
                        "-p",
                        str(self.port),
                        "-k",
                        str(self.base),
                        "-c",
                        "logging_collector=off",
                        *(f"-c{k}={v}" for k, v in (settings or {}).items()),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=self.base,
                    start_new_session=True,
                    **run_as,
                )
            deadline = time.monotonic() + timeout
            while not self._ready():
                if self.process.poll() is not None:
                    raise BenchError(f"postgres exited with {self.process.returncode}: {self._log_tail()}")
                if time.monotonic() > deadline:
                    raise BenchError(f"postgres did not start within {timeout:.0f}s: {self._log_tail()}")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        """postmaster.pid's 8th line is "ready" once the server accepts connections."""
        try:
            lines = (self.data / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[7].strip() == "ready"

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-2000:]
        return "(no log)"

    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@{HOST}:{self.port}/{database}"

    async def _admin(self, statement: str) -> None:
        import asyncpg

        conn = await asyncpg.connect(host=HOST, port=self.port, user=SUPERUSER, database="postgres", timeout=10)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    def create_database(self, name: str) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"database name {name!r}")
        asyncio.run(asyncio.wait_for(self._admin(f'CREATE DATABASE "{name}"'), 30))
        return self.url(name)

    def stop(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            for signum, wait in ((signal.SIGINT, 30), (signal.SIGQUIT, 10), (signal.SIGKILL, 10)):
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signum)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(wait)
                    break
        shutil.rmtree(self.base, ignore_errors=True)
