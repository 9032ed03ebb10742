"""Minting the gateway's own tokens (`gateway token`, the demo): the claims `acl.TokenVerifier` reads."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt

from .config import ConfigError, Settings


def mint_token(
    settings: Settings, sub: str, *, tasks: Any = (), projects: Any = (), ttl: int = 3600, admin: bool = False
) -> str:
    auth = settings.auth
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + ttl}
    claims["tasks"] = tasks if tasks == "*" else list(tasks)
    claims["projects"] = projects if projects == "*" else [str(p) for p in projects]
    if admin:
        claims["admin"] = True
    if auth.audience:
        claims["aud"] = auth.audience
    if auth.issuer:
        claims["iss"] = auth.issuer
    hmac = next((a for a in auth.algorithms if a.startswith("HS")), None)
    if hmac and auth.secret:
        return jwt.encode(claims, auth.secret, algorithm=hmac)
    if not auth.private_key_file:
        raise ConfigError("[auth].private_key_file: needed to sign tokens with asymmetric algorithms")
    return jwt.encode(claims, Path(auth.private_key_file).read_bytes(), algorithm=auth.algorithms[0])
