"""Credentials given to the API send the gateway nowhere but to Google (issue 16 case 2).

A service-account key names the URL google-auth posts a signed assertion to on every refresh
(`token_uri`). Through the API, a key naming an internal address would turn "Test connection"
into a blind request forger; every URL of such a key must be Google's or listed by the operator.
A listener on 127.0.0.1 stands for the internal address: not one byte may reach it.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.api.storages import _DEFAULTS
from gateway.app import create_app
from gateway.state import CATALOG, REGISTRY
from gateway.storage.credentials import CredentialsError, check_destinations

from .conftest import build_settings, make_token
from .test_presign import service_account_json

ADMIN = {"Authorization": f"Bearer {make_token('root', admin=True)}"}
VAULT_KEY = "an-encryption-key-for-tests-0123456789abcdef"
SECRET = "google_application_credentials"
GOOGLE_TOKEN = "https://oauth2.googleapis.com/token"


@pytest.mark.parametrize(
    ("fields", "refused"),
    [
        ({"token_uri": GOOGLE_TOKEN}, None),
        ({"token_uri": "https://accounts.google.com/o/oauth2/token"}, None),
        (
            {
                "auth_uri": "https://accounts.google.com/o/oauth2/auth",
                "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
                "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/a%40p.iam.gserviceaccount.com",
                "universe_domain": "googleapis.com",
            },
            None,
        ),
        ({"token_uri": "http://127.0.0.1:9/token"}, "token_uri"),
        ({"token_uri": "http://oauth2.googleapis.com/token"}, "token_uri"),  # not https
        ({"token_uri": "https://oauth2.googleapis.com@127.0.0.1/token"}, "token_uri"),
        ({"token_uri": "https://oauth2.googleapis.com:8443/token"}, "token_uri"),
        ({"token_uri": "https://oauth2.googleapis.com.evil.example/token"}, "token_uri"),
        ({"token_uri": "metadata.internal/token"}, "token_uri"),  # no scheme, still a destination
        ({"auth_uri": "https://evil.example/auth"}, "auth_uri"),
        ({"client_x509_cert_url": "http://169.254.169.254/"}, "client_x509_cert_url"),
        ({"universe_domain": "evil.example"}, "universe_domain"),
        ({"source_credentials": {"token_uri": "http://10.0.0.1/"}}, "source_credentials.token_uri"),
        ({"service_account_impersonation_url": "https://evil.example/x"}, "service_account_impersonation_url"),
        ({"delegates": ["ok", "gopher://127.0.0.1:25/"]}, "delegates[1]"),
    ],
)
def test_every_url_of_api_credentials_is_googles(fields, refused):
    text = json.dumps({"type": "service_account", **fields})
    if refused is None:
        check_destinations(text, ())
        return
    with pytest.raises(CredentialsError) as caught:
        check_destinations(text, ())
    message = str(caught.value)
    assert message.startswith(f"{refused}: ")
    assert all(value not in message for value in fields.values() if isinstance(value, str))


def test_the_operator_may_list_endpoints_exactly():
    text = json.dumps({"type": "service_account", "token_uri": "http://127.0.0.1:9/token"})
    check_destinations(text, ("http://127.0.0.1:9/token",))
    for other in ("http://127.0.0.1:9/", "http://127.0.0.1:9/token/x", "http://127.0.0.1:10/token"):
        with pytest.raises(CredentialsError):
            check_destinations(text, (other,))


@dataclass
class Listener:
    """A TCP listener that records every byte and answers a refused token request."""

    url: str = ""
    received: bytearray = field(default_factory=bytearray)
    server: Any = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.received += head
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
            0,
        )
        self.received += await reader.readexactly(length)
        body = b'{"error": "invalid_grant", "error_description": "refused by the test listener"}'
        writer.write(
            b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    spy = Listener()
    spy.server = await asyncio.start_server(spy.handle, "127.0.0.1", 0)
    port = spy.server.sockets[0].getsockname()[1]
    spy.url = f"http://127.0.0.1:{port}/internal-admin/token"
    yield spy
    spy.server.close()
    await spy.server.wait_closed()


@pytest.fixture
def gateway(tmp_path, aiohttp_client, monkeypatch):
    """A gateway that would talk to the real GCS endpoint (no emulator): with a token from the
    listener it would go on to storage.googleapis.com, so the listener only ever refuses."""
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-adc.json"))

    async def build(allowed: tuple[str, ...] = ()) -> Any:
        settings = build_settings(
            [],
            tmp_path,
            registry={"url": f"sqlite:///{tmp_path / 'registry.db'}", "encryption_keys": [VAULT_KEY]},
            upstream={"allowed_credential_endpoints": list(allowed), "retries": 0},
        )
        return await aiohttp_client(create_app(settings))

    return build


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def key_with_token_uri(key: rsa.RSAPrivateKey, token_uri: str) -> str:
    return json.dumps({**json.loads(service_account_json(key)), "token_uri": token_uri})


async def call(client: Any, method: str, path: str, status: int, body: Any = None) -> Any:
    response = await client.request(method, path, headers=ADMIN, data=None if body is None else json.dumps(body))
    text = await response.text()
    assert response.status == status, f"{method} {path}: {response.status} {text}"
    return json.loads(text) if text else None


async def test_no_byte_reaches_an_address_a_key_names(gateway, listener, key):
    client = await gateway()
    evil = key_with_token_uri(key, listener.url)
    bucket = f"b-{uuid.uuid4().hex[:8]}"
    source = {"project": "8", "bucket": bucket, SECRET: evil}
    target = {"project": "8", "bucket": bucket, SECRET: evil}
    existing = await call(client, "POST", "/api/storages/gcs", 201, {"project": "8", "bucket": bucket})
    for method, path, body in (
        ("POST", "/api/storages/gcs/validate", source),
        ("POST", "/api/storages/gcs/validate", {**source, "presign": True}),
        ("POST", "/api/storages/gcs/preview", source),
        ("POST", "/api/storages/gcs", source),
        ("PATCH", f"/api/storages/gcs/{existing['id']}", {SECRET: evil}),
        ("POST", "/api/storages/gcs/validate", {"id": existing["id"], SECRET: evil}),
        ("POST", "/api/storages/export/gcs/validate", target),
        ("POST", "/api/storages/export/gcs", target),
    ):
        answer = await call(client, method, path, 400, body)
        [message] = answer["validation_errors"][SECRET]
        assert "token_uri" in message and "allowed_credential_endpoints" in message, (path, answer)
        assert listener.url not in json.dumps(answer) and "127.0.0.1" not in json.dumps(answer)
    assert bytes(listener.received) == b""
    assert (await call(client, "GET", f"/api/storages/gcs/{existing['id']}", 200))["has_credentials"] is False


async def test_a_stored_key_naming_another_address_is_never_used(gateway, listener, key):
    """A row written before the rule (or straight into the registry) is held to it as well: the
    storage is listed with its problem and never built, tested or synced with that key."""
    client = await gateway()
    app = client.server.app
    catalog = app[CATALOG]
    sealed = catalog.vault.seal(key_with_token_uri(key, listener.url))
    row = await app[REGISTRY].create_storage({**_DEFAULTS, "project": "8", "bucket": "stored", "credentials": sealed})
    await catalog.refresh()
    shown = await call(client, "GET", f"/api/storages/gcs/{row['id']}", 200)
    assert shown["has_credentials"] is True and shown["problem"].startswith("token_uri: ")
    answer = await call(client, "POST", "/api/storages/gcs/validate", 400, {"id": row["id"]})
    assert "token_uri" in answer["validation_errors"][SECRET][0]
    assert bytes(listener.received) == b""


async def test_an_endpoint_the_operator_lists_is_used(gateway, listener, key):
    """The control: listed, the same key does make the gateway post its assertion there — which
    is what the tests above would see if the rule were missing."""
    client = await gateway(allowed=(listener.url,))
    body = {"project": "8", "bucket": f"b-{uuid.uuid4().hex[:8]}", SECRET: key_with_token_uri(key, listener.url)}
    answer = await call(client, "POST", "/api/storages/gcs/validate", 400, body)
    assert answer["error"] == "bad_credentials"
    assert bytes(listener.received).startswith(b"POST /internal-admin/token ")
    assert b"assertion=" in listener.received
