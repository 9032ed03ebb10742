"""Every storage the gateway knows: those of the config file and those created through the API,
sources (media and import) and targets (annotation export) alike.

Config-file storages are fixed at start-up (a bad one stops the gateway). API storages live in
the registry; each process reloads them every `[registry] storage_refresh` seconds and at once
after its own API changes, so a storage created through one replica is served by all of them
shortly after. Media requests and the export worker only read the in-memory snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from .config import ConfigError, ExportStorageSettings, Settings, StorageSettings
from .registry import RegistryUnavailable
from .registry.sql import SqlTaskRegistry
from .signer import Signer, SigningError, build_signer, resolve_identity
from .storage import Backend, StorageError, build_backend, load_storage_credential
from .storage.credentials import CredentialsError, check_destinations
from .vault import Vault, VaultError

log = logging.getLogger("gateway.catalog")
RETRY_BROKEN = 30.0  # seconds between attempts to build an API storage that could not be used


AnyStorage = StorageSettings | ExportStorageSettings


class StorageUnavailable(StorageError):
    status = 503
    reason = "storage_unavailable"
    public_message = "the storage cannot be used right now (see the storage's status)"


def storage_from_row(row: dict[str, Any], vault: Vault) -> StorageSettings:
    """An API storage row as settings; the credentials are decrypted here and nowhere else."""
    credentials = vault.open(row["credentials"]) if row.get("credentials") else None
    return StorageSettings(
        id=str(row["id"]),
        project=row["project"],
        type="gcs",
        bucket=row["bucket"],
        prefix=row["prefix"],
        presign=row["presign"],
        presign_ttl=row["presign_ttl"],
        google_application_credentials=credentials,
        google_project_id=row["google_project_id"],
        title=row["title"],
        description=row["description"],
        regex_filter=row["regex_filter"],
        use_blob_urls=row["use_blob_urls"],
        recursive_scan=row["recursive_scan"],
        data_key=row["data_key"],
        sync_interval=row["sync_interval"],
        client_allowlist=tuple(row["client_allowlist"] or ()),
    )


def target_from_row(row: dict[str, Any], vault: Vault) -> ExportStorageSettings:
    """An API target storage row as settings; the credentials are decrypted here and nowhere else."""
    credentials = vault.open(row["credentials"]) if row.get("credentials") else None
    return ExportStorageSettings(
        id=str(row["id"]),
        project=row["project"],
        type="gcs",
        bucket=row["bucket"],
        prefix=row["prefix"],
        can_delete_objects=row["can_delete_objects"],
        json_extension=row["json_extension"],
        layout=row["layout"],
        google_application_credentials=credentials,
        google_project_id=row["google_project_id"],
        title=row["title"],
        description=row["description"],
    )


class Shelf:
    """One kind of storage: config-file ones fixed, API ones as the registry last had them, each
    with its backend (and signer), or with the problem that keeps it from being used."""

    def __init__(self, kind: str, config: list[AnyStorage], from_row: Callable[[dict[str, Any], Vault], Any]) -> None:
        self.kind = kind  # "source" or "export", as the registry names the tables
        self.config: dict[str, AnyStorage] = {s.id: s for s in config}
        self.from_row = from_row
        self.api: dict[str, tuple[float, AnyStorage]] = {}  # id -> (updated_at, settings)
        self.backends: dict[str, Backend] = {}
        self.signers: dict[str, Signer] = {}
        self.problems: dict[str, str] = {}  # API storage id -> why it cannot be used
        self.retry_at: dict[str, float] = {}  # API storage id -> when to try a broken one again
        self.by_project: dict[str, tuple[Any, ...]] = {}
        self.index()

    def install(self, storage_id: str, backend: Backend, signer: Signer | None) -> None:
        self.backends[storage_id] = backend
        if signer is None:
            self.signers.pop(storage_id, None)
        else:
            self.signers[storage_id] = signer

    def forget(self, storage_id: str) -> None:
        self.api.pop(storage_id, None)
        self.backends.pop(storage_id, None)
        self.signers.pop(storage_id, None)
        self.problems.pop(storage_id, None)
        self.retry_at.pop(storage_id, None)

    def index(self) -> None:
        by_project: dict[str, list[Any]] = {}
        for storage in self.all():
            by_project.setdefault(storage.project, []).append(storage)
        self.by_project = {project: tuple(storages) for project, storages in by_project.items()}

    def all(self) -> list[Any]:
        """Config-file storages in file order, then API storages by id (a stable order)."""
        api = sorted(self.api.items(), key=lambda item: int(item[0]))
        return [*self.config.values(), *(storage for _, (_, storage) in api)]

    def get(self, storage_id: str) -> Any:
        storage = self.config.get(storage_id)
        if storage is None and storage_id in self.api:
            storage = self.api[storage_id][1]
        return storage

    def backend(self, storage: AnyStorage) -> Backend:
        backend = self.backends.get(storage.id)
        if backend is None:
            raise StorageUnavailable(self.problems.get(storage.id, "storage not ready"))
        return backend


class StorageCatalog:
    """Source storages (`get`, `backend`, `signers`, … answer for them) and target storages
    (`targets`), kept alike."""

    def __init__(self, settings: Settings, registry: SqlTaskRegistry, vault: Vault) -> None:
        self.settings = settings
        self.registry = registry
        self.vault = vault
        self.sources = Shelf("source", list(settings.storages), storage_from_row)
        self.targets = Shelf("export", list(settings.export_storages), target_from_row)
        self.signers = self.sources.signers
        self.problems = self.sources.problems
        self._session: aiohttp.ClientSession | None = None
        self._env = dict(os.environ)
        self._lock = asyncio.Lock()

    @property
    def session(self) -> aiohttp.ClientSession | None:
        return self._session

    async def start(self, session: aiohttp.ClientSession | None) -> None:
        """Backends and signers of the config storages (errors stop start-up), then API ones."""
        self._session = session
        for shelf, table in ((self.sources, "[[storages]]"), (self.targets, "[[export_storages]]")):
            for storage in shelf.config.values():
                try:
                    shelf.install(storage.id, *await self._build(storage))
                except (CredentialsError, SigningError) as exc:
                    field = "presign" if isinstance(exc, SigningError) else "google_application_credentials"
                    raise ConfigError(f"{table} id={storage.id!r}.{field}: {exc}") from None
        await self.refresh()

    async def _build(self, storage: AnyStorage) -> tuple[Backend, Signer | None]:
        """The storage's backend and (presign) signer; nothing is installed yet. Target storages
        get credentials scoped for writing."""
        write = isinstance(storage, ExportStorageSettings)
        credentials = await asyncio.to_thread(load_storage_credential, storage, self._env, write)  # type: ignore[arg-type]
        backend = build_backend(self.settings, storage, self._session, credentials, self._env)  # type: ignore[arg-type]
        signer = None
        if storage.presign:
            assert self._session is not None
            signer, token_source = build_signer(credentials, self._session, self.settings.upstream.iam_endpoint)
            if token_source is not None:
                await resolve_identity(signer, *token_source)
        return backend, signer

    async def refresh(self) -> None:
        """Reload API storages of both kinds from the registry; rebuild those that changed.

        A changed storage keeps being used with its previous settings until the new ones are
        built, then is swapped in at once. A storage that cannot be used (credentials that do not
        load or cannot be decrypted here, a signing identity that cannot be resolved) stays
        listed with its problem, without a backend — never used with other credentials — and
        is tried again every RETRY_BROKEN seconds, since the cause may be passing (IAM unreachable).
        """
        async with self._lock:
            for shelf in (self.sources, self.targets):
                await self._refresh(shelf)

    async def _refresh(self, shelf: Shelf) -> None:
        rows = {str(row["id"]): row for row in await self.registry.list_storages(shelf.kind)}
        for storage_id in set(shelf.api) - set(rows):
            shelf.forget(storage_id)
        now = time.monotonic()
        allowed = self.settings.upstream.allowed_credential_endpoints
        for storage_id, row in rows.items():
            known = shelf.api.get(storage_id)
            if (
                known is not None
                and known[0] == row["updated_at"]
                and (storage_id not in shelf.problems or now < shelf.retry_at.get(storage_id, 0.0))
            ):
                continue
            previous = shelf.problems.get(storage_id)
            try:
                storage = shelf.from_row(row, self.vault)
                # Rows written before the API checked destinations are held to the same rule.
                check_destinations(storage.google_application_credentials, allowed)
            except (VaultError, CredentialsError) as exc:
                # Shown (and deletable, editable) with the problem; unusable without its own credentials.
                shelf.forget(storage_id)
                shelf.api[storage_id] = (row["updated_at"], shelf.from_row({**row, "credentials": None}, self.vault))
                self._broken(shelf, storage_id, str(exc), previous, now)
                continue
            try:
                built = await self._build(storage)
            except (CredentialsError, SigningError, ValueError) as exc:
                shelf.forget(storage_id)
                shelf.api[storage_id] = (row["updated_at"], storage)
                self._broken(shelf, storage_id, str(exc), previous, now)
                continue
            shelf.forget(storage_id)
            shelf.api[storage_id] = (row["updated_at"], storage)
            shelf.install(storage_id, *built)
        shelf.index()

    @staticmethod
    def _broken(shelf: Shelf, storage_id: str, problem: str, previous: str | None, now: float) -> None:
        shelf.problems[storage_id] = problem
        shelf.retry_at[storage_id] = now + RETRY_BROKEN
        if problem != previous:  # once per problem, not at every retry
            kind = "target storage" if shelf.kind == "export" else "storage"
            log.warning("%s %s cannot be used: %s", kind, storage_id, problem)

    async def run(self, on_tasks_changed: Callable[[], None] | None = None) -> None:
        """Reload periodically until cancelled; a registry outage only delays the next reload.

        `on_tasks_changed` is called when a sync finished anywhere since the last look (syncs
        update and remove tasks: the media path's task cache must not keep serving them).
        """
        seen = await self._last_sync_finished() if on_tasks_changed else None
        while True:
            await asyncio.sleep(self.settings.registry.storage_refresh)
            try:
                await self.refresh()
                if on_tasks_changed is not None:
                    latest = await self._last_sync_finished()
                    if latest != seen:
                        seen = latest
                        on_tasks_changed()
            except RegistryUnavailable:
                pass  # keep serving the last snapshot; the registry logs the outage once
            except Exception as exc:  # keep serving the last snapshot
                log.warning("storage refresh failed: %s", type(exc).__name__)

    async def _last_sync_finished(self) -> int | None:
        try:
            return await self.registry.last_sync_finished()
        except Exception:  # the loop reports registry trouble
            return None

    def all(self) -> list[StorageSettings]:
        return self.sources.all()

    def storages_of(self, project: str) -> tuple[StorageSettings, ...]:
        return self.sources.by_project.get(project, ())

    def get(self, storage_id: str) -> StorageSettings | None:
        return self.sources.get(storage_id)

    def backend(self, storage: StorageSettings) -> Backend:
        return self.sources.backend(storage)

    def backends(self) -> dict[str, Backend]:
        return dict(self.sources.backends)

    async def close(self) -> None:
        for backend in (*self.sources.backends.values(), *self.targets.backends.values()):
            with contextlib.suppress(Exception):
                await backend.close()
