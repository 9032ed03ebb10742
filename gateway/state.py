"""Typed keys for what the application shares between handlers."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .acl import TokenVerifier
from .config import Settings
from .registry import TaskRegistry
from .storage import Backend

SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", TaskRegistry)
BACKENDS = web.AppKey("backends", dict[str, Backend])
VERIFIER = web.AppKey("verifier", TokenVerifier)
READINESS = web.AppKey("readiness", dict[str, Any])
SIGNERS = web.AppKey("signers", dict[str, Any])  # storage id -> signer.Signer, for presign storages

# Per-request facts the access log reports (never the token itself).
REQUEST_ID = web.RequestKey("request_id", str)
STARTED = web.RequestKey("started", float)
SUB = web.RequestKey("sub", str)
TASK = web.RequestKey("task", int)
ERROR = web.RequestKey("error", str)
MODE = web.RequestKey("mode", str)  # "presign" when answered with a signed-URL redirect
