"""Task files read as streams: JSON (ijson), JSONL (line by line), Parquet (pyarrow batches).

Each yields `(row, task)` or `(row, RowError)` pairs with `row` the 0-based position of the
item, line or row in the file, so a row keeps its number (and its task id) when a neighbour
is fixed or broken. Problems with the whole file raise `FileError`.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import decimal
import importlib.util
import math
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import ijson

from .. import strictjson
from ..registry import BadTask, normalize_task
from .cpu import Remote

FORMATS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
PARQUET_BATCH_ROWS = 1000
MAX_PARQUET_BYTES = 2 * 1024**3  # default of [sync] max_parquet_bytes: the disk a Parquet file may take


class FileError(Exception):
    """The file as a whole cannot be read as tasks."""


@dataclass(frozen=True, slots=True)
class RowError:
    message: str


def file_format(key: str) -> str | None:
    name = key.rsplit("/", 1)[-1].lower()
    return next((fmt for ext, fmt in FORMATS.items() if name.endswith(ext)), None)


async def parse_task_file(
    key: str, chunks: AsyncIterator[bytes], max_parquet_bytes: int = MAX_PARQUET_BYTES
) -> AsyncIterator[tuple[int, dict[str, Any] | RowError]]:
    """Rows of a task file as they stream in. JSON and JSONL are parsed in bounded memory with no
    disk; Parquet needs random access and is spooled to a temporary file of at most
    `max_parquet_bytes` (its decoded size, for a gzip-encoded object).

    Parsing and normalizing run in the parser process (gateway/sync/cpu.py), a chunk or a Parquet
    batch at a time: the event loop that may also serve media only moves bytes and rows."""
    fmt = file_format(key)
    if fmt is None:
        raise FileError("not a task file (expected a .json, .jsonl, .ndjson or .parquet name)")
    if fmt == "parquet":
        rows = _parquet_rows(chunks, max_parquet_bytes)
    else:
        rows = _json_rows(chunks) if fmt == "json" else _jsonl_rows(chunks)
    async for batch in rows:
        for row in batch:
            yield row


def _task(row: int, item: Any) -> tuple[int, dict[str, Any] | RowError]:
    if isinstance(item, RowError):
        return row, item
    try:
        return row, normalize_task(item, row + 1)
    except BadTask as exc:
        return row, RowError(str(exc).partition(": ")[2] or str(exc))


# -- JSON --------------------------------------------------------------------------------------


class _JsonItems:
    """A JSON list of tasks (or one task) pushed in chunk by chunk (ijson's push interface):
    each `feed` parses one chunk and returns the tasks it completed."""

    def __init__(self, listed: bool) -> None:
        self._listed = listed
        self._items = ijson.sendable_list()
        self._parser = ijson.items_coro(self._items, "item" if listed else "", use_float=True)
        self._row = -1
        # Nesting is bounded before ijson sees a chunk: its C backend's memory grows with the
        # square of the depth (a 40 KB file 20,000 levels deep takes 1 GB).
        self._depth = strictjson.DepthGuard()

    def feed(self, data: bytes) -> list[tuple[int, dict[str, Any] | RowError]]:
        try:
            self._depth.feed(data)
        except strictjson.BadJson as exc:
            raise FileError(f"JSON {exc}") from None
        try:
            self._parser.send(data)
        except ijson.JSONError as exc:
            raise self._malformed(exc) from None
        return self._completed()

    def close(self) -> list[tuple[int, dict[str, Any] | RowError]]:
        try:
            self._parser.close()
        except ijson.JSONError as exc:
            raise self._malformed(exc) from None
        return self._completed()

    def _completed(self) -> list[tuple[int, dict[str, Any] | RowError]]:
        rows = []
        for item in self._items:
            self._row += 1
            rows.append(_task(self._row, item))
        del self._items[:]
        return rows

    def _malformed(self, exc: Exception) -> FileError:
        where = f"after item {self._row + 1}" if self._listed else "in the task"
        return FileError(f"malformed JSON {where}: {str(exc).splitlines()[0]}")


async def _json_rows(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[tuple[int, Any]]]:
    """A JSON list of tasks (or one task), parsed item by item: memory stays bounded."""
    first = b""
    async for chunk in chunks:
        first += chunk
        if len(first) >= len(strictjson.BOM) and first.removeprefix(strictjson.BOM).strip():
            break
    first = first.removeprefix(strictjson.BOM)  # as some editors save UTF-8
    head = first.lstrip()[:1]
    if not head:
        return  # an empty file holds no tasks
    if head not in (b"[", b"{"):
        raise FileError("not JSON task data (expected a list of tasks or one task)")
    async with Remote(_JsonItems, head == b"[") as parser:
        yield await parser.call("feed", first)
        async for chunk in chunks:
            yield await parser.call("feed", chunk)
        yield await parser.call("close")


# -- JSONL -------------------------------------------------------------------------------------


class _JsonLines:
    """One task per line; blank lines are skipped but keep their number.

    A line longer than a chunk is gathered in pieces and joined once, at its end: each byte is
    copied a bounded number of times however long the line (a task with an inline image).
    """

    def __init__(self) -> None:
        self._pieces: list[bytes] = []
        self._row = 0

    def feed(self, chunk: bytes) -> list[tuple[int, dict[str, Any] | RowError]]:
        rows = []
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            self._pieces.append(chunk[start:end])
            line = b"".join(self._pieces)
            self._pieces.clear()
            if line.strip():
                rows.append(_task(self._row, _json_line(line)))
            self._row += 1
            start = end + 1
        if start < len(chunk):
            self._pieces.append(chunk[start:])
        return rows

    def close(self) -> list[tuple[int, dict[str, Any] | RowError]]:
        line = b"".join(self._pieces)
        return [_task(self._row, _json_line(line))] if line.strip() else []


async def _jsonl_rows(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[tuple[int, Any]]]:
    async with Remote(_JsonLines) as parser:
        async for chunk in chunks:
            yield await parser.call("feed", chunk)
        yield await parser.call("close")


def _json_line(line: bytes) -> Any:
    try:
        return strictjson.loads(line)
    except strictjson.BadJson as exc:
        return RowError(f"not valid JSON ({str(exc).split(':')[0]})")


# -- Parquet -----------------------------------------------------------------------------------


async def _parquet_rows(chunks: AsyncIterator[bytes], max_bytes: int) -> AsyncIterator[list[tuple[int, Any]]]:
    """Parquet needs random access: the file is spooled to a temporary file, then read one
    batch of rows at a time (columns become data fields; a `data` struct column is the data)."""
    if importlib.util.find_spec("pyarrow") is None:  # the optional `parquet` extra (154 MB of the image)
        raise FileError(
            "a Parquet task file needs pyarrow, which this installation lacks (pip install "
            "'gcs-media-gateway[parquet]', or the image built with --build-arg LOCK=requirements-parquet.lock)"
        )
    handle = tempfile.NamedTemporaryFile(prefix="gateway-sync-", suffix=".parquet", delete=False)  # noqa: SIM115
    try:
        size = 0
        async for chunk in chunks:
            size += len(chunk)
            if size > max_bytes:
                raise FileError(
                    f"larger than [sync].max_parquet_bytes ({max_bytes} bytes), the disk a Parquet file may "
                    "take while it is read (Parquet needs random access: it is spooled to a temporary file)"
                )
            await asyncio.to_thread(handle.write, chunk)
        handle.close()
        if size == 0:
            return  # an empty file holds no tasks, whatever its format
        async with Remote(_ParquetBatches, handle.name) as batches:
            while rows := await batches.call("next_rows"):
                yield rows
    finally:
        handle.close()
        os.unlink(handle.name)


class _ParquetBatches:
    """A spooled Parquet file's rows as tasks, a batch at a time ([] at the end)."""

    def __init__(self, path: str) -> None:
        import pyarrow.lib
        import pyarrow.parquet as pq

        self._errors = (pyarrow.lib.ArrowException, OSError)
        try:
            self._batches = pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS)
        except self._errors as exc:
            raise FileError(f"not a readable Parquet file ({str(exc).splitlines()[0]})") from None
        self._row = 0

    def next_rows(self) -> list[tuple[int, dict[str, Any] | RowError]]:
        try:
            batch = next(self._batches, None)
        except self._errors as exc:
            raise FileError(f"Parquet read failed at row {self._row + 1} ({str(exc).splitlines()[0]})") from None
        if batch is None:
            return []
        first, self._row = self._row, self._row + batch.num_rows
        return [_task(first + index, _jsonable(record)) for index, record in enumerate(batch.to_pylist())]


def _jsonable(value: Any) -> Any:
    """Parquet values as JSON values: dates as ISO 8601, decimals as numbers, bytes as base64,
    NaN and infinities as null."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN is how pandas writes a missing number; JSON has no NaN or Infinity
    if isinstance(value, decimal.Decimal):
        return float(value) if value.is_finite() else None
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    return value
