"""Storage backends behind one protocol (see base.py), built from the `[[storages]]` entries."""

from __future__ import annotations

import os
from typing import Any

import aiohttp

from ..config import ConfigError, Settings
from .base import Backend, ObjectMeta, ObjectReader, StorageError
from .credentials import AccessTokens, CredentialsError, load_credentials
from .gcs import PUBLIC_ENDPOINT, GcsBackend, emulator_endpoint
from .local import LocalBackend

__all__ = [
    "Backend",
    "ObjectMeta",
    "ObjectReader",
    "StorageError",
    "build_backends",
    "client_session",
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


def build_backends(
    settings: Settings,
    session: aiohttp.ClientSession | None,
    credentials: dict[str, Any],
    env: dict[str, str] | None = None,
) -> dict[str, Backend]:
    """One backend per storage id; `credentials` from `load_storage_credentials`."""
    env = dict(os.environ if env is None else env)
    emulator = env.get("STORAGE_EMULATOR_HOST")
    endpoint = storage_endpoint(env)
    backends: dict[str, Backend] = {}
    for storage in settings.storages:
        if storage.type == "local":
            assert storage.root is not None
            backends[storage.id] = LocalBackend(storage.root, settings.media.chunk_size)
        else:
            assert session is not None, "gcs storages need the upstream session"
            tokens = None if emulator else AccessTokens(credentials[storage.id])
            backends[storage.id] = GcsBackend(session, endpoint, storage.bucket, tokens, settings.upstream)
    return backends


def storage_endpoint(env: dict[str, str]) -> str:
    """Where GCS is: the public endpoint, or STORAGE_EMULATOR_HOST as Google's libraries read it."""
    emulator = env.get("STORAGE_EMULATOR_HOST")
    return emulator_endpoint(emulator) if emulator else PUBLIC_ENDPOINT


def load_storage_credentials(settings: Settings, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Credentials of every gcs storage, loaded once so a bad key fails at start-up, not per request.

    With STORAGE_EMULATOR_HOST set the API needs none, but a presign storage still needs an
    identity to sign with.
    """
    env = dict(os.environ if env is None else env)
    emulator = bool(env.get("STORAGE_EMULATOR_HOST"))
    loaded: dict[str, Any] = {}
    for storage in settings.storages:
        if storage.type != "gcs" or (emulator and not storage.presign):
            continue
        try:
            loaded[storage.id] = load_credentials(storage.google_application_credentials, storage.google_project_id)
        except CredentialsError as exc:
            raise ConfigError(f"[[storages]] id={storage.id!r}.google_application_credentials: {exc}") from None
    return loaded
