"""The management API for source storages and tasks (issue 5), through the app and fake-gcs-server.

Storages are created with Label Studio's field names, synced by the in-process worker, and the
tasks they import are listed, resolved and served by the media path. Credentials are write-only:
they never come back in an answer or a log line, and rest encrypted in the registry. Every
answer is checked against the OpenAPI description (tests/test_api_openapi.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.app import create_app
from gateway.state import CATALOG, REGISTRY
from gateway.vault import Vault

from .conftest import PROJECT, StoredObject, build_settings, make_token, seed
from .test_api_openapi import check_answer
from .test_presign import service_account_json

API_PROJECT = "8"  # API storages live here; the config storage is in PROJECT
VAULT_KEY = "an-encryption-key-for-tests-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {make_token('root', admin=True)}"}
STORAGES = "/api/storages/gcs"
IMAGES = [
    StoredObject("images/a.jpg", b"A" * 1000, "image/jpeg"),
    StoredObject("images/b.jpg", b"B" * 2000, "image/jpeg"),
    StoredObject("images/c.jpg", b"C" * 3000, "image/jpeg"),
    StoredObject("images/notes.txt", b"not an image", "text/plain"),
    StoredObject("images/deeper/d.jpg", b"D" * 10, "image/jpeg"),
    StoredObject("elsewhere/e.jpg", b"E" * 10, "image/jpeg"),
]


@pytest.fixture(scope="module")
def credentials() -> dict[str, str]:
    """A syntactically valid service-account key (never used on the network) and its secrets."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    text = service_account_json(key)
    pem = json.loads(text)["private_key"]
    # A line from the middle of the PEM body: finding it anywhere means the key leaked.
    return {"json": text, "pem_line": pem.splitlines()[5], "pem": pem}


class Api:
    """One gateway app (and its test client) over a shared bucket and registry."""

    def __init__(self, client: Any, bucket: str) -> None:
        self.client, self.bucket = client, bucket
        self.app = client.server.app
        self.answers: list[str] = []  # every body this gateway answered, for leak checks

    async def call(self, method: str, path: str, status: int, body: Any = None, **kwargs: Any) -> Any:
        kwargs.setdefault("headers", ADMIN)
        if body is not None:
            kwargs["data"] = body if isinstance(body, str | bytes) else json.dumps(body)
        response = await self.client.request(method, path, **kwargs)
        text = await response.text()
        self.answers.append(text)
        assert response.status == status, f"{method} {path}: {response.status} {text}"
        check_answer(method, path, response.status, response.content_type, text)  # as documented
        return json.loads(text) if text and response.content_type == "application/json" else text

    async def create(self, expect: int = 201, /, **fields: Any) -> Any:
        fields.setdefault("project", API_PROJECT)
        fields.setdefault("bucket", self.bucket)
        return await self.call("POST", STORAGES, expect, fields)

    async def wait_status(self, storage_id: int, done: tuple[str, ...] = ("completed",), timeout: float = 15) -> Any:
        """Poll the storage until its status is one of `done` (a deadline, never a fixed sleep)."""
        deadline = time.monotonic() + timeout
        while True:
            answer = await self.call("GET", f"{STORAGES}/{storage_id}", 200)
            if answer["status"] in done:
                return answer
            assert answer["status"] in ("queued", "in_progress"), answer
            assert time.monotonic() < deadline, f"still {answer['status']}: {answer}"
            await asyncio.sleep(0.05)


@pytest.fixture
def world(tmp_path, emulator, aiohttp_client, monkeypatch):
    """Factory of gateways sharing one bucket (IMAGES) and one registry; a config storage in PROJECT."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.host)
    # Application Default Credentials must fail fast and the same way everywhere.
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-adc.json"))
    bucket = f"api-{uuid.uuid4().hex[:12]}"
    seed("gcs", bucket, IMAGES, tmp_path, emulator)
    config_storage = {"id": "cfg", "project": PROJECT, "type": "gcs", "bucket": bucket, "prefix": "images"}

    async def build(url: str | None = None, *, keys: bool = True, worker: bool = False, **registry: Any) -> Api:
        registry = {
            "url": url or f"sqlite:///{tmp_path / 'registry.db'}",
            "storage_refresh": 0.2,
            **({"encryption_keys": [VAULT_KEY]} if keys else {}),
            **registry,
        }
        settings = build_settings([config_storage], tmp_path, registry=registry, sync={"poll_interval": 0.1})
        client = await aiohttp_client(create_app(settings, workers=worker))
        return Api(client, bucket)

    build.emulator = emulator  # type: ignore[attr-defined]
    build.bucket = bucket  # type: ignore[attr-defined]
    return build


def fileuri(uri: str) -> str:
    return base64.urlsafe_b64encode(uri.encode()).decode().rstrip("=")


# -- who may call it ---------------------------------------------------------------------------

PROTECTED = [
    ("GET", STORAGES),
    ("POST", STORAGES),
    ("POST", f"{STORAGES}/validate"),
    ("POST", f"{STORAGES}/preview"),
    ("GET", f"{STORAGES}/cfg"),
    ("PATCH", f"{STORAGES}/cfg"),
    ("DELETE", f"{STORAGES}/cfg"),
    ("POST", f"{STORAGES}/cfg/preview"),
    ("POST", f"{STORAGES}/cfg/sync"),
    ("GET", f"/api/projects/{PROJECT}/tasks"),
    ("POST", f"/api/projects/{PROJECT}/import"),
    ("GET", "/api/tasks/1"),
]


async def test_admin_token_in_the_authorization_header_only(world):
    api = await world()
    user = make_token("bob", tasks="*", projects="*")
    admin = make_token("root", admin=True)
    for method, path in PROTECTED:
        body = json.dumps({"project": API_PROJECT, "bucket": api.bucket})
        missing = await api.call(method, path, 401, body, headers={})
        assert missing["error"] == "missing_token"
        response = await api.client.request(method, path, data=body)
        assert response.headers["WWW-Authenticate"].startswith("Bearer ")
        forbidden = await api.call(method, path, 403, body, headers={"Authorization": f"Bearer {user}"})
        assert forbidden["error"] == "not_admin"
        # Cookies (CSRF) and query strings (logs) never carry an admin token to the API.
        await api.call(method, path, 401, body, headers={}, cookies={"gateway_token": admin})
        await api.call(method, f"{path}?token={admin}", 401, body, headers={})
    # Only a JSON true is an admin claim; an expired admin token is no token at all.
    for claim in ("true", 1, [True]):
        token = make_token("root", admin=claim)
        await api.call("GET", STORAGES, 403, headers={"Authorization": f"Bearer {token}"})
    expired = make_token("root", admin=True, ttl=-3600)
    assert (await api.call("GET", STORAGES, 401, headers={"Authorization": f"Bearer {expired}"}))["error"] == (
        "expired_token"
    )
    # Nothing was created or queued by the refused calls.
    assert await api.call("GET", STORAGES, 200) == [await api.call("GET", f"{STORAGES}/cfg", 200)]
    assert (await api.call("GET", f"{STORAGES}/cfg", 200))["status"] == "initialized"
    # The OpenAPI description is public.
    document = await api.call("GET", "/api/openapi.json", 200, headers={})
    assert document["openapi"] == "3.1.0"


# -- create, list, get, update, delete -----------------------------------------------------------

LABEL_STUDIO_FIELDS = {
    "project": int(API_PROJECT),  # Label Studio sends the project as a number
    "title": "Images",
    "description": "the jpgs",
    "prefix": "images",
    "regex_filter": r".*\.jpg",
    "use_blob_urls": True,
    "recursive_scan": False,
    "presign": False,
    "presign_ttl": 30,
    "google_project_id": "quota-project",
}
REPRESENTATION = {
    "id",
    "type",
    "source",
    "project",
    "title",
    "description",
    "bucket",
    "prefix",
    "regex_filter",
    "use_blob_urls",
    "recursive_scan",
    "presign",
    "presign_ttl",
    "google_project_id",
    "data_key",
    "sync_interval",
    "client_allowlist",
    "has_credentials",
    "created_at",
    "updated_at",
    "status",
    "last_sync",
    "last_sync_count",
    "last_sync_job",
    "meta",
    "problem",
}


async def test_crud_with_label_studio_fields(world, registry_url):
    api = await world(registry_url)
    created = await api.create(**LABEL_STUDIO_FIELDS)
    assert set(created) == REPRESENTATION
    assert isinstance(created["id"], int)
    assert created["type"] == "gcs" and created["source"] == "api"
    assert created["project"] == API_PROJECT
    assert created["prefix"] == "images/"  # a prefix names a folder, as Label Studio normalises it
    for name in ("title", "description", "regex_filter", "presign_ttl", "google_project_id", "bucket"):
        assert created[name] == {**LABEL_STUDIO_FIELDS, "bucket": api.bucket}[name], name
    assert created["status"] == "initialized"
    assert created["last_sync"] is None and created["last_sync_count"] is None and created["last_sync_job"] is None
    assert created["has_credentials"] is False and created["problem"] is None
    assert created["meta"]["created"] == 0 and created["meta"]["errors_sample"] == []
    assert created["created_at"].endswith("Z") and created["created_at"] == created["updated_at"]
    storage_id = created["id"]

    assert await api.call("GET", f"{STORAGES}/{storage_id}", 200) == created
    listed = await api.call("GET", STORAGES, 200)
    assert [(s["id"], s["source"]) for s in listed] == [("cfg", "config"), (storage_id, "api")]
    config = listed[0]
    assert config["project"] == PROJECT and config["prefix"] == "images/" and config["created_at"] is None
    assert [s["id"] for s in await api.call("GET", f"{STORAGES}?project={API_PROJECT}", 200)] == [storage_id]
    assert [s["id"] for s in await api.call("GET", f"{STORAGES}?project={PROJECT}", 200)] == ["cfg"]
    assert await api.call("GET", f"{STORAGES}?project=999", 200) == []

    patched = await api.call(
        "PATCH", f"{STORAGES}/{storage_id}", 200, {"title": "Renamed", "prefix": "images/deeper", "presign_ttl": 60}
    )
    assert patched["title"] == "Renamed" and patched["prefix"] == "images/deeper/" and patched["presign_ttl"] == 60
    assert patched["description"] == "the jpgs"  # untouched fields stay
    assert patched["updated_at"] >= created["updated_at"]
    assert await api.call("GET", f"{STORAGES}/{storage_id}", 200) == patched
    assert api.app[CATALOG].get(str(storage_id)).prefix == "images/deeper/"
    # Its tasks belong to its project: a storage does not move (the same project, as a number, is fine).
    moved = await api.call("PATCH", f"{STORAGES}/{storage_id}", 400, {"project": "9", "title": "moved"})
    assert set(moved["validation_errors"]) == {"project"}
    assert (await api.call("PATCH", f"{STORAGES}/{storage_id}", 200, {"project": int(API_PROJECT)}))[
        "title"
    ] == "Renamed"

    assert await api.call("DELETE", f"{STORAGES}/{storage_id}", 204) == ""
    for method in ("GET", "PATCH", "DELETE"):
        missing = await api.call(method, f"{STORAGES}/{storage_id}", 404, {"title": "x"})
        assert missing["error"] == "unknown_storage"
    assert [s["id"] for s in await api.call("GET", STORAGES, 200)] == ["cfg"]
    assert api.app[CATALOG].get(str(storage_id)) is None


async def test_list_order_is_stable(world):
    """Config-file storages first, then API storages by id, whatever was changed last."""
    api = await world()
    ids = [(await api.create(title=str(n)))["id"] for n in range(3)]
    await api.call("PATCH", f"{STORAGES}/{ids[0]}", 200, {"title": "changed"})
    assert [s["id"] for s in await api.call("GET", STORAGES, 200)] == ["cfg", *ids]
    assert [s.id for s in api.app[CATALOG].storages_of(API_PROJECT)] == [str(i) for i in ids]


async def test_config_storages_change_only_with_the_file(world):
    api = await world()
    for method, body in (("PATCH", {"title": "x"}), ("DELETE", None)):
        refused = await api.call(method, f"{STORAGES}/cfg", 409, body)
        assert refused["error"] == "declared_in_config"
    assert (await api.call("GET", f"{STORAGES}/cfg", 200))["title"] == ""


async def test_unknown_storage_is_404(world):
    api = await world()
    for method, path in (
        ("GET", f"{STORAGES}/404"),
        ("PATCH", f"{STORAGES}/404"),
        ("DELETE", f"{STORAGES}/404"),
        ("POST", f"{STORAGES}/404/preview"),
        ("POST", f"{STORAGES}/404/sync"),
        ("POST", f"{STORAGES}/nope/sync"),
    ):
        answer = await api.call(method, path, 404, {})
        assert answer["error"] == "unknown_storage", (method, path)
    answer = await api.call("POST", f"{STORAGES}/validate", 404, {"id": 404})
    assert answer["error"] == "unknown_storage"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        pytest.param({"colour": "blue"}, "colour", id="unknown-field"),
        pytest.param({"bucket": "Bad_Bucket!"}, "bucket", id="bad-bucket"),
        pytest.param({"bucket": "ab"}, "bucket", id="short-bucket"),
        pytest.param({"regex_filter": "(unclosed"}, "regex_filter", id="bad-regex"),
        pytest.param({"regex_filter": r"(a)\1"}, "regex_filter", id="regex-backreference"),
        pytest.param({"regex_filter": r".*(?<!\.tmp)$"}, "regex_filter", id="regex-look-behind"),
        pytest.param({"presign_ttl": 0}, "presign_ttl", id="ttl-zero"),
        pytest.param({"presign_ttl": 10081}, "presign_ttl", id="ttl-too-long"),
        pytest.param({"presign_ttl": "15"}, "presign_ttl", id="ttl-string"),
        pytest.param({"presign_ttl": True}, "presign_ttl", id="ttl-bool"),
        pytest.param({"project": None}, "project", id="null-project"),
        pytest.param({"project": ""}, "project", id="empty-project"),
        pytest.param({"use_blob_urls": "yes"}, "use_blob_urls", id="flag-string"),
        pytest.param({"prefix": "/images"}, "prefix", id="absolute-prefix"),
        pytest.param({"title": "x" * 256}, "title", id="long-title"),
        pytest.param({"data_key": " "}, "data_key", id="blank-data-key"),
        pytest.param({"sync_interval": -1}, "sync_interval", id="negative-interval"),
    ],
)
async def test_bad_fields_are_named(world, fields, field):
    api = await world()
    answer = await api.create(400, **fields)
    assert answer["error"] == "validation_error"
    assert set(answer["validation_errors"]) == {field}, answer
    assert isinstance(answer["validation_errors"][field], list) and answer["validation_errors"][field][0]
    assert answer["message"].startswith(f"{field}: ")
    # The same checks guard updates.
    if field != "colour":
        storage = await api.create()
        answer = await api.call("PATCH", f"{STORAGES}/{storage['id']}", 400, fields)
        assert set(answer["validation_errors"]) == {field}
    assert [s["source"] for s in await api.call("GET", STORAGES, 200)].count("api") == (field != "colour")


async def test_missing_fields_and_bad_bodies(world):
    api = await world()
    answer = await api.call("POST", STORAGES, 400, {"title": "no project, no bucket"})
    assert set(answer["validation_errors"]) == {"project", "bucket"}
    answer = await api.call("POST", STORAGES, 400, {"bucket": api.bucket})
    assert answer["validation_errors"] == {"project": ["this field is required"]}
    assert answer["message"] == "project: this field is required"
    for body in ("not json", "[1, 2]", ""):
        assert (await api.call("POST", STORAGES, 400, body))["error"] == "bad_json"
    # Read-only fields (a representation sent back) are ignored, not refused.
    storage = await api.create(status="completed", id=99, has_credentials=True, meta={})
    assert storage["id"] != 99 and storage["status"] == "initialized" and storage["has_credentials"] is False


async def test_nul_characters_are_refused_on_both_databases(world, registry_url):
    """PostgreSQL cannot store NUL in text: it must be a 400 naming the field, not a 500."""
    api = await world(registry_url)
    for field in ("title", "description", "prefix", "google_project_id", "data_key", "regex_filter"):
        answer = await api.create(400, **{field: "with\u0000nul"})
        assert set(answer["validation_errors"]) == {field}, answer
    assert [s["id"] for s in await api.call("GET", STORAGES, 200)] == ["cfg"]


# -- credentials: write-only, encrypted at rest -------------------------------------------------


def assert_no_secret(text: str, credentials: dict[str, str]) -> None:
    assert credentials["pem_line"] not in text
    assert "PRIVATE KEY" not in text
    assert "private_key" not in text


async def test_credentials_are_write_only_and_encrypted(world, registry_url, credentials, caplog):
    caplog.set_level(logging.DEBUG)
    api = await world(registry_url, worker=True)
    secret = credentials["json"]
    created = await api.create(google_application_credentials=secret, presign=True, prefix="images")
    assert created["has_credentials"] is True and created["problem"] is None
    storage_id = created["id"]
    # A parsed JSON object is accepted too.
    as_object = await api.create(google_application_credentials=json.loads(secret), title="object")
    assert as_object["has_credentials"] is True

    # At rest: ciphertext that the configured key opens; in memory: the decrypted key, unprinted.
    row = await api.app[REGISTRY].get_storage(storage_id)
    assert row is not None and row["credentials"]
    assert_no_secret(row["credentials"], credentials)
    assert "signer@p.iam.gserviceaccount.com" not in row["credentials"]
    assert Vault((VAULT_KEY,)).open(row["credentials"]) == secret
    storage = api.app[CATALOG].get(str(storage_id))
    assert storage.google_application_credentials == secret
    assert_no_secret(repr(storage), credentials)
    assert str(storage_id) in api.app[CATALOG].signers  # the decrypted key signs URLs

    # Every way of reading it back, and every error about it.
    await api.call("GET", f"{STORAGES}/{storage_id}", 200)
    await api.call("GET", STORAGES, 200)
    await api.call("GET", f"{STORAGES}?project={API_PROJECT}", 200)
    await api.call("POST", f"{STORAGES}/validate", 200, {"id": storage_id})
    await api.call(
        "POST",
        f"{STORAGES}/validate",
        200,
        {**LABEL_STUDIO_FIELDS, "bucket": api.bucket, "google_application_credentials": secret},
    )
    await api.call("POST", f"{STORAGES}/validate", 400, {"id": storage_id, "bucket": "no-such-bucket-here"})
    await api.call("POST", f"{STORAGES}/validate", 200, {"id": storage_id, "google_application_credentials": secret})
    await api.call(
        "PATCH", f"{STORAGES}/{storage_id}", 400, {"regex_filter": "(", "google_application_credentials": secret}
    )
    patched = await api.call("PATCH", f"{STORAGES}/{storage_id}", 200, {"title": "kept credentials"})
    assert patched["has_credentials"] is True
    assert Vault((VAULT_KEY,)).open((await api.app[REGISTRY].get_storage(storage_id))["credentials"]) == secret
    await api.call("POST", f"{STORAGES}/{storage_id}/preview", 200)
    await api.call("POST", f"{STORAGES}/{storage_id}/sync", 202)
    assert (await api.wait_status(storage_id))["last_sync_count"] == 4  # the worker ran with them
    for answer in api.answers:
        assert_no_secret(answer, credentials)

    # The presign storage answers media requests with a URL signed by the stored key.
    [task] = (
        await api.call(
            "POST", f"/api/projects/{API_PROJECT}/import", 201, [{"image": f"gs://{api.bucket}/images/a.jpg"}]
        )
    )["task_ids"]
    media = await api.client.get(
        f"/tasks/{task}/resolve/?fileuri={fileuri(f'gs://{api.bucket}/images/a.jpg')}",
        headers={"Authorization": f"Bearer {make_token(tasks=[task])}"},
        allow_redirects=False,
    )
    assert media.status == 303
    assert "X-Goog-Credential=signer%40p.iam.gserviceaccount.com" in media.headers["Location"]

    # Removing them (back to Application Default Credentials) clears the column.
    cleared = await api.call("PATCH", f"{STORAGES}/{storage_id}", 200, {"google_application_credentials": None})
    assert cleared["has_credentials"] is False
    assert (await api.app[REGISTRY].get_storage(storage_id))["credentials"] is None

    # The check below looks at the whole flow: the access log, the catalog, the worker's sync lines.
    assert {"gateway.access", "gateway.sync"} <= {record.name for record in caplog.records}
    for record in caplog.records:
        assert_no_secret(record.getMessage(), credentials)
    assert_no_secret(caplog.text, credentials)


async def test_credentials_need_encryption_keys(world, credentials):
    api = await world(keys=False)
    answer = await api.create(400, google_application_credentials=credentials["json"])
    assert set(answer["validation_errors"]) == {"google_application_credentials"}
    assert "encryption_keys" in answer["validation_errors"]["google_application_credentials"][0]
    assert_no_secret(json.dumps(answer), credentials)
    assert [s["id"] for s in await api.call("GET", STORAGES, 200)] == ["cfg"]
    # Without credentials (Application Default Credentials) a storage needs no key.
    storage = await api.create()
    assert storage["has_credentials"] is False
    answer = await api.call(
        "PATCH", f"{STORAGES}/{storage['id']}", 400, {"google_application_credentials": credentials["json"]}
    )
    assert "encryption_keys" in answer["message"]


GARBAGE = "SECRET-GARBAGE-7f3a9c"


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("{" + GARBAGE, id="broken-json"),
        pytest.param(GARBAGE * 3, id="not-json"),
        pytest.param("/etc/gateway/" + GARBAGE + ".json", id="a-path"),
        pytest.param(["list", GARBAGE], id="a-list"),
        pytest.param(12345, id="a-number"),
        pytest.param({"type": "service_account", "private_key": GARBAGE}, id="incomplete-key"),
        pytest.param({"type": GARBAGE}, id="unknown-type"),
        pytest.param(
            {"type": "impersonated_service_account", "source_credentials": {"type": GARBAGE}},
            id="unknown-source-type",
        ),
        pytest.param({"type": "authorized_user", "refresh_token": GARBAGE}, id="incomplete-user"),
        pytest.param(
            {
                "type": "service_account",
                "project_id": "p",
                "private_key_id": "k1",
                "private_key": f"-----BEGIN PRIVATE KEY-----\n{GARBAGE}\n-----END PRIVATE KEY-----\n",
                "client_email": "x@p.iam.gserviceaccount.com",
                "token_uri": "https://oauth2.googleapis.com/token",
            },
            id="bad-private-key",
        ),
    ],
)
async def test_garbage_credentials_are_named_never_echoed(world, value):
    api = await world()
    for method, path in (("POST", STORAGES), ("POST", f"{STORAGES}/validate")):
        answer = await api.call(
            method, path, 400, {"project": API_PROJECT, "bucket": api.bucket, "google_application_credentials": value}
        )
        assert set(answer["validation_errors"]) == {"google_application_credentials"}, answer
        assert GARBAGE not in json.dumps(answer)
    assert [s["id"] for s in await api.call("GET", STORAGES, 200)] == ["cfg"]


async def test_session_cookie_needs_csrf_and_same_origin_on_writes(world):
    """The settings page's cookie works for reads; writes need X-CSRF-Token and this host's Origin."""
    from gateway.api.auth import CSRF_HEADER, SESSION_COOKIE, csrf_token

    api = await world()
    admin = make_token("root", admin=True)
    cookies = {SESSION_COOKIE: admin}
    assert await api.call("GET", STORAGES, 200, headers={}, cookies=cookies)
    origin = f"http://{api.client.server.host}:{api.client.server.port}"
    body = {"project": API_PROJECT, "bucket": api.bucket}
    good = {CSRF_HEADER: csrf_token(admin), "Origin": origin}
    for headers, reason in (
        ({}, "cross_origin"),
        ({"Origin": origin}, "csrf_failed"),
        ({"Origin": origin, CSRF_HEADER: csrf_token(make_token("root", admin=True, ttl=601))}, "csrf_failed"),
        ({**good, "Origin": "http://evil.example"}, "cross_origin"),
    ):
        answer = await api.call("POST", STORAGES, 403, body, headers=headers, cookies=cookies)
        assert answer["error"] == reason
    created = await api.call("POST", STORAGES, 201, body, headers=good, cookies=cookies)
    await api.call("DELETE", f"{STORAGES}/{created['id']}", 204, headers=good, cookies=cookies)
    user = make_token("bob", tasks="*")
    refused = await api.call("GET", STORAGES, 403, headers={}, cookies={SESSION_COOKIE: user})
    assert refused["error"] == "not_admin"


# -- "Test connection" and "Load preview" ------------------------------------------------------


async def test_validate(world, credentials):
    api = await world()
    fields = {"project": API_PROJECT, "bucket": api.bucket, "prefix": "images"}
    ok = await api.call("POST", f"{STORAGES}/validate", 200, fields)
    assert ok["ok"] is True and api.bucket in ok["message"]

    missing = await api.call("POST", f"{STORAGES}/validate", 400, {**fields, "bucket": "no-such-bucket-at-all"})
    assert missing["error"] == "bucket_not_found"
    assert "no-such-bucket-at-all" in missing["validation_errors"]["bucket"][0]

    bad = await api.call("POST", f"{STORAGES}/validate", 400, {**fields, "google_application_credentials": "{oops"})
    assert set(bad["validation_errors"]) == {"google_application_credentials"}
    fields_bad = await api.call("POST", f"{STORAGES}/validate", 400, {**fields, "regex_filter": "[", "colour": 1})
    assert set(fields_bad["validation_errors"]) == {"regex_filter", "colour"}

    # A presign storage needs an identity to sign with: without credentials (and no Application
    # Default Credentials here) the test fails on the credentials field ...
    no_key = await api.call("POST", f"{STORAGES}/validate", 400, {**fields, "presign": True})
    assert set(no_key["validation_errors"]) == {"google_application_credentials"}
    # ... while a stored storage's test (`id`) uses its stored credentials, with the form's changes.
    stored = await api.create(**fields, google_application_credentials=credentials["json"])
    plain = await api.create(**fields)
    assert (await api.call("POST", f"{STORAGES}/validate", 200, {"id": stored["id"], "presign": True}))["ok"]
    no_key = await api.call("POST", f"{STORAGES}/validate", 400, {"id": plain["id"], "presign": True})
    assert set(no_key["validation_errors"]) == {"google_application_credentials"}
    gone = await api.call("POST", f"{STORAGES}/validate", 400, {"id": stored["id"], "bucket": "no-such-bucket-at-all"})
    assert gone["error"] == "bucket_not_found"
    # Config storages can be tested too; validating changes nothing.
    assert (await api.call("POST", f"{STORAGES}/validate", 200, {"id": "cfg"}))["ok"]
    assert (await api.call("GET", f"{STORAGES}/{stored['id']}", 200))["presign"] is False


async def task_count(api: Api, project: str = API_PROJECT) -> int:
    return (await api.call("GET", f"/api/projects/{project}/tasks", 200))["total"]


async def test_preview_blob_mode(world):
    api = await world()
    storage = await api.create(prefix="images", regex_filter=r".*\.jpg")
    preview = await api.call("POST", f"{STORAGES}/{storage['id']}/preview", 200)
    # One level (recursive_scan off), the regex applied as re.match on the whole key.
    assert preview["keys"] == ["images/a.jpg", "images/b.jpg", "images/c.jpg"]
    assert preview["tasks"] == [{"data": {"$undefined$": f"gs://{api.bucket}/{key}"}} for key in preview["keys"]]
    limited = await api.call("POST", f"{STORAGES}/{storage['id']}/preview", 200, {"limit": 2})
    assert limited["keys"] == ["images/a.jpg", "images/b.jpg"]
    recursive = await api.create(prefix="images", recursive_scan=True, data_key="image")
    preview = await api.call("POST", f"{STORAGES}/{recursive['id']}/preview", 200)
    assert "images/deeper/d.jpg" in preview["keys"] and "images/notes.txt" in preview["keys"]
    assert preview["tasks"][0] == {"data": {"image": f"gs://{api.bucket}/images/a.jpg"}}
    for limit in (0, 101, "5", True):
        answer = await api.call("POST", f"{STORAGES}/{storage['id']}/preview", 400, {"limit": limit})
        assert set(answer["validation_errors"]) == {"limit"}
    # A config storage previews the same way.
    assert (await api.call("POST", f"{STORAGES}/cfg/preview", 200))["keys"][0] == "images/a.jpg"
    assert await task_count(api) == 0 and await task_count(api, PROJECT) == 0
    missing = await api.create(bucket="no-such-bucket-at-all")
    answer = await api.call("POST", f"{STORAGES}/{missing['id']}/preview", 400)
    assert answer["error"] == "bucket_not_found"


async def test_preview_of_unsaved_settings(world, credentials):
    """The Add Source Storage form previews before anything is saved; errors name their field."""
    api = await world()
    fields = {"project": API_PROJECT, "bucket": api.bucket, "prefix": "images", "regex_filter": r".*\.jpg"}
    preview = await api.call("POST", f"{STORAGES}/preview", 200, {**fields, "limit": 2})
    assert preview["keys"] == ["images/a.jpg", "images/b.jpg"]
    assert preview["tasks"][0] == {"data": {"$undefined$": f"gs://{api.bucket}/images/a.jpg"}}
    assert (await api.call("GET", STORAGES, 200, params={"project": API_PROJECT})) == []  # nothing saved
    missing = await api.call("POST", f"{STORAGES}/preview", 400, {**fields, "bucket": "no-such-bucket-at-all"})
    assert missing["error"] == "bucket_not_found" and set(missing["validation_errors"]) == {"bucket"}
    bad = await api.call("POST", f"{STORAGES}/preview", 400, {**fields, "regex_filter": "(", "limit": 0})
    assert set(bad["validation_errors"]) == {"limit"}  # the limit first, then the fields
    bad = await api.call("POST", f"{STORAGES}/preview", 400, {**fields, "regex_filter": "("})
    assert set(bad["validation_errors"]) == {"regex_filter"}
    bad = await api.call("POST", f"{STORAGES}/preview", 400, {**fields, "google_application_credentials": "{oops"})
    assert set(bad["validation_errors"]) == {"google_application_credentials"}
    # A stored storage with changes (`id`), as validate takes it.
    stored = await api.create(**fields, google_application_credentials=credentials["json"])
    changed = await api.call("POST", f"{STORAGES}/preview", 200, {"id": stored["id"], "regex_filter": ""})
    assert "images/notes.txt" in changed["keys"]
    await api.call("POST", f"{STORAGES}/preview", 404, {"id": 999_999})
    assert credentials["pem_line"] not in "".join(api.answers)


async def test_preview_task_files(world):
    api = await world()
    upload = world.emulator.upload
    upload(api.bucket, "tasks/1-broken.json", b'[{oops, "data": {"text": "x"}}]', "application/json")
    upload(api.bucket, "tasks/2-readme.md", b"# not tasks", "text/markdown")
    jsonl = b'{"data": {"image": "gs://b/1.jpg"}, "predictions": [{"result": []}]}\nnot json\n{"text": "bare data"}\n'
    upload(api.bucket, "tasks/3-tasks.jsonl", jsonl, "application/x-ndjson")
    upload(api.bucket, "tasks/4-more.json", b'[{"text": "never reached"}]', "application/json")
    storage = await api.create(prefix="tasks", use_blob_urls=False)
    preview = await api.call("POST", f"{STORAGES}/{storage['id']}/preview", 200)
    assert preview["keys"] == ["tasks/1-broken.json", "tasks/2-readme.md", "tasks/3-tasks.jsonl", "tasks/4-more.json"]
    # The first tasks of the first file that has any; the problems met on the way, by file and line.
    assert preview["tasks"] == [
        {"data": {"image": "gs://b/1.jpg"}, "predictions": [{"result": []}]},
        {"data": {"text": "bare data"}},
    ]
    errors = preview["errors"]
    assert len(errors) == 3, errors
    assert errors[0].startswith("tasks/1-broken.json: malformed JSON")
    assert errors[1].startswith("tasks/2-readme.md: not a task file")
    assert errors[2].startswith("tasks/3-tasks.jsonl: line 2: not valid JSON")
    assert await task_count(api) == 0
    assert (await api.call("GET", f"{STORAGES}/{storage['id']}", 200))["status"] == "initialized"


# -- sync, and the tasks it imports ------------------------------------------------------------


async def test_sync_then_list_resolve_and_serve(world, registry_url):
    api = await world(registry_url, worker=True)
    storage = await api.create(prefix="images", regex_filter=r".*\.jpg")
    storage_id = storage["id"]
    queued = await api.call("POST", f"{STORAGES}/{storage_id}/sync", 202)
    assert queued["status"] in ("queued", "in_progress"), queued
    assert isinstance(queued["last_sync_job"], int) and queued["last_sync"] is None

    done = await api.wait_status(storage_id)
    assert done["last_sync_job"] == queued["last_sync_job"]
    assert done["last_sync"] is not None and done["last_sync"].endswith("Z")
    assert done["last_sync_count"] == 3
    meta = done["meta"]
    # a, b, c and notes.txt listed (one level: images/deeper/ is a folder), notes.txt skipped.
    assert {k: meta[k] for k in ("listed", "created", "updated", "removed", "skipped", "errors")} == {
        "listed": 4,
        "created": 3,
        "updated": 0,
        "removed": 0,
        "skipped": 1,
        "errors": 0,
    }
    assert meta["errors_sample"] == [] and meta["message"] is None
    assert meta["queued_at"] <= meta["started_at"] <= meta["finished_at"] == done["last_sync"]

    # A task imported by hand sits in the same project, outside the storage.
    manual = await api.call(
        "POST", f"/api/projects/{API_PROJECT}/import", 201, [{"data": {"image": f"gs://{api.bucket}/images/b.jpg"}}]
    )
    tasks_url = f"/api/projects/{API_PROJECT}/tasks"
    everything = await api.call("GET", tasks_url, 200)
    assert everything["total"] == 4 and not everything["has_next"]
    synced = await api.call("GET", f"{tasks_url}?storage={storage_id}", 200)
    assert synced["total"] == 3
    assert [t["storage_filename"] for t in synced["tasks"]] == ["images/a.jpg", "images/b.jpg", "images/c.jpg"]
    assert all(t["storage"]["id"] == str(storage_id) and t["project"] == API_PROJECT for t in synced["tasks"])
    assert manual["task_ids"][0] not in [t["id"] for t in synced["tasks"]]

    pages = [await api.call("GET", f"{tasks_url}?page={page}&page_size=3", 200) for page in (1, 2, 3)]
    assert [(p["page"], p["page_size"], p["total"], p["has_next"], len(p["tasks"])) for p in pages] == [
        (1, 3, 4, True, 3),
        (2, 3, 4, False, 1),
        (3, 3, 4, False, 0),
    ]
    assert [t["id"] for p in pages for t in p["tasks"]] == [t["id"] for t in everything["tasks"]]

    by_key = await api.call("GET", f"{tasks_url}?storage={storage_id}&key=images/c.jpg&resolve=true", 200)
    assert by_key["total"] == 1
    [task] = by_key["tasks"]
    uri = f"gs://{api.bucket}/images/c.jpg"
    expected = f"/tasks/{task['id']}/resolve/?fileuri={fileuri(uri)}"
    assert task["data"] == {"$undefined$": expected}
    assert "=" not in expected.partition("fileuri=")[2]  # urlsafe base64 without padding
    single = await api.call("GET", f"/api/tasks/{task['id']}?resolve=true", 200)
    assert single["data"] == {"$undefined$": expected}
    assert (await api.call("GET", f"/api/tasks/{task['id']}", 200))["data"] == {"$undefined$": uri}
    assert (await api.call("GET", f"/api/tasks/{task['id']}?resolve=no", 200))["data"] == {"$undefined$": uri}
    for value in ("maybe", "TRUE"):  # only the documented values: not a guess (found by tests/test_api_fuzz.py)
        assert (await api.call("GET", f"/api/tasks/{task['id']}?resolve={value}", 400))["error"] == "bad_parameter"

    # The rewritten URL serves the object to a token for that task, and only to it.
    token = {"Authorization": f"Bearer {make_token(tasks=[task['id']])}"}
    media = await api.client.get(expected, headers=token)
    assert media.status == 200 and await media.read() == b"C" * 3000
    other = {"Authorization": f"Bearer {make_token(tasks=[manual['task_ids'][0]])}"}
    assert (await api.client.get(expected, headers=other)).status == 403

    # A re-sync of the unchanged bucket writes nothing.
    again = await api.call("POST", f"{STORAGES}/{storage_id}/sync", 202)
    assert again["last_sync_job"] != done["last_sync_job"]
    second = await api.wait_status(storage_id)
    assert second["last_sync_job"] == again["last_sync_job"]
    assert second["last_sync_count"] == 0 and second["meta"]["created"] == 0 and second["meta"]["listed"] == 4

    # Deleting the storage keeps its tasks, detached.
    await api.call("DELETE", f"{STORAGES}/{storage_id}", 204)
    assert (await api.call("GET", f"{tasks_url}?storage={storage_id}", 200))["total"] == 0
    kept = await api.call("GET", tasks_url, 200)
    assert kept["total"] == 4
    detached = await api.call("GET", f"/api/tasks/{task['id']}", 200)
    assert "storage" not in detached and detached["data"] == {"$undefined$": uri}


async def test_sync_of_a_task_file_storage_with_errors(world):
    api = await world(worker=True)
    jsonl = b'{"data": {"image": "gs://b/1.jpg"}}\nnot json\n{"text": "bare"}\n'
    world.emulator.upload(api.bucket, "jobs/a.jsonl", jsonl, "application/x-ndjson")
    world.emulator.upload(api.bucket, "jobs/b.txt", b"nope", "text/plain")
    storage = await api.create(prefix="jobs", use_blob_urls=False)
    await api.call("POST", f"{STORAGES}/{storage['id']}/sync", 202)
    done = await api.wait_status(storage["id"], ("completed_with_errors", "completed", "failed"))
    assert done["status"] == "completed_with_errors"
    assert done["last_sync_count"] == 2 and done["meta"]["errors"] == 2
    assert any(e.startswith("jobs/a.jsonl: line 2") for e in done["meta"]["errors_sample"])
    assert any(e.startswith("jobs/b.txt") for e in done["meta"]["errors_sample"])
    tasks = (await api.call("GET", f"/api/projects/{API_PROJECT}/tasks?storage={storage['id']}", 200))["tasks"]
    assert [t["storage"]["row"] for t in tasks] == [0, 2]


async def test_sync_requests_join_the_queued_job(world, registry_url):
    """Without a worker the job waits; a second request joins it; another instance's worker runs it."""
    idle = await world(registry_url)
    storage = await idle.create(prefix="images")
    first = await idle.call("POST", f"{STORAGES}/{storage['id']}/sync", 202)
    second = await idle.call("POST", f"{STORAGES}/{storage['id']}/sync", 202)
    assert first["status"] == second["status"] == "queued"
    assert first["last_sync_job"] == second["last_sync_job"]
    assert (await idle.call("GET", f"{STORAGES}/{storage['id']}", 200))["status"] == "queued"
    await world(registry_url, worker=True)
    done = await idle.wait_status(storage["id"])
    assert done["last_sync_job"] == first["last_sync_job"] and done["last_sync_count"] == 4


async def test_a_storage_created_on_another_instance_is_served(world, registry_url):
    first = await world(registry_url)
    second = await world(registry_url)
    storage = await second.create(prefix="images")
    storage_id = str(storage["id"])
    started = time.monotonic()
    # The first instance notices by itself, within [registry] storage_refresh (0.2 s here).
    while first.app[CATALOG].get(storage_id) is None:
        assert time.monotonic() - started < 5, "the first instance never saw the storage"
        await asyncio.sleep(0.02)
    assert first.app[CATALOG].get(storage_id).prefix == "images/"

    [task] = (
        await first.call(
            "POST", f"/api/projects/{API_PROJECT}/import", 201, [{"image": f"gs://{first.bucket}/images/a.jpg"}]
        )
    )["task_ids"]
    url = f"/tasks/{task}/resolve/?fileuri={fileuri(f'gs://{first.bucket}/images/a.jpg')}"
    token = {"Authorization": f"Bearer {make_token(tasks=[task])}"}
    media = await first.client.get(url, headers=token)
    assert media.status == 200 and await media.read() == b"A" * 1000

    # Its other API answers know it at once (they reload the catalog), and so do changes.
    await second.call("PATCH", f"{STORAGES}/{storage_id}", 200, {"title": "from the second"})
    assert (await first.call("GET", f"{STORAGES}/{storage_id}", 200))["title"] == "from the second"
    await second.call("DELETE", f"{STORAGES}/{storage_id}", 204)
    started = time.monotonic()
    while (await first.client.get(url, headers=token)).status != 403:
        assert time.monotonic() - started < 5, "the first instance kept serving a deleted storage"
        await asyncio.sleep(0.02)
    assert first.app[CATALOG].get(storage_id) is None


async def test_storage_api_answers_see_other_instances_at_once(world):
    first = await world()
    second = await world()
    storage = await second.create(prefix="images")
    # No waiting for the periodic reload: every storage route looks the storage up afresh.
    for method, path, status in (
        ("POST", f"{STORAGES}/{storage['id']}/preview", 200),
        ("POST", f"{STORAGES}/{storage['id']}/sync", 202),
        ("PATCH", f"{STORAGES}/{storage['id']}", 200),
        ("POST", f"{STORAGES}/validate", 200),
    ):
        body = {"id": storage["id"]} if path.endswith("validate") else {}
        await first.call(method, path, status, body)
    await second.call("DELETE", f"{STORAGES}/{storage['id']}", 204)
    await first.call("POST", f"{STORAGES}/{storage['id']}/sync", 404)


async def test_task_list_parameters(world):
    api = await world()
    url = f"/api/projects/{PROJECT}/tasks"
    for query in (
        "page=0",
        "page=-1",
        "page=x",
        "page=%C2%B2",
        "page_size=0",
        "page_size=1001",
        "page=99999999999999999999",
    ):
        answer = await api.call("GET", f"{url}?{query}", 400)
        assert answer["error"] == "bad_parameter" and query.partition("=")[0] in answer["message"]
    empty = await api.call("GET", f"{url}?page=1000000&page_size=1000", 200)
    assert empty["tasks"] == [] and empty["total"] == 0 and not empty["has_next"]
    assert (await api.call("GET", "/api/tasks/999999", 404))["error"] == "unknown_task"


async def test_input_the_database_cannot_store_is_a_400(world, registry_url):
    """NaN/Infinity (not JSON), lone surrogates and NUL characters are refused by name on both
    databases, never a 500 or a misleading 503 (PostgreSQL refuses them where SQLite stores them)."""
    api = await world(registry_url)
    await api.create()
    for body in ('[{"data": {"x": NaN}}]', '[{"x": -Infinity}]'):
        answer = await api.call("POST", f"/api/projects/{API_PROJECT}/import", 400, body)
        assert answer["error"] == "bad_json"
        assert (await api.call("POST", STORAGES, 400, body.replace("[", "").replace("]", "")))["error"] == "bad_json"
    answer = await api.call("POST", STORAGES, 400, '{"project": "8", "bucket": "b-b-b", "presign_ttl": NaN}')
    assert answer["error"] == "bad_json"
    # A \ud800 escape names no character: refused with the body (gateway/strictjson.py), whatever the field.
    for field in ("title", "description", "prefix", "project"):
        answer = await api.call("POST", STORAGES, 400, {"project": API_PROJECT, "bucket": api.bucket, field: "x\ud800"})
        assert answer["error"] == "bad_json" and "lone surrogate" in answer["message"], answer
    answer = await api.create(400, google_application_credentials='{"type": "service_account\ud800"}')
    assert answer["error"] == "bad_json" and "lone surrogate" in answer["message"], answer
    tasks = f"/api/projects/{API_PROJECT}/tasks"
    for query in ("key=a%00b", "storage=1%00"):
        assert (await api.call("GET", f"{tasks}?{query}", 400))["error"] == "bad_parameter"
    assert (await api.call("GET", "/api/projects/8%00/tasks", 400))["error"] == "bad_parameter"
    # Unicode that is valid is stored and answered as given.
    [task] = (await api.call("POST", f"/api/projects/{API_PROJECT}/import", 201, [{"text": "é \u2603 \U0001f600"}]))[
        "task_ids"
    ]
    assert (await api.call("GET", f"/api/tasks/{task}", 200))["data"] == {"text": "é \u2603 \U0001f600"}
    assert (await api.create(title="\U0001f600"))["title"] == "\U0001f600"


async def test_a_task_file_with_nan_syncs_on_both_databases(world, registry_url):
    """Python's json accepts NaN; PostgreSQL's json type does not. The bad line must be a row
    error of a completed_with_errors job, not a crashed sync stuck in_progress."""
    api = await world(registry_url, worker=True)
    lines = b'{"data": {"score": 1.5}}\n{"data": {"score": NaN}}\n{"data": {"score": 2}}\n'
    world.emulator.upload(api.bucket, "nan/tasks.jsonl", lines, "application/x-ndjson")
    storage = await api.create(prefix="nan", use_blob_urls=False)
    await api.call("POST", f"{STORAGES}/{storage['id']}/sync", 202)
    done = await api.wait_status(storage["id"], ("completed", "completed_with_errors", "failed"), timeout=3)
    assert done["status"] == "completed_with_errors", done["meta"]
    assert done["last_sync_count"] == 2
    assert any("line 2" in error for error in done["meta"]["errors_sample"])
    listed = await api.call("GET", f"/api/projects/{API_PROJECT}/tasks", 200)
    assert [t["data"]["score"] for t in listed["tasks"]] == [1.5, 2]


async def test_credentials_another_instance_cannot_decrypt(world, registry_url, credentials):
    """An instance without the right key still lists, shows and deletes the storage; it reports
    the problem instead of hiding the storage, and never falls back to other credentials."""
    keyed = await world(registry_url)
    storage = await keyed.create(prefix="images", google_application_credentials=credentials["json"])
    storage_id = storage["id"]
    other_key = "a-different-encryption-key-0123456789abcdef"
    for instance, problem in (
        (await world(registry_url, keys=False), "encryption_keys is not set"),
        (await world(registry_url, encryption_keys=[other_key]), "cannot be decrypted"),
    ):
        shown = await instance.call("GET", f"{STORAGES}/{storage_id}", 200)
        assert shown["has_credentials"] is True and problem in shown["problem"], shown
        assert storage_id in [s["id"] for s in await instance.call("GET", STORAGES, 200)]
        assert instance.app[CATALOG].get(str(storage_id)).google_application_credentials is None
        answer = await instance.call("POST", f"{STORAGES}/{storage_id}/preview", 503)
        assert answer["error"] == "storage_unavailable"
        # "Test connection" must not quietly test other credentials (Application Default ones).
        answer = await instance.call("POST", f"{STORAGES}/validate", 400, {"id": storage_id})
        assert problem in answer["validation_errors"]["google_application_credentials"][0]
        assert_no_secret(json.dumps(shown), credentials)
    # Key rotation: the new key first, the old one still there; saving the credentials again
    # re-encrypts them with the new key, which then suffices.
    rotated = await world(registry_url, encryption_keys=[other_key, VAULT_KEY])
    assert (await rotated.call("GET", f"{STORAGES}/{storage_id}", 200))["problem"] is None
    await rotated.call(
        "PATCH", f"{STORAGES}/{storage_id}", 200, {"google_application_credentials": credentials["json"]}
    )
    new_only = await world(registry_url, encryption_keys=[other_key])
    assert (await new_only.call("GET", f"{STORAGES}/{storage_id}", 200))["problem"] is None
    assert new_only.app[CATALOG].get(str(storage_id)).google_application_credentials == credentials["json"]
    # The instance that cannot read them can still delete the storage.
    await instance.call("DELETE", f"{STORAGES}/{storage_id}", 204)
    await keyed.call("GET", f"{STORAGES}/{storage_id}", 404)


async def test_a_broken_storage_is_retried_without_an_edit(world, tmp_path, credentials, monkeypatch, caplog):
    """A storage that could not be built (here: Application Default Credentials missing for a
    presign storage) is tried again by later reloads, so a passing cause heals by itself; its
    problem is logged once, not at every reload."""
    monkeypatch.setattr("gateway.catalog.RETRY_BROKEN", 0.05)
    api = await world()
    storage = await api.create(prefix="images", presign=True)
    assert "no-adc.json" in storage["problem"]
    for _ in range(3):  # reloads before and after the retry time: the same problem, logged once
        assert (await api.call("GET", f"{STORAGES}/{storage['id']}", 200))["problem"] == storage["problem"]
        await asyncio.sleep(0.06)
    (tmp_path / "no-adc.json").write_text(credentials["json"])  # the cause goes away
    deadline = time.monotonic() + 5
    while (await api.call("GET", f"{STORAGES}/{storage['id']}", 200))["problem"] is not None:
        assert time.monotonic() < deadline, "the storage was never built again"
        await asyncio.sleep(0.02)
    assert str(storage["id"]) in api.app[CATALOG].signers
    warnings = [r for r in caplog.records if r.name == "gateway.catalog" and "cannot be used" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


async def test_a_running_sync_is_joined_and_blocks_deletion(world, registry_url):
    """A job a worker holds (claimed here by hand): in_progress, joined by POST …/sync, and the
    storage cannot be deleted until it ends."""
    api = await world(registry_url)
    storage = await api.create(prefix="images")
    storage_id = storage["id"]
    queued = await api.call("POST", f"{STORAGES}/{storage_id}/sync", 202)
    registry = api.app[REGISTRY]
    job = await registry.claim_job("elsewhere")
    assert job is not None and job["id"] == queued["last_sync_job"]
    running = await api.call("POST", f"{STORAGES}/{storage_id}/sync", 202)
    assert running["status"] == "in_progress" and running["last_sync_job"] == job["id"]
    assert running["meta"]["started_at"] is not None and running["meta"]["attempts"] == 1
    refused = await api.call("DELETE", f"{STORAGES}/{storage_id}", 409)
    assert refused["error"] == "sync_running"
    counters = {"listed": 9, "created": 7, "updated": 1, "removed": 2, "skipped": 0, "errors": 1}
    assert await registry.finish_job(job["id"], "elsewhere", "completed_with_errors", counters, ["k: line 3: bad"])
    done = await api.call("GET", f"{STORAGES}/{storage_id}", 200)
    assert done["status"] == "completed_with_errors" and done["last_sync_count"] == 7
    assert done["meta"]["errors_sample"] == ["k: line 3: bad"]
    assert {k: done["meta"][k] for k in counters} == counters
    await api.call("DELETE", f"{STORAGES}/{storage_id}", 204)


async def test_a_sync_that_cannot_list_fails_with_its_reason(world):
    api = await world(worker=True)
    storage = await api.create(bucket="no-such-bucket-for-sync")
    await api.call("POST", f"{STORAGES}/{storage['id']}/sync", 202)
    failed = await api.wait_status(storage["id"], ("failed", "completed"))
    assert failed["status"] == "failed"
    assert "bucket" in failed["meta"]["message"]
    assert failed["last_sync"] is not None and failed["last_sync_count"] == 0


async def test_ids_are_never_reused(world, registry_url):
    """A token minted for a task id must never reach another task's media: a task removed by a
    sync (or a storage deleted) leaves its id unused for ever, as Label Studio's are."""
    api = await world(registry_url, worker=True)
    world.emulator.upload(api.bucket, "reuse/x.jpg", b"first object", "image/jpeg")
    storage = await api.create(prefix="reuse")
    await api.call("POST", f"{STORAGES}/{storage['id']}/sync", 202)
    await api.wait_status(storage["id"])
    [old] = (await api.call("GET", f"/api/projects/{API_PROJECT}/tasks", 200))["tasks"]
    world.emulator.delete(api.bucket, "reuse/x.jpg")
    again = await api.call("POST", f"{STORAGES}/{storage['id']}/sync", 202)
    assert (await api.wait_status(storage["id"]))["meta"]["removed"] == 1, again
    [new] = (await api.call("POST", f"/api/projects/{API_PROJECT}/import", 201, [{"image": "gs://x/y.jpg"}]))[
        "task_ids"
    ]
    await api.call("DELETE", f"{STORAGES}/{storage['id']}", 204)
    second = await api.create()
    assert (new, second["id"]) != (old["id"], storage["id"])
    assert new != old["id"], "a removed task's id was given to a new task"
    assert second["id"] != storage["id"], "a deleted storage's id was given to a new storage"


async def test_a_task_a_sync_removed_elsewhere_stops_being_served_within_storage_refresh(world, registry_url):
    """Task grants are cached (task_cache_ttl, 60 s by default); a sync that removes a task in
    another process must not leave it served that long: every process drops its task cache when
    a sync has finished anywhere (seen within [registry] storage_refresh, 0.2 s here)."""
    syncer = await world(registry_url, worker=True)
    server = await world(registry_url)
    storage = await syncer.create(prefix="images")
    await syncer.call("POST", f"{STORAGES}/{storage['id']}/sync", 202)
    await syncer.wait_status(storage["id"])
    tasks = (await syncer.call("GET", f"/api/projects/{API_PROJECT}/tasks?storage={storage['id']}", 200))["tasks"]
    task = next(t for t in tasks if t["storage_filename"] == "images/a.jpg")
    url = f"/tasks/{task['id']}/resolve/?fileuri={fileuri(f'gs://{server.bucket}/images/a.jpg')}"
    token = {"Authorization": f"Bearer {make_token(tasks=[task['id']])}"}
    started = time.monotonic()
    while (await server.client.get(url, headers=token)).status != 200:  # `server` learns of the storage
        assert time.monotonic() - started < 5, "the storage never reached the other process"
        await asyncio.sleep(0.02)
    # The task's grant is now cached by `server`.

    # The object stays in the bucket; the storage's scope no longer holds it.
    await syncer.call("PATCH", f"{STORAGES}/{storage['id']}", 200, {"regex_filter": r".*\.png$"})
    job = (await syncer.call("POST", f"{STORAGES}/{storage['id']}/sync", 202))["last_sync_job"]
    done = await syncer.wait_status(storage["id"])
    assert done["last_sync_job"] == job and done["meta"]["removed"] >= 1
    started = time.monotonic()
    while (answer := await server.client.get(url, headers=token)).status != 404:
        assert answer.status == 200
        assert time.monotonic() - started < 5, "another process kept serving a task the sync removed"
        await asyncio.sleep(0.02)
    assert (await answer.json())["error"] == "unknown_task"


@pytest.mark.parametrize(
    "credentials",
    [
        {
            "type": "external_account",
            "token_url": "http://127.0.0.1:9/",
            "credential_source": {"file": "/proc/self/environ"},
        },
        {"type": "impersonated_service_account", "source_credentials": {"type": "external_account"}},
        {"type": "external_account_authorized_user", "token_url": "http://127.0.0.1:9/"},
    ],
    ids=["external-file", "impersonated-nested", "external-user"],
)
async def test_api_credentials_that_would_read_files_or_urls_are_refused(world, credentials):
    """external_account configs make google-auth read a file or URL and post it to token_url on
    refresh: given through the API, they could send the gateway's own environment away."""
    api = await world()
    answer = await api.create(400, google_application_credentials=json.dumps(credentials))
    assert answer["error"] == "validation_error"
    assert "service_account and authorized_user" in answer["validation_errors"]["google_application_credentials"][0]
    assert "/proc/self/environ" not in json.dumps(answer)
    assert (await api.call("GET", STORAGES, 200)) == [
        s for s in await api.call("GET", STORAGES, 200) if s["source"] == "config"
    ]


async def test_client_allowlist_of_an_api_storage(world, registry_url):
    """Issue 7's per-storage allowlist for storages created through the API (the test client is
    127.0.0.1): checked once the storage is known, changed by PATCH, every entry validated."""
    api = await world(registry_url, storage_refresh=0.05)
    created = await api.create(prefix="images", client_allowlist=["10.0.0.0/8", "2001:db8::/32"])
    assert created["client_allowlist"] == ["10.0.0.0/8", "2001:db8::/32"]
    uri = f"gs://{api.bucket}/images/a.jpg"
    [task] = (await api.call("POST", f"/api/projects/{API_PROJECT}/import", 201, [{"image": uri}]))["task_ids"]
    url = f"/tasks/{task}/resolve/?fileuri={fileuri(uri)}"
    media = {"Authorization": f"Bearer {make_token(tasks=[task])}"}
    refused = await api.client.get(url, headers=media)
    assert refused.status == 403 and (await refused.json())["error"] == "ip_not_allowed_for_storage"

    changed = await api.call("PATCH", f"{STORAGES}/{created['id']}", 200, {"client_allowlist": [" 127.0.0.0/8"]})
    assert changed["client_allowlist"] == ["127.0.0.0/8"]
    served = await api.client.get(url, headers=media)
    assert served.status == 200 and await served.read() == b"A" * 1000

    for bad, words in (
        (["10.0.0.1/8"], "host bits set"),
        (["not-a-network"], "not an IP network"),
        ("10.0.0.0/8", "expected a list"),
        ([8], "expected a list"),
    ):
        answer = await api.call("PATCH", f"{STORAGES}/{created['id']}", 400, {"client_allowlist": bad})
        assert words in answer["validation_errors"]["client_allowlist"][0]
    cleared = await api.call("PATCH", f"{STORAGES}/{created['id']}", 200, {"client_allowlist": []})
    assert cleared["client_allowlist"] == []
