"""Target storages through the API (`/api/storages/export/gcs`, issue 6), against fake-gcs-server,
on SQLite and PostgreSQL: Label Studio's "Add Target Storage" fields, Test connection with a real
write and delete, events delivered to API targets (also ones created through another replica a
moment ago), Sync, status from the outbox, write-only credentials. Every answer is checked
against the OpenAPI description; every wait polls with a deadline.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from prometheus_client import REGISTRY as PROMETHEUS

from gateway.api.export_storages import _refusal
from gateway.app import create_app
from gateway.config import ExportStorageSettings
from gateway.registry.outbox import Outbox
from gateway.state import CATALOG, REGISTRY
from gateway.storage.base import UpstreamDenied
from gateway.vault import Vault

from .conftest import build_settings
from .test_api_openapi import check_answer
from .test_export import (
    ADMIN,
    GATEWAY_PROJECT,
    GOOD,
    HOOK,
    HOOK_SECRET,
    LS_PROJECT,
    SECRET_HEADER,
    bulk,
    created,
    deleted,
    eventually,
    updated,
    writes,
)
from .test_storage_api import assert_no_secret, credentials  # noqa: F401 (a fixture)

TARGETS = "/api/storages/export/gcs"
VAULT_KEY = "an-encryption-key-for-tests-0123456789abcdef"


class Gateway:
    """One gateway app over the shared registry, with helpers for its API and the bucket."""

    def __init__(self, client: Any, http: aiohttp.ClientSession, gcs: str) -> None:
        self.client, self.http, self.gcs = client, http, gcs
        self.app = client.server.app
        self.answers: list[str] = []

    async def call(self, method: str, path: str, status: int, body: Any = None, headers: Any = ADMIN) -> Any:
        data = None if body is None else json.dumps(body)
        response = await self.client.request(method, path, data=data, headers=headers)
        text = await response.text()
        self.answers.append(text)
        assert response.status == status, f"{method} {path}: {response.status} {text}"
        check_answer(method, path, response.status, response.content_type, text)
        return json.loads(text) if text else None

    async def hook(self, payload: Any) -> Any:
        return await self.call("POST", HOOK, 200, payload, headers={**GOOD, "Content-Type": "application/json"})

    async def objects(self, bucket: str, prefix: str = "") -> dict[str, Any]:
        """Every object under the prefix: key -> (JSON content, content type)."""
        found: dict[str, Any] = {}
        async with self.http.get(f"{self.gcs}/storage/v1/b/{bucket}/o", params={"prefix": prefix}) as listing:
            assert listing.status == 200, await listing.text()
            items = (await listing.json()).get("items", [])
        for item in items:
            url = f"{self.gcs}/storage/v1/b/{bucket}/o/{quote(item['name'], safe='')}"
            async with self.http.get(url, params={"alt": "media"}) as media:
                found[item["name"]] = (json.loads(await media.read()), item["contentType"])
        return found

    async def settled(self, target_id: Any, status: str = "completed", timeout: float = 20.0) -> Any:
        async def done() -> Any:
            answer = await self.call("GET", f"{TARGETS}/{target_id}", 200)
            return answer if answer["status"] == status else None

        return await eventually(done, f"target {target_id} to be {status}", timeout)


@pytest.fixture
async def gateways(registry_url, emulator, tmp_path, aiohttp_client, monkeypatch):
    """Factory of gateways sharing a registry; one config-file target storage in the project."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.host)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-adc.json"))
    http = aiohttp.ClientSession()
    config_bucket = f"cfg-{uuid.uuid4().hex[:12]}"
    emulator.create_bucket(config_bucket)

    async def build(*, storage_refresh: float = 0.2, worker: bool = True) -> Gateway:
        settings = build_settings(
            [],
            tmp_path,
            registry={"url": registry_url, "storage_refresh": storage_refresh, "encryption_keys": [VAULT_KEY]},
            webhooks={
                "secret": HOOK_SECRET,
                "header": SECRET_HEADER,
                "project_map": [f"{LS_PROJECT}={GATEWAY_PROJECT}"],
            },
            export={"poll_interval": 0.05, "retry_base": 0.02, "retry_max": 0.2, "worker": worker},
            export_storages=[
                {
                    "id": "cfg-target",
                    "project": GATEWAY_PROJECT,
                    "type": "gcs",
                    "bucket": config_bucket,
                    "prefix": "cfg",
                }
            ],
        )
        client = await aiohttp_client(create_app(settings, workers=worker))
        return Gateway(client, http, emulator.url)

    build.emulator = emulator  # type: ignore[attr-defined]
    build.config_bucket = config_bucket  # type: ignore[attr-defined]
    yield build
    await http.close()


def new_bucket(gateways: Any) -> str:
    bucket = f"target-{uuid.uuid4().hex[:12]}"
    gateways.emulator.create_bucket(bucket)
    return bucket


FIELDS = {
    "project": GATEWAY_PROJECT,
    "title": "Annotations",
    "description": "written by the export worker",
    "prefix": "out",
    "can_delete_objects": True,
    "google_project_id": None,
}


async def test_crud_with_label_studio_fields(gateways):
    gw = await gateways(worker=False)
    bucket = new_bucket(gateways)
    made = await gw.call("POST", TARGETS, 201, {**FIELDS, "bucket": bucket})
    assert made["source"] == "api" and isinstance(made["id"], int) and made["type"] == "gcs"
    assert made["prefix"] == "out/" and made["can_delete_objects"] is True and made["json_extension"] is False
    assert made["status"] == "initialized" and made["meta"]["pending"] == 0 and made["has_credentials"] is False
    target_id = made["id"]

    listed = await gw.call("GET", f"{TARGETS}?project={GATEWAY_PROJECT}", 200)
    assert [t["id"] for t in listed] == ["cfg-target", target_id]  # config ones first
    assert listed[0]["source"] == "config" and listed[0]["created_at"] is None
    assert await gw.call("GET", f"{TARGETS}?project=elsewhere", 200) == []
    assert await gw.call("GET", f"{TARGETS}/{target_id}", 200) == made

    changed = await gw.call("PATCH", f"{TARGETS}/{target_id}", 200, {"title": "Renamed", "json_extension": True})
    assert changed["title"] == "Renamed" and changed["json_extension"] is True and changed["bucket"] == bucket
    answer = await gw.call("PATCH", f"{TARGETS}/{target_id}", 400, {"project": "other"})
    assert answer["validation_errors"] == {"project": ["a storage cannot move to another project; create one there"]}
    assert (await gw.call("PATCH", f"{TARGETS}/cfg-target", 409, {"title": "x"}))["error"] == "declared_in_config"
    assert (await gw.call("DELETE", f"{TARGETS}/cfg-target", 409))["error"] == "declared_in_config"

    # Field problems are named, several at once; source-storage fields are unknown here.
    answer = await gw.call(
        "POST", TARGETS, 400, {"project": "", "bucket": "Bad Bucket", "can_delete_objects": "yes", "presign": True}
    )
    assert set(answer["validation_errors"]) == {"project", "bucket", "can_delete_objects", "presign"}
    assert answer["validation_errors"]["presign"] == ["unknown field"]
    assert (await gw.call("POST", TARGETS, 400, {"project": GATEWAY_PROJECT}))["validation_errors"] == {
        "bucket": ["this field is required"]
    }

    await gw.call("DELETE", f"{TARGETS}/{target_id}", 204)
    assert (await gw.call("GET", f"{TARGETS}/{target_id}", 404))["error"] == "unknown_storage"
    again = await gw.call("POST", TARGETS, 201, {**FIELDS, "bucket": bucket})
    assert again["id"] > target_id  # ids are never reused: deliveries name them


async def test_test_connection_writes_and_deletes_for_real(gateways):
    gw = await gateways(worker=False)
    bucket = new_bucket(gateways)
    answer = await gw.call("POST", f"{TARGETS}/validate", 200, {**FIELDS, "bucket": bucket})
    assert answer["message"] == f"annotations can be written to gs://{bucket}/out/ and deleted from it"
    assert await gw.objects(bucket) == {}  # the check object went again

    answer = await gw.call("POST", f"{TARGETS}/validate", 400, {**FIELDS, "bucket": "no-such-bucket-here"})
    assert answer["error"] == "bucket_not_found"
    assert answer["validation_errors"] == {"bucket": ["bucket 'no-such-bucket-here' does not exist"]}
    answer = await gw.call(
        "POST", f"{TARGETS}/validate", 400, {**FIELDS, "bucket": bucket, "google_application_credentials": "{}"}
    )
    assert answer["error"] == "validation_error" and "google_application_credentials" in answer["validation_errors"]
    assert (await gw.call("POST", f"{TARGETS}/validate", 400, {"bucket": bucket}))["validation_errors"] == {
        "project": ["this field is required"]
    }

    # A stored storage is tested with changes; a config-file one too.
    made = await gw.call("POST", TARGETS, 201, {**FIELDS, "bucket": bucket})
    answer = await gw.call("POST", f"{TARGETS}/validate", 200, {"id": made["id"], "can_delete_objects": False})
    assert answer["message"] == f"annotations can be written to gs://{bucket}/out/"
    await gw.call("POST", f"{TARGETS}/validate", 400, {"id": made["id"], "bucket": "no-such-bucket-here"})
    await gw.call("POST", f"{TARGETS}/validate", 200, {"id": "cfg-target"})
    await gw.call("POST", f"{TARGETS}/validate", 404, {"id": 999999})


def test_refused_permissions_are_named_by_the_field_they_concern():
    """What a real bucket answers without IAM permissions (the emulator has no IAM)."""
    storage = ExportStorageSettings(id="1", project="p", type="gcs", bucket="b", can_delete_objects=True)
    denied = UpstreamDenied("storage refused the upload: the credentials lack storage.objects.create")
    refusal = _refusal(denied, storage, "write objects (storage.objects.create)")
    assert refusal.status == 400 and refusal.reason == "permission_denied"
    assert list(refusal.details["validation_errors"]) == ["google_application_credentials"]
    refusal = _refusal(denied, storage, "delete objects", "can_delete_objects")
    assert list(refusal.details["validation_errors"]) == ["can_delete_objects"]
    refusal = _refusal(UpstreamDenied("could not get an access token"), storage, "write objects")
    assert refusal.reason == "bad_credentials"


async def test_webhooks_reach_api_targets_and_sync_writes_the_earlier_ones(gateways):
    gw = await gateways()
    first, second = new_bucket(gateways), new_bucket(gateways)
    target = await gw.call("POST", TARGETS, 201, {**FIELDS, "bucket": first})
    await gw.hook(bulk([(501, 50), (502, 50)], label="Dog"))
    await gw.hook(updated(502, 50, "Cat"))
    await gw.settled(target["id"])
    await gw.settled("cfg-target")  # both objects written there before the delete arrives
    await gw.hook(deleted(501))
    done = await gw.settled(target["id"])
    assert done["meta"] == {
        "pending": 0,
        "oldest_pending_seconds": None,
        "failing": 0,
        "last_error": None,
        "delivered": 2,
    }
    assert done["last_sync"] is not None and done["last_sync_count"] == 2
    objects = await gw.objects(first)
    assert list(objects) == ["out/502"]
    body, content_type = objects["out/502"]
    assert content_type == "application/json" and body["result"][0]["value"]["choices"] == ["Cat"]
    assert body["task"]["id"] == 50  # the annotation with its task, as Label Studio writes it
    # The config-file target of the same project got them too; it may not delete objects.
    await gw.settled("cfg-target", "completed")
    assert list(await gw.objects(gateways.config_bucket)) == ["cfg/501", "cfg/502"]

    # A target added later receives new events; Sync writes what came before.
    later = await gw.call("POST", TARGETS, 201, {**FIELDS, "bucket": second, "json_extension": True})
    await gw.hook(created(503, 50))
    await gw.settled(later["id"])
    assert list(await gw.objects(second)) == ["out/503.json"]
    synced = await gw.call("POST", f"{TARGETS}/{later['id']}/sync", 202)
    assert synced["meta"]["pending"] + synced["meta"]["delivered"] == 3  # 501 (deleted), 502, 503
    await gw.settled(later["id"])
    assert sorted(await gw.objects(second)) == ["out/502.json", "out/503.json"]
    unchanged = writes(str(later["id"]), "unchanged")
    await gw.call("POST", f"{TARGETS}/{later['id']}/sync", 202)
    await gw.settled(later["id"])
    assert writes(str(later["id"]), "unchanged") == unchanged + 2  # same bytes: not rewritten


async def test_a_target_created_through_another_replica_gets_the_next_event(gateways):
    """Replica B has not reloaded its storages (a long refresh period) when the event arrives: the
    recording transaction still finds the new target, and B's worker learns of it when it must."""
    a = await gateways(worker=False)
    b = await gateways(storage_refresh=3600)
    bucket = new_bucket(gateways)
    target = await a.call("POST", TARGETS, 201, {**FIELDS, "bucket": bucket})
    assert b.app[CATALOG].targets.get(str(target["id"])) is None
    await b.hook(created(601, 60))
    await b.settled(target["id"])
    assert list(await b.objects(bucket)) == ["out/601"]


async def test_failing_status_then_delete_drops_pending_deliveries(gateways):
    gw = await gateways()
    bucket = f"missing-{uuid.uuid4().hex[:12]}"  # saved without Test connection; never created
    target = await gw.call("POST", TARGETS, 201, {**FIELDS, "bucket": bucket})
    await gw.hook(bulk([(701, 70), (702, 70)]))
    failing = await gw.settled(target["id"], "failed")
    assert failing["meta"]["pending"] == 2 and failing["meta"]["failing"] >= 1
    assert "bucket" in failing["meta"]["last_error"]
    response = await gw.client.get("/readyz")
    assert response.status == 200  # the outbox is the buffer

    def gauge(target_id: Any) -> float | None:
        return PROMETHEUS.get_sample_value("gateway_export_pending", {"target": str(target_id)})

    async def gauge_is(value: float | None) -> bool:
        return gauge(target["id"]) == value

    await eventually(lambda: gauge_is(2.0), "the pending gauge to show both deliveries")
    await gw.call("DELETE", f"{TARGETS}/{target['id']}", 204)
    assert (await Outbox(gw.app[REGISTRY]).status([str(target["id"])]))[str(target["id"])]["pending"] == 0
    await gw.settled("cfg-target")  # the config-file target still got both
    await eventually(lambda: gauge_is(None), "the deleted target's gauge to go")
    assert gauge("cfg-target") == 0.0


async def test_credentials_are_write_only_and_encrypted(gateways, credentials, caplog):  # noqa: F811
    caplog.set_level(logging.DEBUG)
    gw = await gateways()
    bucket = new_bucket(gateways)
    secret = credentials["json"]
    made = await gw.call("POST", TARGETS, 201, {**FIELDS, "bucket": bucket, "google_application_credentials": secret})
    assert made["has_credentials"] is True and made["problem"] is None
    row = await gw.app[REGISTRY].get_storage(made["id"], "export")
    assert_no_secret(row["credentials"], credentials)
    assert Vault((VAULT_KEY,)).open(row["credentials"]) == secret
    storage = gw.app[CATALOG].targets.get(str(made["id"]))
    assert storage.google_application_credentials == secret
    assert_no_secret(repr(storage), credentials)

    await gw.call("GET", f"{TARGETS}/{made['id']}", 200)
    await gw.call("GET", TARGETS, 200)
    await gw.call("POST", f"{TARGETS}/validate", 200, {"id": made["id"]})
    await gw.call("POST", f"{TARGETS}/validate", 400, {"id": made["id"], "bucket": "no-such-bucket-here"})
    await gw.call("PATCH", f"{TARGETS}/{made['id']}", 400, {"prefix": "/x", "google_application_credentials": secret})
    kept = await gw.call("PATCH", f"{TARGETS}/{made['id']}", 200, {"title": "kept credentials"})
    assert kept["has_credentials"] is True
    await gw.hook(created(801, 80))
    await gw.settled(made["id"])
    assert list(await gw.objects(bucket)) == ["out/801"]
    cleared = await gw.call("PATCH", f"{TARGETS}/{made['id']}", 200, {"google_application_credentials": None})
    assert cleared["has_credentials"] is False

    answer = await gw.call("POST", TARGETS, 400, {**FIELDS, "bucket": bucket, "google_application_credentials": "x"})
    assert list(answer["validation_errors"]) == ["google_application_credentials"]
    for text in gw.answers:
        assert_no_secret(text, credentials)
    for record in caplog.records:
        assert_no_secret(record.getMessage(), credentials)
