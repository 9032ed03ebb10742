"""Two gateways side by side: a git revision against the working tree, CPU per request.

    python -m bench.ab --base main --kinds 304,redirect,range --rounds 4 --duration 3

One fake-gcs-server, two single-worker gateways with the same generated config (bench.procs:
`--base`'s tree exported with `git archive` into a temporary directory, and this working tree),
wrk -t1 -c16 (-c4 for whole objects) alternated between them. Besides req/s it prints the gateway's CPU time per request
(user + system, from psutil): on this shared 2-core machine throughput swings by ±30 % between
runs, while CPU per request moves by a few percent, which is what a single change needs to show.
It is a development tool, not a target check: `make bench` is that (and checks every response).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from .procs import HOST, ROOT, BenchError, Emulator, Gateway, ensure_tools

MiB = 1024 * 1024
_KINDS = {
    "304": "If-None-Match revalidation of the 50 MiB object",
    "redirect": "cached signed-URL redirect (64 KiB object)",
    "range": "64 KiB range of the 50 MiB object",
    "whole": "the whole 50 MiB object, 4 connections",
}


def _export(revision: str, into: Path) -> Path:
    tree = into / "base-tree"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def _cpu_seconds(gateway: Gateway) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in gateway.service.tree())


def _run(wrk: str, gateway: Gateway, kind: str, duration: int, etag: str) -> tuple[float, float]:
    """(req/s, CPU microseconds per request) of one wrk run."""
    headers = gateway.auth_headers
    if kind == "304":
        headers = {**headers, "If-None-Match": etag}
        path = gateway.media_path("bench-media", "big.bin")
    elif kind == "range":
        headers = {**headers, "Range": "bytes=0-65535"}
        path = gateway.media_path("bench-media", "big.bin")
    elif kind == "whole":
        path = gateway.media_path("bench-media", "big.bin")
    else:
        path = gateway.media_path("bench-signed", "small.bin")
    argv = [wrk, "-t1", "-c4" if kind == "whole" else "-c16", f"-d{duration}s"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    before = _cpu_seconds(gateway)
    out = subprocess.run([*argv, f"http://{HOST}:{gateway.port}{path}"], capture_output=True, text=True).stdout
    cpu = _cpu_seconds(gateway) - before
    if "Non-2xx" in out:
        raise BenchError(f"{kind}: unexpected statuses from the gateway:\n{out}")
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return rps, cpu * 1e6 / max(requests, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.ab", description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="main", help="git revision to compare the working tree with (default main)")
    parser.add_argument("--kinds", default="304,redirect,range", help=f"comma-separated, of {', '.join(_KINDS)}")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    if unknown := set(kinds) - set(_KINDS):
        parser.error(f"unknown kinds: {', '.join(sorted(unknown))}")
    wrk = ensure_tools()["wrk"]
    with tempfile.TemporaryDirectory(prefix="gateway-ab-") as tmp:
        work = Path(tmp)
        emulator = Emulator(work)
        gateways: dict[str, Gateway] = {}
        try:
            emulator.create_bucket("bench-media")
            emulator.create_bucket("bench-signed")
            block = os.urandom(MiB)
            emulator.upload("bench-media", "big.bin", 50 * MiB, (block for _ in range(50)))
            emulator.upload("bench-signed", "small.bin", 64 * 1024, [block[: 64 * 1024]])
            uris = ["gs://bench-media/big.bin", "gs://bench-signed/small.bin"]
            for label, root in ((args.base, _export(args.base, work)), ("working tree", ROOT)):
                folder = work / f"gw-{len(gateways)}"
                folder.mkdir()
                gateways[label] = Gateway(
                    folder, emulator, "bench-media", "bench-signed", uris,
                    workers=1, access_log=False, metadata_ttl=3600, root=root,
                )  # fmt: skip
            etag = _etag(next(iter(gateways.values())))
            for kind in kinds:
                print(f"{kind}: {_KINDS[kind]}, wrk -t1 -d{args.duration}s, {args.rounds} rounds", flush=True)
                cpu: dict[str, list[float]] = {label: [] for label in gateways}
                rps: dict[str, list[float]] = {label: [] for label in gateways}
                for round_ in range(args.rounds):
                    for label, gateway in gateways.items():
                        r, c = _run(wrk, gateway, kind, args.duration, etag)
                        rps[label].append(r)
                        cpu[label].append(c)
                        print(f"  round {round_ + 1}  {label:>14}  {r:9.0f} req/s  {c:7.1f} us CPU/request", flush=True)
                for label in gateways:
                    print(
                        f"  median {label:>14}  {statistics.median(rps[label]):9.0f} req/s"
                        f"  {statistics.median(cpu[label]):7.1f} us CPU/request"
                    )
        finally:
            for gateway in gateways.values():
                gateway.stop()
            emulator.stop()
    return 0


def _etag(gateway: Gateway) -> str:
    from .procs import http_get

    status, headers, _ = http_get(
        gateway.port,
        gateway.media_path("bench-media", "big.bin"),
        headers={**gateway.auth_headers, "Range": "bytes=0-0"},
    )
    if status != 206:
        raise BenchError(f"the gateway answered {status} to a 1-byte range")
    return headers["etag"]


if __name__ == "__main__":
    sys.exit(main())
