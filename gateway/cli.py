"""`gateway serve | worker | sync | token | check-config | health | import | demo | cors-config | ip-filter-config`.

Heavy imports happen inside the commands: `serve` must point PROMETHEUS_MULTIPROC_DIR at its
directory before prometheus_client is first imported, and `token` should start instantly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .config import ConfigError, Settings, cidr_problem, load_settings, validate
from .labelstudio_ssrf import label_studio_env
from .tokens import mint_token

_DURATION = re.compile(r"^(\d+)([smhd]?)$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class CliError(Exception):
    """A one-line problem with the command line or its input."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.command(args) or 0)
    except ConfigError as exc:
        print(f"gateway: config: {exc}", file=sys.stderr)
        return 2
    except CliError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="JWT-checking media gateway for GCS")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--config", default=os.environ.get("GATEWAY_CONFIG"), help="TOML file (default: $GATEWAY_CONFIG)"
        )
        return p

    serve = with_config(sub.add_parser("serve", help="run the gateway"))
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, help="worker processes sharing the port (SO_REUSEPORT)")
    serve.set_defaults(command=cmd_serve)

    worker = with_config(sub.add_parser("worker", help="run the import sync and export workers alone (no HTTP)"))
    worker.add_argument(
        "--metrics-port", type=int, help="serve /metrics (sync and export figures) on [server] host and this port"
    )
    worker.set_defaults(command=cmd_worker)

    sync = with_config(sub.add_parser("sync", help="sync source storages now, in the foreground"))
    sync.add_argument("storage_ids", nargs="*", metavar="STORAGE_ID", help="storage ids (default: all)")
    sync.add_argument("--preview", action="store_true", help="print the first matching keys / tasks; import nothing")
    sync.set_defaults(command=cmd_sync)

    token = with_config(sub.add_parser("token", help="print a signed JWT"))
    token.add_argument("--sub", required=True, help="the subject (user) the token names")
    token.add_argument("--task", type=int, action="append", default=[], help="grant a task id (repeatable)")
    token.add_argument("--project", action="append", default=[], help="grant a project id (repeatable)")
    token.add_argument("--all-tasks", action="store_true", help='grant every task ("tasks": "*")')
    token.add_argument("--ttl", default="1h", help="lifetime: 90, 30m, 1h, 7d (default 1h)")
    token.add_argument("--admin", action="store_true", help='add "admin": true (management API)')
    token.set_defaults(command=cmd_token)

    explain = with_config(
        sub.add_parser("explain", help="which storage serves a task's objects, how, and whether a client gets in")
    )
    explain.add_argument("task", type=int, help="the task id")
    explain.add_argument("--uri", help="one gs:// URI (default: every URI the task references)")
    explain.add_argument("--client", help="a client address to check against the allowlists")
    explain.add_argument("--url", help="the running gateway (default: http://[server] host:port)")
    explain.set_defaults(command=cmd_explain)

    check = with_config(sub.add_parser("check-config", help="validate the configuration and exit"))
    check.set_defaults(command=cmd_check_config)

    health = with_config(sub.add_parser("health", help="exit 0 when the configured server answers /healthz"))
    health.set_defaults(command=cmd_health)

    cors = with_config(sub.add_parser("cors-config", help="print the bucket CORS JSON that presign storages need"))
    cors.add_argument("--origin", action="append", default=[], help="annotator page origin (default: [cors] origins)")
    cors.set_defaults(command=cmd_cors_config)

    ip_filter = sub.add_parser(
        "ip-filter-config", help="print the bucket IP-filter JSON that admits only the gateway's egress addresses"
    )
    ip_filter.add_argument("--cidr", action="append", default=[], help="public egress range (repeatable)")
    ip_filter.add_argument(
        "--vpc-network",
        dest="vpc",
        action=_Ordered,
        metavar="NETWORK",
        help="projects/P/global/networks/N (repeatable; each followed by its --vpc-cidr ranges)",
    )
    ip_filter.add_argument(
        "--vpc-cidr", dest="vpc", action=_Ordered, metavar="CIDR", help="a range of the preceding --vpc-network"
    )
    ip_filter.add_argument("--mode", choices=("Enabled", "Disabled"), default="Enabled")
    ip_filter.add_argument(
        "--allow-service-agents", action="store_true", help="allowAllServiceAgentAccess: true (default false)"
    )
    ip_filter.add_argument(
        "--allow-cross-org-vpcs", action="store_true", help="allowCrossOrgVpcs: true (default false)"
    )
    ip_filter.set_defaults(command=cmd_ip_filter_config, vpc=[])

    ssrf = sub.add_parser(
        "label-studio-ssrf",
        help="print Label Studio SSRF settings that let its webhooks reach the gateway and no other internal address",
    )
    ssrf.add_argument(
        "--allow", action="append", required=True, help="the gateway's address as Label Studio reaches it"
    )
    ssrf.set_defaults(command=cmd_label_studio_ssrf)

    load = with_config(sub.add_parser("import", help="register Label Studio tasks from JSON/JSONL files"))
    load.add_argument("--project", required=True)
    load.add_argument("files", nargs="+", type=Path)
    load.set_defaults(command=cmd_import)

    demo = sub.add_parser("demo", help="serve bundled sample media as a local bucket, print URLs and a token")
    demo.add_argument("--dir", type=Path, default=Path(".demo"), help="state directory (default .demo)")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8080)
    demo.set_defaults(command=cmd_demo)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    if not args.config:
        raise CliError("no configuration: pass --config FILE or set GATEWAY_CONFIG (or try `gateway demo`)")
    return load_settings(args.config)


def parse_duration(text: str) -> int:
    match = _DURATION.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise CliError(f"--ttl: expected a duration like 90, 30m, 1h or 7d, got {text!r}")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


# ---------------------------------------------------------------- token


def cmd_explain(args: argparse.Namespace) -> int:
    """Ask the running gateway (GET /api/tasks/{id}/access, with a one-minute admin token minted
    from the config): the answer comes from the storages it serves now, API ones included."""
    import urllib.error
    import urllib.parse
    import urllib.request

    settings = _settings(args)
    server = settings.server
    base = (args.url or f"http://{server.host}:{server.port}").rstrip("/")
    query = {k: v for k, v in (("uri", args.uri), ("client", args.client)) if v is not None}
    url = f"{base}/api/tasks/{args.task}/access" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    token = mint_token(settings, "gateway-explain", ttl=60, admin=True)
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            detail = json.load(exc).get("message", "")
        except ValueError:
            detail = ""
        raise CliError(f"{url.split('?')[0]}: {exc.code} {detail}".rstrip()) from None
    except (urllib.error.URLError, OSError) as exc:
        raise CliError(
            f"cannot reach the gateway at {base} ({getattr(exc, 'reason', exc)}); is it running? (--url)"
        ) from None
    print(json.dumps(answer, indent=2))
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    settings = _settings(args)
    tasks: Any = "*" if args.all_tasks else args.task
    ttl, longest = parse_duration(args.ttl), settings.auth.max_token_lifetime
    if ttl > longest:  # the gateway would refuse the token (acl.TokenVerifier)
        raise CliError(
            f"--ttl: {ttl} seconds is longer than [auth].max_token_lifetime ({longest:g} seconds), "
            "the longest lifetime the gateway accepts"
        )
    print(mint_token(settings, args.sub, tasks=tasks, projects=args.project, ttl=ttl, admin=args.admin))
    return 0


# ---------------------------------------------------------------- check-config / import


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from .storage import load_storage_credentials

    credentials = load_storage_credentials(settings)  # a missing or malformed key file fails here
    asyncio.run(_check_signing(settings, credentials))
    print(
        f"config OK: {settings.source}: {len(settings.storages)} storage(s), "
        f"projects {sorted({s.project for s in settings.storages})}"
    )
    return 0


async def _check_signing(settings: Settings, credentials: dict[str, Any]) -> None:
    """Each presign storage signs a probe with its identity, as its media requests will: a key that
    cannot sign, a missing signBlob permission or an unreachable IAM endpoint fails here, in words."""
    import aiohttp

    from .signer import SigningError, build_signer, probe, resolve_identity

    presign = [s for s in settings.storages if s.presign and s.id in credentials]
    if not presign:
        return
    async with aiohttp.ClientSession() as session:
        for storage in presign:
            try:
                signer, tokens = build_signer(credentials[storage.id], session, settings.upstream.iam_endpoint)
                if tokens is not None:
                    await resolve_identity(signer, *tokens)
                await probe(signer)
            except SigningError as exc:
                raise ConfigError(f"[[storages]] id={storage.id!r}.presign: cannot sign URLs: {exc}") from None


def cmd_health(args: argparse.Namespace) -> int:
    """The container's health check: the port and host come from the same config file and
    environment as `gateway serve`'s, so a port set in either is the one asked."""
    import urllib.request

    server = _settings(args).server
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(server.host, server.host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{server.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            status = response.status
    except OSError as exc:  # URLError and HTTPError among them
        print(f"gateway: health: {url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1
    return 0 if status == 200 else 1


def bucket_cors(origins: list[str]) -> list[dict[str, Any]]:
    """GCS bucket CORS for browsers that follow signed-URL redirects (GET with ranges, readable headers)."""
    return [
        {
            "origin": origins,
            "method": ["GET", "HEAD"],
            "responseHeader": [
                "Content-Type",
                "Content-Length",
                "Content-Range",
                "Accept-Ranges",
                "ETag",
                "Access-Control-Allow-Origin",
            ],
            "maxAgeSeconds": 3600,
        }
    ]


def cmd_cors_config(args: argparse.Namespace) -> int:
    origins = args.origin
    if not origins:
        origins = list(_settings(args).cors.origins) if args.config else []
    if not origins:
        raise CliError("--origin: name the annotator page origins (e.g. https://label-studio.example), or '*'")
    if "*" in origins:
        origins = ["*"]
        print(
            "gateway: warning: --origin '*' lets a page on any web site read this bucket's objects through a"
            " signed URL it holds (no cookies travel: GCS answers '*' without credentials); name the"
            " annotator origins instead where you can",
            file=sys.stderr,
        )
    for origin in origins:
        # "null": what a fetch that followed a cross-origin redirect presents (see README).
        if origin not in ("null", "*") and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise CliError(f"--origin: {origin!r} is not an origin like https://host[:port]")
    print(json.dumps(bucket_cors(origins), indent=2))
    return 0


class _Ordered(argparse.Action):
    """Keeps --vpc-network and --vpc-cidr in command-line order, so ranges follow their network."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        getattr(namespace, self.dest).append((option_string, values))


IP_FILTER_MAX_CIDRS = 200  # across the public source and every VPC source
IP_FILTER_MAX_NETWORKS = 25
_VPC_NETWORK = re.compile(r"projects/([^/]*)/global/networks/([^/]*)")
_PROJECT_ID = re.compile(r"(?:[a-z][-a-z0-9.]{0,61}[a-z0-9]:)?[a-z][-a-z0-9]{4,28}[a-z0-9]")  # [domain:]project
_NETWORK_NAME = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")


def _vpc_network_problem(value: str) -> str | None:
    """Why `value` is not a VPC network name Google accepts, or None."""
    match = _VPC_NETWORK.fullmatch(value)
    if match is None:
        return "is not like projects/PROJECT_ID/global/networks/NETWORK"
    project, network = match.groups()
    if not _PROJECT_ID.fullmatch(project):
        return (
            f"has project id {project!r}, which is not a Google Cloud project id (6-30 lowercase letters,"
            " digits and hyphens, starting with a letter, not ending with a hyphen)"
        )
    if not _NETWORK_NAME.fullmatch(network):
        return (
            f"has network name {network!r}, which is not a VPC network name (1-63 lowercase letters, digits"
            " and hyphens, starting with a letter, not ending with a hyphen)"
        )
    return None


def _cidr(text: str, flag: str) -> str:
    try:
        return str(ipaddress.ip_network(text.strip(), strict=True))
    except ValueError as exc:
        raise CliError(f"{flag}: {cidr_problem(text, exc)}") from None


def bucket_ip_filter(
    cidrs: list[str],
    vpc: list[tuple[str, str]],
    *,
    mode: str = "Enabled",
    allow_service_agents: bool = False,
    allow_cross_org_vpcs: bool = False,
) -> dict[str, Any]:
    """The `--ip-filter-file` document of `gcloud storage buckets update` (GCS bucket IP filtering).

    `vpc` is the ordered list of ("--vpc-network", name) and ("--vpc-cidr", range) options.
    """
    document: dict[str, Any] = {"mode": mode}
    if cidrs:
        document["publicNetworkSource"] = {"allowedIpCidrRanges": [_cidr(c, "--cidr") for c in cidrs]}
    networks: list[dict[str, Any]] = []
    for option, value in vpc:
        if option == "--vpc-network":
            problem = _vpc_network_problem(value)
            if problem is not None:
                raise CliError(f"--vpc-network: {value!r} {problem}")
            if any(n["network"] == value for n in networks):
                raise CliError(f"--vpc-network: {value!r} is given twice")
            networks.append({"network": value, "allowedIpCidrRanges": []})
        elif not networks:
            raise CliError(f"--vpc-cidr: {value!r} comes before any --vpc-network it could belong to")
        else:
            networks[-1]["allowedIpCidrRanges"].append(_cidr(value, "--vpc-cidr"))
    for network in networks:
        if not network["allowedIpCidrRanges"]:
            raise CliError(f"--vpc-network: {network['network']!r} needs --vpc-cidr ranges (0.0.0.0/0 for all of it)")
    if networks:
        document["vpcNetworkSources"] = networks
    if len(networks) > IP_FILTER_MAX_NETWORKS:
        raise CliError(f"--vpc-network: {len(networks)} networks; a bucket IP filter allows at most 25")
    total = len(cidrs) + sum(len(n["allowedIpCidrRanges"]) for n in networks)
    if total > IP_FILTER_MAX_CIDRS:
        raise CliError(f"--cidr/--vpc-cidr: {total} ranges; a bucket IP filter allows at most 200 in all")
    if mode == "Enabled" and total == 0:
        raise CliError("--cidr: an enabled filter without --cidr or --vpc-network would refuse every request")
    document["allowCrossOrgVpcs"] = allow_cross_org_vpcs
    document["allowAllServiceAgentAccess"] = allow_service_agents
    return document


def cmd_ip_filter_config(args: argparse.Namespace) -> int:
    document = bucket_ip_filter(
        args.cidr,
        args.vpc,
        mode=args.mode,
        allow_service_agents=args.allow_service_agents,
        allow_cross_org_vpcs=args.allow_cross_org_vpcs,
    )
    print(json.dumps(document, indent=2))
    return 0


def cmd_label_studio_ssrf(args: argparse.Namespace) -> int:
    try:
        env = label_studio_env(args.allow)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    for name, value in env.items():
        print(f"{name}={value}")
    return 0


def read_task_files(files: list[Path]) -> list[Any]:
    """Tasks from JSON (a list or one object) and JSONL files; errors name the file and line."""
    items: list[Any] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CliError(f"{path}: {exc.strerror}") from None
        if path.suffix == ".jsonl":
            for number, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        items.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise CliError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            continue
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CliError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        items.extend(payload if isinstance(payload, list) else [payload])
    return items


def cmd_import(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from .registry import BadTask, normalize_task, open_registry

    try:
        tasks = [normalize_task(item, n) for n, item in enumerate(read_task_files(args.files), start=1)]
    except BadTask as exc:
        raise CliError(str(exc)) from None

    asyncio.run(_prepare_registry(settings))

    async def run() -> list[int]:
        registry = open_registry(settings.registry.url, create=False)
        try:
            if not settings.storages_of(args.project) and all(
                row["project"] != args.project for row in await registry.list_storages()
            ):
                raise CliError(f"--project: project {args.project!r} has no storage (config file or API)")
            return await registry.add_tasks(args.project, tasks)
        finally:
            await registry.close()

    ids = asyncio.run(run())
    print(json.dumps({"task_ids": ids, "task_count": len(ids)}))
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from .sync.commands import sync_command

    settings = _settings(args)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(_prepare_registry(settings))
    return asyncio.run(sync_command(settings, args.storage_ids, args.preview))


def cmd_worker(args: argparse.Namespace) -> int:
    from .sync.commands import worker_command

    settings = _settings(args)
    configure_logging()
    asyncio.run(_prepare_registry(settings))
    return asyncio.run(worker_command(settings, metrics_port=args.metrics_port))


# ---------------------------------------------------------------- serve


def configure_logging() -> None:
    access = logging.getLogger("gateway.access")
    access.propagate = False
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # one line per start-up and migration step otherwise


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    server = settings.server
    overrides = {
        k: v for k, v in (("host", args.host), ("port", args.port), ("workers", args.workers)) if v is not None
    }
    if overrides:
        settings = dataclasses.replace(settings, server=dataclasses.replace(server, **overrides))
        validate(settings)
    serve(settings)
    return 0


def serve(settings: Settings) -> None:
    """Run one worker in this process, or supervise N forked workers sharing the port."""
    workers = settings.server.workers
    own_metrics_dir = None
    if workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        own_metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_metrics_dir
    configure_logging()
    from .storage import load_storage_credentials

    load_storage_credentials(settings)  # fail on bad credentials before forking
    asyncio.run(_prepare_registry(settings))  # the schema exists before workers race to create it
    if workers == 1:
        run_worker(settings)
        return
    _compact_before_fork()
    from .supervisor import supervise

    try:
        supervise(settings, run_worker)
    finally:
        if own_metrics_dir is not None:
            shutil.rmtree(own_metrics_dir, ignore_errors=True)


def _compact_before_fork() -> None:
    """Give the start-up's garbage back before workers fork from this process.

    glibc keeps freed heap pages mapped, and every forked worker would inherit them; `malloc_trim`
    returns them to the system. `gc.freeze()` moves what is left out of the collector's reach, so
    collections in the workers do not write to (and copy) the pages they share with this one
    (the fork advice of the `gc` documentation). Two workers: PSS summed over the three processes
    170 → 133 MB idle, 285 → 248 MB with 200 streams (bench scenario 5; RSS, which counts
    shared pages in every process, does not move).
    """
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL(None).malloc_trim(0)
    gc.freeze()


async def _prepare_registry(settings: Settings) -> None:
    """Before a process serves, works or imports: refuse a registry that was lost (see
    gateway/registry/marker.py), create or migrate it, and mark it as created."""
    from .registry import RegistryUnavailable, marker, open_registry
    from .registry.sql import describe, sqlite_file

    database = sqlite_file(settings.registry.url)
    if database is not None:
        if not database.parent.is_dir():  # said before the driver fails (aiosqlite's thread then races the loop's end)
            raise ConfigError(f"[registry].url: cannot open the registry: directory {database.parent} does not exist")
        try:
            marker.check_not_lost(database)
        except marker.RegistryLost as exc:
            raise ConfigError(f"[registry].url: {exc}") from None
    registry = open_registry(settings.registry.url)
    try:
        await registry.ping()
    except Exception as exc:  # any driver error: one line naming the setting
        reason = str(exc) if isinstance(exc, RegistryUnavailable) else describe(exc)
        raise ConfigError(f"[registry].url: cannot open the registry ({reason})") from None
    finally:
        await registry.close()
    try:
        marker.mark(database)
    except OSError as exc:
        raise ConfigError(f"[registry].url: cannot leave the marker beside the registry ({exc.strerror})") from None


def run_worker(settings: Settings, index: int = 0) -> None:
    """One serving process; the first (index 0) also runs the sync and export workers unless switched off.

    Like `web.run_app`, with `gateway.fastlane` in front of aiohttp's protocol on every connection.
    """
    from aiohttp import web

    from .app import create_app
    from .fastlane import serve
    from .registry import open_registry
    from .state import FRONT

    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = settings.server
    log = logging.getLogger("gateway")
    # Opened, not created: the start-up (_prepare_registry) decided that the registry exists.
    app = create_app(settings, open_registry(settings.registry.url, create=False), workers=index == 0)
    main = loop.create_task(
        serve(
            app,
            app[FRONT],
            server.host,
            server.port,
            reuse_port=server.workers > 1,
            shutdown_timeout=server.shutdown_timeout,
            on_listening=lambda: log.info("worker %d listening on http://%s:%d", os.getpid(), server.host, server.port),
        )
    )
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    except OSError as exc:  # cannot bind: one line, not a traceback
        raise SystemExit(f"gateway: cannot listen on {server.host}:{server.port}: {exc.strerror or exc}") from None
    finally:
        # As run_app: the serving task first (its cleanup stops the workers gracefully), then the rest.
        _cancel_and_wait(loop, {main})
        _cancel_and_wait(loop, asyncio.all_tasks(loop))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        asyncio.set_event_loop(None)
        _wait_for_send_queues(server.port, SEND_QUEUE_WAIT)


SEND_QUEUE_WAIT = 2.0  # seconds; part of the drain budget (deploy/kubernetes: terminationGracePeriodSeconds)


def _wait_for_send_queues(port: int, timeout: float) -> None:
    """Let the kernel send what the last streams wrote before the process exits.

    A stream that ends during a graceful shutdown leaves its last bytes in the socket's send queue;
    the kernel keeps sending them after the process exits, unless the network namespace goes with
    the process — as a container's does — which drops them: the image test saw 40 KB of a 48 MiB
    body lost in about one run of ten. So wait (bounded) until no connection of this port holds
    unsent bytes (Linux: /proc/net/tcp{,6}; elsewhere nothing to wait for).
    """
    deadline = time.monotonic() + timeout
    while _unsent_bytes(port) and time.monotonic() < deadline:
        time.sleep(0.02)


def _unsent_bytes(port: int) -> int:
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()  # sl local_address rem_address st tx_queue:rx_queue …
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                total += int(fields[4].split(":")[0], 16)
    return total


def _cancel_and_wait(loop: asyncio.AbstractEventLoop, tasks: set[asyncio.Task[Any]]) -> None:
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import prepare_demo

    settings, banner = prepare_demo(args.dir, args.host, args.port)
    print(banner, flush=True)
    serve(settings)
    return 0
