"""Regression tests: where the fast lane and aiohttp once disagreed, and the connection discipline
both lanes keep (issue "One media decision core", cases 1-8; case 7 is the media suite itself,
which now runs through the front with each answer's lane checked: tests/conftest.py `LaneClient`).

Each case goes through `gateway serve`'s front (tests/test_fastlane.py's `lane` fixture) on raw
sockets, so the test decides what travels on which connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import uuid

import pytest

from gateway import metrics
from gateway.state import CATALOG, FRONT, LIMITER, REGISTRY

from .test_fastlane import (  # noqa: F401  (keepalive, lane, limits, server: fixtures)
    AIOHTTP_FIRST,
    BIG,
    CLIP,
    Answer,
    comparable,
    eventually,
    keepalive,
    lane,
    limits,
    server,
)


async def fresh_answers(lane, request: bytes, head_request: bool = False) -> tuple[Answer, Answer]:  # noqa: F811
    """The same request answered by the fast lane (a fresh connection) and by aiohttp."""
    fast = await lane.through_fast_lane(request, head_request)
    full = await lane.through_aiohttp(request, head_request)
    return fast, full


def odd_object(lane, name: str, content_type: str) -> None:  # noqa: F811
    """An object whose stored contentType is whatever a bucket writer chose, referenced by the task."""
    key = f"odd/{uuid.uuid4().hex[:8]}-{name}"
    lane.emulator.upload(lane.bucket, key, b"odd bytes", content_type, part_type="application/octet-stream")
    lane.uris[name] = f"gs://{lane.bucket}/{key}"


async def add_odd_task(lane) -> None:  # noqa: F811
    (lane.task,) = await lane.app[REGISTRY].add_tasks("7", [{"data": dict(lane.uris)}])
    from .conftest import make_token

    lane.token = make_token(tasks=[lane.task])


# 1. A storage whose backend cannot be built -----------------------------------------------------


async def test_a_storage_without_a_backend_is_503_on_both_lanes_even_with_warm_caches(lane):  # noqa: F811
    for name in ("clip", "signed"):  # proxied and presigned: metadata and the signed URL cached
        assert (await lane.through_fast_lane(lane.request(name))).status in (200, 303)
    shelf = lane.app[CATALOG].sources
    for storage_id in ("plain", "signed"):  # what the catalog holds for a storage it cannot build
        shelf.backends.pop(storage_id)
        shelf.problems[storage_id] = "credentials cannot be loaded on this replica"
    for name in ("clip", "signed"):
        for request in (lane.request(name), lane.request(name, "If-None-Match: *")):
            fast, full = await fresh_answers(lane, request)
            assert fast.status == 503 and json.loads(fast.body)["error"] == "storage_unavailable"
            assert comparable(fast) == comparable(full)


# 2, 5, 6. Stored metadata with odd bytes --------------------------------------------------------

ODD_TYPES = {
    "euro": "text/plain; charset=€",
    "cafe": "text/plain; name=café",
    "crlf": "text/plain\r\nX-Injected: 1",
    "nul": "text/plain\x00",
}


@pytest.mark.parametrize("name", list(ODD_TYPES))
@pytest.mark.parametrize("filled_by", ["HEAD", "GET"])
async def test_odd_stored_content_types_are_written_alike_whichever_request_cached_them(lane, name, filled_by):  # noqa: F811
    odd_object(lane, name, ODD_TYPES[name])
    await add_odd_task(lane)
    # The first request fills the metadata cache: HEAD from the JSON API, GET from the media answer.
    first = await lane.through_fast_lane(lane.request(name, method=filled_by), head_request=filled_by == "HEAD")
    assert first.status == 200
    for method in ("GET", "HEAD"):
        fast, full = await fresh_answers(lane, lane.request(name, method=method), head_request=method == "HEAD")
        assert comparable(fast) == comparable(full)
        assert fast.status == 200 and fast.headers["content-type"] == "application/octet-stream"
        assert "x-injected" not in fast.headers
        if method == "GET":
            assert fast.body == b"odd bytes"
    # A keep-alive connection goes on answering after such an object.
    connection = await lane.connect()
    try:
        await connection.send(lane.request(name) + lane.request("clip", "Range: bytes=0-9"))
        assert (await connection.answer()).body == b"odd bytes"
        assert (await connection.answer()).body == CLIP.data[:10]
        assert lane.in_fast_lane(connection)
    finally:
        connection.close()


# 3. Upgrade, h2c and CONNECT ------------------------------------------------------------------


UPGRADES = {
    "h2c": ["Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAAQAAP__"],
    "websocket": [
        "Connection: Upgrade",
        "Upgrade: websocket",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ],
}


@pytest.mark.parametrize("kind", list(UPGRADES))
async def test_upgrades_and_connect_are_answered_as_aiohttp_answers_them(lane, kind, caplog):  # noqa: F811
    with caplog.at_level(logging.ERROR):
        for request in (
            lane.request("clip", *UPGRADES[kind]),
            lane.request("clip", *UPGRADES[kind], token=False),
            ("\r\n".join(["GET /healthz HTTP/1.1", "Host: g", *UPGRADES[kind]]) + "\r\n\r\n").encode(),
            b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n",
        ):
            connection = await lane.connect()
            try:
                await connection.send(request)
                answer = await connection.answer()  # an answer, never a dropped connection
                assert 200 <= answer.status < 600
            finally:
                connection.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# 4. Head limits are aiohttp's on both lanes ------------------------------------------------------


async def refused_by_aiohttp(lane, request: bytes) -> Answer:  # noqa: F811
    """A head aiohttp refuses, on a connection aiohttp owns: /healthz, then (in the same write) the
    first byte of the head, so that aiohttp has begun it and keeps the connection; then the rest."""
    connection = await lane.connect()
    try:
        await connection.send(AIOHTTP_FIRST + request[:1])
        assert (await connection.answer()).status == 200
        await connection.send(request[1:])
        return await connection.answer()
    finally:
        connection.close()


@pytest.mark.parametrize(
    "extra",
    [
        ["X-Big: " + "a" * 12_000],  # a 12 KB header
        [f"X-H{i}: v" for i in range(500)],  # 500 headers
    ],
    ids=["12 KB header", "500 headers"],
)
async def test_head_limits_are_the_same_on_both_lanes(lane, extra):  # noqa: F811
    await lane.through_fast_lane(lane.request("clip", "If-None-Match: *"))  # warm caches
    request = lane.request("clip", "If-None-Match: *", *extra)
    connection = await lane.connect()
    try:
        await connection.send(request)
        fast = await connection.answer()
    finally:
        connection.close()
    full = await refused_by_aiohttp(lane, request)
    assert fast.status == full.status == 400


async def test_a_long_request_line_is_400_on_both_lanes(lane):  # noqa: F811
    await lane.through_fast_lane(lane.request("clip", "If-None-Match: *"))
    request = lane.request("clip", "If-None-Match: *", query="&pad=" + "a" * 10_000)
    connection = await lane.connect()
    try:
        await connection.send(request)
        assert (await connection.answer()).status == 400
    finally:
        connection.close()
    assert (await refused_by_aiohttp(lane, request)).status == 400


@pytest.mark.parametrize("server", [{"max_headers": 20}], indirect=False)
async def test_head_limits_come_from_the_server_settings(lane, server):  # noqa: F811
    await lane.through_fast_lane(lane.request("clip", "If-None-Match: *"))
    assert (await lane.through_fast_lane(lane.request("clip", "If-None-Match: *", "X-A: 1"))).status == 304
    too_many = lane.request("clip", "If-None-Match: *", *(f"X-H{i}: v" for i in range(30)))
    connection = await lane.connect()
    try:
        await connection.send(too_many)
        assert (await connection.answer()).status == 400
    finally:
        connection.close()


# 8. Connection discipline -----------------------------------------------------------------------


async def _trickle(connection, data: bytes, pause: float) -> int:
    """Send `data` a byte at a time; the number of bytes sent before the server closed."""
    for sent in range(len(data)):
        if connection.writer.is_closing() or connection.reader.at_eof():
            return sent
        try:
            await connection.send(data[sent : sent + 1])
        except ConnectionError:
            return sent
        await asyncio.sleep(pause)  # pacing the client, not synchronising with the server
    return len(data)


@pytest.mark.parametrize("server", [{"head_timeout": 0.5}])
@pytest.mark.parametrize("after_hand_over", [False, True], ids=["fast lane", "after the hand-over"])
async def test_a_head_that_never_completes_loses_its_connection(lane, server, after_hand_over):  # noqa: F811
    connection = await lane.connect()
    try:
        request = lane.request("clip")
        if after_hand_over:  # aiohttp's from its first byte, and it has begun another request
            await connection.send(AIOHTTP_FIRST + request[:1])
            assert (await connection.answer()).status == 200
            request = request[1:]
        # One byte every 50 ms would take several seconds: the deadline counts from the first byte.
        reading = asyncio.ensure_future(connection.reader.read())
        sent = await _trickle(connection, request, 0.05)
        assert sent < len(request), "the server waited for the whole trickled head"
        await asyncio.wait_for(reading, 10)
    finally:
        connection.close()


@pytest.mark.parametrize("server", [{"max_connections": 3}])
async def test_connections_beyond_the_cap_get_503_and_are_closed(lane, server):  # noqa: F811
    held = [await lane.connect() for _ in range(3)]
    try:
        await eventually(lambda: len(lane.app[FRONT].connections) == 3, "three connections")
        extra = await lane.connect()
        answer = await extra.answer()
        assert answer.status == 503 and json.loads(answer.body)["error"] == "too_many_connections"
        assert answer.headers["connection"] == "close" and await extra.closed()
        held.pop().close()
        await eventually(lambda: len(lane.app[FRONT].connections) == 2, "a freed place")
        assert (await lane.through_fast_lane(lane.request("clip", "Range: bytes=0-9"))).status == 206
    finally:
        for connection in held:
            connection.close()


@pytest.mark.parametrize("server", [{"send_timeout": 0.5}])
@pytest.mark.parametrize(
    ("after_hand_over", "keeps_sending"),
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["fast lane", "aiohttp lane", "fast lane, sending more", "aiohttp lane, sending more"],
)
async def test_a_client_that_stops_reading_loses_its_slot_and_connection(lane, server, after_hand_over, keeps_sending):  # noqa: F811
    limiter = lane.app[LIMITER]
    timed_out = metrics.CONNECTIONS_TIMED_OUT.labels("send")
    before = timed_out._value.get()
    loop = asyncio.get_running_loop()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    try:
        await loop.sock_connect(client, ("127.0.0.1", lane.port))
        # 8 MiB, and the client reads none of it; aiohttp's lane: in the write that starts with /healthz
        big = lane.expect(lane.request("big"), "aiohttp" if after_hand_over else "fast")
        await loop.sock_sendall(client, (AIOHTTP_FIRST if after_hand_over else b"") + big)
        await eventually(lambda: limiter.active == 1, "the stream to start")
        if keeps_sending:  # new request heads, one every 100 ms, must not buy the reader time
            for _ in range(50):
                if limiter.active == 0:
                    break
                await loop.sock_sendall(client, b"GET /healthz HTTP/1.1\r\nHost: g\r\n\r\n")
                await asyncio.sleep(0.1)  # pacing the client, not synchronising with the server
        await eventually(lambda: limiter.active == 0, "the slot to come back after the send timeout")
        assert timed_out._value.get() == before + 1
        received = 0
        async with asyncio.timeout(10):
            while chunk := await loop.sock_recv(client, 65536):  # what the buffers held, then the end
                received += len(chunk)
        assert received < len(BIG.data)
    except ConnectionResetError:
        pass  # the abort may reach the client as a reset
    finally:
        client.close()


def test_the_default_per_subject_stream_cap_is_bounded():
    from gateway.config import LimitSettings

    assert 0 < LimitSettings().max_streams_per_subject < LimitSettings().max_streams


# Review findings: a slot kept by a request decided again; aiohttp's close decision respected -----


@pytest.mark.parametrize("through", ["fast", "aiohttp"])
async def test_a_vanished_object_answers_404_and_keeps_no_stream_slot(lane, through):  # noqa: F811
    assert (await lane.through_fast_lane(lane.request("page", method="HEAD"), head_request=True)).status == 200
    lane.emulator.delete(lane.bucket, "pages/page.html")  # type: ignore[attr-defined]
    send = lane.through_fast_lane if through == "fast" else lane.through_aiohttp
    answer = await send(lane.request("page"))
    assert answer.status == 404 and json.loads(answer.body)["error"] == "not_found"
    assert lane.app[LIMITER].active == 0 and lane.app[LIMITER].by_subject == {}


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /healthz HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n",
        b"GET /healthz HTTP/1.0\r\nHost: g\r\n\r\n",
    ],
    ids=["Connection: close", "HTTP/1.0"],
)
async def test_a_connection_aiohttp_closes_is_not_taken_back(lane, request_bytes):  # noqa: F811
    connection = await lane.connect()
    try:
        await connection.send(request_bytes)
        head = await asyncio.wait_for(connection.reader.read(), 10)  # the whole answer, then the close
        assert head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")) and b'"status": "ok"' in head
    finally:
        connection.close()
