"""Google credentials for the GCS backend: loaded once, refreshed off the event loop, reused.

Accepts what google-auth accepts: a service-account key, an authorized-user file, an
external-account (workload identity federation) or impersonation file — given as a path or as
the JSON itself — or, when nothing is configured, Application Default Credentials (which honour
GOOGLE_APPLICATION_CREDENTIALS). Messages never include the credential's content.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.parse
from pathlib import Path
from typing import Any

import google.auth
import google.auth.exceptions
import google.auth.transport.requests

READ_ONLY_SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"
READ_WRITE_SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"  # target storages (export)


GOOGLE_UNIVERSE = "googleapis.com"  # the only universe whose storage endpoint the gateway reaches
_GOOGLE_HOST = re.compile(r"(?:[a-z0-9-]+\.)+googleapis\.com|accounts\.google\.com")
_NETLOC = re.compile(r"(?P<host>[a-z0-9.-]+)(?::443)?")  # no user info, no other port, nothing odd


class CredentialsError(ValueError):
    pass


def check_destinations(setting: str | None, allowed: tuple[str, ...]) -> None:
    """Credentials given to the API may send the gateway nowhere but to Google (or to endpoints
    the operator lists in `[upstream] allowed_credential_endpoints`): google-auth posts a signed
    assertion to a key's `token_uri` on every refresh, so a key naming an internal address would
    make the gateway a blind request forger. Every URL in the JSON counts, followed today or not,
    and `universe_domain` must be Google's; checked before anything is loaded or sent. The config
    file is the operator's own and is not checked.

    The error names the field, never its value (credentials are never echoed)."""
    if not setting:
        return  # Application Default Credentials: the operator's
    try:
        info = json.loads(setting)
    except ValueError:
        raise CredentialsError("inline credentials are not valid JSON") from None
    for field, value in _string_fields(info, ""):
        name = field.rsplit(".", 1)[-1]
        if name == "universe_domain":
            if value != GOOGLE_UNIVERSE:
                raise CredentialsError(f"{field}: only Google's universe ({GOOGLE_UNIVERSE}) can be used")
            continue
        is_url = bool(value) and ("://" in value or name.endswith(("_uri", "_url")))
        if is_url and value not in allowed and not _google_endpoint(value):
            raise CredentialsError(
                f"{field}: not a Google endpoint (https://*.googleapis.com, https://accounts.google.com) "
                "nor one listed in [upstream].allowed_credential_endpoints"
            )


def _google_endpoint(url: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return False
    netloc = _NETLOC.fullmatch(parts.netloc.lower())
    return parts.scheme == "https" and netloc is not None and _GOOGLE_HOST.fullmatch(netloc["host"]) is not None


def _string_fields(value: Any, path: str) -> list[tuple[str, str]]:
    """(dotted path, string) for every string in a JSON value, keys included in the path."""
    if isinstance(value, str):
        return [(path or "(the credentials)", value)]
    if isinstance(value, dict):
        return [pair for key, item in value.items() for pair in _string_fields(item, f"{path}.{key}" if path else key)]
    if isinstance(value, list):
        return [pair for index, item in enumerate(value) for pair in _string_fields(item, f"{path}[{index}]")]
    return []


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
