"""The media viewer: `/view/tasks/{id}` shows a task's media through the gateway's resolve URLs.

A link carries the token once (`?token=`); the page answers by putting it in the media cookie
(HttpOnly, SameSite=Lax so a link from Label Studio still works) and redirecting to the bare
URL, so the token leaves the address bar and history. The page's script then asks
`/view/tasks/{id}/media` — which checks the token's access to the task like the media path
does — for the resolve URLs, and `<img>`, `<audio>`, `<video>` and PDF.js load them with the
cookie; the resolve route checks the token again on every request.
"""

from __future__ import annotations

import posixpath
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..acl import Claims, storage_for_task, token_from
from ..errors import Refused, forbidden, unauthorized
from ..registry import TaskAccess
from ..state import CATALOG, REGISTRY, SETTINGS, SUB, TASK, TASKS, VERIFIER
from ..storage import StorageError
from ..uris import BadFileUri, GsUri, encode_fileuri, find_gs_uris, parse_gs_uri
from .session import set_token_cookie

KINDS = {
    "image": {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".avif"},
    "audio": {".mp3", ".wav", ".ogg", ".oga", ".flac", ".m4a", ".aac", ".opus"},
    "video": {".mp4", ".m4v", ".webm", ".ogv", ".mov"},
    "pdf": {".pdf"},
}


def viewer_routes(app: web.Application, page: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> None:
    async def view(request: web.Request) -> web.StreamResponse:
        auth = request.app[SETTINGS].auth
        if not auth.cookie:
            raise Refused(404, "viewer_disabled", "the viewer needs token cookies ([auth] cookie) enabled")
        token = request.query.get(auth.query_param) if auth.query_param else None
        if not token:
            return await page(request)
        # Only a token for this task becomes the cookie: a link cannot swap in any token at all.
        claims = await request.app[VERIFIER].verify(token)
        await _task_access(request, claims)
        response = web.Response(status=303, headers={"Location": request.path})
        set_token_cookie(request, response, auth.cookie, token, claims, "Lax")
        return response

    task = r"/view/tasks/{task_id:\d{1,18}}"
    app.router.add_get(task, view, name="web_viewer")
    app.router.add_get(task + "/media", task_media, name="web_viewer_media")


async def task_media(request: web.Request) -> web.Response:
    """The task's media as the viewer shows them: field, kind, resolve URL (and a PDF's size)."""
    auth = request.app[SETTINGS].auth
    token = token_from(auth, request.headers, request.cookies, request.query)
    if token is None:
        raise unauthorized("missing_token", "open the viewer with ?token=… or send a token")
    claims = await request.app[VERIFIER].verify(token)
    access = await _task_access(request, claims)
    task_id = access.id
    task = await request.app[REGISTRY].get_task(task_id)
    if task is None:
        raise Refused(404, "unknown_task", f"task {task_id} does not exist")
    media: list[dict[str, Any]] = []
    for field, value in task["data"].items():
        for uri in sorted(find_gs_uris(value)):
            try:
                parsed = parse_gs_uri(uri)
            except BadFileUri:
                continue  # the media path would refuse it too
            kind = media_kind(parsed.key)
            item: dict[str, Any] = {
                "field": field,
                "name": posixpath.basename(parsed.key),
                "kind": kind,
                "url": f"/tasks/{task_id}/resolve/?fileuri={encode_fileuri(uri)}",
            }
            if kind == "pdf":  # PDF.js loads by ranges and must know the length up front
                item["size"] = await _size(request, claims, access, parsed)
            media.append(item)
    return web.json_response({"task": task_id, "project": access.project, "media": media})


async def _task_access(request: web.Request, claims: Claims) -> TaskAccess:
    """The task of the path, if the token grants it (the media path's decision)."""
    request[SUB] = claims.sub
    task_id = request[TASK] = int(request.match_info["task_id"])
    access = await request.app[TASKS].get(task_id)
    if access is None:
        raise Refused(404, "unknown_task", f"task {task_id} does not exist")
    if not claims.grants_task(access.id, access.project):
        raise forbidden("no_grant", f"the token does not grant task {task_id}")
    return access


def media_kind(key: str) -> str:
    extension = posixpath.splitext(key)[1].lower()
    return next((kind for kind, extensions in KINDS.items() if extension in extensions), "other")


async def _size(request: web.Request, claims: Claims, access: TaskAccess, uri: GsUri) -> int | None:
    catalog = request.app[CATALOG]
    try:
        storage = storage_for_task(claims, access, uri, catalog.storages_of(access.project))
        return (await catalog.backend(storage).stat(uri.key)).size
    except (Refused, StorageError):
        return None  # the resolve URL will answer why; the page shows it there
