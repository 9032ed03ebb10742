"""Google credentials for the GCS backend: loaded once, refreshed off the event loop, reused.

Accepts what google-auth accepts: a service-account key, an authorized-user file, an
external-account (workload identity federation) or impersonation file — given as a path or as
the JSON itself — or, when nothing is configured, Application Default Credentials (which honour
GOOGLE_APPLICATION_CREDENTIALS). Messages never include the credential's content.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import google.auth
import google.auth.exceptions
import google.auth.transport.requests

READ_ONLY_SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"


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
        if setting and setting.lstrip().startswith("{"):
            try:
                info = json.loads(setting)
            except json.JSONDecodeError:
                raise CredentialsError("inline credentials are not valid JSON") from None
            credentials, _ = google.auth.load_credentials_from_dict(info, scopes=list(scopes))
        elif setting:
            credentials, _ = google.auth.load_credentials_from_file(setting, scopes=list(scopes))
        else:
            credentials, _ = google.auth.default(scopes=list(scopes))
    except google.auth.exceptions.DefaultCredentialsError as exc:
        # google-auth's messages name files and types, never key material.
        raise CredentialsError(str(exc).splitlines()[0]) from None
    if project_id and hasattr(credentials, "with_quota_project"):
        credentials = credentials.with_quota_project(project_id)
    return credentials


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
