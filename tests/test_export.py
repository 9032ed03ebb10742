"""Annotation export (issue 6): Label Studio webhooks and the native API into the outbox, the
export worker out to target storages (fake-gcs-server and a local directory), on SQLite and
PostgreSQL.

Payloads follow Label Studio's documented webhook shapes (labelstud.io/guide/webhook_reference):
ANNOTATION_CREATED / ANNOTATION_UPDATED carry one annotation (its `task` an id) with the task
and project objects; ANNOTATIONS_CREATED carries lists; ANNOTATIONS_DELETED carries
`annotations: [{"id": …}]`. Every wait polls with a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy import select

from gateway import metrics
from gateway.app import create_app
from gateway.export.label_studio_object import storage_object
from gateway.export.worker import ExportWorker, object_bytes
from gateway.registry.outbox import Outbox
from gateway.registry.sql import SqlTaskRegistry
from gateway.state import CATALOG, EXPORT_WORKER, RECORDER, REGISTRY, SETTINGS

from .conftest import build_settings, free_port, make_token
from .test_api_openapi import check_answer
from .test_faults import FaultProxy

LS_PROJECT = 3  # Label Studio's project id, mapped to the gateway project below
GATEWAY_PROJECT = "cats"
HOOK = "/api/webhooks/label-studio"
SECRET_HEADER = "X-Gateway-Webhook-Secret"
HOOK_SECRET = "shared-webhook-secret-0123456789"
HMAC_SECRET = "hmac-webhook-secret-0123456789ab"
GOOD = {SECRET_HEADER: HOOK_SECRET}
ADMIN = {"Authorization": f"Bearer {make_token('root', admin=True)}"}


# -- Label Studio's payloads -------------------------------------------------------------------


def ls_project() -> dict[str, Any]:
    return {
        "id": LS_PROJECT,
        "title": "Cats",
        "description": "",
        "label_config": '<View><Image name="image" value="$image"/><Choices name="choice" toName="image">'
        '<Choice value="Cat"/><Choice value="Dog"/></Choices></View>',
        "expert_instruction": "",
        "show_instruction": False,
        "show_skip_button": True,
        "enable_empty_annotation": True,
        "maximum_annotations": 1,
        "model_version": "",
        "is_published": True,
        "is_draft": False,
        "created_by": 1,
        "created_at": "2024-05-01T09:00:00.000000Z",
        "min_annotations_to_start_training": 0,
        "start_training_on_annotation_update": False,
        "show_collab_predictions": True,
        "num_tasks_with_annotations": 1,
        "task_number": 10,
        "useful_annotation_number": 1,
        "ground_truth_number": 0,
        "skipped_annotations_number": 0,
        "total_annotations_number": 1,
        "total_predictions_number": 0,
        "sampling": "Sequential sampling",
        "show_ground_truth_first": False,
        "show_overlap_first": False,
        "overlap_cohort_percentage": 100,
        "task_data_login": None,
        "task_data_password": None,
        "control_weights": {},
        "evaluate_predictions_automatically": False,
        "skip_queue": "REQUEUE_FOR_OTHERS",
        "reveal_preannotations_interactively": False,
        "pinned_at": None,
        "finished_task_number": 1,
        "queue_total": 9,
        "queue_done": 1,
    }


def ls_task(task_id: int) -> dict[str, Any]:
    return {
        "id": task_id,
        "data": {"image": f"gs://media-bucket/images/{task_id}.jpg"},
        "meta": {},
        "created_at": "2024-05-01T09:30:00.000000Z",
        "updated_at": "2024-05-01T10:00:00.000000Z",
        "is_labeled": True,
        "overlap": 1,
        "inner_id": task_id,
        "total_annotations": 1,
        "cancelled_annotations": 0,
        "total_predictions": 0,
        "comment_count": 0,
        "unresolved_comment_count": 0,
        "last_comment_updated_at": None,
        "project": LS_PROJECT,
        "updated_by": None,
        "file_upload": None,
        "comment_authors": [],
    }


def ls_annotation(annotation_id: int, task_id: int, label: str = "Cat", user: int = 1) -> dict[str, Any]:
    return {
        "id": annotation_id,
        "result": [
            {
                "id": "a1b2c3",
                "type": "choices",
                "value": {"choices": [label]},
                "origin": "manual",
                "to_name": "image",
                "from_name": "choice",
            }
        ],
        "created_username": f" annotator{user}@example.com, {user}",
        "created_ago": "0\xa0minutes",
        "completed_by": user,
        "was_cancelled": False,
        "ground_truth": False,
        "created_at": "2024-05-01T10:00:00.000000Z",
        "updated_at": "2024-05-01T10:00:00.000000Z",
        "draft_created_at": None,
        "lead_time": 3.2,
        "import_id": None,
        "last_action": None,
        "task": task_id,
        "project": LS_PROJECT,
        "updated_by": user,
        "parent_prediction": None,
        "parent_annotation": None,
        "last_created_by": None,
    }


def created(annotation_id: int, task_id: int, label: str = "Cat", action: str = "ANNOTATION_CREATED") -> dict:
    return {
        "action": action,
        "annotation": ls_annotation(annotation_id, task_id, label),
        "task": ls_task(task_id),
        "project": ls_project(),
    }


def updated(annotation_id: int, task_id: int, label: str) -> dict:
    return created(annotation_id, task_id, label, action="ANNOTATION_UPDATED")


def bulk(pairs: list[tuple[int, int]], label: str = "Cat") -> dict:
    return {
        "action": "ANNOTATIONS_CREATED",
        "annotation": [ls_annotation(a, t, label) for a, t in pairs],
        "task": [ls_task(t) for t in sorted({t for _, t in pairs})],
        "project": ls_project(),
    }


def deleted(*annotation_ids: int) -> dict:
    return {
        "action": "ANNOTATIONS_DELETED",
        "annotations": [{"id": a} for a in annotation_ids],
        "project": ls_project(),
    }


# -- the world ---------------------------------------------------------------------------------


def writes(target: str, operation: str, result: str = "ok") -> float:
    return metrics.EXPORT_WRITES.labels(target, operation, result)._value.get()


async def eventually(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 20.0) -> Any:
    """Poll an async check until it returns something truthy (a deadline, never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@dataclass
class World:
    client: Any
    kind: str
    bucket: str
    target: str
    prefix: str
    registry_url: str
    gcs: str  # the emulator's URL
    root: Path | None
    http: aiohttp.ClientSession
    tmp_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def app(self) -> Any:
        return self.client.server.app

    @property
    def outbox(self) -> Outbox:
        return Outbox(self.app[REGISTRY])

    @property
    def worker(self) -> ExportWorker:
        return self.app[EXPORT_WORKER]

    def key(self, annotation_id: int) -> str:
        return self.app[SETTINGS].export_storages[0].object_key(annotation_id)

    async def post(
        self, payload: Any, status: int = 200, headers: dict[str, str] | None = GOOD, raw: bytes | None = None
    ) -> Any:
        data = raw if raw is not None else json.dumps(payload).encode()
        response = await self.client.post(HOOK, data=data, headers={"Content-Type": "application/json", **headers})
        text = await response.text()
        assert response.status == status, f"{response.status} {text}"
        check_answer("POST", HOOK, response.status, response.content_type, text)
        return json.loads(text)

    async def call(self, method: str, path: str, status: int, body: Any = None, headers: Any = ADMIN) -> Any:
        response = await self.client.request(
            method, path, data=None if body is None else json.dumps(body), headers=headers
        )
        text = await response.text()
        assert response.status == status, f"{method} {path}: {response.status} {text}"
        check_answer(method, path, response.status, response.content_type, text)
        return json.loads(text)

    async def read(self, annotation_id: int) -> tuple[Any, str | None] | None:
        """The object's JSON and content type (None: no object)."""
        key = self.key(annotation_id)
        if self.root is not None:
            path = self.root / key
            return (json.loads(path.read_bytes()), None) if path.is_file() else None
        url = f"{self.gcs}/storage/v1/b/{self.bucket}/o/{quote(key, safe='')}"
        async with self.http.get(url) as meta:
            if meta.status == 404:
                return None
            assert meta.status == 200, await meta.text()
            content_type = (await meta.json())["contentType"]
        async with self.http.get(url, params={"alt": "media"}) as media:
            assert media.status == 200
            return json.loads(await media.read()), content_type

    async def keys(self) -> list[str]:
        if self.root is not None:
            return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())
        names: list[str] = []
        token = None
        while True:
            params = {"prefix": self.prefix, **({"pageToken": token} if token else {})}
            async with self.http.get(f"{self.gcs}/storage/v1/b/{self.bucket}/o", params=params) as listing:
                assert listing.status == 200, await listing.text()
                body = await listing.json()
            names += [item["name"] for item in body.get("items", [])]
            token = body.get("nextPageToken")
            if not token:
                return sorted(names)

    async def status(self) -> dict[str, Any]:
        return (await self.outbox.status([self.target]))[self.target]

    async def drained(self, timeout: float = 20.0) -> dict[str, Any]:
        async def empty() -> Any:
            status = await self.status()
            return status if status["pending"] == 0 else None

        return await eventually(empty, "the outbox to drain", timeout)

    async def content(self, annotation_id: int, timeout: float = 20.0) -> Any:
        """The object's JSON once the outbox is drained (None when there is no object)."""
        await self.drained(timeout)
        found = await self.read(annotation_id)
        return None if found is None else found[0]


@pytest.fixture
async def export_world(registry_url, emulator, tmp_path, aiohttp_client, monkeypatch):
    """Factory of gateways exporting to one target storage (GCS or a local directory)."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.host)
    http = aiohttp.ClientSession()

    async def build(
        kind: str = "gcs",
        *,
        can_delete_objects: bool = True,
        json_extension: bool = False,
        layout: str = "annotation",
        create_bucket: bool = True,
        webhooks: dict[str, Any] | None = None,
        export: dict[str, Any] | None = None,
        workers: bool = True,
        gcs_host: str | None = None,
        label_studio: dict[str, Any] | None = None,
    ) -> World:
        bucket = f"export-{uuid.uuid4().hex[:12]}"
        target_id = f"t-{uuid.uuid4().hex[:8]}"
        target: dict[str, Any] = {
            "id": target_id,
            "project": GATEWAY_PROJECT,
            "type": kind,
            "bucket": bucket,
            "prefix": "annotations",
            "can_delete_objects": can_delete_objects,
            "json_extension": json_extension,
            "layout": layout,
        }
        root = None
        if kind == "local":
            root = tmp_path / bucket
            root.mkdir()
            target["root"] = str(root)
        elif create_bucket:
            emulator.create_bucket(bucket)
        settings = build_settings(
            [],
            tmp_path,
            registry={"url": registry_url},
            webhooks=(
                {"secret": HOOK_SECRET, "header": SECRET_HEADER, "project_map": [f"{LS_PROJECT}={GATEWAY_PROJECT}"]}
                if webhooks is None
                else webhooks
            ),
            export={"poll_interval": 0.05, "retry_base": 0.02, "retry_max": 0.2, **(export or {})},
            export_storages=[target],
            **({"label_studio": label_studio} if label_studio else {}),
        )
        if gcs_host is not None:  # e.g. a port where GCS is not (yet) listening
            monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_host)
        client = await aiohttp_client(create_app(settings, workers=workers))
        return World(client, kind, bucket, target_id, "annotations/", registry_url, emulator.url, root, http, tmp_path)

    build.emulator = emulator  # type: ignore[attr-defined]
    yield build
    await http.close()


# -- round trip --------------------------------------------------------------------------------


async def test_the_per_task_layout_keeps_one_object_per_task(export_world):
    """Label Studio's FUTURE_SAVE_TASK_TO_STORAGE layout: `<prefix><task id>.json`, the task with
    every annotation of it. Annotations of one task arriving at once (written by concurrent
    deliveries of one worker) all end up in the object; an update replaces its annotation; a
    delete rewrites the object without it, and the last one deletes the object."""
    world = await export_world(layout="task", json_extension=True, export={"concurrency": 8})
    assert world.key(21) == "annotations/21.json"
    await asyncio.gather(*(world.post(created(a, 21)) for a in range(2101, 2106)), world.post(created(2201, 22)))
    obj = await world.content(21)
    assert [a["id"] for a in obj["annotations"]] == list(range(2101, 2106))
    assert all(a["task"] == 21 and a["completed_by"] == 1 for a in obj["annotations"])  # no api_token: the id
    assert obj["id"] == 21 and obj["data"] == ls_task(21)["data"] and obj["drafts"] == obj["predictions"] == []
    assert "is_labeled" not in obj and "overlap" not in obj
    assert [a["id"] for a in (await world.content(22))["annotations"]] == [2201]
    assert sorted(await world.keys()) == ["annotations/21.json", "annotations/22.json"]

    await world.post(updated(2103, 21, "Dog"))
    obj = await world.content(21)
    assert [a["result"][0]["value"]["choices"] for a in obj["annotations"]] == [
        ["Cat"],
        ["Cat"],
        ["Dog"],
        ["Cat"],
        ["Cat"],
    ]
    await world.post(deleted(2101, 2102))
    assert [a["id"] for a in (await world.content(21))["annotations"]] == [2103, 2104, 2105]
    await world.post(deleted(2201))
    assert await world.content(22) is None
    assert await world.keys() == ["annotations/21.json"]


@pytest.mark.parametrize("kind", ["gcs", "local"])
async def test_label_studio_payloads_round_trip_to_the_bucket(export_world, kind):
    world = await export_world(kind)
    answer = await world.post(created(101, 11))
    assert answer == {"status": "recorded", "action": "ANNOTATION_CREATED", "count": 1, "versions": [1]}
    obj = await world.content(101)
    assert world.key(101) == "annotations/101"
    assert obj["id"] == 101 and obj["completed_by"] == 1
    assert obj["result"][0]["value"] == {"choices": ["Cat"]}
    assert obj["task"]["id"] == 11
    assert obj["task"]["data"] == {"image": "gs://media-bucket/images/11.jpg"}  # raw, never resolved
    if kind == "gcs":
        _, content_type = await world.read(101)
        assert content_type == "application/json"

    answer = await world.post(bulk([(102, 12), (103, 12), (104, 13)], label="Dog"))
    assert answer["count"] == 3 and answer["action"] == "ANNOTATIONS_CREATED"
    await world.drained()
    for annotation_id, task_id in ((102, 12), (103, 12), (104, 13)):
        obj, _ = await world.read(annotation_id)
        assert obj["task"]["id"] == task_id and obj["task"]["data"]["image"].endswith(f"/{task_id}.jpg")
        assert obj["result"][0]["value"]["choices"] == ["Dog"]

    assert (await world.post(updated(101, 11, "Dog")))["versions"] == [2]
    await eventually(lambda: _label_is(world, 101, "Dog"), "the update to reach the object")
    assert (await world.post(deleted(101, 102)))["count"] == 2
    await world.drained()
    assert await world.read(101) is None and await world.read(102) is None
    assert await world.keys() == ["annotations/103", "annotations/104"]
    status = await world.status()
    assert {k: status[k] for k in ("pending", "oldest_pending_seconds", "failing", "last_error", "delivered")} == {
        "pending": 0,
        "oldest_pending_seconds": None,
        "failing": 0,
        "last_error": None,
        "delivered": 4,  # two objects written, two deleted
    }
    assert status["last_delivered_at"] is not None


async def _label_is(world: World, annotation_id: int, label: str) -> bool:
    found = await world.read(annotation_id)
    return found is not None and found[0]["result"][0]["value"]["choices"] == [label]


async def test_json_extension_and_the_singular_bulk_keys(export_world):
    world = await export_world(json_extension=True)
    payload = bulk([(201, 21)])
    payload["annotations"] = payload.pop("annotation")  # either spelling of the list
    await world.post(payload)
    assert world.key(201) == "annotations/201.json"
    obj = await world.content(201)
    assert obj["id"] == 201 and obj["task"]["data"]["image"] == "gs://media-bucket/images/21.jpg"
    assert await world.keys() == ["annotations/201.json"]
    await world.post({"action": "ANNOTATIONS_DELETED", "annotation": [{"id": 201}], "project": {"id": LS_PROJECT}})
    assert await world.content(201) is None


async def test_delete_without_can_delete_objects_keeps_the_object(export_world):
    world = await export_world(can_delete_objects=False)
    await world.post(created(301, 31))
    await world.post(updated(301, 31, "Dog"))
    assert (await world.content(301))["result"][0]["value"]["choices"] == ["Dog"]
    kept = writes(world.target, "kept")
    await world.post(deleted(301))
    obj = await world.content(301)
    assert obj is not None and obj["result"][0]["value"]["choices"] == ["Dog"]  # the last state written stays
    assert writes(world.target, "kept") == kept + 1
    state = await world.outbox.state(301)
    assert state is not None and state.deleted and state.version == 3


# -- who may send ------------------------------------------------------------------------------


async def nothing_recorded(world: World, annotation_id: int) -> None:
    assert (await world.status())["pending"] == 0
    assert await world.outbox.state(annotation_id) is None


async def test_wrong_or_missing_secret_is_401_and_records_nothing(export_world):
    world = await export_world(workers=False)  # nothing drains: anything recorded would stay pending
    for headers in ({}, {SECRET_HEADER: "wrong-secret-0123456789abcdef"}, {SECRET_HEADER: ""}):
        answer = await world.post(created(401, 41), 401, headers=headers)
        assert answer["error"] == "bad_webhook_secret"
    await nothing_recorded(world, 401)
    await world.post(created(401, 41))  # the right secret
    assert (await world.status())["pending"] == 1


async def test_hmac_signature(export_world):
    world = await export_world(
        workers=False,
        webhooks={"hmac_secret": HMAC_SECRET, "project_map": [f"{LS_PROJECT}={GATEWAY_PROJECT}"]},
    )
    body = json.dumps(created(501, 51)).encode()
    signature = hmac.new(HMAC_SECRET.encode(), body, hashlib.sha256).hexdigest()
    for wrong in ("sha256=" + "0" * 64, signature[:-1], "", hmac.new(b"other-key", body, hashlib.sha256).hexdigest()):
        await world.post(None, 401, raw=body, headers={"X-Signature-256": wrong})
    await world.post(None, 401, raw=body, headers=GOOD)  # the shared-secret header is not configured here
    await nothing_recorded(world, 501)
    assert (await world.post(None, raw=body, headers={"X-Signature-256": f"sha256={signature}"}))["count"] == 1
    assert (await world.post(None, raw=body, headers={"X-Signature-256": signature.upper()}))["versions"] == [2]
    assert (await world.status())["pending"] == 1


async def test_webhooks_not_configured_is_503(export_world):
    world = await export_world(workers=False, webhooks={})
    answer = await world.post(created(601, 61), 503, headers=GOOD)
    assert answer["error"] == "webhooks_disabled"
    await nothing_recorded(world, 601)


async def test_unknown_actions_are_ignored_and_malformed_payloads_named(export_world):
    world = await export_world(workers=False)
    answer = await world.post({"action": "PROJECT_UPDATED", "project": ls_project()})
    assert answer == {"status": "ignored", "action": "PROJECT_UPDATED"}
    answer = await world.post({"action": "TASKS_CREATED", "tasks": [ls_task(1)], "project": ls_project()})
    assert answer["status"] == "ignored"

    async def bad(payload: Any, error: str, *words: str, raw: bytes | None = None) -> None:
        answer = await world.post(payload, 400, raw=raw)
        assert answer["error"] == error, answer
        for word in words:
            assert word in answer["message"], answer

    await bad(None, "bad_json", "JSON", raw=b"{not json")
    await bad(None, "bad_json", "JSON", raw=b'{"action": "ANNOTATION_CREATED", "x": NaN}')
    await bad(None, "bad_json", "JSON", raw=b"\xff\xfe")
    await bad(["ANNOTATION_CREATED"], "bad_payload", "action")
    await bad({"annotation": ls_annotation(1, 1)}, "bad_payload", "action")
    no_id = created(701, 71)
    del no_id["annotation"]["id"]
    await bad(no_id, "bad_payload", "annotation[0].id")
    text_id = created(701, 71)
    text_id["annotation"]["id"] = "701"
    await bad(text_id, "bad_payload", "annotation[0].id")
    await bad({**created(701, 71), "annotation": "x"}, "bad_payload", "annotation")
    await bad({**created(701, 71), "annotation": []}, "bad_payload", "annotation")
    no_project = created(701, 71)
    del no_project["project"]
    await bad(no_project, "bad_payload", "project")
    await bad({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": True}], "project": {"id": 3}}, "bad_payload")
    await bad({"action": "ANNOTATIONS_DELETED", "annotations": [{}], "project": {"id": 3}}, "bad_payload", "[0].id")
    bad_task = created(701, 71)
    bad_task["annotation"]["task"] = 2**70
    await bad(bad_task, "bad_payload", "task")
    await nothing_recorded(world, 701)


# -- the native API ----------------------------------------------------------------------------


async def test_native_put_and_delete(export_world):
    world = await export_world()
    [task_id] = await world.app[REGISTRY].add_tasks(
        GATEWAY_PROJECT, [{"data": {"image": "gs://media-bucket/images/n.jpg"}, "meta": {"k": 1}}]
    )
    path = f"/api/tasks/{task_id}/annotations/801"
    annotation = {"result": [{"type": "choices", "value": {"choices": ["Cat"]}}], "completed_by": 9}
    await world.call("PUT", path, 401, annotation, headers={})
    user = {"Authorization": f"Bearer {make_token('alice', tasks=[task_id])}"}
    await world.call("PUT", path, 403, annotation, headers=user)
    await world.call("DELETE", path, 403, headers=user)
    await world.call("PUT", "/api/tasks/999999/annotations/801", 404, annotation)
    await world.call("DELETE", "/api/tasks/999999/annotations/801", 404)
    await world.call("PUT", path, 400, "not an object")
    await nothing_recorded(world, 801)

    answer = await world.call("PUT", path, 200, annotation)
    assert answer == {"id": 801, "task": task_id, "version": 1, "status": "recorded"}
    obj = await world.content(801)
    assert obj["id"] == 801 and obj["completed_by"] == 9 and obj["result"] == annotation["result"]
    assert obj["task"]["id"] == task_id and obj["task"]["data"] == {"image": "gs://media-bucket/images/n.jpg"}
    assert "storage" not in obj["task"]
    assert (await world.call("DELETE", path, 200))["version"] == 2
    assert await world.content(801) is None


# -- ordering ----------------------------------------------------------------------------------


async def test_versions_recorded_quickly_end_with_the_last(export_world):
    world = await export_world()
    labels = [f"label-{n}" for n in range(12)]
    await world.post(created(901, 91, labels[0]))
    for label in labels[1:]:
        await world.post(updated(901, 91, label))
    assert (await world.content(901))["result"][0]["value"]["choices"] == [labels[-1]]
    assert (await world.outbox.state(901)).version == len(labels)

    await world.post(updated(901, 91, "final"))
    await world.post(deleted(901))  # right behind the update
    assert await world.content(901) is None
    await world.post(created(902, 92))
    await world.post(deleted(902))
    await world.post(updated(902, 92, "back"))  # recreated after the delete: the update wins
    assert (await world.content(902))["result"][0]["value"]["choices"] == ["back"]


async def test_concurrent_events_share_transactions_and_a_refused_one_fails_alone(export_world):
    """Group commit: requests that arrive while a transaction is written are recorded together,
    in order per annotation; a batch the database refuses is retried request by request."""
    world = await export_world(workers=False)
    recorder = world.app[RECORDER]
    recorder.max_batch = 256  # the PostgreSQL setting; it records the same on SQLite
    batches: list[list[int]] = []
    original = recorder.outbox.record_many

    async def refusing(items: Any) -> Any:  # the database refusing one request's data
        batches.append([event[0] for _, events, _ in items for event in events])
        if any(event[0] == 1999 for _, events, _ in items for event in events):
            raise ValueError("the database refuses this row")
        return await original(items)

    recorder.outbox.record_many = refusing
    posts = [world.post(created(1900 + n, 190, "first")) for n in range(30)]
    posts += [world.post(updated(1900 + n, 190, "second")) for n in range(30)]
    refused = world.client.post(HOOK, data=json.dumps(created(1999, 190)), headers=GOOD)
    *answers, bad = await asyncio.gather(*posts, refused)
    assert bad.status == 500 and (await bad.json())["error"] == "internal_error"
    assert max(len(batch) for batch in batches) > 1  # some requests shared a transaction
    assert [a["versions"] for a in answers[:60]] == [[1]] * 30 + [[2]] * 30
    for n in range(30):
        state = await world.outbox.state(1900 + n)
        assert state.version == 2 and state.body["result"][0]["value"]["choices"] == ["second"]
    assert await world.outbox.state(1999) is None
    assert (await world.status())["pending"] == 30


class GatedBackend:
    """Wraps a backend: the first upload waits until released; counts successful uploads per key."""

    def __init__(self, inner: Any, gate: bool = True) -> None:
        self.inner = inner
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        if not gate:
            self.release.set()
        self.uploads: dict[str, int] = {}
        self.contents: dict[str, list[bytes]] = {}

    async def put_object(self, key: str, data: bytes, content_type: str) -> str:
        self.entered.set()
        await self.release.wait()
        generation = await self.inner.put_object(key, data, content_type)
        self.uploads[key] = self.uploads.get(key, 0) + 1
        self.contents.setdefault(key, []).append(data)
        return generation

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_an_update_during_an_upload_is_written_after_it(export_world):
    world = await export_world()
    gated = GatedBackend(world.app[CATALOG].targets.backends[world.target])
    world.app[CATALOG].targets.backends[world.target] = gated
    await world.post(created(1001, 101, "first"))
    await asyncio.wait_for(gated.entered.wait(), 10)  # the first version is being uploaded now
    await world.post(updated(1001, 101, "second"))
    assert (await world.status())["pending"] == 1
    gated.release.set()
    assert (await world.content(1001))["result"][0]["value"]["choices"] == ["second"]
    written = [json.loads(data)["result"][0]["value"]["choices"] for data in gated.contents[world.key(1001)]]
    assert written[-1] == ["second"]


class FirstHeld(GatedBackend):
    """Only the first upload waits to be released; later ones (another worker's) go through."""

    async def put_object(self, key: str, data: bytes, content_type: str) -> str:
        if self.entered.is_set():
            return await GatedBackend(self.inner, gate=False).put_object(key, data, content_type)
        return await super().put_object(key, data, content_type)


async def test_a_task_object_written_from_an_older_read_is_written_again(export_world):
    """Per-task layout, two workers (as on two replicas): the first writes task 31's object from a
    read that had one annotation and is held; meanwhile a second annotation arrives and the other
    worker writes both; when the first write lands, the object would lack the second — so the
    writer looks again and writes the object once more."""
    world = await export_world(layout="task", json_extension=True)
    inner = world.app[CATALOG].targets.backends[world.target]
    held = FirstHeld(inner)
    world.app[CATALOG].targets.backends[world.target] = held
    await world.post(created(3101, 31))
    await asyncio.wait_for(held.entered.wait(), 10)  # the app's worker: {3101}, held
    await world.post(created(3102, 31))
    other = ExportWorker(world.app[CATALOG])
    assert await other.drain_once() == 1  # 3102's delivery: writes {3101, 3102}
    stored = json.loads(await (await world.http.get(_media_url(world, world.key(31)))).read())
    assert [a["id"] for a in stored["annotations"]] == [3101, 3102]
    held.release.set()
    obj = await world.content(31)  # the held write lands, then the object is written again
    assert [a["id"] for a in obj["annotations"]] == [3101, 3102]


def _media_url(world: World, key: str) -> str:
    return f"{world.gcs}/storage/v1/b/{world.bucket}/o/{quote(key, safe='')}?alt=media"


async def test_a_delivery_whose_lease_ran_out_while_waiting_is_given_back_untried(export_world):
    """Uploads one at a time, the first held: the others' leases run out while they wait their
    turn, so this worker gives them back instead of uploading what another may own by now."""
    world = await export_world(workers=False, export={"lease_seconds": 1.0, "concurrency": 1, "batch": 3})
    gated = GatedBackend(world.app[CATALOG].targets.backends[world.target])
    world.app[CATALOG].targets.backends[world.target] = gated
    await world.post(bulk([(1401, 140), (1402, 140), (1403, 140)]))
    worker = ExportWorker(world.app[CATALOG], name="slow")
    draining = asyncio.create_task(worker.drain_once())
    await asyncio.wait_for(gated.entered.wait(), 10)

    async def expired() -> bool:  # the held upload's lease (and the others') ran out meanwhile
        return time.time() > await _lease_end(world)

    await eventually(expired, "the leases to run out")
    gated.release.set()
    assert await draining == 3
    assert sum(gated.uploads.values()) <= 1  # the held one may finish or time out; never the others
    rows = await _deliveries(world)
    assert all(owner is None for owner, _ in rows)  # nothing left leased to this worker
    assert sum(1 for _, attempts in rows if attempts == 0) >= 2  # given back untried: no attempt counted
    fresh = ExportWorker(world.app[CATALOG], name="fresh")

    async def delivered() -> bool:
        await fresh.drain_once()
        return (await world.status())["delivered"] == 3

    await eventually(delivered, "a fresh worker to deliver all three")


async def _lease_end(world: World) -> float:
    from gateway.registry.schema import deliveries_table

    async with world.app[REGISTRY]._connect() as conn:
        ends = (await conn.execute(select(deliveries_table.c.lease_until))).scalars().all()
    return max((end for end in ends if end is not None), default=0.0)


async def _deliveries(world: World) -> list[tuple[str | None, int]]:
    from gateway.registry.schema import deliveries_table

    d = deliveries_table.c
    async with world.app[REGISTRY]._connect() as conn:
        return [(row.lease_owner, row.attempts) for row in await conn.execute(select(d.lease_owner, d.attempts))]


# -- failures and recovery ---------------------------------------------------------------------


async def test_annotators_that_label_studio_cannot_name_hold_the_write_back(export_world):
    """With `[label_studio] api_token` set, the object names the annotator as Label Studio's own
    does; while Label Studio cannot be asked (here: nothing listens at its URL), nothing is written
    in another shape — the delivery fails, says why, and is retried."""
    nowhere = f"http://127.0.0.1:{free_port()}"
    world = await export_world(label_studio={"url": nowhere, "api_token": "t" * 40, "timeout": 1.0})
    await world.post(created(1201, 120))

    async def failing() -> Any:
        status = await world.status()
        return status if status["failing"] == 1 else None

    status = await eventually(failing, "the delivery to fail")
    assert status["pending"] == 1 and "Label Studio cannot be asked who user 1 is" in status["last_error"]
    assert "t" * 40 not in status["last_error"]
    failed = writes(world.target, "upload", "failed")
    await eventually(lambda: _bigger(lambda: writes(world.target, "upload", "failed"), failed), "a retry")
    assert await world.keys() == []


async def test_gcs_failing_then_recovering_delivers_every_annotation_once(export_world):
    world = await export_world(create_bucket=False)
    counting = GatedBackend(world.app[CATALOG].targets.backends[world.target], gate=False)
    world.app[CATALOG].targets.backends[world.target] = counting
    ids = list(range(1101, 1111))
    await world.post(bulk([(a, 110) for a in ids[:5]]))
    for a in ids[5:]:
        await world.post(created(a, 111, "Dog"))

    async def failing() -> Any:
        status = await world.status()
        return status if status["failing"] == len(ids) else None

    status = await eventually(failing, "every delivery to fail once")
    assert status["pending"] == len(ids) and "bucket" in status["last_error"]
    assert status["oldest_pending_seconds"] is not None and status["oldest_pending_seconds"] >= 0
    failed = writes(world.target, "upload", "failed")
    await eventually(lambda: _bigger(lambda: writes(world.target, "upload", "failed"), failed), "retries with backoff")
    response = await world.client.get("/readyz")
    assert response.status == 200, await response.text()  # the outbox is the buffer

    export_world.emulator.create_bucket(world.bucket)
    status = await world.drained()
    assert {k: status[k] for k in ("pending", "oldest_pending_seconds", "failing", "last_error", "delivered")} == {
        "pending": 0,
        "oldest_pending_seconds": None,
        "failing": 0,
        "last_error": None,
        "delivered": len(ids),
    }
    assert sorted(counting.uploads) == sorted(world.key(a) for a in ids)
    assert set(counting.uploads.values()) == {1}  # exactly once each
    for a in ids:
        obj, content_type = await world.read(a)
        assert obj["id"] == a and content_type == "application/json"
    assert await world.keys() == sorted(world.key(a) for a in ids)


async def test_gcs_unreachable_then_back_delivers_every_annotation_once_in_order(export_world):
    """Nothing listens where GCS should be (connections refused) while events arrive, updates and
    a delete among them; then GCS comes up there: each annotation's final state lands once."""
    port = free_port()
    world = await export_world(gcs_host=f"127.0.0.1:{port}")
    counting = GatedBackend(world.app[CATALOG].targets.backends[world.target], gate=False)
    world.app[CATALOG].targets.backends[world.target] = counting
    ids = list(range(1151, 1156))
    await world.post(bulk([(a, 115) for a in ids], label="v1"))
    await world.post(updated(1151, 115, "v2"))
    await world.post(updated(1151, 115, "v3"))
    await world.post(deleted(1153))

    async def all_failing() -> Any:
        status = await world.status()
        return status if status["failing"] == len(ids) else None

    status = await eventually(all_failing, "every delivery to fail against the missing GCS")
    assert status["pending"] == len(ids) and status["last_error"]
    assert (await world.client.get("/readyz")).status == 200  # the outbox is the buffer

    proxy = FaultProxy(export_world.emulator.url)  # forwards everything: GCS is back on that port
    runner = web.AppRunner(proxy.app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await world.drained()
    finally:
        await runner.cleanup()
    assert await world.keys() == sorted(world.key(a) for a in ids if a != 1153)
    assert counting.uploads == {world.key(a): 1 for a in ids if a != 1153}  # exactly once, the final state
    assert (await world.read(1151))[0]["result"][0]["value"]["choices"] == ["v3"]


async def _bigger(value: Callable[[], float], than: float) -> bool:
    return value() > than


async def test_a_dead_worker_lease_delays_and_two_workers_never_share(export_world):
    world = await export_world(workers=False, export={"lease_seconds": 10})
    await world.post(bulk([(a, 120) for a in range(1201, 1241)]))
    outbox = world.outbox
    dead = await outbox.lease("dead-worker", 10, 2.0)  # then never delivers
    leased_until = time.time() + 2.0
    assert len(dead) == 10

    registries = [SqlTaskRegistry(world.registry_url) for _ in range(2)]
    workers = [
        ExportWorker(world.app[CATALOG], registry=registry, name=f"w{n}") for n, registry in enumerate(registries)
    ]
    leases: list[tuple[str, int]] = []
    for worker in workers:
        original = worker.outbox.lease

        async def counted(name: str, limit: int, seconds: float, original: Any = original) -> Any:
            got = await original(name, limit, seconds)
            leases.extend((d.target_id, d.annotation_id) for d in got)
            return got

        worker.outbox.lease = counted  # type: ignore[method-assign]
    try:
        # Both drain at once, over and over, until the 30 free deliveries are done.
        async def drain(worker: ExportWorker) -> None:
            while await worker.drain_once():
                pass

        await asyncio.gather(*(drain(w) for w in workers))
        assert len(leases) == 30 and len(set(leases)) == 30  # never the same delivery twice
        assert {a for _, a in leases} == set(range(1201, 1241)) - {d.annotation_id for d in dead}
        assert (await world.status())["pending"] == 10  # the dead worker's, until its lease ends

        async def rest() -> int:
            await asyncio.gather(*(drain(w) for w in workers))
            return (await world.status())["pending"] == 0

        await eventually(rest, "the dead worker's deliveries after its lease")
        assert time.time() >= leased_until
        assert len(leases) == 40 and len(set(leases)) == 40
        for a in range(1201, 1241):
            obj, _ = await world.read(a)
            assert obj["id"] == a
        # The dead worker wakes up late and acknowledges: its write may have landed after the
        # live one, so the delivery is wanted again and rewritten (the same bytes: unchanged).
        unchanged = writes(world.target, "unchanged")
        await outbox.delivered(dead[0], "dead-worker", dead[0].version)
        assert (await world.status())["pending"] == 1
        await eventually(rest, "the rewrite after a stale acknowledgement")
        assert writes(world.target, "unchanged") == unchanged + 1
    finally:
        for registry in registries:
            await registry.close()


# -- idempotence -------------------------------------------------------------------------------


async def test_redelivered_events_and_manual_sync_write_only_changes(export_world):
    world = await export_world()
    payload = created(1301, 130)
    await world.post(payload)
    first = await world.content(1301)
    uploads = writes(world.target, "upload")
    await world.post(payload)  # Label Studio (or a proxy) sends the same event again
    assert await world.content(1301) == first
    assert await world.keys() == [world.key(1301)]
    assert writes(world.target, "upload") == uploads  # same bytes: not even rewritten
    assert (await world.outbox.state(1301)).version == 2

    ids = [1301, *range(1302, 1306)]
    await world.post(bulk([(a, 130) for a in ids[1:]]))
    await world.drained()
    uploads, unchanged = writes(world.target, "upload"), writes(world.target, "unchanged")
    assert await world.outbox.want_all(GATEWAY_PROJECT, world.target) == len(ids)
    world.worker.wake()
    await world.drained()
    assert writes(world.target, "upload") == uploads
    assert writes(world.target, "unchanged") == unchanged + len(ids)

    # Someone changes one object behind the gateway's back: the manual sync puts it right.
    export_world.emulator.upload(world.bucket, world.key(1303), b'{"edited": true}', "application/json")
    await world.outbox.want_all(GATEWAY_PROJECT, world.target)
    world.worker.wake()
    await world.drained()
    assert writes(world.target, "upload") == uploads + 1
    assert writes(world.target, "unchanged") == unchanged + 2 * len(ids) - 1
    obj, _ = await world.read(1303)
    state = await world.outbox.state(1303)
    assert object_bytes(obj) == object_bytes(storage_object(state.body, None, datetime.now(UTC)))


# -- load --------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_thousand_webhooks_from_twenty_senders(export_world):
    world = await export_world()
    total, senders = 1000, 20
    latencies: list[float] = []
    statuses: list[int] = []

    async def sender(first: int) -> None:
        for n in range(first, total, senders):
            body = json.dumps(created(20_000 + n, 2000 + n % 50)).encode()
            started = time.perf_counter()
            response = await world.client.post(HOOK, data=body, headers={"Content-Type": "application/json", **GOOD})
            await response.read()
            latencies.append(time.perf_counter() - started)
            statuses.append(response.status)

    started = time.perf_counter()
    await asyncio.gather(*(sender(s) for s in range(senders)))
    recorded = time.perf_counter() - started
    assert len(statuses) == total and set(statuses) == {200}
    await world.drained(timeout=180)
    exported = time.perf_counter() - started
    keys = await world.keys()
    assert keys == sorted(world.key(20_000 + n) for n in range(total))
    latencies.sort()
    p50, p99 = latencies[total // 2], latencies[int(total * 0.99) - 1]
    print(
        f"\n[{world.registry_url.split(':')[0]}] {total} webhooks from {senders} senders: "
        f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms; "
        f"all recorded in {recorded:.2f} s, all exported in {exported:.2f} s"
    )
