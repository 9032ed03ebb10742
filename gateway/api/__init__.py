"""The management API (admin tokens only): tasks, source and target storages, annotations, OpenAPI."""

from __future__ import annotations

from aiohttp import web

from .annotations import add_annotation_routes
from .export_storages import add_export_storage_routes
from .openapi import openapi
from .storages import add_storage_routes
from .tasks import get_task, import_tasks, list_tasks, task_access


def add_api_routes(app: web.Application) -> None:
    app.router.add_post("/api/projects/{project_id}/import", import_tasks, name="api_import")
    app.router.add_get("/api/projects/{project_id}/tasks", list_tasks, name="api_tasks")
    app.router.add_get(r"/api/tasks/{task_id:\d{1,18}}", get_task, name="api_task")
    app.router.add_get(r"/api/tasks/{task_id:\d{1,18}}/access", task_access, name="api_task_access")
    add_storage_routes(app)
    add_export_storage_routes(app)
    add_annotation_routes(app)
    app.router.add_get("/api/openapi.json", openapi, name="api_openapi")
