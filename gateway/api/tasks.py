"""Task endpoints: import (all or nothing per request), lookup, and a project's task list.

With `?resolve=true` every gs:// URI in a task's data becomes the gateway's own resolve URL,
as Label Studio's API answers, so a front end can use the data as it is.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..errors import Refused
from ..media.explain import explain
from ..netguard import parse_node
from ..registry import BadTask, normalize_task
from ..state import CATALOG, GUARD, REGISTRY
from ..uris import BadFileUri, encode_fileuri, parse_gs_uri, resolve_uris
from .auth import require_admin
from .body import TASK_IMPORT_BYTES, json_body

MAX_PAGE_SIZE = 1000
MAX_PAGE = 999_999_999


async def import_tasks(request: web.Request) -> web.Response:
    await require_admin(request)
    project = request.match_info["project_id"]
    await request.app[CATALOG].refresh()  # a storage created through another replica counts at once
    if not request.app[CATALOG].storages_of(project):
        raise Refused(404, "unknown_project", f"project {project} has no storage")
    payload = await json_body(request, TASK_IMPORT_BYTES)
    items = payload if isinstance(payload, list) else [payload]
    try:
        tasks = [normalize_task(item, position) for position, item in enumerate(items, start=1)]
    except BadTask as exc:
        raise Refused(400, "bad_task", str(exc)) from None
    task_ids = await request.app[REGISTRY].add_tasks(project, tasks)
    return web.json_response({"task_ids": task_ids, "task_count": len(task_ids)}, status=201)


async def get_task(request: web.Request) -> web.Response:
    await require_admin(request)
    task = await request.app[REGISTRY].get_task(int(request.match_info["task_id"]))
    if task is None:
        raise Refused(404, "unknown_task", "no such task")
    return web.json_response(_resolved(task) if _flag(request, "resolve") else task)


async def task_access(request: web.Request) -> web.Response:
    """`?uri=gs://…` (one object, else every one the task references) and `?client=<address>`: which
    storage serves each object, how, and whether that client would be let in (gateway/media/explain.py)."""
    await require_admin(request)
    task_id = int(request.match_info["task_id"])
    task = await request.app[REGISTRY].task_access(task_id)
    if task is None:
        raise Refused(404, "unknown_task", f"task {task_id} does not exist")
    uri = request.query.get("uri")
    if uri is not None:
        try:
            parse_gs_uri(uri)
        except BadFileUri as exc:
            raise Refused(400, "bad_parameter", f"uri: {exc}") from None
    extra: dict[str, Any] = {}
    if "client" in request.query:
        client = parse_node(request.query["client"])
        if client is None:
            raise Refused(400, "bad_parameter", "client: expected an IPv4 or IPv6 address")
        extra["client"] = client
    catalog = request.app[CATALOG]
    await catalog.refresh()  # a storage created through another replica counts at once
    explained = explain(
        task,
        catalog.storages_of(task.project),
        request.app[GUARD],
        catalog.signers,
        catalog.problems,
        [uri] if uri is not None else None,
        **extra,
    )
    return web.json_response(explained)


async def list_tasks(request: web.Request) -> web.Response:
    """`?page=1&page_size=100&storage=<id>&key=<object key>&resolve=true`; `total` counts all matches."""
    await require_admin(request)
    project = request.match_info["project_id"]
    for name, value in (
        ("project", project),
        ("storage", request.query.get("storage")),
        ("key", request.query.get("key")),
    ):
        if value is not None and "\x00" in value:  # no stored value holds NUL; PostgreSQL refuses to compare with one
            raise Refused(400, "bad_parameter", f"{name}: must not contain NUL characters")
    page = _positive(request, "page", 1)
    page_size = _positive(request, "page_size", 100)
    if page_size > MAX_PAGE_SIZE:
        raise Refused(400, "bad_parameter", f"page_size: at most {MAX_PAGE_SIZE}")
    total, tasks = await request.app[REGISTRY].list_tasks(
        project,
        storage_id=request.query.get("storage"),
        object_key=request.query.get("key"),
        offset=(page - 1) * page_size,
        limit=page_size,
    )
    if _flag(request, "resolve"):
        tasks = [_resolved(task) for task in tasks]
    return web.json_response(
        {"total": total, "page": page, "page_size": page_size, "has_next": page * page_size < total, "tasks": tasks}
    )


def _resolved(task: dict[str, Any]) -> dict[str, Any]:
    prefix = f"/tasks/{task['id']}/resolve/?fileuri="
    return {**task, "data": resolve_uris(task["data"], lambda uri: prefix + encode_fileuri(uri))}


_FLAGS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _flag(request: web.Request, name: str) -> bool:
    """A documented boolean value, or absent (false); anything else is a 400 rather than a guess."""
    value = request.query.get(name)
    if value is None:
        return False
    if value not in _FLAGS:
        raise Refused(400, "bad_parameter", f"{name}: expected true or false")
    return _FLAGS[value]


def _positive(request: web.Request, name: str, default: int) -> int:
    value = request.query.get(name)
    if value is None:
        return default
    # ASCII digits only ("²".isdigit() is true), and bounded: the offset must fit a 64-bit integer.
    if not (value.isascii() and value.isdigit() and len(value) <= 9) or int(value) < 1:
        raise Refused(400, "bad_parameter", f"{name}: expected an integer from 1 to {MAX_PAGE}")
    return int(value)
