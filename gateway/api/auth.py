"""Who may use the management API: admin tokens, sent in the Authorization header only."""

from __future__ import annotations

from aiohttp import web

from ..acl import Claims, token_from
from ..errors import forbidden, unauthorized
from ..state import SETTINGS, SUB, VERIFIER


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
