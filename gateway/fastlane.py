"""The protocol of every connection: media requests framed here, the rest handed to aiohttp.

aiohttp's share of a media request — request and response objects, the router, middleware and
signal layers, header serialisation — costs as much CPU as the gateway's own decisions. This
protocol reads each request head with aiohttp's own parser (the same limits, the same decoding),
asks the media core (gateway/media/) what to answer and writes it: bodiless answers at once, from
the caches, without a task; everything that needs I/O (a token to verify, a task to look up,
metadata, a signature, a body to stream) in one task per request through `MediaService.prepare`,
the same code aiohttp's handler calls. It keeps only framing: parse the head, write bytes,
backpressure, hand-over. The first request it does not frame (another route, a method other than
GET/HEAD, a body, HTTP/1.0, an upgrade, a percent-encoded path, a head aiohttp's parser refuses)
hands the connection, with every byte not yet answered, to aiohttp's protocol; this protocol
stays in front of it, forwarding, so the connection discipline below holds on both lanes:

* a deadline for a complete request head (`[server] head_timeout`), counted from its first byte;
* an idle keep-alive timeout (aiohttp's own once it owns the connection);
* a send timeout: a client that accepts no byte for `send_timeout` seconds loses its connection,
  and with it its stream slot;
* a cap on open connections per process (`max_connections`): beyond it, a 503 and close.

An exception before the first byte of an answer hands the request to aiohttp (which answers it or
writes a JSON 500); an exception after it closes the connection.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

import httptools
from aiohttp import web
from aiohttp._cookie_helpers import parse_cookie_header  # what aiohttp's request.cookies parses with
from aiohttp.http import HttpRequestParser, HttpVersion11

from . import metrics
from .access import Exchange, RequestRecorder, request_id
from .config import ServerSettings
from .cors import CorsPolicy
from .media.answers import Answer, encode_head, error_answer, head_fields
from .media.core import Facts, MediaRequest, Outcome
from .media.service import MediaService
from .netguard import ClientGuard
from .storage import StorageError

# The two media routes as aiohttp matches them; a percent-encoded or non-ASCII path is aiohttp's.
_MEDIA_PATH = re.compile(r"/(?:tasks/([0-9]{1,18})|projects/([^/?%#{}]+))/resolve/")
log = logging.getLogger("gateway.proxy")  # the full path's logger: one place to read stream failures


class _Cookies:
    """The Cookie header parsed (as aiohttp parses it) only if a token is looked for there."""

    __slots__ = ("_headers", "_parsed")

    def __init__(self, headers: Any) -> None:
        self._headers = headers
        self._parsed: dict[str, str] | None = None

    def get(self, name: str, default: str | None = None) -> str | None:
        if self._parsed is None:
            raw = self._headers.get("Cookie", "")
            self._parsed = {key: morsel.value for key, morsel in parse_cookie_header(raw)} if raw else {}
        return self._parsed.get(name, default)


class MediaFront:
    """The fast lane's share of one app: the media service, the recorder, the connection limits,
    and the open connections."""

    def __init__(
        self,
        settings: ServerSettings,
        service: MediaService,
        guard: ClientGuard,
        cors: CorsPolicy,
        recorder: RequestRecorder,
    ) -> None:
        self.settings = settings
        self.service = service
        self._guard = guard
        self._cors = cors
        self._recorder = recorder
        self._max_head = settings.max_line_size + settings.max_headers * (settings.max_field_size + 2) + 4
        self.tick_period = min(settings.head_timeout, settings.keepalive_timeout, settings.send_timeout)
        self._date = (0, "")
        self.connections: set[FastLane] = set()
        self.stopping = False  # shutting down: no connection is taken back from aiohttp

    def parser(self, protocol: asyncio.Protocol) -> HttpRequestParser:
        s = self.settings
        return HttpRequestParser(
            protocol,  # type: ignore[arg-type]
            asyncio.get_running_loop(),
            2**16,
            max_line_size=s.max_line_size,
            max_field_size=s.max_field_size,
            max_headers=s.max_headers,
        )

    def take(self, parser: HttpRequestParser, head: bytes, peer: str | None) -> tuple[Exchange, MediaRequest] | None:
        """The exchange and the media request of a complete head this lane frames, else None."""
        started = time.perf_counter()
        messages, upgraded, _tail = parser.feed_data(head)
        if upgraded or len(messages) != 1:
            return None
        message = messages[0][0]
        method = message.method
        if (
            method not in ("GET", "HEAD")
            or message.version != HttpVersion11
            or message.upgrade
            or message.chunked
            or message.headers.get("Content-Length", "0") != "0"
            or "Expect" in message.headers
        ):
            return None
        url = message.url
        path = url.raw_path
        match = _MEDIA_PATH.fullmatch(path)
        if match is None or not path.isascii():
            return None
        task_text, project = match.groups()
        task_id = int(task_text) if task_text is not None else None
        headers = message.headers
        client = self._guard.client(peer, headers)
        exchange = Exchange(
            started,
            request_id(headers.get("X-Request-ID", "")),
            method,
            path,
            "task_resolve" if task_id is not None else "project_resolve",
            task_id,
            client,
            peer,
            method == "HEAD",
            message.should_close,
            headers.get("Origin"),
        )
        media = MediaRequest(method, task_id, project, url.query, headers, _Cookies(headers), client)  # type: ignore[arg-type]
        return exchange, media

    def head(self, exchange: Exchange, status: int, headers: dict[str, str], length: int) -> bytes:
        fields = head_fields(status, headers, length, exchange.request_id, self._cors.fields(exchange.origin))
        if exchange.close:
            fields["Connection"] = "close"  # as aiohttp writes it for a request that asked to close
        return encode_head(status, fields, self._http_date())

    def answer(self, exchange: Exchange, answer: Answer, facts: Facts) -> bytes:
        """An answer's bytes, accounted; ValueError if a header cannot be written (never, for what
        the core builds; the caller then hands the request to aiohttp)."""
        head = self.head(exchange, answer.status, answer.headers, answer.length)
        data = head if exchange.head_only else head + answer.body
        self.service.count(facts)
        self._recorder.finish(exchange, answer.status, answer.mode, answer.sub, len(data), answer.error)
        return data

    def finish(self, exchange: Exchange, status: int, sub: str, sent: int, error: str | None) -> None:
        self._recorder.finish(exchange, status, "proxy", sub, sent, error)

    def refuse_connection(self) -> bytes:
        """The answer beyond `max_connections`: 503, then close."""
        metrics.SHED.labels("process_connections").inc()
        answer = error_answer(
            503, "too_many_connections", "the gateway holds its connection limit; retry later", {"Retry-After": "1"}
        )
        fields = head_fields(answer.status, answer.headers, answer.length, request_id(""), None)
        fields["Connection"] = "close"
        return encode_head(answer.status, fields, self._http_date()) + answer.body

    def _http_date(self) -> str:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True))
        return self._date[1]

    async def stop(self, timeout: float) -> None:
        """On shutdown: close idle connections at once, let answers in progress finish for up to
        `timeout` seconds (as aiohttp's shutdown does for its own), then close what is left.
        Connections handed to aiohttp are aiohttp's to shut down (none is taken back from now on)."""
        self.stopping = True
        own = [c for c in self.connections if not c.forwarding]
        busy = [c.busy for c in own if c.busy is not None]
        for connection in own:
            connection.stopping = True
            if connection.busy is None:
                connection.close()
        if busy:
            await asyncio.wait(busy, timeout=timeout)
        for connection in own:
            connection.close()


class FastLane(asyncio.Protocol):
    """One connection: framed here while its requests are media requests, then aiohttp's (with this
    protocol in front, keeping the head deadline, the send timeout and the connection count)."""

    def __init__(self, front: MediaFront, aiohttp_protocol: Callable[[], asyncio.Protocol]) -> None:
        self._front = front
        self._settings = front.settings
        self._aiohttp_protocol = aiohttp_protocol
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer already searched for a head's end
        self._parser: HttpRequestParser | None = None
        self._aiohttp: asyncio.Protocol | None = None  # once handed over: aiohttp's protocol
        self._tracker: httptools.HttpRequestParser | None = None  # request boundaries after the hand-over
        self.peer: object = None  # the socket's peer name, as asyncio gives it
        self._peer: str | None = None  # its address, for the client allowlist and the access log
        self.paused = False  # the client is not reading our answers: stop reading its requests
        self._drain: asyncio.Future[None] | None = None
        self._lost = False
        self.busy: asyncio.Task[None] | None = None  # the answer being prepared or streamed, if any
        self.stopping = False  # shutting down: close once the current answer is out
        self._timer: asyncio.TimerHandle | None = None
        self._timer_kind = ""  # which deadline applies: "idle", "head", "send", or none
        self._forwarded = self._answered = 0  # requests given to aiohttp, and its answers
        self._in_message = False  # a request given to aiohttp has begun and is not complete
        self._deadline = 0.0
        self._loop = asyncio.get_running_loop()

    @property
    def forwarding(self) -> bool:
        return self._aiohttp is not None

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self.peer = transport.get_extra_info("peername")
        self._peer = self.peer[0] if isinstance(self.peer, tuple) else None
        front = self._front
        if len(front.connections) >= self._settings.max_connections:
            self._lost = True
            transport.write(front.refuse_connection())  # type: ignore[attr-defined]
            transport.close()
            return
        front.connections.add(self)
        self._parser = front.parser(self)
        self._idle()

    def data_received(self, data: bytes) -> None:
        if self._aiohttp is not None:
            self._track(data)
            self._aiohttp.data_received(data)
            return
        if self._lost:
            return
        if not self._buffer and self.busy is None:
            self._arm("head", self._settings.head_timeout)  # counted from the head's first byte
        self._buffer += data
        if self.busy is None:
            self._serve()
        elif len(self._buffer) > self._front._max_head and self._transport is not None:
            self._transport.pause_reading()  # pipelined requests wait for the answer: hold the rest back

    def eof_received(self) -> bool | None:
        if self._aiohttp is not None:
            return self._aiohttp.eof_received()  # type: ignore[attr-defined, no-any-return]
        return None

    def pause_writing(self) -> None:
        self.paused = True
        self._arm("send", self._settings.send_timeout)
        if self._aiohttp is not None:
            self._aiohttp.pause_writing()  # type: ignore[attr-defined]
        elif self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self._timer_kind == "send":
            self._timer_kind = ""
        if self._aiohttp is not None:
            self._aiohttp.resume_writing()  # type: ignore[attr-defined]
            return
        self._wake()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()
            if self.busy is None:
                self._idle()
                self._serve()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._stop_timer()
        self._front.connections.discard(self)
        if self._aiohttp is not None:
            self._aiohttp.connection_lost(exc)
            return
        self._wake()
        if self.busy is not None:
            self.busy.cancel()  # stop reading storage for a client that is gone

    # -- framing
    def _serve(self) -> None:
        buffer, transport, front = self._buffer, self._transport, self._front
        assert transport is not None
        while buffer and not self.paused and self.busy is None and not self._lost and self._aiohttp is None:
            start = max(0, self._scanned - 3)  # a head's end may straddle what was scanned and what came
            end = buffer.find(b"\r\n\r\n", start)
            if end < 0:
                bare_lf = buffer.find(b"\n\n", max(0, self._scanned - 1)) >= 0
                self._scanned = len(buffer)
                if len(buffer) > front._max_head or bare_lf:  # aiohttp answers 400 by the same limits
                    self._hand_over()
                return
            self._scanned = 0  # the next head starts at the buffer's start once this one is taken
            size = end + 4
            try:
                taken = front.take(self._parser, bytes(buffer[:size]), self._peer)  # type: ignore[arg-type]
            except Exception:  # a head aiohttp's parser refuses (the same parser answers it there)
                taken = None
            if taken is None:
                self._hand_over()
                return
            exchange, media = taken
            facts = Facts()
            try:
                outcome = front.service.core.decide(media, facts)
                if isinstance(outcome, Answer):
                    data = front.answer(exchange, outcome, facts)
                    del buffer[:size]
                    transport.write(data)
                    if exchange.close or self.stopping:
                        self.close()
                        return
                    if not buffer:
                        self._idle()
                    elif self._timer_kind != "head":
                        self._arm("head", self._settings.head_timeout)
                    continue
            except Exception:
                log.exception("fast lane: answering from the caches failed; aiohttp answers instead")
                self._hand_over()
                return
            self._disarm()  # the answer's own timeouts bound it from here
            self.busy = self._loop.create_task(self._answer(exchange, media, facts, outcome, size))
            return

    async def _answer(self, exchange: Exchange, media: MediaRequest, facts: Facts, outcome: Outcome, size: int) -> None:
        try:
            kept = await self._respond(exchange, media, facts, outcome, size)
        finally:
            self.busy = None
        if kept:
            self._next(exchange)
        else:
            self._hand_over()

    async def _respond(
        self, exchange: Exchange, media: MediaRequest, facts: Facts, outcome: Outcome, size: int
    ) -> bool:
        """Answer one request; False if nothing was written and aiohttp should answer it instead."""
        front, started = self._front, False
        status, sent, error = 0, 0, None
        reader = None
        try:
            prepared = await front.service.prepare(media, facts, outcome)
            if isinstance(prepared, Answer):
                data = front.answer(exchange, prepared, facts)
                del self._buffer[:size]
                self.write(data)
                return True
            stream, reader = prepared.stream, prepared.reader
            head = front.head(exchange, stream.plan.status, stream.headers, stream.plan.length)
            front.service.count(facts)
            status, started = stream.plan.status, True
            del self._buffer[:size]
            metrics.BATCH.inc(metrics.ACTIVE_STREAMS)
            try:
                self.write(head)
                sent = len(head)
                async for chunk in reader.chunks():
                    if not self.write(chunk):
                        error = "client_disconnected"
                        return True
                    sent += len(chunk)
                    if self.paused:
                        await self.drained()
                if self._lost:
                    error = "client_disconnected"
            finally:
                metrics.BATCH.inc(metrics.ACTIVE_STREAMS, -1)
        except asyncio.CancelledError:
            error = "client_disconnected"
            if not self._lost:
                raise
        except StorageError as exc:
            # Headers are out: the only honest signal left is to close the connection before
            # Content-Length bytes (what the aiohttp lane does too).
            error = exc.reason
            log.warning("upstream failed mid-body (%s): aborting the client connection", exc.reason)
            self.close()
        except Exception:
            if started or self._lost:
                log.exception("fast lane: answer failed after its first byte; closing the connection")
                self.close()
            else:
                log.exception("fast lane: answer failed before its first byte; aiohttp answers instead")
                return False
        finally:
            if facts.slot is not None:
                facts.slot.release()
            for open_reader in (reader, facts.reader):
                if open_reader is not None:
                    open_reader.close()
            if started:
                front.finish(exchange, status, stream.sub, sent, error)
        return True

    def _next(self, exchange: Exchange) -> None:
        """After an answer: the next pipelined request, or wait for one."""
        if self._lost or self._aiohttp is not None:
            return
        if exchange.close or self.stopping:
            self.close()
            return
        if not self.paused and self._transport is not None:
            self._transport.resume_reading()  # if data_received held it back during the answer
            if self._buffer:
                self._arm("head", self._settings.head_timeout)
            else:
                self._idle()
        self._serve()

    def write(self, data: bytes) -> bool:
        if self._lost or self._transport is None or self._transport.is_closing():
            return False
        self._transport.write(data)
        return True

    async def drained(self) -> None:
        """Until the client has read enough of what was written (or left)."""
        if self.paused and not self._lost:
            self._drain = self._loop.create_future()
            await self._drain

    def close(self) -> None:
        """Close after what is queued is sent — within `send_timeout`: a client that reads nothing
        must not keep a closing connection (and its place under `max_connections`) forever."""
        transport = self._transport
        if transport is None:
            return
        transport.close()
        if transport.get_write_buffer_size():
            self._timer_kind = ""
            self._arm("send", self._settings.send_timeout)

    def _wake(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def _hand_over(self) -> None:
        """From now on aiohttp's protocol serves the connection, starting with the unanswered bytes;
        this protocol forwards to it and keeps the head deadline and the send timeout."""
        self._disarm()  # aiohttp's keep-alive timer takes over the idle connection
        transport = self._transport
        assert transport is not None
        protocol = self._aiohttp = self._aiohttp_protocol()
        self._parser = None
        self._scanned = 0
        self._tracker = httptools.HttpRequestParser(self)
        self._forwarded = self._answered = 0
        self._in_message = False
        protocol.connection_made(transport)
        if self.paused:
            protocol.pause_writing()  # type: ignore[attr-defined]
        data, self._buffer = bytes(self._buffer), bytearray()
        transport.resume_reading()
        if data:
            self._track(data)
            protocol.data_received(data)

    # -- the head deadline after the hand-over: request boundaries from a parser of our own
    def _track(self, data: bytes) -> None:
        tracker = self._tracker
        if tracker is None:
            return
        try:
            tracker.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._tracker = None  # aiohttp answers a bad head; after an upgrade, bytes are not HTTP
            if self._timer_kind == "head":
                self._disarm()

    def on_message_begin(self) -> None:
        self._in_message = True
        self._arm("head", self._settings.head_timeout)

    def on_headers_complete(self) -> None:
        if self._timer_kind == "head":
            self._disarm()

    def on_message_complete(self) -> None:
        self._in_message = False
        self._forwarded += 1

    # -- taking the connection back once aiohttp has answered everything it was given
    def aiohttp_answered(self, keep_alive: bool) -> None:
        """aiohttp finished an answer on this connection (gateway/access.py calls this from its
        access logger, the last thing aiohttp does for a response). An answer after which aiohttp
        closes the connection (`Connection: close`, HTTP/1.0, a 400 for a head it could not read)
        leaves the connection aiohttp's, to close."""
        self._answered += 1
        if not keep_alive or self._front.stopping:
            self._tracker = None  # never taken back
            return
        self._loop.call_soon(self._take_back)

    def _take_back(self) -> None:
        """When every request given to aiohttp is answered and no other has begun, the fast lane
        serves the connection again (a page's first request was its HTML: its media still come
        through the fast lane). aiohttp's protocol is told the connection is gone, without closing
        it: it forgets it as it forgets a closed one."""
        protocol, transport = self._aiohttp, self._transport
        if (
            protocol is None
            or self._tracker is None  # after an upgrade or a head the tracker could not read
            or self._in_message
            or self._answered < self._forwarded
            or self.paused
            or self._lost
            or transport is None
            or transport.is_closing()
        ):
            return
        self._aiohttp = self._tracker = None
        protocol.transport = None  # type: ignore[attr-defined]  # so that forgetting it does not close it
        protocol.connection_lost(None)
        self._parser = self._front.parser(self)
        self._scanned = 0
        transport.resume_reading()  # whatever aiohttp's flow control left it at
        self._idle()

    # -- timers: one per connection, for whichever deadline applies now. Arming and disarming only
    # write the deadline (they happen twice per request); the one timer fires at least every
    # `tick_period` seconds — no longer than the shortest timeout — and checks it, so a deadline
    # is never late and a busy connection creates no timer per request.
    def _idle(self) -> None:
        self._arm("idle", self._settings.keepalive_timeout)

    def _arm(self, kind: str, seconds: float) -> None:
        if self._timer_kind == "send" and kind != "send":
            return  # a client that reads none of our answers cannot buy time by sending more
        now = self._loop.time()
        self._timer_kind, self._deadline = kind, now + seconds
        if self._timer is None:
            self._timer = self._loop.call_at(min(self._deadline, now + self._front.tick_period), self._tick)

    def _disarm(self) -> None:
        self._timer_kind = ""  # a pending timer finds nothing to check and lets itself go

    def _stop_timer(self) -> None:
        self._timer_kind = ""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        self._timer = None
        kind = self._timer_kind
        if not kind:
            return
        now = self._loop.time()
        if now < self._deadline:
            self._timer = self._loop.call_at(min(self._deadline, now + self._front.tick_period), self._tick)
            return
        # No complete head in time, an idle keep-alive connection, or a client accepting no byte:
        # the connection goes (abort: nothing queued for that client is worth flushing).
        self._timer_kind = ""
        if self._transport is None:
            return
        if kind == "idle":
            self.close()
        else:
            metrics.CONNECTIONS_TIMED_OUT.labels(kind).inc()
            self._transport.abort()


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
) -> None:
    """What `web.run_app` does, with `FastLane` in front of aiohttp's protocol: serve until cancelled
    (SIGTERM/SIGINT raise GracefulExit through the runner's handlers), then shut down gracefully."""
    server = front.settings
    runner = web.AppRunner(
        app,
        handle_signals=handle_signals,
        shutdown_timeout=shutdown_timeout,
        keepalive_timeout=server.keepalive_timeout,
        max_line_size=server.max_line_size,
        max_field_size=server.max_field_size,
        max_headers=server.max_headers,
    )
    await runner.setup()
    listener = None
    try:
        aiohttp_protocol = runner.server
        assert aiohttp_protocol is not None
        listener = await asyncio.get_running_loop().create_server(
            lambda: FastLane(front, aiohttp_protocol), host, port, reuse_port=reuse_port, backlog=128
        )
        on_listening()
        await asyncio.Future()  # until cancelled
    finally:
        if listener is not None:
            listener.close()  # no new connections
        # Both lanes let the bodies they are sending finish, for up to shutdown_timeout together.
        await asyncio.gather(front.stop(shutdown_timeout), runner.cleanup())
        metrics.BATCH.flush()  # what streams that ended during the shutdown counted
