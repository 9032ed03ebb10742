"""Which storage serves a task: the one that imported it, with its own mode and allowlist.

Two storages of one project on one bucket — `narrow` (prefix `a/`, proxied, loopback allowed) and
`wide` (the whole bucket, pre-signed, loopback not allowed) — each sync the objects they hold, so
`a/x.bin` is imported twice, once by each. Each task must be answered by its own storage's rules,
whichever storage's prefix is longer; a task imported by file (no storage) follows the documented
rule (the longest prefix holding the key, then the storage listed first). On both lanes.
"""

from __future__ import annotations

import json
import uuid

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.app import create_app
from gateway.state import CATALOG, REGISTRY, TASKS
from gateway.sync.engine import Sync
from gateway.uris import encode_fileuri

from .conftest import PROJECT, StoredObject, build_settings, make_token, seed
from .test_presign import service_account_json

OBJECTS = [
    StoredObject("a/x.bin", b"x" * 100, "application/octet-stream"),
    StoredObject("b/y.bin", b"y" * 50, "image/png"),
]


@pytest.fixture(params=["aiohttp", "front"])
async def choice(request, tmp_path, emulator, monkeypatch, aiohttp_client, fastlane):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.host)
    bucket = f"choice-{uuid.uuid4().hex[:10]}"
    narrow = seed("gcs", bucket, OBJECTS, tmp_path, emulator) | {
        "id": "narrow",
        "prefix": "a/",
        "client_allowlist": ["127.0.0.0/8"],
    }
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    wide = {
        "id": "wide",
        "project": PROJECT,
        "type": "gcs",
        "bucket": bucket,
        "recursive_scan": True,
        "presign": True,
        "google_application_credentials": service_account_json(key),
        "client_allowlist": ["192.0.2.0/24"],
    }
    settings = build_settings([narrow, wide], tmp_path)
    app = create_app(settings)
    client = await (fastlane(app) if request.param == "front" else aiohttp_client(app, auto_decompress=False))
    catalog, registry = app[CATALOG], app[REGISTRY]
    for storage in settings.storages:
        assert await Sync(storage, catalog.backend(storage), registry, settings.sync).run() == "completed"
    app[TASKS].forget()
    tasks = {}
    for storage_id in ("narrow", "wide"):
        _, rows = await registry.list_tasks(PROJECT, storage_id=storage_id)
        for row in rows:
            (uri,) = [v for v in row["data"].values() if isinstance(v, str) and v.startswith("gs://")]
            tasks[(storage_id, uri.rsplit("/", 1)[-1])] = row["id"]
    (by_file,) = await registry.add_tasks(
        PROJECT, [{"data": {"x": f"gs://{bucket}/a/x.bin", "y": f"gs://{bucket}/b/y.bin"}}]
    )
    tasks[("file", "both")] = by_file
    return client, bucket, tasks


async def get(client, bucket: str, task: int, key: str):  # type: ignore[no-untyped-def]
    url = f"/tasks/{task}/resolve/?fileuri={encode_fileuri(f'gs://{bucket}/{key}')}"
    response = await client.get(url, headers={"Authorization": f"Bearer {make_token(tasks=[task])}"})
    return response.status, await response.read()


async def test_each_task_is_served_by_the_storage_that_imported_it(choice):
    client, bucket, tasks = choice
    assert set(tasks) == {("narrow", "x.bin"), ("wide", "x.bin"), ("wide", "y.bin"), ("file", "both")}
    # narrow's own task: proxied, loopback allowed.
    assert await get(client, bucket, tasks[("narrow", "x.bin")], "a/x.bin") == (200, b"x" * 100)
    # The same object through wide's task: wide's allowlist applies, though narrow's prefix is longer.
    status, body = await get(client, bucket, tasks[("wide", "x.bin")], "a/x.bin")
    assert status == 403 and json.loads(body)["message"] == "client address 127.0.0.1 is not allowed for storage wide"
    status, _ = await get(client, bucket, tasks[("wide", "y.bin")], "b/y.bin")
    assert status == 403


async def test_a_task_imported_by_file_follows_the_longest_prefix(choice):
    client, bucket, tasks = choice
    task = tasks[("file", "both")]
    assert await get(client, bucket, task, "a/x.bin") == (200, b"x" * 100)  # narrow: prefix a/ holds it
    status, body = await get(client, bucket, task, "b/y.bin")  # only wide holds b/
    assert status == 403 and "storage wide" in json.loads(body)["message"]
