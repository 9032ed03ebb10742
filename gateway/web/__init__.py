"""The gateway's own pages: the Cloud Storage settings page (`/ui/`, admins) and the media
viewer (`/view/tasks/{id}`, any token with access to the task).

Plain HTML, CSS and JavaScript modules from `static/` (PDF.js vendored under `static/pdfjs/`),
no build step and no CDN. Every answer of these routes carries a strict Content Security Policy:
scripts and styles only from this origin, no inline code, no framing.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from ..storage import storage_endpoint
from .session import session_routes
from .viewer import viewer_routes

STATIC = Path(__file__).parent / "static"
_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def add_web_routes(app: web.Application) -> None:
    app.router.add_get("/ui", _to_ui, name="web_ui_redirect")
    app.router.add_get("/ui/", page("admin.html"), name="web_ui")
    app.router.add_static("/ui/static", STATIC, name="web_static")
    session_routes(app)
    viewer_routes(app, page("viewer.html"))
    viewer_policy = _viewer_policy(storage_endpoint(dict(os.environ)))

    async def page_headers(request: web.Request, response: web.StreamResponse) -> None:
        resource = request.match_info.route.resource
        name = resource.name if resource is not None else None
        if name is None or not name.startswith("web_"):
            return
        response.headers["Content-Security-Policy"] = viewer_policy if name == "web_viewer" else _POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Cache-Control"] = "no-cache" if name == "web_static" else "no-store"

    app.on_response_prepare.append(page_headers)


def page(name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(_request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / name)

    return handler


async def _to_ui(_request: web.Request) -> web.Response:
    return web.Response(status=302, headers={"Location": "/ui/"})


def _viewer_policy(storage: str) -> str:
    """The viewer also loads media from where signed URLs point (GCS, or the emulator in tests)."""
    return (
        f"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' {storage}; "
        f"media-src 'self' {storage}; connect-src 'self' {storage}; worker-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
