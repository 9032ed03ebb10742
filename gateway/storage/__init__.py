"""Storage backends behind one protocol (see base.py), built from the `[[storages]]` entries."""

from __future__ import annotations

import os
from typing import Any

import aiohttp

from ..config import ConfigError, Settings, StorageSettings
from .base import (
    Backend,
    BucketNotFound,
    InvalidObjectKey,
    ListedObject,
    ObjectMeta,
    ObjectReader,
    StorageError,
    UpstreamDenied,
    Writer,
)
from .credentials import READ_ONLY_SCOPE, READ_WRITE_SCOPE, AccessTokens, CredentialsError, load_credentials
from .gcs import PUBLIC_ENDPOINT, GcsBackend, emulator_endpoint
from .local import LocalBackend

__all__ = [
    "Backend",
    "BucketNotFound",
    "CredentialsError",
    "InvalidObjectKey",
    "ListedObject",
    "ObjectMeta",
    "ObjectReader",
    "StorageError",
    "UpstreamDenied",
    "Writer",
    "build_backend",
    "client_session",
    "load_storage_credential",
    "load_storage_credentials",
    "storage_endpoint",
]


def client_session(settings: Settings) -> aiohttp.ClientSession:
    """The one pooled upstream session: no automatic decompression, no total-time cap."""
    upstream = settings.upstream
    connector = aiohttp.TCPConnector(limit=upstream.pool_size, limit_per_host=upstream.pool_size, ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=upstream.connect_timeout, sock_read=upstream.idle_timeout)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        raise_for_status=False,
        read_bufsize=upstream.buffer_size,
    )


def build_backend(
    settings: Settings,
    storage: StorageSettings,
    session: aiohttp.ClientSession | None,
    credentials: Any,
    env: dict[str, str] | None = None,
) -> Backend:
    """The backend of one storage; `credentials` from `load_storage_credential` (None: emulator)."""
    env = dict(os.environ if env is None else env)
    if storage.type == "local":
        assert storage.root is not None
        return LocalBackend(storage.root, settings.media.chunk_size)
    assert session is not None, "gcs storages need the upstream session"
    tokens = None if env.get("STORAGE_EMULATOR_HOST") else AccessTokens(credentials)
    return GcsBackend(session, storage_endpoint(env), storage.bucket, tokens, settings.upstream)


def storage_endpoint(env: dict[str, str]) -> str:
    """Where GCS is: the public endpoint, or STORAGE_EMULATOR_HOST as Google's libraries read it."""
    emulator = env.get("STORAGE_EMULATOR_HOST")
    return emulator_endpoint(emulator) if emulator else PUBLIC_ENDPOINT


def load_storage_credentials(settings: Settings, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Credentials of every gcs storage, loaded once so a bad key fails at start-up, not per request.

    With STORAGE_EMULATOR_HOST set the API needs none, but a presign storage still needs an
    identity to sign with.
    """
    loaded: dict[str, Any] = {}
    for storage in settings.storages:
        try:
            credentials = load_storage_credential(storage, env)
        except CredentialsError as exc:
            raise ConfigError(f"[[storages]] id={storage.id!r}.google_application_credentials: {exc}") from None
        if credentials is not None:
            loaded[storage.id] = credentials
    return loaded


def load_storage_credential(storage: StorageSettings, env: dict[str, str] | None = None, write: bool = False) -> Any:
    """The storage's google-auth credentials, or None where none are needed (local, emulator).

    `write`: scoped for uploads and deletes (devstorage.read_write, target storages); otherwise
    read-only.
    """
    env = dict(os.environ if env is None else env)
    if storage.type != "gcs" or (env.get("STORAGE_EMULATOR_HOST") and not storage.presign):
        return None
    scopes = (READ_WRITE_SCOPE,) if write else (READ_ONLY_SCOPE,)
    return load_credentials(storage.google_application_credentials, storage.google_project_id, scopes)
