"""Application factory: routes, middlewares, start-up and shutdown of shared resources."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from . import metrics
from .acl import TaskCache, TokenVerifier
from .api import add_api_routes
from .catalog import StorageCatalog
from .config import Settings
from .cors import add_cors
from .errors import Refused
from .fastlane import MediaFront
from .netguard import ClientGuard, StreamLimiter
from .proxy import MediaHandler
from .registry import RegistryUnavailable, open_registry
from .registry.outbox import Outbox, Recorder
from .registry.sql import SqlTaskRegistry
from .state import (
    CATALOG,
    CLIENT,
    ERROR,
    EXPORT_WORKER,
    FRONT,
    GUARD,
    LIMITER,
    MODE,
    READINESS,
    RECORDER,
    REGISTRY,
    REQUEST_ID,
    SETTINGS,
    STARTED,
    SUB,
    SYNC_WORKER,
    TASK,
    TASKS,
    VERIFIER,
)
from .storage import StorageError, client_session
from .uris import BadFileUri
from .vault import Vault
from .web import add_web_routes

log = logging.getLogger("gateway")
access_log = logging.getLogger("gateway.access")


MEDIA_ROUTES = frozenset({"task_resolve", "project_resolve"})
PROBE_ROUTES = frozenset({"healthz", "readyz"})  # load balancer probes: never behind the client allowlist
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_BEARER_REALM = 'Bearer realm="media-gateway"'


def create_app(
    settings: Settings, registry: SqlTaskRegistry | None = None, *, workers: bool = False
) -> web.Application:
    """The gateway application; `registry` may be injected (tests), else opened from settings.

    With `workers`, the process also runs the sync worker (gateway/sync/worker.py) and the export
    worker (gateway/export/worker.py), each unless its section's `worker = false`.
    """
    app = web.Application(
        middlewares=[gateway_middleware],
        client_max_size=64 * 1024**2,  # task imports
        # Part of the app, not of the runner: metrics are recorded whoever serves it.
        handler_args={"access_log_class": RequestRecorder, "access_log": access_log},
    )
    app[SETTINGS] = settings
    app[REGISTRY] = registry or open_registry(settings.registry.url)
    app[VERIFIER] = TokenVerifier(settings.auth)
    app[READINESS] = {}
    app[GUARD] = ClientGuard(settings.network)
    app[LIMITER] = StreamLimiter(settings.limits)
    app[CATALOG] = StorageCatalog(settings, app[REGISTRY], Vault(settings.registry.encryption_keys))
    app[TASKS] = TaskCache(app[REGISTRY], settings.registry)
    app[SYNC_WORKER] = None
    app[EXPORT_WORKER] = None
    # Group commit pays on PostgreSQL (one flush per batch). On SQLite the writer processes of
    # one file meet in its busy handler, which sleeps between tries: longer transactions there
    # starved the other process (p99 0.2 s → 1.5 s in bench scenario 7), so one request each.
    batch = 256 if app[REGISTRY].dialect == "postgresql" else 1
    app[RECORDER] = Recorder(Outbox(app[REGISTRY]), max_batch=batch)
    app.cleanup_ctx.append(_upstream_context)
    app.on_cleanup.append(_flush_metrics)
    if workers:
        app.cleanup_ctx.append(_workers_context)

    media = MediaHandler(settings, app[VERIFIER], app[TASKS], app[CATALOG], app[LIMITER])
    app[FRONT] = MediaFront(settings, media, app[GUARD], app[LIMITER], RequestRecorder(access_log, ""))
    for name, path, handler in (
        ("task_resolve", r"/tasks/{task_id:\d{1,18}}/resolve/", media.task_resolve),
        ("project_resolve", r"/projects/{project_id}/resolve/", media.project_resolve),
    ):
        resource = app.router.add_resource(path, name=name)
        resource.add_route("GET", handler)
        resource.add_route("HEAD", handler)
    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/readyz", readyz, name="readyz")
    app.router.add_get("/metrics", metrics_view, name="metrics")
    add_api_routes(app)
    add_web_routes(app)
    add_cors(app, settings.cors, MEDIA_ROUTES)
    app.on_response_prepare.append(_tag_response)
    return app


async def _upstream_context(app: web.Application):  # type: ignore[no-untyped-def]
    """The upstream session and every storage's backend; API storages reloaded in the background."""
    session = client_session(app[SETTINGS])
    catalog = app[CATALOG]
    try:
        await catalog.start(session)
    except BaseException:
        await session.close()
        await app[REGISTRY].close()
        raise
    refresher = asyncio.create_task(catalog.run(on_tasks_changed=app[TASKS].forget))
    yield
    refresher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await refresher
    await catalog.close()
    await session.close()
    await app[REGISTRY].close()


async def _flush_metrics(_app: web.Application) -> None:
    metrics.BATCH.flush()  # what the last batching period counted, before the process ends


async def _workers_context(app: web.Application):  # type: ignore[no-untyped-def]
    from .export.worker import ExportWorker
    from .sync.worker import SyncWorker

    settings = app[SETTINGS]
    running: list[tuple[Any, asyncio.Task[Any]]] = []
    if settings.sync.worker:
        app[SYNC_WORKER] = SyncWorker(app[CATALOG], on_change=app[TASKS].forget)
        running.append((app[SYNC_WORKER], asyncio.create_task(app[SYNC_WORKER].run())))
    if settings.export.worker:  # target storages may be declared in the file or created through the API
        app[EXPORT_WORKER] = ExportWorker(app[CATALOG])
        running.append((app[EXPORT_WORKER], asyncio.create_task(app[EXPORT_WORKER].run())))
    yield
    for worker, task in reversed(running):
        await worker.stop(task)


def route_name(request: web.BaseRequest) -> str:
    """A bounded route label: the resource's name, or 'unmatched'."""
    match_info = getattr(request, "match_info", None)
    resource = match_info.route.resource if match_info is not None else None
    return (resource.name if resource is not None else None) or "unmatched"


async def _tag_response(request: web.Request, response: web.StreamResponse) -> None:
    """X-Request-ID on every answer, streamed ones included (set just before headers go out).

    The Server header names the product without versions, which only help attackers.
    """
    response.headers["Server"] = "media-gateway"
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers["X-Request-ID"] = request_id


def json_error(
    status: int, reason: str, message: str, headers: dict[str, str] | None = None, details: dict[str, Any] | None = None
) -> web.Response:
    return web.json_response({"error": reason, "message": message, **(details or {})}, status=status, headers=headers)


@web.middleware
async def gateway_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Request id, start time and client address; the client allowlist, before any token work;
    every refusal and failure becomes JSON with a precise status.

    One middleware rather than several: each aiohttp middleware layer costs a few microseconds on
    every request of the hot path.
    """
    incoming = request.headers.get("X-Request-ID", "")
    request[REQUEST_ID] = incoming if _REQUEST_ID.fullmatch(incoming) else os.urandom(8).hex()
    request[STARTED] = time.perf_counter()
    try:
        guard = request.app.get(GUARD)
        if guard is not None:
            request[CLIENT] = client = guard.client(request.remote, request.headers)
            if guard.allowed and route_name(request) not in PROBE_ROUTES:
                guard.admit(client)
        return await handler(request)
    except Refused as exc:
        request[ERROR] = exc.reason
        headers = dict(exc.headers or {})
        if exc.status in (401, 403):
            metrics.AUTH_FAILURES.labels(exc.reason).inc()
        if exc.status == 401:
            headers["WWW-Authenticate"] = _challenge(exc)
        return json_error(exc.status, exc.reason, exc.message, headers, exc.details)
    except BadFileUri as exc:
        request[ERROR] = "bad_fileuri"
        return json_error(400, "bad_fileuri", str(exc))
    except StorageError as exc:
        request[ERROR] = exc.reason
        return json_error(exc.status, exc.reason, exc.public_message or str(exc))
    except RegistryUnavailable:  # logged once per outage by the registry, not once per request
        request[ERROR] = "registry_unavailable"
        return json_error(503, "registry_unavailable", "the task registry cannot be reached; retry")
    except web.HTTPException as exc:
        if exc.empty_body or exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() != "content-type"}
        return json_error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason, headers)
    except ConnectionError:  # the client left before the answer: nothing to send, nothing to log
        request[ERROR] = "client_disconnected"
        return web.Response(status=499)  # "client closed request", as nginx logs it
    except Exception:
        if request.writer.output_size > 0:
            raise  # headers are out: aiohttp closes the connection
        request[ERROR] = "internal_error"
        log.exception("unexpected error (request %s)", request[REQUEST_ID])
        return json_error(500, "internal_error", f"unexpected error; request id {request[REQUEST_ID]}")


def _challenge(exc: Refused) -> str:
    """The RFC 6750 challenge; a missing token is `invalid_request` (a required parameter is
    absent), every other failure `invalid_token`. The description is our own text, quoted safely."""
    code = "invalid_request" if exc.reason == "missing_token" else "invalid_token"
    description = exc.message.replace("\\", "").replace('"', "'")
    return f'{_BEARER_REALM}, error="{code}", error_description="{description}"'


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Registry and every config-file storage reachable (kept a few seconds so probes stay cheap,
    but checked again at once while the registry has a problem: a write failed), and this process
    not shedding load (checked live)."""
    cache = request.app[READINESS]
    now = time.monotonic()
    if cache.get("until", 0) < now or request.app[REGISTRY].problem is not None:
        checks: dict[str, str] = {}
        try:
            await request.app[REGISTRY].ping()
            checks["registry"] = "ok"
        except Exception as exc:  # readiness reports any failure instead of raising it
            checks["registry"] = f"error: {type(exc).__name__}"
        for storage_id, backend in request.app[CATALOG].backends().items():
            if storage_id.isdigit():
                continue  # API storages report their problems in their own status, not here
            try:
                await backend.check()
                checks[f"storage:{storage_id}"] = "ok"
            except Exception as exc:  # detail to the log; the unauthenticated probe gets the kind
                log.warning("readiness: storage %s: %s", storage_id, exc)
                checks[f"storage:{storage_id}"] = f"error: {getattr(exc, 'reason', type(exc).__name__)}"
        cache.update(checks=checks, until=now + 5)
    shedding = request.app[LIMITER].shedding()
    checks = {**cache["checks"], "streams": "ok" if shedding is None else f"shedding: {shedding}"}
    ready = all(v == "ok" for v in checks.values())
    return web.json_response(
        {"status": "ready" if ready else "not_ready", "checks": checks}, status=200 if ready else 503
    )


async def metrics_view(_request: web.Request) -> web.Response:
    body, content_type = metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


class RequestRecorder(AbstractAccessLogger):
    """Runs once per finished response: Prometheus counters and, if enabled, a JSON log line."""

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        self._children: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}
        self._access_log: bool | None = None

    @property
    def enabled(self) -> bool:
        return True

    def log(self, request: web.BaseRequest, response: web.StreamResponse, loop_seconds: float) -> None:
        started = request.get(STARTED)
        seconds = time.perf_counter() - started if started is not None else loop_seconds
        route = route_name(request)
        mode = request.get(MODE) or ("proxy" if route in MEDIA_ROUTES else "none")
        self.account(route, mode, response.status, response.body_length, seconds)
        if self._access_log is None:
            app = getattr(request, "app", None)
            if app is None:
                return
            self._access_log = app[SETTINGS].server.access_log  # one app per server: read once
        if self._access_log:
            self.write(
                {
                    "request_id": request.get(REQUEST_ID),
                    "method": request.method,
                    "path": request.path,  # never the query string: it may carry a token
                    "status": response.status,
                    "bytes": response.body_length,
                    "duration_ms": round(seconds * 1000, 2),
                    "sub": request.get(SUB),
                    "task": request.get(TASK),
                    "error": request.get(ERROR),
                    "remote": _text(request.get(CLIENT, request.remote)),  # behind trusted proxies: the client
                    "peer": request.remote,
                }
            )

    def account(self, route: str, mode: str, status: int, sent: int, seconds: float) -> None:
        """The request metrics of one answer (also of those gateway/fastlane.py answers itself)."""
        key = (route, mode, status)
        children = self._children.get(key)
        if children is None:
            children = (
                metrics.REQUESTS.labels(route, mode, metrics.status_class(status)),
                metrics.RESPONSE_BYTES.labels(route),
                metrics.REQUEST_SECONDS.labels(route),
                metrics.PARTIAL_RESPONSES.labels(route) if status == 206 else None,
            )
            self._children[key] = children
        requests, sent_bytes, duration, partial = children
        batch = metrics.BATCH
        batch.inc(requests)
        batch.inc(sent_bytes, sent)
        batch.observe(duration, seconds)
        if partial is not None:
            batch.inc(partial)

    def write(self, fields: dict[str, Any]) -> None:
        """One access log line: JSON, never a token (paths only, no query strings)."""
        access_log.info(json.dumps(fields, separators=(",", ":")))


def _text(address: object) -> str | None:
    return None if address is None else str(address)
