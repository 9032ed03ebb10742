"""Answers as both lanes write them: one JSON error body, one refusal rule, one response head.

Every field of a response head the gateway writes comes from `head_fields`, and the fast lane
turns it into bytes with `encode_head`, under the rule aiohttp's writer applies (UTF-8, no CR or
LF); so the lanes cannot disagree on a header, only on the `Date` each stamps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from .. import metrics
from ..errors import Refused
from ..storage.base import StorageError

SEE_OTHER = b"See Other\n"
SERVER = "media-gateway"  # the product without versions, which only help attackers
JSON_TYPE = "application/json; charset=utf-8"
_BEARER_REALM = 'Bearer realm="media-gateway"'
_REASONS = {status.value: status.phrase for status in HTTPStatus}
_BODILESS = (204, 304)  # statuses without Content-Length (as aiohttp writes them)


@dataclass(frozen=True, slots=True)
class Answer:
    """A complete answer whose body (if any) is already known: a refusal, a 303, a 304, a HEAD,
    412 or 416. `length`: the Content-Length to announce (a HEAD announces its GET's)."""

    status: int
    headers: dict[str, str]
    body: bytes
    length: int
    mode: str  # the metrics' mode label: "proxy" or "presign"
    sub: str | None
    error: str | None = None  # the reason code of a refusal, for the access log


def error_answer(
    status: int,
    reason: str,
    message: str,
    headers: dict[str, str] | None = None,
    *,
    details: dict[str, Any] | None = None,
    sub: str | None = None,
) -> Answer:
    """The gateway's JSON error: `{"error": reason, "message": …}` plus details; a 401 carries the
    RFC 6750 challenge."""
    body = json.dumps({"error": reason, "message": message, **(details or {})}).encode()
    fields = dict(headers or {})
    if status == 401:
        fields["WWW-Authenticate"] = _challenge(reason, message)
    fields["Content-Type"] = JSON_TYPE
    return Answer(status, fields, body, len(body), "proxy", sub, reason)


def refusal_answer(exc: Refused, sub: str | None = None) -> Answer:
    """A refusal, counted as an authentication failure when it is one (401, 403)."""
    if exc.status in (401, 403):
        metrics.AUTH_FAILURES.labels(exc.reason).inc()
    return error_answer(exc.status, exc.reason, exc.message, exc.headers, details=exc.details, sub=sub)


def storage_error_answer(exc: StorageError, sub: str | None = None) -> Answer:
    """Storage failed or refused (its status: 404, 502, 503, 504), in words fit for the client."""
    return error_answer(exc.status, exc.reason, exc.public_message or str(exc), sub=sub)


def registry_answer() -> Answer:
    return error_answer(503, "registry_unavailable", "the task registry cannot be reached; retry")


def _challenge(reason: str, message: str) -> str:
    """A missing token is `invalid_request` (a required parameter is absent), every other failure
    `invalid_token`. The description is our own text, quoted safely."""
    code = "invalid_request" if reason == "missing_token" else "invalid_token"
    description = message.replace("\\", "").replace('"', "'")
    return f'{_BEARER_REALM}, error="{code}", error_description="{description}"'


def head_fields(
    status: int, headers: dict[str, str], length: int, request_id: str, extra: dict[str, str] | None
) -> dict[str, str]:
    """Every field of a media answer's head but `Date`, in the order written: the answer's own,
    Content-Length, the CORS fields (`extra`), Server and X-Request-ID."""
    fields = dict(headers)
    if status not in _BODILESS:
        fields["Content-Length"] = str(length)
    if extra:
        fields.update(extra)
    fields["Server"] = SERVER
    fields["X-Request-ID"] = request_id
    return fields


def encode_head(status: int, fields: dict[str, str], date: str) -> bytes:
    """HTTP/1.1 head bytes under aiohttp's writer rule: UTF-8, and ValueError for CR or LF in a
    name or value (nothing the core builds has one: metadata is made safe when cached)."""
    lines = "".join([f"{name}: {value}\r\n" for name, value in fields.items()])
    if lines.count("\r") != len(fields) or lines.count("\n") != len(fields):
        raise ValueError("a line break inside a header field")
    return f"HTTP/1.1 {status} {_REASONS[status]}\r\n{lines}Date: {date}\r\n\r\n".encode()
