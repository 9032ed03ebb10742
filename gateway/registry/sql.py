"""SQLAlchemy (async) implementation of the task registry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    event,
    insert,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ..uris import find_gs_uris
from . import RegistryUnavailable, TaskAccess

metadata = MetaData()

tasks_table = Table(
    "tasks",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("project", String(255), nullable=False),
    Column("task", JSON, nullable=False),
    Index("ix_tasks_project", "project"),
)

task_uris_table = Table(
    "task_uris",
    metadata,
    Column("task_id", Integer, ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True),
    Column("uri", Text, primary_key=True),
)

_ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}


def async_url(url: str) -> str:
    parsed = make_url(url)
    driver = _ASYNC_DRIVERS.get(parsed.drivername)
    return str(parsed.set(drivername=driver)) if driver else url


class SqlTaskRegistry:
    def __init__(self, url: str) -> None:
        self._engine: AsyncEngine = create_async_engine(async_url(url))
        if self._engine.dialect.name == "sqlite":
            event.listen(self._engine.sync_engine, "connect", _sqlite_pragmas)
        self._ready = False
        self._schema_lock = asyncio.Lock()

    async def _ensure_schema(self) -> None:
        if self._ready:
            return
        async with self._schema_lock:
            if not self._ready:
                async with self._engine.begin() as conn:
                    await conn.run_sync(metadata.create_all)
                self._ready = True

    async def add_tasks(self, project: str, tasks: list[dict[str, Any]]) -> list[int]:
        """Insert tasks in one transaction: all of them, or none."""
        await self._ensure_schema()
        ids: list[int] = []
        async with self._engine.begin() as conn:
            for task in tasks:
                result = await conn.execute(insert(tasks_table).values(project=project, task=task))
                task_id = result.inserted_primary_key[0]
                uris = find_gs_uris(task["data"])
                if uris:
                    await conn.execute(insert(task_uris_table), [{"task_id": task_id, "uri": uri} for uri in uris])
                ids.append(task_id)
        return ids

    async def task_access(self, task_id: int) -> TaskAccess | None:
        await self._ensure_schema()
        async with _unavailable(), self._engine.connect() as conn:
            project = (
                await conn.execute(select(tasks_table.c.project).where(tasks_table.c.id == task_id))
            ).scalar_one_or_none()
            if project is None:
                return None
            uris = (
                await conn.execute(select(task_uris_table.c.uri).where(task_uris_table.c.task_id == task_id))
            ).scalars()
            return TaskAccess(task_id, project, frozenset(uris))

    async def get_task(self, task_id: int) -> dict[str, Any] | None:
        await self._ensure_schema()
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(select(tasks_table.c.project, tasks_table.c.task).where(tasks_table.c.id == task_id))
            ).one_or_none()
        if row is None:
            return None
        return {**row.task, "id": task_id, "project": row.project}

    async def ping(self) -> None:
        """Reachable, with the schema in place (created on first use)."""
        await self._ensure_schema()
        async with self._engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def close(self) -> None:
        await self._engine.dispose()


@asynccontextmanager
async def _unavailable() -> AsyncIterator[None]:
    try:
        yield
    except (SQLAlchemyError, OSError) as exc:
        raise RegistryUnavailable(type(exc).__name__) from exc


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL and a busy timeout let several worker processes share one SQLite file."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=5000")  # first, so switching to WAL may wait too
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
