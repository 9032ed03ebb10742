"""Scenario 6: the import sync (`gateway sync`), as issue 5 asks for it to be measured.

(a) 100,000 objects imported one task each (`use_blob_urls = true`) from a synthetic bucket
    (bench/synthgcs.py: fake-gcs-server cannot hold that many objects in a benchmark's time, see
    its docstring), then the unchanged bucket synced again: wall time, objects/s, peak RSS of the
    `gateway sync` process, and the re-sync's writes (created + updated + removed: must be 0,
    and the registry's task rows must be untouched). Then 1 % of the objects are deleted, 1 %
    overwritten and 1 % added, and an incremental sync must find exactly those. On a fresh
    SQLite registry, and with --sync-postgres on a throwaway PostgreSQL cluster as well.
(b) A JSONL task file (`use_blob_urls = false`) of --jsonl-mb MB (250-byte lines) in
    fake-gcs-server, imported one task per line; then re-synced (no writes).

Every sync is `python -m gateway sync STORAGE --config FILE` from the working tree, run as a child
of the harness: wall time from spawn to exit (interpreter start and imports included), peak RSS
from the kernel's high-water mark (`wait4` rusage ru_maxrss, exact) besides psutil samples every
50 ms, CPU time (user + system). Its summary line gives the counters, which are checked, and the
registry is queried to confirm them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import http.client
import json
import os
import random
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil

from . import synthgcs
from .checks import Check
from .memory import MB
from .postgres import PostgresCluster, unavailable_reason
from .procs import HOST, ROOT, BenchError, Emulator, Service, _die_with_parent, answers, free_port, wait_until
from .scenarios import Bar, Context, Row, ScenarioResult

SYNC_BUCKET = "bench-sync"
SYNC_PREFIX = "sync/"
JSONL_BUCKET = "bench-jsonl"
JSONL_KEY = "tasks/bench-tasks.jsonl"
JSONL_LINE = 250  # bytes per line, newline included
CONFORMANCE_PREFIX = "conformance/"
DATA_KEY = "$undefined$"  # the gateway's default data key for blob tasks

TARGET_OBJECTS = 100_000  # issue 5's size, to which the time targets apply
FIRST_SYNC_TARGET_S = 20.0
RESYNC_TARGET_S = 5.0
RSS_TARGET_MB = 200.0
SAMPLE_INTERVAL_S = 0.05
SUMMARY = re.compile(
    r"^storage (?P<storage>\S+): job (?P<job>\d+) (?P<status>\w+)(?: in (?P<seconds>[\d.]+) s)?: (?P<counters>.*)$"
)


@dataclass
class SyncOptions:
    objects: int = 100_000
    jsonl_mb: int = 100
    postgres: bool = False
    churn: float = 0.01  # fraction of objects deleted, overwritten and added before the incremental sync


# ---------------------------------------------------------------- one `gateway sync` run


@dataclass
class SyncRun:
    label: str
    wall_s: float
    returncode: int
    peak_rss: int  # bytes: the kernel's high-water mark of the process (ru_maxrss)
    sampled_peak_rss: int  # bytes: highest psutil sample of the process tree
    cpu_s: float  # user + system
    stdout: str
    stderr_tail: str
    samples: list[tuple[float, int]] = field(default_factory=list)
    summary: dict[str, Any] | None = None

    @property
    def counters(self) -> dict[str, int]:
        return dict(self.summary["counters"]) if self.summary else {}

    @property
    def writes(self) -> int | None:
        if not self.summary:
            return None
        return sum(self.counters.get(name, 0) for name in ("created", "updated", "removed"))

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "wall_s": round(self.wall_s, 3),
            "returncode": self.returncode,
            "peak_rss_mb": round(self.peak_rss / MB, 1),
            "sampled_peak_rss_mb": round(self.sampled_peak_rss / MB, 1),
            "cpu_s": round(self.cpu_s, 2),
            "summary": self.summary,
            "stdout": self.stdout[-2000:],
            "stderr_tail": self.stderr_tail,
            "rss_samples_mb": [
                (round(t, 2), round(r / MB, 1)) for t, r in self.samples[:: max(1, len(self.samples) // 400)]
            ],
        }


def parse_summary(stdout: str) -> dict[str, Any] | None:
    for line in stdout.splitlines():
        match = SUMMARY.match(line.strip())
        if match:
            return {
                "storage": match["storage"],
                "job": int(match["job"]),
                "status": match["status"],
                "job_seconds": float(match["seconds"]) if match["seconds"] else None,
                "counters": {name: int(value) for name, value in re.findall(r"(\w+) (\d+)", match["counters"])},
            }
    return None


def _tree_rss(process: psutil.Process) -> int:
    total = 0
    with contextlib.suppress(psutil.Error):
        for member in [process, *process.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += member.memory_info().rss
    return total


def run_sync(label: str, config: Path, storage: str, env: dict[str, str], logs: Path, timeout: float) -> SyncRun:
    """`python -m gateway sync STORAGE` to its end (bounded by `timeout`), measured."""
    argv = [sys.executable, "-m", "gateway", "sync", storage, "--config", str(config)]
    out_path, err_path = logs / f"{label}.stdout", logs / f"{label}.stderr"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        started = time.perf_counter()
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env,
            cwd=ROOT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    reaped: dict[str, Any] = {}

    def reap() -> None:  # wait4: the exit status and this one child's own rusage
        _, status, usage = os.wait4(popen.pid, 0)
        reaped.update(at=time.perf_counter(), status=status, usage=usage)

    waiter = threading.Thread(target=reap, name=f"wait-{label}", daemon=True)
    waiter.start()
    samples: list[tuple[float, int]] = []
    try:
        process: psutil.Process | None = psutil.Process(popen.pid)
    except psutil.Error:
        process = None
    deadline = started + timeout

    def kill() -> None:
        if process is not None:
            with contextlib.suppress(psutil.Error):
                for member in [*process.children(recursive=True), process]:
                    with contextlib.suppress(psutil.Error):
                        member.kill()
        waiter.join(10)

    try:
        while waiter.is_alive() and time.perf_counter() < deadline:
            if process is not None:
                rss = _tree_rss(process)
                if rss:
                    samples.append((time.perf_counter() - started, rss))
            waiter.join(SAMPLE_INTERVAL_S)
    except BaseException:  # Ctrl-C, SIGTERM: the sync must not outlive the harness's teardown
        kill()
        raise
    if waiter.is_alive():
        kill()
        raise BenchError(f"{label}: `gateway sync {storage}` did not finish within {timeout:.0f}s (killed)")
    popen.returncode = os.waitstatus_to_exitcode(reaped["status"])
    usage = reaped["usage"]
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    return SyncRun(
        label=label,
        wall_s=reaped["at"] - started,
        returncode=popen.returncode,
        peak_rss=usage.ru_maxrss * 1024,  # KiB on Linux
        sampled_peak_rss=max((rss for _, rss in samples), default=0),
        cpu_s=usage.ru_utime + usage.ru_stime,
        stdout=stdout,
        stderr_tail=stderr[-3000:],
        samples=samples,
        summary=parse_summary(stdout),
    )


# ---------------------------------------------------------------- the registry, read directly


class RegistryProbe:
    """Reads a registry's tables (SQLite file or PostgreSQL) to confirm what a sync reported."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sqlite = url.startswith("sqlite:///")

    def _query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        if self.sqlite:
            try:
                with contextlib.closing(sqlite3.connect(self.url.removeprefix("sqlite:///"), timeout=30)) as conn:
                    return [tuple(row) for row in conn.execute(sql, params)]
            except sqlite3.Error as exc:
                raise BenchError(f"reading the registry: {exc}") from exc
        count = iter(range(1, len(params) + 1))
        pg_sql = re.sub(r"\?", lambda _m: f"${next(count)}", sql)

        async def fetch() -> list[tuple[Any, ...]]:
            import asyncpg

            conn = await asyncpg.connect(self.url.replace("postgresql://", "postgres://", 1), timeout=10)
            try:
                return [tuple(row) for row in await conn.fetch(pg_sql, *params)]
            finally:
                await conn.close()

        try:
            return asyncio.run(asyncio.wait_for(fetch(), 120))
        except Exception as exc:  # asyncpg's errors, timeouts: the check reports them
            raise BenchError(f"reading the registry: {type(exc).__name__}: {exc}") from exc

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Rows of one statement (`?` placeholders, numbered for PostgreSQL)."""
        return self._query(sql, *params)

    def task_state(self, storage: str) -> dict[str, Any]:
        """Count, sum of ids and latest write time of a storage's tasks: unchanged means untouched."""
        count, id_sum, last = self._query(
            "SELECT count(*), coalesce(sum(id), 0), max(updated_at) FROM tasks WHERE storage_id = ?", storage
        )[0]
        (objects,) = self._query(
            "SELECT count(*) FROM storage_objects WHERE storage_id = ? AND generation IS NOT NULL", storage
        )[0]
        (uris,) = self._query(
            "SELECT count(*) FROM task_uris WHERE task_id IN (SELECT id FROM tasks WHERE storage_id = ?)", storage
        )[0]
        return {
            "tasks": int(count),
            "id_sum": int(id_sum),
            "last_write": last,
            "objects": int(objects),
            "uris": int(uris),
        }

    def tasks_of_keys(self, storage: str, keys: list[str]) -> dict[str, Any]:
        marks = ",".join("?" for _ in keys)
        rows = self._query(
            f'SELECT object_key, task FROM tasks WHERE storage_id = ? AND "row" = 0 AND object_key IN ({marks})',
            storage,
            *keys,
        )
        return {key: json.loads(task) if isinstance(task, str) else task for key, task in rows}

    def tasks_of_rows(self, storage: str, key: str, rows: list[int]) -> dict[int, Any]:
        marks = ",".join("?" for _ in rows)
        found = self._query(
            f'SELECT "row", task FROM tasks WHERE storage_id = ? AND object_key = ? AND "row" IN ({marks})',
            storage,
            key,
            *rows,
        )
        return {int(row): json.loads(task) if isinstance(task, str) else task for row, task in found}

    def generations(self, storage: str, keys: list[str]) -> dict[str, str | None]:
        marks = ",".join("?" for _ in keys)
        rows = self._query(
            f"SELECT object_key, generation FROM storage_objects WHERE storage_id = ? AND object_key IN ({marks})",
            storage,
            *keys,
        )
        return dict(rows)


# ---------------------------------------------------------------- the synthetic bucket


class SynthGcs:
    """bench/synthgcs.py in its own process, holding one bucket (SYNC_BUCKET unless told)."""

    def __init__(
        self, workdir: Path, count: int, *, bucket: str = SYNC_BUCKET, prefix: str = SYNC_PREFIX, name: str = "synthgcs"
    ) -> None:
        self.port = free_port()
        self.bucket = bucket
        started = time.perf_counter()
        self.service = Service(
            name,
            [
                sys.executable,
                "-m",
                "bench.synthgcs",
                "--host",
                HOST,
                "--port",
                str(self.port),
                "--bucket",
                bucket,
                "--prefix",
                prefix,
                "--count",
                str(count),
            ],
            workdir,
            cwd=ROOT,
        )
        wait_until(
            lambda: answers(self.port, f"/storage/v1/b/{bucket}", 200), 120, "the synthetic bucket", self.service
        )
        self.seconds = time.perf_counter() - started
        self.keys = [synthgcs.key_name(prefix, i) for i in range(count)]  # what it holds under the prefix
        self.next_index = count

    @property
    def host(self) -> str:
        return f"{HOST}:{self.port}"

    def cpu_s(self) -> float:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(self.service.pid).cpu_times()
            return times.user + times.system
        return 0.0

    def stop(self) -> None:
        self.service.stop()


class Client:
    """One keep-alive HTTP connection to a GCS JSON API (the stand-in or fake-gcs-server)."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection(HOST, port, timeout=60)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
        self.connection.request(method, path, body=body, headers=headers or {})
        response = self.connection.getresponse()
        data = response.read()
        if response.status not in (200, 204):
            raise BenchError(f"{method} {path[:120]}: HTTP {response.status}: {data[:300]!r}")
        return json.loads(data) if data else None

    def upload(self, bucket: str, key: str, body: bytes) -> dict[str, Any]:
        path = f"/upload/storage/v1/b/{quote(bucket, safe='')}/o?uploadType=media&name={quote(key, safe='')}"
        return self.request("POST", path, body, {"Content-Type": "application/json"})

    def delete(self, bucket: str, key: str) -> None:
        self.request("DELETE", f"/storage/v1/b/{quote(bucket, safe='')}/o/{quote(key, safe='')}")

    def list_all(
        self, bucket: str, prefix: str, delimiter: str = "", page_size: int = 1000, fields: str = ""
    ) -> list[dict[str, Any]]:
        """Every page, in order (bounded: at most 10,000 pages)."""
        pages, token = [], None
        for _ in range(10_000):
            query = f"prefix={quote(prefix, safe='')}&maxResults={page_size}"
            if delimiter:
                query += f"&delimiter={quote(delimiter, safe='')}"
            if fields:
                query += f"&fields={quote(fields, safe='')}"
            if token:
                query += f"&pageToken={quote(token, safe='')}"
            page = self.request("GET", f"/storage/v1/b/{quote(bucket, safe='')}/o?{query}")
            pages.append(page)
            token = page.get("nextPageToken")
            if not token:
                return pages
        raise BenchError(f"listing {bucket}/{prefix} did not end within 10,000 pages")

    def close(self) -> None:
        self.connection.close()


def _conformance_keys() -> list[str]:
    """Keys under CONFORMANCE_PREFIX: top-level objects, sub-folders, a nested folder, a folder
    marker, and names whose byte order differs from naive orderings ('-' < '/' < '0' < 'a')."""
    keys = [f"{CONFORMANCE_PREFIX}obj-{i:04d}.json" for i in range(1100)]
    keys += [f"{CONFORMANCE_PREFIX}dir-{d}/obj-{i:02d}.json" for d in range(3) for i in range(5)]
    keys += [f"{CONFORMANCE_PREFIX}dir-1/deeper/obj-{i}.json" for i in range(3)]
    keys += [f"{CONFORMANCE_PREFIX}dir-2/", f"{CONFORMANCE_PREFIX}a-b.json", f"{CONFORMANCE_PREFIX}a/b.json"]
    keys += [f"{CONFORMANCE_PREFIX}\u00e9t\u00e9.json", f"{CONFORMANCE_PREFIX}Z.json", "conformance-sibling.json"]
    return keys


def conformance(emulator: Emulator, synth: SynthGcs) -> tuple[Check, dict[str, Any]]:
    """The stand-in lists like fake-gcs-server: the same keys uploaded to both, then every listing
    shape the sync uses (recursive and one level, pages of 1000 and of 7) must give the same
    names, sizes and folder prefixes, in the same order, each page within maxResults."""
    keys = _conformance_keys()
    started = time.perf_counter()
    emulator.create_bucket(SYNC_BUCKET)
    fake, stand_in = Client(emulator.port), Client(synth.port)
    problems: list[str] = []
    shapes: dict[str, Any] = {}
    try:
        for index, key in enumerate(keys):
            body = synthgcs.task_body(index)
            fake.upload(SYNC_BUCKET, key, body)
            stand_in.upload(SYNC_BUCKET, key, body)
        for delimiter in ("", "/"):
            for page_size in (1000, 7):
                views = []
                for name, client in (("fake-gcs-server", fake), ("stand-in", stand_in)):
                    pages = client.list_all(SYNC_BUCKET, CONFORMANCE_PREFIX, delimiter, page_size)
                    largest = max(len(p.get("items", [])) + len(p.get("prefixes", [])) for p in pages)
                    if largest > page_size and name == "stand-in":
                        problems.append(f"a page holds {largest} entries, more than maxResults={page_size}")
                    items = [(i["name"], int(i["size"])) for p in pages for i in p.get("items", [])]
                    prefixes = sorted({x for p in pages for x in p.get("prefixes", [])})
                    views.append((items, prefixes, len(pages)))
                shape = f"delimiter={delimiter!r} maxResults={page_size}"
                (fake_items, fake_prefixes, fake_pages), (own_items, own_prefixes, own_pages) = views
                shapes[shape] = {
                    "items": len(own_items),
                    "prefixes": own_prefixes,
                    "pages": {"fake-gcs-server": fake_pages, "stand-in": own_pages},
                }
                if fake_items != own_items:
                    differ = next(
                        (a, b) for a, b in zip([*fake_items, None], [*own_items, None], strict=False) if a != b
                    )
                    problems.append(f"{shape}: items differ (first difference fake-gcs-server/stand-in: {differ})")
                if fake_prefixes != own_prefixes:
                    problems.append(f"{shape}: prefixes {fake_prefixes} vs {own_prefixes}")
                if own_items != sorted(own_items, key=lambda item: item[0].encode()):
                    problems.append(f"{shape}: the stand-in's items are not in byte order")
    except (OSError, http.client.HTTPException, BenchError, ValueError, KeyError) as exc:
        problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        fake.close()
        stand_in.close()
    # The conformance objects leave the stand-in again: the sync's bucket then holds only its own
    # (they lie outside the sync's prefix anyway).
    cleanup = Client(synth.port)
    try:
        for key in keys:
            with contextlib.suppress(BenchError):  # a 404: never uploaded (the failure is reported)
                cleanup.delete(SYNC_BUCKET, key)
    finally:
        cleanup.close()
    detail = "; ".join(problems)
    seconds = time.perf_counter() - started
    check = Check(
        "6", "before", "stand-in", f"listing conformance with fake-gcs-server ({len(keys)} keys)", not problems, detail
    )
    return check, {"keys": len(keys), "seconds": round(seconds, 2), "shapes": shapes}


def direct_listing(synth: SynthGcs, expected: int) -> tuple[float, int]:
    """The floor of any sync: listing the prefix page by page with a plain client (JSON parsed)."""
    client = Client(synth.port)
    try:
        started = time.perf_counter()
        pages = client.list_all(SYNC_BUCKET, SYNC_PREFIX, "/", 1000, "items(name,generation,size),nextPageToken")
        seconds = time.perf_counter() - started
    finally:
        client.close()
    return seconds, sum(len(p.get("items", [])) for p in pages)


def churn(synth: SynthGcs, fraction: float, rng: random.Random) -> dict[str, Any]:
    """Delete, overwrite and add `fraction` of the objects each; returns the keys and new generations."""
    n = max(1, int(len(synth.keys) * fraction))
    picked = rng.sample(range(len(synth.keys)), 2 * n)
    deleted = sorted(synth.keys[i] for i in picked[:n])
    overwritten = sorted(synth.keys[i] for i in picked[n:])
    added = [synthgcs.key_name(SYNC_PREFIX, synth.next_index + i) for i in range(n)]
    synth.next_index += n
    generations: dict[str, str] = {}
    client = Client(synth.port)
    try:
        for key in deleted:
            client.delete(SYNC_BUCKET, key)
        for key in overwritten + added:
            stored = client.upload(SYNC_BUCKET, key, b'{"data": {"text": "overwritten"}}\n')
            generations[key] = str(stored["generation"])
    finally:
        client.close()
    gone = set(deleted)
    synth.keys = sorted([k for k in synth.keys if k not in gone] + added)
    return {"n": n, "deleted": deleted, "overwritten": overwritten, "added": added, "generations": generations}


# ---------------------------------------------------------------- the JSONL task file


def jsonl_line(index: int) -> bytes:
    """Line `index` of the task file: exactly JSONL_LINE bytes (a padded text field)."""
    head = f'{{"data": {{"image": "gs://{JSONL_BUCKET}/img/{index:08d}.jpg", "text": "'
    tail = f'"}}, "meta": {{"row": {index}}}}}\n'
    return (head + "x" * (JSONL_LINE - len(head) - len(tail)) + tail).encode()


def upload_jsonl(emulator: Emulator, lines: int) -> tuple[float, str]:
    """Stream the task file into fake-gcs-server (1 MB blocks, never held whole); returns the
    upload time and its md5, checked against the emulator's."""
    emulator.create_bucket(JSONL_BUCKET)
    md5 = hashlib.md5()

    def blocks() -> Iterator[bytes]:
        per_block = 4000
        for start in range(0, lines, per_block):
            block = b"".join(jsonl_line(i) for i in range(start, min(start + per_block, lines)))
            md5.update(block)
            yield block

    started = time.perf_counter()
    stored = emulator.upload(JSONL_BUCKET, JSONL_KEY, lines * JSONL_LINE, blocks())
    seconds = time.perf_counter() - started
    if int(stored.get("size", -1)) != lines * JSONL_LINE:
        raise BenchError(f"{JSONL_KEY}: the emulator stored {stored.get('size')} bytes, expected {lines * JSONL_LINE}")
    if stored.get("md5Hash") and base64.b64decode(stored["md5Hash"]).hex() != md5.hexdigest():
        raise BenchError(f"{JSONL_KEY}: the emulator's md5 differs from the uploaded bytes'")
    return seconds, md5.hexdigest()


# ---------------------------------------------------------------- configs


def write_config(path: Path, registry_url: str, storage: str, bucket: str, prefix: str, blob_urls: bool) -> None:
    path.write_text(
        f"""# Written by bench/sync_import.py (scenario 6) for one run.
[auth]
algorithms = ["HS256"]
secret = "{os.urandom(32).hex()}"

[registry]
url = "{registry_url}"

[sync]
page_size = 1000
batch_size = 1000

[[storages]]
id = "{storage}"
project = 1
type = "gcs"
bucket = "{bucket}"
prefix = "{prefix}"
use_blob_urls = {"true" if blob_urls else "false"}
recursive_scan = false
""",
        encoding="utf-8",
    )


# ---------------------------------------------------------------- the scenario


class Recorder:
    """Checks and figures of one scenario run, grouped (sqlite, postgresql, jsonl)."""

    def __init__(self, ctx: Context, result: ScenarioResult) -> None:
        self.ctx, self.result = ctx, result
        self.failed_groups: set[str] = set()

    def check(self, group: str, phase: str, what: str, problems: list[str]) -> bool:
        ok = not problems
        self.ctx.sample(self.result, phase, [Check("6", phase, group, what, ok, "; ".join(problems))])
        if not ok:
            self.failed_groups.add(group)
        return ok


def _run_problems(run: SyncRun, storage: str) -> list[str]:
    problems = []
    if run.returncode != 0:
        problems.append(f"exit code {run.returncode}: {run.stderr_tail[-600:]}")
    if run.summary is None:
        problems.append(f"no summary line in the output: {run.stdout[-300:]!r}")
    elif run.summary["status"] != "completed" or run.summary["storage"] != storage:
        problems.append(f"job {run.summary['status']} for storage {run.summary['storage']}")
    return problems


def _counter_problems(run: SyncRun, expected: dict[str, int]) -> list[str]:
    counters = run.counters
    return [
        f"{name} {counters.get(name)}, expected {value}"
        for name, value in expected.items()
        if counters.get(name) != value
    ]


def _log_run(ctx: Context, run: SyncRun, units: str, count: int) -> None:
    rate = count / run.wall_s if run.wall_s else 0.0
    job = run.summary["job_seconds"] if run.summary else None
    ctx.log(
        f"  [6] {run.label:22s} {run.wall_s:7.2f} s wall (job {job} s), {rate:9,.0f} {units}/s, "
        f"peak RSS {run.peak_rss / MB:6.1f} MB, CPU {run.cpu_s:6.2f} s; "
        f"{', '.join(f'{k} {v}' for k, v in run.counters.items())}"
    )


def blob_sync_pair(
    ctx: Context, rec: Recorder, synth: SynthGcs, group: str, registry_url: str, options: SyncOptions
) -> dict[str, Any]:
    """First sync, unchanged re-sync and incremental sync of the synthetic bucket into one registry."""
    workdir = ctx.workdir / f"sync-{group}"
    workdir.mkdir()
    config = workdir / "sync.toml"
    storage = f"bulk-{group}"
    write_config(config, registry_url, storage, SYNC_BUCKET, SYNC_PREFIX, blob_urls=True)
    env = {**os.environ, "STORAGE_EMULATOR_HOST": synth.host}
    probe = RegistryProbe(registry_url)
    count = len(synth.keys)
    timeout = 300 + count / 100  # at least 100 objects/s, or the run is stopped
    out: dict[str, Any] = {"registry": registry_url.split("@")[-1], "objects": count}

    cpu = synth.cpu_s()
    first = run_sync(f"{group}-first", config, storage, env, workdir, timeout)
    out["storage_cpu_s_first"] = round(synth.cpu_s() - cpu, 2)
    _log_run(ctx, first, "objects", count)
    problems = _run_problems(first, storage) + _counter_problems(
        first, {"listed": count, "created": count, "updated": 0, "removed": 0, "skipped": 0, "errors": 0}
    )
    state = probe.task_state(storage)
    if state["tasks"] != count or state["objects"] != count or state["uris"] != count:
        problems.append(
            f"registry holds {state['tasks']} tasks, {state['objects']} objects, {state['uris']} URIs; "
            f"expected {count} each"
        )
    rng = random.Random(6)
    sample = sorted([*rng.sample(synth.keys, min(20, count)), synth.keys[0], synth.keys[-1]])
    tasks = probe.tasks_of_keys(storage, sample)
    wrong = [k for k in sample if tasks.get(k) != {"data": {DATA_KEY: f"gs://{SYNC_BUCKET}/{k}"}}]
    if wrong:
        problems.append(
            f"{len(wrong)} of {len(sample)} sampled tasks missing or wrong, e.g. {wrong[0]}: {tasks.get(wrong[0])}"
        )
    rec.check(group, "first sync", f"first sync of {count:,} objects: counters and registry", problems)

    cpu = synth.cpu_s()
    again = run_sync(f"{group}-resync", config, storage, env, workdir, timeout)
    out["storage_cpu_s_resync"] = round(synth.cpu_s() - cpu, 2)
    _log_run(ctx, again, "objects", count)
    problems = _run_problems(again, storage) + _counter_problems(again, {"listed": count, "errors": 0})
    if again.writes != 0:
        problems.append(f"re-sync of an unchanged bucket wrote {again.writes} tasks ({again.counters})")
    after = probe.task_state(storage)
    if after != state:
        problems.append(f"the registry's tasks changed: {state} -> {after}")
    rec.check(group, "re-sync", "unchanged re-sync: 0 writes, task rows untouched", problems)

    changes = churn(synth, options.churn, rng)
    n = changes["n"]
    incremental = run_sync(f"{group}-incremental", config, storage, env, workdir, timeout)
    _log_run(ctx, incremental, "objects", count)
    problems = _run_problems(incremental, storage) + _counter_problems(
        incremental, {"listed": len(synth.keys), "created": n, "removed": n, "errors": 0}
    )
    if not 0 <= incremental.counters.get("updated", -1) <= n:
        problems.append(f"updated {incremental.counters.get('updated')}, expected at most {n}")
    recorded = probe.generations(storage, changes["deleted"] + changes["overwritten"] + changes["added"])
    # The registry records the generation, possibly qualified ("GEN/fingerprint of the import settings").
    stale = [k for k, g in changes["generations"].items() if (recorded.get(k) or "").split("/")[0] != g]
    kept = [k for k in changes["deleted"] if k in recorded]
    if stale or kept:
        problems.append(
            f"{len(stale)} changed objects without their new generation, {len(kept)} deleted ones still recorded"
        )
    final = probe.task_state(storage)
    if final["tasks"] != len(synth.keys):
        problems.append(f"registry holds {final['tasks']} tasks, the bucket {len(synth.keys)} objects")
    rec.check(group, "incremental", f"{n} deleted, {n} overwritten, {n} added: exactly those synced", problems)

    out.update(
        first=first.as_dict(),
        resync=again.as_dict(),
        incremental=incremental.as_dict(),
        churn={k: changes[k] for k in ("n",)},
        registry_after_first=state,
    )
    out["runs"] = (first, again, incremental)
    return out


def jsonl_import(ctx: Context, rec: Recorder, emulator: Emulator, options: SyncOptions) -> dict[str, Any]:
    lines = options.jsonl_mb * 1_000_000 // JSONL_LINE
    size = lines * JSONL_LINE
    ctx.log(f"  [6] uploading a {size / 1e6:,.0f} MB JSONL task file ({lines:,} lines) to fake-gcs-server")
    upload_s, md5 = upload_jsonl(emulator, lines)
    workdir = ctx.workdir / "sync-jsonl"
    workdir.mkdir()
    config = workdir / "sync.toml"
    registry_url = f"sqlite:///{workdir / 'registry.db'}"
    storage = "jsonl"
    write_config(config, registry_url, storage, JSONL_BUCKET, JSONL_KEY.rsplit("/", 1)[0] + "/", blob_urls=False)
    env = {**os.environ, "STORAGE_EMULATOR_HOST": emulator.host}
    probe = RegistryProbe(registry_url)
    timeout = 300 + lines / 1000

    first = run_sync("jsonl-first", config, storage, env, workdir, timeout)
    _log_run(ctx, first, "rows", lines)
    problems = _run_problems(first, storage) + _counter_problems(
        first, {"listed": 1, "created": lines, "updated": 0, "removed": 0, "errors": 0}
    )
    state = probe.task_state(storage)
    if state["tasks"] != lines or state["objects"] != 1 or state["uris"] != lines:
        problems.append(f"registry holds {state['tasks']} tasks, {state['objects']} objects, {state['uris']} URIs")
    rows = sorted({0, lines - 1, *random.Random(7).sample(range(lines), min(20, lines))})
    tasks = probe.tasks_of_rows(storage, JSONL_KEY, rows)
    wrong = [r for r in rows if tasks.get(r) != json.loads(jsonl_line(r))]
    if wrong:
        problems.append(f"{len(wrong)} of {len(rows)} sampled rows missing or wrong, e.g. line {wrong[0] + 1}")
    rec.check(
        "jsonl", "first sync", f"{size / 1e6:,.0f} MB JSONL: {lines:,} tasks, sampled rows equal the lines", problems
    )

    again = run_sync("jsonl-resync", config, storage, env, workdir, timeout)
    _log_run(ctx, again, "rows", lines)
    problems = _run_problems(again, storage) + _counter_problems(again, {"listed": 1, "errors": 0})
    if again.writes != 0:
        problems.append(f"re-sync wrote {again.writes} tasks ({again.counters})")
    if probe.task_state(storage) != state:
        problems.append("the registry's tasks changed")
    rec.check("jsonl", "re-sync", "JSONL re-sync: 0 writes, task rows untouched", problems)
    return {
        "size_bytes": size,
        "lines": lines,
        "line_bytes": JSONL_LINE,
        "md5": md5,
        "upload_s": round(upload_s, 2),
        "first": first.as_dict(),
        "resync": again.as_dict(),
        "runs": (first, again),
    }


def _rows_for_pair(group: str, label: str, pair: dict[str, Any], failed: set[str]) -> tuple[list[Row], list[Bar]]:
    """Table rows and chart bars of one registry. The time targets are issue 5's for 100,000
    objects: at another size the times are shown for information only."""
    first, again, incremental = pair["runs"]
    count = pair["objects"]
    at_scale = count == TARGET_OBJECTS
    bad = {"gateway"} if group in failed else set()
    rss = max(first.peak_rss, again.peak_rss, incremental.peak_rss) / MB
    scale = "" if at_scale else f", info (targets apply to {TARGET_OBJECTS:,})"
    rows = [
        Row(
            f"{label}: first sync s, {count:,} objects{scale}",
            {"gateway": first.wall_s},
            target=f"< {FIRST_SYNC_TARGET_S:.0f} s" if at_scale else "",
            met=first.wall_s < FIRST_SYNC_TARGET_S if at_scale else None,
            failed=bad,
            decimals=1,
        ),
        Row(f"{label}: first sync objects/s", {"gateway": count / first.wall_s}, failed=bad, decimals=0),
        Row(
            f"{label}: re-sync s (unchanged){scale}",
            {"gateway": again.wall_s},
            target=f"< {RESYNC_TARGET_S:.0f} s" if at_scale else "",
            met=again.wall_s < RESYNC_TARGET_S if at_scale else None,
            failed=bad,
            decimals=1,
        ),
        Row(
            f"{label}: re-sync writes (created + updated + removed)",
            {"gateway": again.writes},
            target="0",
            met=again.writes == 0,
            failed=bad,
            decimals=0,
        ),
        Row(
            f"{label}: peak RSS MB (max of 3 syncs)",
            {"gateway": rss},
            target=f"< {RSS_TARGET_MB:.0f} MB",
            met=rss < RSS_TARGET_MB,
            failed=bad,
            decimals=1,
        ),
        Row(
            f"{label}: CPU s / wall s, first sync, info",
            {"gateway": first.cpu_s / first.wall_s if first.wall_s else None},
            failed=bad,
            decimals=2,
        ),
        Row(
            f"{label}: incremental sync s ({pair['churn']['n']:,} x del/mod/add), info",
            {"gateway": incremental.wall_s},
            failed=bad,
            decimals=1,
        ),
    ]
    target = 1.0 if at_scale else None
    bars = [
        Bar(
            f"{label} first / {FIRST_SYNC_TARGET_S:.0f} s", first.wall_s / FIRST_SYNC_TARGET_S, target, "<=", bool(bad)
        ),
        Bar(f"{label} re-sync / {RESYNC_TARGET_S:.0f} s", again.wall_s / RESYNC_TARGET_S, target, "<=", bool(bad)),
        Bar(f"{label} RSS / {RSS_TARGET_MB:.0f} MB", rss / RSS_TARGET_MB, 1.0, "<=", bool(bad)),
    ]
    return rows, bars


def sync_import(ctx: Context) -> ScenarioResult:
    options: SyncOptions = ctx.sync
    result = ScenarioResult("6", "sync import: 100k objects (first sync, unchanged re-sync), JSONL task file")
    rec = Recorder(ctx, result)
    if ctx.emulator is None:
        raise BenchError("scenario 6 needs the fake-gcs-server emulator")
    load_before = os.getloadavg()
    stack = contextlib.ExitStack()
    pairs: dict[str, dict[str, Any]] = {}
    jsonl: dict[str, Any] | None = None
    try:
        ctx.log(f"  [6] generating {options.objects:,} objects in the synthetic bucket (bench/synthgcs.py)")
        synth = SynthGcs(ctx.workdir, options.objects)
        stack.callback(synth.stop)
        ctx.log(f"  [6] synthetic bucket ready in {synth.seconds:.1f} s")
        check, conformance_detail = conformance(ctx.emulator, synth)
        ctx.sample(result, "before", [check])
        result.extra["conformance"] = conformance_detail
        listing_s, listed = direct_listing(synth, options.objects)
        ctx.log(f"  [6] listing alone (plain client, pages of 1000): {listing_s:.2f} s for {listed:,} objects")
        rec.check(
            "stand-in",
            "before",
            "the stand-in lists every seeded object",
            [] if listed == options.objects else [f"listed {listed}"],
        )
        result.extra["direct_listing"] = {"seconds": round(listing_s, 3), "objects": listed}
        result.extra["synthetic_bucket_seconds"] = round(synth.seconds, 2)

        groups: list[tuple[str, str]] = [("sqlite", f"sqlite:///{ctx.workdir / 'sync-sqlite-registry.db'}")]
        if options.postgres:
            reason = unavailable_reason()
            if reason is None:
                cluster = PostgresCluster()
                stack.callback(cluster.stop)
                result.extra["postgresql"] = cluster.version
                groups.append(("postgresql", cluster.create_database("bench_sync")))
            else:
                result.notes.append(f"PostgreSQL skipped: {reason}")
        for group, url in groups:
            ctx.log(f"  [6] {group}: first sync, re-sync, incremental sync")
            pairs[group] = blob_sync_pair(ctx, rec, synth, group, url, options)
        stack.close()  # the stand-in and PostgreSQL are no longer needed
        if options.jsonl_mb > 0:
            jsonl = jsonl_import(ctx, rec, ctx.emulator, options)
    finally:
        stack.close()

    failed = rec.failed_groups
    labels = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}
    listing_row = Row(
        f"listing alone s (plain client, {options.objects:,} objects), info",
        {"direct": listing_s},
        decimals=2,
    )
    result.rows.append(listing_row)
    # A stand-in that lists differently from fake-gcs-server makes every 100,000-object figure suspect.
    suspect = set(pairs) if "stand-in" in failed else set()
    for group, pair in pairs.items():
        rows, bars = _rows_for_pair(group, labels[group], pair, failed | suspect)
        result.rows += rows
        result.bars += bars
    if jsonl is not None:
        first, again = jsonl["runs"]
        bad = {"gateway"} if "jsonl" in failed else set()
        mb = jsonl["size_bytes"] / 1e6
        rss = max(first.peak_rss, again.peak_rss) / MB
        result.rows += [
            Row(
                f"JSONL {mb:,.0f} MB ({jsonl['lines']:,} rows): import s",
                {"gateway": first.wall_s},
                failed=bad,
                decimals=1,
            ),
            Row("JSONL rows/s", {"gateway": jsonl["lines"] / first.wall_s}, failed=bad, decimals=0),
            Row(
                "JSONL peak RSS MB",
                {"gateway": rss},
                target=f"< {RSS_TARGET_MB:.0f} MB",
                met=rss < RSS_TARGET_MB,
                failed=bad,
                decimals=1,
            ),
            Row("JSONL re-sync s, info", {"gateway": again.wall_s}, failed=bad, decimals=1),
        ]
        result.bars.append(Bar(f"JSONL RSS / {RSS_TARGET_MB:.0f} MB", rss / RSS_TARGET_MB, 1.0, "<=", bool(bad)))
        jsonl = {k: v for k, v in jsonl.items() if k != "runs"}
    result.extra["sync"] = {group: {k: v for k, v in pair.items() if k != "runs"} for group, pair in pairs.items()}
    result.extra["jsonl"] = jsonl
    result.extra["options"] = options.__dict__
    result.extra["loadavg"] = {"before": load_before, "after": os.getloadavg()}
    result.notes.append(
        "100,000-object syncs list a synthetic bucket (bench/synthgcs.py, checked against fake-gcs-server's "
        "listing); fake-gcs-server's memory backend is O(n) per upload and cannot be seeded with 100,000 objects "
        "in a benchmark's time. The JSONL file is served by fake-gcs-server."
    )
    return result
