"""Sign-in to the settings page: an admin token exchanged for an HttpOnly session cookie.

The cookie holds the token itself (so every replica accepts it without shared state), is
HttpOnly (the page's scripts never see it), Secure on HTTPS, SameSite=Strict (the settings
page is never entered through a link from another site, so nothing is lost by refusing the
cookie to every cross-site request), and expires with the token. The page learns only the
subject, the expiry and the CSRF value it must echo on writes (gateway/api/auth.py).
"""

from __future__ import annotations

import time

from aiohttp import web

from .. import strictjson
from ..acl import Claims
from ..api.auth import SESSION_COOKIE, check_csrf, check_same_origin, csrf_token
from ..api.body import SIGN_IN_BYTES, read_body
from ..errors import Refused, forbidden, unauthorized
from ..state import SUB, VERIFIER


def session_routes(app: web.Application) -> None:
    app.router.add_post("/ui/session", sign_in, name="web_sign_in")
    app.router.add_get("/ui/session", current_session, name="web_session")
    app.router.add_delete("/ui/session", sign_out, name="web_sign_out")


async def sign_in(request: web.Request) -> web.Response:
    check_same_origin(request)  # no login CSRF: another site cannot sign a browser in
    try:
        body = strictjson.loads(await read_body(request, SIGN_IN_BYTES))
    except strictjson.BadJson:
        body = None
    token = body.get("token") if isinstance(body, dict) else None
    if not isinstance(token, str) or not token.strip():
        raise Refused(
            400,
            "validation_error",
            "token: paste an admin token",
            {"validation_errors": {"token": ["paste an admin token (gateway token --admin)"]}},
        )
    token = token.strip()
    claims = await _admin(request, token)
    response = web.json_response(_session(claims, token))
    set_token_cookie(request, response, SESSION_COOKIE, token, claims, "Strict")
    return response


async def current_session(request: web.Request) -> web.Response:
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        raise unauthorized("no_session", "not signed in")
    return web.json_response(_session(await _admin(request, token), token))


async def sign_out(request: web.Request) -> web.Response:
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        check_csrf(request, token)
    else:
        check_same_origin(request)
    response = web.Response(status=204)
    response.del_cookie(SESSION_COOKIE, path="/", secure=is_https(request), httponly=True, samesite="Strict")
    return response


def is_https(request: web.Request) -> bool:
    """HTTPS here or at a TLS-terminating proxy in front (trusting the header can only make a
    cookie stricter: a forged one merely keeps it off plain HTTP)."""
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return request.secure or forwarded == "https"


def set_token_cookie(
    request: web.Request, response: web.StreamResponse, name: str, token: str, claims: Claims, samesite: str
) -> None:
    """A token in an HttpOnly cookie (scripts never read it) that expires with the token."""
    response.set_cookie(
        name,
        token,
        max_age=max(0, int(claims.exp - time.time())),
        path="/",
        httponly=True,
        secure=is_https(request),
        samesite=samesite,
    )


async def _admin(request: web.Request, token: str) -> Claims:
    claims = await request.app[VERIFIER].verify(token)
    request[SUB] = claims.sub
    if not claims.admin:
        raise forbidden("not_admin", 'the settings page needs a token with "admin": true (gateway token --admin)')
    return claims


def _session(claims: Claims, token: str) -> dict[str, object]:
    return {"sub": claims.sub, "expires_at": int(claims.exp), "csrf": csrf_token(token)}
