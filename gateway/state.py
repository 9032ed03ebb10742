"""Typed keys for what the application shares between handlers."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .acl import TaskCache, TokenVerifier
from .catalog import StorageCatalog
from .config import Settings
from .labelstudio import LabelStudioAuthority
from .netguard import ClientGuard, StreamLimiter
from .registry.sql import SqlTaskRegistry

if TYPE_CHECKING:  # typing only: the sync and export machinery load where they run
    from .export.worker import ExportWorker
    from .fastlane import MediaFront
    from .registry.outbox import Recorder
    from .sync.worker import SyncWorker

SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", SqlTaskRegistry)
CATALOG = web.AppKey("catalog", StorageCatalog)
TASKS = web.AppKey("tasks", TaskCache)
VERIFIER = web.AppKey("verifier", TokenVerifier)
GUARD = web.AppKey("guard", ClientGuard)
LIMITER = web.AppKey("limiter", StreamLimiter)
READINESS = web.AppKey("readiness", dict[str, Any])
EXPORT_WORKER: web.AppKey[ExportWorker | None] = web.AppKey("export_worker")  # when running in-process
RECORDER: web.AppKey[Recorder] = web.AppKey("recorder")  # annotation events, group-committed
FRONT: web.AppKey[MediaFront] = web.AppKey("front")  # the fast lane's share of the app
LABEL_STUDIO: web.AppKey[LabelStudioAuthority | None] = web.AppKey("label_studio")  # shared decisions
SYNC_WORKER: web.AppKey[SyncWorker | None] = web.AppKey("sync_worker")  # when running in-process

# Per-request facts the access log reports (never the token itself).
REQUEST_ID = web.RequestKey("request_id", str)
STARTED = web.RequestKey("started", float)
SUB = web.RequestKey("sub", str)
TASK = web.RequestKey("task", int)
ERROR = web.RequestKey("error", str)
MODE = web.RequestKey("mode", str)
# The resolved client address (behind trusted proxies); None when it could not be determined.
CLIENT = web.RequestKey("client", IPv4Address | IPv6Address | None)  # type: ignore[arg-type]  # "presign" when answered with a signed-URL redirect
