"""The export outbox: annotation events recorded durably, delivered to target storages later.

An event is answered only after its transaction commits: the annotation's latest state (a
version that grows by one per event) and, for each target storage of its project, the version
wanted there. Workers lease pending deliveries, write the annotation's *current* state, and
record the version they wrote. So an older version never overwrites a newer one, a delete after
an update deletes, a redelivered event rewrites the same object (idempotent), and several
workers never upload the same annotation to the same storage at once (the lease).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Update, and_, case, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from . import RegistryUnavailable
from .schema import annotations_table, deliveries_table, export_storages_table
from .sql import SqlTaskRegistry, _to_the_end

Batch = tuple[str, list[tuple[int, int | None, dict[str, Any] | None]], list[str]]  # project, events, targets


@dataclass(frozen=True, slots=True)
class Delivery:
    target_id: str
    annotation_id: int
    version: int  # the annotation's version to deliver (or newer)
    attempts: int
    lease_until: float  # time.time() after which another worker may take it over


@dataclass(frozen=True, slots=True)
class AnnotationState:
    version: int
    body: dict[str, Any] | None
    deleted: bool
    task_id: int | None = None
    project: str = ""


def _pending(now: float) -> Any:
    d = deliveries_table.c
    return and_(
        d.wanted_version > d.delivered_version,
        d.next_attempt_at <= now,
        or_(d.lease_until.is_(None), d.lease_until < now),
    )


def _update(delivery: Delivery, worker: str | None = None) -> Update:
    """An UPDATE of one delivery's row; with `worker`, only while that worker holds its lease."""
    d = deliveries_table.c
    statement = update(deliveries_table).where(
        d.target_id == delivery.target_id, d.annotation_id == delivery.annotation_id
    )
    return statement if worker is None else statement.where(d.lease_owner == worker)


class Outbox:
    def __init__(self, registry: SqlTaskRegistry) -> None:
        self.registry = registry
        self._insert = pg_insert if registry.dialect == "postgresql" else sqlite_insert

    async def record(
        self, project: str, events: list[tuple[int, int | None, dict[str, Any] | None]], targets: list[str]
    ) -> list[int]:
        """Events (annotation id, task id, body — None deletes) in one transaction; their versions."""
        [versions] = await self.record_many([(project, events, targets)])
        return versions

    @_to_the_end
    async def record_many(self, batches: list[Batch]) -> list[list[int]]:
        """Several requests' events in one transaction (see Recorder); each request's versions.

        Events are wanted at the request's `targets` (the config file's target storages of the
        project) and at the project's API target storages as the transaction sees them, so a
        storage created through another replica a moment ago is not missed.
        """
        now = time.time()
        a, d = annotations_table.c, deliveries_table.c
        answers: list[list[int]] = []
        api_targets: dict[str, list[str]] = {}
        async with self.registry._begin() as conn:
            for project, events, config_targets in batches:
                if project not in api_targets:
                    api = await conn.execute(
                        select(export_storages_table.c.id).where(export_storages_table.c.project == project)
                    )
                    api_targets[project] = [str(ident) for ident in api.scalars()]
                targets = [*config_targets, *api_targets[project]]
                versions: list[int] = []
                for annotation_id, task_id, body in events:
                    statement = self._insert(annotations_table).values(
                        id=annotation_id,
                        project=project,
                        task_id=task_id,
                        version=1,
                        body=body,
                        deleted=body is None,
                        updated_at=now,
                    )
                    excluded = statement.excluded
                    statement = statement.on_conflict_do_update(
                        index_elements=[a.id],
                        set_={
                            "version": a.version + 1,
                            "body": excluded.body,
                            "deleted": excluded.deleted,
                            "task_id": func.coalesce(excluded.task_id, a.task_id),
                            "updated_at": excluded.updated_at,
                        },
                    ).returning(a.version)
                    version = (await conn.execute(statement)).scalar_one()
                    versions.append(version)
                    newer = {
                        "wanted_version": version,
                        "next_attempt_at": now,
                        "attempts": 0,
                        "pending_since": case((d.wanted_version > d.delivered_version, d.pending_since), else_=now),
                    }
                    for target in targets:
                        await conn.execute(self._want(target, annotation_id, version, now, newer))
                answers.append(versions)
        return answers

    @_to_the_end
    async def want_all(self, project: str, target: str) -> int:
        """Manual export sync: every annotation of the project is wanted again at the target
        (the worker skips objects whose content is unchanged). Returns how many."""
        now = time.time()
        async with self.registry._begin() as conn:
            rows = (
                await conn.execute(
                    select(annotations_table.c.id, annotations_table.c.version).where(
                        annotations_table.c.project == project
                    )
                )
            ).all()
            again = {"delivered_version": 0, "next_attempt_at": now, "attempts": 0, "pending_since": now}
            for annotation_id, version in rows:
                await conn.execute(self._want(target, annotation_id, version, now, again))
        return len(rows)

    def _want(self, target: str, annotation_id: int, version: int, now: float, known: dict[str, Any]) -> Any:
        """A delivery of `version` to `target`: a new row, or the existing one updated with `known`."""
        d = deliveries_table.c
        return (
            self._insert(deliveries_table)
            .values(
                target_id=target,
                annotation_id=annotation_id,
                wanted_version=version,
                delivered_version=0,
                pending_since=now,
                next_attempt_at=now,
                attempts=0,
            )
            .on_conflict_do_update(index_elements=[d.target_id, d.annotation_id], set_=known)
        )

    @_to_the_end
    async def lease(self, worker: str, limit: int, seconds: float) -> list[Delivery]:
        """Pending deliveries this worker now holds for `seconds` (others skip them meanwhile)."""
        now = time.time()
        d = deliveries_table.c
        candidates = select(d.target_id, d.annotation_id).where(_pending(now)).order_by(d.next_attempt_at).limit(limit)
        if self.registry.dialect == "postgresql":
            candidates = candidates.with_for_update(skip_locked=True)
        leased: list[Delivery] = []
        async with self.registry._begin() as conn:
            for target_id, annotation_id in (await conn.execute(candidates)).all():
                mine = and_(d.target_id == target_id, d.annotation_id == annotation_id, _pending(now))
                result = await conn.execute(
                    update(deliveries_table)
                    .where(mine)
                    .values(lease_owner=worker, lease_until=now + seconds)
                    .returning(d.wanted_version, d.attempts)
                )
                row = result.one_or_none()
                if row is not None:
                    leased.append(Delivery(target_id, annotation_id, row.wanted_version, row.attempts, now + seconds))
        return leased

    @_to_the_end
    async def release(self, delivery: Delivery, worker: str) -> None:
        """Give a leased delivery back untried (its lease ran out before its turn came)."""
        async with self.registry._begin() as conn:
            await conn.execute(_update(delivery, worker).values(lease_owner=None, lease_until=None))

    async def state(self, annotation_id: int) -> AnnotationState | None:
        a = annotations_table.c
        async with self.registry._connect() as conn:
            query = select(a.version, a.body, a.deleted, a.task_id, a.project).where(a.id == annotation_id)
            row = (await conn.execute(query)).one_or_none()
        return None if row is None else AnnotationState(row.version, row.body, row.deleted, row.task_id, row.project)

    async def task_annotations(self, project: str, task_id: int) -> dict[int, AnnotationState]:
        """Every annotation the gateway knows of one task (deleted ones included), by id: what a
        target storage in Label Studio's per-task layout writes as one object."""
        a = annotations_table.c
        query = select(a.id, a.version, a.body, a.deleted).where(a.project == project, a.task_id == task_id)
        async with self.registry._connect() as conn:
            rows = (await conn.execute(query.order_by(a.id))).all()
        return {row.id: AnnotationState(row.version, row.body, row.deleted, task_id, project) for row in rows}

    @_to_the_end
    async def delivered(self, delivery: Delivery, worker: str, version: int) -> None:
        """`version` (or newer) is in the storage; a newer wanted version stays pending.

        A worker that lost its lease meanwhile (it outlived `lease_seconds`) may have written
        after the one that took the delivery over, so an older version could be in the storage
        now: the delivery is wanted again (and the lease of whoever holds it now is voided, so
        its own acknowledgement cannot hide this). The rewrite of an unchanged object is cheap.
        """
        d = deliveries_table.c
        now = time.time()
        async with self.registry._begin() as conn:
            result = await conn.execute(
                _update(delivery, worker).values(
                    delivered_version=case((d.delivered_version > version, d.delivered_version), else_=version),
                    lease_owner=None,
                    lease_until=None,
                    attempts=0,
                    last_error=None,
                    delivered_at=now,
                    pending_since=case((d.wanted_version > version, d.pending_since), else_=None),
                )
            )
            if result.rowcount == 0:
                await conn.execute(
                    _update(delivery).values(
                        delivered_version=0,
                        lease_owner=None,
                        lease_until=None,
                        next_attempt_at=now,
                        pending_since=func.coalesce(d.pending_since, now),
                    )
                )

    @_to_the_end
    async def failed(self, delivery: Delivery, worker: str, error: str, retry_in: float) -> None:
        d = deliveries_table.c
        async with self.registry._begin() as conn:
            await conn.execute(
                _update(delivery, worker).values(
                    attempts=d.attempts + 1,
                    next_attempt_at=time.time() + retry_in,
                    lease_owner=None,
                    lease_until=None,
                    last_error=error[:500],
                )
            )

    async def status(self, targets: list[str]) -> dict[str, dict[str, Any]]:
        """Per target: pending deliveries, the oldest pending age, failing ones, the last error;
        annotations delivered (their current version in the storage) and the last delivery time."""
        d = deliveries_table.c
        now = time.time()
        pending = d.wanted_version > d.delivered_version
        answer: dict[str, dict[str, Any]] = {
            t: {
                "pending": 0,
                "oldest_pending_seconds": None,
                "failing": 0,
                "last_error": None,
                "delivered": 0,
                "last_delivered_at": None,
            }
            for t in targets
        }
        if not targets:
            return answer
        async with self.registry._connect() as conn:
            rows = await conn.execute(
                select(
                    d.target_id,
                    func.sum(case((pending, 1), else_=0)),
                    func.min(case((pending, d.pending_since), else_=None)),
                    func.sum(case((and_(pending, d.last_error.is_not(None)), 1), else_=0)),
                    func.sum(case((pending, 0), else_=1)),
                    func.max(d.delivered_at),
                )
                .where(d.target_id.in_(targets))
                .group_by(d.target_id)
            )
            for target, count, since, failing, delivered, last in rows:
                answer[target].update(
                    pending=int(count or 0),
                    oldest_pending_seconds=None if since is None else round(now - since, 3),
                    failing=int(failing or 0),
                    delivered=int(delivered or 0),
                    last_delivered_at=last,
                )
            errors = await conn.execute(
                select(d.target_id, d.last_error)
                .where(d.target_id.in_(targets), d.last_error.is_not(None), pending)
                .order_by(d.next_attempt_at.desc())
            )
            for target, error in errors:
                if answer[target]["last_error"] is None:
                    answer[target]["last_error"] = error
        return answer


class Recorder:
    """Group commit for annotation events: requests that arrive while a transaction is being
    written wait for the next one, which records all of them together. Each request is still
    answered only after its events are committed; under concurrent senders the registry does one
    transaction (one commit, on PostgreSQL one flush) per batch instead of one per request.

    A batch that fails for any reason but an unreachable registry is retried one request at a
    time, so a request the database refuses fails alone. `max_batch = 1` records each request in
    its own transaction, in arrival order (what SQLite is given, see gateway/app.py).
    """

    def __init__(self, outbox: Outbox, max_batch: int = 256) -> None:
        self.outbox = outbox
        self.max_batch = max_batch
        self._waiting: list[tuple[Batch, asyncio.Future[list[int]]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def record(
        self, project: str, events: list[tuple[int, int | None, dict[str, Any] | None]], targets: list[str]
    ) -> list[int]:
        answer: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._waiting.append(((project, events, targets), answer))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())
        return await asyncio.shield(answer)  # a caller that goes away leaves the batch alone

    async def _write(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
            try:
                results = await self.outbox.record_many([item for item, _ in batch])
            except RegistryUnavailable as exc:
                for _, answer in batch:
                    answer.set_exception(exc)
                continue
            except Exception:
                for item, answer in batch:
                    try:
                        answer.set_result((await self.outbox.record_many([item]))[0])
                    except Exception as exc:
                        answer.set_exception(exc)
                continue
            for (_, answer), versions in zip(batch, results, strict=True):
                answer.set_result(versions)
