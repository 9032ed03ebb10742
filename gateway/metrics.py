"""Prometheus collectors with bounded labels, correct across worker processes.

`gateway serve` points PROMETHEUS_MULTIPROC_DIR at a fresh directory before any worker starts,
so every process writes its samples there and `/metrics`, whichever worker answers, sums them.
Labels are closed sets (route names, status classes, reason codes), never a path or a key.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

REQUESTS = Counter("gateway_requests_total", "HTTP requests answered", ["route", "mode", "status"])
RESPONSE_BYTES = Counter(
    "gateway_response_bytes_total", "Bytes written to clients (status line, headers and body)", ["route"]
)
REQUEST_SECONDS = Histogram(
    "gateway_request_duration_seconds",
    "Time to the last byte of a response",
    ["route"],
    buckets=_LATENCY_BUCKETS,
)
PARTIAL_RESPONSES = Counter(
    "gateway_partial_responses_total", "Answers with 206 Partial Content (range requests served)", ["route"]
)
ACTIVE_STREAMS = Gauge("gateway_active_streams", "Media bodies being streamed now", multiprocess_mode="livesum")
UPSTREAM_SECONDS = Histogram(
    "gateway_upstream_request_duration_seconds",
    "Upstream storage request latency (to the response headers)",
    ["backend", "operation"],
    buckets=_LATENCY_BUCKETS,
)
UPSTREAM_TTFB = Histogram(
    "gateway_upstream_ttfb_seconds",
    "Upstream time to the first body byte",
    ["backend"],
    buckets=_LATENCY_BUCKETS,
)
UPSTREAM_RETRIES = Counter("gateway_upstream_retries_total", "Upstream requests retried", ["backend"])
UPSTREAM_ERRORS = Counter("gateway_upstream_errors_total", "Upstream failures", ["backend", "kind"])
METADATA_CACHE = Counter("gateway_metadata_cache_total", "Object metadata cache lookups", ["result"])
AUTH_FAILURES = Counter("gateway_auth_failures_total", "Refused media requests", ["reason"])
SHED = Counter(
    "gateway_shed_requests_total", "Media requests refused by load shedding", ["reason"]
)  # reason: process_streams (503), subject_streams (429)

SIGNED_URLS = Counter("gateway_signed_urls_total", "V4 signed URLs issued", ["method"])
SIGNED_URL_CACHE = Counter("gateway_signed_url_cache_total", "Signed-URL cache lookups", ["result"])
SIGNING_SECONDS = Histogram(
    "gateway_signing_duration_seconds", "Time to sign a URL", ["method"], buckets=_LATENCY_BUCKETS
)
SIGNING_FAILURES = Counter("gateway_signing_failures_total", "Signing failures", ["reason"])
SYNC_OBJECTS_LISTED = Counter("gateway_sync_objects_listed_total", "Objects listed by import syncs", ["storage"])
SYNC_TASKS = Counter("gateway_sync_tasks_total", "Tasks written by import syncs", ["storage", "action"])
SYNC_SECONDS = Histogram(
    "gateway_sync_duration_seconds",
    "Duration of finished import syncs",
    ["storage"],
    buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
)
SYNC_ERRORS = Counter("gateway_sync_errors_total", "Import sync errors", ["kind"])  # row, file, storage, job
SYNC_JOBS = Counter("gateway_sync_jobs_total", "Import sync jobs finished", ["status"])
EXPORT_WRITES = Counter(
    "gateway_export_writes_total", "Annotation objects written to target storages", ["target", "operation", "result"]
)  # operation: upload, delete, unchanged, kept (a delete without can_delete_objects); result: ok, failed
EXPORT_PENDING = Gauge(
    "gateway_export_pending", "Deliveries waiting in the export outbox", ["target"], multiprocess_mode="mostrecent"
)
EXPORT_OLDEST = Gauge(
    "gateway_export_oldest_pending_seconds",
    "Age of the oldest waiting delivery",
    ["target"],
    multiprocess_mode="mostrecent",
)
LABEL_STUDIO_CHECKS = Counter(
    "gateway_label_studio_checks_total", "Access decisions of the label_studio authenticator", ["result"]
)  # result: cached, allowed, denied, unavailable
WEBHOOK_EVENTS = Counter("gateway_webhook_events_total", "Annotation events received", ["source", "action"])

METADATA_HIT = METADATA_CACHE.labels("hit")
METADATA_MISS = METADATA_CACHE.labels("miss")
SIGNED_CACHE_HIT = SIGNED_URL_CACHE.labels("hit")
SIGNED_CACHE_MISS = SIGNED_URL_CACHE.labels("miss")


class CounterBatch:
    """Counter increments of the request path, added up in memory and written once per loop turn.

    In multiprocess mode every `inc()` takes a lock and writes the process's mmap'ed file, a few
    microseconds each; a media request made four. Requests finishing in the same event-loop turn
    now share one write per counter, scheduled with `call_soon`, so other processes see it within
    the turn; `render()` flushes first. Outside a running loop an increment is written at once.
    """

    def __init__(self) -> None:
        self._pending: dict[Any, float] = {}
        self._flush_on: asyncio.AbstractEventLoop | None = None  # the loop a flush is scheduled on

    def inc(self, counter: Any, amount: float = 1.0) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            counter.inc(amount)
            return
        if self._flush_on is not loop:  # also after a loop closed with a flush still scheduled (tests)
            self._flush_on = loop
            loop.call_soon(self.flush)
        pending = self._pending
        pending[counter] = pending.get(counter, 0.0) + amount

    def flush(self) -> None:
        pending, self._pending, self._flush_on = self._pending, {}, None
        for counter, amount in pending.items():
            counter.inc(amount)


BATCH = CounterBatch()


def status_class(status: int) -> str:
    return f"{status // 100}xx"


def render() -> tuple[bytes, str]:
    """The exposition text: summed over all workers when running multi-process."""
    BATCH.flush()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)
