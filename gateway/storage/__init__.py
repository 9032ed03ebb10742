"""Storage backends behind one protocol (see base.py), built from the `[[storages]]` entries."""

from __future__ import annotations

import os

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
    "load_access_tokens",
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
    settings: Settings, session: aiohttp.ClientSession | None, env: dict[str, str] | None = None
) -> dict[str, Backend]:
    """One backend per storage id."""
    env = dict(os.environ if env is None else env)
    tokens = load_access_tokens(settings, env)
    endpoint = emulator_endpoint(env["STORAGE_EMULATOR_HOST"]) if env.get("STORAGE_EMULATOR_HOST") else PUBLIC_ENDPOINT
    backends: dict[str, Backend] = {}
    for storage in settings.storages:
        if storage.type == "local":
            assert storage.root is not None
            backends[storage.id] = LocalBackend(storage.root, settings.media.chunk_size)
        else:
            assert session is not None, "gcs storages need the upstream session"
            backends[storage.id] = GcsBackend(session, endpoint, storage.bucket, tokens[storage.id], settings.upstream)
    return backends


def load_access_tokens(settings: Settings, env: dict[str, str] | None = None) -> dict[str, AccessTokens | None]:
    """Credentials of every gcs storage, loaded once so a bad key fails at start-up, not per request.

    With STORAGE_EMULATOR_HOST set no credentials are needed (None).
    """
    env = dict(os.environ if env is None else env)
    tokens: dict[str, AccessTokens | None] = {}
    for storage in settings.storages:
        if storage.type != "gcs" or env.get("STORAGE_EMULATOR_HOST"):
            tokens[storage.id] = None
            continue
        try:
            credentials = load_credentials(storage.google_application_credentials, storage.google_project_id)
        except CredentialsError as exc:
            raise ConfigError(f"[[storages]] id={storage.id!r}.google_application_credentials: {exc}") from None
        tokens[storage.id] = AccessTokens(credentials)
    return tokens
