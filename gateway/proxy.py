"""The media routes: token → task-level access → metadata → RFC 9110 decision → streamed bytes.

`/tasks/{id}/resolve/` and `/projects/{id}/resolve/` take Label Studio's `fileuri` (URL-safe
base64 of `gs://bucket/key`). The access check runs on every request, before any storage is
touched, so a refused caller learns nothing about the object. Object metadata is cached
briefly: HEAD, 304, 412 and 416 cost no media download, and a cold GET costs one upstream
request because the media response carries the metadata itself.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDictProxy

from . import metrics
from .acl import (
    Claims,
    TaskCache,
    TokenVerifier,
    storage_for_project,
    storage_for_reference,
    storage_for_task,
    storage_inside,
    token_from,
)
from .caching import ExpiringCache
from .catalog import StorageCatalog
from .config import Settings, StorageSettings
from .errors import Refused, forbidden, unauthorized
from .httpsem import (
    ByteRange,
    Plan,
    content_disposition,
    format_http_date,
    is_conditional,
    parse_range,
    plan_response,
)
from .labelstudio import Credential, LabelStudioAuthority, credential_from
from .netguard import AddressSet, IPAddress, StreamLimiter, check_allowlist
from .signer import SignedUrlCache, SigningError, sign_url
from .state import CLIENT, ERROR, MODE, SUB, TASK
from .storage import Backend, ObjectMeta, ObjectReader, storage_endpoint
from .storage.base import ObjectNotFound, RangeNotSatisfiable, StorageError
from .uris import BadFileUri, GsUri, parse_fileuri

log = logging.getLogger("gateway.proxy")


@dataclass(frozen=True, slots=True)
class _Entry:
    """Cached metadata with the response headers it implies, built once per object version."""

    meta: ObjectMeta
    headers: dict[str, str]
    attachment: str  # Content-Disposition for ?download=1
    active: bool  # a type a browser would execute (_is_active): never rendered, even from a signed URL


_ACTIVE_TYPES = ("html", "xml", "javascript", "ecmascript")


def _is_active(content_type: str) -> bool:
    """Types a browser would execute when opened directly (HTML, SVG and other XML, scripts)."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    return any(word in media_type for word in _ACTIVE_TYPES)


SEE_OTHER = b"See Other\n"


def _not_modified(entry: _Entry) -> dict[str, str]:
    return {k: entry.headers[k] for k in ("ETag", "Last-Modified", "Cache-Control", "Accept-Ranges")}


def _signing_overrides(query: Mapping[str, str], entry: _Entry) -> dict[str, str]:
    if query.get("download") in ("1", "true") or entry.active:
        return {"response-content-disposition": entry.attachment}  # HTML/SVG never render either
    return {}


def _signed_key(storage: StorageSettings, uri: GsUri, entry: _Entry, overrides: dict[str, str]) -> tuple[object, ...]:
    """The SignedUrlCache key: the object's generation is part of it, so an overwritten object gets a new URL."""
    return (storage.id, uri.key, entry.meta.etag, tuple(sorted(overrides.items())))


@dataclass(frozen=True, slots=True)
class Bodiless:
    """An answer made from the caches alone, without a body to stream (gateway/fastlane.py):
    a 304, a cached signed-URL 303, or a HEAD. `length`: the Content-Length to announce."""

    status: int
    headers: dict[str, str]
    body: bytes
    length: int
    mode: str
    sub: str


@dataclass(frozen=True, slots=True)
class Streamed:
    """A GET the caches decide whose body comes from storage: the fast lane streams it through
    `MediaHandler.open_cached`."""

    plan: Plan  # 200 or 206, and the span to send
    headers: dict[str, str]
    sub: str
    backend: Backend
    key: str
    etag: str


def _delivers(plan: Plan, reader: ObjectReader) -> bool:
    """Whether an open download carries exactly the span the plan promises to the client."""
    return (plan.status == 206) == reader.partial and (plan.first, plan.last) == (reader.first, reader.last)


class MediaHandler:
    def __init__(
        self,
        settings: Settings,
        verifier: TokenVerifier,
        tasks: TaskCache,
        catalog: StorageCatalog,
        limiter: StreamLimiter,
    ) -> None:
        self._settings = settings
        self._limiter = limiter
        self._catalog = catalog
        self._signed = SignedUrlCache(settings.upstream.signed_url_cache_size)
        self._signed_endpoint = storage_endpoint(dict(os.environ))
        self._verifier = verifier
        self._tasks = tasks
        self._label_studio = (
            LabelStudioAuthority(settings.label_studio, lambda: catalog.session) if settings.label_studio.url else None
        )
        media = settings.media
        self._entries: ExpiringCache[tuple[str, str], _Entry] = ExpiringCache(
            media.metadata_cache_size, media.metadata_ttl
        )
        self._max_age = media.cache_control_max_age
        self._cache_control = f"private, max-age={media.cache_control_max_age}"

    async def task_resolve(self, request: web.Request) -> web.StreamResponse:
        task_id = int(request.match_info["task_id"])
        request[TASK] = task_id
        token = token_from(self._settings.auth, request.headers, request.cookies, request.query)
        credential = self._label_studio_credential(request, token)
        if credential is not None:  # the label_studio authenticator: Label Studio decides
            uri = parse_fileuri(request.query.get("fileuri"))
            grant = await self._label_studio.task(credential, task_id)  # type: ignore[union-attr]
            storages = self._catalog.storages_of(grant.project)
            return await self._serve(request, storage_for_reference(task_id, grant.uris, uri, storages), uri)
        claims = await self._claims(request, token)
        uri = parse_fileuri(request.query.get("fileuri"))
        if not claims.may_grant_task(task_id):
            raise forbidden("no_grant", f"the token does not grant task {task_id}")
        task = await self._tasks.get(task_id)
        if task is None:
            raise Refused(404, "unknown_task", f"task {task_id} does not exist")
        storage = storage_for_task(claims, task, uri, self._catalog.storages_of(task.project))
        return await self._serve(request, storage, uri)

    async def project_resolve(self, request: web.Request) -> web.StreamResponse:
        project = request.match_info["project_id"]
        token = token_from(self._settings.auth, request.headers, request.cookies, request.query)
        credential = self._label_studio_credential(request, token)
        if credential is not None:
            uri = parse_fileuri(request.query.get("fileuri"))
            await self._label_studio.project(credential, project)  # type: ignore[union-attr]
            return await self._serve(request, storage_inside(uri, self._catalog.storages_of(project)), uri)
        claims = await self._claims(request, token)
        uri = parse_fileuri(request.query.get("fileuri"))
        storage = storage_for_project(claims, project, uri, self._catalog.storages_of(project))
        return await self._serve(request, storage, uri)

    def from_caches(
        self,
        method: str,
        task_id: int | None,
        project: str | None,
        query: Mapping[str, str],
        headers: CIMultiDictProxy[str],
        cookies: Mapping[str, str],
        client: IPAddress | None,
    ) -> Bodiless | Streamed | None:
        """The answer to a media request when the caches alone decide it, else None.

        The same decisions as the handlers above, in the same order, with every lookup a cache
        peek: a verified token, a known task, the object's metadata, a signed URL with life left.
        A bodiless answer comes whole; a GET with a body comes as what to stream. Anything else —
        a miss, a refusal to explain, a Label Studio credential — is None, and the request goes
        the full way.
        """
        if self._label_studio is not None:
            return None
        token = token_from(self._settings.auth, headers, cookies, query)
        claims = self._verifier.cached(token) if token is not None else None
        if claims is None:
            return None
        try:
            uri = parse_fileuri(query.get("fileuri"))
            if task_id is not None:
                task = self._tasks.cached(task_id) if claims.may_grant_task(task_id) else None
                if task is None:
                    return None
                storage = storage_for_task(claims, task, uri, self._catalog.storages_of(task.project))
            else:
                assert project is not None
                storage = storage_for_project(claims, project, uri, self._catalog.storages_of(project))
            if storage.client_allowlist:
                check_allowlist(AddressSet.of(storage.client_allowlist), client, "ip_not_allowed_for_storage", "")
        except (Refused, BadFileUri):
            return None
        entry = self._entries.get((storage.id, uri.key))
        if entry is None:
            return None
        if storage.presign:
            ttl = storage.presign_ttl * 60
            signed = self._signed.cached(_signed_key(storage, uri, entry, _signing_overrides(query, entry)), ttl)
            if signed is None:
                return None
            metrics.BATCH.inc(metrics.METADATA_HIT)
            metrics.BATCH.inc(metrics.SIGNED_CACHE_HIT)
            headers_out = self._see_other(*signed, ttl)
            return Bodiless(303, headers_out, SEE_OTHER, len(SEE_OTHER), "presign", claims.sub)
        meta = entry.meta
        plan = plan_response(method, headers, meta.etag, meta.last_modified, meta.size)
        if plan.status == 304:
            answer = Bodiless(304, _not_modified(entry), b"", 0, "proxy", claims.sub)
        elif plan.status not in (200, 206):
            return None  # 412, 416: JSON bodies the full path writes
        elif method == "HEAD":
            answer = Bodiless(plan.status, self._headers(query, plan, entry), b"", plan.length, "proxy", claims.sub)
        else:
            headers_out = self._headers(query, plan, entry)
            answer = Streamed(plan, headers_out, claims.sub, self._catalog.backend(storage), uri.key, meta.etag)
        metrics.BATCH.inc(metrics.METADATA_HIT)
        return answer

    async def open_cached(self, answer: Streamed) -> ObjectReader | None:
        """The download a fast-lane GET streams; None when the object changed or went away since its
        metadata was cached (the full path then asks storage again). StorageError as `Backend.open`."""
        plan = answer.plan
        try:
            reader = await answer.backend.open(
                answer.key, ByteRange(plan.first, plan.last) if plan.status == 206 else None
            )
        except (RangeNotSatisfiable, ObjectNotFound):
            return None
        if reader.meta.etag == answer.etag and _delivers(plan, reader):
            return reader
        reader.close()
        return None

    def _label_studio_credential(self, request: web.Request, token: str | None) -> Credential | None:
        """Label Studio's credential when the authenticator is on and the request carries one
        (`token`: the gateway token the request carries, if any)."""
        if self._label_studio is None:
            return None
        credential = credential_from(request, self._settings.label_studio, token)
        if credential is not None:
            # A per-credential subject for logs and stream caps; never the credential itself.
            request[SUB] = f"label-studio:{credential.digest[:16]}"
        return credential

    async def _claims(self, request: web.Request, token: str | None) -> Claims:
        if token is None:
            raise unauthorized("missing_token", "no token was sent")
        claims = await self._verifier.verify(token)
        request[SUB] = claims.sub
        return claims

    async def _serve(self, request: web.Request, storage: StorageSettings, uri: GsUri) -> web.StreamResponse:
        if storage.client_allowlist:
            allowed = AddressSet.of(storage.client_allowlist)
            check_allowlist(allowed, request.get(CLIENT), "ip_not_allowed_for_storage", f" for storage {storage.id}")
        backend = self._catalog.backend(storage)
        cache_key = (storage.id, uri.key)
        if storage.presign:
            return await self._redirect(request, storage, uri, backend, cache_key)  # no stream: never shed
        if request.method == "HEAD":
            return await self._answer(request, backend, cache_key, uri)
        # A GET holds a stream slot from before its first upstream request until its body is sent
        # or the client leaves (the `with` also releases on errors and cancellation).
        with self._limiter.slot(request[SUB]):
            return await self._answer(request, backend, cache_key, uri)

    async def _answer(
        self, request: web.Request, backend: Backend, cache_key: tuple[str, str], uri: GsUri
    ) -> web.StreamResponse:
        """Metadata → RFC 9110 plan → bodiless answer, HEAD, or streamed bytes."""
        headers = request.headers
        entry = self._entries.get(cache_key)
        if entry is not None:
            metrics.BATCH.inc(metrics.METADATA_HIT)
        else:
            metrics.BATCH.inc(metrics.METADATA_MISS)
            if request.method == "GET" and not is_conditional(headers):
                ranges = parse_range(headers.get("Range"))
                if ranges is None or len(ranges) == 1:
                    response = await self._optimistic_get(request, backend, cache_key, uri, ranges)
                    if response is not None:
                        return response
            entry = self._entries.get(cache_key) or self._remember(cache_key, uri, await backend.stat(uri.key))

        for _ in range(2):  # a second round only if the cached metadata turned out stale
            plan = plan_response(request.method, headers, entry.meta.etag, entry.meta.last_modified, entry.meta.size)
            if plan.status not in (200, 206):
                return self._bodiless(plan, entry)
            if request.method == "HEAD":
                return await self._head(request, plan, entry)
            try:
                reader = await backend.open(uri.key, ByteRange(plan.first, plan.last) if plan.status == 206 else None)
            except (RangeNotSatisfiable, ObjectNotFound):
                # The object shrank or went away since it was cached: ask again (a 404 now is real).
                self._entries.pop(cache_key)
                entry = self._remember(cache_key, uri, await backend.stat(uri.key))
                continue
            if reader.meta.etag == entry.meta.etag and _delivers(plan, reader):
                return await self._stream(request, plan, entry, reader)
            reader.close()
            entry = self._remember(cache_key, uri, reader.meta)
        raise Refused(503, "object_changing", "the object changed while it was being read; retry")

    async def _redirect(
        self, request: web.Request, storage: StorageSettings, uri: GsUri, backend: Backend, cache_key: tuple[str, str]
    ) -> web.Response:
        """303 to a cached V4 signed URL; the browser then downloads straight from GCS.

        The object's generation is part of the cache key, so an overwritten object gets a new URL;
        the redirect may be cached only while the URL keeps more than the safety margin of life.
        """
        request[MODE] = "presign"
        entry = self._entries.get(cache_key)
        if entry is None:
            metrics.BATCH.inc(metrics.METADATA_MISS)
            entry = self._remember(cache_key, uri, await backend.stat(uri.key))
        else:
            metrics.BATCH.inc(metrics.METADATA_HIT)
        overrides = _signing_overrides(request.query, entry)
        ttl = storage.presign_ttl * 60
        signer = self._catalog.signers[storage.id]

        async def sign(now: float) -> str:
            started = time.perf_counter()
            try:
                url = await sign_url(
                    signer,
                    endpoint=self._signed_endpoint,
                    bucket=uri.bucket,
                    key=uri.key,
                    ttl_seconds=ttl,
                    now=datetime.datetime.fromtimestamp(now, datetime.UTC),
                    query=overrides,
                )
            except SigningError as exc:
                metrics.SIGNING_FAILURES.labels(exc.reason).inc()
                raise Refused(503, f"signing_{exc.reason}", str(exc)) from None
            metrics.SIGNING_SECONDS.labels(signer.method).observe(time.perf_counter() - started)
            metrics.SIGNED_URLS.labels(signer.method).inc()
            return url

        url, expires_at, hit = await self._signed.get(_signed_key(storage, uri, entry, overrides), ttl, sign)
        metrics.BATCH.inc(metrics.SIGNED_CACHE_HIT if hit else metrics.SIGNED_CACHE_MISS)
        return web.Response(status=303, body=SEE_OTHER, headers=self._see_other(url, expires_at, ttl))

    def _see_other(self, url: str, expires_at: float, ttl: int) -> dict[str, str]:
        # Never cached past the URL's life, nor longer than a proxied answer (the token check is skipped
        # while a browser replays a cached redirect).
        max_age = max(0, min(self._max_age, int(expires_at - time.time() - SignedUrlCache.margin(ttl))))
        return {
            "Location": url,
            "Cache-Control": f"private, max-age={max_age}",
            "Referrer-Policy": "no-referrer",
            "Content-Type": "text/plain; charset=utf-8",
        }

    async def _optimistic_get(
        self,
        request: web.Request,
        backend: Backend,
        cache_key: tuple[str, str],
        uri: GsUri,
        ranges: list[ByteRange] | None,
    ) -> web.StreamResponse | None:
        """Cold GET: one upstream request yields both the metadata and the bytes."""
        try:
            reader = await backend.open(uri.key, ranges[0] if ranges else None)
        except RangeNotSatisfiable:
            return None  # the size is needed for Content-Range: ask for metadata
        entry = self._remember(cache_key, uri, reader.meta)
        meta = reader.meta
        plan = plan_response("GET", request.headers, meta.etag, meta.last_modified, meta.size)
        if _delivers(plan, reader):
            return await self._stream(request, plan, entry, reader)
        reader.close()
        return None

    def _remember(self, cache_key: tuple[str, str], uri: GsUri, meta: ObjectMeta) -> _Entry:
        headers = {
            "Accept-Ranges": "bytes",
            "ETag": meta.etag,
            "Last-Modified": format_http_date(meta.last_modified),
            "Content-Type": meta.content_type,
            "Cache-Control": self._cache_control,
            # Objects come from a dataset, not from us: never let a browser sniff or run them
            # in the gateway's origin, where the page could read the token from its own URL.
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        }
        if meta.content_encoding:
            headers["Content-Encoding"] = meta.content_encoding
        attachment = content_disposition(uri.filename, attachment=True)
        active = _is_active(meta.content_type)
        if active:
            headers["Content-Security-Policy"] = "sandbox; default-src 'none'"
            headers["Content-Disposition"] = attachment
        else:
            headers["Content-Disposition"] = content_disposition(uri.filename, attachment=False)
        entry = _Entry(meta, headers, attachment, active)
        self._entries[cache_key] = entry
        return entry

    def _headers(self, query: Mapping[str, str], plan: Plan, entry: _Entry) -> dict[str, str]:
        headers = dict(entry.headers)
        if query.get("download") in ("1", "true"):
            headers["Content-Disposition"] = entry.attachment
        if plan.status == 206:
            headers["Content-Range"] = f"bytes {plan.first}-{plan.last}/{entry.meta.size}"
        return headers

    def _bodiless(self, plan: Plan, entry: _Entry) -> web.Response:
        """304, 412 and 416, answered from metadata alone."""
        if plan.status == 304:
            return web.Response(status=304, headers=_not_modified(entry))
        if plan.status == 416:
            return web.json_response(
                {"error": "range_not_satisfiable", "message": "the requested range lies outside the object"},
                status=416,
                headers={"Content-Range": f"bytes */{entry.meta.size}", "Accept-Ranges": "bytes"},
            )
        return web.json_response(
            {"error": "precondition_failed", "message": "a precondition (If-Match / If-Unmodified-Since) failed"},
            status=412,
            headers={"ETag": entry.meta.etag},
        )

    async def _head(self, request: web.Request, plan: Plan, entry: _Entry) -> web.StreamResponse:
        response = web.StreamResponse(status=plan.status, headers=self._headers(request.query, plan, entry))
        response.content_length = plan.length
        await response.prepare(request)
        await response.write_eof()
        return response

    async def _stream(
        self, request: web.Request, plan: Plan, entry: _Entry, reader: ObjectReader
    ) -> web.StreamResponse:
        """Write the reader's bytes with backpressure; a broken upstream aborts the client."""
        try:
            response = web.StreamResponse(status=plan.status, headers=self._headers(request.query, plan, entry))
            response.content_length = plan.length
            metrics.BATCH.inc(metrics.ACTIVE_STREAMS)
            try:
                await response.prepare(request)
                async for chunk in reader.chunks():
                    await response.write(chunk)
                await response.write_eof()
            except ConnectionError:  # the client went away (reset, or lost while paused for it)
                return response  # the finally below drops the upstream connection
            except StorageError as exc:
                # Headers are out: the only honest signal left is to close the connection
                # before Content-Length bytes (after flushing what was sent).
                request[ERROR] = exc.reason
                log.warning("upstream failed mid-body (%s): aborting the client connection", exc.reason)
                response.force_close()
                if request.transport is not None:
                    request.transport.close()
                return response
            finally:
                metrics.BATCH.inc(metrics.ACTIVE_STREAMS, -1)
            return response
        finally:
            reader.close()
