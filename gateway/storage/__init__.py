"""Storage backends behind one protocol (see base.py), built from the `[[storages]]` entries."""

from __future__ import annotations

import os

import aiohttp

from ..config import ConfigError, Settings, StorageSettings
from .base import Backend, ObjectMeta, ObjectReader, StorageError
from .credentials import AccessTokens, CredentialsError, load_credentials
from .gcs import PUBLIC_ENDPOINT, GcsBackend, emulator_endpoint
from .local import LocalBackend

__all__ = ["Backend", "ObjectMeta", "ObjectReader", "StorageError", "build_backends", "client_session"]


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
        read_bufsize=settings.media.chunk_size,
    )


def build_backends(
    settings: Settings, session: aiohttp.ClientSession | None, env: dict[str, str] | None = None
) -> dict[str, Backend]:
    """One backend per storage id; credentials are loaded here, once, so errors surface at start."""
    env = dict(os.environ if env is None else env)
    backends: dict[str, Backend] = {}
    for storage in settings.storages:
        if storage.type == "local":
            assert storage.root is not None
            backends[storage.id] = LocalBackend(storage.root, settings.media.chunk_size)
        else:
            assert session is not None
            backends[storage.id] = _gcs_backend(settings, storage, session, env)
    return backends


def _gcs_backend(
    settings: Settings, storage: StorageSettings, session: aiohttp.ClientSession, env: dict[str, str]
) -> GcsBackend:
    emulator = env.get("STORAGE_EMULATOR_HOST")
    if emulator:
        return GcsBackend(session, emulator_endpoint(emulator), storage.bucket, None, settings.upstream)
    try:
        credentials = load_credentials(storage.google_application_credentials, storage.google_project_id)
    except CredentialsError as exc:
        raise ConfigError(f"[[storages]] id={storage.id!r}.google_application_credentials: {exc}") from None
    return GcsBackend(session, PUBLIC_ENDPOINT, storage.bucket, AccessTokens(credentials), settings.upstream)
