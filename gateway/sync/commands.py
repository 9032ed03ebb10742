"""`gateway sync` (one sync in the foreground, with a progress bar) and `gateway worker`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

from ..catalog import StorageCatalog
from ..config import ConfigError, Settings
from ..registry import open_registry
from ..storage import StorageError, client_session
from ..vault import Vault
from .engine import preview
from .worker import SyncWorker

_SHOWN_ERRORS = 10


@contextlib.asynccontextmanager
async def opened_catalog(settings: Settings) -> AsyncIterator[StorageCatalog]:
    registry = open_registry(settings.registry.url, create=False)  # after the start-up's check (gateway/cli.py)
    session = client_session(settings)
    catalog = StorageCatalog(settings, registry, Vault(settings.registry.encryption_keys))
    try:
        await catalog.start(session)
        yield catalog
    finally:
        await catalog.close()
        await session.close()
        await registry.close()


async def sync_command(settings: Settings, storage_ids: list[str], preview_only: bool) -> int:
    """Sync the named storages (default: all) one after the other; 0 when all completed cleanly."""
    async with opened_catalog(settings) as catalog:
        storages = catalog.all() if not storage_ids else [catalog.get(s) for s in storage_ids]
        for storage_id, storage in zip(storage_ids, storages, strict=False):
            if storage is None:
                raise ConfigError(f"STORAGE_ID: no storage {storage_id!r} (see `gateway sync --help`)")
        if not storages:
            raise ConfigError("no storages to sync: declare [[storages]] or create one through the API")
        if preview_only:
            for storage in storages:
                try:
                    answer = await preview(storage, catalog.backend(storage))
                except StorageError as exc:
                    print(f"gateway: storage {storage.id}: {exc.public_message or exc}", file=sys.stderr)
                    return 1
                print(json.dumps({"storage": storage.id, **answer}, indent=2))
            return 0
        worker = SyncWorker(catalog, name=f"cli:{socket.gethostname()}:{os.getpid()}")
        outcome = 0
        for storage in storages:
            job = await _run_or_follow(worker, storage.id)
            outcome |= _report(storage.id, job)
        return outcome


async def _run_or_follow(worker: SyncWorker, storage_id: str) -> dict[str, Any]:
    from tqdm import tqdm

    registry = worker.registry
    queued, _ = await registry.enqueue_job(storage_id)
    with tqdm(desc=f"sync {storage_id}", unit=" objects", file=sys.stderr, disable=None, dynamic_ncols=True) as bar:

        def show(counters: dict[str, int]) -> None:
            bar.n = counters["listed"]
            bar.set_postfix(
                {k: counters[k] for k in ("created", "updated", "removed", "skipped", "errors")}, refresh=False
            )
            bar.refresh()

        settings = worker.settings
        while True:
            claimed = await registry.claim_job(worker.name, storage_id)
            if claimed is not None:
                return await worker.run_job(claimed, listener=lambda progress: show(progress.counters))
            # Running in another worker: follow it to its end, or take it over if that worker
            # stopped heart-beating (no worker may be running to notice).
            job = await registry.get_job(queued["id"])
            if job is None or job["status"] not in ("queued", "running"):
                return job or queued
            show(job["counters"])
            await asyncio.sleep(0.5)
            await registry.requeue_stale(settings.stale_after, settings.max_attempts)


def _report(storage_id: str, job: dict[str, Any]) -> int:
    counters = job["counters"]
    took = ""
    if job.get("started_at") and job.get("finished_at"):
        took = f" in {job['finished_at'] - job['started_at']:.1f} s"
    summary = ", ".join(f"{name} {counters[name]}" for name in counters)
    print(f"storage {storage_id}: job {job['id']} {job['status']}{took}: {summary}", flush=True)
    if job.get("message"):
        print(f"  {job['message']}", flush=True)
    for error in job["errors"][:_SHOWN_ERRORS]:
        print(f"  error: {error}", file=sys.stderr)
    if counters["errors"] > _SHOWN_ERRORS:
        print(f"  … {counters['errors'] - _SHOWN_ERRORS} more errors", file=sys.stderr)
    return 0 if job["status"] == "completed" else 1


async def worker_command(settings: Settings, metrics_port: int | None = None) -> int:
    """Run the sync and export workers until SIGTERM or SIGINT (the `worker` settings only tell
    `gateway serve` whether to run them); a running job goes back to the queue.

    With `metrics_port`, /metrics is served too: a worker's sync and export figures exist only in
    its process, so without it they would be missing from Prometheus."""
    from aiohttp import web

    from .. import metrics

    async def exposition(_request: web.Request) -> web.Response:
        body, content_type = metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async with contextlib.AsyncExitStack() as stack:
        if metrics_port is not None:
            app = web.Application()
            app.router.add_get("/metrics", exposition)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            await web.TCPSite(runner, settings.server.host, metrics_port).start()
        return await _work(settings)


async def _work(settings: Settings) -> int:
    from ..export.worker import ExportWorker

    async with opened_catalog(settings) as catalog:
        worker = SyncWorker(catalog)
        main = asyncio.create_task(worker.run())
        exporter = ExportWorker(catalog)
        exporting = asyncio.create_task(exporter.run())
        refresher = asyncio.create_task(catalog.run())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        refresher.cancel()
        await exporter.stop(exporting)
        await worker.stop(main)
        with contextlib.suppress(asyncio.CancelledError):
            await refresher
    return 0
