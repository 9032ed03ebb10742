"""The `label_studio` authenticator: Label Studio's own credentials, checked by Label Studio.

Label Studio's front end and API send a session cookie, `Authorization: Token …` or one of its
JWT access tokens. For a media request carrying one, the gateway asks Label Studio, as that
user, for the task (`GET /api/tasks/{id}/?resolve_uri=false`) or project (`GET /api/projects/{id}/`): a 200
grants access, and for a task the requested `gs://` URI must also appear in the task data that
came back — stricter than Label Studio's own proxy, which serves any object of a connected
bucket through any task. Decisions are kept per credential (by hash) and task for `cache_ttl`
seconds (refusals `negative_cache_ttl`), so a video's hundreds of range requests cost one call,
and concurrent misses share that call. Label Studio unreachable, slow or failing is a 503: never
an open door, never cached. The credential goes to the configured Label Studio and nowhere else,
and is never logged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import aiohttp

from . import metrics
from .caching import ExpiringCache
from .config import LabelStudioSettings
from .errors import Refused, forbidden, unauthorized
from .uris import BadFileUri, find_gs_uris, parse_fileuri

# Label Studio's API answers task data with its URIs rewritten to its own resolve URLs.
_RESOLVE_URL = re.compile(r"/(?:tasks|projects)/\d+/resolve/?\?(?:[^\"'\s#]*&)?fileuri=([A-Za-z0-9_%=-]+)")


@dataclass(frozen=True, slots=True)
class Credential:
    """What to present to Label Studio (one header), and its hash: the cache key, safe to keep."""

    header: str
    value: str
    digest: str

    @property
    def subject(self) -> str:
        """Who the access log names: the hash's prefix, never the credential itself."""
        return f"label-studio:{self.digest[:16]}"


@dataclass(frozen=True, slots=True)
class Grant:
    project: str
    uris: frozenset[str]  # for a task: every gs:// URI its data references; empty for a project
    fields: tuple[tuple[str, str], ...] = ()  # (data field, URI) pairs of those: the viewer's labels


def credential_from(
    headers: Mapping[str, str], cookies: Mapping[str, str], settings: LabelStudioSettings, gateway_token: str | None
) -> Credential | None:
    """Label Studio's credential on the request, if it carries one rather than a gateway token.

    `Authorization: Token …` is Label Studio's; a bearer JWT is Label Studio's when it has the
    `token_type` claim its access tokens carry (the gateway's have `sub` instead). Without an
    Authorization header, a gateway token (cookie or query) wins over Label Studio's session
    cookie. The claims are only read here to route the request; Label Studio verifies them.
    """
    authorization = headers.get("Authorization", "")
    scheme, _, token = authorization.partition(" ")
    scheme, token = scheme.lower(), token.strip()
    if token and (scheme == "token" or (scheme == "bearer" and _is_label_studio_jwt(token))):
        return _credential("Authorization", authorization.strip())
    if authorization or gateway_token is not None:
        return None
    session = cookies.get(settings.session_cookie)
    if session:
        return _credential("Cookie", f"{settings.session_cookie}={session}")
    return None


@functools.lru_cache(maxsize=4096)  # a video's ranges repeat one credential: hashed once
def _credential(header: str, value: str) -> Credential:
    return Credential(header, value, hashlib.sha256(f"{header}\n{value}".encode()).hexdigest())


@functools.lru_cache(maxsize=4096)  # every bearer request asks, the gateway's own tokens included
def _is_label_studio_jwt(token: str) -> bool:
    parts = token.split(".")
    if len(parts) != 3 or len(parts[1]) > 4096:
        return False
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError):
        return False
    return isinstance(payload, dict) and "token_type" in payload and "sub" not in payload


def referenced_uris(data: Any) -> frozenset[str]:
    """The gs:// URIs task data references: written out, or inside Label Studio resolve URLs."""
    found = find_gs_uris(data)
    for value in _strings(data):
        for encoded in _RESOLVE_URL.findall(value):
            try:
                found.add(str(parse_fileuri(unquote(encoded))))
            except BadFileUri:
                continue
    return frozenset(found)


def _task_grant(task: dict[str, Any]) -> Grant:
    data = task.get("data")
    fields = data.items() if isinstance(data, dict) else ()
    by_field = tuple(sorted((str(name), uri) for name, value in fields for uri in referenced_uris(value)))
    return Grant(str(task.get("project")), referenced_uris(data), by_field)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if "fileuri=" in value else []
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


class LabelStudioAuthority:
    """Asks Label Studio who may read what; one instance per process, sharing its session."""

    def __init__(self, settings: LabelStudioSettings, session: Callable[[], aiohttp.ClientSession | None]) -> None:
        assert settings.url is not None
        self.settings = settings
        self._base = settings.url.rstrip("/")
        self._session = session
        self._decisions: ExpiringCache[tuple[str, str, str], Grant | Refused] = ExpiringCache(
            settings.cache_size, settings.cache_ttl
        )
        self._pending: dict[tuple[str, str, str], asyncio.Future[Grant | Refused]] = {}

    def cached(self, credential: Credential, kind: str, ident: str) -> Grant | Refused | None:
        """The kept decision for a credential and a task or project, if any (no call made)."""
        decision = self._decisions.get((credential.digest, kind, ident))
        if decision is not None:
            metrics.LABEL_STUDIO_CHECKS.labels("cached").inc()
        return decision

    async def decide(self, credential: Credential, kind: str, ident: str) -> Grant:
        """Label Studio's decision (`kind` "task" or "project"): a Grant, or Refused raised."""
        key = (credential.digest, kind, ident)
        decision = self.cached(credential, kind, ident)
        if decision is None:
            pending = self._pending.get(key)
            if pending is None:  # concurrent misses share one call
                pending = asyncio.ensure_future(self._ask(credential, kind, ident))
                self._pending[key] = pending
                pending.add_done_callback(lambda _: self._pending.pop(key, None))
            decision = await asyncio.shield(pending)
        if isinstance(decision, Refused):
            raise decision
        return decision

    async def _ask(self, credential: Credential, kind: str, ident: str) -> Grant | Refused:
        # resolve_uri=false: the task data as stored (gs:// URIs), without Label Studio's storage lookups.
        path = f"/api/tasks/{ident}/?resolve_uri=false" if kind == "task" else f"/api/projects/{ident}/"
        key = (credential.digest, kind, ident)
        try:
            status, body = await self._get(path, credential)
        except Refused as exc:  # unreachable or failing: a 503 now, asked again next time
            metrics.LABEL_STUDIO_CHECKS.labels("unavailable").inc()
            return exc
        if status == 200 and isinstance(body, dict):
            metrics.LABEL_STUDIO_CHECKS.labels("allowed").inc()
            grant = _task_grant(body) if kind == "task" else Grant(ident, frozenset())
            self._decisions[key] = grant
            return grant
        if status == 401 or 300 <= status < 400:  # 3xx: sent to the login page
            refusal = unauthorized("label_studio_unauthenticated", "Label Studio does not accept this credential")
        elif status in (403, 404):
            refusal = forbidden("label_studio_denied", f"Label Studio does not give this user {kind} {ident}")
        else:
            metrics.LABEL_STUDIO_CHECKS.labels("unavailable").inc()
            return _unavailable(f"Label Studio answered the access check with {status}")
        metrics.LABEL_STUDIO_CHECKS.labels("denied").inc()
        self._decisions.store(key, refusal, self.settings.negative_cache_ttl)
        return refusal

    async def _get(self, path: str, credential: Credential) -> tuple[int, Any]:
        session = self._session()
        if session is None:
            raise _unavailable("the gateway is starting")
        headers = {credential.header: credential.value, "Accept": "application/json", "Accept-Encoding": "identity"}
        try:
            async with asyncio.timeout(self.settings.timeout):
                async with session.get(self._base + path, headers=headers, allow_redirects=False) as response:
                    body = await response.read() if response.status == 200 else b""
                    status = response.status
        except TimeoutError:
            raise Refused(
                503, "label_studio_unavailable", "Label Studio did not answer the access check in time"
            ) from None
        except aiohttp.ClientError:
            raise Refused(
                503, "label_studio_unavailable", "Label Studio cannot be reached for the access check"
            ) from None
        if status != 200:
            return status, None
        try:
            return status, json.loads(body)
        except ValueError:
            return 502, None


def _unavailable(message: str) -> Refused:
    return Refused(503, "label_studio_unavailable", message)
