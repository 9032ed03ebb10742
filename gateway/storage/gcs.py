"""Google Cloud Storage through its JSON API: media downloads through `http1.MediaPool`, the
rest (metadata, listings, uploads, deletes) with aiohttp on the application's pooled session.

Downloads ask for `Accept-Encoding: gzip` so GCS hands out objects exactly as stored (no
decompressive transcoding) and nothing decompresses them here: a gzip-stored object reaches
the client as stored, with its Content-Encoding. A media response carries everything the
gateway needs (size, generation, dates, type), so a cold GET costs one upstream request.

Writes (annotation export) are whole-object simple uploads and deletes. Both are idempotent —
the same bytes written again, a delete of what is gone answers 404 — so they are retried on the
same terms as reads.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Protocol, TypeVar
from urllib.parse import quote, urlsplit

import aiohttp
import google.auth.exceptions
from multidict import CIMultiDictProxy
from prometheus_client import Histogram
from yarl import URL

from .. import metrics
from ..config import UpstreamSettings
from ..httpsem import ByteRange
from .base import (
    BucketNotFound,
    ListedObject,
    ObjectMeta,
    ObjectNotFound,
    RangeNotSatisfiable,
    StorageError,
    UpstreamBroken,
    UpstreamDenied,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .credentials import AccessTokens
from .http1 import BodyBroken, ConnectionFailed, MediaPool, MediaResponse

PUBLIC_ENDPOINT = "https://storage.googleapis.com"
_META_FIELDS = "size,generation,updated,contentType,contentEncoding"
_LIST_FIELDS = "items(name,generation,size),nextPageToken"
_OPERATIONS = ("stat", "open", "check", "list", "put", "delete", "md5")
_RETRYABLE = frozenset({408, 429})  # and every 5xx: GCS asks clients to retry these with backoff


class _Answer(Protocol):
    status: int

    def release(self) -> object: ...


_Response = TypeVar("_Response", bound=_Answer)


def emulator_endpoint(host: str) -> str:
    """STORAGE_EMULATOR_HOST as every Google client library reads it (scheme optional)."""
    return host.rstrip("/") if "://" in host else f"http://{host.rstrip('/')}"


class GcsBackend:
    name = "gcs"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        endpoint: str,
        bucket: str,
        tokens: AccessTokens | None,
        upstream: UpstreamSettings,
    ) -> None:
        self._session = session
        self._object_url = f"{endpoint}/storage/v1/b/{quote(bucket, safe='')}/o/"
        self._list_url = f"{endpoint}/storage/v1/b/{quote(bucket, safe='')}/o"
        self._upload_url = f"{endpoint}/upload/storage/v1/b/{quote(bucket, safe='')}/o"
        self._media_target = f"{urlsplit(endpoint).path.rstrip('/')}/storage/v1/b/{quote(bucket, safe='')}/o/"
        self._media = MediaPool(
            endpoint,
            limit=upstream.pool_size,
            connect_timeout=upstream.connect_timeout,
            idle_timeout=upstream.idle_timeout,
            read_ahead=upstream.buffer_size,
        )
        self._tokens = tokens
        self._upstream = upstream
        self._latency = {op: metrics.UPSTREAM_SECONDS.labels(self.name, op) for op in _OPERATIONS}
        self._ttfb = metrics.UPSTREAM_TTFB.labels(self.name)
        self._retries = metrics.UPSTREAM_RETRIES.labels(self.name)

    @lru_cache(maxsize=4096)  # noqa: B019 - one backend per storage, alive as long as the app
    def _url(self, key: str, query: str) -> URL:
        """The object's encoded URL, built once: yarl then skips re-quoting on every request."""
        return URL(f"{self._object_url}{quote(key, safe='')}?{query}", encoded=True)

    @lru_cache(maxsize=4096)  # noqa: B019 - as _url
    def _media_path(self, key: str) -> str:
        """The object's download target (path and query) for `MediaPool`, quoted once per key."""
        return f"{self._media_target}{quote(key, safe='')}?alt=media"

    async def stat(self, key: str) -> ObjectMeta:
        response = await self._request("stat", self._url(key, f"fields={_META_FIELDS}"))
        async with response:
            if response.status != 200:
                raise _status_error(response.status, key)
            try:
                body = await response.json(content_type=None)
                return ObjectMeta(
                    size=int(body["size"]),
                    etag=f'"{body["generation"]}"',
                    last_modified=_rfc3339_seconds(body["updated"]),
                    content_type=body.get("contentType") or "application/octet-stream",
                    content_encoding=_stored_encoding(body.get("contentEncoding")),
                )
            except TimeoutError:
                raise UpstreamTimeout("storage did not finish answering in time") from None
            except aiohttp.ClientError:
                raise UpstreamUnavailable("storage connection failed while reading metadata") from None
            except (ValueError, KeyError, TypeError):
                raise StorageError("storage answered with malformed object metadata") from None

    async def open(self, key: str, byte_range: ByteRange | None) -> GcsReader:
        headers = {"Accept-Encoding": "gzip"}
        if byte_range is not None:
            headers["Range"] = byte_range.header_value()
        started = time.perf_counter()
        target = self._media_path(key)
        response = await self._attempts("open", lambda headers: self._media.get(target, headers), headers)
        if response.status not in (200, 206):
            response.release()
            if response.status == 416:
                raise RangeNotSatisfiable(key)
            raise _status_error(response.status, key)
        try:
            meta, first, last = _media_meta(response.headers, response.status)
        except (KeyError, ValueError):
            response.close()
            raise StorageError("upstream answered without object metadata headers") from None
        return GcsReader(meta, first, last, response.status == 206, response, self._upstream, self._ttfb, started)

    async def check(self) -> None:
        response = await self._request("check", URL(f"{self._list_url}?maxResults=1&fields=kind", encoded=True))
        async with response:
            if response.status == 404:
                raise BucketNotFound("the bucket does not exist")
            if response.status != 200:
                raise _status_error(response.status, "(bucket listing)")

    async def list_page(
        self, prefix: str, recursive: bool, page_token: str | None, page_size: int
    ) -> tuple[list[ListedObject], str | None]:
        query = {"prefix": prefix, "maxResults": str(page_size), "fields": _LIST_FIELDS}
        if not recursive:
            query["delimiter"] = "/"
        if page_token:
            query["pageToken"] = page_token
        response = await self._request("list", URL(self._list_url).with_query(query))
        async with response:
            if response.status == 404:
                raise BucketNotFound("the bucket does not exist")
            if response.status != 200:
                raise _status_error(response.status, "(bucket listing)")
            try:
                body = await response.json(content_type=None)
                items = [
                    ListedObject(item["name"], str(item["generation"]), int(item.get("size", 0)))
                    for item in body.get("items", ())
                ]
                return items, body.get("nextPageToken") or None
            except TimeoutError:
                raise UpstreamTimeout("storage did not finish the listing in time") from None
            except aiohttp.ClientError:
                raise UpstreamUnavailable("storage connection failed while listing") from None
            except (ValueError, KeyError, TypeError, AttributeError):
                raise StorageError("storage answered with a malformed listing") from None

    async def put_object(self, key: str, data: bytes, content_type: str) -> str:
        """A simple media upload of the whole object; its new generation."""
        url = URL(f"{self._upload_url}?uploadType=media&name={quote(key, safe='')}&fields=generation", encoded=True)
        response = await self._request("put", url, {"Content-Type": content_type}, method="POST", data=data)
        async with response:
            if response.status == 404:
                raise BucketNotFound("the bucket does not exist")
            if response.status in (401, 403):
                raise UpstreamDenied(
                    "storage refused the upload: the credentials lack storage.objects.create "
                    "(and storage.objects.delete to replace an existing object)"
                )
            if response.status not in (200, 201):
                raise StorageError(f"storage refused the upload of {key!r}: {await _error_text(response)}")
            try:
                body = await response.json(content_type=None)
                return str(body["generation"])
            except TimeoutError:
                raise UpstreamTimeout("storage did not finish answering the upload in time") from None
            except aiohttp.ClientError:
                raise UpstreamUnavailable("storage connection failed while answering the upload") from None
            except (ValueError, KeyError, TypeError):
                raise StorageError("storage answered the upload without the object's generation") from None

    async def delete_object(self, key: str) -> bool:
        """True when deleted, False on 404 (the object — or its whole bucket — is not there)."""
        url = URL(f"{self._object_url}{quote(key, safe='')}", encoded=True)
        response = await self._request("delete", url, method="DELETE")
        async with response:
            if response.status in (200, 204):
                return True
            if response.status == 404:
                return False
            if response.status in (401, 403):
                raise UpstreamDenied("storage refused the delete: the credentials lack storage.objects.delete")
            raise StorageError(f"storage refused the delete of {key!r}: {await _error_text(response)}")

    async def object_md5(self, key: str) -> str | None:
        url = URL(f"{self._object_url}{quote(key, safe='')}?fields=md5Hash", encoded=True)
        response = await self._request("md5", url)
        async with response:
            if response.status == 404:
                return None
            if response.status in (401, 403):
                raise UpstreamDenied("storage refused the metadata read: the credentials lack storage.objects.get")
            if response.status != 200:
                raise _status_error(response.status, key)
            try:
                body = await response.json(content_type=None)
                return body.get("md5Hash") or None
            except TimeoutError:
                raise UpstreamTimeout("storage did not finish answering in time") from None
            except aiohttp.ClientError:
                raise UpstreamUnavailable("storage connection failed while reading metadata") from None
            except (ValueError, AttributeError):
                raise StorageError("storage answered with malformed object metadata") from None

    async def close(self) -> None:
        self._media.close()  # the aiohttp session belongs to the application

    async def _request(
        self,
        operation: str,
        url: URL,
        headers: dict[str, str] | None = None,
        *,
        method: str = "GET",
        data: bytes | None = None,
    ) -> aiohttp.ClientResponse:
        """One request on the aiohttp session (see `_attempts`). Only for idempotent requests:
        reads, whole-object uploads, deletes (`data`, the whole body, is sent again with each attempt)."""

        def send(headers: dict[str, str]) -> Awaitable[aiohttp.ClientResponse]:
            return self._session.request(method, url, headers=headers, data=data, allow_redirects=False)

        return await self._attempts(operation, send, headers)

    async def _attempts(
        self, operation: str, send: Callable[[dict[str, str]], Awaitable[_Response]], headers: dict[str, str] | None
    ) -> _Response:
        """`send(headers)` with retries of connect errors, 408, 429 and 5xx, all before the first
        byte of the answer; the access token is (re)applied to `headers` before each attempt."""
        headers = dict(headers or {})
        upstream = self._upstream
        for attempt in range(upstream.retries + 1):
            if self._tokens is not None:
                try:
                    await self._tokens.apply(headers)
                except google.auth.exceptions.GoogleAuthError:
                    metrics.UPSTREAM_ERRORS.labels(self.name, "credentials").inc()
                    raise UpstreamDenied("could not obtain a Google access token") from None
            started = time.perf_counter()
            try:
                async with asyncio.timeout(upstream.first_byte_timeout):
                    response = await send(headers)
            except aiohttp.ConnectionTimeoutError:  # before TimeoutError: it is one too
                failure: str = "connect"
            except TimeoutError:
                metrics.UPSTREAM_ERRORS.labels(self.name, "timeout").inc()
                raise UpstreamTimeout("storage did not answer in time") from None
            except (aiohttp.ClientError, ConnectionFailed, BodyBroken):
                failure = "connect"
            else:
                metrics.BATCH.observe(self._latency[operation], time.perf_counter() - started)
                if response.status not in _RETRYABLE and response.status < 500:
                    return response
                response.release()
                failure = "5xx" if response.status >= 500 else "throttled"
            metrics.UPSTREAM_ERRORS.labels(self.name, failure).inc()
            if attempt < upstream.retries:
                self._retries.inc()
                await asyncio.sleep(upstream.retry_backoff * 2**attempt * random.uniform(0.5, 1.5))
        raise UpstreamUnavailable(
            {"connect": "storage is unreachable", "throttled": "storage keeps throttling requests"}.get(
                failure, "storage answered with a server error"
            )
        )


class GcsReader:
    def __init__(
        self,
        meta: ObjectMeta,
        first: int,
        last: int,
        partial: bool,
        response: MediaResponse,
        upstream: UpstreamSettings,
        ttfb: Histogram,
        started: float,
    ) -> None:
        self.meta, self.first, self.last, self.partial = meta, first, last, partial
        self._response, self._upstream, self._ttfb, self._started = response, upstream, ttfb, started

    async def chunks(self) -> AsyncIterator[bytes]:
        expected, received = self.last - self.first + 1, 0
        read = self._response.read
        try:
            while received < expected:
                try:
                    chunk = await read()
                except (BodyBroken, TimeoutError) as exc:
                    kind = "timeout" if isinstance(exc, TimeoutError) else "broken"
                    metrics.UPSTREAM_ERRORS.labels("gcs", kind).inc()
                    raise UpstreamBroken("storage connection failed mid-body") from None
                if not chunk:
                    metrics.UPSTREAM_ERRORS.labels("gcs", "broken").inc()
                    raise UpstreamBroken("storage body ended early")
                if received == 0:
                    metrics.BATCH.observe(self._ttfb, time.perf_counter() - self._started)
                received += len(chunk)
                yield chunk
        finally:
            self.close()

    def close(self) -> None:
        self._response.release()  # an unread body closes the connection rather than draining it


def _status_error(status: int, key: str) -> StorageError:
    if status == 404:
        return ObjectNotFound(key)
    if status in (401, 403):
        return UpstreamDenied("storage refused the gateway's credentials for this object")
    return StorageError(f"storage answered {status}")


async def _error_text(response: aiohttp.ClientResponse) -> str:
    """The status and GCS's error message (which names the problem, never credentials or content)."""
    try:
        body = await response.json(content_type=None)
        message = str(body["error"]["message"])
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError):
        return f"{response.status}"
    return f"{response.status} {message[:200]}"


def _media_meta(headers: CIMultiDictProxy[str], status: int) -> tuple[ObjectMeta, int, int]:
    """Object metadata and the delivered span from a media response's headers."""
    if status == 206:
        unit_span, _, total = headers["Content-Range"].partition("/")
        first_text, _, last_text = unit_span.removeprefix("bytes ").partition("-")
        first, last, size = int(first_text), int(last_text), int(total)
    else:
        size = int(headers["Content-Length"])
        first, last = 0, size - 1
    meta = ObjectMeta(
        size=size,
        etag=f'"{headers["X-Goog-Generation"]}"',
        last_modified=_http_date_seconds(headers["Last-Modified"]),
        content_type=headers.get("Content-Type") or "application/octet-stream",
        content_encoding=_stored_encoding(
            headers.get("X-Goog-Stored-Content-Encoding", headers.get("Content-Encoding"))
        ),
    )
    return meta, first, last


def _stored_encoding(value: str | None) -> str | None:
    return None if not value or value == "identity" else value


@lru_cache(maxsize=1024)
def _http_date_seconds(value: str) -> int:
    """Last-Modified of a media response: the same few dates over and over, so parsed once."""
    return int(parsedate_to_datetime(value).timestamp())


def _rfc3339_seconds(value: str) -> int:
    return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
