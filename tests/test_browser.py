"""A real browser (Debian's chromium driven by Playwright) loads media through the gateway.

`<video>` and `<img>` tags carry the token in the query string, as an annotation page does; the
gateway talks to fake-gcs-server. Chromium's media stack asks with `Range: bytes=0-` and must get
a 206 it can seek in.
"""

from __future__ import annotations

import uuid
from urllib.parse import quote

import pytest
from aiohttp import web

from gateway import metrics
from gateway.app import create_app
from gateway.demo import media_root
from gateway.state import REGISTRY
from gateway.uris import encode_fileuri

from .conftest import PROJECT, StoredObject, build_settings, make_token, seed


@pytest.fixture
async def gateway_url(tmp_path, emulator, aiohttp_server, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.host)
    bucket = f"browser-{uuid.uuid4().hex[:12]}"
    samples = [
        StoredObject("clip.mp4", (media_root() / "clip.mp4").read_bytes(), "video/mp4"),
        StoredObject("photo.jpg", (media_root() / "photo.jpg").read_bytes(), "image/jpeg"),
    ]
    settings = build_settings([seed("gcs", bucket, samples, tmp_path, emulator)], tmp_path)
    app = create_app(settings)
    (task,) = await app[REGISTRY].add_tasks(
        PROJECT, [{"data": {"video": f"gs://{bucket}/clip.mp4", "image": f"gs://{bucket}/photo.jpg"}}]
    )
    server = await aiohttp_server(app, host="127.0.0.1")

    def url(key: str, token: str) -> str:
        fileuri = encode_fileuri(f"gs://{bucket}/{key}")
        return f"http://127.0.0.1:{server.port}/tasks/{task}/resolve/?fileuri={fileuri}&token={quote(token)}"

    return url, task


async def serve_page(aiohttp_server, html: str) -> str:
    async def page(_request: web.Request) -> web.Response:
        return web.Response(text=html, content_type="text/html")

    page_app = web.Application()
    page_app.router.add_get("/", page)
    return str((await aiohttp_server(page_app, host="127.0.0.1")).make_url("/"))


async def test_video_seeks_and_image_loads_through_the_gateway(browser, gateway_url, aiohttp_server):
    url, task = gateway_url
    token = make_token(tasks=[task])
    video_url = url("clip.mp4", token)
    page_url = await serve_page(
        aiohttp_server,
        f'<video id="v" preload="auto" muted src="{video_url}"></video><img id="i" src="{url("photo.jpg", token)}">',
    )
    page = await browser.new_page()
    media_responses = []
    page.on("response", lambda r: media_responses.append(r) if "/resolve/" in r.url else None)
    await page.goto(page_url)
    await page.wait_for_function("document.getElementById('v').readyState >= 1", timeout=15_000)
    duration = await page.evaluate("document.getElementById('v').duration")
    assert 4.5 < duration < 5.5
    position = await page.evaluate(
        """() => new Promise((resolve, reject) => {
            const v = document.getElementById('v');
            v.addEventListener('seeked', () => resolve(v.currentTime), {once: true});
            v.addEventListener('error', () => reject(new Error('media error ' + v.error.code)), {once: true});
            v.currentTime = 4.0;
        })"""
    )
    assert 3.9 <= position <= 4.1
    await page.wait_for_function("document.getElementById('v').readyState >= 2", timeout=15_000)
    await page.wait_for_function("document.getElementById('i').complete", timeout=15_000)
    assert await page.evaluate("document.getElementById('i').naturalWidth") == 640
    video = [r for r in media_responses if r.url == video_url]
    assert video and all(r.status == 206 for r in video)  # the media stack asks for ranges and gets them
    first = video[0]
    assert (await first.request.all_headers())["range"].startswith("bytes=")
    assert (await first.all_headers())["content-range"].endswith(f"/{(media_root() / 'clip.mp4').stat().st_size}")


async def test_a_refused_token_never_renders(browser, gateway_url, aiohttp_server):
    url, task = gateway_url
    stranger = make_token(tasks=[task + 1000])
    page_url = await serve_page(
        aiohttp_server, f'<video id="v" preload="auto" src="{url("clip.mp4", stranger)}"></video>'
    )
    refusals = metrics.AUTH_FAILURES.labels("no_grant")
    before = refusals._value.get()
    page = await browser.new_page()
    await page.goto(page_url)
    await page.wait_for_function("document.getElementById('v').error !== null", timeout=15_000)
    assert await page.evaluate("document.getElementById('v').readyState") == 0
    # The browser itself hides the 403's body from the page (a JSON answer to a media request is
    # blocked as opaque); the gateway's counter shows it refused the request.
    assert refusals._value.get() > before
