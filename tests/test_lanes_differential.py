"""Differential: the fast lane and aiohttp answer every media request with the same bytes.

Hypothesis generates requests — methods, single and multiple ranges, conditionals, valid, expired,
other-task, garbage and missing tokens in the header, a cookie or the query, odd `fileuri`
encodings, odd and large headers, several requests pipelined in one write — against cache states
(cold, warm, storage broken, object changed, object gone, metadata with odd bytes). Each example
is sent twice to one `gateway serve` front, from the same cache state: once on a fresh connection
(the fast lane frames it) and once after a /healthz in the same write (aiohttp owns the connection
from its first byte until it has answered everything it was given). Status, headers (but Date and
X-Request-ID) and body must be equal.

CI runs a fixed number of derandomized examples; `make fuzz-lanes` runs many more.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import socket
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import create_app
from gateway.state import CATALOG, FRONT, REGISTRY, TASKS, VERIFIER

from .conftest import PROJECT, StoredObject, build_settings, free_port, make_token, seed
from .test_presign import service_account_json

EXAMPLES = int(os.environ.get("LANES_EXAMPLES", "60"))
CLIP = StoredObject("video/clip.bin", bytes(range(256)) * 40, "video/mp4")  # 10,240 bytes
ODD = StoredObject("odd/name é.txt", b"odd", "text/plain; charset=€")
OTHER = StoredObject("other/secret.bin", b"secret", "application/octet-stream")


class Front:
    """`gateway serve`'s front for one app, on its own event loop in a thread (Hypothesis drives
    the test synchronously, with blocking sockets)."""

    def __init__(self, app: Any, port: int) -> None:
        self.app, self.port = app, port
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._ready = threading.Event()
        self._serving = self.call(self._start())

    async def _start(self) -> asyncio.Task[None]:
        from gateway.fastlane import serve

        listening = asyncio.Event()
        task = asyncio.create_task(
            serve(
                self.app,
                self.app[FRONT],
                "127.0.0.1",
                self.port,
                reuse_port=False,
                shutdown_timeout=1.0,
                on_listening=listening.set,
                handle_signals=False,
            )
        )
        await asyncio.wait_for(listening.wait(), 30)
        return task

    def call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def stop(self) -> None:
        async def cancel() -> None:
            self._serving.cancel()
            await asyncio.gather(self._serving, return_exceptions=True)

        self.call(cancel())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def exchange(self, data: bytes, requests: int, through_aiohttp: bool) -> list[tuple[int, dict[str, str], bytes]]:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            reader = sock.makefile("rb")
            if through_aiohttp:  # in one write: aiohttp keeps the connection until it has answered all
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: g\r\n\r\n" + data)
                assert read_answer(reader, "GET")[0] == 200
            else:
                sock.sendall(data)
            methods = re.findall(rb"^(GET|HEAD) /", data, re.M)
            return [read_answer(reader, methods[i].decode()) for i in range(requests)]


def read_answer(reader: Any, method: str) -> tuple[int, dict[str, str], bytes]:
    status_line = reader.readline()
    assert status_line, "the connection closed without an answer"
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    length = 0 if method == "HEAD" or status in (204, 304) else int(headers.get("content-length", 0))
    return status, headers, reader.read(length)


def normalised(answers: list[tuple[int, dict[str, str], bytes]]) -> list[tuple[int, dict[str, str], bytes]]:
    """Date and X-Request-ID differ by nature; a signed URL by the second it was signed in; an
    object changed between the lanes' turns by its generation (named by order of appearance)."""
    versions: dict[str, str] = {}
    return [_normalised(answer, versions) for answer in answers]


def _normalised(
    answer: tuple[int, dict[str, str], bytes], versions: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    status, headers, body = answer
    headers = {k: v for k, v in headers.items() if k not in ("date", "x-request-id")}
    for name in ("etag", "last-modified"):
        if name in headers:
            headers[name] = versions.setdefault(headers[name], f"{name}-{len(versions)}")
    if "location" in headers:
        url = urllib.parse.urlsplit(headers["location"])
        headers["location"] = f"{url.netloc}{url.path}"
        headers["cache-control"] = re.sub(r"max-age=\d+", "max-age=N", headers["cache-control"])
    return status, headers, body


@dataclass
class World:
    front: Front
    emulator: Any
    bucket: str
    signed_bucket: str
    task: int
    other_task: int
    dirty: bool = False
    plain_backend: Any = None

    def uri(self, key: str, signed: bool = False) -> str:
        return f"gs://{self.signed_bucket if signed else self.bucket}/{key}"


@pytest.fixture(scope="module")
def world(emulator, tmp_path_factory) -> Iterator[World]:
    tmp_path = tmp_path_factory.mktemp("differential")
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = emulator.host
    bucket, signed_bucket = f"diff-{uuid.uuid4().hex[:10]}", f"diff-signed-{uuid.uuid4().hex[:10]}"
    plain = seed("gcs", bucket, [CLIP, ODD, OTHER], tmp_path, emulator) | {"id": "plain"}
    signed = seed("gcs", signed_bucket, [CLIP], tmp_path, emulator)
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    signed |= {"id": "signed", "presign": True, "google_application_credentials": service_account_json(key)}
    sections = {"server": {"access_log": False}, "cors": {"origins": ["https://labels.example"]}}
    app = create_app(build_settings([plain, signed], tmp_path, **sections))
    front = Front(app, free_port())
    data = {
        "clip": f"gs://{bucket}/{CLIP.key}",
        "odd": f"gs://{bucket}/{ODD.key}",
        "signed": f"gs://{signed_bucket}/{CLIP.key}",
    }
    task, other = front.call(app[REGISTRY].add_tasks(PROJECT, [{"data": data}, {"data": {"x": data["clip"]}}]))
    try:
        yield World(front, emulator, bucket, signed_bucket, task, other)
    finally:
        front.stop()
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous


# -- what Hypothesis draws ------------------------------------------------------------------------

STATES = ["cold", "warm", "broken", "changed", "gone"]
OBJECTS = ["clip", "odd", "signed", "other", "outside", "nowhere"]


def fileuri(world: World, which: str, encoding: str) -> str:
    key = {"clip": CLIP.key, "odd": ODD.key, "signed": CLIP.key, "other": OTHER.key}.get(which, "x/y.bin")
    uri = world.uri(key, which == "signed") if which != "nowhere" else "gs://another-bucket/x.bin"
    raw = uri.encode()
    if encoding == "padded":
        return base64.urlsafe_b64encode(raw).decode()
    if encoding == "standard":
        return base64.b64encode(raw).decode()
    if encoding == "garbage":
        return "!!not-base64!!"
    if encoding == "empty":
        return ""
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@st.composite
def requests(draw: Any, world: World) -> tuple[bytes, str]:
    method = draw(st.sampled_from(["GET", "GET", "HEAD"]))
    which = draw(st.sampled_from(OBJECTS))
    route = draw(st.sampled_from(["task", "task", "project", "other-task"]))
    token_kind = draw(st.sampled_from(["valid", "valid", "valid", "expired", "other-task", "garbage", "none"]))
    where = draw(st.sampled_from(["header", "cookie", "query"]))
    encoding = draw(st.sampled_from(["plain", "plain", "padded", "standard", "garbage", "empty"]))
    task = world.other_task if route == "other-task" else world.task
    path = f"/projects/{PROJECT}/resolve/" if route == "project" else f"/tasks/{task}/resolve/"
    query = f"fileuri={fileuri(world, which, encoding)}"
    if draw(st.booleans()):
        query += "&download=1"
    grants = {"projects": [PROJECT]} if route == "project" else {"tasks": [world.task]}
    token = {
        "valid": make_token(**grants),
        "expired": make_token(ttl=-3600, **grants),
        "other-task": make_token(tasks=[world.task + 1000]),
        "garbage": "not.a.token",
        "none": None,
    }[token_kind]
    headers = ["Host: gateway"]
    if token is not None:
        if where == "header":
            headers.append(f"Authorization: Bearer {token}")
        elif where == "cookie":
            headers.append(f"Cookie: theme=dark; gateway_token={token}; name=caf\u00e9")
        else:
            query += f"&token={token}"
    ranges = draw(
        st.one_of(
            st.none(),
            st.tuples(st.integers(0, 12_000), st.integers(0, 12_000)).map(lambda r: f"bytes={r[0]}-{r[1]}"),
            st.integers(0, 12_000).map(lambda n: f"bytes=-{n}"),
            st.integers(0, 12_000).map(lambda n: f"bytes={n}-"),
            st.just("bytes=0-9,20-29"),
            st.just("bytes=0-9,10-19"),
            st.just("items=0-9"),
            st.just("bytes=abc"),
        )
    )
    if ranges is not None:
        headers.append(f"Range: {ranges}")
    conditional = draw(
        st.sampled_from(
            [
                None,
                "If-None-Match: *",
                'If-None-Match: "nope"',
                'If-Match: "nope"',
                "If-Match: *",
                "If-Modified-Since: Sat, 01 Jan 2000 00:00:00 GMT",
                "If-Modified-Since: Fri, 01 Jan 2100 00:00:00 GMT",
                "If-Unmodified-Since: Sat, 01 Jan 2000 00:00:00 GMT",
                'If-Range: "stale"',
                "If-Range: Sat, 01 Jan 2000 00:00:00 GMT",
            ]
        )
    )
    if conditional is not None:
        headers.append(conditional)
    odd = draw(st.sampled_from([None, "latin", "long", "many", "origin", "request-id"]))
    if odd == "latin":
        headers.append("X-Odd: caf\u00e9 \u00ff")
    elif odd == "long":
        headers.append("X-Long: " + "a" * 7000)
    elif odd == "many":
        headers.extend(f"X-H{i}: v" for i in range(100))
    elif odd == "origin":
        headers.append("Origin: https://labels.example")
    elif odd == "request-id":
        headers.append("X-Request-ID: bad id with spaces")
    head = "\r\n".join([f"{method} {path}?{query} HTTP/1.1", *headers]) + "\r\n\r\n"
    return head.encode("utf-8"), which


def set_state(world: World, state: str, warm_request: bytes) -> None:
    """Put the caches and the bucket into `state` (the same before each lane's turn)."""
    app, emulator = world.front.app, world.emulator
    core = app[FRONT].service.core

    async def reset() -> None:
        core.entries.clear()
        core.signed._entries.clear()
        app[VERIFIER]._cache.clear()
        app[TASKS].forget()
        shelf = app[CATALOG].sources
        shelf.problems.pop("plain", None)
        if "plain" not in shelf.backends:
            shelf.backends["plain"] = world.plain_backend

    world.front.call(reset())
    if world.dirty:  # the last state changed or removed the clip: put it back (a new generation)
        emulator.upload(world.bucket, CLIP.key, CLIP.data, CLIP.content_type)
        world.dirty = False
    if state == "cold":
        return
    world.front.exchange(warm_request, 1, through_aiohttp=False)  # token, task, metadata, signature cached
    if state == "broken":

        async def break_storage() -> None:
            shelf = app[CATALOG].sources
            shelf.backends.pop("plain")
            shelf.problems["plain"] = "credentials cannot be loaded on this replica"

        world.front.call(break_storage())
    elif state == "changed":
        emulator.upload(world.bucket, CLIP.key, b"changed " * 100, CLIP.content_type)
        world.dirty = True
    elif state == "gone":
        emulator.delete(world.bucket, CLIP.key)
        world.dirty = True


@settings(
    max_examples=EXAMPLES,
    derandomize=os.environ.get("LANES_RANDOM") is None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_both_lanes_give_the_same_answers(world, data):
    if world.plain_backend is None:
        world.plain_backend = world.front.app[CATALOG].sources.backends["plain"]
    state = data.draw(st.sampled_from(STATES), label="state")
    pipelined = data.draw(st.lists(requests(world), min_size=1, max_size=3), label="requests")
    payload = b"".join(request for request, _ in pipelined)
    warm = pipelined[0][0]
    set_state(world, state, warm)
    fast = world.front.exchange(payload, len(pipelined), through_aiohttp=False)
    set_state(world, state, warm)
    full = world.front.exchange(payload, len(pipelined), through_aiohttp=True)
    assert normalised(fast) == normalised(full)
