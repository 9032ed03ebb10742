"""Sampled correctness checks with a plain HTTP client, before and after every scenario.

Each check fetches through one target and compares status, Content-Length (and Content-Range)
and an md5 of the body with the seeded object's bytes. Bodies are streamed and hashed, never
kept. A failed check marks that target's figures in the scenario as FAILED.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .objects import SeededObject
from .procs import HOST

_READ = 1 << 20


@dataclass
class Check:
    scenario: str
    phase: str  # "before", "after", "during"
    target: str
    what: str
    ok: bool
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("scenario", "phase", "target", "what", "ok", "detail")}


@dataclass
class Fetched:
    status: int
    headers: dict[str, str]
    length: int
    md5: str
    sha256: str
    seconds: float


def fetch(
    port: int,
    path: str,
    headers: dict[str, str] | None = None,
    *,
    sha256: bool = False,  # sha256 instead of md5
    progress: Callable[[int], None] | None = None,
    timeout: float = 120.0,
) -> Fetched:
    """GET and hash the body as it streams (bounded by the socket timeout per read)."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        md5 = hashlib.md5() if not sha256 else None  # one hash per fetch: the client must not be the bottleneck
        digest = hashlib.sha256() if sha256 else None
        buffer = bytearray(_READ)
        view = memoryview(buffer)
        length = 0
        while True:
            n = response.readinto(buffer)
            if not n:
                break
            if md5 is not None:
                md5.update(view[:n])
            if digest is not None:
                digest.update(view[:n])
            length += n
            if progress is not None:
                progress(length)
        return Fetched(
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            length,
            md5.hexdigest() if md5 is not None else "",
            digest.hexdigest() if digest is not None else "",
            time.perf_counter() - started,
        )
    finally:
        connection.close()


def _result(scenario: str, phase: str, target: str, what: str, problems: list[str]) -> Check:
    return Check(scenario, phase, target, what, not problems, "; ".join(problems))


def _guarded(scenario: str, phase: str, target: str, what: str, body: Callable[[], list[str]]) -> Check:
    try:
        return _result(scenario, phase, target, what, body())
    except (OSError, http.client.HTTPException) as exc:
        return _result(scenario, phase, target, what, [f"{type(exc).__name__}: {exc}"])


def _body_problems(got: Fetched, status: int, length: int, md5: str) -> list[str]:
    """Status, declared and received length, and body checksum of one sampled response."""
    problems = []
    if got.status != status:
        problems.append(f"status {got.status}, expected {status}")
    if got.headers.get("content-length") != str(length) or got.length != length:
        problems.append(f"Content-Length {got.headers.get('content-length')}, {got.length} bytes read")
    if got.md5 != md5:
        problems.append("body md5 differs from the seeded bytes")
    return problems


def check_range(
    scenario: str, phase: str, target: str, port: int, path: str, headers: dict[str, str], obj: SeededObject, first: int
) -> Check:
    span = 65536
    last = min(first + span - 1, obj.size - 1)

    def body() -> list[str]:
        got = fetch(port, path, {**headers, "Range": f"bytes={first}-{last}"})
        problems = _body_problems(got, 206, last - first + 1, hashlib.md5(obj.slice(first, last)).hexdigest())
        if got.headers.get("content-range") != f"bytes {first}-{last}/{obj.size}":
            problems.append(f"Content-Range {got.headers.get('content-range')!r}")
        return problems

    return _guarded(scenario, phase, target, f"range {first}-{last} of {obj.key}", body)


def check_whole(
    scenario: str, phase: str, target: str, port: int, path: str, headers: dict[str, str], obj: SeededObject
) -> Check:
    def body() -> list[str]:
        return _body_problems(fetch(port, path, headers), 200, obj.size, obj.md5)

    return _guarded(scenario, phase, target, f"whole {obj.key}", body)


def check_not_modified(
    scenario: str, phase: str, target: str, port: int, path: str, headers: dict[str, str], etag: str
) -> Check:
    def body() -> list[str]:
        got = fetch(port, path, {**headers, "If-None-Match": etag})
        problems = []
        if got.status != 304:
            problems.append(f"status {got.status}, expected 304")
        if got.length:
            problems.append(f"{got.length} body bytes on a 304")
        if got.headers.get("etag") != etag:
            problems.append(f"ETag {got.headers.get('etag')!r}, expected {etag!r}")
        return problems

    return _guarded(scenario, phase, target, "If-None-Match revalidation", body)


def check_small_body(
    scenario: str, phase: str, target: str, port: int, path: str, headers: dict[str, str], expected: bytes
) -> Check:
    def body() -> list[str]:
        got = fetch(port, path, headers)
        problems = []
        if got.status != 200:
            problems.append(f"status {got.status}, expected 200")
        if got.length != len(expected) or got.md5 != hashlib.md5(expected).hexdigest():
            problems.append(f"{got.length}-byte body differs from the expected {len(expected)} bytes")
        return problems

    return _guarded(scenario, phase, target, "fixed small body", body)


def check_redirect(
    scenario: str,
    phase: str,
    target: str,
    port: int,
    path: str,
    headers: dict[str, str],
    obj: SeededObject,
    storage_url: str,
) -> tuple[Check, Fetched | None]:
    """A signed-URL redirect: 303, a signed `Location` on the storage (`storage_url`, e.g. the
    emulator's http://host:port) without the bearer token, a positive private max-age; following
    the Location with a plain GET (no Authorization) returns the object's exact bytes.

    Returns the check and the redirect response (None when it could not be fetched).
    """
    fetched: list[Fetched] = []

    def body() -> list[str]:
        got = fetch(port, path, headers)  # http.client never follows redirects
        fetched.append(got)
        location = got.headers.get("location", "")
        problems = []
        if got.status != 303:
            problems.append(f"status {got.status}, expected 303")
        prefix = f"{storage_url.rstrip('/')}/{obj.bucket}/"
        if not location.startswith(prefix):
            problems.append(f"Location {location[:120]!r} does not start with {prefix!r}")
        if "X-Goog-Signature=" not in location:
            problems.append("Location carries no X-Goog-Signature")
        token = headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if token and token in location:
            problems.append("the bearer token appears in the Location")
        cache_control = got.headers.get("cache-control", "")
        match = re.fullmatch(r"private, max-age=(\d+)", cache_control)
        if match is None or int(match.group(1)) <= 0:
            problems.append(f"Cache-Control {cache_control!r}, expected 'private, max-age=N' with N > 0")
        if problems:
            return problems
        parts = urlsplit(location)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            return [f"cannot follow Location {location[:120]!r} (plain http with a port expected)"]
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        try:
            connection.request("GET", f"{parts.path}?{parts.query}")
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        if response.status != 200:
            problems.append(f"following the Location: status {response.status}, expected 200: {data[:200]!r}")
        elif len(data) != obj.size or hashlib.md5(data).hexdigest() != obj.md5:
            problems.append(f"following the Location: {len(data)} bytes, md5 differs from the seeded object")
        return problems

    check = _guarded(scenario, phase, target, f"signed-URL redirect to {obj.key}", body)
    return check, (fetched[0] if fetched else None)
