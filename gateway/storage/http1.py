"""Keep-alive HTTP/1.1 GETs to one origin, for media downloads: llhttp parsing, explicit read-ahead.

Why not aiohttp's client on this path: a 64 KiB range through `ClientSession.request` costs about
170 µs of CPU against fake-gcs-server, most of it request objects, header processing and timers
that a bodiless GET to one known origin does not need; this client costs about 77 µs
(docs/performance.md). Everything else the GCS backend sends (metadata, listings, uploads,
deletes) stays on aiohttp.

What it does: GET only, no request body, HTTP/1.1 with keep-alive. The response is parsed by
llhttp (httptools), which also undoes chunked transfer coding. A connection goes back to the pool
only after its whole response was read and the server kept it alive; anything else closes it.
A request that fails on a pooled connection before any answer (the server closed it while idle)
is sent once more on a new connection. At most `read_ahead` bytes are buffered per response: past
that, reading from the socket pauses until the caller takes a chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

_KEEPALIVE_SECONDS = 15.0  # an idle pooled connection is closed after this (GCS keeps them longer)
_USER_AGENT = "media-gateway"


class ConnectionFailed(Exception):
    """No answer: the connection could not be made, or broke before the response head arrived."""


class BodyBroken(Exception):
    """The connection broke, or the response was malformed, after the head arrived."""


class MediaPool:
    """Connections to one origin (`scheme://host[:port]`), at most `limit` requests in flight."""

    def __init__(
        self,
        origin: str,
        *,
        limit: int,
        connect_timeout: float,
        idle_timeout: float,
        read_ahead: int,
        ssl_context: ssl.SSLContext | None = None,  # https: the system's trust store unless given
    ) -> None:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) origin: {origin!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        if parts.scheme == "https":
            self._ssl: ssl.SSLContext | None = ssl_context or ssl.create_default_context()
        else:
            self._ssl = None
        host_header = parts.netloc.rpartition("@")[2]
        self._prefix = f"\r\nHost: {host_header}\r\nUser-Agent: {_USER_AGENT}\r\n"
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._read_ahead = read_ahead
        self._slots = asyncio.Semaphore(limit)
        self._idle: deque[_Connection] = deque()
        self._closed = False

    async def get(self, target: str, headers: dict[str, str]) -> MediaResponse:
        """Send `GET target` and wait for the response head (the caller bounds the wait)."""
        lines = [f"GET {target} HTTP/1.1", self._prefix]
        for name, value in headers.items():
            if "\r" in value or "\n" in value:
                raise ValueError(f"header {name} holds a line break")
            lines.append(f"{name}: {value}\r\n")
        lines.append("\r\n")
        request = "".join(lines).encode("latin-1")
        await self._slots.acquire()
        try:
            while self._idle:
                connection = self._idle.pop()  # the most recently used: the least likely to be closed
                if connection.reusable():
                    try:
                        return await connection.send(request)
                    except ConnectionFailed:
                        continue  # closed while idle: try another, or a new one
            return await (await self._connect()).send(request)
        except BaseException:
            self._slots.release()
            raise

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self), self._host, self._port, ssl=self._ssl
                )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise ConnectionFailed(f"cannot connect to {self._host}:{self._port}: {type(exc).__name__}") from None
        return connection

    def _finished(self, connection: _Connection, reuse: bool) -> None:
        """A response is done with its connection: pool it, or close it."""
        self._slots.release()
        if reuse and not self._closed:
            connection.park(_KEEPALIVE_SECONDS)
            self._idle.append(connection)
        else:
            connection.close()

    def _forget(self, connection: _Connection) -> None:
        with contextlib.suppress(ValueError):  # not idle: in use, or already taken out
            self._idle.remove(connection)

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()


class _Connection(asyncio.Protocol):
    """One socket; one response at a time. llhttp calls the `on_*` methods from `feed_data`."""

    def __init__(self, pool: MediaPool) -> None:
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._response: MediaResponse | None = None
        self._head: asyncio.Future[MediaResponse] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._keep_alive = False
        self._interim = False
        self._lost = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._response is None and self._head is None:
            self.close()  # bytes nobody asked for: the connection is out of step
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(BodyBroken(f"malformed response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._pool._forget(self)
        response = self._response
        if response is not None and not response.complete and response.until_close and exc is None:
            self._parser = None  # type: ignore[assignment]
            response._end()  # a body without length or chunking ends with the connection
        else:
            self._fail(BodyBroken("connection closed") if self._response else ConnectionFailed("connection closed"))

    def pause_writing(self) -> None:  # a request head never fills the buffer; nothing to hold back
        pass

    def resume_writing(self) -> None:
        pass

    # -- llhttp callbacks
    def on_message_begin(self) -> None:
        self._headers: list[tuple[str, str]] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        # As aiohttp's parsers decode (the metadata path's JSON keeps Unicode too), so an object's
        # Content-Type is the same text whichever request cached its metadata.
        self._headers.append((name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        self._interim = status < 200
        if self._interim:
            return  # 1xx: an interim answer (nobody asked for one); the real one follows
        headers = CIMultiDictProxy(CIMultiDict(self._headers))
        until_close = "Content-Length" not in headers and "Transfer-Encoding" not in headers
        response = MediaResponse(self, status, headers, until_close)
        self._keep_alive = self._parser.should_keep_alive()  # llhttp forgets it once the message is complete
        self._response = response
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_result(response)

    def on_body(self, body: bytes) -> None:
        assert self._response is not None
        self._response._feed(body)

    def on_message_complete(self) -> None:
        if not self._interim:
            assert self._response is not None
            self._response._end()

    # -- used by the pool and the response
    def reusable(self) -> bool:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        return not self._lost and self._transport is not None and not self._transport.is_closing()

    async def send(self, request: bytes) -> MediaResponse:
        assert self._transport is not None
        self._response = None
        self._head = self._loop.create_future()
        self._parser = httptools.HttpResponseParser(self)
        self._transport.write(request)
        try:
            return await self._head
        except BaseException:
            self.close()  # gave up waiting (timeout, cancellation): the answer may still come
            raise

    def park(self, keepalive: float) -> None:
        self._response = None
        self._idle_timer = self._loop.call_later(keepalive, self.close)

    def pause(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def done(self, reuse: bool) -> None:
        self._pool._finished(self, reuse and not self._lost and self._keep_alive)

    def close(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._transport is not None:
            self._transport.close()
        self._pool._forget(self)

    def _fail(self, exc: Exception) -> None:
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_exception(exc)
        if self._response is not None:
            self._response._break(exc)
        if self._transport is not None:
            self._transport.close()


class MediaResponse:
    """Status, headers and the body as chunks, read with `read()` (b"" at the end)."""

    def __init__(self, connection: _Connection, status: int, headers: CIMultiDictProxy[str], until_close: bool) -> None:
        self.status = status
        self.headers = headers
        self.until_close = until_close
        self.complete = False
        self._connection = connection
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._released = False

    async def read(self) -> bytes:
        """The next chunk of the body; b"" once it is complete. BodyBroken if the connection broke,
        TimeoutError if no byte came for the pool's `idle_timeout`."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self.complete:
                return b""
            self._waiter = self._connection._loop.create_future()
            try:
                async with asyncio.timeout(self._connection._pool._idle_timeout):
                    await self._waiter
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered <= self._connection._pool._read_ahead // 2:
            self._paused = False
            self._connection.resume()
        return chunk

    def at_eof(self) -> bool:
        return self.complete and not self._chunks

    def release(self) -> None:
        """Done with the response: its connection is reused if the body was read to its end."""
        if not self._released:
            self._released = True
            self._connection.done(reuse=self.at_eof() and self._error is None)

    def close(self) -> None:
        """Done with the response, whatever is left unread: its connection is closed."""
        if not self._released:
            self._released = True
            self._connection.done(reuse=False)

    # -- fed by the connection
    def _feed(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if not self._paused and self._buffered > self._connection._pool._read_ahead:
            self._paused = True
            self._connection.pause()
        self._wake()

    def _end(self) -> None:
        self.complete = True
        if self._paused:
            self._paused = False
            self._connection.resume()
        self._wake()

    def _break(self, exc: Exception) -> None:
        if not self.complete:
            self._error = exc
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
