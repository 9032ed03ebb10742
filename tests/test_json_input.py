"""Every JSON entry point refuses what it cannot read with a precise 4xx and a JSON answer, never a
500 (issue 16, case 3): nesting beyond strictjson.MAX_DEPTH is counted before any parser runs,
bodies are bounded in size before they are read, text must be UTF-8 and Unicode."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
from typing import Any

import pytest

from gateway import strictjson
from gateway.api import body as bodies
from gateway.app import create_app

from .conftest import PROJECT, build_settings, make_token
from .test_api_openapi import check_answer

ADMIN = {"Authorization": f"Bearer {make_token('root', admin=True)}"}
HOOK_SECRET = "a-webhook-secret-for-json-tests"
HMAC_SECRET = "an-hmac-secret-for-json-tests"
DEEP = b"[" * 100_000  # the body: a RecursionError and a 500 before

ENTRY_POINTS = [  # method, path, extra headers
    ("POST", "/api/storages/gcs", ADMIN),
    ("POST", "/api/storages/gcs/validate", ADMIN),
    ("POST", "/api/storages/export/gcs", ADMIN),
    ("POST", f"/api/projects/{PROJECT}/import", ADMIN),
    ("PUT", "/api/tasks/1/annotations/1", ADMIN),
    ("POST", "/api/webhooks/label-studio", {"X-Gateway-Webhook-Secret": HOOK_SECRET}),
]


@pytest.fixture
async def client(tmp_path, aiohttp_client) -> Any:
    (tmp_path / "bucket").mkdir()
    settings = build_settings(
        [{"id": "s", "project": PROJECT, "type": "local", "bucket": "json-bucket", "root": str(tmp_path / "bucket")}],
        tmp_path,
        webhooks={"secret": HOOK_SECRET, "hmac_secret": HMAC_SECRET},
    )
    client = await aiohttp_client(create_app(settings))
    [task] = (await (await client.post(f"/api/projects/{PROJECT}/import", json=[{"a": 1}], headers=ADMIN)).json())[
        "task_ids"
    ]
    assert task == 1  # the annotation route's task exists, so its body is what gets refused
    return client


async def refused(client: Any, method: str, path: str, headers: dict[str, str], body: bytes, status: int) -> str:
    response = await client.request(method, path, data=body, headers={**headers, "Content-Type": "application/json"})
    text = await response.text()
    assert response.status == status, f"{method} {path}: {response.status} {text}"
    assert response.content_type == "application/json"
    if path.startswith("/api/"):
        check_answer(method, path, response.status, response.content_type, text)  # as documented
    return json.loads(text)["message"]


@pytest.mark.parametrize(("method", "path", "headers"), ENTRY_POINTS)
async def test_deep_nesting_is_a_400_naming_the_limit(client, method, path, headers) -> None:
    message = await refused(client, method, path, headers, DEEP, 400)
    assert f"nested deeper than {strictjson.MAX_DEPTH} levels" in message
    # At the limit is accepted as JSON (whatever the handler then thinks of its shape).
    limit = b"[" * strictjson.MAX_DEPTH + b"]" * strictjson.MAX_DEPTH
    response = await client.request(method, path, data=limit, headers=headers)
    assert response.status != 500 and "nested" not in await response.text()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"project": "\xff"}', "not UTF-8 text"),
        ('{"project": "x"}'.encode("utf-16"), "not UTF-8 text"),
        (b'{"project": "\\ud800"}', "lone surrogate"),
        (b'{"project": NaN}', "NaN is not a JSON value"),
        (b'{"project": ', "Expecting value"),
    ],
)
@pytest.mark.parametrize(("method", "path", "headers"), ENTRY_POINTS)
async def test_text_that_is_not_json_is_a_400_saying_why(client, method, path, headers, body, reason) -> None:
    assert reason in await refused(client, method, path, headers, body, 400)


async def test_nesting_inside_a_credentials_field_is_a_400(client) -> None:
    """The credentials field is JSON inside JSON: it is bounded by the same rule."""
    body = json.dumps({"project": "1", "bucket": "b-1", "google_application_credentials": "{" + "[" * 100_000})
    response = await client.post("/api/storages/gcs", data=body, headers=ADMIN)
    answer = await response.json()
    assert response.status == 400, answer
    assert "google_application_credentials" in answer["validation_errors"]


async def test_hmac_signed_deep_webhook_is_a_400(client) -> None:
    signature = hmac.new(HMAC_SECRET.encode(), DEEP, hashlib.sha256).hexdigest()
    headers = {"X-Signature-256": f"sha256={signature}"}
    assert "nested deeper" in await refused(client, "POST", "/api/webhooks/label-studio", headers, DEEP, 400)


@pytest.mark.parametrize(
    ("method", "path", "headers", "limit"),
    [
        ("POST", "/api/storages/gcs", ADMIN, bodies.SETTINGS_BYTES),
        ("POST", "/api/webhooks/label-studio", {"X-Gateway-Webhook-Secret": HOOK_SECRET}, bodies.ANNOTATION_BYTES),
        ("POST", "/ui/session", {}, bodies.SIGN_IN_BYTES),
    ],
)
async def test_bodies_beyond_their_route_limit_are_413(client, method, path, headers, limit) -> None:
    body = b" " * (limit + 1)
    if path == "/ui/session":  # the sign-in accepts only its own pages' Origin
        headers = {"Origin": str(client.make_url("/")).rstrip("/")}
    # Declared length: refused before reading. Chunked (no length): refused once past the limit.
    for data in (body, _chunks(body)):
        message = await refused(client, method, path, headers, data, 413)  # type: ignore[arg-type]
        assert str(limit) in message


async def test_a_webhook_without_the_secret_is_401_before_its_body_is_read(client) -> None:
    body = b" " * (bodies.ANNOTATION_BYTES + 1)
    assert "secret" in await refused(client, "POST", "/api/webhooks/label-studio", {}, body, 401)


async def _chunks(data: bytes) -> Any:
    for start in range(0, len(data), 256 * 1024):
        yield data[start : start + 256 * 1024]


def test_depth_guard_reads_pieces_as_one_text() -> None:
    """Strings (with escapes, split anywhere between pieces) hide their brackets; the old
    scanner took the closing quote of `"\\n"` for an escaped one and then ignored all nesting."""
    text = b'[{"a": "\\n", "b": "]]]\\"[[[", "c": "\\\\"}, ' + b"[" * 101
    for cut in range(len(text)):
        guard = strictjson.DepthGuard()
        with pytest.raises(strictjson.BadJson, match="nested deeper than 100"):
            guard.feed(text[:cut])
            guard.feed(text[cut:])
    guard = strictjson.DepthGuard()
    guard.feed(b'[{"a": "\\n", "b": "[[[["}, [[1]]]')
    assert guard.depth == 0


def _reference_depth(text: bytes, limit: int) -> int | None:
    """Byte by byte, as the JSON grammar reads strings: the final depth, or None past `limit`."""
    depth, in_string, escaped = 0, False, False
    for byte in text:
        char = bytes([byte])
        if escaped:
            escaped = False
        elif in_string:
            escaped, in_string = char == b"\\", char != b'"'
        elif char == b'"':
            in_string = True
        elif char in b"[{":
            depth += 1
            if depth > limit:
                return None
        elif char in b"]}":
            depth -= 1
    return depth


def test_depth_guard_agrees_with_a_byte_by_byte_reading() -> None:
    """Random texts of brackets, quotes and backslashes, fed in random pieces (a fixed seed)."""
    generator = random.Random(16)
    for _ in range(20_000):
        text = bytes(generator.choice(b'[]{}"\\ax') for _ in range(generator.randint(0, 30)))
        limit = generator.randint(0, 4)
        cuts = sorted(generator.sample(range(len(text) + 1), k=min(len(text) + 1, generator.randint(0, 4))))
        guard = strictjson.DepthGuard(limit)
        try:
            for begin, end in zip([0, *cuts], [*cuts, len(text)], strict=True):
                guard.feed(text[begin:end])
            depth: int | None = guard.depth
        except strictjson.BadJson:
            depth = None
        assert depth == _reference_depth(text, limit), (text, cuts, limit)
