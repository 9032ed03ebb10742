"""Signing problems show before an annotator meets them: /readyz, `gateway check-config` and Test
connection sign a probe with each presign storage's identity and say in words why they cannot."""

from __future__ import annotations

import json
import uuid

import aiohttp
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.app import create_app
from gateway.cli import main
from gateway.signer import IamSigner
from gateway.state import CATALOG, READINESS

from .conftest import build_settings, make_token, seed
from .test_presign import service_account_json
from .test_signer import EMAIL, SignBlobStandIn, Tokens

USER_CREDENTIALS = json.dumps(
    {"type": "authorized_user", "client_id": "c.apps.googleusercontent.com", "client_secret": "s", "refresh_token": "r"}
)


def signing_storage(tmp_path, emulator, credentials: str) -> dict:  # type: ignore[type-arg]
    bucket = f"signing-{uuid.uuid4().hex[:10]}"
    storage = seed("gcs", bucket, [], tmp_path, emulator)
    return storage | {"id": "signed", "presign": True, "google_application_credentials": credentials}


async def test_readyz_signs_with_each_presign_storage_and_names_what_fails(
    tmp_path, emulator, monkeypatch, aiohttp_client, aiohttp_server
):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.host)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    app = create_app(build_settings([signing_storage(tmp_path, emulator, service_account_json(key))], tmp_path))
    client = await aiohttp_client(app)
    ready = await client.get("/readyz")
    assert ready.status == 200 and (await ready.json())["checks"]["signing:signed"] == "ok"

    # The same storage when its identity signs through signBlob, which refuses (no Token Creator role).
    refusing = SignBlobStandIn(key, status=403, body='{"error": {"code": 403}}')
    iam = aiohttp.web.Application()
    iam.router.add_post("/v1/projects/-/serviceAccounts/{target}", refusing.handle)
    endpoint = str((await aiohttp_server(iam, host="127.0.0.1")).make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as session:
        app[CATALOG].signers["signed"] = IamSigner(session, Tokens(), EMAIL, endpoint=endpoint)
        app[READINESS].clear()  # no kept answers: ask again now
        ready = await client.get("/readyz")
    body = await ready.json()
    assert ready.status == 503 and body["checks"]["signing:signed"] == "error: signing_permission_denied"
    assert len(refusing.seen) == 1


async def test_test_connection_refuses_credentials_that_cannot_sign_in_words(
    tmp_path, emulator, monkeypatch, aiohttp_client
):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.host)
    app = create_app(build_settings([], tmp_path, registry={"encryption_keys": ["a" * 43 + "="]}))
    client = await aiohttp_client(app)
    bucket = f"signing-{uuid.uuid4().hex[:10]}"
    emulator.create_bucket(bucket)
    fields = {"project": 1, "bucket": bucket, "presign": True, "google_application_credentials": USER_CREDENTIALS}
    response = await client.post(
        "/api/storages/gcs/validate", json=fields, headers={"Authorization": f"Bearer {make_token(admin=True)}"}
    )
    body = await response.json()
    assert response.status == 400, body
    (problem,) = body["validation_errors"]["presign"]
    assert "belongs to a person, not a service account" in problem
    assert "TransportError" not in json.dumps(body)


def test_check_config_signs_with_each_presign_storage(tmp_path, emulator, monkeypatch, capsys):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.host)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    secret = "test-secret-that-is-long-enough-for-hs256-0123456789"
    for credentials, code in ((service_account_json(key), 0), (USER_CREDENTIALS, 2)):
        key_file = tmp_path / "key.json"
        key_file.write_text(credentials)
        config = tmp_path / "gateway.toml"
        config.write_text(
            f'[auth]\nsecret = "{secret}"\n[registry]\nurl = "sqlite:///{tmp_path / "r.db"}"\n'
            f'[[storages]]\nid = "signed"\nproject = 1\ntype = "gcs"\nbucket = "some-bucket"\npresign = true\n'
            f'google_application_credentials = "{key_file}"\n'
        )
        assert main(["check-config", "--config", str(config)]) == code
        err = capsys.readouterr().err
        if code:
            assert err.startswith(
                "gateway: config: [[storages]] id='signed'.presign: cannot sign URLs: an authorized-user"
            )
            assert err.count("\n") == 1
