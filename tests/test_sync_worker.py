"""Sync jobs in the registry and the sync worker (gateway/sync/worker.py), on SQLite and PostgreSQL.

Several registries (each its own engine, as separate processes or replicas would have) share one
database; workers race for jobs; stale jobs are taken back; migrations upgrade old databases.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, update

from gateway.catalog import StorageCatalog
from gateway.registry import migrate, open_registry
from gateway.registry.schema import sync_jobs_table
from gateway.registry.sql import SqlTaskRegistry
from gateway.storage import client_session
from gateway.sync import worker as worker_module
from gateway.sync.engine import Sync
from gateway.sync.worker import SyncWorker
from gateway.vault import Vault

from .conftest import PROJECT, build_settings
from .test_sync import Bucket, jsonl, new_bucket, task_rows


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 15.0, what: str = "condition") -> None:
    """Poll an async condition with a deadline (never a fixed sleep as synchronisation)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
async def registry(registry_url: str) -> AsyncIterator[SqlTaskRegistry]:
    reg = open_registry(registry_url)
    yield reg
    await reg.close()


async def set_job(registry: SqlTaskRegistry, job_id: int, **values: Any) -> None:
    async with registry._begin() as conn:
        await conn.execute(update(sync_jobs_table).where(sync_jobs_table.c.id == job_id).values(**values))


# -- the job table ------------------------------------------------------------------------------


async def test_one_active_job_per_storage(registry: SqlTaskRegistry) -> None:
    first, created = await registry.enqueue_job("a")
    assert created and first["status"] == "queued" and first["counters"]["listed"] == 0
    again, created = await registry.enqueue_job("a")
    assert (again["id"], created) == (first["id"], False)
    other, created = await registry.enqueue_job("b")
    assert created and other["id"] != first["id"]

    claimed = await registry.claim_job("w1", "a")
    assert claimed is not None and claimed["id"] == first["id"] and claimed["status"] == "running"
    assert claimed["worker"] == "w1" and claimed["attempts"] == 1
    running, created = await registry.enqueue_job("a")  # running counts as active too
    assert (running["id"], created) == (first["id"], False)
    assert await registry.claim_job("w2", "a") is None

    assert await registry.finish_job(first["id"], "w1", "completed", {"listed": 3}, ["e"] * 30)
    done = await registry.get_job(first["id"])
    assert done is not None and done["status"] == "completed" and done["finished_at"] >= done["started_at"]
    assert done["counters"] == {"listed": 3} and len(done["errors"]) == 20  # first messages only
    assert not await registry.finish_job(first["id"], "w1", "failed", {}, [])  # finished once
    fresh, created = await registry.enqueue_job("a")
    assert created and fresh["id"] > first["id"]


async def test_concurrent_enqueues_and_claims_from_many_registries(
    registry_url: str, registry: SqlTaskRegistry
) -> None:
    await registry.ping()  # the schema exists before the stampede
    others = [open_registry(registry_url) for _ in range(5)]
    try:
        queued = await asyncio.gather(*(reg.enqueue_job("s") for reg in others for _ in range(2)))
        assert len({job["id"] for job, _ in queued}) == 1
        assert sum(created for _, created in queued) == 1
        claims = await asyncio.gather(*(reg.claim_job(f"w{i}") for i, reg in enumerate(others)))
        winners = [job for job in claims if job is not None]
        assert len(winners) == 1 and winners[0]["id"] == queued[0][0]["id"]
        job = await registry.get_job(winners[0]["id"])
        assert job is not None and job["attempts"] == 1 and job["worker"] == winners[0]["worker"]

        # Several queued jobs: each is claimed by exactly one of the claimants.
        for storage in ("t", "u", "v"):
            await registry.enqueue_job(storage)
        claimed: list[dict[str, Any]] = []
        for _ in range(5):
            rounds = await asyncio.gather(*(reg.claim_job(f"x{i}") for i, reg in enumerate(others)))
            claimed += [job for job in rounds if job is not None]
        assert sorted(job["storage_id"] for job in claimed) == ["t", "u", "v"]
    finally:
        for reg in others:
            await reg.close()


async def test_heartbeats_stale_jobs_and_release(registry: SqlTaskRegistry) -> None:
    job, _ = await registry.enqueue_job("s")
    claimed = await registry.claim_job("dead")
    assert claimed is not None
    assert await registry.heartbeat(job["id"], "dead", {"listed": 5}, ["first"])
    assert not await registry.heartbeat(job["id"], "someone-else", {}, [])
    seen = await registry.get_job(job["id"])
    assert seen is not None and seen["counters"] == {"listed": 5} and seen["errors"] == ["first"]

    assert await registry.requeue_stale(60, 3) == []  # heart-beating: left alone
    await set_job(registry, job["id"], heartbeat_at=time.time() - 61)
    assert await registry.requeue_stale(60, 3) == [job["id"]]
    seen = await registry.get_job(job["id"])
    assert seen is not None and (seen["status"], seen["worker"]) == ("queued", None)
    assert not await registry.heartbeat(job["id"], "dead", {}, [])  # taken over: the old worker learns it
    assert not await registry.finish_job(job["id"], "dead", "completed", {}, [])

    for attempt in (2, 3):
        claimed = await registry.claim_job(f"w{attempt}")
        assert claimed is not None and claimed["attempts"] == attempt
        await set_job(registry, job["id"], heartbeat_at=time.time() - 61)
        assert await registry.requeue_stale(60, 3) == [job["id"]]
    failed = await registry.get_job(job["id"])
    assert failed is not None and failed["status"] == "failed" and failed["finished_at"] is not None
    assert "died" in failed["message"]
    assert await registry.claim_job("w4") is None

    # A stopping worker hands its job back; a release by anyone else changes nothing.
    job, _ = await registry.enqueue_job("s")
    assert (await registry.claim_job("w5")) is not None
    await registry.release_job(job["id"], "w6")
    assert (await registry.get_job(job["id"]) or {})["status"] == "running"
    await registry.release_job(job["id"], "w5")
    released = await registry.get_job(job["id"])
    assert released is not None and (released["status"], released["worker"]) == ("queued", None)
    again = await registry.claim_job("w7")
    assert again is not None and again["id"] == job["id"] and again["attempts"] == 2


async def test_a_write_cancelled_while_sqlite_is_locked_leaves_no_lock_behind(tmp_path: Path) -> None:
    """A write cancelled while it waits for SQLite's lock (another process writing) still ends
    its transaction: the database is not left locked for the next writer."""
    path = tmp_path / "locked.db"
    registry = open_registry(f"sqlite:///{path}")
    try:
        await registry.ping()
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        sent = asyncio.Event()

        def on_insert(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if statement.startswith("INSERT"):
                sent.set()

        event.listen(registry._engine.sync_engine, "before_cursor_execute", on_insert)
        rows = [(0, {"data": {"n": 0}}), (1, {"data": {"n": 1}})]
        writing = asyncio.ensure_future(registry.upsert_rows("s", PROJECT, "k.jsonl", rows))
        async with asyncio.timeout(5):
            await sent.wait()  # the INSERT is on its way to SQLite, which makes it wait
        writing.cancel()
        other.execute("ROLLBACK")
        with pytest.raises(asyncio.CancelledError):
            await writing
        async with asyncio.timeout(3):  # busy_timeout is 5 s: a lock left behind would fail this
            _, created = await registry.enqueue_job("t")
        assert created
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
        other.close()
    finally:
        await registry.close()


# -- the worker ---------------------------------------------------------------------------------

FAST = {"poll_interval": 0.05, "heartbeat_interval": 0.05, "stale_after": 1.0, "page_size": 7}


class Node:
    """One worker process's share: its own registry (engine), catalog, session and SyncWorker."""

    def __init__(self, worker: SyncWorker, catalog: StorageCatalog, session: Any) -> None:
        self.worker, self.catalog, self.session = worker, catalog, session
        self.registry: SqlTaskRegistry = catalog.registry
        self.changes = 0

    async def close(self) -> None:
        jobs = list(self.worker._jobs)
        for task in jobs:
            task.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        await self.catalog.close()
        await self.session.close()
        await self.registry.close()


@pytest.fixture
async def cluster(request, tmp_path, registry_url, monkeypatch) -> AsyncIterator[Callable[..., Awaitable[Node]]]:
    """Make workers over one database and one fake-gcs-server bucket (`cluster.bucket`)."""
    emulator = request.getfixturevalue("emulator")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.host)
    bucket = new_bucket("gcs", tmp_path, emulator)
    nodes: list[Node] = []

    async def make(storages: list[dict[str, Any]] | None = None, name: str | None = None, **sync: Any) -> Node:
        entries = storages if storages is not None else [{"id": "src", "prefix": "t", "use_blob_urls": False}]
        entries = [{"project": PROJECT, "type": "gcs", "bucket": bucket.name, **entry} for entry in entries]
        settings = build_settings(entries, tmp_path, registry={"url": registry_url}, sync={**FAST, **sync})
        registry = open_registry(registry_url)
        session = client_session(settings)
        catalog = StorageCatalog(settings, registry, Vault(()))
        await catalog.start(session)
        node = Node(SyncWorker(catalog, name=name or f"node{len(nodes)}"), catalog, session)
        node.worker._on_change = lambda: setattr(node, "changes", node.changes + 1)
        nodes.append(node)
        return node

    make.bucket = bucket  # type: ignore[attr-defined]
    yield make
    for node in nodes:
        await node.close()


def bucket_of(cluster: Any) -> Bucket:
    return cluster.bucket


async def finished(registry: SqlTaskRegistry, job_id: int, timeout: float = 15.0) -> dict[str, Any]:
    job: dict[str, Any] = {}

    async def done() -> bool:
        job.update(await registry.get_job(job_id) or {})
        return job.get("status") not in (None, "queued", "running")

    await eventually(done, timeout, f"job {job_id} to finish")
    return job


async def test_a_worker_runs_queued_jobs_and_records_their_outcome(cluster: Any) -> None:
    bucket = bucket_of(cluster)
    bucket.put("t/a.jsonl", jsonl({"n": 1}, {"n": 2}))
    bucket.put("t/b.jsonl", jsonl({"n": 3}) + "{bad\n")
    node = await cluster()
    job, _ = await node.registry.enqueue_job("src")
    await node.worker.tick()
    done = await finished(node.registry, job["id"])
    assert done["status"] == "completed_with_errors"
    assert done["counters"] == {"listed": 2, "created": 3, "updated": 0, "removed": 0, "skipped": 0, "errors": 1}
    assert done["errors"] == ["t/b.jsonl: line 2: not valid JSON (Expecting property name enclosed in double quotes)"]
    assert done["worker"] == "node0" and done["attempts"] == 1 and done["message"] is None
    assert done["started_at"] <= done["finished_at"]
    assert len(await task_rows(node.registry, "src")) == 3
    await eventually(lambda: _idle(node), what="the job's task to end")
    assert node.changes == 1  # the media path's task cache is told

    again, _ = await node.registry.enqueue_job("src")
    await node.worker.tick()
    assert (await finished(node.registry, again["id"]))["counters"]["created"] == 0
    await eventually(lambda: _idle(node), what="the job's task to end")
    assert node.changes == 1  # nothing changed: the cache is kept


async def test_a_missing_bucket_fails_the_job_with_a_clear_message(cluster: Any) -> None:
    node = await cluster([{"id": "gone", "bucket": "no-such-bucket-for-sync"}])
    job, _ = await node.registry.enqueue_job("gone")
    await node.worker.tick()
    done = await finished(node.registry, job["id"])
    assert done["status"] == "failed"
    assert "no-such-bucket-for-sync" in done["message"] and "does not exist" in done["message"]

    orphan, _ = await node.registry.enqueue_job("deleted-storage")
    await node.worker.tick()
    done = await finished(node.registry, orphan["id"])
    assert (done["status"], done["message"]) == ("failed", "the storage no longer exists")


@pytest.fixture
def sync_runs(monkeypatch) -> dict[str, Any]:
    """Sync.run instrumented: how many run at once per storage, and for how long each works."""
    state: dict[str, Any] = {"active": {}, "most": 0, "runs": 0, "work": 0.0, "gate": None}
    original = Sync.run

    async def run(self: Sync) -> str:
        storage = self.storage.id
        state["active"][storage] = state["active"].get(storage, 0) + 1
        state["most"] = max(state["most"], state["active"][storage])
        state["runs"] += 1
        try:
            if state["gate"] is not None:
                await state["gate"].wait()
            await asyncio.sleep(state["work"])  # the sync's duration (work, not synchronisation)
            return await original(self)
        finally:
            state["active"][storage] -= 1

    monkeypatch.setattr(Sync, "run", run)
    return state


async def test_racing_workers_never_run_two_syncs_of_one_storage(cluster: Any, sync_runs: dict[str, Any]) -> None:
    bucket = bucket_of(cluster)
    for i in range(5):
        bucket.put(f"t/{i}.jsonl", jsonl({"n": i}))
    # No heartbeat may look stale here, however loaded the machine: a re-queued job runs again.
    nodes = [await cluster(stale_after=30.0) for _ in range(4)]
    sync_runs["work"] = 0.1
    loops = [asyncio.create_task(node.worker.run()) for node in nodes]
    try:
        jobs: set[int] = set()
        for round_ in range(4):
            # Every worker asks for a sync at once, twice: one job; then all of them look for work.
            queued = await asyncio.gather(*(node.registry.enqueue_job("src") for node in nodes for _ in range(2)))
            assert len({job["id"] for job, _ in queued}) == 1 and sum(new for _, new in queued) == 1
            for node in nodes:
                node.worker.wake()
            job = await finished(nodes[0].registry, queued[0][0]["id"])
            assert job["status"] == "completed", job
            jobs.add(job["id"])
            bucket.put(f"t/new{round_}.jsonl", jsonl({"n": round_}))
        assert len(jobs) == 4
        assert sync_runs["most"] == 1 and sync_runs["runs"] == 4
        rows = await task_rows(nodes[0].registry, "src")
        assert len(rows) == 5 + 3 and len({row.id for row in rows.values()}) == 8
    finally:
        for node, loop in zip(nodes, loops, strict=True):
            await node.worker.stop(loop)


async def test_a_dead_workers_job_is_taken_over_and_counts_attempts(cluster: Any) -> None:
    bucket_of(cluster).put("t/a.jsonl", jsonl({"n": 1}))
    node = await cluster(max_attempts=2)
    job, _ = await node.registry.enqueue_job("src")
    assert await node.registry.claim_job("dead-worker") is not None  # claimed, then its worker died
    await node.worker.tick()
    assert (await node.registry.get_job(job["id"]) or {})["status"] == "running"  # not stale yet

    await set_job(node.registry, job["id"], heartbeat_at=time.time() - 5)  # 1 s is stale here
    await node.worker.tick()
    done = await finished(node.registry, job["id"])
    assert (done["status"], done["worker"], done["attempts"]) == ("completed", "node0", 2)

    # A job whose worker dies at every attempt fails after max_attempts.
    job, _ = await node.registry.enqueue_job("src")
    for attempt in (1, 2):
        claimed = await node.registry.claim_job(f"doomed{attempt}")
        assert claimed is not None and claimed["attempts"] == attempt
        await set_job(node.registry, job["id"], heartbeat_at=time.time() - 5)
        if attempt == 1:
            assert await node.registry.requeue_stale(1.0, 2) == [job["id"]]
    await node.worker.tick()
    done = await finished(node.registry, job["id"])
    assert done["status"] == "failed" and "died" in done["message"]


async def test_a_worker_that_lost_its_job_stops_syncing(cluster: Any, sync_runs: dict[str, Any]) -> None:
    node = await cluster()
    sync_runs["gate"] = asyncio.Event()  # the sync waits (heart-beating) until the test says go
    job, _ = await node.registry.enqueue_job("src")
    await node.worker.tick()
    await eventually(lambda: _running(node), what="the sync to start")
    beats: list[float] = []

    async def beating() -> bool:
        seen = await node.registry.get_job(job["id"]) or {}
        beats.append(seen.get("heartbeat_at") or 0)
        return len(set(beats)) >= 3

    await eventually(beating, what="heartbeats")
    await set_job(node.registry, job["id"], worker="another-worker")  # re-queued and claimed elsewhere
    await eventually(lambda: _idle(node), what="the worker to give the job up")
    assert sync_runs["active"]["src"] == 0
    job_now = await node.registry.get_job(job["id"]) or {}
    assert (job_now["status"], job_now["worker"]) == ("running", "another-worker")  # left to its owner


async def test_a_worker_leaves_jobs_of_storages_it_cannot_use_to_others(cluster: Any) -> None:
    """A replica that cannot use a storage (its API credentials do not decrypt or load here: the
    catalog lists a problem) leaves the storage's queued job for a worker that can."""
    bucket_of(cluster).put("t/a.jsonl", jsonl({"n": 1}))
    unable, able = await cluster(name="unable"), await cluster(name="able")
    job, _ = await unable.registry.enqueue_job("src")
    unable.worker.catalog.problems["src"] = "the stored credentials cannot be decrypted here"
    await unable.worker.tick()
    assert not unable.worker._jobs
    assert (await unable.registry.get_job(job["id"]) or {})["status"] == "queued"
    await able.worker.tick()
    done = await finished(able.registry, job["id"])
    assert (done["status"], done["worker"], done["attempts"]) == ("completed", "able", 1)


async def test_a_stopping_worker_hands_its_job_back(cluster: Any, sync_runs: dict[str, Any]) -> None:
    node = await cluster()
    sync_runs["gate"] = asyncio.Event()
    job, _ = await node.registry.enqueue_job("src")
    loop = asyncio.create_task(node.worker.run())
    await eventually(lambda: _running(node), what="the sync to start")
    await node.worker.stop(loop)
    back = await node.registry.get_job(job["id"]) or {}
    assert (back["status"], back["worker"], back["heartbeat_at"]) == ("queued", None, None)
    other = await cluster(name="successor")
    sync_runs["gate"].set()
    await other.worker.tick()
    done = await finished(other.registry, job["id"])
    assert (done["status"], done["worker"], done["attempts"]) == ("completed", "successor", 2)


async def _running(node: Node) -> bool:
    return bool(node.worker._jobs)


async def _idle(node: Node) -> bool:
    return not node.worker._jobs


async def test_periodic_syncs_are_queued_when_due_and_not_before(cluster: Any, monkeypatch) -> None:
    node = await cluster(
        [
            {"id": "hourly", "prefix": "t", "sync_interval": 3600},
            {"id": "manual", "prefix": "t"},
        ]
    )

    async def jobs_of(storage: str) -> list[dict[str, Any]]:
        async with node.registry._connect() as conn:
            rows = await conn.execute(sync_jobs_table.select().where(sync_jobs_table.c.storage_id == storage))
            return [dict(row._mapping) for row in rows]

    await node.worker.tick()  # never synced: due at once
    [first] = await jobs_of("hourly")
    await finished(node.registry, first["id"])
    assert await jobs_of("manual") == []

    class Clock:
        offset = 0.0

        def time(self) -> float:
            return time.time() + self.offset

    clock = Clock()
    monkeypatch.setattr(worker_module, "time", clock)
    for offset in (0, 1800, 3590):
        clock.offset = offset
        await node.worker.tick()
        assert len(await jobs_of("hourly")) == 1, offset
    clock.offset = 3601
    await node.worker.tick()
    second = max(await jobs_of("hourly"), key=lambda job: job["id"])
    assert second["id"] != first["id"]
    await finished(node.registry, second["id"])
    clock.offset = 0
    await node.worker.tick()  # due again only an interval after this one
    assert len(await jobs_of("hourly")) == 2
    assert await jobs_of("manual") == []


# -- migrations ---------------------------------------------------------------------------------

HEAD = max(p.name.split("_")[0] for p in (Path(migrate.__file__).parent / "migrations" / "versions").glob("0*.py"))


async def schema_of(registry: SqlTaskRegistry) -> dict[str, Any]:
    from sqlalchemy import inspect, text

    async with registry._connect() as conn:
        version = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalars().all()

        def describe(sync_conn: Any) -> dict[str, Any]:
            inspector = inspect(sync_conn)
            return {
                table: (
                    sorted(column["name"] for column in inspector.get_columns(table)),
                    sorted(index["name"] for index in inspector.get_indexes(table)),
                )
                for table in inspector.get_table_names()
            }

        return {"version": version, "tables": await conn.run_sync(describe)}


def old_database(path: Path) -> None:
    """A registry file as the gateway wrote it before migrations existed (plain sqlite3)."""
    with sqlite3.connect(path) as db:
        db.executescript(
            """
            CREATE TABLE tasks (id INTEGER NOT NULL, project VARCHAR(255) NOT NULL, task JSON NOT NULL,
                                PRIMARY KEY (id));
            CREATE INDEX ix_tasks_project ON tasks (project);
            CREATE TABLE task_uris (task_id INTEGER NOT NULL, uri TEXT NOT NULL, PRIMARY KEY (task_id, uri),
                                    FOREIGN KEY(task_id) REFERENCES tasks (id) ON DELETE CASCADE);
            INSERT INTO tasks (id, project, task) VALUES (1, '7', '{"data": {"image": "gs://old/a.jpg"}}');
            INSERT INTO tasks (id, project, task) VALUES (2, '7', '{"data": {"image": "gs://old/b.jpg"}}');
            INSERT INTO task_uris VALUES (1, 'gs://old/a.jpg'), (2, 'gs://old/b.jpg');
            """
        )


async def test_a_database_from_before_migrations_is_stamped_and_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old_database(path)
    registry = open_registry(f"sqlite:///{path}")
    try:
        task = await registry.get_task(2)
        assert task == {"data": {"image": "gs://old/b.jpg"}, "id": 2, "project": "7"}
        access = await registry.task_access(1)
        assert access is not None and access.uris == frozenset({"gs://old/a.jpg"})
        schema = await schema_of(registry)
        assert schema["version"] == [HEAD]
        assert {"storages", "storage_objects", "sync_jobs"} <= set(schema["tables"])
        assert {"storage_id", "object_key", "row", "updated_at"} <= set(schema["tables"]["tasks"][0])
        # The upgraded database takes synced tasks and jobs, beside the old ones.
        assert await registry.import_objects("s", PROJECT, [("k.jpg", "1", {"data": {"i": "gs://old/k.jpg"}})])
        assert (await registry.enqueue_job("s"))[1]
        total, tasks = await registry.list_tasks("7")
        assert total == 3 and [t["id"] for t in tasks][:2] == [1, 2] and tasks[2]["id"] > 2
    finally:
        await registry.close()
    with sqlite3.connect(path) as db:  # what any other process sees
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(HEAD,)]
        assert db.execute("SELECT count(*) FROM tasks").fetchone() == (3,)
        assert [row[2] for row in db.execute("PRAGMA foreign_key_list(task_uris)")] == ["tasks"]
        assert {row[0] for row in db.execute("SELECT name FROM sqlite_master")} >= {
            "ix_tasks_project",
            "ux_tasks_source",
        }
        assert not [name for (name,) in db.execute("SELECT name FROM sqlite_master") if "0002" in name]
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("DELETE FROM tasks WHERE id = 1")
        assert db.execute("SELECT task_id FROM task_uris ORDER BY task_id").fetchall() == [(2,), (3,)]


async def test_opening_an_up_to_date_database_changes_nothing(registry_url: str, caplog) -> None:
    first = open_registry(registry_url)
    try:
        [task_id] = await first.add_tasks(PROJECT, [{"data": {"image": "gs://bkt/a.jpg"}}])
        before = await schema_of(first)
    finally:
        await first.close()
    assert before["version"] == [HEAD]
    second = open_registry(registry_url)
    try:
        with caplog.at_level("INFO", logger="alembic"):
            await second.ping()
        assert not [r for r in caplog.records if "Running" in r.getMessage()], caplog.text
        assert await schema_of(second) == before
        assert (await second.get_task(task_id) or {}).get("data") == {"image": "gs://bkt/a.jpg"}
    finally:
        await second.close()


async def test_many_processes_opening_a_fresh_database_at_once(registry_url: str) -> None:
    registries = [open_registry(registry_url) for _ in range(5)]
    try:
        await asyncio.gather(*(registry.ping() for registry in registries))
        ids = await asyncio.gather(*(r.add_tasks(PROJECT, [{"data": {"i": i}}]) for i, r in enumerate(registries)))
        assert len({task_id for [task_id] in ids}) == 5
        assert (await schema_of(registries[0]))["version"] == [HEAD]
    finally:
        for registry in registries:
            await registry.close()


async def test_an_unexpected_failure_fails_the_job_at_once(cluster: Any, monkeypatch, caplog) -> None:
    node = await cluster()

    async def broken(self: Sync) -> str:
        self.progress.add("created", 1)  # it got somewhere before failing
        raise RuntimeError("a bug")

    monkeypatch.setattr(Sync, "run", broken)
    job, _ = await node.registry.enqueue_job("src")
    await node.worker.tick()
    done = await finished(node.registry, job["id"], timeout=5)  # not after stale_after x max_attempts
    assert done["status"] == "failed" and "RuntimeError" in done["message"]
    assert done["attempts"] == 1 and done["counters"]["created"] == 1
    assert any("failed unexpectedly" in r.getMessage() and r.exc_info for r in caplog.records)
    await eventually(lambda: _idle(node), what="the job's task to end")
    assert node.changes == 1  # what it wrote before failing reaches the media path


async def test_a_cancelled_caller_of_a_write_is_always_told() -> None:
    """Registry writes finish even when their caller is cancelled, and the caller then gets its
    CancelledError, also when the write ends in the very loop turn the cancellation arrives in
    (swallowing it there left `worker.stop()` waiting on a worker loop that never ended)."""
    from gateway.registry.sql import _to_the_end

    started, release, ended = asyncio.Event(), asyncio.Event(), []

    @_to_the_end
    async def write() -> int:
        started.set()
        await release.wait()
        ended.append(True)
        return 1

    caller = asyncio.ensure_future(write())
    await started.wait()
    release.set()  # the write's wake-up is queued first …
    caller.cancel()  # … the caller's cancellation right behind it
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert ended == [True]

    started.clear()
    release.clear()
    caller = asyncio.ensure_future(write())
    await started.wait()
    caller.cancel()  # cancelled mid-write: the write still ends, then the caller hears of it
    await asyncio.sleep(0)
    assert not caller.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert ended == [True, True]


# -- `gateway sync` -------------------------------------------------------------------------------


async def test_the_sync_command_runs_takes_over_and_reports(cluster: Any, capsys) -> None:
    from gateway.sync.commands import sync_command

    bucket = bucket_of(cluster)
    bucket.put("t/a.jsonl", jsonl({"n": 1}, {"n": 2}))
    node = await cluster()
    settings = node.catalog.settings
    async with asyncio.timeout(20):
        assert await sync_command(settings, ["src"], False) == 0
    out = capsys.readouterr().out
    assert "storage src: job 1 completed" in out and "created 2" in out

    # A job left running by a worker that died: the command takes it over once it is stale.
    bucket.put("t/b.jsonl", jsonl({"n": 3}) + "{bad\n")
    job, _ = await node.registry.enqueue_job("src")
    assert await node.registry.claim_job("dead-worker") is not None
    await set_job(node.registry, job["id"], heartbeat_at=time.time() - 5)
    async with asyncio.timeout(20):
        assert await sync_command(settings, ["src"], False) == 1  # completed with errors
    captured = capsys.readouterr()
    assert f"job {job['id']} completed_with_errors" in captured.out and "created 1" in captured.out
    assert "t/b.jsonl: line 2" in captured.err
    done = await node.registry.get_job(job["id"]) or {}
    assert done["attempts"] == 2 and done["worker"] != "dead-worker"

    async with asyncio.timeout(20):
        assert await sync_command(settings, ["src"], True) == 0  # --preview imports nothing
    preview = json.loads(capsys.readouterr().out)
    assert preview["storage"] == "src" and preview["keys"] == ["t/a.jsonl", "t/b.jsonl"]
    assert len(await task_rows(node.registry, "src")) == 3
