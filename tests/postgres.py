"""A throwaway PostgreSQL cluster for the test session (pytest plugin, loaded from conftest.py).

Fixtures:

- `postgres_server` (session): a private cluster started from Debian's `postgresql` binaries
  (PATH first, then the newest /usr/lib/postgresql/*/bin) on 127.0.0.1 and a free port, trust
  auth, superuser `postgres`, durability off for speed. Stopped (fast shutdown) and deleted at
  session end. Without the binaries it skips, or fails under `CI=true`.
- `postgres_url_factory` (function): call it to create a new empty database; returns its
  SQLAlchemy URL (`postgresql://postgres@127.0.0.1:<port>/<db>`). Every database it made is
  dropped after the test.
- `fresh_postgres_url` (function): one such URL.
- `registry_url` (function, params "sqlite" and "postgresql"): a registry URL on either backend,
  so one test covers both. The PostgreSQL cluster is only started when a postgresql case runs.

PostgreSQL refuses to run as root: as root (CI), the cluster belongs to the Debian `postgres`
system user and initdb/postgres are exec'd with that uid and gid directly (subprocess
`user=`/`group=`), not through `runuser`, which would swallow the SIGINT meant for the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import pytest

from .conftest import free_port, wait_until
from .required import missing

INSTALL_HINT = "apt-get install postgresql, or `make postgresql` as root"
SYSTEM_USER = "postgres"  # the Debian package's system user, used when we are root
SUPERUSER = "postgres"  # the cluster's superuser role (initdb -U)
START_TIMEOUT = 30.0

T = TypeVar("T")


@dataclass(frozen=True)
class PostgresBinaries:
    initdb: Path
    postgres: Path


def _version_key(bindir: Path) -> tuple[int, ...]:
    """/usr/lib/postgresql/15/bin -> (15,); non-numeric versions sort first."""
    return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name)) or (-1,)


def find_binaries() -> PostgresBinaries | None:
    """initdb and postgres from one directory: PATH first, then the newest Debian versioned dir."""
    initdb, postgres = shutil.which("initdb"), shutil.which("postgres")
    if initdb and postgres:
        return PostgresBinaries(Path(initdb), Path(postgres))
    bindirs = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    for bindir in bindirs:
        initdb_path, postgres_path = bindir / "initdb", bindir / "postgres"
        if os.access(initdb_path, os.X_OK) and os.access(postgres_path, os.X_OK):
            return PostgresBinaries(initdb_path, postgres_path)
    return None


def _missing(message: str, hint: str = INSTALL_HINT) -> NoReturn:
    """Skip locally, fail under CI (tests/required.py): a server or tool the tests need is absent."""
    missing(f"{message}: {hint}")


def _run_sync(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion on a private loop in a helper thread.

    Works from sync fixtures and from inside a running loop alike (e.g. when an async fixture
    calls request.getfixturevalue), where asyncio.run would refuse.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = asyncio.run(factory())
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="postgres-admin")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@dataclass
class PostgresServer:
    """A running cluster. `url(db)` is a SQLAlchemy URL; databases are created as superuser."""

    host: str
    port: int
    socket_dir: Path
    data_dir: Path
    binaries: PostgresBinaries
    process: subprocess.Popen[bytes] = field(repr=False)
    user: str = SUPERUSER

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    async def _admin(self, *statements: str) -> None:
        import asyncpg

        conn = await asyncpg.connect(host=self.host, port=self.port, user=self.user, database="postgres", timeout=10)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    def create_database(self, name: str | None = None) -> str:
        name = name or f"test_{uuid.uuid4().hex[:16]}"
        _run_sync(lambda: self._admin(f'CREATE DATABASE "{name}"'))
        return name

    def drop_database(self, name: str) -> None:
        # WITH (FORCE) (PostgreSQL 13+) terminates connections the test left open (e.g. a pool).
        _run_sync(lambda: self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _accessible_to_others(path: Path) -> bool:
    """Every directory down to `path` can be traversed by a user other than root."""
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])


def _base_dir(as_root: bool) -> str | None:
    base = Path(tempfile.gettempdir())
    if as_root and not _accessible_to_others(base):
        return "/tmp"  # e.g. TMPDIR under /root: the postgres user could not reach the cluster
    return None


def _log_tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _ready(data_dir: Path) -> bool:
    """postmaster.pid's 8th line is "ready" once the server accepts connections (as pg_ctl -w checks)."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
    except OSError:
        return False
    return len(lines) >= 8 and lines[7].strip() == "ready"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    with _cluster() as (server, _restart):
        yield server


@pytest.fixture
def restartable_postgres() -> Iterator[tuple[PostgresServer, Callable[[], None]]]:
    """A cluster of this test's own, which it may stop (`_stop(server.process)`, a fast shutdown)
    and start again on the same port with the second item."""
    with _cluster() as cluster:
        yield cluster


@contextlib.contextmanager
def _cluster() -> Iterator[tuple[PostgresServer, Callable[[], None]]]:
    binaries = find_binaries()
    if binaries is None:
        _missing("PostgreSQL server binaries (initdb, postgres) not found on PATH or in /usr/lib/postgresql/*/bin")
    as_root = os.geteuid() == 0
    run_as: dict[str, Any] = {}
    if as_root:
        try:
            account = pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            _missing(f"running as root but the {SYSTEM_USER!r} system user (created by Debian's package) is missing")
        run_as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}

    base = Path(tempfile.mkdtemp(prefix="pytest-postgres-", dir=_base_dir(as_root)))
    data_dir, log = base / "data", base / "postgres.log"
    if as_root:
        os.chown(base, run_as["user"], run_as["group"])
    env = {**os.environ, "LC_ALL": "C", "TZ": "UTC"}
    if as_root:
        env["HOME"] = str(base)
    try:
        initdb = subprocess.run(
            [
                str(binaries.initdb),
                "-D",
                str(data_dir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",  # a throwaway cluster: no fsync of the new files
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=base,
            **run_as,
        )
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed ({initdb.returncode}):\n{initdb.stdout.decode(errors='replace')}")
        server = _start(binaries, base, data_dir, log, env, run_as)
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise

    def restart() -> None:
        server.process = _start(binaries, base, data_dir, log, env, run_as, server.port).process

    try:
        yield server, restart
    finally:
        _stop(server.process)
        shutil.rmtree(base, ignore_errors=True)


def _start(
    binaries: PostgresBinaries,
    base: Path,
    data_dir: Path,
    log: Path,
    env: dict[str, str],
    run_as: dict[str, Any],
    port: int | None = None,
) -> PostgresServer:
    """Start postgres on `port` or a free one; retry with another free port if one was taken meanwhile."""
    for attempt in range(3):
        port = port or free_port()
        log_start = log.stat().st_size if log.exists() else 0
        with log.open("ab") as log_file:
            process = subprocess.Popen(
                [
                    str(binaries.postgres),
                    "-D",
                    str(data_dir),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-k",
                    str(base),
                    "-F",  # fsync=off
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=200",
                    "-c",
                    "logging_collector=off",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=base,
                **run_as,
            )

        def up(process: subprocess.Popen[bytes] = process) -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"postgres exited with {process.returncode}:\n{_log_tail(log)}")
            return _ready(data_dir)

        try:
            wait_until(up, timeout=START_TIMEOUT, what="postgres to accept connections")
        except RuntimeError:
            if attempt < 2 and b"could not bind" in log.read_bytes()[log_start:]:
                port = None
                continue
            raise
        except BaseException:
            _stop(process)
            raise
        return PostgresServer("127.0.0.1", port, base, data_dir, binaries, process)
    raise AssertionError("unreachable")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGINT is PostgreSQL's fast shutdown (roll back sessions, checkpoint, exit)."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGQUIT)  # immediate shutdown
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def postgres_url_factory(postgres_server: PostgresServer) -> Iterator[Callable[[], str]]:
    created: list[str] = []

    def make() -> str:
        name = postgres_server.create_database()
        created.append(name)
        return postgres_server.url(name)

    yield make
    for name in created:
        postgres_server.drop_database(name)


@pytest.fixture
def fresh_postgres_url(postgres_url_factory: Callable[[], str]) -> str:
    return postgres_url_factory()


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return request.getfixturevalue("fresh_postgres_url")
