"""The gateway's own pages in a real browser (Debian's chromium, Playwright) over fake-gcs-server.

The settings page at /ui/: sign-in, Add Source Storage with Test connection, Load preview and
Save & Sync, errors next to their fields. The viewer at /view/tasks/{id}: an image, a video that
seeks (206 answers) and plays, and a multi-page PDF whose first page renders before the file is
downloaded — through a proxied and through a pre-signed storage (the browser follows the 303).
The gateway is served by its production front (`gateway.fastlane.serve`): each media answer must
come from the lane the front promises (the viewer's page and scripts share chromium's connections
with its media, and a connection that carried a page belongs to aiohttp for good), from warm caches
after each object's first request.
Screenshots go to tests/artifacts/ (ignored by git).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway import metrics
from gateway.api.auth import SESSION_COOKIE
from gateway.app import create_app
from gateway.demo import media_root
from gateway.state import CATALOG, REGISTRY, TASKS
from gateway.sync.worker import SyncWorker

from .browser_media import CacheLookups, ChromiumMedia, check_warm
from .conftest import PROJECT, StoredObject, build_settings, make_token, seed
from .test_presign import service_account_json

ARTIFACTS = Path(__file__).parent / "artifacts"
VAULT_KEY = "an-encryption-key-for-tests-0123456789abcdef"
WAIT = 15_000  # ms: every browser wait is bounded
API_PROJECT = "8"


def multipage_pdf(pages: int, padding: int) -> bytes:
    """A valid PDF of `pages` pages, each a few coloured bars and `padding` bytes of content-stream
    comments (uncompressed), so the file is large. The page dictionaries come first, as most
    writers put them: PDF.js fetches every kid of the page tree when it opens a document, so
    interleaving them with the big streams would make it read the whole file for page 1."""
    kids = b" ".join(b"%d 0 R" % (3 + i) for i in range(pages))
    objects: list[bytes] = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [" + kids + b"] /Count %d >>" % pages,
    ]
    objects += [
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents %d 0 R >>" % (3 + pages + i)
        for i in range(pages)
    ]
    for i in range(pages):
        drawing = b"0.1 0.3 0.8 rg 72 700 %d 40 re f 0.8 0.2 0.2 rg 72 640 200 30 re f\n" % (20 + 10 * i)
        stream = drawing + (b"% padding so that each page weighs a lot ........................\n" * (padding // 66))
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


PDF = multipage_pdf(pages=60, padding=50_000)  # ~3 MB
# Image, video and audio are the demo's committed samples (clip.mp4: 5 s, 320x240 H.264 + AAC,
# 177 KB), so CI needs no ffmpeg.
MEDIA = [
    StoredObject("media/photo.jpg", (media_root() / "photo.jpg").read_bytes(), "image/jpeg"),
    StoredObject("media/clip.mp4", (media_root() / "clip.mp4").read_bytes(), "video/mp4"),
    StoredObject("media/audio.mp3", (media_root() / "audio.mp3").read_bytes(), "audio/mpeg"),
    StoredObject("media/book.pdf", PDF, "application/pdf"),
]
IMAGES = [
    StoredObject("images/a.jpg", b"A" * 100, "image/jpeg"),
    StoredObject("images/b.jpg", b"B" * 100, "image/jpeg"),
    StoredObject("images/c.jpg", b"C" * 100, "image/jpeg"),
    StoredObject("images/notes.txt", b"not an image", "text/plain"),
]


def screenshot_path(name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    print(f"screenshot: {path}")
    return path


@pytest.fixture
async def gateway(tmp_path, emulator, fastlane, monkeypatch):
    """A gateway served by its production front: a proxied and a pre-signed storage of MEDIA, a
    bucket of IMAGES for API storages; one task per media storage. No workers: a test starts
    those it needs, when it wants them to run."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.host)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-adc.json"))
    media_bucket, images_bucket = f"web-{uuid.uuid4().hex[:12]}", f"web-img-{uuid.uuid4().hex[:8]}"
    proxied = seed("gcs", media_bucket, MEDIA, tmp_path, emulator) | {"id": "media"}
    signed_bucket = f"web-signed-{uuid.uuid4().hex[:8]}"
    signed = seed("gcs", signed_bucket, MEDIA, tmp_path, emulator) | {
        "id": "signed",
        "project": "9",
        "presign": True,
        "google_application_credentials": service_account_json(
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ),
    }
    seed("gcs", images_bucket, IMAGES, tmp_path, emulator)
    settings = build_settings(
        [proxied, signed],
        tmp_path,
        registry={
            "url": f"sqlite:///{tmp_path / 'registry.db'}",
            "encryption_keys": [VAULT_KEY],
            "storage_refresh": 0.2,
        },
        sync={"poll_interval": 0.1},
        export={"poll_interval": 0.1},
        media={"metadata_ttl": 600},  # warm for the whole test, however slow the machine
    )
    app = create_app(settings)
    tasks = {}
    for project, bucket in ((PROJECT, media_bucket), ("9", signed_bucket)):
        data = {
            name: f"gs://{bucket}/media/{key}"
            for name, key in (("image", "photo.jpg"), ("video", "clip.mp4"), ("audio", "audio.mp3"))
        }
        (tasks[project],) = await app[REGISTRY].add_tasks(
            project, [{"data": {**data, "pdf": f"gs://{bucket}/media/book.pdf"}}]
        )
    front = await fastlane(app)
    return {"url": f"http://127.0.0.1:{front.port}", "tasks": tasks, "images": images_bucket, "app": app}


async def new_page(browser: Any, **options: Any) -> Any:
    """A page whose every action and wait gives up after WAIT (Playwright's default is 30 s)."""
    page = await browser.new_page(**options)
    page.set_default_timeout(WAIT)
    return page


async def field_error(page: Any, dialog: str, field: str) -> str:
    locator = page.locator(f"#{dialog} [data-field='{field}'] .error")
    await locator.wait_for(state="visible", timeout=WAIT)
    return await locator.inner_text()


async def test_add_source_storage_flow(browser, gateway):
    base = gateway["url"]
    page = await new_page(browser, viewport={"width": 1280, "height": 900})
    await page.goto(f"{base}/ui/")
    await page.locator("#sign-in-token").wait_for(timeout=WAIT)
    await page.screenshot(path=screenshot_path("ui-sign-in"))

    # A media token is refused with a sentence saying why; an admin token signs in.
    await page.fill("#sign-in-token", make_token("bob", tasks="*"))
    await page.click("#sign-in-form button[type=submit]")
    assert "not an admin token" in await field_error(page, "sign-in-form", "token")
    await page.fill("#sign-in-token", make_token("root", admin=True))
    await page.keyboard.press("Tab")
    await page.keyboard.press("Enter")  # the Sign in button, reached with the keyboard
    await page.locator("#who-name").wait_for(timeout=WAIT)
    assert await page.inner_text("#who-name") == "root"
    cookie = next(c for c in await page.context.cookies() if c["name"] == SESSION_COOKIE)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert await page.evaluate("document.cookie") == ""  # the token is out of the scripts' reach

    # Step 1, Configure Connection: a missing bucket, then a bad key file, each next to its field.
    await page.click("#add-source")
    dialog = "source-dialog"
    await page.fill("#source-project", API_PROJECT)
    await page.fill("#source-title-input", "Images")
    await page.fill("#source-bucket", "no-such-bucket-anywhere")
    await page.click(f"#{dialog} [data-action=test]")
    assert "does not exist" in await field_error(page, dialog, "bucket")
    await page.screenshot(path=screenshot_path("ui-add-source-error"))
    await page.fill("#source-bucket", gateway["images"])
    bad_key = json.dumps(
        {"type": "service_account", "client_email": "x@p.iam.gserviceaccount.com", "private_key": "no"}
    )
    await page.set_input_files(
        "#source-credentials", files=[{"name": "key.json", "mimeType": "application/json", "buffer": bad_key.encode()}]
    )
    await page.click(f"#{dialog} [data-action=test]")
    message = await field_error(page, dialog, "google_application_credentials")
    assert message.startswith("Wrong credentials") and "no" not in message.split(":", 1)[0]
    assert await page.locator(f"#{dialog} [data-field=bucket] .error").inner_text() == ""
    await page.set_input_files("#source-credentials", files=[])
    await page.click(f"#{dialog} [data-action=test]")
    result = page.locator(f"#{dialog} [data-result=test][data-ok=true]")
    await result.wait_for(timeout=WAIT)
    assert gateway["images"] in await result.inner_text()

    # Step 2, Import Settings & Preview: a bad regex is named; then the preview lists the images.
    await page.click(f"#{dialog} [data-action=next]")
    await page.fill("#source-prefix", "images")
    await page.fill("#source-regex", "(")
    await page.click(f"#{dialog} [data-action=preview]")
    assert "not a valid regular expression" in await field_error(page, dialog, "regex_filter")
    await page.fill("#source-regex", r".*\.jpg")
    await page.click(f"#{dialog} [data-action=preview]")
    items = page.locator(f"#{dialog} .preview li")
    await items.nth(2).wait_for(timeout=WAIT)
    assert await items.all_inner_texts() == ["images/a.jpg", "images/b.jpg", "images/c.jpg"]
    await page.screenshot(path=screenshot_path("ui-add-source-preview"))

    # Step 3, Review & Confirm, then Save & Sync. The sync stays queued until a worker runs: the
    # row shows a progress bar and the page keeps polling the storage, then shows the result.
    await page.click(f"#{dialog} [data-action=next]")
    review = await page.inner_text(f"#{dialog} .review")
    assert "Application Default Credentials" in review and r".*\.jpg" in review
    await page.click(f"#{dialog} [data-action=save-sync]")
    row = page.locator("#source-table tbody tr", has_text="Images")
    await row.locator(".status[data-status=queued] progress").wait_for(timeout=WAIT)
    storage_id = await row.get_attribute("data-id")
    for _ in range(2):
        async with page.expect_response(f"**/api/storages/gcs/{storage_id}", timeout=WAIT) as polled:
            pass
        assert (await (await polled.value).json())["status"] == "queued"
    app = gateway["app"]
    worker = SyncWorker(app[CATALOG], on_change=app[TASKS].forget)
    running = asyncio.create_task(worker.run())
    try:
        await row.locator(".status[data-status=completed]").wait_for(timeout=WAIT)
    finally:
        await worker.stop(running)
    await page.locator("#task-count", has_text="3 tasks").wait_for(timeout=WAIT)
    assert "3 created" in await row.inner_text()
    assert await row.locator("progress").count() == 0
    await page.screenshot(path=screenshot_path("ui-storages"))

    # Edit: the form comes back filled (project fixed, key kept); a new title is saved.
    await row.get_by_role("button", name="Edit Images").click()
    assert await page.input_value("#source-regex") == r".*\.jpg"
    assert await page.locator("#source-project").get_attribute("readonly") is not None
    await page.fill("#source-title-input", "Photos")
    await page.click(f"#{dialog} [data-action=next]")
    await page.click(f"#{dialog} [data-action=next]")
    await page.click(f"#{dialog} [data-action=save]")
    row = page.locator("#source-table tbody tr", has_text="Photos")
    await row.wait_for(timeout=WAIT)

    # Delete, after a confirmation.
    page.once("dialog", lambda d: d.accept())
    await row.get_by_role("button", name="Delete Photos").click()
    await row.wait_for(state="detached", timeout=WAIT)

    # Signing out drops the cookie; the API then refuses the browser.
    await page.click("#sign-out")
    await page.locator("#sign-in-token").wait_for(timeout=WAIT)
    assert not [c for c in await page.context.cookies() if c["name"] == SESSION_COOKIE]


async def open_viewer(browser, gateway, project: str, seen: ChromiumMedia):
    """The viewer opened through a link with the token; the token then lives in the cookie only."""
    task = gateway["tasks"][project]
    page = await new_page(browser, viewport={"width": 1000, "height": 1400})
    await seen.watch(page)
    responses: list[Any] = []
    page.on("response", lambda r: responses.append(r))
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    token = make_token(tasks=[task])
    partial_before = partial()
    await page.goto(f"{gateway['url']}/view/tasks/{task}?token={token}")
    assert page.url == f"{gateway['url']}/view/tasks/{task}"  # the token left the address bar
    await page.locator("#media-0").wait_for(timeout=WAIT)
    return page, responses, errors, partial_before


async def settled(locator: Any, script: str) -> Any:
    """An element's state once an event says it is ready, with a deadline. (The pages' CSP forbids
    eval, which page.wait_for_function needs; an awaited event needs none.)"""
    await locator.wait_for(state="attached", timeout=WAIT)
    return await asyncio.wait_for(locator.evaluate(script), WAIT / 1000)


def partial() -> float:
    metrics.BATCH.flush()  # request metrics are written in batches
    return metrics.PARTIAL_RESPONSES.labels("task_resolve")._value.get()


async def check_viewer(page, responses, errors, partial_before: float, *, signed: bool) -> None:
    width = await settled(
        page.locator("[data-kind=image] img"),
        "img => img.complete ? img.naturalWidth : new Promise((ok, fail) => {"
        " img.onload = () => ok(img.naturalWidth); img.onerror = () => fail(new Error('image failed')); })",
    )
    assert width > 0
    audio = await settled(
        page.locator("audio"),
        "a => a.readyState >= 1 ? a.duration : new Promise((ok, fail) => {"
        " a.onloadedmetadata = () => ok(a.duration); a.onerror = () => fail(new Error('audio failed')); })",
    )
    assert audio > 0

    duration = await settled(
        page.locator("video"),
        "v => v.readyState >= 1 ? v.duration : new Promise((ok, fail) => {"
        " v.onloadedmetadata = () => ok(v.duration); v.onerror = () => fail(new Error('video failed')); })",
    )
    position = await page.evaluate(
        """(middle) => new Promise((resolve, reject) => {
            const v = document.querySelector('video');
            v.addEventListener('seeked', () => resolve(v.currentTime), {once: true});
            v.addEventListener('error', () => reject(new Error('media error ' + v.error.code)), {once: true});
            v.currentTime = middle;
        })""",
        duration / 2,
    )
    assert abs(position - duration / 2) < 0.2
    # Play: the clock moves on by half a second from the seek position (an awaited event, bounded).
    played = await settled(
        page.locator("video"),
        """v => new Promise((ok, fail) => {
            const from = v.currentTime;
            v.muted = true;
            v.addEventListener('timeupdate', () => { if (v.currentTime >= from + 0.5) ok([from, v.currentTime]); });
            v.addEventListener('error', () => fail(new Error('media error ' + v.error.code)), {once: true});
            v.play().catch(fail);
        })""",
    )
    assert played[0] == position and played[1] >= position + 0.5
    source = await page.locator("video").get_attribute("src")
    video = [r for r in responses if (r.request.redirected_from or r.request).url.endswith(source)]
    if signed:  # the gateway redirects; the storage answers the ranges
        assert {r.status for r in video} == {303, 206}
    else:
        assert {r.status for r in video} == {206}
        assert partial() > partial_before  # the gateway's metrics count its 206 answers

    pdf = page.locator("[data-kind=pdf]")
    await page.locator("[data-kind=pdf][data-rendered-page='1']").wait_for(timeout=WAIT)
    assert await pdf.get_attribute("data-pages") == "60"
    # Page 1 is drawn (not a blank canvas) from a fraction of the file's bytes.
    painted = await page.evaluate(
        """() => { const c = document.querySelector('[data-kind=pdf] canvas');
                   const d = c.getContext('2d').getImageData(90, 90, 10, 10).data;
                   return d[2] > 150 && d[0] < 100; }"""
    )
    assert painted
    ranges = [  # PDF.js's range requests (a request after a redirect shows the first one's headers)
        r
        for r in responses
        if r.request.resource_type == "fetch" and "range" in (r.request.redirected_from or r.request).headers
    ]
    # Proxied: the gateway answers each range; pre-signed: it redirects and the storage answers.
    assert {r.status for r in ranges} == ({303, 206} if signed else {206})
    fetched = 0
    for response in ranges:
        if response.status == 206:
            fetched += len(await response.body())
    assert 0 < fetched <= 4 * 64 * 1024 < len(PDF) / 10, (fetched, len(PDF))
    await page.get_by_role("button", name="Next page").click()
    await page.locator("[data-kind=pdf][data-rendered-page='2']").wait_for(timeout=WAIT)
    assert not errors, errors


async def check_front(seen: ChromiumMedia, lookups: CacheLookups, *, signed: bool) -> None:
    """Every media answer (a 206, or a pre-signed storage's 303) came from the lane the front
    promises, on connections chromium kept alive, from warm caches after each object's first
    request."""
    answers = await seen.check_front()
    assert {a.status for a in answers} == ({303} if signed else {200, 206}), [(a.status, a.range) for a in answers]
    check_warm(answers, lookups, signed=signed)


async def test_viewer_proxied_storage(browser, gateway):
    with ChromiumMedia(gateway["url"]) as seen:
        lookups = CacheLookups()
        page, *viewed = await open_viewer(browser, gateway, PROJECT, seen)
        await check_viewer(page, *viewed, signed=False)
        await page.screenshot(path=screenshot_path("viewer"), full_page=True)
        await check_front(seen, lookups, signed=False)


async def test_viewer_presigned_storage(browser, gateway):
    with ChromiumMedia(gateway["url"]) as seen:
        lookups = CacheLookups()
        page, *viewed = await open_viewer(browser, gateway, "9", seen)
        await check_viewer(page, *viewed, signed=True)
        await check_front(seen, lookups, signed=True)


async def test_viewer_refuses_other_tasks(browser, gateway):
    task, other = gateway["tasks"][PROJECT], make_token(tasks=[gateway["tasks"]["9"]])
    page = await new_page(browser)
    answer = await page.goto(f"{gateway['url']}/view/tasks/{task}?token={other}")
    assert answer.status == 403 and "does not grant task" in await page.inner_text("body")
    assert not await page.context.cookies()  # a token for another task never becomes the cookie
    answer = await page.goto(f"{gateway['url']}/view/tasks/{task}?token=not-a-jwt")
    assert answer.status == 401 and "well-formed" in await page.inner_text("body")
    await page.goto(f"{gateway['url']}/view/tasks/{task}")  # no token at all: the page says what to do
    error = page.locator("#error")
    await error.wait_for(timeout=WAIT)
    assert "carries your token" in await error.inner_text()
