"""Who may fetch what: JWT verification (cached until expiry) and the task-level decision.

A token is verified once and its claims kept until it expires, so the steady state costs a
dictionary lookup. Keys are chosen by algorithm family — HS* only ever with the shared
secret, asymmetric algorithms only with the public key or JWKS — which rules out algorithm
confusion; `none` is never accepted.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from .caching import ExpiringCache
from .config import AuthSettings, RegistrySettings, StorageSettings
from .errors import Refused, forbidden, unauthorized
from .registry import TaskAccess, TaskRegistry
from .uris import GsUri

ANY = "*"


@dataclass(frozen=True, slots=True)
class Claims:
    sub: str
    exp: float
    nbf: float | None
    tasks: frozenset[int] | str  # ids, or ANY
    projects: frozenset[str] | str
    admin: bool

    def grants_project(self, project: str) -> bool:
        return self.projects == ANY or project in self.projects

    def grants_task(self, task_id: int, project: str) -> bool:
        return self.tasks == ANY or task_id in self.tasks or self.grants_project(project)

    def may_grant_task(self, task_id: int) -> bool:
        """False when no project of the task could matter: refuse without a registry lookup."""
        return self.tasks == ANY or task_id in self.tasks or bool(self.projects)


class TokenVerifier:
    def __init__(self, auth: AuthSettings) -> None:
        self._auth = auth
        self._algorithms = frozenset(auth.algorithms)
        self._public_key = Path(auth.public_key_file).read_bytes() if auth.public_key_file else None
        self._jwks = (
            jwt.PyJWKClient(auth.jwks_url, lifespan=300, timeout=10, cooldown_duration=auth.jwks_cooldown)
            if auth.jwks_url
            else None
        )
        # Claims carry their own expiry (checked on every use); the TTL only bounds how long a
        # verified token stays without re-verification, e.g. across a JWKS key rotation.
        self._cache: ExpiringCache[str, Claims] = ExpiringCache(auth.token_cache_size, ttl=300)

    async def verify(self, token: str) -> Claims:
        claims = self._cache.get(token)
        if claims is None:
            claims = await self._decode(token)
            self._cache[token] = claims
        now, leeway = time.time(), self._auth.leeway
        if now > claims.exp + leeway:
            self._cache.pop(token)
            raise unauthorized("expired_token", "the token has expired")
        if claims.nbf is not None and now + leeway < claims.nbf:
            raise unauthorized("token_not_yet_valid", "the token is not valid yet")
        return claims

    def cached(self, token: str) -> Claims | None:
        """The claims of a token verified before and valid now; None for anything `verify` would
        have to decode or refuse."""
        claims = self._cache.get(token)
        if claims is None:
            return None
        now, leeway = time.time(), self._auth.leeway
        if now > claims.exp + leeway or (claims.nbf is not None and now + leeway < claims.nbf):
            return None
        return claims

    async def _decode(self, token: str) -> Claims:
        try:
            alg = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError:
            raise unauthorized("invalid_token", "the token is not a well-formed JWT") from None
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise unauthorized("invalid_token", "the token's algorithm is not accepted")
        key: Any
        if alg.startswith("HS"):
            key = self._auth.secret
        elif self._jwks is not None:
            try:
                key = (await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)).key
            except jwt.PyJWKClientConnectionError:
                raise Refused(503, "jwks_unavailable", "the token issuer's key set cannot be fetched") from None
            except jwt.PyJWTError:
                raise unauthorized("invalid_token", "no JWKS key matches the token's kid") from None
        else:
            key = self._public_key
        auth = self._auth
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=auth.audience,
                issuer=auth.issuer,
                leeway=auth.leeway,
                options={"require": ["exp", "sub"], "verify_aud": auth.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise unauthorized("expired_token", "the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise unauthorized("token_not_yet_valid", "the token is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise unauthorized("invalid_audience", "the token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise unauthorized("invalid_issuer", "the token comes from another issuer") from None
        except jwt.MissingRequiredClaimError:
            raise unauthorized("invalid_token", "the token lacks a required claim (sub, exp)") from None
        except (jwt.PyJWTError, ValueError, TypeError, OverflowError):  # OverflowError: an exp of 1e400
            raise unauthorized("invalid_token", "the token's signature does not verify") from None
        claims = _claims(payload)
        # Checked once, when the token is decoded: time only brings a token's exp closer.
        if claims.exp - time.time() > auth.max_token_lifetime + auth.leeway:
            raise unauthorized(
                "token_lifetime_exceeded",
                f"the token expires more than {auth.max_token_lifetime:g} seconds from now ([auth].max_token_lifetime)",
            )
        return claims


def _claims(payload: dict[str, Any]) -> Claims:
    """Strict claim types: `tasks` is "*" or a list of integer ids, `projects` "*" or a list of
    string or integer ids. Anything else (a bare "19" would otherwise read as tasks 1 and 9)
    makes the token invalid."""
    tasks, projects = payload.get("tasks", []), payload.get("projects", [])
    exp, nbf = payload["exp"], payload.get("nbf")
    if not (
        (tasks == ANY or (isinstance(tasks, list) and all(_is_int(t) for t in tasks)))
        and (
            projects == ANY or (isinstance(projects, list) and all(_is_int(p) or isinstance(p, str) for p in projects))
        )
        and isinstance(payload["sub"], str | int)
        and _is_number(exp)
        and (nbf is None or _is_number(nbf))
    ):
        raise unauthorized("invalid_token", "the token's claims have the wrong types")
    return Claims(
        sub=str(payload["sub"]),
        exp=float(exp),
        nbf=None if nbf is None else float(nbf),
        tasks=ANY if tasks == ANY else frozenset(tasks),
        projects=ANY if projects == ANY else frozenset(str(p) for p in projects),
        admin=payload.get("admin") is True,
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite JSON number: JSON integers have no limit, and 10**400 has no float."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def token_from(auth: AuthSettings, headers: Any, cookies: Any, query: Any) -> str | None:
    """The bearer token from the enabled sources: header, then cookie, then query parameter."""
    if auth.header:
        value = headers.get("Authorization")
        if value:
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    if auth.cookie:
        token = cookies.get(auth.cookie)
        if token:
            return token
    if auth.query_param:
        token = query.get(auth.query_param)
        if token:
            return token
    return None


class TaskCache:
    """Task lookups kept for `task_cache_ttl`; misses are never cached, so new tasks show at once.

    Concurrent lookups of one task share a single registry query (a cold start under load would
    otherwise send one query per waiting request).
    """

    def __init__(self, registry: TaskRegistry, settings: RegistrySettings) -> None:
        self._registry = registry
        self._cache: ExpiringCache[int, TaskAccess] = ExpiringCache(settings.task_cache_size, settings.task_cache_ttl)
        self._pending: dict[int, asyncio.Future[TaskAccess | None]] = {}

    async def get(self, task_id: int) -> TaskAccess | None:
        task = self._cache.get(task_id)
        if task is not None:
            return task
        pending = self._pending.get(task_id)
        if pending is None:
            pending = asyncio.ensure_future(self._registry.task_access(task_id))
            self._pending[task_id] = pending
            pending.add_done_callback(lambda _: self._pending.pop(task_id, None))
        task = await asyncio.shield(pending)
        if task is not None:
            self._cache[task_id] = task
        return task

    def cached(self, task_id: int) -> TaskAccess | None:
        return self._cache.get(task_id)

    def forget(self) -> None:
        """Drop every cached task: a sync in this process changed or removed some."""
        self._cache.clear()


def storage_for_task(
    claims: Claims, task: TaskAccess, uri: GsUri, storages: tuple[StorageSettings, ...]
) -> StorageSettings:
    """The storage to read `uri` from for `task`, or a 403 naming what is missing.

    The task's reference is the grant: a storage of the task's project with the URI's bucket
    serves it, whatever its prefix (prefixes bound what /projects/{id}/resolve/ may serve).
    """
    if not claims.grants_task(task.id, task.project):
        raise forbidden("no_grant", f"the token does not grant task {task.id}")
    return storage_for_reference(task.id, task.uris, uri, storages, task.storage_id)


def storage_for_reference(
    task_id: int,
    referenced: frozenset[str],
    uri: GsUri,
    storages: tuple[StorageSettings, ...],
    imported_by: str | None = None,
) -> StorageSettings:
    """The storage serving `uri` for a task that may be read and references `referenced`: the
    storage that imported the task, when it holds the URI's bucket; otherwise the storage of that
    bucket whose prefix holds the key, the longest prefix first, and among equals the one listed
    first (config-file storages in file order, then API storages by id) — so a storage's mode,
    allowlist and credentials never apply to another storage's tasks."""
    if str(uri) not in referenced:
        raise forbidden("not_referenced", f"task {task_id} does not reference this object")
    candidates = [s for s in storages if s.bucket == uri.bucket]
    if not candidates:
        raise forbidden("bucket_not_configured", "the object's bucket is not a storage of the task's project")
    if imported_by is not None:
        for storage in candidates:
            if storage.id == imported_by:
                return storage
    return max(candidates, key=lambda s: (uri.key.startswith(s.prefix), len(s.prefix)))


def storage_for_project(
    claims: Claims, project: str, uri: GsUri, storages: tuple[StorageSettings, ...]
) -> StorageSettings:
    if not claims.grants_project(project):
        raise forbidden("no_grant", f"the token does not grant project {project}")
    return storage_inside(uri, storages)


def storage_inside(uri: GsUri, storages: tuple[StorageSettings, ...]) -> StorageSettings:
    """The storage (of a project the caller may read) whose bucket and prefix hold `uri`."""
    holding = [s for s in storages if s.holds(uri.bucket, uri.key)]
    if not holding:
        raise forbidden("outside_storage", "the object is not inside a storage of this project")
    return max(holding, key=lambda s: len(s.prefix))
