"""One access record for every answer, whichever lane wrote it: Prometheus counters and a JSON line.

aiohttp calls `RequestRecorder.log` once per finished response; the fast lane calls `finish` with
its `Exchange`. Both go through `account` (metrics) and `record` (the line), so the two lanes count
and log alike; the line's `lane` says which one answered.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from . import metrics
from .netguard import IPAddress
from .state import CLIENT, ERROR, MODE, REQUEST_ID, SETTINGS, STARTED, SUB, TASK

access_log = logging.getLogger("gateway.access")
MEDIA_ROUTES = frozenset({"task_resolve", "project_resolve"})


@dataclass(slots=True)
class Exchange:
    """A request the fast lane took: what its answer, metrics and access line need."""

    started: float
    request_id: str
    method: str
    path: str
    route: str
    task: int | None
    client: IPAddress | None
    peer: str | None
    head_only: bool
    close: bool  # the client asked to close after this answer
    origin: str | None  # for the CORS fields


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(incoming: str) -> str:
    """The client's X-Request-ID when it is a sane token, else a new random one."""
    return incoming if _REQUEST_ID.fullmatch(incoming) else os.urandom(8).hex()


def route_name(request: web.BaseRequest) -> str:
    """A bounded route label: the resource's name, or 'unmatched' (also for the 400 aiohttp writes
    for a head it could not parse, which never met the router)."""
    try:
        match_info = getattr(request, "match_info", None)
    except AssertionError:  # aiohttp asserts that a routed request has its match
        return "unmatched"
    resource = match_info.route.resource if match_info is not None else None
    return (resource.name if resource is not None else None) or "unmatched"


class RequestRecorder(AbstractAccessLogger):
    """Runs once per finished response: Prometheus counters and, if enabled, a JSON log line."""

    def __init__(self, logger: logging.Logger, log_format: str, enabled: bool | None = None) -> None:
        super().__init__(logger, log_format)
        self._children: dict[tuple[str, str, int], tuple[Any, Any, Any, Any]] = {}
        self._access_log = enabled

    @property
    def enabled(self) -> bool:
        return True

    def log(self, request: web.BaseRequest, response: web.StreamResponse, loop_seconds: float) -> None:
        started = request.get(STARTED)
        seconds = time.perf_counter() - started if started is not None else loop_seconds
        route = route_name(request)
        mode = request.get(MODE) or ("proxy" if route in MEDIA_ROUTES else "none")
        self.account(route, mode, response.status, response.body_length, seconds)
        transport = request.transport
        answered = getattr(transport.get_protocol(), "aiohttp_answered", None) if transport is not None else None
        if answered is not None:  # gateway/fastlane.py in front: it may take the connection back
            answered(response.keep_alive)
        if self._access_log is None:
            try:
                app = getattr(request, "app", None)
            except AssertionError:  # a head aiohttp could not parse never met the router
                app = None
            if app is None:
                return
            self._access_log = app[SETTINGS].server.access_log  # one app per server: read once
        if self._access_log:
            self.record(
                request.get(REQUEST_ID),
                request.method,
                request.path,
                response.status,
                response.body_length,
                seconds,
                request.get(SUB),
                request.get(TASK),
                request.get(ERROR),
                request.get(CLIENT, request.remote),  # behind trusted proxies: the client
                request.remote,
                "aiohttp",
            )

    def finish(self, exchange: Exchange, status: int, mode: str, sub: str | None, sent: int, error: str | None) -> None:
        """The fast lane's answer to `exchange` is out (or abandoned after `sent` bytes)."""
        seconds = time.perf_counter() - exchange.started
        self.account(exchange.route, mode, status, sent, seconds)
        if self._access_log:
            self.record(
                exchange.request_id,
                exchange.method,
                exchange.path,
                status,
                sent,
                seconds,
                sub,
                exchange.task,
                error,
                exchange.client,
                exchange.peer,
                "fast",
            )

    def account(self, route: str, mode: str, status: int, sent: int, seconds: float) -> None:
        """The request metrics of one answer."""
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

    @staticmethod
    def record(
        request_id: str | None,
        method: str,
        path: str,
        status: int,
        sent: int,
        seconds: float,
        sub: str | None,
        task: int | None,
        error: str | None,
        remote: object,
        peer: str | None,
        lane: str,
    ) -> None:
        """One access log line: JSON, never a token (the path only, never the query string)."""
        fields = {
            "request_id": request_id,
            "method": method,
            "path": path,
            "status": status,
            "bytes": sent,
            "duration_ms": round(seconds * 1000, 2),
            "sub": sub,
            "task": task,
            "error": error,
            "remote": None if remote is None else str(remote),
            "peer": peer,
            "lane": lane,
        }
        access_log.info(json.dumps(fields, separators=(",", ":")))
