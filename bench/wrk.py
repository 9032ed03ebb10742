"""Running wrk and reading its result.

Every run gets a script assembled from bench/lua/ pieces ending with summary.lua, whose done()
prints one `BENCH_JSON {...}` line: requests, bytes read, socket errors, non-2xx/3xx count,
latency percentiles, (where statuses.lua is included) a count per status and a script's own
counters (`bench_counts`, e.g. webhook.lua's generated and recorded requests). wrk's human output
is kept alongside for the record.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .procs import HOST

LUA_DIR = Path(__file__).resolve().parent / "lua"
MB = 1_000_000


@dataclass(frozen=True)
class WrkSpec:
    port: int
    path: str
    connections: int
    threads: int = 2
    headers: tuple[tuple[str, str], ...] = ()
    lua: tuple[str, ...] = ()  # pieces from bench/lua/ before summary.lua
    args: tuple[str, ...] = ()
    timeout_s: int = 10


@dataclass
class WrkRun:
    target: str
    round: int  # 0 = warm-up
    duration_s: float = 0.0
    requests: int = 0
    bytes: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # a script's own counters (bench_counts)
    problems: list[str] = field(default_factory=list)
    output: str = ""

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / MB / self.duration_s if self.duration_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "round": self.round,
            "duration_s": round(self.duration_s, 3),
            "requests": self.requests,
            "bytes": self.bytes,
            "requests_per_s": round(self.rps, 1),
            "mb_per_s": round(self.mb_per_s, 2),
            "errors": self.errors,
            "latency_ms": self.latency_ms,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "counts": self.counts,
            "problems": self.problems,
        }


def script_for(spec: WrkSpec, workdir: Path) -> Path:
    text = "\n".join((LUA_DIR / f"{name}.lua").read_text() for name in (*spec.lua, "summary"))
    path = workdir / f"wrk-{hashlib.sha1(text.encode()).hexdigest()[:10]}.lua"
    if not path.exists():
        path.write_text(text)
    return path


class WrkProcess:
    """A running wrk; `interrupt()` stops it early (wrk then prints its summary as usual)."""

    def __init__(self, wrk: str, spec: WrkSpec, duration: int, workdir: Path, target: str, round_: int) -> None:
        argv = [
            wrk,
            f"-t{spec.threads}",
            f"-c{spec.connections}",
            f"-d{duration}s",
            f"--timeout={spec.timeout_s}s",
            "--latency",
            "-s",
            str(script_for(spec, workdir)),
        ]
        for name, value in spec.headers:
            argv += ["-H", f"{name}: {value}"]
        argv.append(f"http://{HOST}:{spec.port}{spec.path}")
        if spec.args:
            argv += ["--", *spec.args]
        self.deadline = duration + spec.timeout_s + 60
        self.target, self.round = target, round_
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def interrupt(self) -> None:
        if self.running:
            self.process.send_signal(signal.SIGINT)

    def finish(self) -> WrkRun:
        try:
            output, _ = self.process.communicate(timeout=self.deadline)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.communicate(timeout=5)
        return parse(output, self.process.returncode, self.target, self.round)


def run_wrk(wrk: str, spec: WrkSpec, duration: int, workdir: Path, target: str, round_: int) -> WrkRun:
    return WrkProcess(wrk, spec, duration, workdir, target, round_).finish()


def parse(output: str, returncode: int | None, target: str, round_: int) -> WrkRun:
    run = WrkRun(target, round_, output=output)
    line = next((x for x in output.splitlines() if x.startswith("BENCH_JSON ")), None)
    if returncode != 0 or line is None:
        run.problems.append(f"wrk failed (exit {returncode}): {output.strip()[-300:]}")
        return run
    data = json.loads(line.removeprefix("BENCH_JSON "))
    run.duration_s = data["duration_us"] / 1e6
    run.requests = int(data["requests"])
    run.bytes = int(data["bytes"])
    run.errors = {k: int(v) for k, v in data["errors"].items()}
    run.latency_ms = {k: round(v / 1000, 3) for k, v in data["latency_us"].items()}
    run.statuses = {int(k): int(v) for k, v in data["statuses"].items()}
    run.counts = {k: int(v) for k, v in data.get("counts", {}).items()}
    socket_errors = {k: v for k, v in run.errors.items() if k != "status" and v}
    if socket_errors:
        run.problems.append("socket errors: " + ", ".join(f"{k} {v}" for k, v in socket_errors.items()))
    if run.errors.get("status"):
        run.problems.append(f"{run.errors['status']} non-2xx/3xx responses")
    return run


def expect(
    run: WrkRun,
    *,
    body: int,
    connections: int,
    statuses: set[int] | None = None,
    header_max: int = 2048,
    min_requests: int = 1,
) -> None:
    """Problems with what a run counted: statuses, and bytes per response for a `body`-byte body.

    wrk's byte count includes the responses still in flight when it stops (at most one per
    connection), so the upper bound allows `connections` extra responses.
    """
    if run.problems and run.problems[0].startswith("wrk failed"):
        return
    if run.requests < min_requests:
        run.problems.append(f"only {run.requests} completed responses")
        return
    if statuses is not None:
        unexpected = {s: n for s, n in run.statuses.items() if s not in statuses}
        if unexpected or sum(run.statuses.values()) != run.requests:
            run.problems.append(f"statuses {run.statuses} for {run.requests} responses (expected {sorted(statuses)})")
    low = run.requests * (body + 60)
    high = (run.requests + connections) * (body + header_max)
    if not low <= run.bytes <= high:
        per = run.bytes / run.requests
        run.problems.append(f"{per:.0f} bytes per response, expected a {body}-byte body plus headers")
