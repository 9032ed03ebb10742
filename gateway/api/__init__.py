"""The management API (admin tokens only): task import and lookup."""

from __future__ import annotations

from aiohttp import web

from .tasks import get_task, import_tasks


def add_api_routes(app: web.Application) -> None:
    app.router.add_post("/api/projects/{project_id}/import", import_tasks, name="api_import")
    app.router.add_get(r"/api/tasks/{task_id:\d{1,18}}", get_task, name="api_task")
