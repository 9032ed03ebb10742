"""What the browser suites need beyond the browser: a video made at test time, and a record of the
gateway's answers to chromium's media requests (which lane answered, on which connection).

The demo's 177 KB clip arrives whole in chromium's first `bytes=0-` answer, so a seek in it never
needs a range. `long_video` is a WebM (VP8: Debian's chromium decodes it) of about 10 MB, made
with Debian's ffmpeg (`make ffmpeg`): chromium's media stack reads a `preload="metadata"` video
only so far, so a seek three quarters in needs a range of its own.

Chromium's requests are not sent by the LaneClient of tests/conftest.py, so `ChromiumMedia`
checks their lanes itself: the gateway's access line (found by the X-Request-ID the gateway
answers with) says which lane answered, and chromium's DevTools protocol says on which connection.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from gateway import metrics

from .required import missing

_ACCESS = logging.getLogger("gateway.access")
VIDEO_SECONDS = 20  # long enough to play from the middle; its size comes from the bit rate
VIDEO_BYTES_MIN = 6_000_000  # far more than chromium's media stack reads ahead of a seek


@functools.cache
def _made_video() -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "long.webm"
        source = f"testsrc2=size=320x240:rate=10:duration={VIDEO_SECONDS},noise=alls=40:allf=t"
        quiet = ["-nostdin", "-hide_banner", "-loglevel", "error"]
        encoder = ["-c:v", "libvpx", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "3M"]
        quality = ["-qmin", "4", "-qmax", "12", "-g", "10", "-an"]  # big frames, a keyframe a second
        subprocess.run(
            ["ffmpeg", *quiet, "-f", "lavfi", "-i", source, *encoder, *quality, str(path)],
            check=True,
            timeout=300,
        )
        return path.read_bytes()


def long_video() -> bytes:
    """A 20 s, 320x240, 10 fps VP8 WebM of noisy test pattern (noise, so that the encoder cannot
    make it small): about 10 MB, a keyframe every second so that a seek lands near its target.
    Made once per test session."""
    if shutil.which("ffmpeg") is None:
        missing("Debian's ffmpeg makes the test video (make ffmpeg, or apt-get install ffmpeg)")
    data = _made_video()
    assert len(data) >= VIDEO_BYTES_MIN, f"the test video is only {len(data)} bytes"
    return data


@dataclass
class Answer:
    """One media answer chromium received from the gateway."""

    url: str
    fileuri: str
    status: int
    range: str | None  # the request's Range header
    content_range: str | None
    request_id: str
    connection: int | None = None  # chromium's connection id (DevTools protocol)
    lane: str | None = None  # from the gateway's access line


class ChromiumMedia(logging.Handler):
    """The gateway's answers to chromium's media requests, each with its access line's lane.

    The front frames media GETs on the fast lane until a connection carries anything else (a page,
    a script, an API call): it then hands that connection to aiohttp for good. So a media answer
    must be the fast lane's unless an earlier request on its connection was not media;
    `check_front` derives each answer's lane that way from chromium's own record of its
    connections (the page's DevTools session, which does not see a worker's requests: those are
    counted from the access log, each of which may have handed over one connection unseen).

    A streamed answer's access line is written when its body ends or is abandoned (chromium drops
    a `bytes=0-` download when it seeks elsewhere), so `settle` waits for each line."""

    def __init__(self, base: str) -> None:
        super().__init__(logging.INFO)
        self.base = base
        self.answers: list[Answer] = []
        self.lines: dict[str, dict[str, Any]] = {}
        self.connections: dict[str, int | None] = {}  # X-Request-ID -> chromium's connection id
        self.sequence: list[tuple[int | None, str | None, bool]] = []  # (connection, X-Request-ID, media?)
        self._arrived = asyncio.Event()
        self._pending: set[asyncio.Task[None]] = set()
        self._level = logging.NOTSET

    def __enter__(self) -> ChromiumMedia:
        """Listen to the gateway's access log (its lines are INFO) until the block ends."""
        self._level = _ACCESS.level
        _ACCESS.setLevel(logging.INFO)
        _ACCESS.addHandler(self)
        return self

    def __exit__(self, *_exc: object) -> None:
        _ACCESS.removeHandler(self)
        _ACCESS.setLevel(self._level)

    def emit(self, record: logging.LogRecord) -> None:
        line = json.loads(record.getMessage())
        self.lines[line["request_id"]] = line
        self._arrived.set()

    def is_media(self, url: str) -> bool:
        return url.startswith(self.base) and "/resolve/" in urlsplit(url).path

    async def watch(self, page: Any) -> None:
        """Record every media answer of `page` (call before it navigates)."""
        page.on("response", self._on_response)
        cdp = await page.context.new_cdp_session(page)
        cdp.on("Network.responseReceived", self._on_cdp_response)
        cdp.on("Network.requestWillBeSent", self._on_cdp_redirect)
        await cdp.send("Network.enable")
        # Without chromium's HTTP cache every range its media stack asks for reaches the gateway as
        # asked (the cache would answer parts itself and send other ranges on the wire).
        await cdp.send("Network.setCacheDisabled", {"cacheDisabled": True})

    def _on_cdp_response(self, event: dict[str, Any]) -> None:
        """Answers arrive in order on each connection (HTTP/1.1 without pipelining), so whether an
        earlier one was not media is known when each arrives."""
        response = event["response"]
        if not response["url"].startswith(self.base):
            return
        cached = response.get("fromDiskCache") or response.get("fromPrefetchCache")
        connection = None if cached else response.get("connectionId") or None
        request_id = {k.lower(): v for k, v in response.get("headers", {}).items()}.get("x-request-id")
        media = self.is_media(response["url"])
        self.sequence.append((connection, request_id, media))
        if media and request_id is not None:
            self.connections[request_id] = connection

    def _on_cdp_redirect(self, event: dict[str, Any]) -> None:
        """A redirect's response (a pre-signed storage's 303) comes with the request it leads to."""
        if "redirectResponse" in event:
            self._on_cdp_response({"response": event["redirectResponse"]})

    def _on_response(self, response: Any) -> None:
        if self.is_media(response.url):
            task = asyncio.ensure_future(self._record(response))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _record(self, response: Any) -> None:
        request_headers = await response.request.all_headers()
        headers = await response.all_headers()
        fileuri = parse_qs(urlsplit(response.url).query).get("fileuri", [""])[0]
        self.answers.append(
            Answer(
                response.url,
                fileuri,
                response.status,
                request_headers.get("range"),
                headers.get("content-range"),
                headers.get("x-request-id", ""),
            )
        )

    async def settle(self, timeout: float = 15.0) -> list[Answer]:
        """Every answer so far with its lane and connection, once its access line is written."""
        async with asyncio.timeout(timeout):
            while self._pending:
                await asyncio.wait(set(self._pending))
            while any(a.request_id not in self.lines for a in self.answers):
                self._arrived.clear()
                await self._arrived.wait()
        for answer in self.answers:
            answer.lane = self.lines[answer.request_id]["lane"]
            answer.connection = self.connections.get(answer.request_id)
        return list(self.answers)

    async def media_lines(self, timeout: float = 15.0) -> list[dict[str, Any]]:
        """The gateway's access lines of media requests, once there is at least one (for answers
        chromium never shows the page, such as a refusal it blocks as opaque)."""
        async with asyncio.timeout(timeout):
            while not (lines := [line for line in self.lines.values() if "/resolve/" in line["path"]]):
                self._arrived.clear()
                await self._arrived.wait()
        return lines

    async def check_front(self) -> list[Answer]:
        """Each media answer came from the lane the front promises: the fast lane, except right after
        an answer of aiohttp's on the same connection (the fast lane takes a connection back once
        aiohttp has answered all it was given; a request that arrives first is still aiohttp's).
        Some connection carried more than one media answer (chromium keeps connections alive)."""
        answers = await self.settle()
        assert answers, "chromium made no media request"
        assert len({a.request_id for a in answers}) == len(answers), "an answer came twice (from a cache?)"
        assert all(a.connection is not None for a in answers), "chromium did not say which connection carried one"
        lanes = {a.request_id: a.lane for a in answers}
        seen = {request_id for _, request_id, _ in self.sequence}
        unseen = [
            line["path"] for id_, line in self.lines.items() if id_ not in seen and "/resolve/" not in line["path"]
        ]
        previous: dict[int | None, str] = {}  # the lane of each connection's last answer
        unexplained: set[int | None] = set()  # aiohttp's media answers after a fast one: a request we did not see
        for connection, request_id, media in self.sequence:
            lane = lanes.get(request_id, "aiohttp") if media else "aiohttp"
            if media and lane == "aiohttp" and previous.get(connection) != "aiohttp":
                unexplained.add(connection)
            previous[connection] = lane
        assert len(unexplained) <= len(unseen), (
            f"media answered by aiohttp on connections {unexplained} that carried only media; unseen: {unseen}"
        )
        per_connection: dict[int | None, int] = {}
        for answer in answers:
            per_connection[answer.connection] = per_connection.get(answer.connection, 0) + 1
        assert max(per_connection.values()) > 1, f"no connection carried two media answers: {per_connection}"
        return answers


class CacheLookups:
    """The gateway's metadata and signed-URL cache lookups (hits, misses) since this was made."""

    COUNTERS = (metrics.METADATA_HIT, metrics.METADATA_MISS, metrics.SIGNED_CACHE_HIT, metrics.SIGNED_CACHE_MISS)

    def __init__(self) -> None:
        self.start = self._now()

    def _now(self) -> list[float]:
        metrics.BATCH.flush()  # request metrics are written in batches
        return [counter._value.get() for counter in self.COUNTERS]

    def since(self) -> dict[str, tuple[int, int]]:
        delta = [int(now - then) for now, then in zip(self._now(), self.start, strict=True)]
        return {"metadata": (delta[0], delta[1]), "signed": (delta[2], delta[3])}


def check_warm(answers: list[Answer], lookups: CacheLookups, *, signed: bool = False) -> None:
    """Each object's metadata (and signed URL) was looked up in storage once, by its first request:
    every later request of it was answered from the warm caches."""
    objects = {a.fileuri for a in answers}
    expected = (len(answers) - len(objects), len(objects))
    since = lookups.since()
    assert since == {"metadata": expected, "signed": expected if signed else (0, 0)}, (since, len(answers), objects)
