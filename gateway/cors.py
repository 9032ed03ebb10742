"""CORS for the media routes: answer preflights, and let pages read range and cache headers.

Configured origins are echoed back (with credentials, so cookie tokens work); `*` allows any
origin without credentials. Requests from other origins get no CORS headers at all.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web

from .config import CorsSettings

ALLOW_METHODS = "GET, HEAD, OPTIONS"
ALLOW_HEADERS = (
    "Authorization, Range, If-Range, If-None-Match, If-Modified-Since, If-Match, If-Unmodified-Since, X-Request-ID"
)
EXPOSE_HEADERS = "Content-Range, Content-Length, Accept-Ranges, ETag, Last-Modified, Content-Disposition, X-Request-ID"


def add_cors(app: web.Application, cors: CorsSettings, route_names: Iterable[str]) -> None:
    if not cors.origins:
        return
    names = frozenset(route_names)
    allow_any = "*" in cors.origins
    origins = frozenset(cors.origins)

    def allowed(origin: str | None) -> str | None:
        if origin is None:
            return None
        if origin in origins:
            return origin
        return "*" if allow_any else None

    def base_headers(origin: str) -> dict[str, str]:
        headers = {"Access-Control-Allow-Origin": origin}
        if origin != "*":
            headers["Access-Control-Allow-Credentials"] = "true"
        return headers

    async def preflight(request: web.Request) -> web.Response:
        origin = allowed(request.headers.get("Origin"))
        method = request.headers.get("Access-Control-Request-Method", "")
        if origin is None or method not in ("GET", "HEAD"):
            return web.json_response({"error": "cors_refused", "message": "origin or method not allowed"}, status=403)
        headers = base_headers(origin) | {
            "Vary": "Origin",
            "Access-Control-Allow-Methods": ALLOW_METHODS,
            "Access-Control-Allow-Headers": ALLOW_HEADERS,
            "Access-Control-Max-Age": str(cors.max_age),
        }
        return web.Response(status=204, headers=headers)

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        resource = request.match_info.route.resource
        if resource is None or resource.name not in names or request.method == "OPTIONS":
            return
        # Always: a response cached for a plain <video> fetch must not be reused for a CORS fetch.
        response.headers["Vary"] = "Origin"
        origin = allowed(request.headers.get("Origin"))
        if origin is not None:
            response.headers.update(base_headers(origin))
            response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS

    for name in names:
        app.router[name].add_route("OPTIONS", preflight)
    app.on_response_prepare.append(on_prepare)
