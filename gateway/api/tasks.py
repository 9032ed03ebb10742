"""Task endpoints: Label Studio task JSON in, task ids out; all or nothing per request."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from ..acl import Claims, token_from
from ..errors import Refused, forbidden, unauthorized
from ..registry import BadTask, normalize_task
from ..state import REGISTRY, SETTINGS, SUB, VERIFIER


async def require_admin(request: web.Request) -> Claims:
    """Admin tokens come only in the Authorization header: never cookies (CSRF) or URLs (logs)."""
    token = token_from(request.app[SETTINGS].auth, request.headers, {}, {})
    if token is None:
        raise unauthorized("missing_token", "the management API needs an admin bearer token")
    claims = await request.app[VERIFIER].verify(token)
    request[SUB] = claims.sub
    if not claims.admin:
        raise forbidden("not_admin", 'the management API needs a token with "admin": true')
    return claims


async def import_tasks(request: web.Request) -> web.Response:
    await require_admin(request)
    project = request.match_info["project_id"]
    if not request.app[SETTINGS].storages_of(project):
        raise Refused(404, "unknown_project", f"project {project} has no configured storage")
    body = await request.read()
    try:
        # Large imports are parsed off the event loop so streams on this worker keep flowing.
        payload = json.loads(body) if len(body) < 1024**2 else await asyncio.to_thread(json.loads, body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Refused(400, "bad_json", "the body is not valid JSON") from None
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
    return web.json_response(task)
