"""Scenario 7: Label Studio webhook ingest (`POST /api/webhooks/label-studio`) and the export it feeds.

Label Studio's webhook sender gives up after 1 s and never retries, so the answer (sent only once
the event is committed to the registry's outbox) must come well inside 1 s under concurrent
senders. wrk (webhook.lua, 16 connections) posts ANNOTATION_CREATED payloads shaped like Label
Studio's (as tests/test_export.py builds them), a new annotation id per request, to:

* `gw-sqlite`: `gateway serve` from the working tree (--workers processes) with its export worker
  on, as deployed by default: while it records, its first process exports to a target storage;
* `rec-sqlite`: the same with `[export] worker = false` ("recorded only": the ingest path alone,
  as when `gateway worker` exports from another process);
* `bare`: bench/bare.py reading the same POST body and answering the same JSON bytes, the ceiling
  for an aiohttp handler on this machine;
* with --webhook-postgres also `gw-pg` and `rec-pg`, the same gateways on a throwaway PostgreSQL
  cluster (bench/postgres.py).

Every gateway has its own registry. Targets alternate round by round; after each run of a gateway
whose export worker is on, the harness waits (bounded) until the worker has delivered the run's
backlog, so the next target is never measured while that export still runs: the wait is the
drain time, and backlog / drain time the export rate with the ingest stopped.

The target storage is bench/synthgcs.py (an empty bucket), not fake-gcs-server: its memory
backend finds an object by a linear scan, so uploads slow down as the bucket fills (measured on
this machine, a GET + upload pair as the export worker does: 259/s for the first 1,000 objects,
36/s by 8,000), and a run records tens of thousands of annotations; its filesystem backend stays
near 150-200 pairs/s, bound by the disk. Either way the drain would measure the emulator. The
stand-in's answers to the export worker's calls are compared with fake-gcs-server's on every run.

Checks: every answer is 200 and says "recorded" with version 1 (a new annotation: ids never
collide); per run, the registry holds every answered annotation (the rows in the run's id range
are the 200s plus at most one request in flight per connection when wrk stopped, and never more
than the requests sent); at the end every annotation's version is 1, the export worker's target
reports nothing pending and as many delivered as the registry holds, the bucket holds exactly the
registry's annotation ids, and sampled objects equal the annotation with its task.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil

from .bare import WEBHOOK_ANSWER, WEBHOOK_PATH
from .checks import Check
from .postgres import PostgresCluster, unavailable_reason
from .procs import (
    HOST,
    ROOT,
    BenchError,
    Emulator,
    Service,
    answers,
    free_port,
    http_get,
    listening_processes,
    wait_until,
)
from .scenarios import Bar, Context, Row, ScenarioResult, Target, median, ratio
from .sync_import import Client, RegistryProbe, SynthGcs
from .wrk import WrkRun, WrkSpec, expect

SECRET_HEADER = "X-Gateway-Webhook-Secret"
LS_PROJECT = 3  # Label Studio's project id in the payloads, mapped to PROJECT by [webhooks] project_map
PROJECT = "bench"
TARGET_ID = "bench-export"
EXPORT_BUCKET = "bench-export"
CONNECTIONS = 16
TIMEOUT_MS = 1000.0  # Label Studio's webhook timeout
THREAD_STRIDE = 10**9  # webhook.lua: annotation id = run base + thread * 1e9 + n
RUN_STRIDE = 10**11  # one id range per wrk run (two threads stay far below)
TASKS = 1000  # webhook.lua: task id = 1 + (n - 1) % 1000
DRAIN_POLL_S = 0.1
MIN_BACKLOG = 50  # a smaller backlog drains within a poll or two: no rate is computed from it
SAMPLED_OBJECTS = 12


@dataclass
class WebhookOptions:
    workers: int = 2
    postgres: bool = False
    access_log: bool = False


# ---------------------------------------------------------------- Label Studio's payloads


def ls_project() -> dict[str, Any]:
    """The project object Label Studio sends with every webhook (tests/test_export.py's shape)."""
    return {
        "id": LS_PROJECT,
        "title": "Bench",
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
        "task_number": TASKS,
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
        "queue_total": TASKS - 1,
        "queue_done": 1,
    }


def ls_task(task_id: Any) -> dict[str, Any]:
    return {
        "id": task_id,
        "data": {"image": f"gs://bench-media/images/{task_id}.jpg"},
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


def ls_annotation(annotation_id: Any, task_id: Any) -> dict[str, Any]:
    return {
        "id": annotation_id,
        "result": [
            {
                "id": "a1b2c3",
                "type": "choices",
                "value": {"choices": ["Cat"]},
                "origin": "manual",
                "to_name": "image",
                "from_name": "choice",
            }
        ],
        "created_username": " annotator1@example.com, 1",
        "created_ago": "0\xa0minutes",
        "completed_by": 1,
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
        "updated_by": 1,
        "parent_prediction": None,
        "parent_annotation": None,
        "last_created_by": None,
    }


def created(annotation_id: Any, task_id: Any) -> dict[str, Any]:
    return {
        "action": "ANNOTATION_CREATED",
        "annotation": ls_annotation(annotation_id, task_id),
        "task": ls_task(task_id),
        "project": ls_project(),
    }


def template() -> str:
    """The payload with the markers webhook.lua fills in: @A@ (annotation id), @T@ (task id)."""
    text = json.dumps(created("@A@", "@T@"))
    return text.replace('"@A@"', "@A@").replace('"@T@"', "@T@")


def task_of(annotation_id: int) -> int:
    """The task id webhook.lua sends with an annotation id (base and thread offsets are multiples of 1e9)."""
    return 1 + (annotation_id % THREAD_STRIDE - 1) % TASKS


def exported(annotation_id: int) -> dict[str, Any]:
    """What the export worker writes for an annotation: the annotation with its task object."""
    task = task_of(annotation_id)
    return {**ls_annotation(annotation_id, task), "task": ls_task(task)}


# ---------------------------------------------------------------- the gateway under test


class WebhookGateway:
    """`python -m gateway serve` with a webhook secret and one target storage on the stand-in."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        registry_url: str,
        storage_host: str,
        prefix: str,
        hook_secret: str,
        *,
        workers: int,
        export_worker: bool,
        access_log: bool,
    ) -> None:
        self.name = name
        self.port = free_port()
        self.workers = workers
        self.registry_url = registry_url
        self.prefix = prefix
        self.export_worker = export_worker
        self.dir = workdir / name
        self.dir.mkdir()
        self.config = self.dir / "webhooks.toml"
        self.config.write_text(
            f"""# Written by bench/webhooks.py (scenario 7) for one run.
[server]
host = "{HOST}"
port = {self.port}
workers = {workers}
shutdown_timeout = 3.0
access_log = {"true" if access_log else "false"}

[auth]
algorithms = ["HS256"]
secret = "{os.urandom(32).hex()}"

[registry]
url = "{registry_url}"

[webhooks]
secret = "{hook_secret}"
project_map = ["{LS_PROJECT}={PROJECT}"]

[export]
worker = {"true" if export_worker else "false"}

[[export_storages]]
id = "{TARGET_ID}"
project = "{PROJECT}"
type = "gcs"
bucket = "{EXPORT_BUCKET}"
prefix = "{prefix}"
""",
            encoding="utf-8",
        )
        self.env = {**os.environ, "STORAGE_EMULATOR_HOST": storage_host}
        self.admin = {"Authorization": f"Bearer {self._cli('token', '--sub', 'bench', '--admin', '--ttl', '1d')}"}
        metrics_dir = self.dir / "metrics"
        metrics_dir.mkdir()
        self.service = Service(
            f"gateway-{name}",
            [sys.executable, "-m", "gateway", "serve", "--config", str(self.config), "--workers", str(workers)],
            workdir,
            env={**self.env, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
            cwd=ROOT,
            stop_signal=signal.SIGTERM,
            stdout_file=True,
        )
        try:
            wait_until(lambda: answers(self.port, "/healthz", 200), 60, f"the {name} gateway to answer", self.service)
            wait_until(
                lambda: listening_processes(self.service, self.port) >= workers,
                30,
                f"{workers} {name} gateway worker(s) to listen",
                self.service,
            )
        except BaseException:
            self.service.stop()
            raise

    def _cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "gateway", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=ROOT,
            timeout=60,
        )
        if done.returncode != 0:
            raise BenchError(f"gateway {args[0]} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout.strip()

    def outbox(self) -> dict[str, Any]:
        """The target storage's `meta` from `GET /api/storages/export/gcs/<id>` (what an operator sees)."""
        status, _, body = http_get(self.port, f"/api/storages/export/gcs/{TARGET_ID}", self.admin, timeout=15.0)
        if status != 200:
            raise BenchError(f"{self.name}: GET /api/storages/export/gcs/{TARGET_ID} answered {status}: {body[:200]!r}")
        return json.loads(body)["meta"]

    def redacted_config(self) -> str:
        return "\n".join(
            line if not line.startswith("secret") else 'secret = "(random per run)"'
            for line in self.config.read_text().splitlines()
        )

    def stop(self) -> None:
        self.service.stop(timeout=10.0)


@dataclass
class Variant:
    """One registry (SQLite or PostgreSQL): a gateway exporting and one recording only."""

    group: str  # sqlite | pg
    label: str  # SQLite | PostgreSQL
    exporting: WebhookGateway
    recording: WebhookGateway
    database_pid: int | None = None  # the PostgreSQL postmaster (its backends are its children)
    drains: list[dict[str, Any]] = field(default_factory=list)

    @property
    def names(self) -> tuple[str, str]:
        return f"gw-{self.group}", f"rec-{self.group}"


# ---------------------------------------------------------------- the stand-in against fake-gcs-server


def _call(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def conformance(emulator: Emulator, stand_in: SynthGcs) -> Check:
    """The export worker's calls (`?fields=md5Hash` metadata read, then `uploadType=media` upload)
    answered alike by fake-gcs-server and the stand-in: 404 before, a generation after the upload,
    the same md5Hash (the worker skips an unchanged object by it) and the same bytes back."""
    bucket = "bench-export-check"
    emulator.create_bucket(bucket)
    problems: list[str] = []
    try:
        for annotation_id in (1, 2 * THREAD_STRIDE + 17, 123_456_789_012):
            key = f"conformance/{annotation_id}"
            data = json.dumps(exported(annotation_id), ensure_ascii=False, sort_keys=True).encode()
            seen = {}
            for name, port, where in (
                ("fake-gcs-server", emulator.port, bucket),
                ("stand-in", stand_in.port, stand_in.bucket),
            ):
                b = quote(where, safe="")
                meta = f"/storage/v1/b/{b}/o/{quote(key, safe='')}?fields=md5Hash"
                before, _ = _call(port, "GET", meta)
                upload = f"/upload/storage/v1/b/{b}/o?uploadType=media&name={quote(key, safe='')}&fields=generation"
                stored, answer = _call(port, "POST", upload, data)
                after, md5 = _call(port, "GET", meta)
                got, back = _call(port, "GET", f"/storage/v1/b/{b}/o/{quote(key, safe='')}?alt=media")
                generation = json.loads(answer).get("generation") if stored == 200 else None
                seen[name] = (before, stored, bool(generation), after, json.loads(md5).get("md5Hash"), got, back)
            if seen["fake-gcs-server"] != seen["stand-in"]:
                problems.append(
                    f"{key}: fake-gcs-server {seen['fake-gcs-server'][:6]} vs stand-in {seen['stand-in'][:6]}"
                )
            elif seen["stand-in"][:4] != (404, 200, True, 200) or seen["stand-in"][6] != data:
                problems.append(f"{key}: unexpected answers {seen['stand-in'][:6]}")
        # the stand-in's bucket holds only the gateways' objects from here on
        for annotation_id in (1, 2 * THREAD_STRIDE + 17, 123_456_789_012):
            _call(
                stand_in.port,
                "DELETE",
                f"/storage/v1/b/{stand_in.bucket}/o/{quote(f'conformance/{annotation_id}', safe='')}",
            )
    except (OSError, http.client.HTTPException, ValueError) as exc:
        problems.append(f"{type(exc).__name__}: {exc}")
    what = "the export worker's GCS calls answered alike by fake-gcs-server and the stand-in"
    return Check("7", "before", "stand-in", what, not problems, "; ".join(problems))


# ---------------------------------------------------------------- the scenario


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU of a process and its descendants so far (0 without a process).

    The reaped children's share counts too: PostgreSQL's backends come and go (the harness's own
    registry queries open and close connections), and a backend that exits moves its CPU time
    into the postmaster's children times, so the sum never goes backwards."""
    total = 0.0
    if pid is None:
        return total
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                total += times.user + times.system + times.children_user + times.children_system
    return total


def _probe(gateway: WebhookGateway) -> RegistryProbe:
    return RegistryProbe(gateway.registry_url)


def _count(probe: RegistryProbe, low: int, high: int) -> int:
    return int(probe.query("SELECT count(*) FROM annotations WHERE id >= ? AND id < ?", low, high)[0][0])


def _settled_count(probe: RegistryProbe, low: int, high: int) -> int:
    """Rows in [low, high) once no more arrive: requests in flight when wrk stopped still commit."""
    previous, deadline = -1, time.monotonic() + 10
    while True:
        rows = _count(probe, low, high)
        if rows == previous or time.monotonic() > deadline:
            return rows
        previous = rows
        time.sleep(0.2)


def drain(gateway: WebhookGateway, limit_s: float) -> dict[str, Any]:
    """Poll the target's outbox status until nothing is pending (bounded). Seconds are counted from
    the call (right after wrk stopped); the backlog is the first poll's pending count."""
    started = time.monotonic()
    backlog: int | None = None
    polls = 0
    while True:
        meta = gateway.outbox()
        polls += 1
        now = time.monotonic() - started
        if backlog is None:
            backlog = int(meta["pending"])
        if meta["pending"] == 0:
            return {"backlog": backlog, "seconds": round(now, 3), "polls": polls, "delivered": meta["delivered"]}
        if now > limit_s:
            return {
                "backlog": backlog,
                "seconds": None,
                "polls": polls,
                "pending": meta["pending"],
                "timed_out": limit_s,
            }
        time.sleep(DRAIN_POLL_S)


def _drain_limit(backlog_bound: int) -> float:
    return 60.0 + backlog_bound / 20  # at least 20 annotations/s, or the wait ends and the check fails


def webhook_ingest(ctx: Context) -> ScenarioResult:
    options: WebhookOptions = ctx.webhooks or WebhookOptions()
    result = ScenarioResult(
        "7", f"Label Studio webhook ingest (ANNOTATION_CREATED), {CONNECTIONS} connections, vs bare aiohttp"
    )
    if ctx.emulator is None or "bare" not in ctx.targets:
        raise BenchError("scenario 7 needs fake-gcs-server and the bare aiohttp server")
    bare = ctx.targets["bare"]
    stack = contextlib.ExitStack()
    variants: list[Variant] = []
    hook_secret = os.urandom(24).hex()
    payload = ctx.workdir / "webhook-payload.json"
    payload.write_text(template(), encoding="utf-8")
    load_before = os.getloadavg()
    try:
        stand_in = SynthGcs(ctx.workdir, 0, bucket=EXPORT_BUCKET, prefix="none/", name="synthgcs-export")
        stack.callback(stand_in.stop)
        ctx.sample(result, "before", [conformance(ctx.emulator, stand_in)])

        registries = [("sqlite", "SQLite", lambda role: f"sqlite:///{ctx.workdir / f'webhooks-{role}.db'}")]
        cluster: PostgresCluster | None = None
        if options.postgres:
            reason = unavailable_reason()
            if reason is None:
                cluster = PostgresCluster()
                stack.callback(cluster.stop)
                result.extra["postgresql"] = cluster.version
                registries.append(("pg", "PostgreSQL", lambda role: cluster.create_database(f"bench_hooks_{role}")))
            else:
                result.notes.append(f"PostgreSQL skipped: {reason}")
        for group, label, url in registries:
            gateways = []
            for role, exporting in (("export", True), ("record", False)):
                gateway = WebhookGateway(
                    ctx.workdir,
                    f"hooks-{group}-{role}",
                    url(role),
                    stand_in.host,
                    f"{group}-{role}/",
                    hook_secret,
                    workers=options.workers,
                    export_worker=exporting,
                    access_log=options.access_log,
                )
                stack.callback(gateway.stop)
                gateways.append(gateway)
            database_pid = cluster.process.pid if group == "pg" and cluster and cluster.process else None
            variants.append(Variant(group, label, *gateways, database_pid=database_pid))
        ctx.log(
            f"  [7] export stand-in :{stand_in.port}; "
            + ", ".join(
                f"{v.label} gateways :{v.exporting.port} (export on), :{v.recording.port} (recorded only)"
                for v in variants
            )
        )
        _measure(ctx, result, variants, bare, hook_secret, payload, stand_in)
    finally:
        stack.close()
    # Other processes on the machine lower every target's figures (the ratios less: targets alternate).
    result.extra["loadavg"] = {"before": load_before, "after": os.getloadavg()}
    return result


def _measure(
    ctx: Context,
    result: ScenarioResult,
    variants: list[Variant],
    bare: Target,
    hook_secret: str,
    payload: Path,
    stand_in: SynthGcs,
) -> None:
    gateway_of: dict[str, WebhookGateway] = {}
    targets: list[Target] = []
    for v in variants:
        for name, gateway in zip(v.names, (v.exporting, v.recording), strict=True):
            gateway_of[name] = gateway
            targets.append(Target(name, gateway.port, lambda _o: WEBHOOK_PATH))
    variant_of = {name: v for v in variants for name in v.names}
    targets.append(Target("bare", bare.port, lambda _o: WEBHOOK_PATH))
    result.extra["payload_bytes"] = len(json.dumps(created(4 * RUN_STRIDE + THREAD_STRIDE + 1, 1)))  # a typical one
    result.extra["configs"] = {g.name: g.redacted_config() for g in gateway_of.values()}

    runs_seq = itertools.count(1)
    next_base: dict[str, int] = {}
    cpu_at_start: dict[str, tuple[float, float]] = {}
    per_run: list[dict[str, Any]] = []

    def cpu(name: str) -> tuple[float, float]:
        """CPU seconds so far of a gateway (supervisor + workers) and of its PostgreSQL server."""
        return cpu_seconds(gateway_of[name].service.pid), cpu_seconds(variant_of[name].database_pid)

    def spec(target: Target) -> WrkSpec:
        base = next(runs_seq) * RUN_STRIDE
        next_base[target.name] = base
        if target.name in gateway_of:
            cpu_at_start[target.name] = cpu(target.name)
        return WrkSpec(
            target.port,
            WEBHOOK_PATH,
            CONNECTIONS,
            headers=((SECRET_HEADER, hook_secret),),
            lua=("webhook",),
            args=(str(payload), str(base)),
        )

    def validate(_target: Target, run: WrkRun) -> None:
        expect(run, body=len(WEBHOOK_ANSWER), connections=CONNECTIONS, statuses={200})
        recorded = run.counts.get("recorded")
        if not run.problems and recorded != run.statuses.get(200):
            run.problems.append(f"{recorded} of {run.statuses.get(200)} answers say recorded with version 1")

    def after_run(target: Target, run: WrkRun) -> None:
        if target.name not in gateway_of:
            return
        gateway = gateway_of[target.name]
        (gw_cpu, db_cpu), (gw_cpu0, db_cpu0) = cpu(target.name), cpu_at_start[target.name]
        base = next_base[target.name]
        rows = _settled_count(_probe(gateway), base, base + RUN_STRIDE)
        answered, sent = run.statuses.get(200, 0), run.counts.get("sent", 0)
        ok = answered <= rows <= min(sent, answered + CONNECTIONS)
        detail = f"{rows} rows for {answered} answers 200 and {sent} requests sent"
        entry: dict[str, Any] = {"target": target.name, "round": run.round, "base": base, "rows": rows}
        entry.update(
            answered=answered, sent=sent, run_s=run.duration_s, cpu_s=gw_cpu - gw_cpu0, database_cpu_s=db_cpu - db_cpu0
        )
        check = Check("7", f"round {run.round}", target.name, "registry rows = answered (+ in flight)", ok, detail)
        ctx.sample(result, f"round {run.round}", [check])
        if gateway.export_worker:
            outcome = drain(gateway, _drain_limit(rows))
            outcome.update(target=target.name, round=run.round, rows=rows, run_s=run.duration_s)
            variant_of[target.name].drains.append(outcome)
            ctx.log(
                f"  [7] {target.name}: backlog {outcome['backlog']} of {rows} recorded in the run, drained in "
                f"{outcome['seconds']} s"
            )
            if outcome["seconds"] is None:
                ctx.sample(
                    result,
                    f"round {run.round}",
                    [Check("7", f"round {run.round}", target.name, "export drained", False, str(outcome))],
                )
        per_run.append(entry)

    def after_warmup() -> None:  # the warm-ups' exports finish before the first measured run
        for v in variants:
            recorded = int(_probe(v.exporting).query("SELECT count(*) FROM annotations")[0][0])
            outcome = drain(v.exporting, _drain_limit(recorded))
            if outcome["seconds"] is None:
                raise BenchError(f"{v.exporting.name}: the warm-up's annotations were not exported: {outcome}")

    ctx.alternate(result, targets, spec, validate, after_warmup=after_warmup, after_run=after_run)
    result.extra["per_run"] = per_run
    _final_checks(ctx, result, variants, stand_in)
    _rows(ctx, result, variants)


def _final_checks(ctx: Context, result: ScenarioResult, variants: list[Variant], stand_in: SynthGcs) -> None:
    rng = random.Random(7)
    summary: dict[str, Any] = {}
    for v in variants:
        for name, gateway in zip(v.names, (v.exporting, v.recording), strict=True):
            probe = _probe(gateway)
            total = int(probe.query("SELECT count(*) FROM annotations")[0][0])
            renewed = int(probe.query("SELECT count(*) FROM annotations WHERE version <> 1")[0][0])
            problems = [f"{renewed} annotations at a version above 1 (an id sent twice)"] if renewed else []
            if gateway.export_worker:
                outcome = drain(gateway, _drain_limit(total))
                meta = gateway.outbox()
                if meta["pending"] != 0 or meta["delivered"] != total:
                    problems.append(
                        f"outbox pending {meta['pending']}, delivered {meta['delivered']}, registry {total}"
                    )
                ids = {int(i) for (i,) in probe.query("SELECT id FROM annotations")}
                client = Client(stand_in.port)
                try:
                    pages = client.list_all(EXPORT_BUCKET, gateway.prefix, "", 1000, "items(name),nextPageToken")
                    names = [item["name"] for page in pages for item in page.get("items", [])]
                    stored = {
                        int(n.removeprefix(gateway.prefix)) for n in names if n.removeprefix(gateway.prefix).isdigit()
                    }
                    if len(names) != len(stored) or stored != ids:
                        problems.append(
                            f"bucket holds {len(names)} objects under {gateway.prefix}, {len(stored & ids)} of the "
                            f"registry's {len(ids)} annotation ids, {len(stored - ids)} others"
                        )
                    sample = rng.sample(sorted(ids), min(SAMPLED_OBJECTS, len(ids)))
                    wrong = []
                    for annotation_id in sample:
                        key = quote(f"{gateway.prefix}{annotation_id}", safe="")
                        status, body = _call(stand_in.port, "GET", f"/storage/v1/b/{EXPORT_BUCKET}/o/{key}?alt=media")
                        if status != 200 or json.loads(body) != exported(annotation_id):
                            wrong.append(annotation_id)
                    if wrong:
                        problems.append(
                            f"{len(wrong)} of {len(sample)} sampled objects missing or wrong, e.g. {wrong[0]}"
                        )
                finally:
                    client.close()
                what = (
                    f"{total:,} annotations: version 1, all delivered, bucket = registry ids, "
                    f"{len(sample)} sampled objects equal"
                )
                summary[name] = {"annotations": total, "final_drain": outcome, "outbox": meta, "objects": len(names)}
            else:
                meta = gateway.outbox()
                if meta["pending"] != total or meta["delivered"] != 0:
                    problems.append(
                        f"outbox pending {meta['pending']}, delivered {meta['delivered']}, registry {total}"
                    )
                what = f"{total:,} annotations: version 1, each pending for the target (no worker)"
                summary[name] = {"annotations": total, "outbox": meta}
            ctx.sample(result, "after", [Check("7", "after", name, what, not problems, "; ".join(problems))])
            ctx.log(f"  [7] {name}: {total:,} annotations recorded; outbox {meta}")
    result.extra["registries"] = summary


def _rows(ctx: Context, result: ScenarioResult, variants: list[Variant]) -> None:
    failed = result.failed_targets()
    per_run: list[dict[str, Any]] = result.extra["per_run"]
    suspect = "stand-in" in failed  # export figures only: the ingest does not touch the stand-in
    rps = {name: median(r.rps for r in runs) for name, runs in result.runs.items()}

    def lat(name: str, pct: str, pick: Any = median) -> float | None:
        values = [r.latency_ms.get(pct) for r in result.runs.get(name, [])]
        return pick(v for v in values if v is not None) if values else None

    def worst(values: Any) -> float | None:
        values = list(values)
        return max(values) if values else None

    bare_rps = rps.get("bare")
    for v in variants:
        gw, rec = v.names
        bad = {"gateway"} if gw in failed else set()
        bad_rec = {"gateway"} if rec in failed else set()
        bad_bare = {"bare"} if "bare" in failed else set()
        g_b, r_b = ratio(rps.get(gw), bare_rps), ratio(rps.get(rec), bare_rps)
        p99_worst, rec_p99_worst = lat(gw, "p99", worst), lat(rec, "p99", worst)
        result.rows += [
            Row(
                f"{v.label}: requests/s, export worker on",
                {"gateway": rps.get(gw), "bare": bare_rps},
                {"gw/bare": g_b},
                failed=bad | bad_bare,
            ),
            Row(
                f"{v.label}: p50 latency ms",
                {"gateway": lat(gw, "p50"), "bare": lat("bare", "p50")},
                {"gw/bare": ratio(lat(gw, "p50"), lat("bare", "p50"))},
                failed=bad | bad_bare,
                decimals=2,
            ),
            Row(
                f"{v.label}: p99 latency ms",
                {"gateway": lat(gw, "p99"), "bare": lat("bare", "p99")},
                {"gw/bare": ratio(lat(gw, "p99"), lat("bare", "p99"))},
                failed=bad | bad_bare,
                decimals=2,
            ),
            Row(
                f"{v.label}: p99 ms, worst round",
                {"gateway": p99_worst},
                target=f"< {TIMEOUT_MS:.0f} ms (Label Studio's timeout)",
                met=None if p99_worst is None else p99_worst < TIMEOUT_MS,
                failed=bad,
                decimals=1,
            ),
            Row(
                f"{v.label}: max latency ms, worst round, info",
                {"gateway": lat(gw, "max", worst), "bare": lat("bare", "max", worst)},
                failed=bad | bad_bare,
                decimals=1,
            ),
            Row(
                f"{v.label} recorded only (export worker off): requests/s",
                {"gateway": rps.get(rec), "bare": bare_rps},
                {"gw/bare": r_b, "export on/off": ratio(rps.get(gw), rps.get(rec))},
                failed=bad_rec | bad_bare,
            ),
            Row(
                f"{v.label} recorded only: p99 ms, worst round",
                {"gateway": rec_p99_worst},
                target=f"< {TIMEOUT_MS:.0f} ms",
                met=None if rec_p99_worst is None else rec_p99_worst < TIMEOUT_MS,
                failed=bad_rec,
                decimals=1,
            ),
        ]
        for name, what in ((gw, "export on"), (rec, "recorded only")):
            entries = [e for e in per_run if e["target"] == name and e["answered"]]
            busy = median(e["cpu_s"] / e["run_s"] for e in entries if e["run_s"])
            database = median(1000 * e["database_cpu_s"] / e["answered"] for e in entries)
            where = f"; PostgreSQL server {database:.1f} ms" if v.database_pid is not None and database else ""
            result.rows.append(
                Row(
                    f"{v.label} {what}: gateway CPU ms per answer (CPU s per s {busy or 0:.2f}{where}), info",
                    {"gateway": median(1000 * e["cpu_s"] / e["answered"] for e in entries)},
                    failed=bad if name == gw else bad_rec,
                    decimals=2,
                )
            )
        measured = [d for d in v.drains if d["round"] > 0]
        bad_export = bad | ({"gateway"} if suspect else set())
        done = [d for d in measured if d["seconds"] is not None]
        backlog = median(d["backlog"] for d in measured)
        alone = [d["backlog"] / d["seconds"] for d in done if d["backlog"] >= MIN_BACKLOG and d["seconds"]]
        during = [(d["rows"] - d["backlog"]) / d["run_s"] for d in measured if d["run_s"]]
        result.rows += [
            Row(
                f"{v.label}: export drain s after a run (median backlog {backlog or 0:,.0f}), info",
                {"gateway": median(d["seconds"] for d in done) if len(done) == len(measured) else None},
                failed=bad_export,
                decimals=2,
            ),
            Row(
                f"{v.label}: export annotations/s, draining alone, info",
                {"gateway": median(alone)},
                failed=bad_export,
                decimals=0,
            ),
            Row(
                f"{v.label}: export annotations/s while ingesting, info",
                {"gateway": median(during)},
                failed=bad_export,
                decimals=0,
            ),
        ]
        result.bars += [
            Bar(f"{v.label} gw/bare", g_b, None, failed=bool(bad | bad_bare)),
            Bar(
                f"{v.label} p99 / {TIMEOUT_MS:.0f} ms",
                None if p99_worst is None else p99_worst / TIMEOUT_MS,
                1.0,
                "<=",
                bool(bad),
            ),
            Bar(f"{v.label} rec-only gw/bare", r_b, None, failed=bool(bad_rec | bad_bare)),
            Bar(
                f"{v.label} rec-only p99 / {TIMEOUT_MS:.0f} ms",
                None if rec_p99_worst is None else rec_p99_worst / TIMEOUT_MS,
                1.0,
                "<=",
                bool(bad_rec),
            ),
        ]
        result.extra.setdefault("drains", {})[v.group] = v.drains
        for name in v.names:
            late = [r for r in result.runs.get(name, []) if r.latency_ms.get("max", 0.0) >= TIMEOUT_MS]
            if late:
                result.notes.append(
                    f"{name}: the slowest answer of round(s) {', '.join(str(r.round) for r in late)} took "
                    f"{max(r.latency_ms['max'] for r in late):,.0f} ms, past Label Studio's 1 s timeout (that "
                    "event would be lost to the export)"
                )
    result.notes.append(
        "p99 targets use the worst round's p99; the export target storage is bench/synthgcs.py (fake-gcs-server's "
        "in-memory backend slows down as a bucket fills; its answers to the export worker's calls are checked "
        "against fake-gcs-server's)"
    )
