"""Writes every backend must get right (local directory, GCS via fake-gcs-server): whole-object
uploads, deletes and MD5 look-ups, as annotation export uses them; then, for GCS, retries and
refusals through a small fault-injecting stand-in in front of the emulator."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import REGISTRY as PROMETHEUS
from yarl import URL

from gateway import metrics
from gateway.config import StorageSettings
from gateway.storage import build_backend, client_session, load_storage_credential
from gateway.storage.base import (
    BucketNotFound,
    InvalidObjectKey,
    ListedObject,
    ObjectNotFound,
    StorageError,
    UpstreamDenied,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.storage.credentials import READ_ONLY_SCOPE, READ_WRITE_SCOPE
from gateway.storage.gcs import GcsBackend
from gateway.storage.local import LocalBackend

from .conftest import Emulator, build_settings, free_port, seed
from .test_credentials import service_account_info

RETRIES = 2
UPSTREAM = {
    "connect_timeout": 1.0,
    "first_byte_timeout": 0.5,
    "idle_timeout": 1.0,
    "retries": RETRIES,
    "retry_backoff": 0.01,
}


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def annotation(annotation_id: int, note: str = "") -> bytes:
    return json.dumps({"id": annotation_id, "result": [{"value": {"choices": ["cat"]}}], "note": note}).encode()


@dataclass
class Target:
    kind: str
    backend: object
    root: Path | None  # the local directory
    session: aiohttp.ClientSession | None = None


@pytest.fixture(params=["local", "gcs"])
async def target(request, tmp_path) -> AsyncIterator[Target]:
    emulator = request.getfixturevalue("emulator") if request.param == "gcs" else None
    bucket = f"writes-{uuid.uuid4().hex[:12]}"
    storage = seed(request.param, bucket, [], tmp_path, emulator)
    if request.param == "local":
        Path(storage["root"]).mkdir()
    settings = build_settings([storage], tmp_path)
    session = client_session(settings) if emulator else None
    env = {"STORAGE_EMULATOR_HOST": emulator.host} if emulator else {}
    backend = build_backend(settings, settings.storages[0], session, None, env)
    root = Path(storage["root"]) if request.param == "local" else None
    yield Target(request.param, backend, root, session)
    if session is not None:
        await session.close()


async def read_back(backend, key: str) -> bytes:
    reader = await backend.open(key, None)
    return b"".join([chunk async for chunk in reader.chunks()])


async def listing(backend, prefix: str = "") -> list[ListedObject]:
    objects, token = await backend.list_page(prefix, True, None, 1000)
    assert token is None
    return objects


# Round trips ------------------------------------------------------------------------------------


async def test_put_then_read_back(target):
    key, data = "exports/101.json", annotation(101)
    generation = await target.backend.put_object(key, data, "application/json")
    assert isinstance(generation, str) and generation
    meta = await target.backend.stat(key)
    assert meta.size == len(data)
    assert meta.content_type == "application/json"
    assert meta.etag == f'"{generation}"'  # the generation is the one the read path's ETag carries
    assert await read_back(target.backend, key) == data
    assert await listing(target.backend, "exports/") == [ListedObject(key, generation, len(data))]


async def test_overwrite_replaces_the_bytes_and_the_generation(target):
    key = "exports/102.json"
    first = await target.backend.put_object(key, annotation(102, "first"), "application/json")
    replacement = annotation(102, "later")  # the same size: only the bytes differ
    second = await target.backend.put_object(key, replacement, "application/json")
    assert second != first
    assert await read_back(target.backend, key) == replacement
    assert (await target.backend.stat(key)).etag == f'"{second}"'
    assert await listing(target.backend) == [ListedObject(key, second, len(replacement))]


async def test_empty_object(target):
    generation = await target.backend.put_object("exports/empty.json", b"", "application/json")
    assert (await target.backend.stat("exports/empty.json")).size == 0
    assert await listing(target.backend) == [ListedObject("exports/empty.json", generation, 0)]
    assert await target.backend.object_md5("exports/empty.json") == md5_b64(b"") == "1B2M2Y8AsgTpgAmY7PhCfg=="


async def test_delete_is_true_then_false(target):
    key = "exports/103.json"
    await target.backend.put_object(key, annotation(103), "application/json")
    await target.backend.put_object("exports/104.json", annotation(104), "application/json")
    assert await target.backend.delete_object(key) is True
    with pytest.raises(ObjectNotFound):
        await target.backend.stat(key)
    assert await target.backend.delete_object(key) is False  # a retried delete is not an error
    assert await target.backend.delete_object("exports/never-written.json") is False
    assert [o.key for o in await listing(target.backend)] == ["exports/104.json"]


async def test_object_md5(target):
    key, data = "exports/105.json", annotation(105)
    assert await target.backend.object_md5(key) is None
    await target.backend.put_object(key, data, "application/json")
    assert await target.backend.object_md5(key) == md5_b64(data)
    changed = annotation(105, "changed")
    await target.backend.put_object(key, changed, "application/json")
    assert await target.backend.object_md5(key) == md5_b64(changed) != md5_b64(data)
    await target.backend.delete_object(key)
    assert await target.backend.object_md5(key) is None


async def test_a_larger_binary_object_round_trips(target):
    data = os.urandom(3 * 1024 * 1024 + 17)
    generation = await target.backend.put_object("blobs/big.bin", data, "application/octet-stream")
    assert await read_back(target.backend, "blobs/big.bin") == data
    assert await target.backend.object_md5("blobs/big.bin") == md5_b64(data)
    assert (await target.backend.stat("blobs/big.bin")).etag == f'"{generation}"'


@pytest.mark.parametrize(
    "key",
    ["with space/a b.json", "été/naïve 日本語.json", "deep/er/and/deeper/x.json", "odd/#?&+%=;.json"],
)
async def test_keys_with_spaces_unicode_slashes_and_url_syntax(target, key):
    data = annotation(106, key)
    generation = await target.backend.put_object(key, data, "application/json")
    assert await read_back(target.backend, key) == data
    assert await target.backend.object_md5(key) == md5_b64(data)
    assert await listing(target.backend) == [ListedObject(key, generation, len(data))]
    if target.root is not None:
        assert (target.root / key).read_bytes() == data  # nested directories created
    assert await target.backend.delete_object(key) is True
    assert await listing(target.backend) == []


async def test_concurrent_writes_of_one_key_leave_one_whole_version(target):
    key = "exports/108.json"
    versions = [annotation(108, f"version {i:02d}") for i in range(12)]
    generations = await asyncio.gather(*(target.backend.put_object(key, v, "application/json") for v in versions))
    final = await read_back(target.backend, key)
    assert final in versions
    listed = await listing(target.backend)
    assert len(listed) == 1 and listed[0].generation in generations
    if target.root is not None:
        assert sorted(p.name for p in (target.root / "exports").iterdir()) == ["108.json"]  # no temp file left


async def test_upload_to_a_missing_bucket_is_bucket_not_found(target, tmp_path, request):
    if target.kind == "local":  # the directory went away after start-up (config checks it exists)
        backend = LocalBackend(str(tmp_path / "nope"), 65536)
    else:
        emulator = request.getfixturevalue("emulator")
        storage = {"id": "gone", "project": "7", "type": "gcs", "bucket": f"never-{uuid.uuid4().hex[:12]}"}
        settings = build_settings([storage], tmp_path)
        env = {"STORAGE_EMULATOR_HOST": emulator.host}
        backend = build_backend(settings, settings.storages[0], target.session, None, env)
    with pytest.raises(BucketNotFound):
        await backend.put_object("exports/1.json", b"{}", "application/json")
    assert not (tmp_path / "nope").exists()  # a local storage never creates its own directory


# Local keys -------------------------------------------------------------------------------------


@pytest.fixture
def local(tmp_path) -> Target:
    root = tmp_path / "bucket"
    root.mkdir()
    storage = {"id": "l", "project": "7", "type": "local", "bucket": "local-bucket", "root": str(root)}
    settings = build_settings([storage], tmp_path)
    return Target("local", build_backend(settings, settings.storages[0], None, None, {}), root)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("../outside.json", "escapes the storage directory"),
        ("a/../../outside.json", "escapes the storage directory"),
        ("/tmp/outside.json", "empty or '.' segment"),
        ("a//b.json", "empty or '.' segment"),
        ("a/./b.json", "empty or '.' segment"),
        ("exports/", "empty or '.' segment"),
        ("", "empty or '.' segment"),
    ],
)
async def test_local_keys_a_directory_cannot_hold_are_refused(local, tmp_path, key, message):
    with pytest.raises(InvalidObjectKey, match=message) as refused:
        await local.backend.put_object(key, b"payload", "application/json")
    assert isinstance(refused.value, StorageError) and refused.value.status == 400
    with pytest.raises(InvalidObjectKey):
        await local.backend.delete_object(key)
    assert not (tmp_path / "outside.json").exists()
    assert list(local.root.iterdir()) == []


async def test_local_symlinked_directory_leading_outside_is_refused(local, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "victim.json").write_bytes(b"keep me")
    (local.root / "link").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(InvalidObjectKey, match="resolves outside the storage directory"):
        await local.backend.put_object("link/victim.json", b"overwritten", "application/json")
    with pytest.raises(InvalidObjectKey):
        await local.backend.delete_object("link/victim.json")
    assert await local.backend.object_md5("link/victim.json") is None  # reads: it does not exist
    assert (elsewhere / "victim.json").read_bytes() == b"keep me"


async def test_local_write_replaces_a_symlink_not_its_target(local):
    (local.root / "real.json").write_bytes(b"original")
    (local.root / "alias.json").symlink_to(local.root / "real.json")
    await local.backend.put_object("alias.json", b"new", "application/json")
    assert (local.root / "real.json").read_bytes() == b"original"
    assert not (local.root / "alias.json").is_symlink()
    assert await read_back(local.backend, "alias.json") == b"new"


async def test_local_key_below_a_file_or_naming_a_directory_is_refused(local):
    await local.backend.put_object("a.json", b"{}", "application/json")
    with pytest.raises(InvalidObjectKey, match="below a file"):
        await local.backend.put_object("a.json/b.json", b"{}", "application/json")
    (local.root / "folder").mkdir()
    with pytest.raises(InvalidObjectKey, match="names a directory"):
        await local.backend.put_object("folder", b"{}", "application/json")
    assert await local.backend.delete_object("folder") is False
    assert (local.root / "folder").is_dir()


async def test_local_temporary_files_are_never_listed(local):
    (local.root / ".gateway-upload-0123abcd.tmp").write_bytes(b"left by a crash")
    generation = await local.backend.put_object("x.json", b"{}", "application/json")
    assert await listing(local.backend) == [ListedObject("x.json", generation, 2)]
    with pytest.raises(InvalidObjectKey):
        await local.backend.put_object(".gateway-upload-0123abcd.tmp", b"{}", "application/json")


async def test_local_files_written_honour_the_umask(local):
    await local.backend.put_object("perm.json", b"{}", "application/json")
    umask = os.umask(0)
    os.umask(umask)
    assert (local.root / "perm.json").stat().st_mode & 0o777 == 0o666 & ~umask


# Credentials ------------------------------------------------------------------------------------


def test_write_credentials_carry_the_read_write_scope():
    storage = StorageSettings(
        id="t", project="7", type="gcs", bucket="b", google_application_credentials=json.dumps(service_account_info())
    )
    writer = load_storage_credential(storage, {}, write=True)
    reader = load_storage_credential(storage, {})
    assert list(writer.scopes) == [READ_WRITE_SCOPE]
    assert list(reader.scopes) == [READ_ONLY_SCOPE]
    assert load_storage_credential(storage, {"STORAGE_EMULATOR_HOST": "127.0.0.1:1"}, write=True) is None


# GCS faults -------------------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class StandIn:
    """An aiohttp server in front of the emulator: each request takes the next scripted action
    (an int: answer that status with a GCS-style error; "lost": forward, then answer 503 as if
    the answer were lost; "silent": never answer), then everything is forwarded."""

    upstream: str
    script: list[int | str] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.method, request.path, dict(request.query), dict(request.headers), body))
        action = self.script.pop(0) if self.script else "forward"
        if isinstance(action, int):
            return web.json_response({"error": {"code": action, "message": f"injected {action}"}}, status=action)
        if action == "silent":
            await self.release.wait()
            return web.Response(status=503)
        status, answer = await self.forward(request, body)
        if action == "lost":
            return web.json_response({"error": {"code": 503, "message": "answer lost"}}, status=503)
        return web.Response(status=status, body=answer, content_type="application/json")

    async def forward(self, request: web.Request, body: bytes) -> tuple[int, bytes]:
        headers = {k: v for k, v in request.headers.items() if k.lower() == "content-type"}
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                request.method, URL(self.upstream + str(request.rel_url), encoded=True), headers=headers, data=body
            ) as response,
        ):
            return response.status, await response.read()

    def of(self, method: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method]


class StubTokens:
    """Stands in for AccessTokens: a fixed bearer token the errors must never echo."""

    TOKEN = "ya29.secret-access-token-never-to-be-echoed"

    async def apply(self, headers: dict[str, str]) -> None:
        headers["Authorization"] = f"Bearer {self.TOKEN}"


@dataclass
class Rig:
    stand_in: StandIn
    backend: GcsBackend
    direct: GcsBackend  # the same bucket, straight on the emulator


@pytest.fixture
async def rig(emulator: Emulator, aiohttp_server, tmp_path) -> AsyncIterator[Rig]:
    stand_in = StandIn(emulator.url)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", stand_in.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    bucket = f"faults-{uuid.uuid4().hex[:12]}"
    storage = seed("gcs", bucket, [], tmp_path, emulator)
    settings = build_settings([storage], tmp_path, upstream=UPSTREAM)
    session = client_session(settings)
    backend = GcsBackend(session, f"http://127.0.0.1:{server.port}", bucket, StubTokens(), settings.upstream)  # type: ignore[arg-type]
    direct = GcsBackend(session, emulator.url, bucket, None, settings.upstream)
    try:
        yield Rig(stand_in, backend, direct)
    finally:
        stand_in.release.set()
        await session.close()


def sample(name: str, **labels: str) -> float:
    return PROMETHEUS.get_sample_value(name, labels) or 0.0


def retries() -> float:
    return sample("gateway_upstream_retries_total", backend="gcs")


def errors(kind: str) -> float:
    return sample("gateway_upstream_errors_total", backend="gcs", kind=kind)


def timed(operation: str) -> float:
    metrics.BATCH.flush()  # upstream latencies are written in batches
    return sample("gateway_upstream_request_duration_seconds_count", backend="gcs", operation=operation)


async def test_upload_is_a_simple_media_upload_with_the_content_type(rig):
    data = annotation(200)
    generation = await rig.backend.put_object("exports/a b/200.json", data, "application/json")
    (upload,) = rig.stand_in.of("POST")
    assert upload.path.endswith("/o") and upload.path.startswith("/upload/storage/v1/b/")
    assert upload.query["uploadType"] == "media" and upload.query["name"] == "exports/a b/200.json"
    assert upload.headers["Content-Type"] == "application/json"
    assert upload.headers["Authorization"] == f"Bearer {StubTokens.TOKEN}"
    assert upload.body == data
    assert (await rig.direct.stat("exports/a b/200.json")).etag == f'"{generation}"'
    await rig.backend.put_object("exports/201", b"{}", "application/x-ndjson")  # no extension to guess from
    assert (await rig.direct.stat("exports/201")).content_type == "application/x-ndjson"


@pytest.mark.parametrize("code", [503, 500, 429, 408])
async def test_a_retryable_answer_then_success_uploads_once(rig, code):
    rig.stand_in.script = [code]
    before_retries, before_put = retries(), timed("put")
    data = annotation(201)
    generation = await rig.backend.put_object("exports/201.json", data, "application/json")
    uploads = rig.stand_in.of("POST")
    assert len(uploads) == 2 and uploads[0].body == uploads[1].body == data
    assert retries() - before_retries == 1
    assert timed("put") - before_put == 2
    assert await rig.direct.object_md5("exports/201.json") == md5_b64(data)
    assert (await rig.direct.stat("exports/201.json")).etag == f'"{generation}"'


async def test_an_upload_whose_answer_was_lost_is_written_again(rig):
    rig.stand_in.script = ["lost"]
    data = annotation(202)
    generation = await rig.backend.put_object("exports/202.json", data, "application/json")
    assert len(rig.stand_in.of("POST")) == 2
    assert await listing(rig.direct) == [ListedObject("exports/202.json", generation, len(data))]


async def test_persistent_server_errors_fail_after_retries_plus_one(rig):
    rig.stand_in.script = [503] * (RETRIES + 1)
    server_errors = errors("5xx")
    with pytest.raises(UpstreamUnavailable, match="server error"):
        await rig.backend.put_object("exports/203.json", b"{}", "application/json")
    assert len(rig.stand_in.of("POST")) == RETRIES + 1
    assert errors("5xx") - server_errors == RETRIES + 1
    assert await rig.direct.object_md5("exports/203.json") is None


@pytest.mark.parametrize("code", [403, 401])
async def test_a_refused_upload_names_the_missing_permission_and_is_not_retried(rig, code):
    rig.stand_in.script = [code]
    secret_data = b'{"secret": "annotation content never to be echoed"}'
    with pytest.raises(UpstreamDenied, match=r"storage\.objects\.create") as refused:
        await rig.backend.put_object("exports/204.json", secret_data, "application/json")
    assert len(rig.stand_in.of("POST")) == 1
    assert StubTokens.TOKEN not in str(refused.value) and "never to be echoed" not in str(refused.value)
    assert await rig.direct.object_md5("exports/204.json") is None


async def test_a_refused_delete_names_the_missing_permission(rig):
    await rig.direct.put_object("exports/205.json", b"{}", "application/json")
    rig.stand_in.script = [403]
    with pytest.raises(UpstreamDenied, match=r"storage\.objects\.delete"):
        await rig.backend.delete_object("exports/205.json")
    assert len(rig.stand_in.of("DELETE")) == 1
    assert await rig.direct.object_md5("exports/205.json") == md5_b64(b"{}")


async def test_delete_is_retried_and_idempotent_when_its_answer_is_lost(rig):
    await rig.direct.put_object("exports/206.json", b"{}", "application/json")
    await rig.direct.put_object("exports/207.json", b"{}", "application/json")
    before_delete = timed("delete")
    rig.stand_in.script = [503]
    assert await rig.backend.delete_object("exports/206.json") is True
    rig.stand_in.script = ["lost"]  # deleted, but the answer never arrived: the retry finds nothing
    assert await rig.backend.delete_object("exports/207.json") is False
    assert len(rig.stand_in.of("DELETE")) == 4
    assert timed("delete") - before_delete == 4
    assert await listing(rig.direct) == []


async def test_another_refusal_is_a_storage_error_with_gcs_message(rig):
    rig.stand_in.script = [400]
    with pytest.raises(StorageError, match="400 injected 400") as refused:
        await rig.backend.put_object("exports/208.json", b"{}", "application/json")
    assert type(refused.value) is StorageError
    assert len(rig.stand_in.of("POST")) == 1


async def test_a_silent_upstream_is_a_timeout_not_retried(rig):
    rig.stand_in.script = ["silent"]
    timeouts = errors("timeout")
    with pytest.raises(UpstreamTimeout):
        await rig.backend.put_object("exports/209.json", b"{}", "application/json")
    assert len(rig.stand_in.of("POST")) == 1
    assert errors("timeout") - timeouts == 1


async def test_object_md5_goes_through_the_retries(rig):
    await rig.direct.put_object("exports/210.json", b"[1]", "application/json")
    rig.stand_in.script = [503]
    assert await rig.backend.object_md5("exports/210.json") == md5_b64(b"[1]")
    assert len(rig.stand_in.of("GET")) == 2
    rig.stand_in.script = [403]
    with pytest.raises(UpstreamDenied, match=r"storage\.objects\.get"):
        await rig.backend.object_md5("exports/210.json")


async def test_unreachable_storage_fails_after_retries_plus_one_connect_errors(tmp_path):
    settings = build_settings([], tmp_path, upstream=UPSTREAM)
    session = client_session(settings)
    try:
        backend = GcsBackend(session, f"http://127.0.0.1:{free_port()}", "b", None, settings.upstream)
        connect_errors, before_retries = errors("connect"), retries()
        with pytest.raises(UpstreamUnavailable, match="unreachable"):
            await backend.put_object("exports/1.json", b"{}", "application/json")
        assert errors("connect") - connect_errors == RETRIES + 1
        assert retries() - before_retries == RETRIES
        with pytest.raises(UpstreamUnavailable):
            await backend.delete_object("exports/1.json")
    finally:
        await session.close()
