"""The gateway's Grafana dashboard, as code (grafana-foundation-sdk).

`python deploy/grafana/dashboard.py > deploy/grafana/gateway-dashboard.json` (or `make dashboard`)
writes the JSON that operators import; tests/test_operations.py checks that the committed file is
this script's output and evaluates every query against a live Prometheus scraping the gateway.
Queries filter on `job=~"$job"` and use `$__rate_interval`, which Grafana fills in.
"""

from __future__ import annotations

import json

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
JOB = 'job=~"$job"'
RATE = "[$__rate_interval]"


def sel(metric: str, labels: str = "") -> str:
    """A selector of `metric` for the dashboard's job, plus `labels`."""
    return f"{metric}{{{JOB}{', ' + labels if labels else ''}}}"


def rate(metric: str, labels: str = "") -> str:
    return f"rate({sel(metric, labels)}{RATE})"


def quantile(q: float, histogram: str, by: str) -> str:
    return f"histogram_quantile({q}, sum by ({by}, le) ({rate(histogram + '_bucket')}))"


def ratio(metric: str, part: str) -> str:
    """The share of `metric`'s rate whose labels match `part`."""
    return f"sum({rate(metric, part)}) / sum({rate(metric)})"


def graph(title: str, unit: str, queries: list[tuple[str, str]], description: str = "") -> timeseries.Panel:
    panel = timeseries.Panel().title(title).unit(unit).datasource(DATASOURCE).height(8).span(12)
    if description:
        panel = panel.description(description)
    for ref, (expr, legend) in zip("ABCDEFGH", queries, strict=False):
        panel = panel.with_target(prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref))
    return panel


def single(title: str, unit: str, expr: str) -> stat.Panel:
    query = prometheus.Dataquery().expr(expr).instant().ref_id("A")
    return stat.Panel().title(title).unit(unit).datasource(DATASOURCE).height(4).span(6).with_target(query)


def build() -> dashboard.Dashboard:
    media = 'route=~"task_resolve|project_resolve"'
    return (
        dashboard.Dashboard("Media gateway")
        .uid("gcs-media-gateway")
        .tags(["gateway", "label-studio"])
        .refresh("30s")
        .time("now-3h", "now")
        .with_variable(dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            dashboard.QueryVariable("job")
            .label("Job")
            .datasource(DATASOURCE)
            .query("label_values(gateway_requests_total, job)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True)
            .include_all(True)
            .all_value(".+")
        )
        .with_row(dashboard.Row("Traffic"))
        .with_panel(single("Requests/s", "reqps", f"sum({rate('gateway_requests_total')})"))
        .with_panel(
            single(
                "5xx ratio",
                "percentunit",
                ratio("gateway_requests_total", 'status="5xx"'),
            )
        )
        .with_panel(single("Active streams", "short", f"sum({sel('gateway_active_streams')})"))
        .with_panel(single("Bytes/s out", "Bps", f"sum({rate('gateway_response_bytes_total')})"))
        .with_panel(
            graph(
                "Throughput by route and status",
                "reqps",
                [(f"sum by (route, status) ({rate('gateway_requests_total')})", "{{route}} {{status}}")],
            )
        )
        .with_panel(
            graph(
                "Bytes/s by route",
                "Bps",
                [(f"sum by (route) ({rate('gateway_response_bytes_total')})", "{{route}}")],
            )
        )
        .with_panel(
            graph(
                "Latency to the last byte",
                "s",
                [
                    (quantile(0.5, "gateway_request_duration_seconds", "route"), "p50 {{route}}"),
                    (quantile(0.99, "gateway_request_duration_seconds", "route"), "p99 {{route}}"),
                ],
                "Media answers last as long as their streams: watch the API routes and the upstream first byte.",
            )
        )
        .with_panel(
            graph(
                "Media answers by mode, and ranges served",
                "reqps",
                [
                    (f"sum by (mode, status) ({rate('gateway_requests_total', media)})", "{{mode}} {{status}}"),
                    (f"sum({rate('gateway_partial_responses_total')})", "206 partial"),
                ],
            )
        )
        .with_row(dashboard.Row("Load and storage"))
        .with_panel(
            graph(
                "Active streams and shedding",
                "short",
                [
                    (f"sum({sel('gateway_active_streams')})", "active streams"),
                    (f"sum by (reason) ({rate('gateway_shed_requests_total')})", "shed/s {{reason}}"),
                ],
                "Shedding: 503 overloaded at [limits] max_streams, 429 at max_streams_per_subject.",
            )
        )
        .with_panel(
            graph(
                "Refused requests (401/403)",
                "reqps",
                [(f"sum by (reason) ({rate('gateway_auth_failures_total')})", "{{reason}}")],
            )
        )
        .with_panel(
            graph(
                "Upstream errors and retries",
                "reqps",
                [
                    (f"sum by (backend, kind) ({rate('gateway_upstream_errors_total')})", "{{backend}} {{kind}}"),
                    (f"sum by (backend) ({rate('gateway_upstream_retries_total')})", "{{backend}} retries"),
                ],
            )
        )
        .with_panel(
            graph(
                "Upstream latency (p99)",
                "s",
                [
                    (
                        quantile(0.99, "gateway_upstream_request_duration_seconds", "backend, operation"),
                        "headers {{backend}} {{operation}}",
                    ),
                    (quantile(0.99, "gateway_upstream_ttfb_seconds", "backend"), "first byte {{backend}}"),
                ],
            )
        )
        .with_row(dashboard.Row("Caches and signing"))
        .with_panel(
            graph(
                "Cache hit ratios",
                "percentunit",
                [
                    (ratio("gateway_metadata_cache_total", 'result="hit"'), "object metadata"),
                    (ratio("gateway_signed_url_cache_total", 'result="hit"'), "signed URLs"),
                ],
            )
        )
        .with_panel(
            graph(
                "Signing",
                "short",
                [
                    (f"sum by (method) ({rate('gateway_signed_urls_total')})", "signed/s {{method}}"),
                    (f"sum by (reason) ({rate('gateway_signing_failures_total')})", "failed/s {{reason}}"),
                ],
            )
        )
        .with_panel(
            graph(
                "Signing latency (p50, p99)",
                "s",
                [
                    (quantile(0.5, "gateway_signing_duration_seconds", "method"), "p50 {{method}}"),
                    (quantile(0.99, "gateway_signing_duration_seconds", "method"), "p99 {{method}}"),
                ],
            )
        )
        .with_panel(
            graph(
                "Label Studio access checks",
                "reqps",
                [(f"sum by (result) ({rate('gateway_label_studio_checks_total')})", "{{result}}")],
                "unavailable: Label Studio down or slow; its users get 503 label_studio_unavailable.",
            )
        )
        .with_row(dashboard.Row("Import sync and annotation export"))
        .with_panel(
            graph(
                "Sync progress",
                "short",
                [
                    (f"sum by (storage) ({rate('gateway_sync_objects_listed_total')})", "listed/s {{storage}}"),
                    (
                        f"sum by (storage, action) ({rate('gateway_sync_tasks_total')})",
                        "tasks {{action}}/s {{storage}}",
                    ),
                ],
            )
        )
        .with_panel(
            graph(
                "Sync jobs and errors",
                "short",
                [
                    (f"sum by (status) (increase({sel('gateway_sync_jobs_total')}{RATE}))", "jobs {{status}}"),
                    (f"sum by (kind) (increase({sel('gateway_sync_errors_total')}{RATE}))", "errors {{kind}}"),
                ],
            )
        )
        .with_panel(
            graph(
                "Sync duration (p99) and last periodic sync",
                "s",
                [
                    (quantile(0.99, "gateway_sync_duration_seconds", "storage"), "p99 {{storage}}"),
                    (
                        f"time() - max by (storage) ({sel('gateway_sync_last_success_timestamp_seconds')})",
                        "since last periodic sync {{storage}}",
                    ),
                ],
            )
        )
        .with_panel(
            graph(
                "Export outbox",
                "short",
                [
                    (f"max by (target) ({sel('gateway_export_pending')})", "pending {{target}}"),
                    (f"max by (target) ({sel('gateway_export_oldest_pending_seconds')})", "oldest s {{target}}"),
                ],
            )
        )
        .with_panel(
            graph(
                "Export writes and webhooks",
                "short",
                [
                    (
                        f"sum by (target, operation, result) ({rate('gateway_export_writes_total')})",
                        "{{target}} {{operation}} {{result}}",
                    ),
                    (f"sum by (action) ({rate('gateway_webhook_events_total')})", "webhook {{action}}"),
                ],
            )
        )
    )


def render() -> str:
    return json.dumps(build().build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(render(), end="")
