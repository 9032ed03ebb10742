"""The media viewer: `/view/tasks/{id}` shows a task's media through the gateway's resolve URLs.

A link carries the token once (`?token=`); the page answers by putting it in the media cookie
(HttpOnly, SameSite=Lax so a link from Label Studio still works) and redirecting to the bare
URL, so the token leaves the address bar and history. The page's script then asks
`/view/tasks/{id}/media` — which checks the token's access to the task like the media path
does — for the resolve URLs, and `<img>`, `<audio>`, `<video>` and PDF.js load them with the
cookie; the resolve route checks the token again on every request.

Label Studio's credentials (its session cookie on the shared front, `Token`, its JWT) open the
viewer as they open the media routes: the same `credential_from` picks them, the same
`LabelStudioAuthority` decides (and caches), and the media listed are the `gs://` URIs of the
task as Label Studio returned it.
"""

from __future__ import annotations

import posixpath
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..acl import Claims, storage_for_reference, storage_for_task, token_from
from ..config import StorageSettings
from ..errors import Refused, forbidden, unauthorized
from ..labelstudio import credential_from
from ..registry import TaskAccess
from ..state import CATALOG, LABEL_STUDIO, REGISTRY, SETTINGS, SUB, TASK, TASKS, VERIFIER
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
        if not auth.cookie and request.app[LABEL_STUDIO] is None:
            raise Refused(
                404, "viewer_disabled", "the viewer needs token cookies ([auth] cookie) or [label_studio] url"
            )
        token = request.query.get(auth.query_param) if auth.query_param and auth.cookie else None
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
    settings = request.app[SETTINGS]
    token = token_from(settings.auth, request.headers, request.cookies, request.query)
    authority = request.app[LABEL_STUDIO]
    if authority is not None:
        credential = credential_from(request.headers, request.cookies, settings.label_studio, token)
        if credential is not None:  # Label Studio decides, as on the media routes
            request[SUB] = credential.subject
            task_id = request[TASK] = int(request.match_info["task_id"])
            grant = await authority.decide(credential, "task", str(task_id))
            storages = request.app[CATALOG].storages_of(grant.project)

            def referenced(uri: GsUri) -> StorageSettings:
                return storage_for_reference(task_id, grant.uris, uri, storages)

            return await _media(request, task_id, grant.project, list(grant.fields), referenced)
    if token is None:
        raise unauthorized("missing_token", "open the viewer with ?token=… or send a token")
    claims = await request.app[VERIFIER].verify(token)
    access = await _task_access(request, claims)
    task = await request.app[REGISTRY].get_task(access.id)
    if task is None:
        raise Refused(404, "unknown_task", f"task {access.id} does not exist")
    references = [(field, uri) for field, value in task["data"].items() for uri in sorted(find_gs_uris(value))]
    storages = request.app[CATALOG].storages_of(access.project)
    return await _media(
        request, access.id, access.project, references, lambda uri: storage_for_task(claims, access, uri, storages)
    )


async def _media(
    request: web.Request,
    task_id: int,
    project: str,
    references: list[tuple[str, str]],
    storage_for: Callable[[GsUri], StorageSettings],
) -> web.Response:
    """The viewer's list: field, kind, resolve URL (and a PDF's size, read with the storage the
    media path would use for it)."""
    media: list[dict[str, Any]] = []
    for field, uri in references:
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
            item["size"] = await _size(request, parsed, storage_for)
        media.append(item)
    return web.json_response({"task": task_id, "project": project, "media": media})


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


async def _size(request: web.Request, uri: GsUri, storage_for: Callable[[GsUri], StorageSettings]) -> int | None:
    catalog = request.app[CATALOG]
    try:
        return (await catalog.backend(storage_for(uri)).stat(uri.key)).size
    except (Refused, StorageError):
        return None  # the resolve URL will answer why; the page shows it there
