"""V4 signed URLs: signatures verified independently with the public key, the signBlob client, the URL cache.

The canonical request and string-to-sign are rebuilt here from the URL's own parts (never with
gateway.signer's helpers nor google-cloud-storage's signer), so a wrong canonical form fails verification.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import json
import socket
import threading
import urllib.parse
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.hashes import SHA256
from google.oauth2 import service_account

from gateway.signer import IamSigner, LocalKeySigner, SignedUrlCache, SigningError, sign_url

EMAIL = "gateway@p.iam.gserviceaccount.com"
BUCKET = "media-bucket"
KEY = "videos/clip été #1?.mp4"
QUOTED_KEY = "videos/clip%20%C3%A9t%C3%A9%20%231%3F.mp4"  # written out by hand: independent of quote()
DISPOSITION = 'attachment; filename="clip été #1?.mp4"'
NOW = datetime.datetime(2026, 11, 29, 12, 34, 56, tzinfo=datetime.UTC)
GCS = "https://storage.googleapis.com"
EMULATOR = "http://127.0.0.1:4443"


# --------------------------------------------------------------------------------------------- keys


@pytest.fixture(scope="module")
def private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def credentials(private_key) -> service_account.Credentials:
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "p",
        "private_key_id": "k1",
        "private_key": pem,
        "client_email": EMAIL,
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    return service_account.Credentials.from_service_account_info(info)


# ------------------------------------------------------------------ an independent V4 verifier


@dataclass
class ParsedUrl:
    scheme: str
    host: str
    path: str
    params: dict[str, str]  # decoded names and values, X-Goog-Signature excluded
    raw_query: str  # the query as it appears in the URL, without the trailing &X-Goog-Signature=...
    signature: str


def parse_signed_url(url: str) -> ParsedUrl:
    assert "#" not in url, "a raw '#' would start a fragment"
    scheme, rest = url.split("://", 1)
    host, _, path_and_query = rest.partition("/")
    path, _, query = ("/" + path_and_query).partition("?")
    raw_query, sep, signature = query.rpartition("&X-Goog-Signature=")
    assert sep, f"X-Goog-Signature is not the last parameter: {url}"
    params: dict[str, str] = {}
    for item in raw_query.split("&"):
        name, eq, value = item.partition("=")
        assert eq, f"parameter without '=': {item!r}"
        params[urllib.parse.unquote(name)] = urllib.parse.unquote(value)
    return ParsedUrl(scheme, host, path, params, raw_query, signature)


def canonical_query(params: dict[str, str]) -> str:
    q = urllib.parse.quote
    return "&".join(f"{q(name, safe='~')}={q(params[name], safe='~')}" for name in sorted(params))


def string_to_sign(parsed: ParsedUrl, host: str | None = None) -> bytes:
    date = parsed.params["X-Goog-Date"]
    canonical_request = "\n".join(
        [
            "GET",
            parsed.path,
            canonical_query(parsed.params),
            f"host:{host or parsed.host}\n",
            "host",
            "UNSIGNED-PAYLOAD",
        ]
    )
    return "\n".join(
        [
            "GOOG4-RSA-SHA256",
            date,
            f"{date[:8]}/auto/storage/goog4_request",
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    ).encode()


def verifies(url: str, public_key: rsa.RSAPublicKey, host: str | None = None) -> bool:
    """True when the URL's X-Goog-Signature is a valid signature of its own canonical form."""
    parsed = parse_signed_url(url)
    try:
        signature = bytes.fromhex(parsed.signature)
    except ValueError:
        return False
    try:
        public_key.verify(signature, string_to_sign(parsed, host), PKCS1v15(), SHA256())
    except InvalidSignature:
        return False
    return True


def test_the_verifier_rejects_a_forged_signature(private_key):
    """The helper itself can fail: a signature over a different string does not verify."""
    forged = private_key.sign(b"something else", PKCS1v15(), SHA256()).hex()
    url = (
        f"{GCS}/{BUCKET}/a.txt?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=x%2F20261129%2Fauto%2Fstorage"
        f"%2Fgoog4_request&X-Goog-Date=20261129T123456Z&X-Goog-Expires=900&X-Goog-SignedHeaders=host"
        f"&X-Goog-Signature={forged}"
    )
    assert not verifies(url, private_key.public_key())


# --------------------------------------------------------------------------- LocalKeySigner + sign_url


async def test_local_signer_signs_rsa_sha256(credentials, private_key):
    signer = LocalKeySigner(credentials)
    assert signer.method == "local"
    assert signer.email == EMAIL
    signature = await signer.sign(b"payload")
    private_key.public_key().verify(signature, b"payload", PKCS1v15(), SHA256())


async def test_local_signer_signs_off_the_event_loop(credentials):
    """The RSA operation runs in a worker thread (observed through the credentials' signer, when used)."""
    threads: list[str] = []
    real = credentials.signer

    class RecordingSigner:
        def __getattr__(self, name):
            return getattr(real, name)

        def sign(self, message):
            threads.append(threading.current_thread().name)
            return real.sign(message)

    creds = service_account.Credentials(RecordingSigner(), EMAIL, "https://oauth2.googleapis.com/token")
    signer = LocalKeySigner(creds)
    signature = await signer.sign(b"x")
    assert signature == real.sign(b"x")
    if not threads:
        pytest.skip("LocalKeySigner does not go through credentials.signer.sign; thread not observable")
    assert threads[0] != threading.current_thread().name


async def sign_sample(credentials) -> str:
    """The reference URL: KEY with its awkward characters and a disposition override, 15 minutes."""
    return await sign_url(
        LocalKeySigner(credentials),
        endpoint=GCS,
        bucket=BUCKET,
        key=KEY,
        ttl_seconds=900,
        now=NOW,
        query={"response-content-disposition": DISPOSITION},
    )


async def test_signed_url_verifies_with_the_public_key(credentials, private_key):
    public_key = private_key.public_key()
    url = await sign_sample(credentials)
    assert url.startswith(f"{GCS}/{BUCKET}/{QUOTED_KEY}?")
    parsed = parse_signed_url(url)
    assert (parsed.scheme, parsed.host, parsed.path) == ("https", "storage.googleapis.com", f"/{BUCKET}/{QUOTED_KEY}")
    assert urllib.parse.unquote(parsed.path) == f"/{BUCKET}/{KEY}"
    assert parsed.params == {
        "X-Goog-Algorithm": "GOOG4-RSA-SHA256",
        "X-Goog-Credential": f"{EMAIL}/20261129/auto/storage/goog4_request",
        "X-Goog-Date": "20261129T123456Z",
        "X-Goog-Expires": "900",
        "X-Goog-SignedHeaders": "host",
        "response-content-disposition": DISPOSITION,
    }
    # The URL carries the canonical query itself (sorted, percent-encoded with safe="~").
    assert parsed.raw_query == canonical_query(parsed.params)
    assert "response-content-disposition=attachment%3B%20filename%3D%22clip%20%C3%A9t%C3%A9%20%231%3F.mp4%22" in url
    assert parsed.signature == parsed.signature.lower()
    assert len(parsed.signature) == 512  # 2048-bit RSA
    assert verifies(url, public_key)

    # Tampering with anything signed breaks the signature.
    tampered = [
        url.replace("X-Goog-Expires=900", "X-Goog-Expires=901"),
        url.replace(QUOTED_KEY, QUOTED_KEY.replace("clip", "clap")),
        url.replace(f"/{BUCKET}/", "/other-bucket/"),
        url.replace("X-Goog-Date=20261129T123456Z", "X-Goog-Date=20261129T123457Z"),
        url.replace("attachment%3B", "inline%3B"),
    ]
    for bad in tampered:
        assert bad != url
        assert not verifies(bad, public_key), bad
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert not verifies(url, other_key.public_key())


async def test_signed_url_is_deterministic_and_sorts_extra_query(credentials, private_key):
    signer = LocalKeySigner(credentials)
    query = {"response-content-type": "video/mp4", "response-content-disposition": "inline"}
    first = await sign_url(signer, endpoint=GCS, bucket=BUCKET, key="a b.mp4", ttl_seconds=60, now=NOW, query=query)
    second = await sign_url(
        signer, endpoint=GCS, bucket=BUCKET, key="a b.mp4", ttl_seconds=60, now=NOW, query=dict(reversed(query.items()))
    )
    assert first == second
    parsed = parse_signed_url(first)
    assert list(parsed.params) == sorted(parsed.params)
    assert parsed.params["response-content-type"] == "video/mp4"
    assert parsed.path == f"/{BUCKET}/a%20b.mp4"
    assert verifies(first, private_key.public_key())


async def test_signed_url_without_extra_query(credentials, private_key):
    url = await sign_url(
        LocalKeySigner(credentials), endpoint=GCS, bucket=BUCKET, key="plain/key~1.txt", ttl_seconds=604800, now=NOW
    )
    parsed = parse_signed_url(url)
    assert parsed.path == f"/{BUCKET}/plain/key~1.txt"
    assert set(parsed.params) == {
        "X-Goog-Algorithm",
        "X-Goog-Credential",
        "X-Goog-Date",
        "X-Goog-Expires",
        "X-Goog-SignedHeaders",
    }
    assert parsed.params["X-Goog-Expires"] == "604800"
    assert verifies(url, private_key.public_key())


async def test_now_in_another_time_zone_is_converted_to_utc(credentials, private_key):
    # 01:30 on the 30th at UTC+2 is 23:30 on the 29th UTC: both the date and the credential scope follow UTC.
    now = datetime.datetime(2026, 11, 30, 1, 30, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))
    url = await sign_url(LocalKeySigner(credentials), endpoint=GCS, bucket=BUCKET, key="k", ttl_seconds=900, now=now)
    parsed = parse_signed_url(url)
    assert parsed.params["X-Goog-Date"] == "20261129T233000Z"
    assert parsed.params["X-Goog-Credential"] == f"{EMAIL}/20261129/auto/storage/goog4_request"
    assert verifies(url, private_key.public_key())


async def test_matches_google_cloud_storage_v4_signer(credentials, private_key):
    """google-cloud-storage's own V4 signer gives the very same URL (RSA PKCS#1 v1.5 is deterministic)."""
    from google.cloud.storage._signing import generate_signed_url_v4

    ours = await sign_sample(credentials)
    theirs = generate_signed_url_v4(
        credentials,
        resource=f"/{BUCKET}/{urllib.parse.quote(KEY, safe='/~')}",
        expiration=datetime.timedelta(seconds=900),
        api_access_endpoint=GCS,
        method="GET",
        query_parameters={"response-content-disposition": DISPOSITION},
        _request_timestamp=NOW.strftime("%Y%m%dT%H%M%SZ"),  # the library's (testing-only) fixed clock
    )
    assert verifies(theirs, private_key.public_key())
    assert ours == theirs


async def test_emulator_endpoint_signs_its_own_host(credentials, private_key):
    public_key = private_key.public_key()
    url = await sign_url(
        LocalKeySigner(credentials), endpoint=EMULATOR, bucket="bucket", key="dir/a b.txt", ttl_seconds=900, now=NOW
    )
    assert url.startswith(f"{EMULATOR}/bucket/dir/a%20b.txt?")
    assert parse_signed_url(url).host == "127.0.0.1:4443"
    assert verifies(url, public_key, host="127.0.0.1:4443")
    assert not verifies(url, public_key, host="127.0.0.1")
    assert not verifies(url, public_key, host="storage.googleapis.com")


@pytest.mark.parametrize("ttl", [0, -1, 604801, 10**9])
async def test_ttl_out_of_range_is_rejected(credentials, ttl):
    with pytest.raises(ValueError):
        await sign_url(LocalKeySigner(credentials), endpoint=GCS, bucket=BUCKET, key="k", ttl_seconds=ttl, now=NOW)


@pytest.mark.parametrize("ttl", [1, 604800])
async def test_ttl_bounds_are_accepted(credentials, private_key, ttl):
    url = await sign_url(LocalKeySigner(credentials), endpoint=GCS, bucket=BUCKET, key="k", ttl_seconds=ttl, now=NOW)
    assert parse_signed_url(url).params["X-Goog-Expires"] == str(ttl)
    assert verifies(url, private_key.public_key())


# ------------------------------------------------------- IamSigner against a signBlob stand-in


class Tokens:
    """The token-source double: sets the Authorization header."""

    def __init__(self) -> None:
        self.calls = 0

    async def apply(self, headers: dict[str, str]) -> None:
        self.calls += 1
        headers["Authorization"] = "Bearer test-token"


@dataclass
class SignBlobStandIn:
    key: rsa.RSAPrivateKey
    status: int = 200
    body: str | None = None  # overrides the signing answer
    content_type: str = "application/json"
    seen: list[dict] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.seen.append(
            {
                "target": request.match_info["target"],
                "authorization": request.headers.get("Authorization"),
                "content_type": request.headers.get("Content-Type", ""),
                "body": raw,
            }
        )
        if request.headers.get("Authorization") != "Bearer test-token":
            return web.json_response({"error": {"code": 401, "status": "UNAUTHENTICATED"}}, status=401)
        if self.body is not None or self.status != 200:
            return web.Response(
                status=self.status, text=self.body if self.body is not None else "{}", content_type=self.content_type
            )
        payload = base64.b64decode(json.loads(raw)["payload"], validate=True)
        signature = self.key.sign(payload, PKCS1v15(), SHA256())
        return web.json_response({"keyId": "k1", "signedBlob": base64.b64encode(signature).decode()})


@pytest.fixture
async def iam(aiohttp_server, private_key):
    stand_in = SignBlobStandIn(private_key)
    app = web.Application()
    app.router.add_post("/v1/projects/-/serviceAccounts/{target}", stand_in.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    return stand_in, str(server.make_url("")).rstrip("/")


async def test_iam_signer_signs_through_sign_blob(iam, private_key):
    stand_in, endpoint = iam
    tokens = Tokens()
    async with aiohttp.ClientSession() as session:
        signer = IamSigner(session, tokens, EMAIL, endpoint=endpoint)
        assert signer.method == "signblob"
        assert signer.email == EMAIL
        url = await sign_url(
            signer,
            endpoint=GCS,
            bucket=BUCKET,
            key=KEY,
            ttl_seconds=900,
            now=NOW,
            query={"response-content-disposition": DISPOSITION},
        )
    assert tokens.calls >= 1
    assert len(stand_in.seen) == 1
    request = stand_in.seen[0]
    assert request["target"] == f"{EMAIL}:signBlob"
    assert request["authorization"] == "Bearer test-token"
    assert request["content_type"].startswith("application/json")
    parsed = parse_signed_url(url)
    assert base64.b64decode(json.loads(request["body"])["payload"]) == string_to_sign(parsed)
    assert parsed.params["X-Goog-Credential"] == f"{EMAIL}/20261129/auto/storage/goog4_request"
    assert verifies(url, private_key.public_key())


IAM_DENIED = json.dumps(
    {
        "error": {
            "code": 403,
            "message": "Permission 'iam.serviceAccounts.signBlob' denied on resource (or it may not exist).",
            "status": "PERMISSION_DENIED",
        }
    }
)


@pytest.mark.parametrize(
    ("status", "body", "content_type", "reason"),
    [
        (403, IAM_DENIED, "application/json", "permission_denied"),
        (429, '{"error": {"code": 429, "status": "RESOURCE_EXHAUSTED"}}', "application/json", "quota_exceeded"),
        (500, "internal\nerror", "text/plain", "unavailable"),
        (503, '{"error": {"code": 503, "status": "UNAVAILABLE"}}', "application/json", "unavailable"),
        (200, "<html>not json</html>", "text/html", "bad_response"),
        (200, '{"keyId": "k1", "signedBlob": ', "application/json", "bad_response"),
        (200, '{"keyId": "k1"}', "application/json", "bad_response"),
        (200, '{"keyId": "k1", "signedBlob": "***not base64***"}', "application/json", "bad_response"),
    ],
    ids=[
        "403",
        "429",
        "500",
        "503",
        "200-not-json",
        "200-truncated-json",
        "200-no-signedBlob",
        "200-signedBlob-not-base64",
    ],
)
async def test_iam_signer_errors(iam, status, body, content_type, reason):
    stand_in, endpoint = iam
    stand_in.status, stand_in.body, stand_in.content_type = status, body, content_type
    async with aiohttp.ClientSession() as session:
        signer = IamSigner(session, Tokens(), EMAIL, endpoint=endpoint)
        with pytest.raises(SigningError) as caught:
            await signer.sign(b"string to sign")
    assert caught.value.reason == reason
    message = str(caught.value)
    assert message
    assert "\n" not in message
    assert "test-token" not in message


async def test_iam_signer_connection_error_is_unavailable():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connections are refused
        async with aiohttp.ClientSession() as session:
            signer = IamSigner(session, Tokens(), EMAIL, endpoint=f"http://127.0.0.1:{port}")
            with pytest.raises(SigningError) as caught:
                await signer.sign(b"x")
    assert caught.value.reason == "unavailable"
    assert "\n" not in str(caught.value)


# ------------------------------------------------------------------------------- SignedUrlCache


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Maker:
    """A `make` double: records the `now` it was called with and returns a distinct URL each time."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, now: float) -> str:
        self.calls.append(now)
        return f"https://signed/{len(self.calls)}"


def test_margin():
    assert SignedUrlCache.margin(300) == 60
    assert SignedUrlCache.margin(600) == 60
    assert SignedUrlCache.margin(900) == 90
    assert SignedUrlCache.margin(3600) == 360
    assert SignedUrlCache.margin(604800) == pytest.approx(60480)


async def test_cache_hits_after_the_first_sign():
    clock = Clock()
    t0 = clock.now
    cache = SignedUrlCache(maxsize=100, clock=clock)
    make = Maker()
    assert await cache.get(("b", "k", 1), 900, make) == ("https://signed/1", t0 + 900, False)
    for step in range(10):
        clock.now = t0 + step * 10
        assert await cache.get(("b", "k", 1), 900, make) == ("https://signed/1", t0 + 900, True)
    assert make.calls == [t0]


async def test_cache_resigns_exactly_at_the_margin():
    clock = Clock()
    t0 = clock.now
    cache = SignedUrlCache(maxsize=100, clock=clock)
    make = Maker()
    await cache.get("k", 900, make)
    clock.now = t0 + 809  # 91 s left, margin 90: reuse
    assert await cache.get("k", 900, make) == ("https://signed/1", t0 + 900, True)
    assert make.calls == [t0]
    clock.now = t0 + 811  # 89 s left: must re-sign, with the clock's time at the call
    assert await cache.get("k", 900, make) == ("https://signed/2", t0 + 811 + 900, False)
    assert make.calls == [t0, t0 + 811]
    assert await cache.get("k", 900, make) == ("https://signed/2", t0 + 811 + 900, True)
    clock.now = t0 + 811 + 900 + 5  # long expired
    url, expires_at, hit = await cache.get("k", 900, make)
    assert (url, hit) == ("https://signed/3", False)
    assert expires_at - clock.now == 900


async def test_cache_margin_floor_for_short_ttls():
    clock = Clock()
    t0 = clock.now
    cache = SignedUrlCache(maxsize=100, clock=clock)
    make = Maker()
    await cache.get("k", 300, make)  # margin 60, not 30
    clock.now = t0 + 239  # 61 s left
    assert (await cache.get("k", 300, make))[2] is True
    clock.now = t0 + 241  # 59 s left
    assert (await cache.get("k", 300, make))[:3:2] == ("https://signed/2", False)
    assert len(make.calls) == 2


async def test_cache_never_returns_a_url_inside_the_margin():
    clock = Clock()
    t0 = clock.now
    cache = SignedUrlCache(maxsize=100, clock=clock)
    make = Maker()
    for second in range(0, 3000, 7):
        clock.now = t0 + second
        _url, expires_at, _hit = await cache.get("k", 900, make)
        assert expires_at - clock.now >= SignedUrlCache.margin(900)


async def test_cache_keys_are_distinct():
    cache = SignedUrlCache(maxsize=100, clock=Clock())
    make = Maker()
    first = await cache.get(("b", "k", 1), 900, make)
    second = await cache.get(("b", "k", 2), 900, make)  # a new object generation
    assert (first[0], first[2]) == ("https://signed/1", False)
    assert (second[0], second[2]) == ("https://signed/2", False)
    assert len(make.calls) == 2
    assert (await cache.get(("b", "k", 1), 900, make))[:3:2] == ("https://signed/1", True)
    assert (await cache.get(("b", "k", 2), 900, make))[:3:2] == ("https://signed/2", True)
    assert len(make.calls) == 2


async def test_cache_is_bounded():
    cache = SignedUrlCache(maxsize=1, clock=Clock())
    make = Maker()
    await cache.get("a", 900, make)
    await cache.get("b", 900, make)
    _url, _expires, hit = await cache.get("a", 900, make)  # evicted by "b"
    assert not hit
    assert len(make.calls) == 3


async def test_concurrent_misses_share_one_make():
    clock = Clock()
    cache = SignedUrlCache(maxsize=100, clock=clock)
    started = asyncio.Event()
    release = asyncio.Event()
    calls: list[float] = []

    async def make(now: float) -> str:
        calls.append(now)
        started.set()
        await release.wait()
        return "https://signed/shared"

    tasks = [asyncio.ensure_future(cache.get("k", 900, make)) for _ in range(20)]
    await asyncio.wait_for(started.wait(), 5)
    for _ in range(10):  # let every other get reach its wait
        await asyncio.sleep(0)
    release.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert calls == [clock.now]
    assert {url for url, _, _ in results} == {"https://signed/shared"}
    assert {expires_at for _, expires_at, _ in results} == {clock.now + 900}
    assert (await cache.get("k", 900, make))[2] is True
    assert len(calls) == 1


async def test_a_failing_make_reaches_every_waiter_and_is_not_cached():
    cache = SignedUrlCache(maxsize=100, clock=Clock())
    started = asyncio.Event()
    release = asyncio.Event()
    calls = 0

    class Boom(Exception):
        pass

    async def failing(now: float) -> str:
        nonlocal calls
        calls += 1
        started.set()
        await release.wait()
        raise Boom("signBlob failed")

    tasks = [asyncio.ensure_future(cache.get("k", 900, failing)) for _ in range(20)]
    await asyncio.wait_for(started.wait(), 5)
    for _ in range(10):
        await asyncio.sleep(0)
    release.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert calls == 1
    assert all(isinstance(result, Boom) for result in results), results

    make = Maker()
    assert (await cache.get("k", 900, make))[:3:2] == ("https://signed/1", False)
    assert (await cache.get("k", 900, make))[2] is True
    assert len(make.calls) == 1


async def test_a_failing_make_alone_is_not_cached():
    cache = SignedUrlCache(maxsize=100, clock=Clock())

    async def failing(now: float) -> str:
        raise RuntimeError("nope")

    with pytest.raises(RuntimeError):
        await cache.get("k", 900, failing)
    make = Maker()
    assert (await cache.get("k", 900, make))[2] is False
    assert len(make.calls) == 1
