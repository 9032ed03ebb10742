"""The task registry behaves the same on SQLite and on a real PostgreSQL server (tests/postgres.py)."""

from __future__ import annotations

from gateway.registry import open_registry

from .conftest import PROJECT

IMAGE = "gs://b/a.jpg"


async def test_add_get_and_access(registry_url: str) -> None:
    reg = open_registry(registry_url)
    try:
        ids = await reg.add_tasks(PROJECT, [{"data": {"image": IMAGE}}])
        assert len(ids) == 1
        task = await reg.get_task(ids[0])
        assert task is not None
        assert task["data"] == {"image": IMAGE}
        assert task["project"] == PROJECT
        access = await reg.task_access(ids[0])
        assert access is not None
        assert access.project == PROJECT
        assert access.uris == frozenset({IMAGE})
        assert await reg.get_task(ids[0] + 1000) is None
    finally:
        await reg.close()


async def test_two_registries_share_the_database(registry_url: str) -> None:
    first, second = open_registry(registry_url), open_registry(registry_url)
    try:
        [from_first] = await first.add_tasks(PROJECT, [{"data": {"image": IMAGE}}])
        [from_second] = await second.add_tasks(PROJECT, [{"data": {"image": "gs://b/other.jpg"}}])
        assert from_first != from_second
        seen = await second.get_task(from_first)
        assert seen is not None and seen["data"] == {"image": IMAGE}
        access = await first.task_access(from_second)
        assert access is not None and access.uris == frozenset({"gs://b/other.jpg"})
    finally:
        await first.close()
        await second.close()
