"""The one refusal type handlers raise; app.error_middleware turns it into a JSON answer."""

from __future__ import annotations

from typing import Any


class Refused(Exception):
    """An HTTP status, a stable reason code (for clients and metrics) and a sentence."""

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message
        self.details = details  # more members of the JSON answer (e.g. validation_errors)
        self.headers = headers  # e.g. Retry-After


def unauthorized(reason: str, message: str) -> Refused:
    return Refused(401, reason, message)


def forbidden(reason: str, message: str) -> Refused:
    return Refused(403, reason, message)
