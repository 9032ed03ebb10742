"""One sync of one source storage: list the bucket page by page, compare each page with what the
registry imported from the same key range, and write only the difference.

The listing arrives in byte order of keys, and the registry returns its imported objects of the
page's key range in the same order, so new, changed (new generation) and vanished objects are
found without holding the bucket in memory, and an unchanged bucket costs reads only. Every
write is idempotent (tasks are keyed by storage, object and row), so a sync killed at any point
and run again ends in the same state.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from .. import metrics
from ..config import StorageSettings, SyncSettings
from ..keyfilter import compile_filter
from ..registry import ImportedObject
from ..registry.sql import MAX_JOB_ERRORS, SqlTaskRegistry, empty_counters
from ..storage import Backend, ListedObject, ObjectReader, StorageError
from ..storage.base import ObjectNotFound
from .cpu import off_loop
from .parse import FileError, RowError, file_format, parse_task_file

log = logging.getLogger("gateway.sync")
FILE_CONCURRENCY = 8  # task files of one page read at once
KNOWN_CHUNK = 1000  # registry objects compared (and removed) at a time
INFLATED_PIECE = 256 * 1024  # bytes of a gzip-encoded task file inflated at a time


@dataclass
class Progress:
    """Counters and the first error messages of a sync, as its job reports them."""

    counters: dict[str, int] = field(default_factory=empty_counters)
    errors: list[str] = field(default_factory=list)
    listener: Callable[[Progress], None] | None = None

    def add(self, name: str, value: int = 1) -> None:
        if value:
            self.counters[name] += value

    def error(self, kind: str, message: str) -> None:
        self.counters["errors"] += 1
        metrics.SYNC_ERRORS.labels(kind).inc()
        if len(self.errors) < MAX_JOB_ERRORS:
            self.errors.append(message)

    def changed(self) -> None:
        if self.listener is not None:
            self.listener(self)


def selects(storage: StorageSettings) -> Callable[[str], bool]:
    """Which listed keys a storage imports: not folder markers, and `regex_filter` as Label
    Studio applies it (a match against the whole key, prefix included; empty: all), by RE2
    (gateway/keyfilter.py). Raises FilterError for a filter RE2 cannot run."""
    matches = compile_filter(storage.regex_filter)
    return lambda key: not key.endswith("/") and (matches is None or matches(key))


def blob_task(storage: StorageSettings, key: str) -> dict[str, Any]:
    return {"data": {storage.data_key: f"gs://{storage.bucket}/{key}"}}  # the URI Sync._uri indexes


class Sync:
    def __init__(
        self,
        storage: StorageSettings,
        backend: Backend,
        registry: SqlTaskRegistry,
        settings: SyncSettings,
        progress: Progress | None = None,
    ) -> None:
        self.storage, self.backend, self.registry, self.settings = storage, backend, registry, settings
        self.progress = progress or Progress()
        self._wanted = selects(storage)
        self._blob_digest = hashlib.sha256(f"{storage.bucket}\0{storage.data_key}".encode()).hexdigest()[:8]
        labels = (storage.id,)
        self._listed = metrics.SYNC_OBJECTS_LISTED.labels(*labels)
        self._tasks = {a: metrics.SYNC_TASKS.labels(storage.id, a) for a in ("created", "updated", "removed")}

    async def run(self) -> str:
        """Sync to the end; returns 'completed' or 'completed_with_errors'. A failure of the
        listing itself raises StorageError (the job then fails and a later sync resumes)."""
        started = time.perf_counter()
        storage, progress = self.storage, self.progress
        after: str | None = None  # registry rows up to this key are reconciled
        token: str | None = None
        while True:
            page, token = await self.backend.list_page(
                storage.prefix, storage.recursive_scan, token, self.settings.page_size
            )
            if token is not None and not page:
                continue  # a page of sub-folder names only
            upto = None if token is None else page[-1].key
            progress.add("listed", len(page))
            self._listed.inc(len(page))
            await self._reconcile(page, after, upto)
            progress.changed()
            if token is None:
                break
            after = upto
        metrics.SYNC_SECONDS.labels(storage.id).observe(time.perf_counter() - started)
        return "completed_with_errors" if progress.counters["errors"] else "completed"

    async def _reconcile(self, page: list[ListedObject], after: str | None, upto: str | None) -> None:
        storage, progress = self.storage, self.progress
        wanted = await off_loop(self._select, page)
        progress.add("skipped", len(page) - len(wanted))
        # The registry's objects of the key range, a chunk at a time: a range may hold any
        # number of objects gone from the bucket or the storage's scope (an emptied bucket, an
        # edited prefix), and neither memory nor a statement may grow with them.
        known: dict[str, ImportedObject] = {}
        cursor = after
        while True:
            chunk = await self.registry.imported_objects(storage.id, cursor, upto, KNOWN_CHUNK)
            known.update((o.key, o) for o in chunk if o.key in wanted)
            vanished = [o.key for o in chunk if o.key not in wanted]
            if vanished:
                self._count("removed", await self.registry.remove_objects(storage.id, vanished))
            if len(chunk) < KNOWN_CHUNK:
                break
            cursor = chunk[-1].key
        todo = [o for key, o in wanted.items() if key not in known or known[key].generation != self._stamp(o)]
        for key in sorted(set(wanted) - {o.key for o in todo}):
            if known[key].row_errors:  # unchanged, and still as broken as the last sync found it
                self.progress.error(
                    "row",
                    f"{key}: unchanged since a sync found {known[key].row_errors} bad row(s) in it; "
                    "fix the file and sync again",
                )
        if storage.use_blob_urls:
            batch = self.settings.batch_size
            for start in range(0, len(todo), batch):
                objects = [(o.key, self._stamp(o), blob_task(storage, o.key)) for o in todo[start : start + batch]]
                created, updated, removed = await self.registry.import_objects(
                    storage.id, storage.project, objects, uri_of=self._uri
                )
                self._count("created", created)
                self._count("updated", updated)
                self._count("removed", removed)
        else:
            for start in range(0, len(todo), FILE_CONCURRENCY):
                try:
                    async with asyncio.TaskGroup() as group:
                        for obj in todo[start : start + FILE_CONCURRENCY]:
                            group.create_task(self._import_file(obj))
                except ExceptionGroup as failed:  # the first failure, as a sequential import would raise it
                    raise failed.exceptions[0] from None

    def _select(self, page: list[ListedObject]) -> dict[str, ListedObject]:
        return {obj.key: obj for obj in page if self._wanted(obj.key)}

    def _uri(self, key: str) -> str:
        return f"gs://{self.storage.bucket}/{key}"

    def _stamp(self, obj: ListedObject) -> str:
        """What the registry records of an imported object: its generation, and for one task per
        object also the bucket and data key the task names, so that editing the import method or
        the data key imports the object again (the generation alone would say "unchanged")."""
        if not self.storage.use_blob_urls:
            return obj.generation
        return f"{obj.generation}/{self._blob_digest}"

    def _count(self, action: str, value: int) -> None:
        self.progress.add(action, value)
        self._tasks[action].inc(value)

    async def _import_file(self, obj: ListedObject) -> None:
        """A task file's rows, a batch per transaction; rows past its end removed at the end.

        On a file-level failure the rows read so far stay and the object stays unfinished, so
        the next sync reads it again; a bad row is recorded and its number holds no task.
        """
        storage, registry, progress = self.storage, self.registry, self.progress
        rows: list[tuple[int, dict[str, Any]]] = []
        bad: list[int] = []
        count = row_errors = 0

        async def flush() -> None:
            created, updated, removed = await registry.upsert_rows(storage.id, storage.project, obj.key, rows, bad)
            self._count("created", created)
            self._count("updated", updated)
            self._count("removed", removed)
            rows.clear()
            bad.clear()
            progress.changed()

        async def flush_read_so_far() -> None:
            # Whatever the batch size, the rows met before a broken spot are imported; the
            # object stays unfinished, so the next sync reads it again.
            if rows or bad:
                await flush()

        if file_format(obj.key) is None:
            progress.error("file", f"{obj.key}: not a task file (expected a .json, .jsonl, .ndjson or .parquet name)")
            return
        try:
            reader = await self.backend.open(obj.key, None)
        except ObjectNotFound:  # deleted since it was listed: gone, as the next listing would say
            self._count("removed", await registry.remove_objects(storage.id, [obj.key]))
            return
        except StorageError as exc:
            progress.error("storage", f"{obj.key}: cannot be read ({exc.public_message or exc})")
            return
        try:
            async for row, item in parse_task_file(obj.key, decoded(reader), self.settings.max_parquet_bytes):
                for blank in range(count, row):  # blank lines hold no task (any more)
                    bad.append(blank)
                    if len(rows) + len(bad) >= self.settings.batch_size:
                        await flush()
                count = row + 1
                if isinstance(item, RowError):
                    bad.append(row)
                    row_errors += 1
                    progress.error("row", f"{obj.key}: {_where(obj.key, row)}: {item.message}")
                else:
                    rows.append((row, item))
                if len(rows) + len(bad) >= self.settings.batch_size:
                    await flush()
            if rows or bad:
                await flush()
            removed = await registry.finish_object(storage.id, obj.key, obj.generation, count, row_errors)
            self._count("removed", removed)
        except FileError as exc:
            await flush_read_so_far()
            progress.error("file", f"{obj.key}: {exc}")
        except StorageError as exc:
            await flush_read_so_far()
            progress.error("storage", f"{obj.key}: read failed ({exc.public_message or exc})")
        finally:
            reader.close()


async def decoded(reader: ObjectReader) -> AsyncIterator[bytes]:
    """A task file's bytes as written: the gateway downloads objects as stored, and a task file
    uploaded with `gsutil cp -Z` is stored gzip-encoded. Inflated a bounded piece at a time (a
    small object may inflate to gigabytes)."""
    if reader.meta.content_encoding != "gzip":
        async for chunk in reader.chunks():
            yield chunk
        return
    inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        async for chunk in reader.chunks():
            while chunk:
                data = inflate.decompress(chunk, INFLATED_PIECE)
                if data:
                    yield data
                chunk = inflate.unconsumed_tail
                if inflate.eof and inflate.unused_data:  # concatenated gzip members
                    chunk, inflate = inflate.unused_data, zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        rest = inflate.flush()
    except zlib.error:
        raise FileError("not valid gzip data (the object is stored gzip-encoded)") from None
    if rest:
        yield rest
    if not inflate.eof:
        raise FileError("truncated gzip data (the object is stored gzip-encoded)")


def _where(key: str, row: int) -> str:
    return f"line {row + 1}" if file_format(key) == "jsonl" else f"row {row + 1}"


async def preview(storage: StorageSettings, backend: Backend, limit: int = 20) -> dict[str, Any]:
    """What a sync would import first, importing nothing: the first matching keys, and for task
    files the first tasks of the first task file (with the problems met on the way)."""
    wanted = selects(storage)
    keys: list[str] = []
    token: str | None = None
    pages = 0
    while len(keys) < limit and pages < 10:  # a prefix of non-matching keys must not list the bucket
        page, token = await backend.list_page(storage.prefix, storage.recursive_scan, token, 1000)
        pages += 1
        keys.extend(await off_loop(lambda page: [obj.key for obj in page if wanted(obj.key)], page))
        if token is None:
            break
    keys = keys[:limit]
    answer: dict[str, Any] = {"keys": keys}
    if storage.use_blob_urls:
        answer.update(tasks=[blob_task(storage, key) for key in keys], errors=[])
        return answer
    tasks: list[dict[str, Any]] = []
    errors: list[str] = []
    for key in keys:
        if file_format(key) is None:
            errors.append(f"{key}: not a task file (expected a .json, .jsonl, .ndjson or .parquet name)")
            continue
        reader = await backend.open(key, None)
        try:
            async for row, item in parse_task_file(key, decoded(reader)):
                if isinstance(item, RowError):
                    errors.append(f"{key}: {_where(key, row)}: {item.message}")
                else:
                    tasks.append(item)
                if len(tasks) >= limit or len(errors) >= limit:
                    break
        except FileError as exc:
            errors.append(f"{key}: {exc}")
        finally:
            reader.close()
        if tasks:
            break
    answer.update(tasks=tasks[:limit], errors=errors[:limit])
    return answer
