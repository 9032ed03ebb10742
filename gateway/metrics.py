"""Prometheus collectors with bounded labels, correct across worker processes.

`gateway serve` points PROMETHEUS_MULTIPROC_DIR at a fresh directory before any worker starts,
so every process writes its samples there and `/metrics`, whichever worker answers, sums them.
Labels are closed sets (route names, status classes, reason codes), never a path or a key.
"""

from __future__ import annotations

import asyncio
import bisect
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
)  # reason: process_streams (503), subject_streams (429), process_connections (503, then close)

CONNECTIONS_TIMED_OUT = Counter(
    "gateway_connections_timed_out_total", "Connections closed by a deadline (head, send)", ["deadline"]
)
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
SYNC_LAST_SUCCESS = Gauge(
    "gateway_sync_last_success_timestamp_seconds",
    "When a periodic storage's sync last finished its listing (completed, with or without row errors)",
    ["storage"],
    multiprocess_mode="max",
)  # periodic storages only (sync_interval > 0): on-demand ones are expected to stay unsynced
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

# Every failure a rule alerts on exists from the start, at 0: rate() and increase() see a series
# only rise, so one that first appears at 1 (a process's first failure) would never alert.
for _reason in ("process_streams", "subject_streams", "process_connections"):
    SHED.labels(_reason)
for _reason in (
    "permission_denied",
    "quota_exceeded",
    "unavailable",
    "bad_response",
    "no_identity",
    "user_credentials",
):
    SIGNING_FAILURES.labels(_reason)
for _result in ("cached", "allowed", "denied", "unavailable"):
    LABEL_STUDIO_CHECKS.labels(_result)
for _status in ("completed", "completed_with_errors", "failed"):
    SYNC_JOBS.labels(_status)
for _deadline in ("head", "send"):
    CONNECTIONS_TIMED_OUT.labels(_deadline)

METADATA_HIT = METADATA_CACHE.labels("hit")
METADATA_MISS = METADATA_CACHE.labels("miss")
SIGNED_CACHE_HIT = SIGNED_URL_CACHE.labels("hit")
SIGNED_CACHE_MISS = SIGNED_URL_CACHE.labels("miss")


class Batch:
    """Counter (and gauge) increments and histogram observations of the request path, added up in
    memory and written at most every `period` seconds.

    In multiprocess mode every `inc()` takes a lock and writes the process's mmap'ed file (about
    3 µs), and a histogram observation writes twice; a 64 KiB range made about nine such writes,
    a 304 four. Batched, each counter and each histogram bucket touched in a period costs one
    write: 9.5 writes per 64 KiB range became 2 (the active-streams gauge; now batched too). `render()`
    flushes this process first, so other workers' figures are at most `period` old; the
    application flushes on shutdown. Outside a running loop a value is written at once.
    """

    def __init__(self, period: float = 0.1) -> None:
        self._period = period
        self._counters: dict[Any, float] = {}
        self._histograms: dict[Any, list[Any]] = {}  # child → [sum, count per bucket]
        self._flush_on: asyncio.AbstractEventLoop | None = None  # the loop a flush is scheduled on

    def inc(self, counter: Any, amount: float = 1.0) -> None:
        if self._scheduled():
            counters = self._counters
            counters[counter] = counters.get(counter, 0.0) + amount
        else:
            counter.inc(amount)

    def observe(self, histogram: Any, value: float) -> None:
        """`histogram.observe(value)` for a labelled histogram child, batched."""
        if not self._scheduled():
            histogram.observe(value)
            return
        pending = self._histograms.get(histogram)
        if pending is None:
            pending = self._histograms[histogram] = [0.0, [0] * len(histogram._upper_bounds)]
        pending[0] += value
        # The bucket `observe` would count: the first upper bound at or above the value (+Inf last).
        pending[1][bisect.bisect_left(histogram._upper_bounds, value)] += 1

    def _scheduled(self) -> bool:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        if self._flush_on is not loop:  # also after a loop closed with a flush still scheduled (tests)
            self._flush_on = loop
            loop.call_later(self._period, self.flush)
        return True

    def flush(self) -> None:
        counters, self._counters = self._counters, {}
        histograms, self._histograms = self._histograms, {}
        self._flush_on = None
        for counter, amount in counters.items():
            counter.inc(amount)
        for histogram, (total, buckets) in histograms.items():
            # prometheus_client writes a histogram as its sum and one value per bucket (the counts
            # are made cumulative when rendered); `observe` has no batch form, so write those values.
            histogram._sum.inc(total)
            for bucket, count in zip(histogram._buckets, buckets, strict=True):
                if count:
                    bucket.inc(count)


BATCH = Batch()


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
