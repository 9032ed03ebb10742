"""The registry: tasks and the gs:// URIs each one references, source storages created through
the API, the objects each storage imported, and sync jobs.

`SqlTaskRegistry` implements it on SQLAlchemy, so one code path serves SQLite (the default) and
PostgreSQL (several replicas and workers); `TaskRegistry` is the small part the media path needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .sql import SqlTaskRegistry


@dataclass(frozen=True, slots=True)
class TaskAccess:
    """What the access check needs of a task: its project, the URIs it references, and the
    storage whose sync imported it (None for tasks imported by file or API)."""

    id: int
    project: str
    uris: frozenset[str]
    storage_id: str | None = None


@dataclass(frozen=True, slots=True)
class ImportedObject:
    """An object a sync imported: its generation then (None while unfinished), its task count,
    and for a task file the rows it could not import."""

    key: str
    generation: str | None
    task_count: int
    row_errors: int = 0


class TaskRegistry(Protocol):
    async def add_tasks(self, project: str, tasks: list[dict[str, Any]]) -> list[int]: ...

    async def task_access(self, task_id: int) -> TaskAccess | None: ...

    async def get_task(self, task_id: int) -> dict[str, Any] | None: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class RegistryUnavailable(Exception):
    """The registry's database cannot be reached (answered as 503)."""


class BadTask(ValueError):
    """A task that is not Label Studio task JSON; the message names the task's position."""


def normalize_task(task: Any, position: int) -> dict[str, Any]:
    """Label Studio's rule: a dict with a `data` object is a task, any other dict is its data."""
    if not isinstance(task, dict):
        raise BadTask(f"task #{position}: expected a JSON object, got {type(task).__name__}")
    if "data" in task:
        if not isinstance(task["data"], dict):
            raise BadTask(f"task #{position}: 'data' must be a JSON object")
        return task
    if not task:
        raise BadTask(f"task #{position}: empty task")
    return {"data": task}


def open_registry(url: str, *, create: bool = True) -> SqlTaskRegistry:
    from .sql import SqlTaskRegistry

    return SqlTaskRegistry(url, create=create)
