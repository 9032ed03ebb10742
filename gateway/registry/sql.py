"""SQLAlchemy (async) implementation of the registry: one code path for SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import JSON, and_, delete, event, func, insert, or_, select, text, update
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    ProgrammingError,
    SQLAlchemyError,
    StatementError,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ..uris import find_gs_uris
from . import ImportedObject, RegistryUnavailable, TaskAccess
from .migrate import upgrade
from .schema import (
    ACTIVE,
    deliveries_table,
    export_storages_table,
    storage_objects_table,
    storages_table,
    sync_jobs_table,
    task_uris_table,
    tasks_table,
)

_ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}
MAX_JOB_ERRORS = 20  # first error messages kept on a job; the counter keeps counting
MAX_TASK_ID = 2**31 - 1  # tasks.id is a 32-bit INTEGER on PostgreSQL: a larger id names no task
KEYS_PER_STATEMENT = 1000  # SQLite and asyncpg refuse statements with more than 32766 parameters
_STORAGE_TABLES = {"source": storages_table, "export": export_storages_table}
log = logging.getLogger("gateway.registry")


P = ParamSpec("P")
T = TypeVar("T")


def _to_the_end(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """A write runs to its commit or rollback even when its caller is cancelled meanwhile (a
    sync being stopped, a TaskGroup sibling failing); the cancellation is raised after it.

    A transaction cancelled halfway leaves its connection to the garbage collector, and on
    SQLite that connection keeps the database's write lock: every later write then waits out
    busy_timeout and fails. Each write is one short transaction, so waiting for it is cheap.
    """

    @functools.wraps(method)
    async def run(*args: P.args, **kwargs: P.kwargs) -> T:
        task = asyncio.ensure_future(method(*args, **kwargs))
        cancelled: asyncio.CancelledError | None = None
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError as exc:
                if task.cancelled():
                    raise  # the write itself was cancelled (the loop is closing)
                cancelled = exc  # the caller was: even if the write ended meanwhile, it is told
            except BaseException:
                pass  # the write's own failure, raised below
        if cancelled is not None:
            if not task.cancelled():
                task.exception()  # retrieved: the cancellation is what the caller gets
            raise cancelled
        return task.result()

    return run


def async_url(url: str) -> str:
    parsed = make_url(url)
    driver = _ASYNC_DRIVERS.get(parsed.drivername)
    return str(parsed.set(drivername=driver)) if driver else url


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite registry URL (absolute), None for other databases and :memory:."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).resolve()


def describe(exc: BaseException) -> str:
    """A database error in one line, for logs and start-up errors: never a password of a URL."""
    first_line = re.sub(r"://[^@/\s]*@", "://***@", (str(exc).splitlines() or [""])[0][:200])
    return f"{type(exc).__name__}: {first_line}"


def empty_counters() -> dict[str, int]:
    return dict.fromkeys(("listed", "created", "updated", "removed", "skipped", "errors"), 0)


class SqlTaskRegistry:
    """The registry on one database. `create=False` (processes started after the start-up check
    of gateway/registry/marker.py) never creates a SQLite file that is missing.

    Acknowledged means durable where a restart will look: on SQLite every write checks, before and
    after its commit, that the path still names the file this process opened and that it may be
    written — a removed or replaced file keeps taking writes through open connections, and an
    open file made read-only too, until the restart that loses them. A write that fails so, or
    any database failure, raises RegistryUnavailable (answered 503); `problem` says why until a
    write or a ping succeeds again, and the change is logged once each way.
    """

    def __init__(self, url: str, *, create: bool = True) -> None:
        postgres = url.startswith("postgresql")
        # asyncpg prepares statements; after five runs PostgreSQL may switch one to a generic plan
        # made while the tables were small, which scans a storage's rows for each key list of a
        # sync page (100k objects: 74 s instead of ~25 s). Custom plans cost little here.
        options = {"server_settings": {"plan_cache_mode": "force_custom_plan"}} if postgres else {}
        self.file = sqlite_file(url)
        self._file_id: tuple[int, int] | None = None  # (device, inode) of the file opened
        self.problem: str | None = None
        target: str | URL = async_url(url)
        if self.file is not None and not create:
            database = f"file:{urllib.parse.quote(str(self.file))}"
            target = URL.create("sqlite+aiosqlite", database=database, query={"mode": "rw", "uri": "true"})
        self._engine: AsyncEngine = create_async_engine(target, pool_pre_ping=postgres, connect_args=options)
        self.dialect = self._engine.dialect.name
        if self.dialect == "sqlite":
            event.listen(self._engine.sync_engine, "connect", _sqlite_pragmas)
        self._ready = False
        self._schema_lock = asyncio.Lock()
        # SQLite has one writer at a time: this process's writers take turns here instead of
        # meeting in SQLite's busy handler, which sleeps (1 ms, 2 ms, 5 ms …) between tries.
        self._write_turn = asyncio.Lock() if self.dialect == "sqlite" else contextlib.nullcontext()

    async def _ensure_schema(self) -> None:
        if self._ready:
            return
        async with self._schema_lock:
            if not self._ready:
                async with self._available(), self._engine.begin() as conn:
                    await conn.run_sync(upgrade)
                    if self.file is not None:
                        stat = os.stat(self.file)
                        self._file_id = (stat.st_dev, stat.st_ino)
                self._ready = True

    @contextlib.asynccontextmanager
    async def _begin(self) -> AsyncIterator[AsyncConnection]:
        await self._ensure_schema()
        async with self._write_turn, self._available(durable=True), self._engine.begin() as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def _connect(self) -> AsyncIterator[AsyncConnection]:
        await self._ensure_schema()
        async with self._available(), self._engine.connect() as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def _available(self, durable: bool = False) -> AsyncIterator[None]:
        """Database failures as RegistryUnavailable; with `durable` (writes and pings), the file
        is checked before and after (see the class), and success clears `problem`."""
        try:
            if durable:
                self._check_file()
            yield
            if durable:
                self._check_file()
        except (IntegrityError, ProgrammingError, DataError):
            raise  # the statement's fault, not the database's availability
        except RegistryUnavailable as exc:
            self._went_down(str(exc))
            raise
        except (SQLAlchemyError, OSError) as exc:
            if isinstance(exc, StatementError) and not isinstance(exc, DBAPIError):
                raise  # parameters that could not be sent (e.g. data too deep to serialise)
            self._went_down(describe(exc))
            raise RegistryUnavailable(describe(exc)) from exc
        if durable and self.problem is not None:
            log.warning("registry available again (it was: %s)", self.problem)
            self.problem = None

    def _check_file(self) -> None:
        if self.file is None or self._file_id is None:
            return
        try:
            stat = os.stat(self.file)
        except FileNotFoundError:
            raise RegistryUnavailable(f"the registry file {self.file} was removed") from None
        except OSError as exc:
            raise RegistryUnavailable(f"the registry file {self.file} cannot be examined ({exc.strerror})") from None
        if (stat.st_dev, stat.st_ino) != self._file_id:
            raise RegistryUnavailable(f"the registry file {self.file} was replaced by another file")
        if not os.access(self.file, os.W_OK):
            raise RegistryUnavailable(f"the registry file {self.file} is read-only")

    def _went_down(self, reason: str) -> None:
        if self.problem is None:  # once per outage: requests and workers fail quietly meanwhile
            log.error(
                "registry unavailable: %s. Writes (webhooks, imports, settings) answer 503 and /readyz "
                "fails until it is back; nothing is acknowledged meanwhile.",
                reason,
            )
            self.problem = reason

    # -- tasks -------------------------------------------------------------------------------

    @_to_the_end
    async def add_tasks(self, project: str, tasks: list[dict[str, Any]]) -> list[int]:
        """Insert tasks in one transaction: all of them, or none."""
        async with self._begin() as conn:
            return await _insert_tasks(conn, [{"project": project, "task": task} for task in tasks])

    async def task_access(self, task_id: int) -> TaskAccess | None:
        if not 0 < task_id <= MAX_TASK_ID:  # else PostgreSQL's driver refuses the parameter
            return None
        async with self._connect() as conn:
            row = (
                await conn.execute(
                    select(tasks_table.c.project, tasks_table.c.storage_id).where(tasks_table.c.id == task_id)
                )
            ).one_or_none()
            if row is None:
                return None
            uris = (
                await conn.execute(select(task_uris_table.c.uri).where(task_uris_table.c.task_id == task_id))
            ).scalars()
            return TaskAccess(task_id, row.project, frozenset(uris), row.storage_id)

    async def get_task(self, task_id: int) -> dict[str, Any] | None:
        if not 0 < task_id <= MAX_TASK_ID:
            return None
        async with self._connect() as conn:
            row = (await conn.execute(_task_select().where(tasks_table.c.id == task_id))).one_or_none()
        return None if row is None else _task_dict(row)

    async def list_tasks(
        self,
        project: str,
        *,
        storage_id: str | None = None,
        object_key: str | None = None,
        offset: int = 0,
        limit: int = 100,
    ) -> tuple[int, list[dict[str, Any]]]:
        """One page of a project's tasks (by id) and the total count matching the filters."""
        where = [tasks_table.c.project == project]
        if storage_id is not None:
            where.append(tasks_table.c.storage_id == storage_id)
        if object_key is not None:
            where.append(tasks_table.c.object_key == object_key)
        async with self._connect() as conn:
            total = (await conn.execute(select(func.count()).select_from(tasks_table).where(*where))).scalar_one()
            rows = await conn.execute(
                _task_select().where(*where).order_by(tasks_table.c.id).offset(offset).limit(limit)
            )
            return total, [_task_dict(row) for row in rows]

    async def ping(self) -> None:
        """Reachable and writable where a restart will look, with the schema in place (migrated on
        first use)."""
        await self._ensure_schema()
        async with self._available(durable=True), self._engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def close(self) -> None:
        await self._engine.dispose()

    # -- storages created through the API: sources (`kind="source"`) and targets (`"export"`) ---

    @_to_the_end
    async def create_storage(self, values: dict[str, Any], kind: str = "source") -> dict[str, Any]:
        table = _STORAGE_TABLES[kind]
        now = time.time()
        async with self._begin() as conn:
            result = await conn.execute(insert(table).values(**values, created_at=now, updated_at=now))
            row = (await conn.execute(select(table).where(table.c.id == result.inserted_primary_key[0]))).one()
        return dict(row._mapping)

    async def get_storage(self, storage_id: int, kind: str = "source") -> dict[str, Any] | None:
        table = _STORAGE_TABLES[kind]
        async with self._connect() as conn:
            row = (await conn.execute(select(table).where(table.c.id == storage_id))).one_or_none()
        return None if row is None else dict(row._mapping)

    async def list_storages(self, kind: str = "source") -> list[dict[str, Any]]:
        table = _STORAGE_TABLES[kind]
        async with self._connect() as conn:
            rows = await conn.execute(select(table).order_by(table.c.id))
            return [dict(row._mapping) for row in rows]

    @_to_the_end
    async def update_storage(
        self, storage_id: int, values: dict[str, Any], kind: str = "source"
    ) -> dict[str, Any] | None:
        table = _STORAGE_TABLES[kind]
        async with self._begin() as conn:
            result = await conn.execute(
                update(table).where(table.c.id == storage_id).values(**values, updated_at=time.time())
            )
            if result.rowcount == 0:
                return None
            row = (await conn.execute(select(table).where(table.c.id == storage_id))).one()
        return dict(row._mapping)

    @_to_the_end
    async def delete_storage(self, storage_id: int, kind: str = "source") -> bool:
        """Forget a storage. A source's sync history goes and its tasks stay, detached (as Label
        Studio keeps them); a target's pending deliveries go (its objects stay in the bucket)."""
        key = str(storage_id)
        table = _STORAGE_TABLES[kind]
        async with self._begin() as conn:
            result = await conn.execute(delete(table).where(table.c.id == storage_id))
            if result.rowcount == 0:
                return False
            if kind == "export":
                await conn.execute(delete(deliveries_table).where(deliveries_table.c.target_id == key))
                return True
            await conn.execute(
                update(tasks_table)
                .where(tasks_table.c.storage_id == key)
                .values(storage_id=None, object_key=None, row=None)
            )
            await conn.execute(delete(storage_objects_table).where(storage_objects_table.c.storage_id == key))
            await conn.execute(delete(sync_jobs_table).where(sync_jobs_table.c.storage_id == key))
        return True

    # -- sync jobs -----------------------------------------------------------------------------

    @_to_the_end
    async def enqueue_job(self, storage_id: str) -> tuple[dict[str, Any], bool]:
        """A queued job for the storage, or the one already queued or running (and False)."""
        for _ in range(3):
            async with self._connect() as conn:
                active = (
                    await conn.execute(
                        select(sync_jobs_table).where(
                            sync_jobs_table.c.storage_id == storage_id, sync_jobs_table.c.status.in_(ACTIVE)
                        )
                    )
                ).one_or_none()
            if active is not None:
                return dict(active._mapping), False
            try:
                async with self._begin() as conn:
                    result = await conn.execute(
                        insert(sync_jobs_table).values(
                            storage_id=storage_id,
                            status="queued",
                            created_at=time.time(),
                            counters=empty_counters(),
                            errors=[],
                        )
                    )
                    job_id = result.inserted_primary_key[0]
                    row = (await conn.execute(select(sync_jobs_table).where(sync_jobs_table.c.id == job_id))).one()
                return dict(row._mapping), True
            except IntegrityError:
                pass  # another process queued one between our look and our insert: answer with it
        raise RegistryUnavailable("could not queue a sync job")

    @_to_the_end
    async def claim_job(
        self, worker: str, storage_id: str | None = None, skip: Iterable[str] = ()
    ) -> dict[str, Any] | None:
        """Take the oldest queued job (of one storage, or any but those of `skip`): safe with
        many workers.

        The conditional UPDATE only succeeds for one claimant; on PostgreSQL, SKIP LOCKED lets
        the others move on to the next job instead of waiting.
        """
        candidates = select(sync_jobs_table.c.id).where(sync_jobs_table.c.status == "queued")
        if storage_id is not None:
            candidates = candidates.where(sync_jobs_table.c.storage_id == storage_id)
        skip = list(skip)
        if skip:
            candidates = candidates.where(sync_jobs_table.c.storage_id.not_in(skip))
        candidates = candidates.order_by(sync_jobs_table.c.id).limit(1)
        if self.dialect == "postgresql":
            candidates = candidates.with_for_update(skip_locked=True)
        now = time.time()
        async with self._begin() as conn:
            job_id = (await conn.execute(candidates)).scalar_one_or_none()
            if job_id is None:
                return None
            result = await conn.execute(
                update(sync_jobs_table)
                .where(sync_jobs_table.c.id == job_id, sync_jobs_table.c.status == "queued")
                .values(
                    status="running",
                    worker=worker,
                    started_at=now,
                    heartbeat_at=now,
                    attempts=sync_jobs_table.c.attempts + 1,
                )
            )
            if result.rowcount != 1:
                return None
            row = (await conn.execute(select(sync_jobs_table).where(sync_jobs_table.c.id == job_id))).one()
        return dict(row._mapping)

    @_to_the_end
    async def heartbeat(self, job_id: int, worker: str, counters: dict[str, int], errors: list[str]) -> bool:
        """Record progress; False when the job is no longer this worker's (re-queued meanwhile)."""
        async with self._begin() as conn:
            result = await conn.execute(
                update(sync_jobs_table)
                .where(*_held_by(job_id, worker))
                .values(heartbeat_at=time.time(), counters=counters, errors=errors[:MAX_JOB_ERRORS])
            )
            return result.rowcount == 1

    @_to_the_end
    async def finish_job(
        self,
        job_id: int,
        worker: str,
        status: str,
        counters: dict[str, int],
        errors: list[str],
        message: str | None = None,
    ) -> bool:
        async with self._begin() as conn:
            result = await conn.execute(
                update(sync_jobs_table)
                .where(*_held_by(job_id, worker))
                .values(
                    status=status,
                    finished_at=time.time(),
                    counters=counters,
                    errors=errors[:MAX_JOB_ERRORS],
                    message=message,
                )
            )
            return result.rowcount == 1

    @_to_the_end
    async def release_job(self, job_id: int, worker: str) -> None:
        """A worker stopping hands its running job back to the queue."""
        async with self._begin() as conn:
            await conn.execute(
                update(sync_jobs_table)
                .where(*_held_by(job_id, worker))
                .values(status="queued", worker=None, heartbeat_at=None)
            )

    @_to_the_end
    async def requeue_stale(self, stale_after: float, max_attempts: int) -> list[int]:
        """Running jobs whose worker stopped heart-beating: queued again, or failed after
        `max_attempts` claims (a sync that kills its worker every time must not loop forever)."""
        cutoff = time.time() - stale_after
        stale = and_(sync_jobs_table.c.status == "running", sync_jobs_table.c.heartbeat_at < cutoff)
        async with self._begin() as conn:
            rows = (await conn.execute(select(sync_jobs_table.c.id, sync_jobs_table.c.attempts).where(stale))).all()
            for job_id, attempts in rows:
                values: dict[str, Any] = {"worker": None, "heartbeat_at": None}
                if attempts >= max_attempts:
                    values.update(status="failed", finished_at=time.time(), message="the sync's worker died repeatedly")
                else:
                    values.update(status="queued")
                await conn.execute(
                    update(sync_jobs_table).where(sync_jobs_table.c.id == job_id, stale).values(**values)
                )
        return [job_id for job_id, _ in rows]

    async def last_sync_finished(self) -> int:
        """How many sync jobs have finished (any storage): it changes whenever one finishes,
        whatever the clocks of the hosts that ran them — a cheap signal that tasks changed."""
        async with self._connect() as conn:
            finished = (
                select(func.count()).select_from(sync_jobs_table).where(sync_jobs_table.c.finished_at.is_not(None))
            )
            return (await conn.execute(finished)).scalar_one()

    async def get_job(self, job_id: int) -> dict[str, Any] | None:
        async with self._connect() as conn:
            row = (await conn.execute(select(sync_jobs_table).where(sync_jobs_table.c.id == job_id))).one_or_none()
        return None if row is None else dict(row._mapping)

    async def latest_jobs(self, storage_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The newest job of each storage; with it, the newest finished one under `last_finished`."""
        ids = list(storage_ids)
        if not ids:
            return {}
        newest = (
            select(func.max(sync_jobs_table.c.id))
            .where(sync_jobs_table.c.storage_id.in_(ids))
            .group_by(sync_jobs_table.c.storage_id)
        )
        finished = (
            select(func.max(sync_jobs_table.c.id))
            .where(sync_jobs_table.c.storage_id.in_(ids), sync_jobs_table.c.finished_at.is_not(None))
            .group_by(sync_jobs_table.c.storage_id)
        )
        async with self._connect() as conn:
            rows = await conn.execute(
                select(sync_jobs_table).where(or_(sync_jobs_table.c.id.in_(newest), sync_jobs_table.c.id.in_(finished)))
            )
            jobs: dict[str, dict[str, Any]] = {}
            for row in sorted((dict(r._mapping) for r in rows), key=lambda job: job["id"]):
                previous = jobs.get(row["storage_id"])
                if previous is not None and previous["finished_at"] is not None:
                    row["last_finished"] = previous
                elif row["finished_at"] is not None:
                    row["last_finished"] = row
                jobs[row["storage_id"]] = row
            return jobs

    # -- what a sync writes ----------------------------------------------------------------------

    async def imported_objects(
        self, storage_id: str, after: str | None, upto: str | None, limit: int | None = None
    ) -> list[ImportedObject]:
        """Imported objects of a storage with `after < key <= upto` (None: unbounded), by key;
        at most `limit` of them (the next ones follow after the last key answered)."""
        where = [storage_objects_table.c.storage_id == storage_id]
        if after is not None:
            where.append(storage_objects_table.c.object_key > after)
        if upto is not None:
            where.append(storage_objects_table.c.object_key <= upto)
        async with self._connect() as conn:
            rows = await conn.execute(
                select(
                    storage_objects_table.c.object_key,
                    storage_objects_table.c.generation,
                    storage_objects_table.c.task_count,
                    storage_objects_table.c.row_errors,
                )
                .where(*where)
                .order_by(storage_objects_table.c.object_key)
                .limit(limit)
            )
            return [ImportedObject(*row) for row in rows]

    @_to_the_end
    async def import_objects(
        self,
        storage_id: str,
        project: str,
        objects: list[tuple[str, str, dict[str, Any]]],
        uri_of: Callable[[str], str] | None = None,
    ) -> tuple[int, int, int]:
        """Objects imported as one task each (key, generation, task), in one transaction.

        A new key gets a task; a known key keeps its task id and gets the new data and
        generation (and loses the other rows it had as a task file). With `uri_of`, a task
        references exactly the URI it gives for its key (a key may hold quotes or `<>`, which
        finding URIs in free text stops at). Returns (created, updated, removed).
        """
        if not objects:
            return 0, 0, 0
        now = time.time()
        keys = [key for key, _, _ in objects]
        async with self._begin() as conn:
            existing = dict(
                (
                    await conn.execute(
                        select(tasks_table.c.object_key, tasks_table.c.id).where(
                            tasks_table.c.storage_id == storage_id,
                            tasks_table.c.object_key.in_(keys),
                            tasks_table.c.row == 0,
                        )
                    )
                ).all()
            )
            fresh = [(key, gen, task) for key, gen, task in objects if key not in existing]
            await _insert_tasks(
                conn,
                [
                    {
                        "project": project,
                        "task": task,
                        "storage_id": storage_id,
                        "object_key": key,
                        "row": 0,
                        "updated_at": now,
                    }
                    for key, _, task in fresh
                ],
                None if uri_of is None else [{uri_of(key)} for key, _, _ in fresh],
            )
            changed = [(existing[key], key, task) for key, _, task in objects if key in existing]
            for task_id, key, task in changed:
                await _replace_task(conn, task_id, task, now, None if uri_of is None else {uri_of(key)})
            # Extra rows of an object that used to be a task file are removed.
            extra = await conn.execute(
                delete(tasks_table).where(
                    tasks_table.c.storage_id == storage_id, tasks_table.c.object_key.in_(keys), tasks_table.c.row > 0
                )
            )
            await conn.execute(
                delete(storage_objects_table).where(
                    storage_objects_table.c.storage_id == storage_id, storage_objects_table.c.object_key.in_(keys)
                )
            )
            await _insert_many(
                conn,
                storage_objects_table,
                [
                    {"storage_id": storage_id, "object_key": key, "generation": gen, "task_count": 1}
                    for key, gen, _ in objects
                ],
            )
        return len(fresh), len(changed), extra.rowcount

    @_to_the_end
    async def remove_objects(self, storage_id: str, keys: list[str]) -> int:
        """Forget objects gone from the bucket (or the storage's scope); returns tasks removed.
        One transaction, in statements of bounded size (databases cap bound parameters)."""
        if not keys:
            return 0
        removed = 0
        async with self._begin() as conn:
            for start in range(0, len(keys), KEYS_PER_STATEMENT):
                chunk = keys[start : start + KEYS_PER_STATEMENT]
                result = await conn.execute(
                    delete(tasks_table).where(
                        tasks_table.c.storage_id == storage_id, tasks_table.c.object_key.in_(chunk)
                    )
                )
                removed += result.rowcount
                await conn.execute(
                    delete(storage_objects_table).where(
                        storage_objects_table.c.storage_id == storage_id, storage_objects_table.c.object_key.in_(chunk)
                    )
                )
        return removed

    @_to_the_end
    async def upsert_rows(
        self,
        storage_id: str,
        project: str,
        key: str,
        rows: list[tuple[int, dict[str, Any]]],
        bad_rows: list[int] = (),  # type: ignore[assignment]
    ) -> tuple[int, int, int]:
        """Rows of a task file, in one transaction: a known row keeps its task id; `bad_rows`
        (malformed or blank) hold no task. Returns (created, updated, removed); identical rows
        are not written.

        The object is recorded as unfinished (generation NULL) until `finish_object`, so a
        crash in the middle of a file leaves it to be imported again, never half-forgotten.
        """
        if not rows and not bad_rows:
            return 0, 0, 0
        now = time.time()
        numbers = [number for number, _ in rows]
        of_object = and_(tasks_table.c.storage_id == storage_id, tasks_table.c.object_key == key)
        async with self._begin() as conn:
            # Only what differs is written: a file read again unchanged costs reads only.
            known = {
                row_number: (task_id, task)
                for task_id, row_number, task in await conn.execute(
                    select(tasks_table.c.id, tasks_table.c.row, tasks_table.c.task).where(
                        of_object, tasks_table.c.row.in_([*numbers, *bad_rows])
                    )
                )
            }
            fresh = [
                {
                    "project": project,
                    "task": task,
                    "storage_id": storage_id,
                    "object_key": key,
                    "row": number,
                    "updated_at": now,
                }
                for number, task in rows
                if number not in known
            ]
            await _insert_tasks(conn, fresh)
            updated = 0
            for number, task in rows:
                if number in known and known[number][1] != task:
                    await _replace_task(conn, known[number][0], task, now)
                    updated += 1
            gone = [number for number in bad_rows if number in known]
            if gone:  # a row that became malformed or blank no longer holds a task
                await conn.execute(delete(tasks_table).where(of_object, tasks_table.c.row.in_(gone)))
            state = (
                await conn.execute(
                    select(storage_objects_table.c.generation).where(
                        storage_objects_table.c.storage_id == storage_id, storage_objects_table.c.object_key == key
                    )
                )
            ).one_or_none()
            if state is None:
                await conn.execute(
                    insert(storage_objects_table).values(
                        storage_id=storage_id, object_key=key, generation=None, task_count=0
                    )
                )
            elif state.generation is not None:
                await conn.execute(
                    update(storage_objects_table)
                    .where(storage_objects_table.c.storage_id == storage_id, storage_objects_table.c.object_key == key)
                    .values(generation=None)
                )
        return len(fresh), updated, len(gone)

    @_to_the_end
    async def finish_object(
        self, storage_id: str, key: str, generation: str, row_count: int, row_errors: int = 0
    ) -> int:
        """A task file read to its end: rows beyond it are removed, the generation recorded with
        the number of rows it could not import. Returns the number of tasks removed."""
        async with self._begin() as conn:
            result = await conn.execute(
                delete(tasks_table).where(
                    tasks_table.c.storage_id == storage_id,
                    tasks_table.c.object_key == key,
                    tasks_table.c.row >= row_count,
                )
            )
            values = {"generation": generation, "task_count": row_count, "row_errors": row_errors}
            found = await conn.execute(
                update(storage_objects_table)
                .where(storage_objects_table.c.storage_id == storage_id, storage_objects_table.c.object_key == key)
                .values(**values)
            )
            if found.rowcount == 0:
                await conn.execute(
                    insert(storage_objects_table).values(storage_id=storage_id, object_key=key, **values)
                )
            return result.rowcount


def _held_by(job_id: int, worker: str) -> tuple[Any, ...]:
    """The job, while it is running in this worker (not re-queued or taken over meanwhile)."""
    return (sync_jobs_table.c.id == job_id, sync_jobs_table.c.worker == worker, sync_jobs_table.c.status == "running")


async def _insert_tasks(
    conn: AsyncConnection, rows: list[dict[str, Any]], uris: list[set[str]] | None = None
) -> list[int]:
    """Insert tasks and index their gs:// URIs (those given, or those found in their data);
    ids in the order given."""
    if not rows:
        return []
    if rows[0].get("storage_id") is not None and conn.dialect.name == "sqlite":
        ids = await _insert_synced(conn, rows)
    elif conn.dialect.name == "postgresql" and len(rows) > 1:
        # Ids drawn from the sequence in one query, then the rows copied with them.
        sequence = "SELECT nextval(pg_get_serial_sequence('tasks', 'id')) FROM generate_series(1, :n)"
        ids = list((await conn.execute(text(sequence), {"n": len(rows)})).scalars())
        await _copy(conn, tasks_table, [{"id": task_id, **row} for task_id, row in zip(ids, rows, strict=True)])
    else:
        result = await conn.execute(insert(tasks_table).returning(tasks_table.c.id, sort_by_parameter_order=True), rows)
        ids = list(result.scalars())
    if uris is None:
        uris = [find_gs_uris(row["task"]["data"]) for row in rows]
    links = [{"task_id": task_id, "uri": uri} for task_id, found in zip(ids, uris, strict=True) for uri in found]
    await _insert_many(conn, task_uris_table, links)
    return ids


async def _insert_many(conn: AsyncConnection, table: Any, rows: list[dict[str, Any]]) -> None:
    """Many rows: SQLite's executemany is one call; asyncpg's runs the statement once per row,
    so PostgreSQL gets COPY instead (no statement to compile or parameters to process)."""
    if not rows:
        return
    if conn.dialect.name != "postgresql":
        await conn.execute(insert(table), rows)
        return
    await _copy(conn, table, rows)


async def _copy(conn: AsyncConnection, table: Any, rows: list[dict[str, Any]]) -> None:
    """PostgreSQL's COPY through asyncpg, inside the connection's transaction. Every row has the
    same keys; JSON columns are serialised here, as SQLAlchemy would."""
    columns = list(rows[0])
    as_json = {name for name in columns if isinstance(table.c[name].type, JSON)}
    records = [tuple(json.dumps(row[name]) if name in as_json else row[name] for name in columns) for row in rows]
    raw = await conn.get_raw_connection()
    try:
        await raw.driver_connection.copy_records_to_table(table.name, records=records, columns=columns)
    except Exception as exc:  # asyncpg's own errors: classified as SQLAlchemy's would be
        state = str(getattr(exc, "sqlstate", "") or "")
        kind = DataError if state.startswith("22") else IntegrityError if state.startswith("23") else DBAPIError
        raise kind(f"COPY {table.name}", None, exc) from exc


async def _insert_synced(conn: AsyncConnection, rows: list[dict[str, Any]]) -> list[int]:
    """Synced tasks (one storage) in one executemany, then their ids by (object, row).

    RETURNING with ordered results makes SQLAlchemy send one INSERT per row on SQLite, about ten
    times slower for a page of a thousand objects; the (storage, object, row) key is unique.
    """
    storage_id = rows[0]["storage_id"]
    assert all(row["storage_id"] == storage_id for row in rows)
    await conn.execute(insert(tasks_table), rows)
    numbers = [row["row"] for row in rows]
    keys = sorted({row["object_key"] for row in rows})
    found: dict[tuple[str, int], int] = {}
    for start in range(0, len(keys), 500):
        result = await conn.execute(
            select(tasks_table.c.id, tasks_table.c.object_key, tasks_table.c.row).where(
                tasks_table.c.storage_id == storage_id,
                tasks_table.c.object_key.in_(keys[start : start + 500]),
                tasks_table.c.row.between(min(numbers), max(numbers)),
            )
        )
        found.update(((key, row), task_id) for task_id, key, row in result)
    return [found[(row["object_key"], row["row"])] for row in rows]


async def _replace_task(
    conn: AsyncConnection, task_id: int, task: dict[str, Any], now: float, uris: set[str] | None = None
) -> None:
    await conn.execute(update(tasks_table).where(tasks_table.c.id == task_id).values(task=task, updated_at=now))
    await conn.execute(delete(task_uris_table).where(task_uris_table.c.task_id == task_id))
    uris = find_gs_uris(task["data"]) if uris is None else uris
    if uris:
        await conn.execute(insert(task_uris_table), [{"task_id": task_id, "uri": uri} for uri in uris])


def _task_select():  # type: ignore[no-untyped-def]
    return select(
        tasks_table.c.id,
        tasks_table.c.project,
        tasks_table.c.task,
        tasks_table.c.storage_id,
        tasks_table.c.object_key,
        tasks_table.c.row,
    )


def _task_dict(row: Any) -> dict[str, Any]:
    task = {**row.task, "id": row.id, "project": row.project}
    if row.storage_id is not None:
        task["storage_filename"] = row.object_key  # Label Studio's name for the source object
        task["storage"] = {"id": row.storage_id, "key": row.object_key, "row": row.row}
    return task


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL and a busy timeout let several worker processes share one SQLite file."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=5000")  # first, so switching to WAL may wait too
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")  # WAL keeps commits durable against crashes of the process
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
