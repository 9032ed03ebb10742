"""V4 signed URLs (GOOG4-RSA-SHA256) for presign storages, and the cache that makes them rare.

Two ways to sign the same string: a service-account key held locally, or — for credentials that
hold no key (ADC on GCE/GKE, workload identity federation, impersonation) — the IAM Credentials
`signBlob` API with the credential's own access token. Either way the signature is computed off
the event loop, and `SignedUrlCache` lets concurrent requests for one object share one signature.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import aiohttp
import google.auth.exceptions

MAX_TTL_SECONDS = 7 * 24 * 3600  # the V4 maximum
IAM_ENDPOINT = "https://iamcredentials.googleapis.com"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"  # signBlob needs it (or iam)
_SIGN_TIMEOUT = aiohttp.ClientTimeout(total=10)
log = logging.getLogger("gateway.signer")


class SigningError(Exception):
    """Signing failed; `reason` is a stable code (answered as 503)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Signer(Protocol):
    method: str  # "local" or "signblob": the metrics label
    email: str

    async def sign(self, payload: bytes) -> bytes: ...


class CredentialsSigner:
    """Credentials that sign by themselves: a service-account key (locally), or impersonated
    credentials (google-auth calls signBlob with the source credentials, correctly scoped)."""

    def __init__(self, credentials: Any, method: str = "local") -> None:
        self._credentials = credentials
        self.method = method
        self.email: str = credentials.signer_email

    async def sign(self, payload: bytes) -> bytes:
        try:
            return await asyncio.to_thread(self._credentials.sign_bytes, payload)
        except google.auth.exceptions.GoogleAuthError as exc:
            log.warning("signing as %s failed: %s", self.email, exc)
            if self.method == "signblob":  # impersonation: google-auth called signBlob as the source identity
                raise SigningError(
                    "unavailable",
                    f"signing as {self.email} through signBlob failed ({type(exc).__name__}): the source"
                    " identity needs roles/iam.serviceAccountTokenCreator on that service account, and"
                    " iamcredentials.googleapis.com must be reachable",
                ) from None
            raise SigningError(
                "unavailable", f"the key of {self.email} could not sign ({type(exc).__name__})"
            ) from None


LocalKeySigner = CredentialsSigner  # a service-account key: the common case


class IamSigner:
    """Keyless credentials (ADC on GCE/GKE, workload identity federation): the signBlob API as
    the credential's own service account, which needs the Token Creator role on itself."""

    method = "signblob"

    def __init__(self, session: aiohttp.ClientSession, tokens: Any, email: str, endpoint: str = IAM_ENDPOINT) -> None:
        self._session, self._tokens, self.email = session, tokens, email
        self._endpoint = endpoint.rstrip("/")

    async def sign(self, payload: bytes) -> bytes:
        headers: dict[str, str] = {}
        try:
            await self._tokens.apply(headers)
        except google.auth.exceptions.GoogleAuthError:
            raise SigningError("unavailable", "no access token for signBlob could be obtained") from None
        body = {"payload": base64.b64encode(payload).decode("ascii")}
        url = f"{self._endpoint}/v1/projects/-/serviceAccounts/{quote(self.email, safe='@.')}:signBlob"
        try:
            async with self._session.post(url, json=body, headers=headers, timeout=_SIGN_TIMEOUT) as response:
                if response.status != 200:
                    detail = (await response.text())[:300]
                    log.warning("signBlob as %s answered %d: %s", self.email, response.status, detail)
                if response.status == 403:
                    raise SigningError(
                        "permission_denied",
                        "signBlob refused: the signing service account needs the Service Account Token Creator"
                        " role on itself and a token with the cloud-platform scope",
                    )
                if response.status == 429:
                    raise SigningError("quota_exceeded", "signBlob quota exceeded")
                if response.status != 200:
                    raise SigningError("unavailable", f"signBlob answered {response.status}")
                answer = await response.json(content_type=None)
            signature = base64.b64decode(answer["signedBlob"], validate=True)
            if not signature:
                raise ValueError("empty signature")
            return signature
        except (aiohttp.ClientError, TimeoutError):
            raise SigningError("unavailable", "signBlob cannot be reached") from None
        except (ValueError, KeyError, TypeError):
            raise SigningError("bad_response", "signBlob answered without a signature") from None


async def sign_url(
    signer: Signer,
    *,
    endpoint: str,
    bucket: str,
    key: str,
    ttl_seconds: int,
    now: datetime.datetime,
    query: dict[str, str] | None = None,
) -> str:
    """A V4 signed GET URL for `gs://bucket/key`, valid `ttl_seconds` from `now`."""
    if not 1 <= ttl_seconds <= MAX_TTL_SECONDS:
        raise ValueError(f"ttl_seconds must be 1..{MAX_TTL_SECONDS}, got {ttl_seconds}")
    parts = urlsplit(endpoint)
    host = parts.netloc
    stamp = now.astimezone(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    scope = f"{stamp[:8]}/auto/storage/goog4_request"
    params = {
        "X-Goog-Algorithm": "GOOG4-RSA-SHA256",
        "X-Goog-Credential": f"{signer.email}/{scope}",
        "X-Goog-Date": stamp,
        "X-Goog-Expires": str(ttl_seconds),
        "X-Goog-SignedHeaders": "host",
        **(query or {}),
    }
    canonical_query = "&".join(f"{quote(k, safe='~')}={quote(v, safe='~')}" for k, v in sorted(params.items()))
    path = f"/{bucket}/{quote(key, safe='/~')}"
    canonical_request = "\n".join(["GET", path, canonical_query, f"host:{host}\n", "host", "UNSIGNED-PAYLOAD"])
    string_to_sign = "\n".join(
        ["GOOG4-RSA-SHA256", stamp, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    signature = await signer.sign(string_to_sign.encode())
    return f"{parts.scheme}://{host}{path}?{canonical_query}&X-Goog-Signature={signature.hex()}"


class SignedUrlCache:
    """Signed URLs reused until less than a safety margin of their life is left.

    A URL with less than `margin(ttl)` left is never handed out, so a browser that follows it (or
    caches the redirect for at most the remaining life minus the margin) never meets an expired
    one. Concurrent misses for one key share a single signing call.
    """

    def __init__(self, maxsize: int, clock: Callable[[], float] = time.time) -> None:
        self._entries: dict[Hashable, tuple[str, float]] = {}
        self._pending: dict[Hashable, asyncio.Future[tuple[str, float]]] = {}
        self._maxsize = maxsize
        self._clock = clock

    @staticmethod
    def margin(ttl_seconds: int) -> float:
        """max(60 s, 10 % of the TTL), but never more than half of it (a 1-minute TTL stays cacheable)."""
        return min(max(60.0, 0.1 * ttl_seconds), ttl_seconds / 2)

    def cached(self, key: Hashable, ttl_seconds: int) -> tuple[str, float] | None:
        """The URL and its expiry, if one with more than the margin of life is kept."""
        entry = self._entries.get(key)
        if entry is not None and entry[1] - self._clock() >= self.margin(ttl_seconds):
            return entry
        return None

    async def get(
        self, key: Hashable, ttl_seconds: int, make: Callable[[float], Awaitable[str]]
    ) -> tuple[str, float, bool]:
        entry = self.cached(key, ttl_seconds)
        if entry is not None:
            return entry[0], entry[1], True
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._sign(key, ttl_seconds, make))
            self._pending[key] = pending
            pending.add_done_callback(lambda _: self._pending.pop(key, None))
        url, expires_at = await asyncio.shield(pending)
        return url, expires_at, False

    async def _sign(
        self, key: Hashable, ttl_seconds: int, make: Callable[[float], Awaitable[str]]
    ) -> tuple[str, float]:
        now = float(math.floor(self._clock()))  # X-Goog-Date has whole seconds: expiry must not be later
        url = await make(now)
        entries = self._entries
        entries.pop(key, None)
        if len(entries) >= self._maxsize:
            del entries[next(iter(entries))]
        entries[key] = (url, now + ttl_seconds)
        return url, now + ttl_seconds


PROBE = b"media-gateway: can this identity sign?"


async def probe(signer: Signer) -> None:
    """Sign a fixed payload with the storage's identity, as a presigned media request would:
    SigningError (with words a person can act on) when that cannot work. Test connection, /readyz
    and `gateway check-config` ask this before any annotator does."""
    await signer.sign(PROBE)


def build_signer(credentials: Any, session: aiohttp.ClientSession, iam_endpoint: str) -> tuple[Signer, Any]:
    """The signer for a storage's credentials, and the token source it needs (None if none).

    Service-account keys sign locally; impersonated credentials sign through google-auth (which
    scopes the source credentials for IAM); anything else calls signBlob with a token scoped for
    it — the storage's own token is read-only and signBlob would refuse it.
    """
    from google.auth import impersonated_credentials
    from google.oauth2 import credentials as user_credentials
    from google.oauth2 import service_account

    from .storage.credentials import AccessTokens

    if isinstance(credentials, user_credentials.Credentials):
        raise SigningError(
            "user_credentials",
            "an authorized-user credential (gcloud auth login) belongs to a person, not a service account, and"
            " cannot sign URLs: give presign storages a service-account key, impersonation of a service"
            " account, or the gateway's own service account (Application Default Credentials)",
        )
    if isinstance(credentials, service_account.Credentials):
        return CredentialsSigner(credentials, "local"), None
    if isinstance(credentials, impersonated_credentials.Credentials):
        return CredentialsSigner(credentials, "signblob"), None
    scoped = credentials.with_scopes([CLOUD_PLATFORM_SCOPE]) if hasattr(credentials, "with_scopes") else credentials
    tokens = AccessTokens(scoped)
    email = getattr(scoped, "service_account_email", None) or getattr(scoped, "signer_email", None)
    return IamSigner(session, tokens, email or "default", iam_endpoint), (scoped, tokens)


async def resolve_identity(signer: Signer, credentials: Any, tokens: Any) -> None:
    """GCE/GKE credentials name their service account only after a first refresh."""
    if isinstance(signer, IamSigner) and signer.email in ("", "default"):
        try:
            await tokens.apply({})
        except google.auth.exceptions.GoogleAuthError as exc:
            raise SigningError(
                "no_identity", f"the signing credentials cannot get a token: {type(exc).__name__}"
            ) from None
        email = getattr(credentials, "service_account_email", None)
        if not email or email == "default":
            raise SigningError("no_identity", "the credentials name no service account to sign with")
        signer.email = email
