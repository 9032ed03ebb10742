"""The operations kit (issue 19) against real tools: Debian's Prometheus scraping `gateway serve
--workers 2` while media, a sync, webhooks and failures flow, then every Grafana dashboard query
and every recording and alert expression of deploy/ evaluated through Prometheus's HTTP API, each
required to return series (a wrong metric or label name would come back empty); promtool checks
and unit-tests the rules; the dashboard JSON is the generator's output.

Prometheus and promtool come from Debian's `prometheus` (`make test` installs it as root); without
them these tests skip, and fail under CI=true.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa

from .conftest import SECRET, Emulator, emulator_binary, free_port, make_token, wait_until
from .postgres import _missing
from .test_export import HOOK, HOOK_SECRET, LS_PROJECT, SECRET_HEADER, created
from .test_presign import service_account_json

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "gateway-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "gateway-rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "gateway-dashboard.json"
PROJECT = "7"
BIG = 48 * 1024 * 1024  # larger than loopback socket buffers: an unread stream stays open
COMPARISON = re.compile(r"^(?P<signal>.+?)\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<threshold>[0-9.e+-]+)\s*$", re.S)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        _missing(f"{name} is not installed", "apt-get install prometheus, or `make prometheus` as root")
    return path


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every query of every panel."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(panel["title"], target["expr"]) for panel in panels for target in panel.get("targets", [])]


def as_evaluated(expr: str) -> str:
    """A dashboard expression as Grafana sends it for the whole job."""
    return expr.replace('job=~"$job"', 'job=~".+"').replace("$__rate_interval", "1m")


def alert_signal(expr: str) -> str:
    """An alert's expression with its threshold turned into a `bool` comparison, so that it answers
    whether or not it fires — and answers nothing only when its series do not exist."""
    match = COMPARISON.match(expr.strip())
    assert match, f"an alert expression is not `<signal> <comparison> <number>`: {expr}"
    return f"({match['signal']}) {match['op']} bool {match['threshold']}"


# ----------------------------------------------------------------------------- static checks


def test_promtool_checks_and_unit_tests_the_rules():
    promtool = tool("promtool")
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent, capture_output=True, text=True, timeout=120
    )
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == {rule["alert"] for rule in rules() if "alert" in rule}, "every alert needs a unit test"


def test_dashboard_json_is_the_generators_output():
    generated = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "grafana" / "dashboard.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert generated == DASHBOARD.read_text(), "run `make dashboard` and commit deploy/grafana/gateway-dashboard.json"


# ----------------------------------------------------------------------------- the live world


@dataclass
class Live:
    prometheus: str  # base URL
    gateway: str
    log: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as exc:  # a syntax or type error: 400 with the reason
            raise AssertionError(f"{expr}: {exc.read().decode()}") from None
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def api(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.prometheus}{path}", timeout=10) as response:
            return json.load(response)["data"]


def call(base: str, path: str, *, method: str = "GET", headers: dict[str, str] | None = None, body: Any = None):
    """(status, headers, body) of one request; never raises on an HTTP error status."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def media(bucket: str, key: str) -> str:
    from gateway.uris import encode_fileuri

    return f"/projects/{PROJECT}/resolve/?fileuri={encode_fileuri(f'gs://{bucket}/{key}')}"


def start_emulator(directory: Path) -> tuple[Emulator, subprocess.Popen[bytes]]:
    """A fake-gcs-server of this module's own: the test stops it to cause upstream errors."""
    port = free_port()
    process = subprocess.Popen(
        [
            *(str(emulator_binary()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1"),
            *("-port", str(port), "-public-host", f"127.0.0.1:{port}", "-log-level", "error"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert process.poll() is None, "fake-gcs-server exited at start"
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
            return True
        return False

    wait_until(up, what="fake-gcs-server")
    return Emulator(url, f"127.0.0.1:{port}", process), process


def gateway_config(directory: Path, port: int, closed_port: int) -> str:
    q = json.dumps  # a JSON string is a valid TOML basic string
    failing_signer = {  # workload identity federation whose token exchange cannot succeed
        "type": "external_account",
        "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/q",
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_url": f"http://127.0.0.1:{closed_port}/token",
        "credential_source": {"file": str(directory / "no-token")},
        "service_account_impersonation_url": f"http://127.0.0.1:{closed_port}/v1/projects/-/serviceAccounts/"
        "signer@p.iam.gserviceaccount.com:generateAccessToken",
    }
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return f"""
[server]
host = "127.0.0.1"
port = {port}
shutdown_timeout = 5.0

[auth]
secret = {q(SECRET)}

[registry]
url = {q(f"sqlite:///{directory / 'registry.db'}")}

[limits]
max_streams_per_subject = 1

[upstream]
retries = 1
retry_backoff = 0.01
iam_endpoint = "http://127.0.0.1:{closed_port}"

[label_studio]
url = "http://127.0.0.1:{closed_port}"
timeout = 1.0

[webhooks]
secret = {q(HOOK_SECRET)}

[[storages]]
id = "media"
project = {q(PROJECT)}
type = "gcs"
bucket = "ops-media"
prefix = "media/"
sync_interval = 3600

[[storages]]
id = "task-files"
project = "8"
type = "gcs"
bucket = "ops-media"
prefix = "tasks/"
use_blob_urls = false

[[storages]]
id = "missing"
project = "9"
type = "gcs"
bucket = "ops-no-such-bucket"

[[storages]]
id = "signed"
project = {q(PROJECT)}
type = "gcs"
bucket = "ops-signed"
presign = true
google_application_credentials = {q(service_account_json(key))}

[[storages]]
id = "unsignable"
project = {q(PROJECT)}
type = "gcs"
bucket = "ops-unsignable"
presign = true
google_application_credentials = {q(json.dumps(failing_signer))}

[[export_storages]]
id = "annotations"
project = {q(str(LS_PROJECT))}
type = "local"
bucket = "exported"
root = {q(str(directory / "exported"))}
"""


def prometheus_config(directory: Path, targets: list[int]) -> Path:
    config = directory / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [
                    {"job_name": "gateway", "static_configs": [{"targets": [f"127.0.0.1:{port}" for port in targets]}]}
                ],
            }
        )
    )
    return config


def hold_stream(port: int, path: str, token: str) -> tuple[socket.socket, int]:
    """Send a GET and read only its status line; the unread body keeps the stream (and its slot) open."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    status_line = b""
    while not status_line.endswith(b"\r\n"):
        status_line += sock.recv(1)
    return sock, int(status_line.split()[1])


def sync(base: str, storage: str, expected: str) -> None:
    admin = {"Authorization": f"Bearer {make_token('ops', admin=True)}"}
    assert call(base, f"/api/storages/gcs/{storage}/sync", method="POST", headers=admin)[0] == 202

    def status() -> str:
        return json.loads(call(base, f"/api/storages/gcs/{storage}", headers=admin)[2])["status"]

    wait_until(lambda: status() in ("completed", "completed_with_errors", "failed"), timeout=60, what=f"{storage}")
    assert status() == expected


def failures(base: str, port: int) -> None:
    """What the failure alerts are about: a signing failure, Label Studio unreachable, a stream
    refused at the per-subject cap, a sync of a bucket that does not exist."""
    grant = {"Authorization": f"Bearer {make_token(projects=[PROJECT])}"}
    status, _, body = call(base, media("ops-unsignable", "b.bin"), headers=grant)
    assert status == 503 and json.loads(body)["error"].startswith("signing_"), body
    photo = media("ops-media", "media/photo.bin")
    status, _, body = call(base, photo, headers={"Authorization": "Token not-a-real-one"})
    assert status == 503 and json.loads(body)["error"] == "label_studio_unavailable", body

    # One stream per subject per worker; with two workers a third held stream is refused.
    held: list[socket.socket] = []
    try:
        statuses = []
        for _ in range(3):
            sock, status = hold_stream(port, media("ops-media", "media/big.bin"), make_token(projects=[PROJECT]))
            held.append(sock)
            statuses.append(status)
        assert statuses.count(429) >= 1 and statuses.count(200) >= 1, statuses
    finally:
        for sock in held:
            sock.close()
    sync(base, "missing", "failed")


def generate_traffic(port: int, directory: Path, emulator: Emulator, live: Live) -> None:
    base = f"http://127.0.0.1:{port}"
    grant = {"Authorization": f"Bearer {make_token(projects=[PROJECT])}"}

    photo = media("ops-media", "media/photo.bin")
    for _ in range(3):
        assert call(base, photo, headers=grant)[0] == 200
    assert call(base, photo, headers=grant | {"Range": "bytes=0-99"})[0] == 206
    assert call(base, photo)[0] == 401
    assert call(base, media("ops-signed", "a.bin"), headers=grant)[0] == 303
    assert call(base, media("ops-signed", "a.bin"), headers=grant)[0] == 303  # from the signed-URL cache

    # A counter's first sample is its baseline for rate(): the failures happen once, and again
    # after Prometheus has scraped their counters, so that the failure alerts see them increase.
    failures(base, port)
    counters = [
        "gateway_signing_failures_total",
        'gateway_label_studio_checks_total{result="unavailable"}',
        "gateway_shed_requests_total",
        'gateway_sync_jobs_total{status="failed"}',
    ]
    wait_until(lambda: all(live.query(c) for c in counters), timeout=30, what="Prometheus to scrape the failures")
    failures(base, port)

    # Syncs: a periodic storage, and a task file with a bad row.
    sync(base, "media", "completed")
    sync(base, "task-files", "completed_with_errors")

    # A Label Studio webhook, exported to the local target storage.
    status, _, body = call(base, HOOK, method="POST", headers={SECRET_HEADER: HOOK_SECRET}, body=created(501, 42))
    assert status == 200, body
    wait_until(lambda: any((directory / "exported").rglob("501*")), timeout=60, what="the export of annotation 501")

    # Storage down: an object whose metadata is not cached yet cannot be read.
    emulator.process.terminate()
    emulator.process.wait(10)
    status, _, body = call(base, media("ops-media", "media/other.bin"), headers=grant)
    assert status == 502, body


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    prometheus = tool("prometheus")
    directory = tmp_path_factory.mktemp("operations")
    (directory / "tmp").mkdir()
    (directory / "exported").mkdir()
    emulator, emulator_process = start_emulator(directory)
    processes: list[subprocess.Popen[bytes]] = [emulator_process]
    try:
        emulator.create_bucket("ops-media")
        emulator.create_bucket("ops-signed")
        emulator.create_bucket("ops-unsignable")
        emulator.upload("ops-media", "media/photo.bin", os.urandom(20_000), "image/jpeg")
        emulator.upload("ops-media", "media/other.bin", b"never read before the storage stops", "text/plain")
        emulator.upload("ops-media", "media/big.bin", os.urandom(BIG), "application/octet-stream")
        lines = [json.dumps({"data": {"text": "one"}}), "{not json", json.dumps({"data": {"text": "three"}})]
        emulator.upload("ops-media", "tasks/batch.jsonl", "\n".join(lines).encode(), "application/x-ndjson")
        emulator.upload("ops-signed", "a.bin", b"signed", "application/octet-stream")
        emulator.upload("ops-unsignable", "b.bin", b"unsignable", "application/octet-stream")

        port, prometheus_port, closed_port = free_port(), free_port(), free_port()
        config = directory / "gateway.toml"
        config.write_text(gateway_config(directory, port, closed_port))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "PROMETHEUS_"))}
        env |= {"STORAGE_EMULATOR_HOST": emulator.host, "TMPDIR": str(directory / "tmp")}
        tasks = directory / "tasks.json"
        keys = ["photo.bin", "big.bin", "other.bin"]
        data = {"media": [f"gs://ops-media/media/{key}" for key in keys] + ["gs://ops-signed/a.bin"]}
        tasks.write_text(json.dumps([{"data": data}]))
        gateway_cli = [sys.executable, "-m", "gateway"]
        imported = subprocess.run(
            [*gateway_cli, "import", "--config", str(config), "--project", PROJECT, str(tasks)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert imported.returncode == 0, imported.stderr

        log = directory / "gateway.log"
        worker_port = free_port()
        commands = [  # the shape of deploy/kubernetes/overlays/postgresql: servers and a worker
            [*gateway_cli, "serve", "--config", str(config), "--workers", "2"],
            [*gateway_cli, "worker", "--config", str(config), "--metrics-port", str(worker_port)],
            [
                prometheus,
                f"--config.file={prometheus_config(directory, [port, worker_port])}",
                f"--storage.tsdb.path={directory / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
            ],
        ]
        with open(log, "wb") as out:
            for command in commands:
                processes.append(
                    subprocess.Popen(
                        command,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                )
        gateway = f"http://127.0.0.1:{port}"
        world = Live(f"http://127.0.0.1:{prometheus_port}", gateway, log)

        def up(url: str, process: subprocess.Popen[bytes]) -> bool:
            assert process.poll() is None, log.read_text(errors="replace")[-4000:]
            with contextlib.suppress(OSError):
                return urllib.request.urlopen(url, timeout=2).status == 200
            return False

        wait_until(lambda: up(f"{gateway}/healthz", processes[1]), timeout=60, what="the gateway")
        wait_until(lambda: up(f"http://127.0.0.1:{worker_port}/metrics", processes[2]), timeout=60, what="worker")
        wait_until(lambda: up(f"{world.prometheus}/-/ready", processes[3]), timeout=60, what="Prometheus")
        wait_until(lambda: len(world.query("up == 1")) == 2, timeout=30, what="both targets scraped")
        generate_traffic(port, directory, emulator, world)
        yield world
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                if process is emulator_process:  # in our process group: never killpg it
                    process.terminate()
                else:  # the gateway's supervisor forwards SIGTERM to its workers
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(20)
            if process.poll() is None:
                process.kill()
                process.wait(5)


def wait_for_series(live: Live, named: dict[str, str]) -> None:
    """Every expression returns at least one series, once Prometheus has scraped the traffic
    (the rules run every second); on the deadline, the ones still empty are named."""
    empty = dict(named)

    def all_answered() -> bool:
        for name, expr in list(empty.items()):
            if live.query(expr):
                del empty[name]
        return not empty

    try:
        wait_until(all_answered, timeout=60, what="series")
    except AssertionError:
        raise AssertionError("no series for:\n" + "\n".join(f"  {n}: {e}" for n, e in empty.items())) from None


def test_every_dashboard_query_returns_series(live):
    queries = dashboard_queries()
    assert len(queries) >= 30
    named = {f"{title} #{i}": as_evaluated(expr) for i, (title, expr) in enumerate(queries)}
    wait_for_series(live, named)


def test_every_recording_and_alert_expression_returns_series(live):
    named = {}
    for rule in rules():
        if "record" in rule:
            named[rule["record"]] = rule["expr"]
        else:
            named[rule["alert"]] = alert_signal(rule["expr"])
    wait_for_series(live, named)
    loaded = [rule for group in live.api("/api/v1/rules")["groups"] for rule in group["rules"]]
    assert len(loaded) == len(rules())
    assert all(rule["health"] == "ok" for rule in loaded), [r for r in loaded if r["health"] != "ok"]


def test_alerts_raised_by_the_failures_of_the_traffic(live):
    """The traffic's signing failure, Label Studio outage and failed sync make their alerts active
    (pending while their `for:` runs), and nothing else of the kind."""
    expected = {"GatewaySigningFailures", "GatewayLabelStudioUnavailable", "GatewaySyncJobsFailing", "GatewayShedding"}

    def active() -> set[str]:
        return {alert["labels"]["alertname"] for alert in live.api("/api/v1/alerts")["alerts"]}

    wait_until(lambda: expected <= active(), timeout=60, what=f"alerts {sorted(expected)}")
    assert "GatewaySyncStale" not in active() and "GatewayExportStuck" not in active()
