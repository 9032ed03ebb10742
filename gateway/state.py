"""Typed keys for what the application shares between handlers."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from typing import Any

from aiohttp import web

from .acl import TaskCache, TokenVerifier
from .catalog import StorageCatalog
from .config import Settings
from .netguard import ClientGuard, StreamLimiter
from .registry.sql import SqlTaskRegistry

SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", SqlTaskRegistry)
CATALOG = web.AppKey("catalog", StorageCatalog)
TASKS = web.AppKey("tasks", TaskCache)
VERIFIER = web.AppKey("verifier", TokenVerifier)
GUARD = web.AppKey("guard", ClientGuard)
LIMITER = web.AppKey("limiter", StreamLimiter)
READINESS = web.AppKey("readiness", dict[str, Any])
EXPORT_WORKER = web.AppKey("export_worker", Any)  # gateway.export.worker.ExportWorker when running in-process
RECORDER = web.AppKey("recorder", Any)  # gateway.registry.outbox.Recorder: annotation events, group-committed
FRONT = web.AppKey("front", Any)  # gateway.fastlane.MediaFront: media cache hits answered before aiohttp
SYNC_WORKER = web.AppKey("sync_worker", Any)  # gateway.sync.worker.SyncWorker when running in-process

# Per-request facts the access log reports (never the token itself).
REQUEST_ID = web.RequestKey("request_id", str)
STARTED = web.RequestKey("started", float)
SUB = web.RequestKey("sub", str)
TASK = web.RequestKey("task", int)
ERROR = web.RequestKey("error", str)
MODE = web.RequestKey("mode", str)
# The resolved client address (behind trusted proxies); None when it could not be determined.
CLIENT = web.RequestKey("client", IPv4Address | IPv6Address | None)  # type: ignore[arg-type]  # "presign" when answered with a signed-URL redirect
