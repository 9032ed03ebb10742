"""One conformance suite every storage backend must pass (local directory, GCS via fake-gcs-server)."""

from __future__ import annotations

import uuid

import pytest

from gateway.httpsem import ByteRange
from gateway.storage import build_backend, client_session
from gateway.storage.base import ObjectNotFound, RangeNotSatisfiable

from .conftest import build_settings, sample_objects, seed

OBJECTS = {o.key: o for o in sample_objects()}
CLIP = OBJECTS["video/clip.bin"]


@pytest.fixture(params=["local", "gcs"])
async def backend(request, tmp_path):
    emulator = request.getfixturevalue("emulator") if request.param == "gcs" else None
    bucket = f"conf-{uuid.uuid4().hex[:12]}"
    storage = seed(request.param, bucket, list(OBJECTS.values()), tmp_path, emulator)
    settings = build_settings([storage], tmp_path)
    session = client_session(settings) if emulator else None
    env = {"STORAGE_EMULATOR_HOST": emulator.host} if emulator else {}
    yield build_backend(settings, settings.storages[0], session, None, env)
    if session is not None:
        await session.close()


async def read_all(reader) -> bytes:
    return b"".join([chunk async for chunk in reader.chunks()])


async def test_stat_reports_size_type_encoding_and_a_stable_etag(backend):
    for obj in OBJECTS.values():
        meta = await backend.stat(obj.key)
        assert meta.size == len(obj.data), obj.key
        assert meta.content_type == obj.content_type, obj.key
        assert meta.content_encoding == obj.encoding, obj.key
        assert meta.etag.startswith('"') and meta.etag.endswith('"') and len(meta.etag) > 2
        assert meta.last_modified > 1_600_000_000
        assert (await backend.stat(obj.key)).etag == meta.etag


async def test_open_whole_object_matches_stat(backend):
    reader = await backend.open(CLIP.key, None)
    assert (reader.first, reader.last, reader.partial) == (0, len(CLIP.data) - 1, False)
    assert reader.meta == await backend.stat(CLIP.key)
    assert await read_all(reader) == CLIP.data


@pytest.mark.parametrize(
    ("byte_range", "span"),
    [
        (ByteRange(0, 0), (0, 0)),
        (ByteRange(10, 19), (10, 19)),
        (ByteRange(299_000, None), (299_000, 299_999)),
        (ByteRange(None, 100), (299_900, 299_999)),
        (ByteRange(5, 10_000_000), (5, 299_999)),
    ],
)
async def test_open_ranges(backend, byte_range, span):
    reader = await backend.open(CLIP.key, byte_range)
    assert (reader.first, reader.last, reader.partial) == (*span, True)
    assert reader.meta.size == len(CLIP.data)
    assert await read_all(reader) == CLIP.data[span[0] : span[1] + 1]


@pytest.mark.parametrize("byte_range", [ByteRange(300_000, None), ByteRange(400_000, 400_001)])
async def test_unsatisfiable_range(backend, byte_range):
    with pytest.raises(RangeNotSatisfiable):
        await backend.open(CLIP.key, byte_range)


async def test_gzip_object_is_read_as_stored(backend):
    obj = OBJECTS["data/records.json.gz"]
    assert await read_all(await backend.open(obj.key, None)) == obj.data


async def test_empty_object(backend):
    reader = await backend.open("empty.txt", None)
    assert reader.meta.size == 0 and await read_all(reader) == b""


@pytest.mark.parametrize("key", ["missing.bin", "video", "video/clip.bin/extra"])
async def test_missing_objects(backend, key):
    with pytest.raises(ObjectNotFound):
        await backend.stat(key)
    with pytest.raises(ObjectNotFound):
        await backend.open(key, None)


async def test_close_before_reading_releases_the_reader(backend):
    reader = await backend.open(CLIP.key, None)
    reader.close()
    reader.close()  # idempotent
    again = await backend.open(CLIP.key, ByteRange(0, 9))
    assert await read_all(again) == CLIP.data[:10]


async def test_check_passes_for_a_reachable_bucket(backend):
    await backend.check()
