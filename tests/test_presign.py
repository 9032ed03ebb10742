"""Signed-URL mode through the app: 303 to a cached V4 URL that downloads from fake-gcs-server."""

from __future__ import annotations

import base64
import json
import uuid
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway import metrics
from gateway.app import create_app
from gateway.signer import IamSigner, SignedUrlCache
from gateway.state import CATALOG, REGISTRY

from .conftest import PROJECT, StoredObject, build_settings, make_token, seed
from .test_signer import verifies

CLIP = StoredObject("video/clip one.bin", bytes(range(256)) * 400, "application/octet-stream")
OTHER = StoredObject("video/other.bin", b"other object" * 10, "application/octet-stream")
PLAIN = StoredObject("plain/a.bin", b"proxied, not presigned", "application/octet-stream")


def service_account_json(key: rsa.RSAPrivateKey) -> str:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return json.dumps(
        {
            "type": "service_account",
            "project_id": "p",
            "private_key_id": "k1",
            "private_key": pem,
            "client_email": "signer@p.iam.gserviceaccount.com",
            "client_id": "1",
            "token_uri": "https://oauth2.googleapis.com/token",
        }
    )


@pytest.fixture
async def presign(tmp_path, emulator, aiohttp_client, monkeypatch):
    """A gateway with a presign storage (15 min) and a proxy storage in one project."""

    async def build(**media):
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.host)
        bucket, plain_bucket = f"signed-{uuid.uuid4().hex[:10]}", f"plain-{uuid.uuid4().hex[:10]}"
        signed = seed("gcs", bucket, [CLIP, OTHER], tmp_path, emulator)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        signed.update(
            id="signed", presign=True, presign_ttl=15, google_application_credentials=service_account_json(key)
        )
        plain = seed("gcs", plain_bucket, [PLAIN], tmp_path, emulator)
        plain.update(id="plain")
        app = create_app(build_settings([signed, plain], tmp_path, media=media))
        ids = await app[REGISTRY].add_tasks(
            PROJECT,
            [
                {"data": {"video": f"gs://{bucket}/{CLIP.key}", "plain": f"gs://{plain_bucket}/{PLAIN.key}"}},
                {"data": {"video": f"gs://{bucket}/{OTHER.key}"}},
            ],
        )
        client = await aiohttp_client(app)
        client.ids, client.bucket, client.plain_bucket, client.emulator = ids, bucket, plain_bucket, emulator
        client.public_key = key.public_key()
        return client

    return build


def media_url(client, bucket: str, key: str, task: int | None = None, **params: str) -> str:
    fileuri = base64.urlsafe_b64encode(f"gs://{bucket}/{key}".encode()).decode().rstrip("=")
    query = "".join(f"&{k}={v}" for k, v in params.items())
    return f"/tasks/{client.ids[0] if task is None else task}/resolve/?fileuri={fileuri}{query}"


async def test_redirect_to_a_signed_url_that_downloads_the_object(presign):
    client = await presign()
    token = make_token(tasks=[client.ids[0]])
    url = media_url(client, client.bucket, CLIP.key) + f"&token={token}"
    response = await client.get(url, allow_redirects=False)
    assert response.status == 303
    location = response.headers["Location"]
    assert location.startswith(f"http://{client.emulator.host}/{client.bucket}/video/clip%20one.bin?")
    assert token not in location and "token=" not in location
    query = parse_qs(urlsplit(location).query)
    assert query["X-Goog-Algorithm"] == ["GOOG4-RSA-SHA256"]
    assert query["X-Goog-Expires"] == ["900"]
    assert query["X-Goog-Credential"][0].startswith("signer@p.iam.gserviceaccount.com/")
    # fake-gcs-server does not check signatures: verify it here, against the storage's public key.
    assert verifies(location, client.public_key)
    max_age = int(response.headers["Cache-Control"].removeprefix("private, max-age="))
    assert 900 - SignedUrlCache.margin(900) - 5 <= max_age <= 900 - SignedUrlCache.margin(900)
    head = await client.head(url, allow_redirects=False)
    assert head.status == 303 and head.headers["Location"] == location
    async with aiohttp.ClientSession() as browser, browser.get(location) as followed:
        assert followed.status == 200 and await followed.read() == CLIP.data


async def test_one_signature_serves_many_requests_and_download_gets_its_own(presign):
    client = await presign()
    headers = {"Authorization": f"Bearer {make_token(tasks=[client.ids[0]])}"}
    issued = metrics.SIGNED_URLS.labels("local")
    before = issued._value.get()
    locations = set()
    for _ in range(10):
        response = await client.get(media_url(client, client.bucket, CLIP.key), headers=headers, allow_redirects=False)
        locations.add(response.headers["Location"])
    assert len(locations) == 1 and issued._value.get() - before == 1
    download = await client.get(
        media_url(client, client.bucket, CLIP.key, download="1"), headers=headers, allow_redirects=False
    )
    assert "response-content-disposition=attachment" in download.headers["Location"]
    assert issued._value.get() - before == 2


async def test_an_overwritten_object_gets_a_new_url(presign):
    client = await presign(metadata_ttl=0.0)
    headers = {"Authorization": f"Bearer {make_token(tasks=[client.ids[0]])}"}
    issued = metrics.SIGNED_URLS.labels("local")
    before = issued._value.get()
    url = media_url(client, client.bucket, CLIP.key)
    for _ in range(3):
        assert (await client.get(url, headers=headers, allow_redirects=False)).status == 303
    assert issued._value.get() - before == 1
    client.emulator.upload(client.bucket, CLIP.key, b"new bytes", CLIP.content_type)
    renewed = await client.get(url, headers=headers, allow_redirects=False)
    assert issued._value.get() - before == 2  # a new generation is signed anew, never served an old entry
    async with aiohttp.ClientSession() as browser, browser.get(renewed.headers["Location"]) as followed:
        assert await followed.read() == b"new bytes"


async def test_grants_apply_and_proxy_storages_coexist(presign):
    client = await presign()
    task_a, task_b = client.ids
    token_a = {"Authorization": f"Bearer {make_token(tasks=[task_a])}"}
    refused = await client.get(
        media_url(client, client.bucket, OTHER.key, task=task_b), headers=token_a, allow_redirects=False
    )
    assert refused.status == 403 and "Location" not in refused.headers
    missing = await client.get(media_url(client, client.bucket, "video/nope.bin"), headers=token_a)
    assert missing.status == 403  # not referenced: no URL is signed for it
    proxied = await client.get(media_url(client, client.plain_bucket, PLAIN.key), headers=token_a)
    assert proxied.status == 200 and await proxied.read() == PLAIN.data


async def test_signing_failures_are_503_with_a_reason(presign, aiohttp_server):
    async def sign_blob(_request: web.Request) -> web.Response:
        return web.json_response({"error": {"code": 403, "message": "denied"}}, status=403)

    iam = web.Application()
    iam.router.add_post("/v1/projects/-/serviceAccounts/{email}:signBlob", sign_blob)
    server = await aiohttp_server(iam)

    class Tokens:
        async def apply(self, headers: dict[str, str]) -> None:
            headers["Authorization"] = "Bearer test"

    client = await presign()
    async with aiohttp.ClientSession() as session:
        signer = IamSigner(session, Tokens(), "ci@p.iam", str(server.make_url("")))
        client.server.app[CATALOG].signers["signed"] = signer
        headers = {"Authorization": f"Bearer {make_token(tasks=[client.ids[0]])}"}
        response = await client.get(media_url(client, client.bucket, CLIP.key), headers=headers, allow_redirects=False)
    assert response.status == 503
    body = await response.json()
    assert body["error"] == "signing_permission_denied" and "Token Creator" in body["message"]


async def test_keyless_credentials_sign_through_iam_as_their_service_account():
    from gateway.signer import CLOUD_PLATFORM_SCOPE, SigningError, build_signer, resolve_identity

    class ComputeLike:
        """google-auth-shaped GCE credentials (pure double): the account is named after a refresh."""

        def __init__(self, email_after_refresh: str) -> None:
            self.service_account_email, self._after = "default", email_after_refresh
            self.token, self.scopes = None, None

        def with_scopes(self, scopes):
            scoped = ComputeLike(self._after)
            scoped.scopes = scopes
            return scoped

        @property
        def valid(self) -> bool:
            return self.token is not None

        def refresh(self, _request) -> None:
            self.token, self.service_account_email = "t", self._after

        def apply(self, headers) -> None:
            headers["authorization"] = f"Bearer {self.token}"

    async with aiohttp.ClientSession() as session:
        signer, token_source = build_signer(ComputeLike("vm@p.iam"), session, "http://127.0.0.1:9")
        assert isinstance(signer, IamSigner) and signer.email == "default"
        scoped, _tokens = token_source
        assert scoped.scopes == [CLOUD_PLATFORM_SCOPE]  # the storage's read-only token would be refused
        await resolve_identity(signer, *token_source)
        assert signer.email == "vm@p.iam"
        nameless, nameless_source = build_signer(ComputeLike("default"), session, "http://127.0.0.1:9")
        with pytest.raises(SigningError):
            await resolve_identity(nameless, *nameless_source)
