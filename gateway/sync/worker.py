"""The sync worker: claims queued jobs from the registry, runs them, reports progress.

Any number of workers (threads of `gateway serve`, `gateway worker` processes, replicas) share
one registry safely: a job is claimed by exactly one of them (registry.claim_job), at most one
job per storage is queued or running (a unique index), a running job heart-beats, and a job
whose worker stopped heart-beating is queued again for another worker. Storages with a
`sync_interval` are queued by whichever worker notices first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

from .. import metrics
from ..catalog import StorageCatalog
from ..config import StorageSettings
from ..keyfilter import FilterError
from ..registry import RegistryUnavailable
from ..storage import BucketNotFound, StorageError
from .engine import Progress, Sync

log = logging.getLogger("gateway.sync")


class SyncWorker:
    def __init__(
        self,
        catalog: StorageCatalog,
        *,
        on_change: Callable[[], None] | None = None,
        name: str | None = None,
    ) -> None:
        self.catalog = catalog
        self.registry = catalog.registry
        self.settings = catalog.settings.sync
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._on_change = on_change
        self._wake = asyncio.Event()
        self._jobs: set[asyncio.Task[Any]] = set()

    def wake(self) -> None:
        """Look for work now (a job was just queued in this process)."""
        self._wake.set()

    async def run(self) -> None:
        log.info("sync worker %s started", self.name)
        while True:
            try:
                await self.tick()
            except RegistryUnavailable as exc:  # the registry logs the outage once
                log.debug("sync worker: registry unavailable (%s); retrying", exc)
            except Exception:
                log.exception("sync worker: unexpected error; retrying")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.poll_interval):
                    await self._wake.wait()
            self._wake.clear()

    async def tick(self) -> None:
        """One round: re-queue jobs of dead workers, queue periodic syncs, claim what fits."""
        for job_id in await self.registry.requeue_stale(self.settings.stale_after, self.settings.max_attempts):
            log.warning("sync job %s lost its worker; queued again (or failed after too many attempts)", job_id)
        await self._queue_periodic()
        while len(self._jobs) < self.settings.concurrency:
            # Jobs of storages this process cannot use now (credentials it cannot decrypt or load)
            # are left to a worker that can, instead of failing them here.
            job = await self.registry.claim_job(self.name, skip=list(self.catalog.problems))
            if job is None:
                return
            task = asyncio.create_task(self.run_job(job))
            self._jobs.add(task)
            task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[Any]) -> None:
        self._jobs.discard(task)
        if not task.cancelled() and task.exception() is not None:  # the registry went away mid-job
            log.warning(
                "sync job ended without a result (%s); it is re-queued once stale", type(task.exception()).__name__
            )
        self._wake.set()  # room for the next job

    async def _queue_periodic(self) -> None:
        periodic = {s.id: s.sync_interval for s in self.catalog.all() if s.sync_interval > 0}
        if not periodic:
            return
        latest = await self.registry.latest_jobs(periodic)
        now = time.time()
        for storage_id, interval in periodic.items():
            job = latest.get(storage_id)
            if job is not None and job["status"] in ("queued", "running"):
                continue
            finished = (job or {}).get("last_finished")
            if finished is None or finished["finished_at"] + interval <= now:
                await self.registry.enqueue_job(storage_id)

    async def run_job(self, job: dict[str, Any], listener: Callable[[Progress], None] | None = None) -> dict[str, Any]:
        """Run a claimed job to its end and record the outcome; returns the finished job."""
        storage_id = job["storage_id"]
        storage = self.catalog.get(storage_id)
        if storage is None:  # created through another replica a moment ago?
            await self.catalog.refresh()
            storage = self.catalog.get(storage_id)
        progress = Progress(listener=listener)
        try:
            return await self._run_job(job, storage, progress)
        finally:
            counters = progress.counters
            if self._on_change is not None and (counters["created"] or counters["updated"] or counters["removed"]):
                self._on_change()  # however the job ended, the tasks it changed are changed

    async def _run_job(
        self, job: dict[str, Any], storage: StorageSettings | None, progress: Progress
    ) -> dict[str, Any]:
        job_id, storage_id = job["id"], job["storage_id"]
        status, message = "failed", None
        if storage is None:
            message = "the storage no longer exists"
        else:
            try:
                backend = self.catalog.backend(storage)
                sync = Sync(storage, backend, self.registry, self.settings, progress)
                log.info("sync job %s of storage %s started", job_id, storage_id)
                status = await self._with_heartbeat(job_id, progress, sync.run())
            except BucketNotFound as exc:
                message = f"bucket {storage.bucket!r} does not exist" if storage.type == "gcs" else str(exc)
                metrics.SYNC_ERRORS.labels("job").inc()
            except FilterError as exc:  # stored before filters ran on RE2
                message = f"regex_filter: {exc}"
                metrics.SYNC_ERRORS.labels("job").inc()
            except StorageError as exc:
                message = exc.public_message or str(exc)
                metrics.SYNC_ERRORS.labels("job").inc()
            except RegistryUnavailable:
                log.warning("sync job %s: registry unavailable; it will be re-queued", job_id)
                raise
            except asyncio.CancelledError:  # stopping: hand the job back at once
                release = asyncio.ensure_future(self.registry.release_job(job_id, self.name))
                while not release.done():  # a second cancel (stop() cancels every task) must not
                    with contextlib.suppress(asyncio.CancelledError):  # return before the hand-back
                        await asyncio.shield(release)
                if not release.cancelled() and release.exception() is not None:
                    log.warning("sync job %s: could not hand it back (%s)", job_id, release.exception())
                raise
            except Exception as exc:  # a bug, or data the registry refuses: running it again would not help
                log.exception("sync job %s of storage %s failed unexpectedly", job_id, storage_id)
                message = f"the sync failed unexpectedly ({type(exc).__name__}; see the worker's log)"
                metrics.SYNC_ERRORS.labels("job").inc()
        counters = progress.counters
        if not await self.registry.finish_job(job_id, self.name, status, counters, progress.errors, message):
            log.warning("sync job %s finished after another worker took it over", job_id)
        metrics.SYNC_JOBS.labels(status).inc()
        if storage is not None and storage.sync_interval and status != "failed":
            metrics.SYNC_LAST_SUCCESS.labels(storage.id).set(time.time())
        log.info(
            "sync job %s of storage %s %s: %s%s",
            job_id,
            storage_id,
            status,
            ", ".join(f"{k} {v}" for k, v in counters.items()),
            f" ({message})" if message else "",
        )
        return await self.registry.get_job(job_id) or job

    async def _with_heartbeat(self, job_id: int, progress: Progress, work: Any) -> str:
        """Run `work`, heart-beating meanwhile; if the job is taken away, stop working on it."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.settings.heartbeat_interval)
                if done:
                    return task.result()
                try:
                    mine = await self.registry.heartbeat(job_id, self.name, progress.counters, progress.errors)
                except RegistryUnavailable:
                    continue  # the next beat may get through; stale_after is far longer
                if not mine:
                    raise StorageError("the job was taken over by another worker (heartbeats were missed)")
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def stop(self, main: asyncio.Task[Any]) -> None:
        main.cancel()
        for task in [main, *self._jobs]:
            task.cancel()
        await asyncio.gather(main, *self._jobs, return_exceptions=True)
