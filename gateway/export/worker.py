"""The export worker: leases pending deliveries, writes each annotation's current state as a JSON
object to its target storage (or deletes it), and records the version written.

Failures (GCS unreachable, throttling, refused credentials) are retried with exponential backoff
and never lost: the outbox row stays pending until a write succeeds. A worker that dies holding a
lease only delays its deliveries until the lease ends.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import random
import socket
import time
import uuid
from typing import Any

from .. import metrics
from ..catalog import StorageCatalog
from ..config import ExportStorageSettings
from ..registry import RegistryUnavailable
from ..registry.outbox import AnnotationState, Delivery, Outbox
from ..registry.sql import SqlTaskRegistry
from ..storage import Backend, StorageError
from .label_studio_object import LabelStudioUsers, UsersUnavailable, storage_object, task_object

log = logging.getLogger("gateway.export")
TASK_REWRITES = 4  # per-task layout: writes of one task object before leaving it to the next writer
REPORT_EVERY = 1.0  # seconds between refreshes of the outbox gauges (gateway_export_pending, …)


def object_bytes(body: dict[str, Any]) -> bytes:
    """The object's content: the annotation JSON, keys sorted so equal states are equal bytes."""
    return json.dumps(body, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()


class ExportWorker:
    def __init__(
        self, catalog: StorageCatalog, *, registry: SqlTaskRegistry | None = None, name: str | None = None
    ) -> None:
        """Target storages and their backends come from the (started) catalog: config-file ones
        and those created through the API, as the registry had them at its last refresh. The
        outbox is the catalog's registry unless another connection pool is given."""
        self.settings = catalog.settings.export
        self.catalog = catalog
        self.outbox = Outbox(registry or catalog.registry)
        self.name = name or f"export:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._wake = asyncio.Event()
        self._reported: set[str] = set()
        self._next_report = 0.0
        ls = catalog.settings.label_studio
        self.users = LabelStudioUsers(ls, lambda: catalog.session) if ls.url and ls.api_token else None

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        log.info("export worker %s started", self.name)
        while True:
            try:
                done = await self.drain_once()
                if time.monotonic() >= self._next_report:  # an aggregate over the outbox: not per batch
                    await self._report()
                    self._next_report = time.monotonic() + REPORT_EVERY
            except RegistryUnavailable as exc:  # the registry logs the outage once
                log.debug("export worker: registry unavailable (%s); retrying", exc)
                done = 0
            except Exception:
                log.exception("export worker: unexpected error; retrying")
                done = 0
            if done:
                continue  # more may be waiting
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.poll_interval):
                    await self._wake.wait()
            self._wake.clear()

    async def drain_once(self) -> int:
        """Deliver one leased batch; the number of deliveries attempted."""
        leased = await self.outbox.lease(self.name, self.settings.batch, self.settings.lease_seconds)
        gate = asyncio.Semaphore(self.settings.concurrency)

        async def one(delivery: Delivery) -> None:
            async with gate:
                # Only well inside the lease, so another worker never takes over a live upload: one
                # whose turn came too late (slow uploads ahead of it) is given back untried.
                left = delivery.lease_until - time.time() - self.settings.lease_seconds * 0.2
                if left <= 0:
                    await self.outbox.release(delivery, self.name)
                    return
                try:
                    async with asyncio.timeout(left):
                        await self._deliver(delivery)
                except RegistryUnavailable:
                    raise  # the lease ends and the delivery is retried; run() waits a little
                except Exception as exc:  # never leave a delivery leased for a bug or a timeout
                    if not isinstance(exc, TimeoutError):
                        log.exception("export of annotation %s failed unexpectedly", delivery.annotation_id)
                    reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
                    await self.outbox.failed(delivery, self.name, f"export failed: {reason}", self._retry_in(delivery))

        await asyncio.gather(*(one(d) for d in leased))
        return len(leased)

    async def _deliver(self, delivery: Delivery) -> None:
        targets = self.catalog.targets
        target = targets.get(delivery.target_id)
        if target is None and delivery.target_id.isdigit():  # created through another replica just now?
            await self.catalog.refresh()
            target = targets.get(delivery.target_id)
        if target is None:
            await self.outbox.failed(
                delivery, self.name, "the target storage is not configured", self.settings.retry_max
            )
            return
        state = await self.outbox.state(delivery.annotation_id)
        if state is None:  # cannot happen: deliveries are written with their annotation
            await self.outbox.failed(delivery, self.name, "the annotation is unknown", self.settings.retry_max)
            return
        if target.layout == "task" and state.task_id is None:
            await self.outbox.failed(delivery, self.name, "the annotation has no task", self.settings.retry_max)
            return
        operation, version = "upload", state.version
        try:
            backend = targets.backend(target)  # StorageUnavailable while its credentials cannot be used
            if target.layout == "task":
                operation, version = await self._write_task(target, backend, state, delivery.annotation_id)
            else:
                body = None
                if state.deleted or state.body is None:  # the failure metric names what was tried
                    operation = "delete" if target.can_delete_objects else "kept"
                else:
                    body = await self._label_studio_object(state.body)
                operation = await _write(target, backend, target.object_key(delivery.annotation_id), body)
        except (StorageError, UsersUnavailable) as exc:
            metrics.EXPORT_WRITES.labels(target.id, operation, "failed").inc()
            retry_in = self._retry_in(delivery)
            reason = (exc.public_message if isinstance(exc, StorageError) else None) or str(exc)
            log.warning(
                "export of annotation %s to %s failed (%s); retry in %.1f s",
                delivery.annotation_id,
                target.id,
                reason,
                retry_in,
            )
            await self.outbox.failed(delivery, self.name, f"{operation} failed: {reason}", retry_in)
            return
        metrics.EXPORT_WRITES.labels(target.id, operation, "ok").inc()
        await self.outbox.delivered(delivery, self.name, version)

    async def _write_task(
        self, target: ExportStorageSettings, backend: Backend, state: AnnotationState, annotation_id: int
    ) -> tuple[str, int]:
        """Label Studio's per-task layout: one object per task with all its annotations, written
        again while an annotation of the task changed during the write (another worker or replica
        may be writing the same object from an older read). The operation and the version of
        `annotation_id` that the object holds."""
        assert state.task_id is not None
        operation, version = "unchanged", state.version
        for _ in range(TASK_REWRITES):
            known = await self.outbox.task_annotations(state.project, state.task_id)
            live = [s.body for s in known.values() if not s.deleted and s.body is not None]
            annotations = [await self._expanded(body) for body in live]
            body = task_object(annotations) if annotations else None
            operation = await _write(target, backend, target.object_key(state.task_id), body)
            version = known[annotation_id].version if annotation_id in known else state.version
            again = await self.outbox.task_annotations(state.project, state.task_id)
            if {i: s.version for i, s in again.items()} == {i: s.version for i, s in known.items()}:
                break
        return operation, version

    async def _user(self, completed_by: Any) -> dict[str, Any] | None:
        """The annotator as Label Studio describes them, if known (already expanded, or looked up)."""
        if isinstance(completed_by, dict):
            return completed_by
        if self.users is not None and isinstance(completed_by, int) and not isinstance(completed_by, bool):
            return await self.users.get(completed_by)
        return None

    async def _expanded(self, body: dict[str, Any]) -> dict[str, Any]:
        user = await self._user(body.get("completed_by"))
        return body if user is None else {**body, "completed_by": user}

    async def _label_studio_object(self, body: dict[str, Any]) -> dict[str, Any]:
        """What Label Studio's own target storage writes; `completed_by` stays the id when no
        `[label_studio] api_token` is configured."""
        return storage_object(body, await self._user(body.get("completed_by")), dt.datetime.now(dt.UTC))

    def _retry_in(self, delivery: Delivery) -> float:
        """Exponential backoff with jitter, capped at retry_max."""
        retry_in = min(self.settings.retry_max, self.settings.retry_base * 2 ** min(delivery.attempts, 20))
        return retry_in * random.uniform(0.8, 1.2)

    async def _report(self) -> None:
        status = await self.outbox.status([t.id for t in self.catalog.targets.all()])
        for target_id, values in status.items():
            metrics.EXPORT_PENDING.labels(target_id).set(values["pending"])
            metrics.EXPORT_OLDEST.labels(target_id).set(values["oldest_pending_seconds"] or 0)
        for gone in self._reported - set(status):  # a deleted target storage
            metrics.EXPORT_PENDING.remove(gone)
            metrics.EXPORT_OLDEST.remove(gone)
        self._reported = set(status)

    async def stop(self, main: asyncio.Task[Any]) -> None:
        main.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await main


async def _write(target: ExportStorageSettings, backend: Backend, key: str, body: dict[str, Any] | None) -> str:
    """Put `body` at `key` unless the stored object already has these bytes (same MD5); None
    deletes the object when the target storage may delete, else keeps it. The operation done."""
    if body is None:
        if target.can_delete_objects:
            await backend.delete_object(key)
            return "delete"
        return "kept"
    data = object_bytes(body)
    digest = base64.b64encode(hashlib.md5(data).digest()).decode()  # GCS md5Hash, not security
    if await backend.object_md5(key) == digest:
        return "unchanged"
    await backend.put_object(key, data, "application/json")
    return "upload"
