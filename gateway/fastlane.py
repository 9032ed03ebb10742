"""The front of every connection: media cache hits answered without aiohttp, the rest handed to it.

For a media request whose token, task and object metadata are cached, aiohttp's share of the
work — request and response objects, the router, the middleware and signal layers, header
serialisation, `StreamResponse` writes — costs as much CPU as the gateway's own decisions, or
more. This protocol reads each request head, parses it with llhttp (httptools) and asks
`MediaHandler.from_caches`. A bodiless answer (304, a cached signed-URL 303, a HEAD) is written
at once; a GET's body is streamed from storage (`MediaFront.stream`: the stream caps, the
full path's headers, backpressure from the client's socket, an abort if storage breaks
mid-body). Status, headers, metrics and access line are the full path's. The first request it
cannot answer (another route, a request with a body, a cache miss, a refusal to explain, an
object changed since its metadata was cached) hands the connection, with every byte not yet
answered, to aiohttp's protocol, which serves it from then on. So a connection is the fast
lane's only while it carries cache hits.

Kept deliberately small: only GET and HEAD requests without a body from HTTP/1.1 keep-alive
clients, without `Origin` (CORS answers stay with aiohttp), `Expect`, `Upgrade` or a
percent-encoded path, are taken; the rest is aiohttp's. llhttp rejects malformed heads, which
are handed over as they came so that aiohttp answers 400.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie

import httptools
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from . import metrics
from .config import Settings
from .errors import Refused
from .netguard import ClientGuard, IPAddress, StreamLimiter
from .proxy import Bodiless, MediaHandler, Streamed
from .storage import StorageError

# The two media routes as aiohttp matches them, on the raw path; a percent-encoded one is aiohttp's.
_MEDIA_PATH = re.compile(rb"/(?:tasks/(\d{1,18})|projects/([^/?%#{}]+))/resolve/")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_MAX_HEAD = 16 * 1024  # longer heads go to aiohttp, which answers 431 or 400 by its own limits
KEEPALIVE_SECONDS = 75.0  # web.run_app's keep-alive timeout, for both lanes
_REASONS = {status.value: status.phrase for status in HTTPStatus}
log = logging.getLogger("gateway.proxy")  # the full path's logger: one place to read stream failures


@dataclass(slots=True)
class _Exchange:
    """A request the fast lane took: what its answer, metrics and access line need."""

    started: float
    request_id: str
    method: str
    path: str
    route: str
    task: int | None
    client: IPAddress | None
    peer: str | None
    head_only: bool


class MediaFront:
    """The fast lane's decisions and answers for one app: `take` a request head, then write a
    bodiless answer (`bodiless`) or stream one (`stream`)."""

    def __init__(
        self, settings: Settings, media: MediaHandler, guard: ClientGuard, limiter: StreamLimiter, recorder: object
    ) -> None:
        self._settings = settings
        self._media = media
        self._guard = guard
        self._limiter = limiter
        self._recorder = recorder  # gateway.app.RequestRecorder: the same metrics and access log
        self._vary = settings.cors.origins != ()
        self._date = (0, "")
        self.connections: set[FastLane] = set()

    def take(self, head: bytes, peer: str | None) -> tuple[_Exchange, Bodiless | Streamed] | None:
        """The exchange and its answer when the caches decide this request head, else None."""
        started = time.perf_counter()
        request = _Head()
        request.parser = parser = httptools.HttpRequestParser(request)
        try:
            parser.feed_data(head)
        except httptools.HttpParserError:
            return None
        method = request.method
        if method not in (b"GET", b"HEAD") or not request.keep_alive or request.version != "1.1":
            return None
        target = request.url
        path, _, query_string = target.partition(b"?")
        match = _MEDIA_PATH.fullmatch(path)
        if match is None:
            return None
        headers = CIMultiDictProxy(CIMultiDict(request.headers))
        if (
            "Origin" in headers
            or "Expect" in headers
            or "Transfer-Encoding" in headers
            or headers.get("Content-Length", "0") != "0"
        ):
            return None
        client = self._guard.client(peer, headers)
        if self._guard.allowed:
            try:
                self._guard.admit(client)
            except Refused:
                return None
        task_text, project_bytes = match.groups()
        task_id = int(task_text) if task_text is not None else None
        project = project_bytes.decode("latin-1") if project_bytes is not None else None
        query = URL.build(query_string=query_string.decode("utf-8", "surrogateescape"), encoded=True).query
        verb = method.decode()
        answer = self._media.from_caches(verb, task_id, project, query, headers, _Cookies(headers), client)
        if answer is None:
            return None
        incoming = headers.get("X-Request-ID", "")
        exchange = _Exchange(
            started,
            incoming if _REQUEST_ID.fullmatch(incoming) else os.urandom(8).hex(),
            verb,
            path.decode("latin-1"),
            "task_resolve" if task_id is not None else "project_resolve",
            task_id,
            client,
            peer,
            verb == "HEAD",
        )
        return exchange, answer

    def bodiless(self, exchange: _Exchange, answer: Bodiless) -> bytes | None:
        """The answer's bytes, accounted; None if a header cannot be written (aiohttp then answers)."""
        head = self._head(exchange, answer.status, answer.headers, answer.length)
        if head is None:
            return None
        data = head if exchange.head_only else head + answer.body
        self._record(exchange, answer.status, answer.mode, answer.sub, len(data), None)
        return data

    async def stream(self, exchange: _Exchange, answer: Streamed, lane: FastLane) -> bool | None:
        """Stream the answer's body from storage to `lane`, as the full path's `_stream` does.

        True: the connection may carry the next request; False: it is closed (the client left, or
        storage broke mid-body); None: nothing was written, hand the request to aiohttp (the object
        changed since its metadata was cached, or a header cannot be written).
        """
        try:
            slot = self._limiter.slot(answer.sub)
        except Refused as exc:  # at a stream cap: the same 503 / 429 the full path sheds with
            lane.write(self._error(exchange, answer.sub, exc.status, exc.reason, exc.message, exc.headers))
            return True
        with slot:
            try:
                reader = await self._media.open_cached(answer)
            except StorageError as exc:
                message = exc.public_message or str(exc)
                lane.write(self._error(exchange, answer.sub, exc.status, exc.reason, message, None))
                return True
            if reader is None:
                return None
            sent, error = 0, None
            metrics.BATCH.inc(metrics.ACTIVE_STREAMS)
            try:
                head = self._head(exchange, answer.plan.status, answer.headers, answer.plan.length)
                if head is None:
                    return None
                lane.write(head)
                sent = len(head)
                async for chunk in reader.chunks():
                    if not lane.write(chunk):
                        return False  # the client went away
                    sent += len(chunk)
                    if lane.paused:
                        await lane.drained()
                return True
            except StorageError as exc:
                # Headers are out: the only honest signal left is to close the connection before
                # Content-Length bytes (what the full path does too).
                error = exc.reason
                log.warning("upstream failed mid-body (%s): aborting the client connection", exc.reason)
                lane.close()
                return False
            finally:
                reader.close()
                metrics.BATCH.inc(metrics.ACTIVE_STREAMS, -1)
                if sent:
                    self._record(exchange, answer.plan.status, "proxy", answer.sub, sent, error)

    def _error(
        self,
        exchange: _Exchange,
        sub: str,
        status: int,
        reason: str,
        message: str,
        headers: dict[str, str] | None,
    ) -> bytes:
        """A JSON error as app.json_error writes it (the same body bytes, status and headers)."""
        body = json.dumps({"error": reason, "message": message}).encode()
        fields = {**(headers or {}), "Content-Type": "application/json; charset=utf-8"}
        head = self._head(exchange, status, fields, len(body))
        assert head is not None  # our own header values
        data = head if exchange.head_only else head + body
        self._record(exchange, status, "proxy", sub, len(data), reason)
        return data

    def _head(self, exchange: _Exchange, status: int, headers: dict[str, str], length: int) -> bytes | None:
        lines = [f"HTTP/1.1 {status} {_REASONS[status]}"]
        for name, value in headers.items():
            if "\r" in value or "\n" in value:
                return None  # aiohttp refuses such a header too: let it answer
            lines.append(f"{name}: {value}")
        if status != 304:
            lines.append(f"Content-Length: {length}")
        if self._vary:
            lines.append("Vary: Origin")
        lines.append(f"Date: {self._http_date()}")
        lines.append("Server: media-gateway")
        lines.append(f"X-Request-ID: {exchange.request_id}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _record(self, exchange: _Exchange, status: int, mode: str, sub: str, sent: int, error: str | None) -> None:
        seconds = time.perf_counter() - exchange.started
        self._recorder.account(exchange.route, mode, status, sent, seconds)  # type: ignore[attr-defined]
        if self._settings.server.access_log:
            self._recorder.write(  # type: ignore[attr-defined]
                {
                    "request_id": exchange.request_id,
                    "method": exchange.method,
                    "path": exchange.path,
                    "status": status,
                    "bytes": sent,
                    "duration_ms": round(seconds * 1000, 2),
                    "sub": sub,
                    "task": exchange.task,
                    "error": error,
                    "remote": None if exchange.client is None else str(exchange.client),
                    "peer": exchange.peer,
                }
            )

    def _http_date(self) -> str:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True))
        return self._date[1]

    async def stop(self, timeout: float) -> None:
        """On shutdown: close idle connections at once, let streams finish for up to `timeout`
        seconds (as aiohttp's shutdown does for its own), then close what is left."""
        streaming = [c.streaming for c in self.connections if c.streaming is not None]
        for connection in list(self.connections):
            connection.stopping = True
            if connection.streaming is None:
                connection.close()
        if streaming:
            await asyncio.wait(streaming, timeout=timeout)
        for connection in list(self.connections):
            connection.close()


class _Head:
    """llhttp's callbacks for one request head."""

    parser: httptools.HttpRequestParser

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.method = b""
        self.version = ""
        self.keep_alive = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        # Read here: llhttp resets them once the message is complete, which for a bodiless
        # request is within the same feed_data call. An upgrade never counts as keep-alive.
        parser = self.parser
        self.method = parser.get_method()
        self.version = parser.get_http_version()
        self.keep_alive = parser.should_keep_alive() and not parser.should_upgrade()


class _Cookies:
    """The Cookie header parsed only if a token is looked for there."""

    def __init__(self, headers: CIMultiDictProxy[str]) -> None:
        self._headers = headers

    def get(self, name: str) -> str | None:
        raw = self._headers.get("Cookie")
        if not raw:
            return None
        try:
            morsel = SimpleCookie(raw).get(name)
        except CookieError:
            return None
        return None if morsel is None else morsel.value


class FastLane(asyncio.Protocol):
    """One connection: answered here while its requests are cache hits, then aiohttp's."""

    def __init__(
        self, front: MediaFront, aiohttp_protocol: Callable[[], asyncio.Protocol], keepalive: float = KEEPALIVE_SECONDS
    ) -> None:
        self._front = front
        self._keepalive = keepalive
        self._aiohttp_protocol = aiohttp_protocol
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self.peer: object = None  # the socket's peer name, as asyncio gives it
        self._peer: str | None = None  # its address, for the client allowlist and the access log
        self.paused = False  # the client is not reading our answers: stop reading its requests
        self._drain: asyncio.Future[None] | None = None
        self._lost = False
        self.streaming: asyncio.Task[None] | None = None  # the body being sent, if any
        self.stopping = False  # shutting down: close once the current answer is out
        self._idle: asyncio.TimerHandle | None = None
        self._active = 0.0  # loop time of the last bytes received

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self.peer = transport.get_extra_info("peername")
        self._peer = self.peer[0] if isinstance(self.peer, tuple) else None
        self._front.connections.add(self)
        self._arm()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self.streaming is None:
            self._serve()
        elif len(self._buffer) > _MAX_HEAD and self._transport is not None:
            self._transport.pause_reading()  # pipelined requests wait for the stream: hold the rest back

    def _serve(self) -> None:
        buffer, transport = self._buffer, self._transport
        assert transport is not None
        while not self.paused and self.streaming is None and not self._lost:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > _MAX_HEAD or b"\n\n" in buffer:  # too long, or bare LF line ends: aiohttp says 400
                    self._hand_over()
                else:
                    self._arm()
                return
            taken = self._front.take(bytes(buffer[: end + 4]), self._peer)
            if taken is None:
                self._hand_over()
                return
            exchange, answer = taken
            if isinstance(answer, Streamed):
                self._disarm()  # a stream's own timeouts bound it
                self.streaming = asyncio.get_running_loop().create_task(self._stream(exchange, answer, end + 4))
                return
            data = self._front.bodiless(exchange, answer)
            if data is None:
                self._hand_over()
                return
            del buffer[: end + 4]
            transport.write(data)

    async def _stream(self, exchange: _Exchange, answer: Streamed, consumed: int) -> None:
        try:
            outcome = await self._front.stream(exchange, answer, self)
        except asyncio.CancelledError:
            if not self._lost:
                raise
            return  # the client left while storage was being read: nothing more to do
        finally:
            self.streaming = None
        if self._lost or outcome is False:
            return
        if outcome is None:
            self._hand_over()  # the request's bytes are still at the buffer's start
            return
        del self._buffer[:consumed]
        if self.stopping:
            self.close()
            return
        if not self.paused and self._transport is not None:
            self._transport.resume_reading()  # if data_received held it back during the stream
        self._serve()

    # -- used by MediaFront.stream
    def write(self, data: bytes) -> bool:
        if self._lost or self._transport is None:
            return False
        self._transport.write(data)
        return True

    async def drained(self) -> None:
        """Until the client has read enough of what was written (or left)."""
        if self.paused and not self._lost:
            self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    # -- asyncio.Protocol
    def pause_writing(self) -> None:
        self.paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        self._wake()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()
            if self.streaming is None:
                self._serve()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._disarm()
        self._front.connections.discard(self)
        self._wake()
        if self.streaming is not None:
            self.streaming.cancel()  # stop reading storage for a client that is gone

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _wake(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def _hand_over(self) -> None:
        """From now on aiohttp's protocol owns the connection, starting with the unanswered bytes."""
        self._disarm()
        self._front.connections.discard(self)
        transport = self._transport
        assert transport is not None
        if self.paused:  # never: a hand-over happens between answers, with the client reading
            transport.resume_reading()
        protocol = self._aiohttp_protocol()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._buffer:
            protocol.data_received(bytes(self._buffer))
        self._buffer.clear()

    def _arm(self) -> None:
        """Close a connection that sends nothing for the keep-alive timeout (also one that never
        completes a request head). One timer per connection, moved on only when it fires."""
        loop = asyncio.get_running_loop()
        self._active = loop.time()
        if self._idle is None:
            self._idle = loop.call_later(self._keepalive, self._expire)

    def _expire(self) -> None:
        loop = asyncio.get_running_loop()
        quiet = loop.time() - self._active
        if self.streaming is not None:
            self._idle = None  # re-armed when the stream ends and the next head is awaited
        elif quiet >= self._keepalive:
            self._idle = None
            self.close()
        else:
            self._idle = loop.call_later(self._keepalive - quiet, self._expire)

    def _disarm(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None


async def serve(
    app: web.Application,
    front: MediaFront,
    host: str,
    port: int,
    *,
    reuse_port: bool,
    shutdown_timeout: float,
    on_listening: Callable[[], None],
    handle_signals: bool = True,
    keepalive_timeout: float = KEEPALIVE_SECONDS,
) -> None:
    """What `web.run_app` does, with `FastLane` in front of aiohttp's protocol: serve until cancelled
    (SIGTERM/SIGINT raise GracefulExit through the runner's handlers), then shut down gracefully."""
    runner = web.AppRunner(
        app, handle_signals=handle_signals, shutdown_timeout=shutdown_timeout, keepalive_timeout=keepalive_timeout
    )
    await runner.setup()
    listener = None
    try:
        aiohttp_protocol = runner.server
        assert aiohttp_protocol is not None
        listener = await asyncio.get_running_loop().create_server(
            lambda: FastLane(front, aiohttp_protocol, keepalive_timeout), host, port, reuse_port=reuse_port, backlog=128
        )
        on_listening()
        await asyncio.Future()  # until cancelled
    finally:
        if listener is not None:
            listener.close()  # no new connections
        # Both lanes let the bodies they are sending finish, for up to shutdown_timeout together.
        await asyncio.gather(front.stop(shutdown_timeout), runner.cleanup())
        metrics.BATCH.flush()  # what streams that ended during the shutdown counted
