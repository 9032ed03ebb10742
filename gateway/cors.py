"""CORS for the media routes: answer preflights, and let pages read range and cache headers.

Configured origins are echoed back (with credentials, so cookie tokens work); `*` allows any
origin without credentials. Requests from other origins get no CORS headers at all.
`CorsPolicy.fields` is the one rule: both lanes put its fields on every media answer.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web

from .config import CorsSettings
from .media.answers import error_answer

ALLOW_METHODS = "GET, HEAD, OPTIONS"
ALLOW_HEADERS = (
    "Authorization, Range, If-Range, If-None-Match, If-Modified-Since, If-Match, If-Unmodified-Since, X-Request-ID"
)
EXPOSE_HEADERS = "Content-Range, Content-Length, Accept-Ranges, ETag, Last-Modified, Content-Disposition, X-Request-ID"


class CorsPolicy:
    def __init__(self, cors: CorsSettings) -> None:
        self.enabled = bool(cors.origins)
        self._any = "*" in cors.origins
        self._origins = frozenset(cors.origins)

    def allowed(self, origin: str | None) -> str | None:
        """The value of Access-Control-Allow-Origin for this Origin, or None."""
        if origin is None:
            return None
        if origin in self._origins:
            return origin
        return "*" if self._any else None

    def fields(self, origin: str | None) -> dict[str, str] | None:
        """The CORS fields of a media answer (None when CORS is off)."""
        if not self.enabled:
            return None
        # Always Vary: a response cached for a plain <video> fetch must not be reused for a CORS fetch.
        fields = {"Vary": "Origin"}
        allowed = self.allowed(origin)
        if allowed is not None:
            fields.update(_credentials(allowed))
            fields["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        return fields


def _credentials(origin: str) -> dict[str, str]:
    headers = {"Access-Control-Allow-Origin": origin}
    if origin != "*":
        headers["Access-Control-Allow-Credentials"] = "true"
    return headers


def add_cors(app: web.Application, cors: CorsSettings, route_names: Iterable[str]) -> None:
    """Preflights on the media routes, and the CORS fields on answers aiohttp makes there without
    the media handler (a 405, a 500)."""
    policy = CorsPolicy(cors)
    if not policy.enabled:
        return
    names = frozenset(route_names)

    async def preflight(request: web.Request) -> web.Response:
        origin = policy.allowed(request.headers.get("Origin"))
        method = request.headers.get("Access-Control-Request-Method", "")
        if origin is None or method not in ("GET", "HEAD"):
            refused = error_answer(403, "cors_refused", "origin or method not allowed")
            return web.Response(status=refused.status, body=refused.body, headers=refused.headers)
        headers = _credentials(origin) | {
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
        response.headers.update(policy.fields(request.headers.get("Origin")) or {})

    for name in names:
        app.router[name].add_route("OPTIONS", preflight)
    app.on_response_prepare.append(on_prepare)
