"""The access check on every media request: token sources, verification, task-level grants."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.app import create_app
from gateway.state import REGISTRY
from gateway.uris import encode_fileuri

from .conftest import PROJECT, SECRET, build_settings, make_token, sample_objects, seed

BUCKET = "access-bucket"
CLIP = f"gs://{BUCKET}/video/clip.bin"
OTHER = f"gs://{BUCKET}/other/secret.bin"


def pem_pair(private_key) -> tuple[bytes, bytes]:
    private = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


@pytest.fixture(params=["aiohttp", "front"])
def gateway(request, tmp_path, aiohttp_client, fastlane):
    """Factory: a local-backend gateway with tasks A (clip), B (other) and C (a foreign bucket),
    served by aiohttp alone, and by `gateway serve`'s front (each answer's lane checked)."""

    async def build(auth=None, storages=None, **sections):
        storage = seed("local", BUCKET, sample_objects(), tmp_path, None)
        storage["prefix"] = ""
        settings = build_settings(storages or [storage], tmp_path, auth=auth or {}, **sections)
        app = create_app(settings)
        ids = await app[REGISTRY].add_tasks(
            PROJECT,
            [
                {"data": {"video": CLIP, "text": "literal gs://access-bucket/video%2Fclip.bin"}},
                {"data": {"image": OTHER}},
                {"data": {"image": "gs://unconfigured-bucket/video/clip.bin"}},
            ],
        )
        client = await (fastlane(app) if request.param == "front" else aiohttp_client(app))
        client.ids = ids
        return client

    return build


def url(task: int, uri: str = CLIP) -> str:
    return f"/tasks/{task}/resolve/?fileuri={encode_fileuri(uri)}"


def b64url(value: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def forged_claims() -> dict:
    return {"sub": "mallory", "exp": int(time.time()) + 60, "tasks": "*"}


def forge_header(header: dict) -> str:
    return f"{b64url(header)}.{b64url(forged_claims())}.c2ln"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def expect(response, status: int, reason: str | None = None) -> dict:
    assert response.status == status, await response.text()
    if reason is None:
        return {}
    body = await response.json()
    assert body["error"] == reason, body
    assert body["message"]
    return body


async def test_granted_task_streams(gateway):
    client = await gateway()
    response = await client.get(url(client.ids[0]), headers=bearer(make_token(tasks=[client.ids[0]])))
    assert response.status == 200
    assert len(await response.read()) == 300_000


TOKEN_FAILURES = [
    # (description, token factory, reason)
    ("expired", lambda: make_token(tasks=[1], ttl=-3600), "expired_token"),
    ("not yet valid", lambda: make_token(tasks=[1], nbf=int(time.time()) + 3600), "token_not_yet_valid"),
    ("wrong key", lambda: make_token(tasks=[1], key="another-secret-that-is-also-long-enough-000"), "invalid_token"),
    ("garbage", lambda: "not.a.jwt", "invalid_token"),
    ("no sub", lambda: jwt.encode({"exp": int(time.time()) + 60, "tasks": [1]}, SECRET, "HS256"), "invalid_token"),
    ("no exp", lambda: jwt.encode({"sub": "a", "tasks": [1]}, SECRET, "HS256"), "invalid_token"),
    (
        "alg none",
        lambda: jwt.encode({"sub": "a", "exp": int(time.time()) + 60, "tasks": [1]}, None, "none"),
        "invalid_token",
    ),
    ("alg not allowed", lambda: make_token(tasks=[1], algorithm="HS512"), "invalid_token"),
    ("bad tasks claim", lambda: make_token(tasks=["one"]), "invalid_token"),
    # A scalar must never be read as a list of its characters ("19" is not tasks 1 and 9).
    ("scalar tasks claim", lambda: make_token(tasks="19"), "invalid_token"),
    ("scalar projects claim", lambda: make_token(projects="12"), "invalid_token"),
    ("boolean task id", lambda: make_token(tasks=[True]), "invalid_token"),
    ("float task id", lambda: make_token(tasks=[1.9]), "invalid_token"),
    ("alg is a list", lambda: forge_header({"alg": ["HS256"], "typ": "JWT"}), "invalid_token"),
    # Issue 16 case 5: lifetimes are bounded by [auth].max_token_lifetime (24 h by default).
    ("exp 1e300", lambda: make_token(tasks=[1], exp=1e300), "token_lifetime_exceeded"),
    ("exp a year ahead", lambda: make_token(tasks=[1], ttl=365 * 86400), "token_lifetime_exceeded"),
    ("exp 25 h ahead", lambda: make_token(tasks=[1], ttl=25 * 3600), "token_lifetime_exceeded"),
    ("exp an integer beyond floats", lambda: make_token(tasks=[1], exp=10**400), "invalid_token"),
]


@pytest.mark.parametrize(("factory", "reason"), [c[1:] for c in TOKEN_FAILURES], ids=[c[0] for c in TOKEN_FAILURES])
async def test_bad_tokens_are_401_with_a_challenge(gateway, factory, reason):
    client = await gateway()
    response = await client.get(url(client.ids[0]), headers=bearer(factory()))
    await expect(response, 401, reason)
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ") and 'error="invalid_token"' in challenge
    assert challenge.count('"') == 6  # realm, error, error_description: nothing injected


async def test_token_lifetime_limit_is_the_operators(gateway):
    """A lifetime at the limit passes (leeway included); the limit follows [auth].max_token_lifetime."""
    client = await gateway()
    task = client.ids[0]
    assert (await client.get(url(task), headers=bearer(make_token(tasks=[task], ttl=24 * 3600 + 20)))).status == 200
    strict = await gateway(auth={"max_token_lifetime": 300})
    task = strict.ids[0]
    assert (await strict.get(url(task), headers=bearer(make_token(tasks=[task], ttl=300)))).status == 200
    refused = await strict.get(url(task), headers=bearer(make_token(tasks=[task], ttl=600)))
    body = await expect(refused, 401, "token_lifetime_exceeded")
    assert "[auth].max_token_lifetime" in body["message"] and "300 seconds" in body["message"]


async def test_missing_token(gateway):
    client = await gateway()
    response = await client.get(url(client.ids[0]))
    await expect(response, 401, "missing_token")
    assert 'error="invalid_request"' in response.headers["WWW-Authenticate"]


async def test_hand_made_alg_none_token_is_refused(gateway):
    client = await gateway()
    token = f"{b64url({'alg': 'none', 'typ': 'JWT'})}.{b64url(forged_claims())}."
    await expect(await client.get(url(client.ids[0]), headers=bearer(token)), 401, "invalid_token")


async def test_audience_and_issuer(gateway):
    client = await gateway(auth={"audience": "media", "issuer": "https://ls.example"})
    task = client.ids[0]
    good = make_token(tasks=[task], aud="media", iss="https://ls.example")
    assert (await client.get(url(task), headers=bearer(good))).status == 200
    wrong_aud = make_token(tasks=[task], aud="other", iss="https://ls.example")
    await expect(await client.get(url(task), headers=bearer(wrong_aud)), 401, "invalid_audience")
    wrong_iss = make_token(tasks=[task], aud="media", iss="https://evil.example")
    await expect(await client.get(url(task), headers=bearer(wrong_iss)), 401, "invalid_issuer")
    no_aud = make_token(tasks=[task], iss="https://ls.example")
    await expect(await client.get(url(task), headers=bearer(no_aud)), 401, "invalid_token")


@pytest.mark.parametrize(
    ("algorithm", "key_factory"),
    [
        ("RS256", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("ES256", lambda: ec.generate_private_key(ec.SECP256R1())),
    ],
)
async def test_asymmetric_tokens_and_algorithm_confusion(gateway, tmp_path, monkeypatch, algorithm, key_factory):
    """HS/RS confusion: an HMAC token keyed with the (public) PEM must never verify. PyJWT itself
    refuses a PEM as an HMAC key, so the refusal alone would not show the gateway's rule: the keys
    the gateway hands to jwt.decode are recorded, and an HS* token may only ever meet the secret."""
    private, public = pem_pair(key_factory())
    (tmp_path / "public.pem").write_bytes(public)
    client = await gateway(auth={"algorithms": ["HS256", algorithm], "public_key_file": str(tmp_path / "public.pem")})
    used: list[tuple[str, object]] = []
    decode = jwt.decode

    def recording_decode(token, key, algorithms, **kwargs):
        used.append((algorithms[0], key))
        return decode(token, key, algorithms, **kwargs)

    monkeypatch.setattr(jwt, "decode", recording_decode)
    task = client.ids[0]
    good = make_token(tasks=[task], key=private, algorithm=algorithm)
    assert (await client.get(url(task), headers=bearer(good))).status == 200
    signing_input = f"{b64url({'alg': 'HS256', 'typ': 'JWT'})}.{b64url(forged_claims())}"
    signature = hmac.new(public, signing_input.encode(), hashlib.sha256).digest()
    forged = f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"
    await expect(await client.get(url(task), headers=bearer(forged)), 401, "invalid_token")
    assert (await client.get(url(task), headers=bearer(make_token(tasks=[task])))).status == 200
    assert used == [(algorithm, public), ("HS256", SECRET), ("HS256", SECRET)]


async def test_jwks_with_key_rotation(gateway, aiohttp_server):
    keys = {"kid-1": rsa.generate_private_key(public_exponent=65537, key_size=2048)}
    served: list[str] = []

    async def jwks(_request):
        served.append("jwks")
        return web.json_response(
            {
                "keys": [
                    {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(k.public_key())), "kid": kid, "alg": "RS256"}
                    for kid, k in keys.items()
                ]
            }
        )

    jwks_app = web.Application()
    jwks_app.router.add_get("/jwks.json", jwks)
    server = await aiohttp_server(jwks_app)
    client = await gateway(
        auth={"algorithms": ["RS256"], "jwks_url": str(server.make_url("/jwks.json")), "jwks_cooldown": 0}
    )
    task = client.ids[0]

    def signed(kid: str) -> str:
        private, _ = pem_pair(keys[kid])
        return make_token(tasks=[task], key=private, algorithm="RS256", headers={"kid": kid})

    assert (await client.get(url(task), headers=bearer(signed("kid-1")))).status == 200
    assert len(served) == 1
    assert (await client.get(url(task), headers=bearer(signed("kid-1")))).status == 200  # cached: no fetch
    assert len(served) == 1
    keys["kid-2"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # rotation
    assert (await client.get(url(task), headers=bearer(signed("kid-2")))).status == 200
    assert len(served) == 2  # the unknown kid made the gateway fetch the key set again
    # A kid the issuer does not publish: fetched again once (it might be new), then refused.
    private, _ = pem_pair(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    unknown = make_token(tasks=[task], key=private, algorithm="RS256", headers={"kid": "kid-unknown"})
    body = await expect(await client.get(url(task), headers=bearer(unknown)), 401, "invalid_token")
    assert "kid" in body["message"]
    assert len(served) == 3
    # A known kid with a signature by another key: no fetch, and no pass.
    forged = make_token(tasks=[task], key=private, algorithm="RS256", headers={"kid": "kid-1"})
    await expect(await client.get(url(task), headers=bearer(forged)), 401, "invalid_token")
    assert len(served) == 3


async def test_task_level_grants(gateway):
    client = await gateway()
    a, b, c = client.ids
    token_a = bearer(make_token(tasks=[a]))
    # A token for task A used on task B's object (via task B and via task A).
    await expect(await client.get(url(b, OTHER), headers=token_a), 403, "no_grant")
    await expect(await client.get(url(a, OTHER), headers=token_a), 403, "not_referenced")
    # The task references it, but its bucket is no storage of the project.
    token_c = bearer(make_token(tasks=[c]))
    await expect(
        await client.get(url(c, "gs://unconfigured-bucket/video/clip.bin"), headers=token_c),
        403,
        "bucket_not_configured",
    )
    # Project grants cover every task of the project; "*" covers every task.
    assert (await client.get(url(b, OTHER), headers=bearer(make_token(projects=[PROJECT])))).status == 200
    assert (await client.get(url(b, OTHER), headers=bearer(make_token(tasks="*")))).status == 200
    await expect(await client.get(url(b, OTHER), headers=bearer(make_token(projects=["99"]))), 403, "no_grant")


async def test_unknown_task_is_404_and_ungranted_callers_learn_nothing(gateway):
    client = await gateway()
    await expect(await client.get(url(999_999), headers=bearer(make_token(projects=[PROJECT]))), 404, "unknown_task")
    stranger = bearer(make_token(tasks=[12345]))
    existing = await client.get(url(client.ids[0]), headers=stranger)
    missing = await client.get(url(client.ids[0], f"gs://{BUCKET}/does/not/exist"), headers=stranger)
    assert existing.status == missing.status == 403
    assert (await existing.json()) == (await missing.json())


FILEURI_CASES = [
    ("dot-dot", encode_fileuri(f"gs://{BUCKET}/video/../other/secret.bin"), 400, "bad_fileuri"),
    ("bad base64", "%%%not-base64", 400, "bad_fileuri"),
    ("not gs", encode_fileuri("https://example.com/x"), 400, "bad_fileuri"),
    ("missing", "", 400, "bad_fileuri"),
    # An encoded slash stays a literal part of the key: task A references "video%2Fclip.bin", which
    # is not "video/clip.bin" and does not exist; an unreferenced encoded variant is refused.
    ("encoded slash", encode_fileuri(f"gs://{BUCKET}/video%2Fclip.bin"), 404, "not_found"),
    ("encoded other", encode_fileuri(f"gs://{BUCKET}/other%2Fsecret.bin"), 403, "not_referenced"),
    ("padding optional", encode_fileuri(CLIP) + "=" * (-len(encode_fileuri(CLIP)) % 4), 200, None),
]


@pytest.mark.parametrize(
    ("fileuri", "status", "reason"), [c[1:] for c in FILEURI_CASES], ids=[c[0] for c in FILEURI_CASES]
)
async def test_fileuri_validation(gateway, fileuri, status, reason):
    client = await gateway()
    task = client.ids[0]
    response = await client.get(f"/tasks/{task}/resolve/?fileuri={fileuri}", headers=bearer(make_token(tasks=[task])))
    await expect(response, status, reason)


async def test_token_sources_can_be_switched(gateway):
    client = await gateway(auth={"cookie": "lsgw", "query_param": "access_token"})
    task = client.ids[0]
    token = make_token(tasks=[task])
    assert (await client.get(url(task), cookies={"lsgw": token})).status == 200
    assert (await client.get(url(task) + f"&access_token={token}")).status == 200
    await expect(await client.get(url(task) + f"&token={token}"), 401, "missing_token")

    client = await gateway(auth={"header": False, "cookie": "", "query_param": "token"})
    await expect(await client.get(url(task), headers=bearer(token)), 401, "missing_token")
    assert (await client.get(url(task) + f"&token={token}")).status == 200


async def test_project_resolve(gateway, tmp_path):
    storage = seed("local", BUCKET, sample_objects(), tmp_path, None)
    storage["prefix"] = "video/"
    client = await gateway(storages=[storage])
    granted = bearer(make_token(projects=[PROJECT]))
    project_url = f"/projects/{PROJECT}/resolve/?fileuri="
    assert (await client.get(project_url + encode_fileuri(CLIP), headers=granted)).status == 200
    await expect(await client.get(project_url + encode_fileuri(OTHER), headers=granted), 403, "outside_storage")
    await expect(
        await client.get(project_url + encode_fileuri(CLIP), headers=bearer(make_token(tasks="*"))), 403, "no_grant"
    )
    await expect(await client.get(f"/projects/{PROJECT}/resolve/?fileuri=%%", headers=granted), 400, "bad_fileuri")


async def test_cors_preflight_and_exposed_headers(gateway):
    client = await gateway(cors={"origins": ["https://ls.example.com"]})
    task = client.ids[0]
    preflight = await client.options(
        url(task),
        headers={
            "Origin": "https://ls.example.com",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization,range",
        },
    )
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://ls.example.com"
    assert "Range" in preflight.headers["Access-Control-Allow-Headers"]
    response = await client.get(
        url(task),
        headers={**bearer(make_token(tasks=[task])), "Origin": "https://ls.example.com", "Range": "bytes=0-9"},
    )
    assert response.status == 206
    exposed = response.headers["Access-Control-Expose-Headers"]
    for name in ("Content-Range", "Content-Length", "Accept-Ranges", "ETag"):
        assert name in exposed
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    foreign = await client.get(
        url(task), headers={**bearer(make_token(tasks=[task])), "Origin": "https://evil.example"}
    )
    assert "Access-Control-Allow-Origin" not in foreign.headers
    refused = await client.options(
        url(task), headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
    )
    assert refused.status == 403


async def test_import_api(gateway):
    client = await gateway()
    admin = bearer(make_token(admin=True))
    await expect(await client.post(f"/api/projects/{PROJECT}/import", json=[]), 401, "missing_token")
    await expect(
        await client.post(f"/api/projects/{PROJECT}/import", json=[], headers=bearer(make_token())), 403, "not_admin"
    )
    await expect(await client.post("/api/projects/404/import", json=[{"a": 1}], headers=admin), 404, "unknown_project")
    await expect(await client.post(f"/api/projects/{PROJECT}/import", data=b"{nope", headers=admin), 400, "bad_json")
    body = await expect(
        await client.post(f"/api/projects/{PROJECT}/import", json=[{"data": {"v": CLIP}}, 5], headers=admin),
        400,
        "bad_task",
    )
    assert "#2" in body["message"]
    # A task registered now is served at once, including a Label Studio "data-less" task dict.
    response = await client.post(
        f"/api/projects/{PROJECT}/import",
        json=[{"data": {"v": OTHER}}, {"image": f"<img src='{CLIP}'>"}],
        headers=admin,
    )
    assert response.status == 201
    new_ids = (await response.json())["task_ids"]
    assert len(new_ids) == 2 and max(client.ids) < min(new_ids)
    assert (await client.get(url(new_ids[1]), headers=bearer(make_token(tasks=[new_ids[1]])))).status == 200
    task = await (await client.get(f"/api/tasks/{new_ids[0]}", headers=admin)).json()
    assert task == {"id": new_ids[0], "project": PROJECT, "data": {"v": OTHER}}


async def test_errors_are_json(gateway):
    client = await gateway()
    response = await client.get("/no/such/route")
    await expect(response, 404, "not_found")
    response = await client.post(url(client.ids[0]))
    await expect(response, 405, "method_not_allowed")


async def test_access_log_and_metrics_never_carry_the_token(gateway, caplog):
    from gateway import metrics

    client = await gateway()
    task = client.ids[0]
    token = make_token(sub="annotator-7", tasks=[task])
    metrics.BATCH.flush()  # request metrics are written in batches: read them after a flush
    before = metrics.REQUESTS.labels("task_resolve", "proxy", "2xx")._value.get()
    with caplog.at_level("INFO", logger="gateway.access"):
        response = await client.get(url(task) + f"&token={token}", headers={"X-Request-ID": "req-42"})
        assert response.status == 200 and response.headers["X-Request-ID"] == "req-42"
        await response.read()
        await client.get(url(task), headers=bearer("garbage"))
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    assert lines[0]["request_id"] == "req-42"
    assert (lines[0]["status"], lines[0]["sub"], lines[0]["task"]) == (200, "annotator-7", task)
    assert lines[0]["bytes"] > 300_000 and lines[0]["path"] == f"/tasks/{task}/resolve/"
    assert lines[1]["status"] == 401 and lines[1]["error"] == "invalid_token"
    assert token not in caplog.text and "garbage" not in caplog.text
    metrics.BATCH.flush()
    assert metrics.REQUESTS.labels("task_resolve", "proxy", "2xx")._value.get() == before + 1
    assert token not in (await (await client.get("/metrics")).text())


async def test_steady_state_needs_no_registry_round_trip(gateway):
    from gateway.state import REGISTRY as REGISTRY_KEY

    client = await gateway()
    registry = client.server.app[REGISTRY_KEY]
    calls: list[int] = []
    original = registry.task_access

    async def counting(task_id: int):
        calls.append(task_id)
        return await original(task_id)

    registry.task_access = counting
    task = client.ids[0]
    headers = bearer(make_token(tasks=[task]))
    cold = await asyncio.gather(*(client.get(url(task), headers=headers) for _ in range(20)))
    assert [r.status for r in cold] == [200] * 20
    for _ in range(5):
        assert (await client.get(url(task), headers=headers)).status == 200
    assert calls == [task]  # twenty concurrent cold requests shared one lookup
    # Unknown tasks are looked up every time, so a task registered later is seen at once.
    for _ in range(2):
        await expect(await client.get(url(424242), headers=bearer(make_token(tasks="*"))), 404, "unknown_task")
    assert calls == [task, 424242, 424242]


async def test_absurd_task_ids_are_404_json(gateway):
    client = await gateway()
    for path in ("/tasks/99999999999999999999999/resolve/?fileuri=x", "/api/tasks/99999999999999999999999"):
        response = await client.get(path, headers=bearer(make_token(tasks="*", admin=True)))
        await expect(response, 404, "not_found")
