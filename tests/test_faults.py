"""Upstream faults between the gateway and a real fake-gcs-server: retries, timeouts, broken and abandoned bodies.

A fault-injecting aiohttp server sits between the gateway (STORAGE_EMULATOR_HOST points at it) and the
emulator. It forwards every GCS JSON API request, except that each test may script how the media
downloads (`alt=media`) are answered: an error status, no answer at all, a body cut or stalled after
its first bytes. It counts the media requests it saw and keeps each one's transport, so a test can
tell whether the gateway dropped its upstream connection.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import REGISTRY as PROMETHEUS
from yarl import URL

from gateway import metrics
from gateway.app import create_app
from gateway.state import REGISTRY

from .conftest import PROJECT, Emulator, MediaWorld, StoredObject, build_settings, free_port, seed

RETRIES = 2  # so a persistent failure costs exactly three upstream attempts
FIRST_BYTE_TIMEOUT = 1.0
IDLE_TIMEOUT = 1.0
UPSTREAM = {
    "connect_timeout": 1.0,
    "first_byte_timeout": FIRST_BYTE_TIMEOUT,
    "idle_timeout": IDLE_TIMEOUT,
    "retries": RETRIES,
    "retry_backoff": 0.01,
}
SAFETY = 5.0  # only a safety net: a healthy gateway settles every case well before this
CLIP = "video/clip.bin"
CLIP_SIZE = 300_000
BIG = "video/big.bin"
BIG_SIZE = 20 * 1024 * 1024
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"})

Fault = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FaultProxy:
    """Forwards GCS JSON API requests to the emulator; media downloads follow the scripted faults."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.script: list[Fault] = []  # one fault per media request, in order; then `otherwise`
        self.otherwise: Fault = self.forward
        self.media_requests = 0
        self.other_requests = 0
        self.transports: list[asyncio.BaseTransport] = []  # one per media request
        self.write_failures = 0  # writes to the gateway that failed because it dropped the connection
        self.stalled = asyncio.Event()  # a handler has started to stall
        self.release = asyncio.Event()  # set at teardown: stalled handlers give up
        self.app = web.Application()
        self.app.cleanup_ctx.append(self._session)
        self.app.router.add_route("*", "/{tail:.*}", self._dispatch)

    async def _session(self, _app: web.Application) -> AsyncIterator[None]:
        self.session = aiohttp.ClientSession(auto_decompress=False)
        yield
        await self.session.close()

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("alt") != "media":
            self.other_requests += 1
            return await self.forward(request)
        self.media_requests += 1
        assert request.transport is not None
        self.transports.append(request.transport)
        fault = self.script.pop(0) if self.script else self.otherwise
        return await fault(request)

    async def _upstream_request(self, request: web.Request):  # type: ignore[no-untyped-def]
        """The same request to the emulator, body included (uploads)."""
        kept = ("range", "accept-encoding", "content-type")
        headers = {k: v for k, v in request.headers.items() if k.lower() in kept}
        url = URL(self.upstream + str(request.rel_url), encoded=True)
        body = await request.read() if request.can_read_body else None
        return self.session.request(request.method, url, headers=headers, data=body)

    async def forward(self, request: web.Request) -> web.StreamResponse:
        """Relay the emulator's answer chunk by chunk, with backpressure from the gateway."""
        async with await self._upstream_request(request) as upstream:
            response = web.StreamResponse(status=upstream.status, headers=_end_to_end(upstream.headers))
            if "Content-Length" in upstream.headers:
                response.content_length = int(upstream.headers["Content-Length"])
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_chunked(64 * 1024):
                    await response.write(chunk)
            except ConnectionResetError:
                self.write_failures += 1
                return response
            await response.write_eof()
            return response

    async def _real(self, request: web.Request) -> tuple[int, CIMultiDict[str], bytes]:
        async with await self._upstream_request(request) as upstream:
            return upstream.status, _end_to_end(upstream.headers), await upstream.read()

    @staticmethod
    def status(code: int) -> Fault:
        """Answer with an error status and a GCS-style JSON error body."""

        async def fault(_request: web.Request) -> web.StreamResponse:
            body = {"error": {"code": code, "message": f"injected {code}"}}
            return web.json_response(body, status=code)

        return fault

    def never_answer(self) -> Fault:
        """Accept the request and send nothing at all, until the test ends."""

        async def fault(_request: web.Request) -> web.StreamResponse:
            self.stalled.set()
            await self.release.wait()
            return web.Response(status=503)

        return fault

    def cut_after(self, sent: int) -> Fault:
        """The real status and headers (Content-Length of the whole object), `sent` bytes, then a closed socket."""

        async def fault(request: web.Request) -> web.StreamResponse:
            response = await self._partial(request, sent)
            assert request.transport is not None
            request.transport.close()  # flushes what was written, then FIN
            return response

        return fault

    def stall_after(self, sent: int) -> Fault:
        """The real status and headers, `sent` bytes, then silence on an open connection."""

        async def fault(request: web.Request) -> web.StreamResponse:
            response = await self._partial(request, sent)
            self.stalled.set()
            await self.release.wait()
            if request.transport is not None:
                request.transport.close()
            return response

        return fault

    async def _partial(self, request: web.Request, sent: int) -> web.StreamResponse:
        status, headers, body = await self._real(request)
        assert status == 200 and sent < len(body), (status, len(body))
        for name in ("X-Goog-Generation", "Last-Modified", "Content-Type"):
            assert name in headers, f"the emulator's media response lacks {name}"
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[:sent])
        return response


def _end_to_end(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in _HOP_BY_HOP)


@dataclass
class Rig:
    proxy: FaultProxy
    world: MediaWorld
    app: web.Application
    emulator: Emulator

    @property
    def clip(self) -> bytes:
        return self.world.objects[CLIP].data

    async def get(self, key: str = CLIP, task: int | None = None) -> aiohttp.ClientResponse:
        task = self.world.task_a if task is None else task
        return await self.world.client.get(self.world.url(key, task), headers=self.world.auth(tasks=[task]))

    async def warm(self, key: str = CLIP, task: int | None = None) -> None:
        """Token, task and metadata cached (a HEAD downloads no media): what follows is a cache hit."""
        task = self.world.task_a if task is None else task
        response = await self.world.client.head(self.world.url(key, task), headers=self.world.auth(tasks=[task]))
        assert response.status == 200

    async def add_object(self, obj: StoredObject) -> int:
        """Upload one more object and a task referencing it; returns the task id."""
        await asyncio.to_thread(
            self.emulator.upload, self.world.bucket, obj.key, obj.data, obj.content_type, obj.encoding
        )
        self.world.objects[obj.key] = obj
        (task,) = await self.app[REGISTRY].add_tasks(PROJECT, [{"data": {"video": self.world.uri(obj.key)}}])
        return task


async def _gateway(tmp_path, aiohttp_client, emulator: Emulator, front=None) -> tuple[MediaWorld, web.Application]:
    """A gateway over a fresh emulator bucket; STORAGE_EMULATOR_HOST must already be set. With
    `front` (the `fastlane` fixture), served by `gateway serve`'s front, each answer's lane checked."""
    bucket = f"faults-{uuid.uuid4().hex[:12]}"
    objects = [StoredObject(CLIP, os.urandom(CLIP_SIZE), "application/octet-stream")]
    storage = seed("gcs", bucket, objects, tmp_path, emulator)
    settings = build_settings([storage], tmp_path, upstream=UPSTREAM)
    world = MediaWorld("gcs", bucket, {o.key: o for o in objects}, settings)
    app = create_app(settings)
    (world.task_a,) = await app[REGISTRY].add_tasks(PROJECT, [{"data": {"video": world.uri(CLIP)}}])
    world.client = await (front(app) if front is not None else aiohttp_client(app, auto_decompress=False))
    return world, app


@pytest.fixture(params=["aiohttp", "front"])
async def rig(request, emulator, aiohttp_server, aiohttp_client, monkeypatch, tmp_path, fastlane) -> AsyncIterator[Rig]:
    proxy = FaultProxy(emulator.url)
    server = await aiohttp_server(proxy.app, host="127.0.0.1")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"127.0.0.1:{server.port}")
    world, app = await _gateway(tmp_path, aiohttp_client, emulator, fastlane if request.param == "front" else None)
    try:
        yield Rig(proxy, world, app, emulator)
    finally:
        proxy.release.set()  # let stalled handlers finish before the servers shut down


def _sample(name: str, **labels: str) -> float:
    metrics.BATCH.flush()  # the request path writes its metrics in batches
    return PROMETHEUS.get_sample_value(name, labels) or 0.0


def _retries() -> float:
    return _sample("gateway_upstream_retries_total", backend="gcs")


def _errors(kind: str) -> float:
    return _sample("gateway_upstream_errors_total", backend="gcs", kind=kind)


def _active_streams() -> float:
    return _sample("gateway_active_streams")


async def _json_error(response: aiohttp.ClientResponse, status: int, reason: str) -> dict[str, str]:
    body = await response.read()
    assert response.status == status, body
    assert response.headers["Content-Type"].startswith("application/json")
    document = json.loads(body)
    assert document["error"] == reason, document
    assert document["message"]
    return document


def _mismatch(received: bytes, data: bytes) -> int:
    """The first offset where `received` departs from `data`."""
    return next((i for i, (a, b) in enumerate(zip(received, data, strict=False)) if a != b), len(data))


async def _eventually(predicate: Callable[[], bool], what: str, timeout: float = SAFETY) -> None:
    """Poll a condition against a deadline (never a fixed sleep standing in for synchronisation)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


async def _read_until_failure(response: aiohttp.ClientResponse) -> tuple[bytes, BaseException | None]:
    """The body bytes received and the error that ended the read (None for a complete body).

    Fails the test when the safety net, not the gateway, ends the read: a gateway that leaves a
    short body hanging on an open connection is exactly the bug these tests look for.
    """
    received = bytearray()
    safety = asyncio.timeout(SAFETY)
    try:
        async with safety:
            async for chunk in response.content.iter_any():
                received += chunk
    except aiohttp.ClientPayloadError as exc:
        return bytes(received), exc
    except TimeoutError:
        if not safety.expired():
            raise
        pytest.fail(
            f"the body hung: {len(received)} of {response.headers.get('Content-Length')} bytes, then nothing "
            f"for {SAFETY}s on an open connection; tail {bytes(received[-120:])!r}"
        )
    return bytes(received), None


# 1. Upstream down ------------------------------------------------------------------------------


async def test_upstream_down_closed_port_is_502_after_all_attempts(emulator, aiohttp_client, monkeypatch, tmp_path):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")  # nothing listens there
    world, _app = await _gateway(tmp_path, aiohttp_client, emulator)
    retries, connect_errors = _retries(), _errors("connect")
    response = await world.client.get(world.url(CLIP), headers=world.auth())
    await _json_error(response, 502, "upstream_unavailable")
    assert _errors("connect") - connect_errors == RETRIES + 1
    assert _retries() - retries == RETRIES


async def test_upstream_closing_every_connection_is_502_after_retries_plus_one(
    emulator, aiohttp_client, monkeypatch, tmp_path
):
    """A listener that accepts, reads the request head and hangs up: one connection per attempt."""
    seen: list[bytes] = []

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            seen.append(await reader.readuntil(b"\r\n\r\n"))
        except (asyncio.IncompleteReadError, ConnectionError):
            seen.append(b"")
        finally:
            writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"127.0.0.1:{port}")
        world, _app = await _gateway(tmp_path, aiohttp_client, emulator)
        retries, connect_errors = _retries(), _errors("connect")
        response = await world.client.get(world.url(CLIP), headers=world.auth())
        await _json_error(response, 502, "upstream_unavailable")
        # The gateway makes retries + 1 attempts, each on a new connection (a request is sent again
        # at once only when a pooled connection turns out to have been closed while idle).
        assert _errors("connect") - connect_errors == RETRIES + 1
        assert len(seen) == RETRIES + 1
        assert all(head.startswith(b"GET /storage/v1/b/") and b"alt=media" in head for head in seen), seen
        assert _retries() - retries == RETRIES
    finally:
        server.close()
        await server.wait_closed()


# 2./3. Server errors before the first byte ------------------------------------------------------


@pytest.mark.parametrize("code", [500, 503, 429, 408])
async def test_one_retryable_error_then_success_is_retried_transparently(rig, code):
    rig.proxy.script = [rig.proxy.status(code)]
    retries = _retries()
    response = await rig.get()
    body = await response.read()
    assert response.status == 200
    assert body == rig.clip
    assert int(response.headers["Content-Length"]) == CLIP_SIZE
    assert rig.proxy.media_requests == 2
    assert _retries() - retries == 1


@pytest.mark.parametrize("code", [500, 503])
async def test_persistent_server_error_is_502_after_retries_plus_one(rig, code):
    rig.proxy.otherwise = rig.proxy.status(code)
    retries, server_errors = _retries(), _errors("5xx")
    await _json_error(await rig.get(), 502, "upstream_unavailable")
    assert rig.proxy.media_requests == RETRIES + 1
    assert _retries() - retries == RETRIES
    assert _errors("5xx") - server_errors == RETRIES + 1


# 4. Connection cut mid-body ---------------------------------------------------------------------

CUT_AT = 100_000


@pytest.mark.parametrize("cut_at", [CUT_AT, CLIP_SIZE - 50], ids=["early", "near-the-end"])
async def test_cut_mid_body_is_an_incomplete_body_for_the_client(rig, cut_at):
    """Near the end, anything the gateway appended would complete the body: silent corruption."""
    await rig.warm()
    rig.proxy.script = [rig.proxy.cut_after(cut_at)]
    broken = _errors("broken")
    response = await rig.get()
    assert response.status == 200
    assert int(response.headers["Content-Length"]) == CLIP_SIZE
    received, error = await _read_until_failure(response)
    assert received == rig.clip[: len(received)], (
        f"bytes the upstream never sent reached the client at offset {_mismatch(received, rig.clip)}: "
        f"{received[_mismatch(received, rig.clip) :][:120]!r}"
    )
    assert isinstance(error, aiohttp.ClientPayloadError), f"a complete-looking body of {len(received)} bytes"
    assert len(received) <= cut_at
    assert rig.proxy.media_requests == 1  # nothing is retried once the body has started
    assert _errors("broken") - broken == 1


async def test_cut_mid_body_closes_the_client_connection_raw(rig):
    """On the wire: the gateway's status line and headers, at most the bytes it got, then EOF."""
    await rig.warm()
    rig.proxy.script = [rig.proxy.cut_after(CUT_AT)]
    server = rig.world.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        auth = rig.world.auth()["Authorization"]
        writer.write(
            f"GET {rig.world.url(CLIP)} HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n"
            f"Authorization: {auth}\r\n\r\n".encode()
        )
        await writer.drain()
        received = bytearray()
        safety = asyncio.timeout(SAFETY)
        try:
            async with safety:
                while chunk := await reader.read(65536):
                    received += chunk
        except TimeoutError:
            assert safety.expired()
            head, _, body = bytes(received).partition(b"\r\n\r\n")
            pytest.fail(
                f"the gateway kept the connection open after the upstream broke: {len(body)} body bytes for "
                f"{head.split(b' ', 2)[:2]!r}, trailing {body[CUT_AT - 16 : CUT_AT + 160]!r}"
            )
        except ConnectionResetError:
            pass  # an abort (RST) is as good an end as a FIN
    finally:
        writer.close()
    head, separator, body = bytes(received).partition(b"\r\n\r\n")
    assert separator, received[:300]
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert int(headers["content-length"]) == CLIP_SIZE
    assert len(body) <= CUT_AT, f"{len(body) - CUT_AT} bytes more than the upstream sent: {body[CUT_AT:][:200]!r}"
    assert body == rig.clip[: len(body)]


# 5. Refusals from storage -----------------------------------------------------------------------


@pytest.mark.parametrize(("upstream", "status", "reason"), [(403, 502, "upstream_denied"), (404, 404, "not_found")])
async def test_upstream_refusals_are_answered_without_retry(rig, upstream, status, reason):
    rig.proxy.otherwise = rig.proxy.status(upstream)
    retries = _retries()
    await _json_error(await rig.get(), status, reason)
    assert rig.proxy.media_requests == 1
    assert _retries() == retries


async def test_object_missing_from_the_emulator_is_404_not_found(rig):
    """A real 404 from fake-gcs-server, forwarded untouched."""
    missing = StoredObject("video/gone.bin", b"x" * 10, "application/octet-stream")
    (task,) = await rig.app[REGISTRY].add_tasks(PROJECT, [{"data": {"video": rig.world.uri(missing.key)}}])
    await _json_error(await rig.get(missing.key, task), 404, "not_found")
    assert rig.proxy.media_requests == 1


# 6. First-byte timeout --------------------------------------------------------------------------


async def test_silent_upstream_is_504_after_the_first_byte_timeout(rig):
    rig.proxy.otherwise = rig.proxy.never_answer()
    timeouts = _errors("timeout")
    started = time.monotonic()
    response = await rig.get()
    elapsed = time.monotonic() - started
    await _json_error(response, 504, "upstream_timeout")
    assert rig.proxy.stalled.is_set()
    assert FIRST_BYTE_TIMEOUT * 0.9 <= elapsed < 10, elapsed
    assert rig.proxy.media_requests == 1  # a timeout is not retried
    assert _errors("timeout") - timeouts == 1


# 7. Idle timeout mid-body -----------------------------------------------------------------------


async def test_upstream_stalling_mid_body_fails_the_client_read(rig):
    await rig.warm()
    rig.proxy.script = [rig.proxy.stall_after(64 * 1024)]
    started = time.monotonic()
    response = await rig.get()
    assert response.status == 200
    assert int(response.headers["Content-Length"]) == CLIP_SIZE
    received, error = await _read_until_failure(response)
    elapsed = time.monotonic() - started
    assert isinstance(error, aiohttp.ClientPayloadError), f"a complete-looking body of {len(received)} bytes"
    assert len(received) <= 64 * 1024
    assert received == rig.clip[: len(received)]
    assert rig.proxy.stalled.is_set()
    assert IDLE_TIMEOUT * 0.9 <= elapsed < SAFETY, elapsed
    assert rig.proxy.media_requests == 1


# 8. Client disconnect mid-stream ----------------------------------------------------------------


async def test_client_leaving_mid_stream_releases_the_upstream_connection(rig):
    task = await rig.add_object(StoredObject(BIG, os.urandom(BIG_SIZE), "application/octet-stream"))
    await rig.warm(BIG, task)
    before = _active_streams()
    response = await rig.get(BIG, task)
    assert response.status == 200
    assert int(response.headers["Content-Length"]) == BIG_SIZE
    head = await response.content.readexactly(8 * 1024)
    assert head == rig.world.objects[BIG].data[: len(head)]
    assert _active_streams() == before + 1
    response.close()  # hang up with most of the object unread

    assert rig.proxy.media_requests == 1
    upstream = rig.proxy.transports[0]
    await _eventually(upstream.is_closing, "the gateway to drop its upstream connection")
    await _eventually(lambda: _active_streams() == before, "gateway_active_streams to return to its value")
    assert rig.proxy.media_requests == 1


async def test_upstream_request_counts(rig: Rig) -> None:
    """A cold GET costs one upstream request; HEAD, 304, 412 and 416 never download media."""
    proxy = rig.proxy
    response = await rig.get()
    assert response.status == 200 and await response.read() == rig.clip
    assert (proxy.media_requests, proxy.other_requests) == (1, 0)  # metadata came with the media
    etag = response.headers["ETag"]
    headers = rig.world.auth()
    url = rig.world.url(CLIP)
    for extra, status in [
        ({"If-None-Match": etag}, 304),
        ({"If-Match": '"x"'}, 412),
        ({"Range": "bytes=999999-"}, 416),
    ]:
        assert (await rig.world.client.get(url, headers={**headers, **extra})).status == status
    assert (await rig.world.client.head(url, headers=headers)).status == 200
    assert (proxy.media_requests, proxy.other_requests) == (1, 0)  # all answered from the metadata cache
    ranged = await rig.world.client.get(url, headers={**headers, "Range": "bytes=10-19"})
    assert await ranged.read() == rig.clip[10:20]
    assert (proxy.media_requests, proxy.other_requests) == (2, 0)
