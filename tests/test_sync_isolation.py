"""A sync never stalls the event loop that serves media (issue 16 case 1).

The in-process sync worker shares its event loop with media requests. A regex filter with
catastrophic backtracking (`(a+)+$`) against one crafted object name froze that loop for seconds
per key; task-file parsing and Parquet decoding ran on it too. Filters now run on RE2 and every
piece of a sync's CPU work on the sync thread (gateway/sync/parse.py `off_loop`), so probes and
media requests keep answering while the worst sync we can make runs in the same process.

The bound is a property, not a benchmark: an unblocked loop answers these requests in about a
millisecond (median), and in tens of milliseconds at worst on a 2-core machine shared with other
test suites. The issue's target is 100 ms; the assertion allows 250 ms so that a machine loaded
three times over (measured: 224 ms at worst) does not fail it, while every blocking this test
provokes is far above it: one backtracking match takes about a second on the loop, a 26 MB JSON
line 0.3-0.8 s.
"""

from __future__ import annotations

import asyncio
import gc
import io
import json
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.app import create_app
from gateway.state import REGISTRY
from gateway.uris import encode_fileuri

from .conftest import PROJECT, build_settings, make_token

BOUND = 0.250  # seconds for one request while the sync runs (see above)
ADMIN = {"Authorization": f"Bearer {make_token('root', admin=True)}"}
SYNC_PROJECT = "9"
ROWS = 1000


def parquet_bytes(rows: int) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    table = pa.table({"text": [f"row {i} " + "x" * 300 for i in range(rows)], "n": list(range(rows))})
    pq.write_table(table, sink, row_group_size=500)
    return sink.getvalue()


def worst_case_bucket(root: Path) -> None:
    """Object names that make a backtracking filter explode, and task files with lots to parse."""
    (root / "redos").mkdir(parents=True)
    for n in (24, 23):
        (root / "redos" / ("a" * n + "!")).write_bytes(b"x")  # the filter fails after 2^n steps
    (root / "redos" / "aaaa").write_bytes(b"x")  # matches
    tasks = root / "tasks"
    tasks.mkdir()
    row = {"text": "y" * 300, "labels": [{"a": [1, 2, {"b": "c"}]}] * 5}
    (tasks / "big.jsonl").write_text("\n".join(json.dumps({**row, "n": i}) for i in range(ROWS)))
    (tasks / "big.json").write_text(json.dumps([{"data": {**row, "n": i}} for i in range(ROWS)]))
    (tasks / "big.parquet").write_bytes(parquet_bytes(ROWS))
    (tasks / "long.jsonl").write_text(json.dumps({"image": "data:image/png;base64," + "A" * 4_000_000}))
    # One line of 26 MB of numbers: 0.3 s or more in the C JSON parser, which holds the interpreter
    # lock throughout (a thread would not help). Not a task (a list), so nothing of it is stored.
    (tasks / "dense.jsonl").write_text(json.dumps(list(range(3_000_000))))
    (tasks / "deep.json").write_text("[" * 200_000)


@pytest.fixture
async def gateway(tmp_path, aiohttp_client) -> Any:
    media, bucket = tmp_path / "media", tmp_path / "sync"
    media.mkdir()
    (media / "clip.bin").write_bytes(bytes(range(256)) * 1024)
    worst_case_bucket(bucket)
    storages = [
        {"id": "media", "project": PROJECT, "type": "local", "bucket": "media-bucket", "root": str(media)},
        {
            "id": "redos",
            "project": SYNC_PROJECT,
            "type": "local",
            "bucket": "sync-bucket",
            "root": str(bucket),
            "prefix": "redos",
            "regex_filter": "redos/(a+)+$",
        },
        {
            "id": "files",
            "project": SYNC_PROJECT,
            "type": "local",
            "bucket": "sync-bucket",
            "root": str(bucket),
            "prefix": "tasks",
            "use_blob_urls": False,
        },
    ]
    settings = build_settings(storages, tmp_path, sync={"poll_interval": 0.05, "concurrency": 2})
    client = await aiohttp_client(create_app(settings, workers=True))
    [client.task] = await client.server.app[REGISTRY].add_tasks(
        PROJECT, [{"data": {"video": "gs://media-bucket/clip.bin"}}]
    )
    return client


async def test_probes_and_media_answer_within_bound_while_a_worst_case_sync_runs(gateway):
    client = gateway
    media_url = f"/tasks/{client.task}/resolve/?fileuri={encode_fileuri('gs://media-bucket/clip.bin')}"
    media_headers = {"Authorization": f"Bearer {make_token(tasks=[client.task])}", "Range": "bytes=0-65535"}
    assert (await client.get(media_url, headers=media_headers)).status == 206  # metadata cached, as in steady state

    latencies: dict[str, list[float]] = {"healthz": [], "media": []}

    async def timed(name: str, path: str, headers: dict[str, str] | None = None) -> None:
        started = time.perf_counter()
        response = await client.get(path, headers=headers)
        await response.read()
        latencies[name].append(time.perf_counter() - started)
        assert response.status in (200, 206), (name, response.status)

    async def status(storage: str) -> dict[str, Any]:
        response = await client.get(f"/api/storages/gcs/{storage}", headers=ADMIN)
        return await response.json()

    # As `gateway serve` does before it serves (gateway/cli.py): what exists at start-up is kept
    # out of the collector's reach, else a full collection walks pytest's whole heap (~0.1 s).
    gc.collect()
    gc.freeze()
    try:
        syncing = True

        async def probe() -> None:
            """Always one request in flight: whenever the loop is blocked, some request waits for it."""
            while syncing:
                await timed("healthz", "/healthz")
                await timed("media", media_url, media_headers)

        probing = asyncio.create_task(probe())
        for storage in ("redos", "files"):
            assert (await client.post(f"/api/storages/gcs/{storage}/sync", headers=ADMIN)).status == 202
        deadline = time.monotonic() + 120
        while True:
            states = [await status(storage) for storage in ("redos", "files")]
            if all(s["status"] not in ("queued", "in_progress") for s in states):
                break
            assert time.monotonic() < deadline, states
            await asyncio.sleep(0.02)  # polling the job's status
    finally:
        syncing = False
        gc.unfreeze()
    await probing

    redos, files = states
    # The sync did the work: one key matched the filter, the task files were read row by row.
    assert redos["status"] == "completed" and redos["meta"]["created"] == 1 and redos["meta"]["skipped"] == 2
    assert files["meta"]["created"] == 3 * ROWS + 1, files["meta"]
    assert any("dense.jsonl" in error and "expected a JSON object" in error for error in files["meta"]["errors_sample"])
    assert any("deep.json" in error and "nested deeper" in error for error in files["meta"]["errors_sample"])
    assert len(latencies["healthz"]) >= 5, "the sync ended before it could be observed"
    worst = {name: max(values) for name, values in latencies.items()}
    assert worst["healthz"] < BOUND and worst["media"] < BOUND, (worst, {k: len(v) for k, v in latencies.items()})
