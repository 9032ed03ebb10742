"""The import sync engine (gateway/sync/engine.py) against real components.

Every test that touches the registry runs on SQLite and on PostgreSQL (`registry_url`), with
fake-gcs-server as the bucket (and the local backend where it is cheap). Listing pages are small
(`[sync] page_size = 7`) so page boundaries are crossed in almost every test.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select

from gateway.config import Settings, StorageSettings, SyncSettings
from gateway.registry import open_registry
from gateway.registry.schema import storage_objects_table, task_uris_table, tasks_table
from gateway.registry.sql import SqlTaskRegistry
from gateway.storage import Backend, BucketNotFound, ListedObject, client_session
from gateway.storage.gcs import GcsBackend
from gateway.storage.local import LocalBackend
from gateway.sync.engine import Progress, Sync, preview

from .conftest import PROJECT, Emulator, build_settings

PAGE_SIZE = 7


# -- the world a sync runs in -------------------------------------------------------------------


@dataclass
class Bucket:
    """A bucket in fake-gcs-server ("gcs") or a directory ("local"), with helpers to change it."""

    kind: str
    name: str
    emulator: Emulator | None
    root: Path

    def put(self, key: str, data: bytes | str, content_type: str = "application/octet-stream") -> None:
        body = data.encode() if isinstance(data, str) else data
        if self.emulator is not None:
            self.emulator.upload(self.name, key, body, content_type)
            return
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        before = path.stat().st_mtime_ns if path.exists() else None
        path.write_bytes(body)
        if before is not None and path.stat().st_mtime_ns <= before:  # coarse file-system clocks
            os.utime(path, ns=(before + 1000, before + 1000))

    def delete(self, key: str) -> None:
        if self.emulator is not None:
            self.emulator.delete(self.name, key)
        else:
            (self.root / key).unlink()

    def uri(self, key: str) -> str:
        return f"gs://{self.name}/{key}"


@dataclass
class World:
    bucket: Bucket
    registry: SqlTaskRegistry
    backend: Backend
    tmp_path: Path
    sessions: list[Any] = field(default_factory=list)

    def storage(self, storage_id: str = "src", **fields: Any) -> StorageSettings:
        """A storage as the config file would declare it (prefix normalised, fields checked)."""
        entry: dict[str, Any] = {"id": storage_id, "project": PROJECT, "type": self.bucket.kind}
        entry["bucket"] = self.bucket.name
        if self.bucket.kind == "local":
            entry["root"] = str(self.bucket.root)
        entry.update(fields)
        return build_settings([entry], self.tmp_path).storages[0]

    async def sync(
        self,
        storage: StorageSettings,
        *,
        registry: Any = None,
        backend: Backend | None = None,
        progress: Progress | None = None,
        **settings: Any,
    ) -> tuple[str, Progress]:
        settings.setdefault("page_size", PAGE_SIZE)
        progress = progress or Progress()
        engine = Sync(storage, backend or self.backend, registry or self.registry, SyncSettings(**settings), progress)
        return await engine.run(), progress

    async def tasks(self, storage_id: str = "src") -> dict[tuple[str, int], TaskRow]:
        return await task_rows(self.registry, storage_id)


@dataclass(frozen=True)
class TaskRow:
    id: int
    task: dict[str, Any]
    updated_at: float | None


async def task_rows(registry: SqlTaskRegistry, storage_id: str) -> dict[tuple[str, int], TaskRow]:
    """Every task a storage imported, by (object key, row); duplicates fail the test."""
    query = select(tasks_table.c.id, tasks_table.c.object_key, tasks_table.c.row, tasks_table.c.task)
    query = query.add_columns(tasks_table.c.updated_at).where(tasks_table.c.storage_id == storage_id)
    async with registry._connect() as conn:
        found = (await conn.execute(query)).all()
    rows = {(key, row): TaskRow(task_id, task, updated) for task_id, key, row, task, updated in found}
    assert len(rows) == len(found), "two tasks for one (object, row)"
    return rows


async def object_rows(registry: SqlTaskRegistry, storage_id: str) -> dict[str, tuple[str | None, int]]:
    query = select(
        storage_objects_table.c.object_key, storage_objects_table.c.generation, storage_objects_table.c.task_count
    ).where(storage_objects_table.c.storage_id == storage_id)
    async with registry._connect() as conn:
        return {key: (generation, count) for key, generation, count in await conn.execute(query)}


async def uri_count(registry: SqlTaskRegistry) -> int:
    async with registry._connect() as conn:
        return len((await conn.execute(select(task_uris_table.c.task_id))).all())


@contextmanager
def counting_writes(registry: SqlTaskRegistry) -> Iterator[list[str]]:
    """The INSERT/UPDATE/DELETE statements the registry sends meanwhile."""
    writes: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().split(None, 1)[0].upper() in ("INSERT", "UPDATE", "DELETE"):
            writes.append(statement)

    engine = registry._engine.sync_engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield writes
    finally:
        event.remove(engine, "before_cursor_execute", record)


def blob(bucket: Bucket, key: str, data_key: str = "$undefined$") -> dict[str, Any]:
    return {"data": {data_key: bucket.uri(key)}}


def jsonl(*items: Any) -> str:
    return "".join(json.dumps(item) + "\n" for item in items)


def parquet(table: Any, row_group_size: int | None = None) -> bytes:
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=row_group_size)
    return sink.getvalue()


def counters(progress: Progress, *names: str) -> dict[str, int]:
    return {name: progress.counters[name] for name in names}


def sample_value(name: str, labels: dict[str, str]) -> float:
    """A counter's current value, read the way /metrics reads it (gateway/metrics.py)."""
    from prometheus_client import REGISTRY, CollectorRegistry, multiprocess

    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    return registry.get_sample_value(name, labels) or 0.0


class Recording:
    """A backend wrapper that records listing calls (and can hold a task file's read open)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.pages: list[tuple[str | None, int]] = []  # (page token asked, items answered)
        self.opened: list[str] = []

    async def list_page(
        self, prefix: str, recursive: bool, page_token: str | None, page_size: int
    ) -> tuple[list[ListedObject], str | None]:
        page, token = await self.inner.list_page(prefix, recursive, page_token, page_size)
        assert len(page) <= page_size
        self.pages.append((page_token, len(page)))
        return page, token

    async def open(self, key: str, byte_range: Any) -> Any:
        self.opened.append(key)
        return await self.inner.open(key, byte_range)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def make_backend(bucket: Bucket, session: Any) -> Backend:
    if bucket.kind == "local":
        return LocalBackend(str(bucket.root), 64 * 1024)
    assert bucket.emulator is not None
    return GcsBackend(session, bucket.emulator.url, bucket.name, None, Settings().upstream)


@pytest.fixture
async def registry(registry_url: str) -> AsyncIterator[SqlTaskRegistry]:
    reg = open_registry(registry_url)
    yield reg
    await reg.close()


def new_bucket(kind: str, tmp_path: Path, emulator: Emulator | None) -> Bucket:
    name = f"sync-{uuid.uuid4().hex[:12]}"
    root = tmp_path / "bucket"
    root.mkdir(exist_ok=True)
    if kind == "gcs":
        assert emulator is not None
        emulator.create_bucket(name)
    return Bucket(kind, name, emulator if kind == "gcs" else None, root)


async def _world(kind: str, request: pytest.FixtureRequest, tmp_path: Path, registry: SqlTaskRegistry) -> Any:
    emulator = request.getfixturevalue("emulator") if kind == "gcs" else None
    bucket = new_bucket(kind, tmp_path, emulator)
    session = client_session(Settings())
    try:
        yield World(bucket, registry, await make_backend(bucket, session), tmp_path)
    finally:
        await session.close()


@pytest.fixture
async def gcs(request, tmp_path, registry) -> AsyncIterator[World]:
    """fake-gcs-server and either database: the default world of these tests."""
    async for world in _world("gcs", request, tmp_path, registry):
        yield world


@pytest.fixture(params=["gcs", "local"])
async def world(request, tmp_path, registry) -> AsyncIterator[World]:
    """Both backends (and both databases): for listing behaviour."""
    async for made in _world(request.param, request, tmp_path, registry):
        yield made


# -- listing --------------------------------------------------------------------------------------

LAYOUT = [
    "top.jpg",
    "imgs/a.jpg",
    "imgs/b.png",
    "imgs/sub/c.jpg",
    "imgs/sub/deeper/d.jpg",
    "imgs-other/e.jpg",
    "imgsX.jpg",
]


def keys_of(rows: dict[tuple[str, int], TaskRow]) -> set[str]:
    return {key for key, _ in rows}


ALL = set(LAYOUT)
DEEP = {"imgs/a.jpg", "imgs/b.png", "imgs/sub/c.jpg", "imgs/sub/deeper/d.jpg"}


SCOPES: list[tuple[dict[str, Any], set[str]]] = [
    ({"prefix": "imgs"}, {"imgs/a.jpg", "imgs/b.png"}),  # normalised to "imgs/": never imgs-other/, imgsX
    ({"prefix": "imgs/", "recursive_scan": True}, DEEP),
    ({"prefix": "imgs/sub"}, {"imgs/sub/c.jpg"}),
    ({}, {"top.jpg", "imgsX.jpg"}),  # one level: the bucket's top
    ({"recursive_scan": True}, ALL),
    # regex_filter: re.match against the whole key, prefix included.
    ({"prefix": "imgs", "recursive_scan": True, "regex_filter": r".*\.jpg"}, DEEP - {"imgs/b.png"}),
    (
        {"prefix": "imgs", "recursive_scan": True, "regex_filter": "imgs/sub/"},
        {"imgs/sub/c.jpg", "imgs/sub/deeper/d.jpg"},
    ),
    ({"prefix": "imgs", "recursive_scan": True, "regex_filter": "sub/"}, set()),  # match, not search
    ({"prefix": "imgs", "recursive_scan": True, "regex_filter": r"a\.jpg"}, set()),  # the prefix is in the key
    ({"prefix": "imgs", "regex_filter": r"imgs/(a|sub)"}, {"imgs/a.jpg"}),  # a regex never widens the level
    ({"recursive_scan": True, "regex_filter": "imgs[^/]"}, {"imgs-other/e.jpg", "imgsX.jpg"}),
]


async def test_listing_scope(world: World) -> None:
    """Prefix, recursive_scan and regex_filter combinations, each its own storage of one bucket."""
    for key in LAYOUT:
        world.bucket.put(key, key)
    for number, (fields, expected) in enumerate(SCOPES):
        storage = world.storage(f"scope{number}", **fields)
        assert storage.prefix == ("" if "prefix" not in fields else fields["prefix"].rstrip("/") + "/")
        status, progress = await world.sync(storage)
        assert status == "completed", fields
        rows = await world.tasks(storage.id)
        assert keys_of(rows) == expected, fields
        for (key, row), task in rows.items():
            assert row == 0
            assert task.task == blob(world.bucket, key)
        assert progress.counters["created"] == len(expected), fields
        assert progress.counters["listed"] - progress.counters["skipped"] == len(expected), fields
        assert progress.counters["errors"] == 0


async def test_folder_markers_are_listed_but_skipped(gcs: World) -> None:
    for key in ("imgs/", "imgs/a.jpg", "imgs/sub/", "imgs/sub/b.jpg"):
        gcs.bucket.put(key, b"" if key.endswith("/") else b"x")
    status, progress = await gcs.sync(gcs.storage(prefix="imgs", recursive_scan=True))
    assert status == "completed"
    assert keys_of(await gcs.tasks()) == {"imgs/a.jpg", "imgs/sub/b.jpg"}
    assert counters(progress, "listed", "skipped", "created") == {"listed": 4, "skipped": 2, "created": 2}


@pytest.mark.parametrize("recursive", [True, False])
async def test_listing_spans_many_pages(world: World, recursive: bool) -> None:
    # 30 objects at the top and 30 sub-folders: with a delimiter some pages hold folders only.
    top = [f"k{i:02d}.jpg" for i in range(30)]
    nested = [f"k{i:02d}/inner.jpg" for i in range(30)]
    for key in top + nested:
        world.bucket.put(key, key)
    backend = Recording(world.backend)
    status, progress = await world.sync(world.storage(recursive_scan=recursive), backend=backend)
    assert status == "completed"
    expected = set(top + nested) if recursive else set(top)
    assert keys_of(await world.tasks()) == expected
    assert progress.counters["listed"] == len(expected)
    assert sum(items for _, items in backend.pages) == len(expected)
    assert len(backend.pages) >= len(expected) // PAGE_SIZE
    assert backend.pages[0][0] is None and all(token for token, _ in backend.pages[1:])


async def test_empty_bucket(world: World) -> None:
    status, progress = await world.sync(world.storage())
    assert status == "completed"
    assert await world.tasks() == {}
    assert progress.counters == {"listed": 0, "created": 0, "updated": 0, "removed": 0, "skipped": 0, "errors": 0}


async def test_missing_bucket_raises_a_clear_error(gcs: World, tmp_path: Path) -> None:
    gone = gcs.storage(bucket="no-such-bucket-" + uuid.uuid4().hex[:8])
    backend = GcsBackend(gcs.backend._session, gcs.bucket.emulator.url, gone.bucket, None, Settings().upstream)  # type: ignore[union-attr]
    with pytest.raises(BucketNotFound, match="does not exist"):
        await gcs.sync(gone, backend=backend)
    with pytest.raises(BucketNotFound, match="does not exist"):
        await gcs.sync(gone, backend=LocalBackend(str(tmp_path / "missing"), 4096))
    assert await gcs.tasks() == {}


# -- import method: one task per object ---------------------------------------------------------


async def test_blob_urls_make_one_task_per_object(gcs: World) -> None:
    keys = [f"img/{i:02d}.jpg" for i in range(10)]
    for key in keys:
        gcs.bucket.put(key, key, "image/jpeg")
    default = gcs.storage("plain", prefix="img")
    assert default.use_blob_urls and default.data_key == "$undefined$"  # Label Studio's defaults
    status, progress = await gcs.sync(default, batch_size=3)
    assert status == "completed" and progress.counters["created"] == 10
    rows = await gcs.tasks("plain")
    assert {key: task.task for (key, _), task in rows.items()} == {key: blob(gcs.bucket, key) for key in keys}

    keyed = gcs.storage("keyed", prefix="img", data_key="image")
    await gcs.sync(keyed)
    keyed_rows = await gcs.tasks("keyed")
    assert keyed_rows[("img/03.jpg", 0)].task == {"data": {"image": gcs.bucket.uri("img/03.jpg")}}
    ids = {task.id for task in [*rows.values(), *keyed_rows.values()]}
    assert len(ids) == 20  # two storages of one bucket: their own tasks

    task_id = keyed_rows[("img/03.jpg", 0)].id
    access = await gcs.registry.task_access(task_id)
    assert access is not None and access.project == PROJECT
    assert access.uris == frozenset({gcs.bucket.uri("img/03.jpg")})  # the media path's grant
    task = await gcs.registry.get_task(task_id)
    assert task is not None and task["storage"] == {"id": "keyed", "key": "img/03.jpg", "row": 0}


# -- import method: task files -------------------------------------------------------------------


def _struct_parquet() -> bytes:
    import pyarrow as pa

    table = pa.table(
        {
            "data": [{"image": "gs://bkt/1.jpg", "text": "one"}, {"image": "gs://bkt/2.jpg", "text": "two"}],
            "predictions": [[{"model_version": "v1", "score": 0.5, "result": [{"value": {"choices": ["a"]}}]}], []],
            "annotations": [[], [{"result": [{"value": {"choices": ["b"]}}]}]],
        }
    )
    return parquet(table)


def _flat_parquet() -> bytes:
    import datetime

    import pyarrow as pa

    table = pa.table(
        {
            "image": ["gs://bkt/x.jpg", "gs://bkt/y.jpg", None],
            "score": [0.25, 1.5, 2.0],
            "n": pa.array([1, 2, 3], pa.int64()),
            "when": [datetime.date(2024, 1, 2), datetime.date(2024, 3, 4), datetime.date(2024, 5, 6)],
        }
    )
    return parquet(table)


TASK_FILES: dict[str, bytes | str] = {
    "tasks/list.json": json.dumps(
        [
            {"data": {"image": "gs://bkt/a.jpg"}, "predictions": [{"result": []}], "annotations": [{"result": []}]},
            {"image": "gs://bkt/bare.jpg", "label": 3},  # a bare dict is the task's data
            {"data": {"meta": {"pages": [{"scan": "gs://bkt/deep/p1.png"}, {"scan": "see gs://bkt/deep/p2.png."}]}}},
        ]
    ),
    "tasks/one.json": json.dumps({"data": {"text": "only one"}, "meta": {"source": "x"}}),
    "tasks/lines.jsonl": '{"data": {"text": "first"}}\n\n{"text": "third"}\n',
    "tasks/flat.parquet": _flat_parquet(),
    "tasks/struct.parquet": _struct_parquet(),
    "tasks/empty.json": "",
    "tasks/empty.jsonl": "",
    "tasks/empty.parquet": "",
    "tasks/blank.json": "  \n ",
    "tasks/notes.txt": "not tasks",
}


async def test_task_files_in_every_format(gcs: World) -> None:
    for key, data in TASK_FILES.items():
        gcs.bucket.put(key, data)
    storage = gcs.storage(prefix="tasks", use_blob_urls=False)
    status, progress = await gcs.sync(storage, batch_size=2)
    assert status == "completed_with_errors"
    assert progress.counters["errors"] == 1
    assert progress.errors == ["tasks/notes.txt: not a task file (expected a .json, .jsonl, .ndjson or .parquet name)"]
    rows = {where: task.task for where, task in (await gcs.tasks()).items()}
    assert sorted(rows) == sorted(
        [
            ("tasks/list.json", 0),
            ("tasks/list.json", 1),
            ("tasks/list.json", 2),
            ("tasks/one.json", 0),
            ("tasks/lines.jsonl", 0),
            ("tasks/lines.jsonl", 2),  # a row keeps its line number (a blank line holds no task)
            ("tasks/flat.parquet", 0),
            ("tasks/flat.parquet", 1),
            ("tasks/flat.parquet", 2),
            ("tasks/struct.parquet", 0),
            ("tasks/struct.parquet", 1),
        ]
    )
    assert progress.counters["created"] == len(rows)
    assert rows[("tasks/list.json", 0)] == {
        "data": {"image": "gs://bkt/a.jpg"},
        "predictions": [{"result": []}],
        "annotations": [{"result": []}],
    }
    assert rows[("tasks/list.json", 1)] == {"data": {"image": "gs://bkt/bare.jpg", "label": 3}}
    assert rows[("tasks/one.json", 0)] == {"data": {"text": "only one"}, "meta": {"source": "x"}}
    assert rows[("tasks/lines.jsonl", 2)] == {"data": {"text": "third"}}
    assert rows[("tasks/flat.parquet", 1)] == {
        "data": {"image": "gs://bkt/y.jpg", "score": 1.5, "n": 2, "when": "2024-03-04"}
    }
    assert rows[("tasks/flat.parquet", 2)]["data"]["image"] is None
    assert rows[("tasks/struct.parquet", 0)] == {
        "data": {"image": "gs://bkt/1.jpg", "text": "one"},
        "predictions": [{"model_version": "v1", "score": 0.5, "result": [{"value": {"choices": ["a"]}}]}],
        "annotations": [],
    }
    assert rows[("tasks/struct.parquet", 1)]["annotations"] == [{"result": [{"value": {"choices": ["b"]}}]}]

    # Nested URIs are indexed for the media path.
    nested = (await gcs.tasks())[("tasks/list.json", 2)].id
    access = await gcs.registry.task_access(nested)
    assert access is not None and access.uris == frozenset({"gs://bkt/deep/p1.png", "gs://bkt/deep/p2.png"})
    objects = await object_rows(gcs.registry, "src")
    assert objects["tasks/empty.json"][1] == objects["tasks/empty.parquet"][1] == 0
    assert objects["tasks/list.json"][1] == 3
    assert "tasks/notes.txt" not in objects


@pytest.mark.slow
async def test_ten_thousand_rows_of_jsonl_and_parquet(gcs: World) -> None:
    import pyarrow as pa

    count = 10_000
    gcs.bucket.put(
        "big/tasks.jsonl",
        "".join(json.dumps({"data": {"image": f"gs://bkt/{i}.jpg", "i": i}}) + "\n" for i in range(count)),
    )
    table = pa.table({"image": [f"gs://bkt/p{i}.jpg" for i in range(count)], "i": list(range(count))})
    gcs.bucket.put("big/tasks.parquet", parquet(table, row_group_size=3000))
    status, progress = await gcs.sync(gcs.storage(prefix="big", use_blob_urls=False))
    assert status == "completed"
    assert progress.counters["created"] == 2 * count
    rows = await gcs.tasks()
    assert len(rows) == 2 * count
    assert len({task.id for task in rows.values()}) == 2 * count
    for i in (0, 1, 4999, 9999):
        assert rows[("big/tasks.jsonl", i)].task == {"data": {"image": f"gs://bkt/{i}.jpg", "i": i}}
        assert rows[("big/tasks.parquet", i)].task == {"data": {"image": f"gs://bkt/p{i}.jpg", "i": i}}
    assert (await object_rows(gcs.registry, "src"))["big/tasks.parquet"] == (mock_any(), count)
    with counting_writes(gcs.registry) as writes:
        status, progress = await gcs.sync(gcs.storage(prefix="big", use_blob_urls=False))
    assert (status, writes, progress.counters["listed"]) == ("completed", [], 2)


class mock_any:
    def __eq__(self, other: object) -> bool:
        return other is not None


async def test_malformed_lines_and_files_are_errors_the_rest_is_imported(gcs: World) -> None:
    gcs.bucket.put(
        "t/bad.jsonl",
        jsonl({"data": {"n": 1}}) + "{not json\n" + jsonl({"n": 3}, [1, 2], "text", {"data": "x"}, {"n": 7}),
    )
    gcs.bucket.put("t/broken.json", '[{"data": {"n": 1}}, {"data": {"n": 2}}, {"data": ')
    gcs.bucket.put("t/garbage.json", "hello")
    gcs.bucket.put("t/bad.parquet", b"PAR1 not really")
    gcs.bucket.put("t/good.json", json.dumps([{"n": 1}]))
    storage = gcs.storage(prefix="t", use_blob_urls=False)
    status, progress = await gcs.sync(storage)
    assert status == "completed_with_errors"
    errors = sorted(progress.errors)
    assert len(errors) == progress.counters["errors"] == 7
    assert errors[:4] == [
        "t/bad.jsonl: line 2: not valid JSON (Expecting property name enclosed in double quotes)",
        "t/bad.jsonl: line 4: expected a JSON object, got list",
        "t/bad.jsonl: line 5: expected a JSON object, got str",
        "t/bad.jsonl: line 6: 'data' must be a JSON object",
    ]
    assert errors[4].startswith("t/bad.parquet: not a readable Parquet file")
    assert errors[5].startswith("t/broken.json: malformed JSON after item 2")
    assert errors[6] == "t/garbage.json: not JSON task data (expected a list of tasks or one task)"
    rows = await gcs.tasks()
    assert sorted(rows) == [
        ("t/bad.jsonl", 0),
        ("t/bad.jsonl", 2),
        ("t/bad.jsonl", 6),
        ("t/broken.json", 0),  # rows before the break are imported
        ("t/broken.json", 1),
        ("t/good.json", 0),
    ]
    # A broken file is read again (and reported again) at every sync, and writes nothing new;
    # a file with bad lines was imported to its end: it is read again when it changes, and until
    # then every sync says it is still broken (never "completed" with 0 errors).
    before = await gcs.tasks()
    with counting_writes(gcs.registry) as writes:
        status, progress = await gcs.sync(storage)
    assert status == "completed_with_errors" and progress.counters["errors"] == 4
    assert sorted(progress.errors) == [
        "t/bad.jsonl: unchanged since a sync found 4 bad row(s) in it; fix the file and sync again",
        *errors[4:],
    ]
    assert counters(progress, "created", "updated", "removed") == {"created": 0, "updated": 0, "removed": 0}
    assert await gcs.tasks() == before
    assert writes == []
    # Fixed: the file is imported to its end, its rows keep their ids.
    gcs.bucket.put("t/broken.json", json.dumps([{"data": {"n": 1}}, {"data": {"n": 2}}, {"data": {"n": 3}}]))
    status, progress = await gcs.sync(storage)
    after = await gcs.tasks()
    assert progress.counters["created"] == 1
    assert after[("t/broken.json", 0)].id == before[("t/broken.json", 0)].id


# -- incremental ----------------------------------------------------------------------------------


def rows_of(n: int, start: int = 0, tag: str = "") -> list[dict[str, Any]]:
    return [{"data": {"n": i, "tag": tag}} for i in range(start, start + n)]


async def test_file_tasks_follow_their_objects(gcs: World) -> None:
    import pyarrow as pa

    bucket = gcs.bucket
    bucket.put("f/a.jsonl", jsonl(*rows_of(5)))
    bucket.put("f/b.json", json.dumps(rows_of(2)))
    bucket.put("f/c.parquet", parquet(pa.table({"n": [0, 1, 2]})))
    for i in range(12):  # enough objects for two listing pages
        bucket.put(f"f/many/{i:02d}.json", json.dumps({"n": i}))
    storage = gcs.storage(prefix="f", recursive_scan=True, use_blob_urls=False)
    status, progress = await gcs.sync(storage, batch_size=2)
    assert (status, progress.counters["created"]) == ("completed", 22)
    first = await gcs.tasks()

    # Unchanged bucket: nothing written, every task untouched.
    with counting_writes(gcs.registry) as writes:
        status, progress = await gcs.sync(storage, batch_size=2)
    assert status == "completed" and writes == []
    assert counters(progress, "listed", "created", "updated", "removed") == {
        "listed": 15,
        "created": 0,
        "updated": 0,
        "removed": 0,
    }
    assert await gcs.tasks() == first

    # a shrinks (rows 3, 4 vanish), b grows and changes its row 1, c is rewritten identically.
    bucket.put("f/a.jsonl", jsonl(*rows_of(3)))
    bucket.put("f/b.json", json.dumps([*rows_of(1), {"data": {"n": 1, "tag": "new"}}, *rows_of(2, start=2)]))
    bucket.put("f/c.parquet", parquet(pa.table({"n": [0, 1, 2]})))
    status, progress = await gcs.sync(storage, batch_size=2)
    assert counters(progress, "created", "updated", "removed") == {"created": 2, "updated": 1, "removed": 2}
    second = await gcs.tasks()
    assert set(first) - set(second) == {("f/a.jsonl", 3), ("f/a.jsonl", 4)}
    assert set(second) - set(first) == {("f/b.json", 2), ("f/b.json", 3)}
    for where in set(first) & set(second):
        assert second[where].id == first[where].id, where  # rows keep their task ids
    assert second[("f/b.json", 1)].task == {"data": {"n": 1, "tag": "new"}}
    assert second[("f/b.json", 1)].updated_at != first[("f/b.json", 1)].updated_at
    for where in [("f/a.jsonl", 0), ("f/b.json", 0), ("f/c.parquet", 2)]:
        assert second[where] == first[where], where  # same content: not even updated_at moves

    # A line that becomes blank, or malformed, no longer holds a task.
    bucket.put("f/a.jsonl", jsonl(rows_of(1)[0]) + "\n" + "{oops\n")
    status, progress = await gcs.sync(storage, batch_size=2)
    assert status == "completed_with_errors"
    assert counters(progress, "removed", "errors") == {"removed": 2, "errors": 1}
    assert sorted(k for k in await gcs.tasks() if k[0] == "f/a.jsonl") == [("f/a.jsonl", 0)]

    # Deleted objects lose their tasks (and the media path its grant); new ones add tasks.
    removed_id = second[("f/c.parquet", 0)].id
    bucket.delete("f/c.parquet")
    bucket.delete("f/many/05.json")
    bucket.put("f/many/99.jsonl", jsonl(*rows_of(3)))
    status, progress = await gcs.sync(storage, batch_size=2)
    assert counters(progress, "created", "updated", "removed") == {"created": 3, "updated": 0, "removed": 4}
    third = await gcs.tasks()
    assert not [key for key, _ in third if key in ("f/c.parquet", "f/many/05.json")]
    assert [row for key, row in third if key == "f/many/99.jsonl"] == [0, 1, 2]
    assert await gcs.registry.task_access(removed_id) is None
    assert "f/c.parquet" not in await object_rows(gcs.registry, "src")


async def test_blob_tasks_follow_their_objects(world: World) -> None:
    bucket = world.bucket
    keys = [f"m/{i:02d}.jpg" for i in range(20)]
    for key in keys:
        bucket.put(key, key)
    storage = world.storage(prefix="m")
    await world.sync(storage, batch_size=4)
    first = await world.tasks()
    assert len(first) == 20

    with counting_writes(world.registry) as writes:
        status, progress = await world.sync(storage, batch_size=4)
    assert (status, writes, await world.tasks()) == ("completed", [], first)
    assert progress.counters["listed"] == 20 and progress.counters["created"] == 0

    bucket.put("m/03.jpg", "changed!")  # a new generation
    for key in ("m/00.jpg", "m/06.jpg", "m/07.jpg", "m/13.jpg", "m/19.jpg"):  # around page boundaries
        bucket.delete(key)
    bucket.put("m/07b.jpg", "new")
    bucket.put("m/zz.jpg", "new")
    status, progress = await world.sync(storage, batch_size=4)
    assert counters(progress, "created", "updated", "removed") == {"created": 2, "updated": 1, "removed": 5}
    second = await world.tasks()
    assert keys_of(second) == (set(keys) - {"m/00.jpg", "m/06.jpg", "m/07.jpg", "m/13.jpg", "m/19.jpg"}) | {
        "m/07b.jpg",
        "m/zz.jpg",
    }
    assert second[("m/03.jpg", 0)].id == first[("m/03.jpg", 0)].id
    assert second[("m/03.jpg", 0)].updated_at != first[("m/03.jpg", 0)].updated_at
    assert second[("m/04.jpg", 0)] == first[("m/04.jpg", 0)]

    # Everything deleted: an empty listing removes every task.
    for key, _ in second:
        bucket.delete(key)
    status, progress = await world.sync(storage)
    assert progress.counters["removed"] == len(second)
    assert await world.tasks() == {}
    assert await object_rows(world.registry, "src") == {}


async def test_scope_changes_remove_what_falls_outside(world: World) -> None:
    for key in LAYOUT:
        world.bucket.put(key, key)
    wide = world.storage(recursive_scan=True)
    await world.sync(wide)
    assert keys_of(await world.tasks()) == ALL
    steps: list[tuple[dict[str, Any], set[str]]] = [
        ({"recursive_scan": True, "regex_filter": r".*\.jpg"}, ALL - {"imgs/b.png"}),
        ({"recursive_scan": True, "regex_filter": r".*\.jpg", "prefix": "imgs"}, DEEP - {"imgs/b.png"}),
        ({"regex_filter": r".*\.jpg", "prefix": "imgs"}, {"imgs/a.jpg"}),  # recursive off
        ({"prefix": "imgs/sub"}, {"imgs/sub/c.jpg"}),
        ({"prefix": "imgs/sub", "recursive_scan": True}, {"imgs/sub/c.jpg", "imgs/sub/deeper/d.jpg"}),
        ({"prefix": "zzz"}, set()),
        ({"recursive_scan": True}, ALL),
    ]
    for fields, expected in steps:
        before = await world.tasks()
        status, progress = await world.sync(world.storage(**fields))
        after = await world.tasks()
        assert status == "completed"
        assert keys_of(after) == expected, fields
        assert progress.counters["removed"] == len(keys_of(before) - expected), fields
        assert progress.counters["created"] == len(expected - keys_of(before)), fields
        for where in set(before) & set(after):
            assert after[where] == before[where]


async def test_a_changed_import_method_or_data_key_reimports(gcs: World) -> None:
    gcs.bucket.put("x/tasks.jsonl", jsonl(*rows_of(3)))
    await gcs.sync(gcs.storage(prefix="x"))
    assert [t.task for t in (await gcs.tasks()).values()] == [blob(gcs.bucket, "x/tasks.jsonl")]
    blob_id = next(iter((await gcs.tasks()).values())).id
    _, progress = await gcs.sync(gcs.storage(prefix="x", use_blob_urls=False))
    assert {where: t.task for where, t in (await gcs.tasks()).items()} == {
        ("x/tasks.jsonl", i): task for i, task in enumerate(rows_of(3))
    }
    assert counters(progress, "created", "updated", "removed") == {"created": 2, "updated": 1, "removed": 0}
    assert (await gcs.tasks())[("x/tasks.jsonl", 0)].id == blob_id
    _, progress = await gcs.sync(gcs.storage(prefix="x", data_key="file"))
    assert [t.task for t in (await gcs.tasks()).values()] == [{"data": {"file": gcs.bucket.uri("x/tasks.jsonl")}}]
    assert progress.counters["removed"] == 2 and progress.counters["updated"] == 1


@pytest.mark.slow
async def test_removing_more_objects_than_a_statement_may_name(tmp_path: Path, registry: SqlTaskRegistry) -> None:
    """An emptied bucket (or an edited prefix) removes any number of objects: asyncpg refuses
    statements with more than 32767 parameters, so removals go in bounded chunks."""
    from sqlalchemy import insert

    count = 33_000
    await registry.import_objects("many", PROJECT, [(f"k/{i:06d}", "1", {"data": {"i": i}}) for i in range(3)])
    async with registry._begin() as conn:
        await conn.execute(
            insert(storage_objects_table),
            [{"storage_id": "many", "object_key": f"k/{i:06d}", "generation": "1"} for i in range(3, count)],
        )
    bucket = new_bucket("local", tmp_path, None)
    world = World(bucket, registry, await make_backend(bucket, None), tmp_path)
    status, progress = await world.sync(world.storage("many"))
    assert (status, progress.counters["removed"]) == ("completed", 3)
    assert await world.tasks("many") == {}
    assert await object_rows(registry, "many") == {}
    assert await uri_count(registry) == 0


# -- crash safety ------------------------------------------------------------------------------


class Crash(Exception):
    pass


class CrashingRegistry:
    """The registry, but its `crash_at`-th write raises (a worker dying between transactions)."""

    WRITES = frozenset({"import_objects", "remove_objects", "upsert_rows", "finish_object"})

    def __init__(self, inner: SqlTaskRegistry, crash_at: int | None = None) -> None:
        self.inner, self.crash_at, self.writes = inner, crash_at, 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)
        if name not in self.WRITES:
            return method

        async def write(*args: Any, **kwargs: Any) -> Any:
            self.writes += 1
            if self.writes == self.crash_at:
                raise Crash(f"write {self.writes}")
            return await method(*args, **kwargs)

        return write


def crashed(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(crashed(inner) for inner in exc.exceptions)
    return isinstance(exc, Crash)


def content(rows: dict[tuple[str, int], TaskRow]) -> dict[tuple[str, int], dict[str, Any]]:
    return {where: row.task for where, row in rows.items()}


CRASH_FIRST = {f"c/f{i}.jsonl": jsonl(*rows_of(5 if i == 0 else 2, tag=str(i))) for i in range(5)}


def crash_second(bucket: Bucket) -> None:
    """Shrink, grow, change, delete and add task files (page boundaries fall among them)."""
    bucket.put("c/f1.jsonl", jsonl(*rows_of(1, tag="1")))
    bucket.put("c/f2.jsonl", jsonl(*rows_of(5, tag="2")))
    bucket.put("c/f3.jsonl", jsonl(*rows_of(1, tag="3"), {"data": {"changed": True}}, *rows_of(1, 2, tag="3")))
    bucket.delete("c/f4.jsonl")
    bucket.put("c/f5.jsonl", jsonl(*rows_of(3, tag="5")))
    bucket.put("c/f6.jsonl", "{broken\n" + jsonl(*rows_of(1, tag="6")))


@pytest.mark.parametrize("use_blob_urls", [False, True])
async def test_a_sync_that_dies_at_any_write_then_runs_again_ends_as_if_never_interrupted(
    gcs: World, use_blob_urls: bool
) -> None:
    """For every write N of a sync: a sync dying just before it, then a sync to the end, leaves
    exactly the tasks an uninterrupted sync leaves (each N on its own storage of one bucket)."""
    for key, data in CRASH_FIRST.items():
        gcs.bucket.put(key, data)
    options = {"prefix": "c", "use_blob_urls": use_blob_urls}
    settings = {"batch_size": 3, "page_size": 3}  # f0 takes two batches, the others one

    counting = CrashingRegistry(gcs.registry)
    await gcs.sync(gcs.storage("ref", **options), registry=counting, **settings)
    first_writes = counting.writes
    reference_first = await gcs.tasks("ref")
    assert first_writes >= (2 if use_blob_urls else 11)

    async def crash_then_finish(storage_id: str, crash_at: int, reference: dict[tuple[str, int], TaskRow]) -> None:
        storage = gcs.storage(storage_id, **options)
        before = await gcs.tasks(storage_id)
        with pytest.raises(BaseException) as failure:
            await gcs.sync(storage, registry=CrashingRegistry(gcs.registry, crash_at), **settings)
        assert crashed(failure.value), failure.value
        halfway = await gcs.tasks(storage_id)
        _, progress = await gcs.sync(storage, **settings)
        after = await gcs.tasks(storage_id)
        assert content(after) == content(reference), (storage_id, crash_at)
        assert progress.counters["created"] == len(set(after) - set(halfway))
        assert progress.counters["removed"] == len(set(halfway) - set(after))
        for where in set(before) & set(after):  # rows kept through the crash keep their ids
            if where in halfway:
                assert after[where].id == before[where].id
        assert await object_rows(gcs.registry, storage_id) == await object_rows(gcs.registry, "ref")

    for crash_at in range(1, first_writes + 1):
        await crash_then_finish(f"s{crash_at}", crash_at, reference_first)
    spare = 8  # storages for the second round's extra writes, synced before the bucket changes
    for number in range(first_writes + 1, first_writes + spare + 1):
        await gcs.sync(gcs.storage(f"s{number}", **options), **settings)

    crash_second(gcs.bucket)
    counting = CrashingRegistry(gcs.registry)
    await gcs.sync(gcs.storage("ref", **options), registry=counting, **settings)
    second_writes = counting.writes
    assert 3 <= second_writes <= first_writes + spare
    reference_second = await gcs.tasks("ref")
    for crash_at in range(1, second_writes + 1):
        await crash_then_finish(f"s{crash_at}", crash_at, reference_second)


class Stalling(Recording):
    """Holds the sync where asked: reading `key` after its first chunk, or listing page `page`."""

    def __init__(self, inner: Backend, key: str | None = None, page: int | None = None) -> None:
        super().__init__(inner)
        self.key, self.page = key, page
        self.stalled = asyncio.Event()

    async def _stall(self) -> None:
        self.stalled.set()
        await asyncio.Event().wait()  # until cancelled

    async def list_page(self, prefix: str, recursive: bool, page_token: str | None, page_size: int) -> Any:
        if self.page is not None and len(self.pages) == self.page:
            await self._stall()
        return await super().list_page(prefix, recursive, page_token, page_size)

    async def open(self, key: str, byte_range: Any) -> Any:
        reader = await super().open(key, byte_range)
        if key != self.key:
            return reader
        stall = self._stall

        class Reader:
            meta, first, last, partial = reader.meta, reader.first, reader.last, reader.partial

            async def chunks(self) -> AsyncIterator[bytes]:
                async for chunk in reader.chunks():
                    yield chunk
                    await stall()

            def close(self) -> None:
                reader.close()

        return Reader()


@pytest.mark.parametrize("where", ["mid-file", "second-page"])
async def test_a_cancelled_sync_then_a_new_one_ends_as_if_never_interrupted(gcs: World, where: str) -> None:
    # Task files written a row per transaction, two pages of them: the cancellation lands amid
    # the writes of several files at once.
    for i in range(10):
        gcs.bucket.put(f"c/f{i}.jsonl", jsonl(*rows_of(8, tag=str(i))))
    storage = gcs.storage(prefix="c", use_blob_urls=False)
    settings = {"batch_size": 1, "page_size": 7}
    await gcs.sync(gcs.storage("ref", prefix="c", use_blob_urls=False))
    reference = await gcs.tasks("ref")
    stalling = Stalling(gcs.backend, key="c/f3.jsonl" if where == "mid-file" else None, page=1)
    running = asyncio.ensure_future(gcs.sync(storage, backend=stalling, **settings))
    async with asyncio.timeout(30):
        await stalling.stalled.wait()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    halfway = await gcs.tasks()
    assert 0 < len(halfway) < len(reference)
    status, progress = await gcs.sync(storage, **settings)
    after = await gcs.tasks()
    assert status == "completed"
    assert content(after) == content(reference)
    assert progress.counters["created"] == len(reference) - len(halfway)
    assert all(after[where].id == row.id for where, row in halfway.items())
    assert await object_rows(gcs.registry, "src") == await object_rows(gcs.registry, "ref")


# -- metrics --------------------------------------------------------------------------------------


async def test_metrics_count_what_a_sync_did(gcs: World) -> None:
    storage_id = f"m{uuid.uuid4().hex[:8]}"
    for i in range(9):
        gcs.bucket.put(f"k/{i}.jsonl", jsonl(*rows_of(2)))
    gcs.bucket.put("k/readme.txt", "no tasks here")

    def values() -> dict[str, float]:
        return {
            "listed": sample_value("gateway_sync_objects_listed_total", {"storage": storage_id}),
            **{
                action: sample_value("gateway_sync_tasks_total", {"storage": storage_id, "action": action})
                for action in ("created", "updated", "removed")
            },
            "file_errors": sample_value("gateway_sync_errors_total", {"kind": "file"}),
            "syncs": sample_value("gateway_sync_duration_seconds_count", {"storage": storage_id}),
        }

    storage = gcs.storage(storage_id, prefix="k", use_blob_urls=False)
    start = values()
    await gcs.sync(storage)
    first = values()
    assert {k: first[k] - start[k] for k in first} == {
        "listed": 10,
        "created": 18,
        "updated": 0,
        "removed": 0,
        "file_errors": 1,
        "syncs": 1,
    }
    gcs.bucket.put("k/0.jsonl", jsonl({"data": {"n": 0, "tag": "new"}}))
    gcs.bucket.delete("k/1.jsonl")
    await gcs.sync(storage)
    second = values()
    assert {k: second[k] - first[k] for k in second} == {
        "listed": 9,
        "created": 0,
        "updated": 1,
        "removed": 3,
        "file_errors": 1,
        "syncs": 1,
    }


# -- preview ------------------------------------------------------------------------------------


async def test_preview_lists_and_parses_without_importing(gcs: World) -> None:
    for i in range(30):
        gcs.bucket.put(f"p/{i:02d}.jpg", "x")
    gcs.bucket.put("p/notes.txt", "x")
    gcs.bucket.put("q/a.txt", "not tasks")
    gcs.bucket.put("q/b.jsonl", "{bad\n" + jsonl(*rows_of(30)))
    answer = await preview(gcs.storage(prefix="p", regex_filter=r".*\.jpg"), gcs.backend, limit=5)
    assert answer["keys"] == [f"p/{i:02d}.jpg" for i in range(5)]
    assert answer["tasks"] == [blob(gcs.bucket, key) for key in answer["keys"]]
    assert answer["errors"] == []
    answer = await preview(gcs.storage(prefix="q", use_blob_urls=False), gcs.backend, limit=3)
    assert answer["keys"] == ["q/a.txt", "q/b.jsonl"]
    assert answer["tasks"] == rows_of(3)
    assert answer["errors"] == [
        "q/a.txt: not a task file (expected a .json, .jsonl, .ndjson or .parquet name)",
        "q/b.jsonl: line 1: not valid JSON (Expecting property name enclosed in double quotes)",
    ]
    assert await gcs.tasks() == {}
    gone = GcsBackend(gcs.backend._session, gcs.bucket.emulator.url, "missing-bucket-x1", None, Settings().upstream)  # type: ignore[attr-defined, union-attr]
    with pytest.raises(BucketNotFound):
        await preview(gcs.storage(), gone)


async def test_task_ids_are_never_reused(gcs: World) -> None:
    """A token names tasks by id: an id once given to a removed task must never name another."""
    for key in ("i/a.jpg", "i/b.jpg", "i/c.jpg"):
        gcs.bucket.put(key, key)
    storage = gcs.storage(prefix="i")
    await gcs.sync(storage)
    first = await gcs.tasks()
    newest = max(task.id for task in first.values())
    assert first[("i/c.jpg", 0)].id == newest
    gcs.bucket.delete("i/c.jpg")
    gcs.bucket.put("i/d.jpg", "d")
    await gcs.sync(storage)
    after = await gcs.tasks()
    assert after[("i/d.jpg", 0)].id > newest
    assert await gcs.registry.task_access(newest) is None
    [api_task] = await gcs.registry.add_tasks(PROJECT, [{"data": {"image": "gs://bkt/x.jpg"}}])
    assert api_task > after[("i/d.jpg", 0)].id


async def test_values_json_cannot_hold_never_reach_the_registry(gcs: World) -> None:
    """NaN and Infinity: Python's json module reads them, PostgreSQL's JSON refuses them (and
    one refused row would stop the whole sync). Parquet's NaN is a missing value: null."""
    import pyarrow as pa

    gcs.bucket.put("n/a.jsonl", jsonl({"n": 1}) + '{"n": NaN}\n' + '{"n": -Infinity}\n' + jsonl({"n": 4}))
    gcs.bucket.put("n/b.parquet", parquet(pa.table({"x": [1.5, float("nan"), float("inf")], "i": [0, 1, 2]})))
    gcs.bucket.put("n/c.json", '[{"n": 1}, {"n": NaN}]')
    status, progress = await gcs.sync(gcs.storage(prefix="n", use_blob_urls=False))
    assert status == "completed_with_errors"
    rows = content(await gcs.tasks())
    assert sorted(rows) == [
        ("n/a.jsonl", 0),
        ("n/a.jsonl", 3),
        *[("n/b.parquet", i) for i in range(3)],
    ]
    assert [rows[("n/b.parquet", i)]["data"]["x"] for i in range(3)] == [1.5, None, None]
    assert sorted(progress.errors)[:2] == [
        "n/a.jsonl: line 2: not valid JSON (NaN is not a JSON value)",
        "n/a.jsonl: line 3: not valid JSON (-Infinity is not a JSON value)",
    ]
    assert sorted(progress.errors)[2].startswith("n/c.json: malformed JSON")  # ijson refuses NaN


async def test_keys_in_byte_order_with_any_characters(gcs: World) -> None:
    """GCS lists in byte order of UTF-8 keys; the registry compares keys the same way on both
    databases, or a re-sync would see objects vanish and come back at page boundaries."""
    keys = [
        "k/Z.jpg",
        "k/a b.jpg",
        "k/a#1?.jpg",
        "k/a.jpg",
        "k/a~.jpg",
        "k/q\"uote'.jpg",
        "k/x<y>.jpg",
        "k/ß.jpg",
        "k/é.jpg",
        "k/\u2603.jpg",
        "k/\U0001f600.jpg",
        "k/\uff5a.jpg",  # fullwidth z
    ]
    for key in keys:
        gcs.bucket.put(key, key)
    storage = gcs.storage(prefix="k")
    for page_size in (1, 2, 5):
        status, progress = await gcs.sync(storage, page_size=page_size)
        assert status == "completed"
        if page_size == 1:
            assert progress.counters["created"] == len(keys)
        else:
            assert counters(progress, "created", "updated", "removed") == {"created": 0, "updated": 0, "removed": 0}
    rows = await gcs.tasks()
    assert keys_of(rows) == set(keys)
    for key in keys:  # the media path's grant is the object's exact URI
        access = await gcs.registry.task_access(rows[(key, 0)].id)
        assert access is not None and gcs.bucket.uri(key) in access.uris, key
    with counting_writes(gcs.registry) as writes:
        await gcs.sync(storage, page_size=3)
    assert writes == []


async def test_a_task_file_value_naming_an_odd_key_grants_that_object_only(gcs: World) -> None:
    gcs.bucket.put("t/odd.json", json.dumps({"data": {"image": 'gs://bkt/q"uote.jpg'}}))
    await gcs.sync(gcs.storage(prefix="t", use_blob_urls=False))
    access = await gcs.registry.task_access((await gcs.tasks())[("t/odd.json", 0)].id)
    assert access is not None
    assert "gs://bkt/q" not in access.uris  # an object the task never named
    assert access.uris == frozenset({'gs://bkt/q"uote.jpg'})


async def test_prefixes_with_characters_a_url_must_escape(world: World) -> None:
    for key in ("a b+c&d=e?/é #1.jpg", "a b+c&d=e?/x.jpg", "a b+c&d=e?x.jpg", "a b/other.jpg"):
        world.bucket.put(key, key)
    status, _ = await world.sync(world.storage(prefix="a b+c&d=e?"))
    assert status == "completed"
    assert keys_of(await world.tasks()) == {"a b+c&d=e?/é #1.jpg", "a b+c&d=e?/x.jpg"}


async def test_task_files_stored_gzip_encoded_are_read_decoded(gcs: World) -> None:
    """`gsutil cp -Z` stores JSON with Content-Encoding: gzip, and the gateway downloads objects
    as stored: the sync must decode them before parsing."""
    import gzip

    assert gcs.bucket.emulator is not None
    body = jsonl(*rows_of(3)).encode()
    gcs.bucket.emulator.upload(gcs.bucket.name, "z/tasks.jsonl", gzip.compress(body), "application/json", "gzip")
    gcs.bucket.emulator.upload(
        gcs.bucket.name, "z/list.json", gzip.compress(json.dumps(rows_of(2)).encode()), "application/json", "gzip"
    )
    gcs.bucket.emulator.upload(gcs.bucket.name, "z/broken.json", b"\x1f\x8b not gzip", "application/json", "gzip")
    status, progress = await gcs.sync(gcs.storage(prefix="z", use_blob_urls=False))
    assert content(await gcs.tasks()) == {
        **{("z/tasks.jsonl", i): task for i, task in enumerate(rows_of(3))},
        **{("z/list.json", i): task for i, task in enumerate(rows_of(2))},
    }
    assert status == "completed_with_errors"
    assert progress.errors == ["z/broken.json: not valid gzip data (the object is stored gzip-encoded)"]
    answer = await preview(gcs.storage(prefix="z", use_blob_urls=False, regex_filter=".*tasks"), gcs.backend)
    assert answer["tasks"] == rows_of(3)


async def test_a_task_file_deleted_between_listing_and_reading_is_gone_not_an_error(gcs: World) -> None:
    gcs.bucket.put("d/a.jsonl", jsonl(*rows_of(2)))
    gcs.bucket.put("d/b.jsonl", jsonl(*rows_of(2)))
    storage = gcs.storage(prefix="d", use_blob_urls=False)
    await gcs.sync(storage)
    gcs.bucket.put("d/a.jsonl", jsonl(*rows_of(3)))  # changed: it will be read again …

    class Racing(Recording):
        async def open(self, key: str, byte_range: Any) -> Any:
            if key == "d/a.jsonl":
                gcs.bucket.delete(key)  # … but it is deleted after the listing
            return await super().open(key, byte_range)

    status, progress = await gcs.sync(storage, backend=Racing(gcs.backend))
    assert (status, progress.counters["removed"], progress.errors) == ("completed", 2, [])
    assert keys_of(await gcs.tasks()) == {"d/b.jsonl"}
    assert "d/a.jsonl" not in await object_rows(gcs.registry, "src")
