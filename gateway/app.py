"""Application factory: routes, middlewares, start-up and shutdown of shared resources."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import metrics
from .access import MEDIA_ROUTES, RequestRecorder, access_log, request_id, route_name
from .acl import TaskCache, TokenVerifier
from .api import add_api_routes
from .catalog import StorageCatalog
from .config import Settings
from .cors import CorsPolicy, add_cors
from .errors import Refused
from .fastlane import MediaFront
from .labelstudio import LabelStudioAuthority
from .media.answers import Answer, error_answer, refusal_answer, registry_answer, storage_error_answer
from .media.core import MediaCore
from .media.service import MediaService
from .netguard import ClientGuard, StreamLimiter
from .proxy import MediaHandler
from .registry import RegistryUnavailable, open_registry
from .registry.outbox import Outbox, Recorder
from .registry.sql import SqlTaskRegistry
from .signer import SigningError, probe
from .state import (
    CATALOG,
    CLIENT,
    ERROR,
    EXPORT_WORKER,
    FRONT,
    GUARD,
    LABEL_STUDIO,
    LIMITER,
    READINESS,
    RECORDER,
    REGISTRY,
    REQUEST_ID,
    SETTINGS,
    STARTED,
    SYNC_WORKER,
    TASKS,
    VERIFIER,
)
from .storage import StorageError, client_session
from .uris import BadFileUri
from .vault import Vault
from .web import add_web_routes

log = logging.getLogger("gateway")

PROBE_ROUTES = frozenset({"healthz", "readyz"})  # load balancer probes: never behind the client allowlist


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

    label_studio = (
        LabelStudioAuthority(settings.label_studio, lambda: app[CATALOG].session) if settings.label_studio.url else None
    )
    app[LABEL_STUDIO] = label_studio  # the viewer asks the same authority (one cache, one rule)
    core = MediaCore(settings, app[GUARD], app[VERIFIER], app[TASKS], app[CATALOG], label_studio)
    service = MediaService(core, app[LIMITER])
    cors = CorsPolicy(settings.cors)
    media = MediaHandler(service, cors)
    recorder = RequestRecorder(access_log, "", settings.server.access_log)
    app[FRONT] = MediaFront(settings.server, service, app[GUARD], cors, recorder)
    for name, path in (
        ("task_resolve", r"/tasks/{task_id:\d{1,18}}/resolve/"),
        ("project_resolve", r"/projects/{project_id}/resolve/"),
    ):
        resource = app.router.add_resource(path, name=name)
        resource.add_route("GET", media.resolve)
        resource.add_route("HEAD", media.resolve)
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
    return _response(error_answer(status, reason, message, headers, details=details))


def _response(answer: Answer) -> web.Response:
    """An aiohttp response for an error answer of the media core's kind (the one JSON error body)."""
    return web.Response(status=answer.status, body=answer.body, headers=answer.headers)


@web.middleware
async def gateway_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Request id, start time and client address; the client allowlist, before any token work;
    every refusal and failure becomes JSON with a precise status.

    One middleware rather than several: each aiohttp middleware layer costs a few microseconds on
    every request of the hot path.
    """
    request[REQUEST_ID] = request_id(request.headers.get("X-Request-ID", ""))
    request[STARTED] = time.perf_counter()
    try:
        guard = request.app.get(GUARD)
        if guard is not None:
            request[CLIENT] = client = guard.client(request.remote, request.headers)
            route = route_name(request)
            media = route in MEDIA_ROUTES and request.method in ("GET", "HEAD")  # the core admits those
            if guard.allowed and not media and route not in PROBE_ROUTES:
                guard.admit(client)
        return await handler(request)
    except Refused as exc:
        request[ERROR] = exc.reason
        return _response(refusal_answer(exc))
    except BadFileUri as exc:
        request[ERROR] = "bad_fileuri"
        return json_error(400, "bad_fileuri", str(exc))
    except StorageError as exc:
        request[ERROR] = exc.reason
        return _response(storage_error_answer(exc))
    except RegistryUnavailable:  # logged once per outage by the registry, not once per request
        request[ERROR] = "registry_unavailable"
        return _response(registry_answer())
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
        checks.update(await _signing_checks(request.app, now))
        cache.update(checks=checks, until=now + 5)
    shedding = request.app[LIMITER].shedding()
    checks = {**cache["checks"], "streams": "ok" if shedding is None else f"shedding: {shedding}"}
    ready = all(v == "ok" for v in checks.values())
    return web.json_response(
        {"status": "ready" if ready else "not_ready", "checks": checks}, status=200 if ready else 503
    )


SIGNING_CHECK_SECONDS = 60.0  # a signBlob identity is asked at most this often by probes


async def _signing_checks(app: web.Application, now: float) -> dict[str, str]:
    """Each config-file presign storage signs a probe with its identity, as a media request would
    (kept a minute: a signBlob call per probe would be a call per probe period)."""
    kept = app[READINESS].setdefault("signing", {})
    for storage_id, signer in app[CATALOG].signers.items():
        if storage_id.isdigit():
            continue  # API storages: Test connection signs, and their problems show in their status
        if kept.get(storage_id, (0.0, ""))[0] > now:
            continue
        try:
            await probe(signer)
            result = "ok"
        except SigningError as exc:  # detail to the log; the unauthenticated probe gets the kind
            log.warning("readiness: storage %s cannot sign: %s", storage_id, exc)
            result = f"error: signing_{exc.reason}"
        kept[storage_id] = (now + SIGNING_CHECK_SECONDS, result)
    return {f"signing:{storage_id}": result for storage_id, (_, result) in kept.items()}


async def metrics_view(_request: web.Request) -> web.Response:
    body, content_type = metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})
