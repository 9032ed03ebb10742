"""A real browser (Debian's chromium driven by Playwright) loads media through the gateway's
production front (`gateway.fastlane.serve`, what `gateway serve` runs).

`<video>` and `<img>` tags carry the token in the query string, as an annotation page does; the
gateway talks to fake-gcs-server. The video is several megabytes (tests/browser_media.py), more
than chromium reads before the test seeks, so the seek needs a `Range: bytes=N-` with N > 0 that
must get its 206; then the video plays. Every media answer chromium got must come from the fast
lane, from warm caches after each object's first request, on connections chromium keeps alive.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web

from gateway import metrics
from gateway.app import create_app
from gateway.demo import media_root
from gateway.state import REGISTRY
from gateway.uris import encode_fileuri

from .browser_media import CacheLookups, ChromiumMedia, check_warm, long_video
from .conftest import PROJECT, StoredObject, build_settings, make_token, seed

WAIT = 15_000  # ms: every browser wait is bounded
PHOTO = StoredObject("photo.jpg", (media_root() / "photo.jpg").read_bytes(), "image/jpeg")
CLIP = StoredObject("clip.mp4", (media_root() / "clip.mp4").read_bytes(), "video/mp4")


@dataclass
class Served:
    base: str  # the gateway's front, http://127.0.0.1:port
    bucket: str
    task: int

    def url(self, key: str, token: str, task: int | None = None) -> str:
        fileuri = encode_fileuri(f"gs://{self.bucket}/{key}")
        return (
            f"{self.base}/tasks/{self.task if task is None else task}/resolve/?fileuri={fileuri}&token={quote(token)}"
        )


@pytest.fixture
def serve_media(tmp_path, emulator, fastlane, monkeypatch) -> Callable[[list[StoredObject]], Awaitable[Served]]:
    """A gateway over a bucket of the given objects, served by the production front; one task
    referencing all of them."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.host)

    async def serve(objects: list[StoredObject]) -> Served:
        bucket = f"browser-{uuid.uuid4().hex[:12]}"
        settings = build_settings(
            [seed("gcs", bucket, objects, tmp_path, emulator)],
            tmp_path,
            media={"metadata_ttl": 600},  # warm for the whole test, however slow the machine
        )
        app = create_app(settings)
        (task,) = await app[REGISTRY].add_tasks(
            PROJECT, [{"data": {f"m{i}": f"gs://{bucket}/{o.key}" for i, o in enumerate(objects)}}]
        )
        client = await fastlane(app)
        return Served(f"http://127.0.0.1:{client.port}", bucket, task)

    return serve


async def serve_page(aiohttp_server, html: str) -> str:
    """The test's page, from a server of its own: only the media go through the gateway."""

    async def page(_request: web.Request) -> web.Response:
        return web.Response(text=html, content_type="text/html")

    page_app = web.Application()
    page_app.router.add_get("/", page)
    return str((await aiohttp_server(page_app, host="127.0.0.1")).make_url("/"))


async def new_page(browser: Any) -> Any:
    page = await browser.new_page()
    page.set_default_timeout(WAIT)
    return page


RANGE = re.compile(r"bytes=(\d+)-(\d*)")
VIDEO_OK = "const v = document.getElementById('v'); if (v.error) throw new Error('media error ' + v.error.code);"


async def test_video_seeks_by_range_and_plays_through_the_front(browser, serve_media, aiohttp_server):
    data = long_video()
    video = StoredObject("long.webm", data, "video/webm")
    gateway = await serve_media([video, PHOTO])
    token = make_token(tasks=[gateway.task])
    page_url = await serve_page(
        aiohttp_server,
        f'<video id="v" preload="metadata" muted src="{gateway.url(video.key, token)}"></video>'
        f'<img id="i" src="{gateway.url(PHOTO.key, token)}">',
    )
    page = await new_page(browser)
    with ChromiumMedia(gateway.base) as seen:
        await seen.watch(page)
        lookups = CacheLookups()
        await page.goto(page_url)
        await page.wait_for_function("document.getElementById('v').readyState >= 1")
        duration = await page.evaluate("document.getElementById('v').duration")
        assert 19.5 < duration < 20.5
        await page.wait_for_function("document.getElementById('i').complete")
        assert await page.evaluate("document.getElementById('i').naturalWidth") == 640

        # Seek three quarters in, far past what chromium has read: it must ask for a range. Every
        # wait is Playwright's, bounded: a media element that never gets its bytes fails the test.
        target = duration * 0.75
        await page.evaluate("(target) => { document.getElementById('v').currentTime = target; }", target)
        await page.wait_for_function(
            f"(target) => {{ {VIDEO_OK} return !v.seeking && v.readyState >= 2"
            " && Math.abs(v.currentTime - target) < 0.1; }",
            arg=target,
        )
        # Play: the clock moves on by half a second from where play() started.
        started = await page.evaluate(
            "() => { const v = document.getElementById('v'); v.play(); return v.currentTime; }"
        )
        await page.wait_for_function(f"(from) => {{ {VIDEO_OK} return v.currentTime >= from + 0.5; }}", arg=started)

        answers = await seen.check_front()
    # Only media go to this gateway, so every answer is the fast lane's, on kept-alive connections.
    assert {a.lane for a in answers} == {"fast"}
    videos = [a for a in answers if a.fileuri == encode_fileuri(f"gs://{gateway.bucket}/{video.key}")]
    assert videos[0].range is not None and videos[0].range.startswith("bytes=0-"), videos[0]
    asked = [(a, RANGE.fullmatch(a.range or "")) for a in videos]
    seeks = [(a, int(m[1]), int(m[2] or len(data) - 1)) for a, m in asked if m and int(m[1]) > 0]
    assert seeks, f"no range above 0 was asked for: {[(a.range, a.status) for a in videos]}"
    for answer, first, last in seeks:
        assert (answer.status, answer.content_range) == (206, f"bytes {first}-{last}/{len(data)}"), answer
    # The seek three quarters in asked for bytes from the second half of the file.
    assert max(first for _, first, _ in seeks) > len(data) / 2, seeks
    check_warm(answers, lookups)


async def test_a_refused_token_never_renders(browser, serve_media, aiohttp_server):
    gateway = await serve_media([CLIP])
    stranger = make_token(tasks=[gateway.task + 1000])
    page_url = await serve_page(
        aiohttp_server, f'<video id="v" preload="auto" src="{gateway.url(CLIP.key, stranger)}"></video>'
    )
    refusals = metrics.AUTH_FAILURES.labels("no_grant")
    before = refusals._value.get()
    page = await new_page(browser)
    with ChromiumMedia(gateway.base) as seen:
        await page.goto(page_url)
        await page.wait_for_function("document.getElementById('v').error !== null")
        assert await page.evaluate("document.getElementById('v').readyState") == 0
        # The browser itself hides the 403's body from the page (a JSON answer to a media request
        # is blocked as opaque); the gateway's counter and its access lines show it refused the
        # request, from the fast lane.
        assert refusals._value.get() > before
        assert {(line["status"], line["lane"]) for line in await seen.media_lines()} == {(403, "fast")}
