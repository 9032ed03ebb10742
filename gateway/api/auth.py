"""Who may use the management API: admin tokens in the Authorization header, or the settings
page's session cookie together with its CSRF header.

The header path is what scripts use and needs no CSRF defence (a browser never adds it on its
own). The cookie (set by `POST /ui/session`, HttpOnly, SameSite=Strict) holds the admin token
itself; a state-changing call with it must also carry `X-CSRF-Token` — an HMAC keyed with the
token, which the page gets from `GET /ui/session` and another site can neither read nor compute —
and an `Origin` naming this host. Query strings never carry an admin token (logs, Referer).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from urllib.parse import urlsplit

from aiohttp import web

from ..acl import Claims, token_from
from ..errors import forbidden, unauthorized
from ..state import SETTINGS, SUB, VERIFIER

SESSION_COOKIE = "gateway_admin_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def csrf_token(session_token: str) -> str:
    """The CSRF value bound to one session: the same on every replica, no server state."""
    digest = hmac.new(session_token.encode(), b"gateway-csrf-v1", hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def check_same_origin(request: web.Request) -> None:
    """A cookie-authenticated write must come from a page of this host (browsers always send
    `Origin` on non-GET fetches; its absence means a client we do not know)."""
    origin = request.headers.get("Origin")
    if not origin or urlsplit(origin).netloc.lower() != request.host.lower():
        raise forbidden("cross_origin", "this call must come from the gateway's own pages (Origin mismatch)")


def check_csrf(request: web.Request, session_token: str) -> None:
    check_same_origin(request)
    sent = request.headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(sent.encode(), csrf_token(session_token).encode()):
        raise forbidden("csrf_failed", f"a session call that changes something needs the {CSRF_HEADER} header")


async def require_admin(request: web.Request) -> Claims:
    """The admin's claims, from the Authorization header or the session cookie (+ CSRF on writes)."""
    token = token_from(request.app[SETTINGS].auth, request.headers, {}, {})
    if token is None:
        token = request.cookies.get(SESSION_COOKIE)
        if token is None:
            raise unauthorized("missing_token", "the management API needs an admin bearer token")
        if request.method not in SAFE_METHODS:
            check_csrf(request, token)
    claims = await request.app[VERIFIER].verify(token)
    request[SUB] = claims.sub
    if not claims.admin:
        raise forbidden("not_admin", 'the management API needs a token with "admin": true')
    return claims
