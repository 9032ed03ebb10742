"""The scenarios, registered by number. Each returns a ScenarioResult: table rows, chart bars,
the raw runs and the correctness checks.

Scenario 6 (sync import) is in bench/sync_import.py, scenario 7 (webhook ingest) in
bench/webhooks.py. To add one, write
`def my_scenario(ctx: Context) -> ScenarioResult` and put it in SCENARIOS (a scenario registered
with None is listed as "not yet available").
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import bare as bare_server
from .checks import Check, check_not_modified, check_range, check_redirect, check_small_body, check_whole, fetch
from .memory import MB, RssSampler, breakdown, idle_rss, measure
from .objects import SeededObject
from .procs import Emulator, Gateway, Service
from .wrk import WrkProcess, WrkRun, WrkSpec, expect, run_wrk

if TYPE_CHECKING:
    from .sync_import import SyncOptions
    from .webhooks import WebhookOptions

SPAN = 65536
NOT_YET = "not yet available"
UPSTREAM_COUNT = "gateway_upstream_request_duration_seconds_count"
SIGNED_URLS = "gateway_signed_urls_total"
SIGNED_URL_LOOKUPS = "gateway_signed_url_cache_total"


# ---------------------------------------------------------------- results


@dataclass
class Row:
    metric: str
    values: dict[str, float | None]  # target name -> figure
    ratios: dict[str, float | None] = field(default_factory=dict)
    target: str = ""
    met: bool | None = None
    failed: set[str] = field(default_factory=set)  # targets whose figure is FAILED
    decimals: int | None = None

    @property
    def verdict(self) -> str:
        if self.failed:
            return "FAILED"
        if self.met is None:
            return "-"
        return "yes" if self.met else "NO"

    def as_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "values": {k: ("FAILED" if k in self.failed else v) for k, v in self.values.items()},
            "measured": self.values,
            "ratios": self.ratios,
            "target": self.target,
            "met": self.met,
            "failed_targets": sorted(self.failed),
            "verdict": self.verdict,
        }


@dataclass
class Bar:
    label: str
    value: float | None
    target: float | None = None
    op: str = ">="  # the value must be >= or <= the target
    failed: bool = False

    @property
    def met(self) -> bool | None:
        if self.target is None or self.value is None:
            return None
        return self.value >= self.target if self.op == ">=" else self.value <= self.target


@dataclass
class ScenarioResult:
    id: str
    title: str
    status: str = "ok"  # ok | not yet available | skipped | error
    rows: list[Row] = field(default_factory=list)
    bars: list[Bar] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    runs: dict[str, list[WrkRun]] = field(default_factory=dict)
    warmups: list[WrkRun] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def failed_targets(self) -> set[str]:
        failed = {c.target for c in self.checks if not c.ok}
        failed |= {name for name, runs in self.runs.items() if any(r.problems for r in runs)}
        return failed

    @property
    def failed(self) -> bool:
        return self.status == "error" or bool(self.failed_targets())

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "status": self.status,
            "rows": [r.as_dict() for r in self.rows],
            "chart": [{**b.__dict__, "met": b.met} for b in self.bars],
            "checks": [c.as_dict() for c in self.checks],
            "runs": {name: [r.as_dict() for r in runs] for name, runs in self.runs.items()},
            "warmups": [r.as_dict() for r in self.warmups],
            "notes": self.notes,
            **self.extra,
        }


# ---------------------------------------------------------------- context


@dataclass
class Target:
    name: str
    port: int
    path: Callable[[SeededObject | None], str]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Context:
    wrk: str
    workdir: Path
    rounds: int
    duration: int
    warmup: int
    objects: dict[str, SeededObject]
    targets: dict[str, Target]
    gateway: Gateway | None  # None when only scenarios 6 and 7 run
    emulator_url: str = ""  # http://host:port of fake-gcs-server: where signed URLs must point
    log: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True)
    emulator: Emulator | None = None  # fake-gcs-server (scenario 6 uploads its JSONL task file there)
    sync: SyncOptions | None = None  # scenario 6's sizes and registries
    webhooks: WebhookOptions | None = None  # scenario 7's workers and registries

    def pick(self, *names: str) -> list[Target]:
        return [self.targets[n] for n in names]

    def alternate(
        self,
        result: ScenarioResult,
        targets: list[Target],
        spec: Callable[[Target], WrkSpec],
        validate: Callable[[Target, WrkRun], None],
        *,
        after_warmup: Callable[[], None] | None = None,
        after_run: Callable[[Target, WrkRun], None] | None = None,
    ) -> None:
        """Warm every target up once, then rounds of A B C …: every target once per round.

        `after_run` is called after each measured run (after `validate` and the log line), before
        the next target starts: e.g. to let work a run left behind finish outside the next run."""
        for target in targets:
            if self.warmup > 0:
                result.warmups.append(run_wrk(self.wrk, spec(target), self.warmup, self.workdir, target.name, 0))
        if after_warmup is not None:
            after_warmup()
        result.runs = {t.name: [] for t in targets}
        for number in range(1, self.rounds + 1):
            for target in targets:
                run = run_wrk(self.wrk, spec(target), self.duration, self.workdir, target.name, number)
                validate(target, run)
                result.runs[target.name].append(run)
                flag = "  <- " + "; ".join(run.problems) if run.problems else ""
                self.log(
                    f"  [{result.id}] round {number}/{self.rounds} {target.name:8s} {run.rps:10.1f} req/s "
                    f"{run.mb_per_s:9.1f} MB/s  p50 {run.latency_ms.get('p50', 0):8.2f} ms "
                    f"p99 {run.latency_ms.get('p99', 0):8.2f} ms{flag}"
                )
                if after_run is not None:
                    after_run(target, run)

    def sample(self, result: ScenarioResult, phase: str, checks: Iterable[Check]) -> None:
        for check in checks:
            result.checks.append(check)
            if not check.ok:
                self.log(f"  [{result.id}] CHECK FAILED {phase} {check.target}: {check.what}: {check.detail}")


def median(values: Iterable[float]) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def medians(result: ScenarioResult, figure: Callable[[WrkRun], float]) -> dict[str, float | None]:
    return {name: median(figure(r) for r in runs) for name, runs in result.runs.items()}


def _at_least(value: float | None, target: float) -> bool | None:
    return None if value is None else value >= target


# ---------------------------------------------------------------- 1: range GETs


def range_gets(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("1", "64 KiB range GETs of the 50 MiB object, 16 connections")
    obj = ctx.objects["small"]
    targets = ctx.pick("direct", "nginx", "gateway")
    slots = obj.size // SPAN
    rng = random.Random(1)
    offsets = [rng.randrange(slots) * SPAN for _ in range(3)] + [(slots - 1) * SPAN]

    def checks(phase: str) -> None:
        ctx.sample(
            result,
            phase,
            (
                check_range("1", phase, t.name, t.port, t.path(obj), t.headers, obj, offset)
                for t in targets
                for offset in offsets
            ),
        )

    checks("before")
    snapshot: dict[str, float] = {}
    ctx.alternate(
        result,
        targets,
        lambda t: WrkSpec(
            t.port,
            t.path(obj),
            connections=16,
            headers=tuple(t.headers.items()),
            lua=("range",),
            args=(str(obj.size), str(SPAN)),
        ),
        lambda _t, run: expect(run, body=SPAN, connections=16),
        after_warmup=lambda: snapshot.update(ctx.gateway.metrics()),
    )
    upstream = ctx.gateway.metrics().get(UPSTREAM_COUNT, 0.0) - snapshot.get(UPSTREAM_COUNT, 0.0)
    checks("after")

    failed = result.failed_targets()
    rps = medians(result, lambda r: r.rps)
    g_d, g_n = ratio(rps["gateway"], rps["direct"]), ratio(rps["gateway"], rps["nginx"])
    n_d = ratio(rps["nginx"], rps["direct"])
    met = None if g_d is None or g_n is None else g_d >= 0.50 and g_n >= 0.70
    result.rows.append(
        Row(
            "requests/s",
            rps,
            {"gw/direct": g_d, "gw/nginx": g_n, "nginx/direct": n_d},
            "gw/direct >= 0.50, gw/nginx >= 0.70",
            met,
            failed,
        )
    )
    for pct in ("p50", "p99"):
        lat = medians(result, lambda r, p=pct: r.latency_ms.get(p, 0.0))
        result.rows.append(
            Row(
                f"{pct} latency ms",
                lat,
                {"gw/direct": ratio(lat["gateway"], lat["direct"]), "gw/nginx": ratio(lat["gateway"], lat["nginx"])},
                failed=failed,
                decimals=2,
            )
        )
    # One upstream request per range (a little over 1: requests in flight when wrk stops are not counted).
    answered = sum(r.requests for r in result.runs["gateway"])
    per = upstream / answered if answered else None
    result.rows.append(Row("upstream requests per gw response, info", {"gateway": per}, failed=failed, decimals=3))
    result.extra["upstream_requests"] = upstream
    result.bars = [
        Bar("gw/direct", g_d, 0.50, failed=bool(failed & {"gateway", "direct"})),
        Bar("gw/nginx", g_n, 0.70, failed=bool(failed & {"gateway", "nginx"})),
        Bar("nginx/direct", n_d, None, failed=bool(failed & {"nginx", "direct"})),
    ]
    return result


# ---------------------------------------------------------------- 2: whole-object GETs


def whole_gets(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("2", "whole 50 MiB object GETs, 4 connections")
    obj = ctx.objects["small"]
    targets = ctx.pick("direct", "nginx", "gateway")

    def checks(phase: str) -> None:
        ctx.sample(
            result, phase, (check_whole("2", phase, t.name, t.port, t.path(obj), t.headers, obj) for t in targets)
        )

    checks("before")
    ctx.alternate(
        result,
        targets,
        lambda t: WrkSpec(t.port, t.path(obj), connections=4, headers=tuple(t.headers.items()), timeout_s=60),
        lambda _t, run: expect(run, body=obj.size, connections=4),
    )
    checks("after")

    failed = result.failed_targets()
    mbps = medians(result, lambda r: r.mb_per_s)
    g_d, g_n = ratio(mbps["gateway"], mbps["direct"]), ratio(mbps["gateway"], mbps["nginx"])
    n_d = ratio(mbps["nginx"], mbps["direct"])
    result.rows.append(
        Row(
            "MB/s",
            mbps,
            {"gw/direct": g_d, "gw/nginx": g_n, "nginx/direct": n_d},
            "gw/direct >= 0.75",
            _at_least(g_d, 0.75),
            failed,
        )
    )
    lat = medians(result, lambda r: r.latency_ms.get("p50", 0.0))
    result.rows.append(
        Row("p50 ms per object", lat, {"gw/direct": ratio(lat["gateway"], lat["direct"])}, failed=failed, decimals=1)
    )
    result.bars = [
        Bar("gw/direct", g_d, 0.75, failed=bool(failed & {"gateway", "direct"})),
        Bar("gw/nginx", g_n, None, failed=bool(failed & {"gateway", "nginx"})),
        Bar("nginx/direct", n_d, None, failed=bool(failed & {"nginx", "direct"})),
    ]
    return result


# ---------------------------------------------------------------- 3: signed-URL redirects


def signed_redirects(ctx: Context) -> ScenarioResult:
    """303s to a cached V4 signed URL (the presign storage), vs the bare handler.

    wrk never follows redirects, so only the gateway's answer is measured; the sampled checks
    follow the Location once to prove the URL works. Signatures are counted from /metrics: the
    cache is per worker, so at most one signature per worker for the one object.
    """
    result = ScenarioResult(
        "3", "cached signed-URL redirects (303) through the gateway vs bare aiohttp, 16 connections"
    )
    obj = ctx.objects["signed"]
    gateway, bare = ctx.targets["gateway"], ctx.targets["bare"]
    workers = ctx.gateway.workers
    start = ctx.gateway.metrics()
    redirect: dict[str, Any] = {}

    def checks(phase: str) -> None:
        found = []
        for _ in range(max(3, workers)):  # fresh connections: SO_REUSEPORT spreads them over the workers
            check, got = check_redirect(
                "3", phase, "gateway", gateway.port, gateway.path(obj), gateway.headers, obj, ctx.emulator_url
            )
            found.append(check)
            if got is not None and got.status == 303 and not redirect:
                redirect.update(
                    body=got.length,
                    location_length=len(got.headers.get("location", "")),
                    cache_control=got.headers.get("cache-control", ""),
                )
        found.append(
            check_small_body("3", phase, "bare", bare.port, bare.path(None), gateway.headers, bare_server.BODY)
        )
        ctx.sample(result, phase, found)

    checks("before")
    # The same request headers (the bearer token) go to both servers: the bare one ignores them.
    body = {"gateway": redirect.get("body", 0), "bare": len(bare_server.BODY)}
    header_max = {"gateway": redirect.get("location_length", 0) + 2048, "bare": 2048}
    status = {"gateway": {303}, "bare": {200}}
    rounds_start: dict[str, float] = {}
    ctx.alternate(
        result,
        [gateway, bare],
        lambda t: WrkSpec(
            t.port,
            t.path(obj if t.name == "gateway" else None),
            16,
            headers=tuple(gateway.headers.items()),
            lua=("statuses",),
        ),
        lambda t, run: expect(
            run, body=body[t.name], connections=16, statuses=status[t.name], header_max=header_max[t.name]
        ),
        after_warmup=lambda: rounds_start.update(ctx.gateway.metrics()),
    )
    rounds_end = ctx.gateway.metrics()
    checks("after")
    end = ctx.gateway.metrics()

    def delta(name: str, a: dict[str, float], b: dict[str, float]) -> float:
        return b.get(name, 0.0) - a.get(name, 0.0)

    signatures = delta(SIGNED_URLS, start, end)
    in_rounds = delta(SIGNED_URLS, rounds_start or start, rounds_end)
    lookups = delta(SIGNED_URL_LOOKUPS, start, end)
    ctx.log(
        f"  [3] signatures: {signatures:.0f} during the scenario ({in_rounds:.0f} during the measured rounds) "
        f"for {lookups:.0f} signed-URL cache lookups; {workers} worker(s)"
    )
    if signatures > workers:
        result.notes.append(
            f"{signatures:.0f} signatures for one object with {workers} worker(s): the signed-URL cache "
            "did not hold (expected at most one per worker)"
        )
    result.extra.update(
        signatures=signatures,
        signatures_in_rounds=in_rounds,
        signed_url_cache_lookups=lookups,
        redirect=redirect,
    )

    failed = result.failed_targets()
    g_b = _versus_bare_rows(result, failed)
    cached = "cached" if signatures <= workers else "NOT cached"
    result.rows.append(
        Row(
            f"signatures during run ({cached}: <= 1 per worker = {workers}), info",
            {"gateway": signatures},
            failed=failed & {"gateway"},
            decimals=0,
        )
    )
    result.bars = [Bar("gw/bare", g_b, 0.80, failed=bool(failed))]
    return result


# ---------------------------------------------------------------- 4: revalidation


def revalidation(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("4", "If-None-Match revalidation (304) through the gateway vs bare aiohttp, 16 connections")
    obj = ctx.objects["small"]
    gateway, bare = ctx.targets["gateway"], ctx.targets["bare"]
    got = fetch(gateway.port, gateway.path(obj), {**gateway.headers, "Range": "bytes=0-0"})
    etag = got.headers.get("etag", "")
    result.extra["etag"] = etag
    if got.status != 206 or etag != f'"{obj.generation}"':
        result.checks.append(
            Check(
                "4",
                "before",
                "gateway",
                "ETag",
                False,
                f"status {got.status}, ETag {etag!r}, generation {obj.generation}",
            )
        )
    # The same request headers go to both servers: the bare one ignores them.
    headers = {**gateway.headers, "If-None-Match": etag}

    def checks(phase: str) -> None:
        ctx.sample(
            result,
            phase,
            [
                check_not_modified("4", phase, "gateway", gateway.port, gateway.path(obj), gateway.headers, etag),
                check_small_body("4", phase, "bare", bare.port, bare.path(None), headers, bare_server.BODY),
            ],
        )

    checks("before")
    snapshot: dict[str, float] = {}

    def before_rounds() -> None:
        snapshot.update(ctx.gateway.metrics())

    body = {"gateway": 0, "bare": len(bare_server.BODY)}
    status = {"gateway": {304}, "bare": {200}}
    ctx.alternate(
        result,
        [gateway, bare],
        lambda t: WrkSpec(
            t.port, t.path(obj if t.name == "gateway" else None), 16, headers=tuple(headers.items()), lua=("statuses",)
        ),
        lambda t, run: expect(run, body=body[t.name], connections=16, statuses=status[t.name]),
        after_warmup=before_rounds,
    )
    upstream = ctx.gateway.metrics().get(UPSTREAM_COUNT, 0.0) - snapshot.get(UPSTREAM_COUNT, 0.0)
    checks("after")

    failed = result.failed_targets()
    g_b = _versus_bare_rows(result, failed)
    result.rows.append(
        Row(
            "upstream requests in run",
            {"gateway": upstream},
            target="0",
            met=upstream == 0,
            failed=failed & {"gateway"},
            decimals=0,
        )
    )
    result.extra["upstream_requests"] = upstream
    result.bars = [
        Bar("gw/bare", g_b, 0.80, failed=bool(failed)),
        Bar("upstream reqs", upstream, 0.0, op="<=", failed="gateway" in failed),
    ]
    return result


# ---------------------------------------------------------------- 5: memory


RSS_BUDGET_MB = 150.0
RAMP_LIMIT_S = 30
ACTIVE_FRACTION = 0.95
FLAT_TOLERANCE_MB = 16.0  # growth streaming 2 GiB may exceed growth streaming 50 MiB by this much
DRIFT_TOLERANCE_MB = 8.0  # peak in the last quarter of the 2 GiB stream vs the first quarter


def _active_streams(gateway: Gateway) -> float:
    return gateway.metrics().get("gateway_active_streams", 0.0)


def memory(ctx: Context) -> ScenarioResult:
    """Memory from a clean start: single streams first (50 MiB, then 2 GiB), then 200 at once.

    The gateway is restarted first: workers keep the heap they grew in earlier scenarios, which
    would hide any growth of a single stream.
    """
    result = ScenarioResult("5", "gateway memory (supervisor + workers): one 50 MiB / 2 GiB stream; 200 streams")
    small, big = ctx.objects["small"], ctx.objects.get("big")
    gateway = ctx.targets["gateway"]
    ctx.gateway.restart()
    result.notes.append("the gateway was restarted at the start of scenario 5 (memory from a clean start)")
    service: Service = ctx.gateway.service
    streams = 200

    # The first stream through fresh workers is the warm-up (and a check); the baseline follows.
    ctx.sample(
        result,
        "before",
        [check_whole("5", "before", "gateway", gateway.port, gateway.path(small), gateway.headers, small)],
    )
    if big is not None:  # a range past 2^31 through every proxy, against the generated bytes
        ctx.sample(
            result,
            "before",
            [
                check_range("5", "before", t.name, t.port, t.path(big), t.headers, big, big.size - SPAN)
                for t in ctx.pick("direct", "nginx", "gateway")
            ],
        )
    baseline, baseline_pss = idle_rss(service)
    result.extra["processes_idle"] = breakdown(service)

    # (b) single streams: growth must not follow the object size.
    with RssSampler(service) as one:
        got = fetch(gateway.port, gateway.path(small), gateway.headers)
    one_growth = (one.peak - baseline) / MB
    ok = got.status == 200 and got.md5 == small.md5
    ctx.sample(
        result,
        "during",
        [Check("5", "during", "gateway", "one 50 MiB stream", ok, "" if ok else f"status {got.status}, md5 differs")],
    )
    failed = result.failed_targets()
    result.rows += [
        Row("RSS MB idle, fresh gateway", {"gateway": baseline / MB}, failed=failed, decimals=1),
        Row("RSS MB growth, 1 x 50 MiB stream", {"gateway": one_growth}, failed=failed, decimals=1),
    ]
    if big is None:
        result.notes.append("2 GiB stream skipped (--quick, or the object was not seeded)")
        result.rows.append(Row("RSS MB growth, 1 x 2 GiB stream", {"gateway": None}, target="flat (skipped)"))
    else:
        with RssSampler(service) as sampler:
            got = fetch(
                gateway.port,
                gateway.path(big),
                gateway.headers,
                sha256=True,
                progress=lambda n: setattr(sampler, "progress", n),
                timeout=60,
            )
        problems = []
        if got.status != 200 or got.length != big.size:
            problems.append(f"status {got.status}, {got.length} bytes")
        if got.sha256 != big.sha256:
            problems.append("sha256 differs from the seeded object")
        check = Check("5", "during", "gateway", "2 GiB stream sha256", not problems, "; ".join(problems))
        ctx.sample(result, "during", [check])
        quarter = big.size // 4
        first_q, last_q = sampler.peak_between(0, quarter), sampler.peak_between(3 * quarter, big.size + 1)
        growth = (sampler.peak - baseline) / MB
        drift = (last_q - first_q) / MB
        flat = growth <= max(one_growth, 0.0) + FLAT_TOLERANCE_MB and drift <= DRIFT_TOLERANCE_MB
        failed = result.failed_targets()
        rate = big.size / MB / got.seconds if got.seconds else 0.0
        ctx.log(
            f"  [5] 2 GiB stream: {rate:.0f} MB/s, RSS growth {growth:.1f} MB "
            f"(one 50 MiB stream: {one_growth:.1f} MB), drift first->last quarter {drift:+.1f} MB"
        )
        result.rows += [
            Row(
                "RSS MB growth, 1 x 2 GiB stream",
                {"gateway": growth},
                target=f"flat: <= 50 MiB's + {FLAT_TOLERANCE_MB:.0f}, drift <= {DRIFT_TOLERANCE_MB:.0f}",
                met=flat,
                failed=failed,
                decimals=1,
            ),
            Row("RSS MB drift, last vs first quarter", {"gateway": drift}, failed=failed, decimals=1),
            Row("MB/s, 1 x 2 GiB stream (info)", {"gateway": rate}, failed=failed, decimals=0),
        ]
        result.extra["big_stream"] = {
            "baseline_rss": baseline,
            "peak_rss": sampler.peak,
            "growth_mb": growth,
            "drift_mb": drift,
            "mb_per_s": rate,
            "samples": [(round(x.seconds, 2), x.rss, x.progress) for x in sampler.samples],
        }
        excess = growth - max(one_growth, 0.0)
        result.bars.append(
            Bar("2 GiB extra growth / 16 MB", excess / FLAT_TOLERANCE_MB, 1.0, "<=", failed=bool(failed))
        )

    # (a) 200 concurrent streams: wait (bounded) until they are all streaming, then hold for --duration.
    spec = WrkSpec(gateway.port, gateway.path(small), streams, headers=tuple(gateway.headers.items()), timeout_s=120)
    seen: list[float] = []
    ramp: float | None = None
    wrk = WrkProcess(ctx.wrk, spec, RAMP_LIMIT_S + ctx.duration + 10, ctx.workdir, "gateway", 1)
    try:
        with RssSampler(service) as many:
            started = time.monotonic()
            while wrk.running and time.monotonic() - started < RAMP_LIMIT_S:
                seen.append(_active_streams(ctx.gateway))
                if seen[-1] >= streams * ACTIVE_FRACTION:  # streams end and restart: exactly 200 is rare
                    ramp = time.monotonic() - started
                    break
                time.sleep(0.2)
            hold_until = time.monotonic() + ctx.duration
            while wrk.running and time.monotonic() < hold_until:
                seen.append(_active_streams(ctx.gateway))
                time.sleep(0.3)
            wrk.interrupt()
            run = wrk.finish()
            time.sleep(0.3)
    finally:
        wrk.interrupt()
    expect(run, body=small.size, connections=streams, min_requests=0)
    result.runs = {"gateway": [run]}
    most = max(seen, default=0.0)
    ramped = f"{ramp:.1f}s to ramp up" if ramp is not None else "never all active"
    ctx.log(
        f"  [5] {streams} streams ({ramped}): "
        f"peak RSS {many.peak / MB:.1f} MB, PSS {many.peak_pss / MB:.1f} MB "
        f"(idle {baseline / MB:.1f} / {baseline_pss / MB:.1f} MB), {run.mb_per_s:.0f} MB/s"
    )
    detail = "" if ramp is not None else f"gateway_active_streams reached only {most:.0f} in {RAMP_LIMIT_S}s"
    result.extra["active_streams_needed"] = streams * ACTIVE_FRACTION
    ctx.sample(
        result, "during", [Check("5", "during", "gateway", f"{streams} concurrent streams", ramp is not None, detail)]
    )
    drained_by = time.monotonic() + 20
    remaining = _active_streams(ctx.gateway)
    while remaining > 0 and time.monotonic() < drained_by:
        time.sleep(0.2)
        remaining = _active_streams(ctx.gateway)
    after_rss, _ = measure(service)
    detail = "" if remaining == 0 else f"{remaining:.0f} streams still active 20 s after wrk stopped"
    ctx.sample(
        result,
        "after",
        [
            Check("5", "after", "gateway", "streams end when clients leave", remaining == 0, detail),
            check_whole("5", "after", "gateway", gateway.port, gateway.path(small), gateway.headers, small),
        ],
    )
    failed = result.failed_targets()
    peak_mb = many.peak / MB
    result.rows += [
        Row(
            f"RSS MB peak, {streams} x 50 MiB streams",
            {"gateway": peak_mb},
            target=f"<= {RSS_BUDGET_MB:.0f} MB",
            met=peak_mb <= RSS_BUDGET_MB,
            failed=failed,
            decimals=1,
        ),
        Row(f"RSS MB growth, {streams} streams", {"gateway": (many.peak - baseline) / MB}, failed=failed, decimals=1),
        Row(f"PSS MB peak (idle {baseline_pss / MB:.1f}), info", {"gateway": many.peak_pss / MB}, decimals=1),
        Row("RSS MB after clients left", {"gateway": after_rss / MB}, failed=failed, decimals=1),
        Row(f"seconds until >= {streams * ACTIVE_FRACTION:.0f} streams active, info", {"gateway": ramp}, decimals=1),
    ]
    result.extra["streams"] = {
        "count": streams,
        "baseline_rss": baseline,
        "baseline_pss": baseline_pss,
        "peak_rss": many.peak,
        "peak_pss": many.peak_pss,
        "after_rss": after_rss,
        "active_streams_seen": seen,
        "ramp_seconds": ramp,
        "one_stream_50MiB_growth_mb": one_growth,
        "samples": [(round(x.seconds, 2), x.rss, x.pss) for x in many.samples],
    }
    result.bars.insert(0, Bar("RSS peak / 150 MB", peak_mb / RSS_BUDGET_MB, 1.0, "<=", failed=bool(failed)))
    return result


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class Scenario:
    id: str
    title: str
    run: Callable[[Context], ScenarioResult] | None  # None: the gateway lacks the feature so far


def _label_studio(ctx: Context) -> ScenarioResult:
    """Scenario 8 lives in bench/label_studio.py (it starts Label Studio, a gateway and nginx)."""
    from .label_studio import label_studio_ranges

    return label_studio_ranges(ctx)


def _sync_import(ctx: Context) -> ScenarioResult:
    """Scenario 6 lives in bench/sync_import.py (it builds on this module's Row, Bar and Context)."""
    from .sync_import import sync_import

    return sync_import(ctx)


def _webhook_ingest(ctx: Context) -> ScenarioResult:
    """Scenario 7 lives in bench/webhooks.py."""
    from .webhooks import webhook_ingest

    return webhook_ingest(ctx)


SCENARIOS: dict[str, Scenario] = {
    "1": Scenario("1", "64 KiB range GETs", range_gets),
    "2": Scenario("2", "whole-object GETs", whole_gets),
    "3": Scenario("3", "cached signed-URL redirects", signed_redirects),
    "4": Scenario("4", "revalidation (304)", revalidation),
    "5": Scenario("5", "memory under streams", memory),
    "6": Scenario("6", "sync import", _sync_import),
    "7": Scenario("7", "webhook ingest", _webhook_ingest),
    "8": Scenario("8", "Label Studio drop-in", _label_studio),
}


def _versus_bare_rows(result: ScenarioResult, failed: set[str]) -> float | None:
    """Requests/s and latency of the gateway against the bare aiohttp ceiling (scenarios 3 and 4);
    returns the gateway/bare requests/s ratio."""
    rps = medians(result, lambda r: r.rps)
    g_b = ratio(rps["gateway"], rps["bare"])
    result.rows.append(Row("requests/s", rps, {"gw/bare": g_b}, "gw/bare >= 0.80", _at_least(g_b, 0.80), failed))
    for pct in ("p50", "p99"):
        lat = medians(result, lambda r, p=pct: r.latency_ms.get(p, 0.0))
        result.rows.append(
            Row(f"{pct} latency ms", lat, {"gw/bare": ratio(lat["gateway"], lat["bare"])}, failed=failed, decimals=2)
        )
    return g_b
