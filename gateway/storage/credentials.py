"""Google credentials for the GCS backend: loaded once, refreshed off the event loop, reused.

Accepts what google-auth accepts: a service-account key, an authorized-user file, an
external-account (workload identity federation) or impersonation file — given as a path or as
the JSON itself — or, when nothing is configured, Application Default Credentials (which honour
GOOGLE_APPLICATION_CREDENTIALS). Messages never include the credential's content.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import google.auth
import google.auth.exceptions
import google.auth.transport.requests

READ_ONLY_SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"
READ_WRITE_SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"  # target storages (export)


class CredentialsError(ValueError):
    pass


def load_credentials(
    setting: str | None, project_id: str | None = None, scopes: tuple[str, ...] = (READ_ONLY_SCOPE,)
) -> Any:
    """google-auth credentials from a path, inline JSON, or Application Default Credentials.

    `project_id` (the storage's `google_project_id`) becomes the quota project billed for
    requests, as Label Studio's field of that name does.
    """
    try:
        if setting:
            info = _read_info(setting)
            if info.get("type") == "external_account":
                credentials = _external_account(info, scopes)
            else:
                credentials, _ = google.auth.load_credentials_from_dict(info, scopes=list(scopes))
        else:
            credentials, _ = google.auth.default(scopes=list(scopes))
    except (google.auth.exceptions.DefaultCredentialsError, ValueError) as exc:
        # google-auth's messages name files and types, never key material.
        raise CredentialsError(str(exc).splitlines()[0]) from None
    if project_id and hasattr(credentials, "with_quota_project"):
        credentials = credentials.with_quota_project(project_id)
    return credentials


def _read_info(setting: str) -> dict[str, Any]:
    """The credential JSON, given inline or as a path."""
    inline = setting.lstrip().startswith("{")
    # The value may be key material given the wrong way (base64, a JSON list …): never echo it
    # unless it is plausibly a path.
    plausible_path = not inline and len(setting) < 1024 and "\n" not in setting
    try:
        info = json.loads(setting) if inline else json.loads(Path(setting).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        if inline:
            raise CredentialsError("inline credentials are not valid JSON") from None
        if plausible_path and isinstance(exc, OSError):
            raise CredentialsError(f"cannot read {setting}: {exc.strerror}") from None
        if plausible_path:
            raise CredentialsError(f"{setting} is not a JSON key file") from None
        raise CredentialsError(
            f"neither a readable JSON key file nor a JSON object ({len(setting)} characters)"
        ) from None
    if not isinstance(info, dict):
        raise CredentialsError("credentials must be a JSON object")
    return info


def _external_account(info: dict[str, Any], scopes: tuple[str, ...]) -> Any:
    """Workload identity federation, built without google-auth's start-up project lookup (a network call)."""
    if info.get("subject_token_type") == "urn:ietf:params:aws:token-type:aws4_request":
        from google.auth import aws as kind
    elif (info.get("credential_source") or {}).get("executable"):
        from google.auth import pluggable as kind  # type: ignore[no-redef]
    else:
        from google.auth import identity_pool as kind  # type: ignore[no-redef]
    return kind.Credentials.from_info(info, scopes=list(scopes))


class AccessTokens:
    """Authorization headers from a token refreshed before it expires, one refresh at a time."""

    def __init__(self, credentials: Any) -> None:
        self._credentials = credentials
        self._lock = asyncio.Lock()
        self._request = google.auth.transport.requests.Request()

    async def apply(self, headers: dict[str, str]) -> None:
        """Set `Authorization` (and `x-goog-user-project` for a quota project) on `headers`."""
        if not self._credentials.valid:
            async with self._lock:
                if not self._credentials.valid:
                    await asyncio.to_thread(self._credentials.refresh, self._request)
        self._credentials.apply(headers)
