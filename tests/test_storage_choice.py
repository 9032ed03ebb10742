"""Which storage serves a task: the one that imported it, with its own mode and allowlist.

Two storages of one project on one bucket — `narrow` (prefix `a/`, proxied, loopback allowed) and
`wide` (the whole bucket, pre-signed, loopback not allowed) — each sync the objects they hold, so
`a/x.bin` is imported twice, once by each. Each task must be answered by its own storage's rules,
whichever storage's prefix is longer; a task imported by file (no storage) follows the documented
rule (the longest prefix holding the key, then the storage listed first). On both lanes.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.app import create_app
from gateway.state import CATALOG, REGISTRY, TASKS
from gateway.sync.engine import Sync
from gateway.uris import encode_fileuri

from .conftest import PROJECT, SECRET, StoredObject, build_settings, make_token, seed
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


async def explained(http, task: int, **params: str) -> dict:  # type: ignore[no-untyped-def]
    admin = {"Authorization": f"Bearer {make_token(admin=True)}"}
    response = await http.get(f"/api/tasks/{task}/access", params=params, headers=admin)
    assert response.status == 200, await response.text()
    return await response.json()


async def test_the_access_explanation_names_the_storage_mode_and_the_clients_fate(choice):
    client, bucket, tasks = choice
    wide = await explained(client, tasks[("wide", "x.bin")], client="127.0.0.1")
    (entry,) = wide["objects"]
    assert (wide["imported_by"], entry["storage"], entry["mode"], entry["presign_ttl_minutes"]) == (
        "wide",
        "wide",
        "presign",
        15,
    )
    assert entry["signing_identity"]["method"] == "local" and entry["signing_identity"]["email"]
    assert entry["client"] == {
        "address": "127.0.0.1",
        "allowed": False,
        "reason": "ip_not_allowed_for_storage",
        "message": "client address 127.0.0.1 is not allowed for storage wide",
    }
    # The answer the media path gives that client is the one explained.
    status, body = await get(client, bucket, tasks[("wide", "x.bin")], "a/x.bin")
    assert (status, json.loads(body)["error"]) == (403, entry["client"]["reason"])

    by_file = await explained(client, tasks[("file", "both")], client="192.0.2.7")
    storages = {
        o["uri"].rsplit("/", 1)[-1]: (o["storage"], o["mode"], o["client"]["allowed"]) for o in by_file["objects"]
    }
    assert storages == {"x.bin": ("narrow", "proxy", False), "y.bin": ("wide", "presign", True)}

    other = await explained(client, tasks[("narrow", "x.bin")], uri=f"gs://{bucket}/b/y.bin")
    assert other["objects"] == [
        {
            "uri": f"gs://{bucket}/b/y.bin",
            "served": False,
            "reason": "not_referenced",
            "message": f"task {tasks[('narrow', 'x.bin')]} does not reference this object",
        }
    ]


async def test_the_access_explanation_refuses_bad_parameters(choice):
    client, _bucket, tasks = choice
    admin = {"Authorization": f"Bearer {make_token(admin=True)}"}
    task = tasks[("narrow", "x.bin")]
    for params, status, reason in (
        ({"client": "not-an-address"}, 400, "bad_parameter"),
        ({"uri": "s3://elsewhere/x"}, 400, "bad_parameter"),
        ({}, 404, "unknown_task"),
    ):
        path = f"/api/tasks/{task if status != 404 else 987654}/access"
        response = await client.get(path, params=params, headers=admin)
        assert (response.status, (await response.json())["error"]) == (status, reason)
    response = await client.get(f"/api/tasks/{task}/access", headers={"Authorization": f"Bearer {make_token()}"})
    assert response.status == 403


async def test_gateway_explain_asks_the_running_gateway(choice, tmp_path, capsys):
    from gateway.cli import main

    client, _bucket, tasks = choice
    config = tmp_path / "explain.toml"
    config.write_text(f'[auth]\nsecret = "{SECRET}"\n')
    task = tasks[("wide", "y.bin")]
    argv = ["explain", "--config", str(config), "--url", f"http://127.0.0.1:{client.port}", str(task)]
    code = await asyncio.to_thread(main, [*argv, "--client", "192.0.2.1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    (entry,) = json.loads(out)["objects"]
    assert (entry["storage"], entry["mode"], entry["client"]["allowed"]) == ("wide", "presign", True)
    code = await asyncio.to_thread(main, [*argv[:-1], "987654"])
    assert code == 2 and "404 task 987654 does not exist" in capsys.readouterr().err
