"""metrics.Batch: batched counter increments and histogram observations write what direct ones would."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from gateway.metrics import Batch

BOUNDS = (0.01, 0.1, 1.0)
VALUES = (0.0, 0.005, 0.01, 0.02, 0.1, 0.5, 1.0, 7.0, 7.0)  # on a bound counts in that bucket; past the last: +Inf


def collectors(registry: CollectorRegistry) -> tuple[Counter, Histogram]:
    counter = Counter("things_total", "Things", ["kind"], registry=registry)
    histogram = Histogram("wait_seconds", "Waits", ["kind"], buckets=BOUNDS, registry=registry)
    return counter, histogram


def samples(registry: CollectorRegistry) -> list[str]:
    """The exposition without the *_created timestamps, which differ between registries."""
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


async def test_a_flushed_batch_renders_like_direct_writes():
    direct_registry, batched_registry = CollectorRegistry(), CollectorRegistry()
    direct_counter, direct_histogram = collectors(direct_registry)
    counter, histogram = collectors(batched_registry)
    batch = Batch(period=3600)  # flushed below, by hand
    for value in VALUES:
        direct_counter.labels("a").inc(2)
        direct_histogram.labels("a").observe(value)
        batch.inc(counter.labels("a"), 2)
        batch.observe(histogram.labels("a"), value)
    direct_histogram.labels("b").observe(0.05)
    batch.observe(histogram.labels("b"), 0.05)

    assert batched_registry.get_sample_value("things_total", {"kind": "a"}) == 0  # nothing written yet
    assert batched_registry.get_sample_value("wait_seconds_count", {"kind": "a"}) == 0
    batch.flush()
    assert samples(batched_registry) == samples(direct_registry)
    assert batched_registry.get_sample_value("wait_seconds_bucket", {"kind": "a", "le": "0.01"}) == 3
    assert batched_registry.get_sample_value("wait_seconds_bucket", {"kind": "a", "le": "+Inf"}) == len(VALUES)


async def test_a_batch_flushes_itself_after_its_period():
    registry = CollectorRegistry()
    counter, histogram = collectors(registry)
    batch = Batch(period=0)  # due on the loop's next turn
    batch.inc(counter.labels("a"))
    batch.observe(histogram.labels("a"), 0.2)
    assert registry.get_sample_value("things_total", {"kind": "a"}) == 0
    for _ in range(100):  # bounded: a few loop turns at most
        if registry.get_sample_value("things_total", {"kind": "a"}) == 1:
            break
        await asyncio.sleep(0)
    assert registry.get_sample_value("things_total", {"kind": "a"}) == 1
    assert registry.get_sample_value("wait_seconds_sum", {"kind": "a"}) == 0.2
    batch.inc(counter.labels("a"))  # a new period starts with the next value
    batch.flush()
    assert registry.get_sample_value("things_total", {"kind": "a"}) == 2


def test_outside_an_event_loop_values_are_written_at_once():
    registry = CollectorRegistry()
    counter, histogram = collectors(registry)
    batch = Batch()
    batch.inc(counter.labels("a"), 3)
    batch.observe(histogram.labels("a"), 0.5)
    assert registry.get_sample_value("things_total", {"kind": "a"}) == 3
    assert registry.get_sample_value("wait_seconds_bucket", {"kind": "a", "le": "1.0"}) == 1
