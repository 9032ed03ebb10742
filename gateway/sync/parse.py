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
import math
import os
import re
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import ijson

from .. import strictjson
from ..registry import BadTask, normalize_task

FORMATS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
PARQUET_BATCH_ROWS = 1000
MAX_PARQUET_BYTES = 2 * 1024**3  # default of [sync] max_parquet_bytes: the disk a Parquet file may take
BOM = b"\xef\xbb\xbf"


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
    `max_parquet_bytes` (its decoded size, for a gzip-encoded object)."""
    fmt = file_format(key)
    if fmt is None:
        raise FileError("not a task file (expected a .json, .jsonl, .ndjson or .parquet name)")
    if fmt == "parquet":
        rows = _parquet_rows(chunks, max_parquet_bytes)
    else:
        rows = _json_rows(chunks) if fmt == "json" else _jsonl_rows(chunks)
    async for row, item in rows:
        if isinstance(item, RowError):
            yield row, item
            continue
        try:
            yield row, normalize_task(item, row + 1)
        except BadTask as exc:
            yield row, RowError(str(exc).partition(": ")[2] or str(exc))


MAX_DEPTH = 100  # task data nested deeper is refused (a row or file error), never parsed
_STRUCTURE = re.compile(rb'[\[\]{}"\\]')


class _ChunkReader:
    """An async file-like view of a chunk stream, as ijson reads it."""

    def __init__(self, chunks: AsyncIterator[bytes], first: bytes) -> None:
        self._chunks, self._pending = chunks, first
        self._depth, self._in_string, self._escaped = 0, False, False

    async def read(self, size: int = -1) -> bytes:
        if size == 0:  # ijson probes with read(0) for bytes or str and drops the answer
            return b""
        if not self._pending:
            self._pending = await anext(self._chunks, b"")
        data, self._pending = self._pending, b""
        self._guard_depth(data)
        return data

    def _guard_depth(self, data: bytes) -> None:
        """Refuse nesting deeper than MAX_DEPTH before ijson sees it: its C backend's memory
        grows with the square of the depth (a 40 KB file 20,000 levels deep takes 1 GB)."""
        for match in _STRUCTURE.finditer(data):
            char = match.group()
            if self._escaped:
                self._escaped = False
            elif self._in_string:
                if char == b"\\":
                    self._escaped = True
                elif char == b'"':
                    self._in_string = False
            elif char == b'"':
                self._in_string = True
            elif char in b"[{":
                self._depth += 1
                if self._depth > MAX_DEPTH:
                    raise FileError(f"JSON nested deeper than {MAX_DEPTH} levels")
            elif char in b"]}":
                self._depth -= 1


async def _json_rows(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[int, Any]]:
    """A JSON list of tasks (or one task), parsed item by item: memory stays bounded."""
    first = b""
    async for chunk in chunks:
        first += chunk
        if len(first) >= len(BOM) and first.removeprefix(BOM).strip():
            break
    first = first.removeprefix(BOM)  # as some editors save UTF-8
    head = first.lstrip()[:1]
    if not head:
        return  # an empty file holds no tasks
    if head not in (b"[", b"{"):
        raise FileError("not JSON task data (expected a list of tasks or one task)")
    row = -1
    try:
        async for item in ijson.items(_ChunkReader(chunks, first), "item" if head == b"[" else "", use_float=True):
            row += 1
            yield row, item
    except ijson.JSONError as exc:
        where = f"after item {row + 1}" if head == b"[" else "in the task"
        raise FileError(f"malformed JSON {where}: {str(exc).splitlines()[0]}") from None


async def _jsonl_rows(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[int, Any]]:
    """One task per line; blank lines are skipped but keep their number.

    A line longer than a chunk is gathered in pieces and joined once, at its end: each byte is
    copied a bounded number of times however long the line (a task with an inline image).
    """
    pieces: list[bytes] = []
    row = 0
    async for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            pieces.append(chunk[start:end])
            line = b"".join(pieces)
            pieces.clear()
            if line.strip():
                yield row, _json_line(line, row)
            row += 1
            start = end + 1
        if start < len(chunk):
            pieces.append(chunk[start:])
    line = b"".join(pieces)
    if line.strip():
        yield row, _json_line(line, row)


def _json_line(line: bytes, row: int) -> Any:
    try:
        return strictjson.loads(line)
    except UnicodeDecodeError:
        return RowError("not valid JSON (not UTF-8 text)")
    except RecursionError:
        return RowError("nested too deeply")
    except ValueError as exc:  # JSONDecodeError among them
        return RowError(f"not valid JSON ({exc.args[0].split(':')[0]})")


async def _parquet_rows(chunks: AsyncIterator[bytes], max_bytes: int) -> AsyncIterator[tuple[int, Any]]:
    """Parquet needs random access: the file is spooled to a temporary file, then read one
    batch of rows at a time (columns become data fields; a `data` struct column is the data)."""
    try:
        import pyarrow.lib
        import pyarrow.parquet as pq
    except ImportError:  # an optional dependency (154 MB of the container image): the `parquet` extra
        raise FileError(
            "a Parquet task file needs pyarrow, which this installation lacks (pip install "
            "'gcs-media-gateway[parquet]', or the image built with --build-arg LOCK=requirements-parquet.lock)"
        ) from None

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
        try:
            parquet = await asyncio.to_thread(pq.ParquetFile, handle.name)
        except (pyarrow.lib.ArrowException, OSError) as exc:
            raise FileError(f"not a readable Parquet file ({str(exc).splitlines()[0]})") from None
        batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS)
        row = 0
        while True:
            try:
                batch = await asyncio.to_thread(next, batches, None)
            except (pyarrow.lib.ArrowException, OSError) as exc:
                raise FileError(f"Parquet read failed at row {row + 1} ({str(exc).splitlines()[0]})") from None
            if batch is None:
                return
            for record in batch.to_pylist():
                yield row, _jsonable(record)
                row += 1
    finally:
        handle.close()
        os.unlink(handle.name)


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
