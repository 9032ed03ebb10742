"""Task files as streams (gateway/sync/parse.py): chunk boundaries anywhere, bounded memory,
every problem a row error or a file error. No database or bucket needed."""

from __future__ import annotations

import datetime
import decimal
import io
import json
import sys
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError
from gateway.sync.parse import FileError, RowError, file_format, parse_task_file

from .conftest import build_settings


async def stream(data: bytes | Iterable[bytes], size: int = 64 * 1024) -> AsyncIterator[bytes]:
    if isinstance(data, bytes):
        for start in range(0, len(data), size):
            yield data[start : start + size]
    else:
        for chunk in data:
            yield chunk


async def parse(key: str, data: bytes, size: int = 64 * 1024) -> list[tuple[int, Any]]:
    return [item async for item in parse_task_file(key, stream(data, size))]


def parquet_bytes(columns: dict[str, Any], **options: Any) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.table(columns), sink, **options)
    return sink.getvalue()


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("a.json", "json"),
        ("dir/A.JSON", "json"),
        ("x.jsonl", "jsonl"),
        ("x.ndjson", "jsonl"),
        ("x.parquet", "parquet"),
        ("x.json.gz", None),
        ("tasks.json/readme.txt", None),
        ("json", None),
    ],
)
def test_file_format_by_name(key: str, expected: str | None) -> None:
    assert file_format(key) == expected


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1 << 16])
async def test_any_chunking_gives_the_same_rows(size: int) -> None:
    tasks = [{"data": {"text": "é ü \u2603", "n": i}, "predictions": [{"result": []}]} for i in range(5)]
    as_list = json.dumps(tasks).encode()
    assert await parse("t.json", b"\n  " + as_list, size) == list(enumerate(tasks))
    assert await parse("t.json", b"\xef\xbb\xbf" + as_list, size) == list(enumerate(tasks))  # a BOM
    assert await parse("t.json", json.dumps(tasks[0]).encode(), size) == [(0, tasks[0])]
    lines = "\r\n".join(json.dumps(task) for task in tasks).encode()  # CRLF, no final newline
    assert await parse("t.jsonl", b"\xef\xbb\xbf" + lines, size) == list(enumerate(tasks))


async def test_rows_keep_their_numbers_and_errors_say_why() -> None:
    data = b'{"a": 1}\n\n   \n{"a": \n[1]\n"s"\n{}\n{"data": 3}\n{"a": "\xff"}\n{"n": NaN}\n{"b": 2}'
    rows = await parse("t.jsonl", data)
    assert rows == [
        (0, {"data": {"a": 1}}),
        (3, RowError("not valid JSON (Expecting value)")),
        (4, RowError("expected a JSON object, got list")),
        (5, RowError("expected a JSON object, got str")),
        (6, RowError("empty task")),
        (7, RowError("'data' must be a JSON object")),
        (8, RowError("not valid JSON (not UTF-8 text)")),
        (9, RowError("not valid JSON (NaN is not a JSON value)")),
        (10, {"data": {"b": 2}}),
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"42", "not JSON task data"),
        (b'"tasks"', "not JSON task data"),
        (b'[{"a": 1}, {"a": 2}', "malformed JSON"),
        (b'{"data": {"a": 1}', "malformed JSON in the task"),
    ],
)
async def test_whole_file_problems_are_file_errors(data: bytes, message: str) -> None:
    with pytest.raises(FileError, match=message):
        await parse("t.json", data)


@pytest.mark.parametrize("key", ["e.json", "e.jsonl", "e.parquet"])
async def test_empty_files_hold_no_tasks(key: str) -> None:
    assert await parse(key, b"") == []
    if not key.endswith("parquet"):
        assert await parse(key, b" \n\t\n") == []


async def test_parquet_columns_become_data_and_values_become_json() -> None:
    import pyarrow as pa

    data = parquet_bytes(
        {
            "image": ["gs://bkt/a.jpg", None],
            "when": [datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC), None],
            "day": [datetime.date(2024, 1, 2), datetime.date(2024, 1, 3)],
            "price": pa.array([decimal.Decimal("1.25"), None], pa.decimal128(5, 2)),
            "raw": [b"\x00\x01", b""],
            "tags": [["a", "b"], []],
            "box": [{"x": 1.5, "y": float("nan")}, {"x": float("inf"), "y": 0.0}],
        }
    )
    rows = await parse("t.parquet", data, 5)
    assert rows == [
        (
            0,
            {
                "data": {
                    "image": "gs://bkt/a.jpg",
                    "when": "2024-05-06T07:08:09+00:00",
                    "day": "2024-01-02",
                    "price": 1.25,
                    "raw": "AAE=",
                    "tags": ["a", "b"],
                    "box": {"x": 1.5, "y": None},
                }
            },
        ),
        (
            1,
            {
                "data": {
                    "image": None,
                    "when": None,
                    "day": "2024-01-03",
                    "price": None,
                    "raw": "",
                    "tags": [],
                    "box": {"x": None, "y": 0.0},
                }
            },
        ),
    ]
    assert all(json.loads(json.dumps(task, allow_nan=False)) == task for _, task in rows)


async def test_parquet_rows_across_row_groups_and_broken_files() -> None:
    data = parquet_bytes({"n": list(range(2500))}, row_group_size=700)
    rows = await parse("t.parquet", data, 1000)
    assert [row for row, _ in rows] == list(range(2500))
    assert rows[2499] == (2499, {"data": {"n": 2499}})
    with pytest.raises(FileError, match="not a readable Parquet file"):
        await parse("t.parquet", b"PAR1 but nothing else")
    with pytest.raises(FileError, match="Parquet"):
        await parse("t.parquet", data[: len(data) // 2] + data[-8:])  # footer kept, pages cut


async def test_parquet_without_pyarrow_is_a_file_error_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """pyarrow is the optional `parquet` extra (the container image leaves it out by default)."""
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow…` now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(FileError, match=r"needs pyarrow.*gcs-media-gateway\[parquet\]"):
        await parse("t.parquet", b"PAR1")


async def test_a_parquet_file_may_take_only_so_much_disk() -> None:
    """Parquet is spooled to a temporary file to be read: beyond [sync] max_parquet_bytes the
    file is refused (a file error: the sync goes on), and the spool is removed either way."""
    data = parquet_bytes({"n": list(range(2500))})
    spools = set(Path(tempfile.gettempdir()).glob("gateway-sync-*.parquet"))
    exact = [item async for item in parse_task_file("t.parquet", stream(data, 1000), len(data))]
    assert len(exact) == 2500
    with pytest.raises(FileError, match=r"larger than \[sync\].max_parquet_bytes"):
        [item async for item in parse_task_file("t.parquet", stream(data, 1000), len(data) - 1)]
    assert set(Path(tempfile.gettempdir()).glob("gateway-sync-*.parquet")) == spools


def test_max_parquet_bytes_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[sync\].max_parquet_bytes"):
        build_settings([], tmp_path, sync={"max_parquet_bytes": 0})


def _lines(total_bytes: int) -> Iterable[bytes]:
    line = json.dumps({"data": {"text": "x" * 200}}).encode() + b"\n"
    chunk = line * (64 * 1024 // len(line))
    for _ in range(total_bytes // len(chunk)):
        yield chunk


@pytest.mark.slow
async def test_memory_stays_bounded_whatever_the_file_size() -> None:
    """4 MB of JSONL and of a JSON list, streamed: the parser holds a chunk, not the file."""

    async def json_list() -> AsyncIterator[bytes]:
        yield b"["
        item = json.dumps({"data": {"text": "x" * 200}}).encode()
        chunk = b",".join([item] * 250)
        for number in range(4 * 1024 * 1024 // len(chunk)):
            yield (b"," if number else b"") + chunk
        yield b"]"

    for key, chunks in (("big.jsonl", stream(_lines(4 * 1024 * 1024))), ("big.json", json_list())):
        tracemalloc.start()
        try:
            count = 0
            async for _ in parse_task_file(key, chunks):
                count += 1
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert count > 15_000, key
        assert peak < 1024 * 1024, (key, peak)  # a quarter of the file


@pytest.mark.slow
async def test_a_long_line_is_joined_once() -> None:
    """A 40 MB line (an inline image) arriving in 64 KiB chunks: gathering it by appending
    chunk after chunk to a growing buffer copies it ~600 times over (seconds); joined once at
    its end it takes milliseconds."""
    line = json.dumps({"data": {"image": "data:image/png;base64," + "A" * 40_000_000}}).encode()
    started = time.perf_counter()
    rows = await parse("t.jsonl", line + b"\n" + b'{"n": 2}\n')
    took = time.perf_counter() - started
    assert [row for row, _ in rows] == [0, 1]
    assert took < 2.0, took


class StoredReader:
    """An ObjectReader over bytes, with the content encoding the object is stored with."""

    def __init__(self, data: bytes, encoding: str | None, chunk: int = 64 * 1024) -> None:
        from gateway.storage import ObjectMeta

        self.meta = ObjectMeta(len(data), '"1"', 0, "application/json", encoding)
        self._data, self._chunk = data, chunk

    async def chunks(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self._data), self._chunk):
            yield self._data[start : start + self._chunk]

    def close(self) -> None:
        pass


async def test_gzip_encoded_objects_are_inflated_a_bounded_piece_at_a_time() -> None:
    import gzip

    from gateway.sync.engine import decoded

    bomb = gzip.compress(b" " * 50_000_000 + b'{"n": 1}\n')  # ~50 KB stored
    pieces = [len(piece) async for piece in decoded(StoredReader(bomb, "gzip"))]
    assert sum(pieces) == 50_000_009 and max(pieces) <= 256 * 1024
    rows = [item async for item in parse_task_file("t.jsonl", decoded(StoredReader(bomb, "gzip", 1000)))]
    assert rows == [(0, {"data": {"n": 1}})]

    members = gzip.compress(b'{"n": 1}\n') + gzip.compress(b'{"n": 2}\n')  # concatenated, as gzip allows
    assert b"".join([c async for c in decoded(StoredReader(members, "gzip", 7))]) == b'{"n": 1}\n{"n": 2}\n'
    plain = b'{"n": 1}\n'
    assert b"".join([c async for c in decoded(StoredReader(plain, None))]) == plain
    with pytest.raises(FileError, match="truncated gzip data"):
        [c async for c in decoded(StoredReader(gzip.compress(plain * 100)[:-20], "gzip"))]
    with pytest.raises(FileError, match="not valid gzip data"):
        [c async for c in decoded(StoredReader(b"\x1f\x8b\x08\x00garbage-garbage", "gzip"))]
