"""Annotation events in: Label Studio webhooks and a native API, recorded in the export outbox.

An answer means the event is committed to the registry (the export worker delivers it later), so
Label Studio's 1 s webhook timeout is never spent waiting for GCS.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from aiohttp import web

from .. import metrics
from ..errors import Refused
from ..state import EXPORT_WORKER, RECORDER, REGISTRY, SETTINGS
from .auth import require_admin
from .body import ANNOTATION_BYTES, json_body, parse_json, read_body

CREATE_OR_UPDATE = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED"})
DELETE = "ANNOTATIONS_DELETED"


def add_annotation_routes(app: web.Application) -> None:
    app.router.add_post("/api/webhooks/label-studio", label_studio_webhook, name="api_webhook_label_studio")
    path = r"/api/tasks/{task_id:\d{1,18}}/annotations/{annotation_id:\d{1,18}}"
    app.router.add_put(path, put_annotation, name="api_annotation_put")
    app.router.add_delete(path, delete_annotation, name="api_annotation_delete")


async def _authentic_body(request: web.Request) -> bytes:
    """The body of an authentic webhook (else 401). The shared secret is checked before the body
    is read; an HMAC signature can only be checked after (the body is still bounded in size)."""
    hooks = request.app[SETTINGS].webhooks
    if not (hooks.secret or hooks.hmac_secret):
        raise Refused(503, "webhooks_disabled", "set [webhooks] secret or hmac_secret to accept webhooks")
    if hooks.secret:
        sent = request.headers.get(hooks.header, "")
        if sent and hmac.compare_digest(sent.encode(), hooks.secret.encode()):
            return await read_body(request, ANNOTATION_BYTES)
    if hooks.hmac_secret:
        sent = request.headers.get(hooks.signature_header, "").removeprefix("sha256=")
        if sent:
            body = await read_body(request, ANNOTATION_BYTES)
            expected = hmac.new(hooks.hmac_secret.encode(), body, hashlib.sha256).hexdigest()
            if hmac.compare_digest(sent.lower().encode(), expected.encode()):
                return body
    raise Refused(401, "bad_webhook_secret", "the webhook secret or signature is missing or wrong")


def _project(request: web.Request, payload: dict[str, Any]) -> str:
    project = payload.get("project")
    ident = project.get("id") if isinstance(project, dict) else project
    if not isinstance(ident, int | str) or isinstance(ident, bool) or str(ident) == "":
        raise Refused(400, "bad_payload", "project.id: expected the Label Studio project id")
    mapping = dict(entry.split("=", 1) for entry in request.app[SETTINGS].webhooks.project_map)
    return mapping.get(str(ident), str(ident))


def _ident(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**63:
        raise Refused(400, "bad_payload", f"{where}: expected a positive integer id")
    return value


def _listed(value: Any, where: str) -> list[dict[str, Any]]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(item, dict) for item in items):
        raise Refused(400, "bad_payload", f"{where}: expected an object or a list of objects")
    return items


async def _record(request: web.Request, project: str, events: list[tuple[int, int | None, Any]]) -> list[int]:
    targets = [t.id for t in request.app[SETTINGS].export_storages if t.project == project]
    versions = await request.app[RECORDER].record(project, events, targets)  # + API targets, group-committed
    worker = request.app[EXPORT_WORKER]
    if worker is not None:
        worker.wake()
    return versions


async def label_studio_webhook(request: web.Request) -> web.Response:
    payload = await parse_json(await _authentic_body(request))
    if not isinstance(payload, dict) or not isinstance(payload.get("action"), str):
        raise Refused(400, "bad_payload", "action: expected a Label Studio webhook payload with an action")
    action = payload["action"]
    metrics.WEBHOOK_EVENTS.labels("label_studio", action if action in CREATE_OR_UPDATE | {DELETE} else "other").inc()
    if action not in CREATE_OR_UPDATE and action != DELETE:
        return web.json_response({"status": "ignored", "action": action})
    project = _project(request, payload)
    if action == DELETE:
        annotations = _listed(payload.get("annotations", payload.get("annotation")), "annotations")
        events = [(_ident(a.get("id"), f"annotations[{n}].id"), None, None) for n, a in enumerate(annotations)]
    else:
        annotations = _listed(payload.get("annotation", payload.get("annotations")), "annotation")
        tasks = {t.get("id"): t for t in _listed(payload["task"], "task")} if payload.get("task") else {}
        events = []
        for n, annotation in enumerate(annotations):
            ident = _ident(annotation.get("id"), f"annotation[{n}].id")
            task_ref = annotation.get("task")
            task_id = task_ref.get("id") if isinstance(task_ref, dict) else task_ref
            if task_id is not None:
                task_id = _ident(task_id, f"annotation[{n}].task")
            task = tasks.get(task_id) or (next(iter(tasks.values())) if len(tasks) == 1 else None)
            if task is None and isinstance(task_ref, dict):
                task = task_ref
            events.append((ident, task_id, _object(annotation, task)))
    versions = await _record(request, project, events)
    return web.json_response({"status": "recorded", "action": action, "count": len(events), "versions": versions})


def _object(annotation: dict[str, Any], task: dict[str, Any] | None) -> dict[str, Any]:
    """What Label Studio's target storage writes: the annotation with its task (raw gs:// data)."""
    return {**annotation, "task": task if task is not None else annotation.get("task")}


async def _annotated_task(request: web.Request) -> tuple[int, int, dict[str, Any]]:
    """The native routes' task id, annotation id and task (admin only; 404 for an unknown task)."""
    await require_admin(request)
    task_id, annotation_id = int(request.match_info["task_id"]), int(request.match_info["annotation_id"])
    task = await request.app[REGISTRY].get_task(task_id)
    if task is None:
        raise Refused(404, "unknown_task", "no such task")
    return task_id, annotation_id, task


async def _recorded(
    request: web.Request, task_id: int, annotation_id: int, project: str, body: dict[str, Any] | None
) -> web.Response:
    [version] = await _record(request, project, [(annotation_id, task_id, body)])
    return web.json_response({"id": annotation_id, "task": task_id, "version": version, "status": "recorded"})


async def put_annotation(request: web.Request) -> web.Response:
    task_id, annotation_id, task = await _annotated_task(request)
    annotation = await json_body(request, ANNOTATION_BYTES)
    if not isinstance(annotation, dict):
        raise Refused(400, "bad_payload", "the body must be an annotation object")
    exported_task = {k: v for k, v in task.items() if k not in ("storage",)}
    body = _object({**annotation, "id": annotation_id, "task": task_id}, exported_task)
    return await _recorded(request, task_id, annotation_id, task["project"], body)


async def delete_annotation(request: web.Request) -> web.Response:
    task_id, annotation_id, task = await _annotated_task(request)
    return await _recorded(request, task_id, annotation_id, task["project"], None)
