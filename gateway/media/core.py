"""The media decision, once, for both lanes: a sans-I/O core in the way h11 separates HTTP from I/O.

`MediaCore.decide(request, facts)` runs every rule of a media request in one order — client
allowlist, credential, grant, task, storage, storage allowlist, storage reachable, metadata,
presign or RFC 9110 plan — using only what `facts` already holds or the shared caches can tell
without waiting. It returns a final outcome (`Answer`: a refusal, a redirect, a bodiless answer;
`Stream`: what to stream) or the one thing it still needs (`Need*`). The edges differ only in how
they fill needs and frame answers: `MediaService` (gateway/media/service.py) fills needs for both
lanes; aiohttp (gateway/proxy.py) and the fast lane (gateway/fastlane.py) write the bytes.

Object metadata from buckets is untrusted: header values are made safe once, when the metadata
entry is built (`remember`), so no lane ever meets a value it cannot write.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..acl import (
    Claims,
    TaskCache,
    TokenVerifier,
    storage_for_project,
    storage_for_reference,
    storage_for_task,
    storage_inside,
    token_from,
)
from ..caching import ExpiringCache
from ..catalog import StorageCatalog
from ..config import Settings, StorageSettings
from ..errors import Refused, unauthorized
from ..httpsem import ByteRange, Plan, content_disposition, format_http_date, is_conditional, parse_range, plan_response
from ..labelstudio import Credential, Grant, LabelStudioAuthority, credential_from
from ..netguard import ClientGuard, IPAddress, admit_to_storage
from ..registry import TaskAccess
from ..signer import SignedUrlCache
from ..storage import Backend, ObjectMeta, StorageError
from ..uris import BadFileUri, GsUri, parse_fileuri
from .answers import SEE_OTHER, Answer, error_answer, refusal_answer, storage_error_answer

_ACTIVE_TYPES = ("html", "xml", "javascript", "ecmascript")
_HEADER_SAFE = re.compile(r"[\x20-\x7e]*")  # visible ASCII and space: what every lane writes as is
FALLBACK_TYPE = "application/octet-stream"


@dataclass(frozen=True, slots=True)
class MediaRequest:
    """What a media request says, however it was parsed."""

    method: str  # GET or HEAD
    task_id: int | None  # /tasks/{id}/resolve/
    project: str | None  # /projects/{id}/resolve/
    query: Mapping[str, str]
    headers: Mapping[str, str]
    cookies: Mapping[str, str]
    client: IPAddress | None


@dataclass(frozen=True, slots=True)
class Entry:
    """Cached metadata with the response headers it implies, built once per object version."""

    meta: ObjectMeta
    headers: dict[str, str]
    attachment: str  # Content-Disposition for ?download=1
    active: bool  # a type a browser would execute: never rendered, even from a signed URL


class Facts:
    """What one request has learned so far: filled by `MediaService.fill`; whatever is not here is
    peeked from the shared caches. Also what the request's metrics and access line report."""

    __slots__ = ("claims", "entry", "grant", "metadata_hit", "reader", "signed", "signed_hit", "slot", "sub", "task")

    def __init__(self) -> None:
        self.claims: Claims | None = None
        self.grant: Grant | Refused | None = None
        self.task: TaskAccess | bool | None = False  # False: not looked up yet; None: looked up, absent
        self.entry: Entry | None = None
        self.signed: tuple[str, float] | None = None
        self.reader: Any = None  # an ObjectReader opened while learning the metadata (a cold GET)
        self.slot: Any = None  # the stream slot, once taken
        self.sub: str | None = None
        self.metadata_hit: bool | None = None
        self.signed_hit: bool | None = None


# -- what the core may still need (each filled by MediaService.fill) -------------------------------


@dataclass(frozen=True, slots=True)
class NeedClaims:
    token: str


@dataclass(frozen=True, slots=True)
class NeedGrant:
    """Label Studio's answer for a credential and a task or project."""

    credential: Credential
    kind: str  # "task" or "project"
    ident: str


@dataclass(frozen=True, slots=True)
class NeedTask:
    task_id: int


@dataclass(frozen=True, slots=True)
class NeedEntry:
    """The object's metadata; `open_range` other than False: open the download at once (a cold GET
    whose metadata and bytes come in one upstream request), with that range (None: whole)."""

    storage: StorageSettings
    backend: Backend
    uri: GsUri
    open_range: ByteRange | bool | None


@dataclass(frozen=True, slots=True)
class NeedSignature:
    storage: StorageSettings
    uri: GsUri
    key: tuple[object, ...]
    ttl: int
    overrides: dict[str, str]


Need = NeedClaims | NeedGrant | NeedTask | NeedEntry | NeedSignature


@dataclass(frozen=True, slots=True)
class Stream:
    """A GET whose body comes from storage: the plan (200/206 and span), the headers to send."""

    plan: Plan
    headers: dict[str, str]
    sub: str
    storage: StorageSettings
    backend: Backend
    uri: GsUri
    entry: Entry

    mode = "proxy"


Outcome = Answer | Stream | Need


class MediaCore:
    """The decisions of the media routes, with the caches they peek into (no I/O, no awaits)."""

    def __init__(
        self,
        settings: Settings,
        guard: ClientGuard,
        verifier: TokenVerifier,
        tasks: TaskCache,
        catalog: StorageCatalog,
        label_studio: LabelStudioAuthority | None,
    ) -> None:
        self._auth = settings.auth
        self._label_studio_settings = settings.label_studio
        self._guard = guard
        self.verifier = verifier
        self.tasks = tasks
        self.catalog = catalog
        self.label_studio = label_studio
        media = settings.media
        self.entries: ExpiringCache[tuple[str, str], Entry] = ExpiringCache(
            media.metadata_cache_size, media.metadata_ttl
        )
        self.signed = SignedUrlCache(settings.upstream.signed_url_cache_size)
        self._max_age = media.cache_control_max_age
        self._cache_control = f"private, max-age={media.cache_control_max_age}"

    def decide(self, request: MediaRequest, facts: Facts) -> Outcome:
        try:
            return self._decide(request, facts)
        except Refused as exc:
            return refusal_answer(exc, facts.sub)
        except BadFileUri as exc:
            return error_answer(400, "bad_fileuri", str(exc), sub=facts.sub)
        except StorageError as exc:  # e.g. a storage whose backend cannot be built on this replica
            return storage_error_answer(exc, facts.sub)

    def _decide(self, request: MediaRequest, facts: Facts) -> Outcome:
        if self._guard.allowed:
            self._guard.admit(request.client)
        token = token_from(self._auth, request.headers, request.cookies, request.query)
        task_id = request.task_id
        credential = None
        if self.label_studio is not None:
            credential = credential_from(request.headers, request.cookies, self._label_studio_settings, token)
        if credential is not None:  # the label_studio authenticator: Label Studio decides
            facts.sub = credential.subject  # never the credential itself
            uri = parse_fileuri(request.query.get("fileuri"))
            kind, ident = ("task", str(task_id)) if task_id is not None else ("project", str(request.project))
            grant = facts.grant
            if grant is None:
                grant = facts.grant = self.label_studio.cached(credential, kind, ident)  # type: ignore[union-attr]
                if grant is None:
                    return NeedGrant(credential, kind, ident)
            if isinstance(grant, Refused):
                raise grant
            if task_id is not None:
                storage = storage_for_reference(task_id, grant.uris, uri, self.catalog.storages_of(grant.project))
            else:
                storage = storage_inside(uri, self.catalog.storages_of(str(request.project)))
            return self._serve(request, facts, storage, uri)
        if token is None:
            raise unauthorized("missing_token", "no token was sent")
        claims = facts.claims
        if claims is None:
            claims = facts.claims = self.verifier.cached(token)
            if claims is None:
                return NeedClaims(token)
        facts.sub = claims.sub
        uri = parse_fileuri(request.query.get("fileuri"))
        if task_id is not None:
            if not claims.may_grant_task(task_id):
                raise Refused(403, "no_grant", f"the token does not grant task {task_id}")
            task = facts.task
            if task is False:
                task = self.tasks.cached(task_id)
                if task is None:
                    return NeedTask(task_id)
                facts.task = task
            if task is None:
                raise Refused(404, "unknown_task", f"task {task_id} does not exist")
            storage = storage_for_task(claims, task, uri, self.catalog.storages_of(task.project))  # type: ignore[union-attr]
        else:
            project = str(request.project)
            storage = storage_for_project(claims, project, uri, self.catalog.storages_of(project))
        return self._serve(request, facts, storage, uri)

    def _serve(self, request: MediaRequest, facts: Facts, storage: StorageSettings, uri: GsUri) -> Outcome:
        admit_to_storage(storage.id, storage.client_allowlist, request.client)
        backend = self.catalog.backend(storage)
        sub = facts.sub or ""
        entry = facts.entry
        if entry is None:
            entry = facts.entry = self.entries.get((storage.id, uri.key))
            if entry is None:
                return NeedEntry(storage, backend, uri, self._open_range(request, storage))
            if facts.metadata_hit is None:
                facts.metadata_hit = True
        if storage.presign:
            overrides = _signing_overrides(request.query, entry)
            ttl = storage.presign_ttl * 60
            key = (storage.id, uri.key, entry.meta.etag, tuple(sorted(overrides.items())))
            signed = facts.signed
            if signed is None:
                signed = facts.signed = self.signed.cached(key, ttl)
                if signed is None:
                    return NeedSignature(storage, uri, key, ttl, overrides)
                facts.signed_hit = True
            headers = self._see_other(*signed, ttl)
            return Answer(303, headers, SEE_OTHER, len(SEE_OTHER), "presign", sub)
        meta = entry.meta
        plan = plan_response(request.method, request.headers, meta.etag, meta.last_modified, meta.size)
        if plan.status == 304:
            return Answer(304, {k: entry.headers[k] for k in _NOT_MODIFIED}, b"", 0, "proxy", sub)
        if plan.status == 416:
            return error_answer(
                416,
                "range_not_satisfiable",
                "the requested range lies outside the object",
                {"Content-Range": f"bytes */{meta.size}", "Accept-Ranges": "bytes"},
                sub=sub,
            )
        if plan.status == 412:
            return error_answer(
                412,
                "precondition_failed",
                "a precondition (If-Match / If-Unmodified-Since) failed",
                {"ETag": meta.etag},
                sub=sub,
            )
        headers = dict(entry.headers)
        if request.query.get("download") in ("1", "true"):
            headers["Content-Disposition"] = entry.attachment
        if plan.status == 206:
            headers["Content-Range"] = f"bytes {plan.first}-{plan.last}/{meta.size}"
        if request.method == "HEAD":
            return Answer(plan.status, headers, b"", plan.length, "proxy", sub)
        return Stream(plan, headers, sub, storage, backend, uri, entry)

    @staticmethod
    def _open_range(request: MediaRequest, storage: StorageSettings) -> ByteRange | bool | None:
        """A cold, unconditional GET of at most one range opens the download at once; else stat."""
        if storage.presign or request.method != "GET" or is_conditional(request.headers):
            return False
        ranges = parse_range(request.headers.get("Range"))
        if ranges is None:
            return None
        return ranges[0] if len(ranges) == 1 else False

    def _see_other(self, url: str, expires_at: float, ttl: int) -> dict[str, str]:
        # Never cached past the URL's life, nor longer than a proxied answer (the token check is
        # skipped while a browser replays a cached redirect).
        max_age = max(0, min(self._max_age, int(expires_at - time.time() - SignedUrlCache.margin(ttl))))
        return {
            "Location": url,
            "Cache-Control": f"private, max-age={max_age}",
            "Referrer-Policy": "no-referrer",
            "Content-Type": "text/plain; charset=utf-8",
        }

    def remember(self, storage: StorageSettings, uri: GsUri, meta: ObjectMeta) -> Entry:
        """The entry for this version of the object, cached; untrusted metadata made safe here, once:
        a Content-Type or Content-Encoding with a control or non-ASCII character is not passed on
        (the type becomes application/octet-stream, the encoding is dropped)."""
        content_type = meta.content_type if _HEADER_SAFE.fullmatch(meta.content_type) else FALLBACK_TYPE
        encoding = meta.content_encoding
        if encoding is not None and not _HEADER_SAFE.fullmatch(encoding):
            encoding = None
        headers = {
            "Accept-Ranges": "bytes",
            "ETag": meta.etag,
            "Last-Modified": format_http_date(meta.last_modified),
            "Content-Type": content_type,
            "Cache-Control": self._cache_control,
            # Objects come from a dataset, not from us: never let a browser sniff or run them
            # in the gateway's origin, where the page could read the token from its own URL.
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        }
        if encoding:
            headers["Content-Encoding"] = encoding
        attachment = content_disposition(uri.filename, attachment=True)
        active = _is_active(content_type)
        if active:
            headers["Content-Security-Policy"] = "sandbox; default-src 'none'"
            headers["Content-Disposition"] = attachment
        else:
            headers["Content-Disposition"] = content_disposition(uri.filename, attachment=False)
        entry = Entry(meta, headers, attachment, active)
        self.entries[(storage.id, uri.key)] = entry
        return entry

    def forget(self, storage: StorageSettings, uri: GsUri) -> None:
        self.entries.pop((storage.id, uri.key))


_NOT_MODIFIED = ("ETag", "Last-Modified", "Cache-Control", "Accept-Ranges")


def _is_active(content_type: str) -> bool:
    """Types a browser would execute when opened directly (HTML, SVG and other XML, scripts)."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    return any(word in media_type for word in _ACTIVE_TYPES)


def _signing_overrides(query: Mapping[str, str], entry: Entry) -> dict[str, str]:
    if query.get("download") in ("1", "true") or entry.active:
        return {"response-content-disposition": entry.attachment}  # HTML/SVG never render either
    return {}
