"""Google credentials: every accepted form loads, tokens refresh off the loop, errors leak nothing."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth import external_account
from google.oauth2 import service_account

from gateway.config import ConfigError
from gateway.storage import client_session, load_storage_credentials
from gateway.storage.credentials import AccessTokens, CredentialsError, load_credentials
from gateway.storage.gcs import GcsBackend

from .conftest import build_settings


def service_account_info() -> dict:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return {
        "type": "service_account",
        "project_id": "p",
        "private_key_id": "k1",
        "private_key": pem,
        "client_email": "gateway@p.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    }


def test_service_account_from_path_and_inline_json(tmp_path):
    info = service_account_info()
    path = tmp_path / "sa.json"
    path.write_text(json.dumps(info))
    from_path = load_credentials(str(path))
    inline = load_credentials(json.dumps(info), project_id="billing-project")
    assert isinstance(from_path, service_account.Credentials)
    assert from_path.service_account_email == info["client_email"]
    assert isinstance(inline, service_account.Credentials)
    assert inline.quota_project_id == "billing-project"


def test_external_account_file(tmp_path):
    (tmp_path / "subject-token").write_text("header.payload.signature")
    path = tmp_path / "wif.json"
    path.write_text(
        json.dumps(
            {
                "type": "external_account",
                "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/x",
                "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                "token_url": "https://sts.googleapis.com/v1/token",
                "credential_source": {"file": str(tmp_path / "subject-token")},
            }
        )
    )
    assert isinstance(load_credentials(str(path)), external_account.Credentials)


def test_errors_name_the_storage_and_never_echo_the_key(tmp_path):
    secret_material = service_account_info()
    broken = json.dumps({**secret_material, "type": "mystery"})
    settings = build_settings(
        [
            {
                "id": "s1",
                "project": "1",
                "type": "gcs",
                "bucket": "bucket-one",
                "google_application_credentials": broken,
            }
        ],
        tmp_path,
    )
    with pytest.raises(ConfigError) as caught:
        load_storage_credentials(settings, env={})
    message = str(caught.value)
    assert "id='s1'" in message and "google_application_credentials" in message
    assert "PRIVATE KEY" not in message and secret_material["private_key_id"] not in message
    assert "PRIVATE KEY" not in repr(settings)
    with pytest.raises(CredentialsError, match="not valid JSON"):
        load_credentials("{not json")
    with pytest.raises(CredentialsError):
        load_credentials(str(tmp_path / "missing.json"))
    assert load_storage_credentials(settings, env={"STORAGE_EMULATOR_HOST": "127.0.0.1:1"}) == {}


class CountingCredentials:
    """A google-auth-shaped credential (pure logic double): counts refreshes and their threads."""

    def __init__(self) -> None:
        self.token: str | None = None
        self.expiry = 0.0
        self.refreshes: list[str] = []

    @property
    def valid(self) -> bool:
        return self.token is not None and time.time() < self.expiry

    def refresh(self, _request) -> None:
        self.refreshes.append(threading.current_thread().name)
        self.token = f"token-{len(self.refreshes)}"
        self.expiry = time.time() + 3600

    def apply(self, headers: dict) -> None:
        headers["authorization"] = f"Bearer {self.token}"
        headers["x-goog-user-project"] = "billing-project"


async def test_tokens_refresh_once_off_the_event_loop():
    credentials = CountingCredentials()
    tokens = AccessTokens(credentials)
    headers = [{} for _ in range(20)]
    await asyncio.gather(*(tokens.apply(h) for h in headers))
    assert len(credentials.refreshes) == 1
    assert credentials.refreshes[0] != threading.current_thread().name
    assert {h["authorization"] for h in headers} == {"Bearer token-1"}
    credentials.expiry = 0  # expired: the next request refreshes again
    await tokens.apply({})
    assert len(credentials.refreshes) == 2


async def test_gcs_requests_carry_the_access_token(tmp_path, aiohttp_server):
    seen: list[dict] = []

    async def metadata(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response(
            {"size": "3", "generation": "42", "updated": "2026-01-02T03:04:05.678Z", "contentType": "text/plain"}
        )

    upstream = web.Application()
    upstream.router.add_get("/storage/v1/b/{bucket}/o/{key}", metadata)
    server = await aiohttp_server(upstream)
    settings = build_settings([], tmp_path)
    session = client_session(settings)
    try:
        backend = GcsBackend(
            session, str(server.make_url("")).rstrip("/"), "b", AccessTokens(CountingCredentials()), settings.upstream
        )
        meta = await backend.stat("a b.txt")
    finally:
        await session.close()
    assert (meta.size, meta.etag, meta.content_type) == (3, '"42"', "text/plain")
    assert seen[0]["Authorization"] == "Bearer token-1"
    assert seen[0]["x-goog-user-project"] == "billing-project"


@pytest.mark.parametrize("shape", ["base64", "json list"])
def test_key_material_given_the_wrong_way_is_never_echoed(shape):
    info = json.dumps(service_account_info())
    value = base64.b64encode(info.encode()).decode() if shape == "base64" else f" [{info}]"
    with pytest.raises(CredentialsError) as caught:
        load_credentials(value)
    assert value.strip()[:40] not in str(caught.value) and "PRIVATE" not in str(caught.value)
    assert f"({len(value)} characters)" in str(caught.value)
