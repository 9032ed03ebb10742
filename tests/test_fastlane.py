"""gateway/fastlane.py: cache hits answered (and streamed) before aiohttp, as aiohttp's path answers them.

A real `serve()` (the production front) on loopback, fake-gcs-server behind it, raw sockets in
front so that each test decides what travels on which connection: a connection that starts with
/healthz belongs to aiohttp from its first byte, a fresh one meets the fast lane first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from dataclasses import dataclass

import pytest

from gateway import metrics
from gateway.app import create_app
from gateway.state import FRONT, LIMITER, REGISTRY

from .conftest import PROJECT, AccessLines, StoredObject, build_settings, make_token, seed
from .test_presign import service_account_json

AIOHTTP_FIRST = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n"  # not a media request: aiohttp's
CLIP = StoredObject("video/clip.bin", bytes(range(256)) * 1000, "video/mp4")
PAGE = StoredObject("pages/page.html", b"<p>hello</p>", "text/html")
BIG = StoredObject("video/big.bin", os.urandom(8 * 1024 * 1024), "video/mp4")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


class Connection:
    """One client socket speaking raw HTTP/1.1."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, head_request: bool = False) -> Answer:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        while head.startswith(b"HTTP/1.1 100 "):  # an interim answer to Expect: 100-continue
            head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if head_request or status_line.split()[1] == "304" else int(headers.get("content-length", 0))
        body = await asyncio.wait_for(self.reader.readexactly(length), 10)
        return Answer(int(status_line.split()[1]), headers, body)

    async def closed(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), 10) == b""

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
def keepalive() -> float:
    return 75.0


@pytest.fixture
def limits() -> dict[str, int]:
    return {}


@pytest.fixture
def server() -> dict[str, float]:
    return {}


@pytest.fixture
async def lane(tmp_path, emulator, fastlane, monkeypatch, keepalive, limits, server):
    """A proxied and a presigned storage, one task referencing an object of each."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.host)
    plain_bucket, signed_bucket = f"lane-{uuid.uuid4().hex[:10]}", f"lane-signed-{uuid.uuid4().hex[:10]}"
    plain = seed("gcs", plain_bucket, [CLIP, PAGE, BIG], tmp_path, emulator)
    plain.update(id="plain")
    signed = seed("gcs", signed_bucket, [CLIP], tmp_path, emulator)
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    signed.update(id="signed", presign=True, presign_ttl=15, google_application_credentials=service_account_json(key))
    app = create_app(
        build_settings(
            [plain, signed],
            tmp_path,
            server={"access_log": True, "keepalive_timeout": keepalive, **server},
            limits=limits,
        )
    )
    uris = {"clip": f"gs://{plain_bucket}/{CLIP.key}", "page": f"gs://{plain_bucket}/{PAGE.key}"}
    uris["signed"] = f"gs://{signed_bucket}/{CLIP.key}"
    uris["big"] = f"gs://{plain_bucket}/{BIG.key}"
    (task,) = await app[REGISTRY].add_tasks(PROJECT, [{"data": uris}])
    client = await fastlane(app)
    return Lane(client.port, app, task, uris, make_token(tasks=[task]), emulator, plain_bucket, client.access)


@dataclass
class Lane:
    port: int
    app: object
    task: int
    uris: dict[str, str]
    token: str
    emulator: object
    bucket: str
    access: AccessLines  # checks the lane that answered each request it expects

    async def connect(self) -> Connection:
        return Connection(*await asyncio.open_connection("127.0.0.1", self.port))

    def request(self, name: str, *headers: str, method: str = "GET", query: str = "", token: bool = True) -> bytes:
        import base64

        fileuri = base64.urlsafe_b64encode(self.uris[name].encode()).decode().rstrip("=")
        lines = [f"{method} /tasks/{self.task}/resolve/?fileuri={fileuri}{query} HTTP/1.1", "Host: gateway"]
        if token:
            lines.append(f"Authorization: Bearer {self.token}")
        return ("\r\n".join([*lines, *headers]) + "\r\n\r\n").encode()

    def in_fast_lane(self, connection: Connection) -> bool:
        """Whether the fast lane (not aiohttp) owns the server side of this client socket."""
        port = connection.writer.get_extra_info("sockname")[1]
        return any(c.peer[1] == port and not c.forwarding for c in self.app[FRONT].connections)  # type: ignore[index]

    def expect(self, request: bytes, lane: str) -> bytes:
        """The request with an X-Request-ID whose access line must name `lane` (checked as lines
        are written, and at teardown)."""
        request_id = uuid.uuid4().hex
        self.access.expected[request_id] = (lane, request.split(b"\r\n", 1)[0].decode("latin-1"))
        return request.replace(b"\r\n", f"\r\nX-Request-ID: {request_id}\r\n".encode(), 1)

    async def through_aiohttp(self, request: bytes, head_request: bool = False) -> Answer:
        """The request answered by aiohttp: on a connection that starts with /healthz, sent in the
        same write (the fast lane takes a connection back once aiohttp has answered all it got)."""
        connection = await self.connect()
        try:
            await connection.send(AIOHTTP_FIRST + self.expect(request, "aiohttp"))
            assert (await connection.answer()).status == 200
            return await connection.answer(head_request)
        finally:
            connection.close()

    async def through_fast_lane(self, request: bytes, head_request: bool = False) -> Answer:
        """The request on a fresh connection; asserts that the fast lane answered it."""
        connection = await self.connect()
        try:
            await connection.send(self.expect(request, "fast"))
            answer = await connection.answer(head_request)
            assert self.in_fast_lane(connection), "the fast lane handed this request to aiohttp"
            return answer
        finally:
            connection.close()


def comparable(answer: Answer) -> tuple[int, dict[str, str], bytes]:
    assert answer.headers["server"] == "media-gateway" and answer.headers["x-request-id"]
    assert answer.headers["date"].endswith(" GMT")
    headers = {k: v for k, v in answer.headers.items() if k not in ("date", "x-request-id")}
    if answer.status == 303:  # a redirect's max-age counts down the signed URL's life: whole seconds apart
        max_age = int(headers["cache-control"].rpartition("=")[2])
        assert 0 < max_age <= 3600
        headers["cache-control"] = headers["cache-control"].replace(f"max-age={max_age}", "max-age=N")
    return answer.status, headers, answer.body


CASES = {
    "304": ("clip", ['If-None-Match: "{etag}"'], "GET", ""),
    "304 among other tags": ("clip", ['If-None-Match: "x", W/"{etag_bare}"'], "GET", ""),
    "304 by date": ("clip", ["If-Modified-Since: Fri, 01 Jan 2100 00:00:00 GMT"], "GET", ""),
    "HEAD": ("clip", [], "HEAD", ""),
    "HEAD of a range": ("clip", ["Range: bytes=10-99"], "HEAD", ""),
    "HEAD ?download=1": ("clip", [], "HEAD", "&download=1"),
    "HEAD of an active type": ("page", [], "HEAD", ""),
    "signed redirect": ("signed", [], "GET", ""),
    "signed redirect, HEAD": ("signed", [], "HEAD", ""),
    "signed redirect ?download=1": ("signed", [], "GET", "&download=1"),
    "GET, streamed": ("clip", [], "GET", ""),
    "GET of a range, streamed": ("clip", ["Range: bytes=1000-70999"], "GET", ""),
    "GET of a suffix range": ("clip", ["Range: bytes=-100"], "GET", ""),
    "GET with a stale If-Range": ("clip", ['If-Range: "0"', "Range: bytes=0-9"], "GET", ""),
    "GET ?download=1": ("clip", [], "GET", "&download=1"),
    "GET of an active type": ("page", [], "GET", ""),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_cache_hits_are_answered_by_the_fast_lane_as_aiohttp_answers_them(lane, case):
    name, header_templates, method, query = CASES[case]
    head_request = method == "HEAD"
    # The first request warms the caches (token, task, metadata, signed URL) through aiohttp.
    warm = await lane.through_aiohttp(lane.request(name), head_request=False)
    assert warm.status in (200, 303)
    etag = warm.headers.get("etag", '"0"').strip('"')
    headers = [t.format(etag=etag, etag_bare=etag) for t in header_templates]
    request = lane.request(name, *headers, method=method, query=query)
    full = await lane.through_aiohttp(request, head_request)
    fast = await lane.through_fast_lane(request, head_request)
    assert fast.status in (200, 206, 303, 304)
    assert comparable(fast) == comparable(full)


async def test_consecutive_hits_keep_the_connection_in_the_fast_lane(lane):
    await lane.through_aiohttp(lane.request("clip"))
    connection = await lane.connect()
    try:
        for request_id in ("first-1", "second-2", "third-3"):
            await connection.send(lane.request("clip", "If-None-Match: *", f"X-Request-ID: {request_id}"))
            answer = await connection.answer()
            assert (answer.status, answer.headers["x-request-id"]) == (304, request_id)
        assert lane.in_fast_lane(connection)
    finally:
        connection.close()


async def test_pipelined_requests_are_answered_in_order_across_the_hand_over(lane):
    await lane.through_aiohttp(lane.request("clip"))
    hit = lane.request("clip", "If-None-Match: *")
    connection = await lane.connect()
    try:
        # One write: a hit, a request only aiohttp serves, and a hit that aiohttp answers too (it has
        # the connection then); once aiohttp has answered all it got, the fast lane takes it back.
        pipeline = lane.expect(hit, "fast") + AIOHTTP_FIRST + lane.expect(hit, "aiohttp")
        await connection.send(pipeline)
        statuses = [(await connection.answer()).status for _ in range(3)]
        assert statuses == [304, 200, 304]
        await eventually(lambda: lane.in_fast_lane(connection), "the fast lane to take the connection back")
        await connection.send(lane.expect(lane.request("clip", "Range: bytes=0-9"), "fast"))
        answer = await connection.answer()
        assert (answer.status, answer.body) == (206, CLIP.data[:10])
        await connection.send(AIOHTTP_FIRST + lane.expect(hit, "aiohttp"))  # and gives it again
        assert [(await connection.answer()).status for _ in range(2)] == [200, 304]
    finally:
        connection.close()


async def test_a_request_head_split_across_writes_is_answered_once_complete(lane):
    await lane.through_aiohttp(lane.request("clip"))
    request = lane.request("clip", "If-None-Match: *")
    connection = await lane.connect()
    try:
        for piece in (request[:7], request[7:60], request[60:]):
            await connection.send(piece)
        assert (await connection.answer()).status == 304
        assert lane.in_fast_lane(connection)
    finally:
        connection.close()


HANDED_OVER = {
    "Expect": (["Expect: 100-continue"], 304),
    "a request body": (["Content-Length: 3"], 304),
}


async def test_cross_origin_and_closing_requests_are_framed_by_the_fast_lane(lane):
    await lane.through_aiohttp(lane.request("clip"))
    request = lane.request("clip", "If-None-Match: *", "Origin: https://labels.example")
    expected = await lane.through_aiohttp(request)
    answer = await lane.through_fast_lane(request)
    assert answer.status == 304 and comparable(answer) == comparable(expected)
    connection = await lane.connect()
    try:
        await connection.send(lane.request("clip", "If-None-Match: *", "Connection: close"))
        answer = await connection.answer()
        assert (answer.status, answer.headers["connection"]) == (304, "close")
        assert await connection.closed()
    finally:
        connection.close()


@pytest.mark.parametrize("case", list(HANDED_OVER))
async def test_requests_the_fast_lane_leaves_to_aiohttp(lane, case):
    extra, status = HANDED_OVER[case]
    await lane.through_aiohttp(lane.request("clip"))
    request = lane.request("clip", "If-None-Match: *", *extra)
    if "Content-Length: 3" in extra:
        request += b"abc"
    connection = await lane.connect()
    try:
        await connection.send(lane.expect(request, "aiohttp"))
        answer = await connection.answer()
        assert answer.status == status
    finally:
        connection.close()


async def test_http_1_0_malformed_and_unknown_requests_get_aiohttps_answers(lane):
    await lane.through_aiohttp(lane.request("clip"))
    old = lane.request("clip", "If-None-Match: *").replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    for request, status in (
        (lane.expect(old, "aiohttp"), 304),
        (b"GET /tasks/1/resolve/ HTTP/1.1\r\nHost: gateway\r\nBad Header\r\n\r\n", 400),
        (b"GET /tasks/1/resolve/ HTTP/1.1\nHost: gateway\n\n", 400),  # bare LF: never waits for a CRLF
        (lane.expect(b"GET /nowhere HTTP/1.1\r\nHost: gateway\r\n\r\n", "aiohttp"), 404),
        (b"GET /tasks/1/resolve/?fileuri=x HTTP/1.1\r\nHost: g\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n", 400),
    ):
        connection = await lane.connect()
        try:
            await connection.send(request)
            assert (await connection.answer()).status == status, request[:60]
        finally:
            connection.close()


async def test_refusals_are_answered_by_the_fast_lane_as_by_aiohttp(lane):
    await lane.through_aiohttp(lane.request("clip"))
    expired = make_token(tasks=[lane.task], ttl=-3600)  # well past the leeway
    other_task = make_token(tasks=[lane.task + 1000])
    for headers, status, error in (
        ([], 401, "missing_token"),
        ([f"Authorization: Bearer {expired}"], 401, "expired_token"),
        ([f"Authorization: Bearer {other_task}"], 403, "no_grant"),
    ):
        answer = await lane.through_aiohttp(lane.request("clip", "If-None-Match: *", *headers, token=False))
        assert (answer.status, json.loads(answer.body)["error"]) == (status, error)
        connection = await lane.connect()
        try:
            await connection.send(lane.request("clip", "If-None-Match: *", *headers, token=False))
            answer = await connection.answer()
            assert (answer.status, json.loads(answer.body)["error"]) == (status, error)
            assert lane.in_fast_lane(connection)
        finally:
            connection.close()


async def test_a_token_from_the_query_or_a_cookie_is_honoured(lane):
    await lane.through_aiohttp(lane.request("clip"))
    for request in (
        lane.request("clip", "If-None-Match: *", query=f"&token={lane.token}", token=False),
        lane.request("clip", "If-None-Match: *", f"Cookie: theme=dark; gateway_token={lane.token}", token=False),
    ):
        assert (await lane.through_fast_lane(request)).status == 304


async def test_fast_lane_answers_are_counted_and_logged_without_the_token(lane, caplog):
    await lane.through_aiohttp(lane.request("clip"))
    requests = metrics.REQUESTS.labels("task_resolve", "proxy", "3xx")
    metrics.BATCH.flush()
    before = requests._value.get()
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        request = lane.request("clip", "If-None-Match: *", query=f"&token={lane.token}", token=False)
        await lane.through_fast_lane(request)
    metrics.BATCH.flush()
    assert requests._value.get() == before + 1
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    (line,) = [line for line in lines if line["lane"] == "fast"]  # (the warm-up's line may come late)
    assert (line["status"], line["sub"], line["task"], line["path"]) == (
        304,
        "alice",
        lane.task,
        f"/tasks/{lane.task}/resolve/",
    )
    assert line["remote"] == line["peer"] == "127.0.0.1"
    assert lane.token not in caplog.text


async def test_shutdown_closes_the_fast_lane_connections(lane, fastlane, tmp_path):
    await lane.through_aiohttp(lane.request("clip"))
    connection = await lane.connect()
    await connection.send(lane.request("clip", "If-None-Match: *"))
    assert (await connection.answer()).status == 304
    await lane.app[FRONT].stop(1.0)  # what serve() does on shutdown, beside aiohttp's graceful shutdown
    assert await connection.closed()
    connection.close()


@pytest.mark.parametrize("keepalive", [0.3])
async def test_an_idle_fast_lane_connection_is_closed_after_the_keep_alive_timeout(lane):
    await lane.through_aiohttp(lane.request("clip"))
    connection = await lane.connect()
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        for pause in (0, 0.2, 0.2):  # requests 0.2 s apart keep a 0.3 s keep-alive open
            await asyncio.sleep(pause)
            await connection.send(lane.request("clip", "If-None-Match: *"))
            assert (await connection.answer()).status == 304
        assert lane.in_fast_lane(connection)
        quiet = loop.time()
        assert await connection.closed()  # then silence: the gateway hangs up
        assert loop.time() - quiet >= 0.25 and loop.time() - started >= 0.65
    finally:
        connection.close()


def server_side(lane: Lane, connection: Connection):  # type: ignore[no-untyped-def]
    port = connection.writer.get_extra_info("sockname")[1]
    return next(c for c in lane.app[FRONT].connections if c.peer[1] == port)  # type: ignore[index]


async def eventually(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(10):
        while not predicate():
            await asyncio.sleep(0.01)  # polling a condition, bounded: not a timing assumption


async def test_a_stream_then_a_revalidation_on_one_connection(lane):
    await lane.through_aiohttp(lane.request("clip"))
    connection = await lane.connect()
    try:
        await connection.send(lane.request("clip") + lane.request("clip", "If-None-Match: *"))
        first, second = await connection.answer(), await connection.answer()
        assert (first.status, first.body, second.status) == (200, CLIP.data, 304)
        assert lane.in_fast_lane(connection)
    finally:
        connection.close()


async def test_a_slow_reader_holds_the_stream_back_and_gets_every_byte(lane):
    await lane.through_aiohttp(lane.request("big", "Range: bytes=0-0"))
    connection = await lane.connect()
    try:
        await connection.send(lane.request("big"))
        await eventually(lambda: lane.in_fast_lane(connection) and server_side(lane, connection).paused, "pause")
        answer = await connection.answer()  # now read it all
        assert answer.status == 200 and answer.body == BIG.data
    finally:
        connection.close()


async def test_a_client_leaving_mid_stream_frees_its_slot_and_the_gauge(lane):
    limiter = lane.app[LIMITER]  # type: ignore[index]
    await lane.through_aiohttp(lane.request("big", "Range: bytes=0-0"))
    metrics.BATCH.flush()
    streams_before = metrics.ACTIVE_STREAMS._value.get()
    connection = await lane.connect()
    await connection.send(lane.request("big"))
    await connection.reader.readexactly(100_000)
    assert limiter.active == 1
    connection.close()
    await eventually(lambda: limiter.active == 0 and not lane.app[FRONT].connections, "the slot back")  # type: ignore[index]
    metrics.BATCH.flush()
    assert metrics.ACTIVE_STREAMS._value.get() == streams_before


@pytest.mark.parametrize("limits", [{"max_streams_per_subject": 1}])
async def test_a_stream_beyond_the_subjects_cap_is_refused_as_the_full_path_refuses_it(lane):
    await lane.through_aiohttp(lane.request("big", "Range: bytes=0-0"))
    await lane.through_aiohttp(lane.request("clip", method="HEAD"), head_request=True)  # metadata, no stream
    holder = await lane.connect()  # holds the subject's one stream: it does not read
    try:
        await holder.send(lane.request("big"))
        await eventually(lambda: lane.app[LIMITER].active == 1, "one stream held")  # type: ignore[index]
        refused_full = await lane.through_aiohttp(lane.request("clip"))
        refused_fast = await lane.through_fast_lane(lane.request("clip"))
        assert comparable(refused_fast) == comparable(refused_full)
        assert refused_fast.status == 429 and json.loads(refused_fast.body)["error"] == "too_many_streams"
        assert refused_fast.headers["retry-after"]
    finally:
        holder.close()


async def test_an_object_changed_behind_the_gateway_is_served_anew_by_the_fast_lane(lane):
    first = await lane.through_aiohttp(lane.request("clip"))
    lane.emulator.upload(lane.bucket, CLIP.key, b"new bytes", CLIP.content_type)  # type: ignore[attr-defined]
    connection = await lane.connect()
    try:
        await connection.send(lane.request("clip"))
        answer = await connection.answer()
        assert (answer.status, answer.body) == (200, b"new bytes")
        assert answer.headers["etag"] != first.headers["etag"]
        assert lane.in_fast_lane(connection)
    finally:
        connection.close()


async def test_shutdown_lets_a_running_stream_finish_then_closes(lane):
    await lane.through_aiohttp(lane.request("big", "Range: bytes=0-0"))
    connection = await lane.connect()
    try:
        await connection.send(lane.request("big"))
        await eventually(lambda: lane.in_fast_lane(connection) and server_side(lane, connection).paused, "pause")
        stopping = asyncio.create_task(lane.app[FRONT].stop(10.0))  # type: ignore[index]
        answer = await connection.answer()
        assert answer.status == 200 and answer.body == BIG.data
        assert await connection.closed()
        await asyncio.wait_for(stopping, 10)
    finally:
        connection.close()


async def test_many_requests_pipelined_behind_a_stream_are_answered_after_it_in_order(lane):
    await lane.through_aiohttp(lane.request("big", "Range: bytes=0-0"))
    await lane.through_aiohttp(lane.request("clip"))
    connection = await lane.connect()
    try:
        revalidation = lane.request("clip", "If-None-Match: *")
        count = 64 * 1024 // len(revalidation) + 1  # more than the fast lane buffers behind a stream
        await connection.send(lane.request("big"))
        await eventually(lambda: lane.in_fast_lane(connection) and server_side(lane, connection).paused, "pause")
        connection.writer.write(revalidation * count)  # not drained: the gateway may stop reading
        answer = await connection.answer()
        assert answer.status == 200 and answer.body == BIG.data
        for _ in range(count):
            assert (await connection.answer()).status == 304
        assert lane.in_fast_lane(connection)
    finally:
        connection.close()
