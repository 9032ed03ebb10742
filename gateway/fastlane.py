"""The front of every connection: media cache hits answered without aiohttp, the rest handed to it.

A revalidation (304), a cached signed-URL redirect (303) or a HEAD of a media route costs aiohttp
about as much CPU as the gateway's own decision: request and response objects, the router, the
middleware and signal layers, header serialisation. This protocol reads each request head,
parses it with llhttp (httptools), and if `MediaHandler.from_caches` can answer it, writes the
answer at once — the same status, headers and metrics as the full path. The first request it
cannot answer (another route, a request with a body, a cache miss, a refusal to explain, a body
to stream) hands the connection, with every byte not yet answered, to aiohttp's protocol, which
serves it from then on. So a connection is the fast lane's only while it carries cache hits.

Kept deliberately small: only bodiless GET and HEAD requests of HTTP/1.1 keep-alive clients,
without `Origin` (CORS answers stay with aiohttp), `Expect`, `Upgrade`, a body or a
percent-encoded path are taken; the rest is aiohttp's. llhttp rejects malformed heads, which
are handed over as they came so that aiohttp answers 400.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie

import httptools
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .config import Settings
from .errors import Refused
from .netguard import ClientGuard
from .proxy import Bodiless, MediaHandler

# The two media routes as aiohttp matches them, on the raw path; a percent-encoded one is aiohttp's.
_MEDIA_PATH = re.compile(rb"/(?:tasks/(\d{1,18})|projects/([^/?%#{}]+))/resolve/")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_MAX_HEAD = 16 * 1024  # longer heads go to aiohttp, which answers 431 or 400 by its own limits
KEEPALIVE_SECONDS = 75.0  # web.run_app's keep-alive timeout, for both lanes
_REASONS = {status.value: status.phrase for status in HTTPStatus}


class MediaFront:
    """Turns a request head into answer bytes when the caches decide it (`answer`), for one app."""

    def __init__(self, settings: Settings, media: MediaHandler, guard: ClientGuard, recorder: object) -> None:
        self._settings = settings
        self._media = media
        self._guard = guard
        self._recorder = recorder  # gateway.app.RequestRecorder: the same metrics and access log
        self._vary = settings.cors.origins != ()
        self._date = (0, "")
        self.connections: set[FastLane] = set()

    def answer(self, head: bytes, peer: str | None) -> bytes | None:
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
        request_id = incoming if _REQUEST_ID.fullmatch(incoming) else os.urandom(8).hex()
        data = self._serialise(answer, request_id, verb == "HEAD")
        if data is None:
            return None
        seconds = time.perf_counter() - started
        route = "task_resolve" if task_id is not None else "project_resolve"
        self._recorder.account(route, answer.mode, answer.status, len(data), seconds)  # type: ignore[attr-defined]
        if self._settings.server.access_log:
            self._recorder.write(  # type: ignore[attr-defined]
                {
                    "request_id": request_id,
                    "method": verb,
                    "path": path.decode("latin-1"),
                    "status": answer.status,
                    "bytes": len(data),
                    "duration_ms": round(seconds * 1000, 2),
                    "sub": answer.sub,
                    "task": task_id,
                    "error": None,
                    "remote": None if client is None else str(client),
                    "peer": peer,
                }
            )
        return data

    def _serialise(self, answer: Bodiless, request_id: str, head_only: bool) -> bytes | None:
        lines = [f"HTTP/1.1 {answer.status} {_REASONS[answer.status]}"]
        for name, value in answer.headers.items():
            if "\r" in value or "\n" in value:
                return None  # aiohttp refuses such a header too: let it answer
            lines.append(f"{name}: {value}")
        if answer.status != 304:
            lines.append(f"Content-Length: {answer.length}")
        if self._vary:
            lines.append("Vary: Origin")
        lines.append(f"Date: {self._http_date()}")
        lines.append("Server: media-gateway")
        lines.append(f"X-Request-ID: {request_id}")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return data if head_only else data + answer.body

    def _http_date(self) -> str:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True))
        return self._date[1]

    def close_all(self) -> None:
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
        self._paused = False  # the client is not reading our answers: stop reading its requests
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
        self._serve()

    def _serve(self) -> None:
        buffer, transport = self._buffer, self._transport
        assert transport is not None
        while not self._paused:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > _MAX_HEAD or b"\n\n" in buffer:  # too long, or bare LF line ends: aiohttp says 400
                    self._hand_over()
                else:
                    self._arm()
                return
            answer = self._front.answer(bytes(buffer[: end + 4]), self._peer)
            if answer is None:
                self._hand_over()
                return
            del buffer[: end + 4]
            transport.write(answer)

    def pause_writing(self) -> None:
        self._paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()
            self._serve()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._front.connections.discard(self)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _hand_over(self) -> None:
        """From now on aiohttp's protocol owns the connection, starting with the unanswered bytes."""
        self._disarm()
        self._front.connections.discard(self)
        transport = self._transport
        assert transport is not None
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
        if quiet >= self._keepalive:
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
            listener.close()  # no new connections; aiohttp's shutdown below waits for its requests
        front.close_all()  # the fast lane's connections have no request in progress between reads
        await runner.cleanup()
