"""The web pages' routes without a browser: headers, sign-in cookie and CSRF, the viewer's token
exchange and media list (tests/test_web.py drives the same pages in chromium)."""

from __future__ import annotations

import pytest

from gateway.api.auth import CSRF_HEADER, SESSION_COOKIE, csrf_token
from gateway.app import create_app
from gateway.state import REGISTRY

from .conftest import PROJECT, StoredObject, build_settings, make_token, seed

OBJECTS = [
    StoredObject("a/photo.JPG", b"jpeg", "image/jpeg"),
    StoredObject("a/book.pdf", b"%PDF-1.4 " * 100, "application/pdf"),
    StoredObject("a/notes.txt", b"text", "text/plain"),
]


@pytest.fixture
async def client(tmp_path, aiohttp_client):
    storage = seed("local", "web-bucket", OBJECTS, tmp_path, None)
    app = create_app(build_settings([storage], tmp_path))
    data = {
        "image": "gs://web-bucket/a/photo.JPG",
        "doc": ["gs://web-bucket/a/book.pdf"],
        "note": "see gs://web-bucket/a/notes.txt",
    }
    client = await aiohttp_client(app)
    client.task, client.other = await app[REGISTRY].add_tasks(
        PROJECT, [{"data": data}, {"data": {"x": "gs://web-bucket/a/notes.txt"}}]
    )
    client.origin = f"http://{client.server.host}:{client.server.port}"
    return client


async def test_pages_carry_a_strict_policy(client):
    for path, policy_has in (("/ui/", "connect-src 'self';"), (f"/view/tasks/{client.task}", "media-src 'self' ")):
        response = await client.get(path)
        assert response.status == 200 and response.content_type == "text/html"
        policy = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "script-src 'self';" in policy and policy_has in policy
        assert "unsafe" not in policy and "frame-ancestors 'none'" in policy
        assert response.headers["X-Frame-Options"] == "DENY" and response.headers["Cache-Control"] == "no-store"
    for name in ("admin.js", "viewer.js", "pdfjs/pdf.min.mjs", "pdfjs/pdf.worker.min.mjs"):
        response = await client.get(f"/ui/static/{name}")
        assert response.status == 200 and response.content_type in ("text/javascript", "application/javascript"), name
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert (await client.get("/ui/static/../session.py")).status == 404
    assert (await client.get("/ui", allow_redirects=False)).headers["Location"] == "/ui/"


async def test_sign_in_sets_an_httponly_cookie_and_needs_csrf_to_sign_out(client):
    admin = make_token("root", admin=True, ttl=300)
    same = {"Origin": client.origin}
    refused = await client.post("/ui/session", json={"token": admin})
    assert refused.status == 403 and (await refused.json())["error"] == "cross_origin"
    for body, status, reason in (
        ({"token": ""}, 400, "validation_error"),
        ({"token": make_token("bob", tasks="*")}, 403, "not_admin"),
        ({"token": "not-a-jwt"}, 401, "invalid_token"),
    ):
        answer = await client.post("/ui/session", json=body, headers=same)
        assert answer.status == status and (await answer.json())["error"] == reason
    assert (await client.get("/ui/session")).status == 401
    response = await client.post("/ui/session", json={"token": admin}, headers=same)
    assert response.status == 200
    body = await response.json()
    assert body == {"sub": "root", "expires_at": body["expires_at"], "csrf": csrf_token(admin)}
    assert admin not in await response.text()
    cookie = response.cookies[SESSION_COOKIE]
    assert cookie.value == admin and cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
    assert 290 <= int(cookie["max-age"]) <= 300 and not cookie["secure"]  # plain HTTP here
    assert (await (await client.get("/ui/session")).json())["csrf"] == csrf_token(admin)
    # The cookie reads the API; writing needs the CSRF header.
    assert (await client.get("/api/storages/gcs")).status == 200
    assert (await client.delete("/ui/session", headers=same)).status == 403
    out = await client.delete("/ui/session", headers={**same, CSRF_HEADER: body["csrf"]})
    assert out.status == 204 and out.cookies[SESSION_COOKIE].value == ""
    assert (await client.get("/api/storages/gcs")).status == 401


async def test_viewer_moves_the_token_into_the_cookie(client):
    token = make_token(tasks=[client.task], ttl=120)
    response = await client.get(f"/view/tasks/{client.task}?token={token}", allow_redirects=False)
    assert response.status == 303 and response.headers["Location"] == f"/view/tasks/{client.task}"
    cookie = response.cookies["gateway_token"]
    assert cookie.value == token and cookie["httponly"] and cookie["samesite"] == "Lax"
    assert 110 <= int(cookie["max-age"]) <= 120
    bad = await client.get(f"/view/tasks/{client.task}?token=nope", allow_redirects=False)
    assert bad.status == 401 and "gateway_token" not in bad.cookies
    other = make_token(tasks=[client.other])
    refused = await client.get(f"/view/tasks/{client.task}?token={other}", allow_redirects=False)
    assert refused.status == 403 and "gateway_token" not in refused.cookies
    behind_tls = await client.get(
        f"/view/tasks/{client.task}?token={token}", allow_redirects=False, headers={"X-Forwarded-Proto": "https"}
    )
    assert behind_tls.cookies["gateway_token"]["secure"]


async def test_viewer_media_list(client):
    auth = {"Authorization": f"Bearer {make_token(tasks=[client.task])}"}
    answer = await (await client.get(f"/view/tasks/{client.task}/media", headers=auth)).json()
    media = {item["field"]: item for item in answer["media"]}
    assert answer["task"] == client.task and answer["project"] == PROJECT
    assert media["image"]["kind"] == "image" and media["image"]["name"] == "photo.JPG"
    assert media["doc"] == {
        "field": "doc",
        "name": "book.pdf",
        "kind": "pdf",
        "url": media["doc"]["url"],
        "size": len(OBJECTS[1].data),
    }
    assert media["note"]["kind"] == "other"
    for item in media.values():  # the resolve URLs serve with the same token
        assert (await client.get(item["url"], headers=auth)).status == 200
    for path, headers, status, reason in (
        (f"/view/tasks/{client.task}/media", {}, 401, "missing_token"),
        (f"/view/tasks/{client.other}/media", auth, 403, "no_grant"),
        ("/view/tasks/999999/media", auth, 404, "unknown_task"),
    ):
        response = await client.get(path, headers=headers)
        assert response.status == status and (await response.json())["error"] == reason


async def test_viewer_needs_cookie_tokens(tmp_path, aiohttp_client):
    app = create_app(build_settings([], tmp_path, auth={"cookie": ""}))
    response = await (await aiohttp_client(app)).get(f"/view/tasks/1?token={make_token(tasks=[1])}")
    assert response.status == 404 and (await response.json())["error"] == "viewer_disabled"
