"""Nothing acknowledged is ever lost (issue 16, case 4), against real `gateway serve` processes.

A webhook is answered 2xx only when its write is in the registry a restart will read. A SQLite
file removed or made read-only under a running gateway, or a PostgreSQL server stopped, makes
writes answer 503 with JSON and /readyz fail, logged once; a restart refuses to replace a lost
registry with an empty one (gateway/registry/marker.py).

"Read-only" needs a process that file modes bind: tests run as root in CI, and root writes any
file. As root the gateway is started without the capabilities that bypass file modes
(CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH; util-linux `setpriv`), so a file it owns with mode 0444
refuses it as it refuses any non-root owner; as another user it runs as that user.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.registry.marker import marker_for

from .conftest import PROJECT, SECRET, free_port, make_token, wait_until

ADMIN = {"Authorization": f"Bearer {make_token('root', admin=True)}"}
HOOK_SECRET = "a-webhook-secret-for-durability-tests"
HOOK = {"X-Gateway-Webhook-Secret": HOOK_SECRET}
UNAVAILABLE_LINE = "registry unavailable:"
NO_DAC_OVERRIDE = [
    "setpriv",
    "--bounding-set=-dac_override,-dac_read_search",
    "--inh-caps=-dac_override,-dac_read_search",
]


def call(port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, raw, kind = response.status, response.read(), response.headers.get_content_type()
    except urllib.error.HTTPError as exc:
        status, raw, kind = exc.code, exc.read(), exc.headers.get_content_type()
    assert kind == "application/json", (status, raw)
    return status, json.loads(raw)


def webhook(annotation_id: int, task_id: int) -> dict[str, Any]:
    return {
        "action": "ANNOTATION_CREATED",
        "project": {"id": int(PROJECT)},
        "task": {"id": task_id, "data": {"image": "gs://durable/a.jpg"}},
        "annotation": {"id": annotation_id, "task": task_id, "result": [{"value": {"choices": ["Cat"]}}]},
    }


@dataclass
class Gateway:
    """`gateway serve` processes started one after the other on one config and one registry."""

    directory: Path
    config: Path
    prefix: list[str]
    env: dict[str, str]
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def options(self) -> list[str]:
        return ["--port", str(self.port), "--workers", "1"]

    def start(self) -> subprocess.Popen[bytes]:
        log = self.directory / f"serve-{len(self.logs)}.log"
        self.logs.append(log)
        self.port = free_port()
        with log.open("wb") as handle:
            self.process = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "gateway", "serve", "--config", str(self.config), *self.options],
                env=self.env,
                stdout=subprocess.DEVNULL,  # the access log
                stderr=handle,
                start_new_session=True,
            )
        return self.process

    def serve(self) -> int:
        process = self.start()

        def up() -> bool:
            assert process.poll() is None, self.log()
            try:
                return call(self.port, "GET", "/healthz")[0] == 200
            except OSError:
                return False

        wait_until(up, 30, "gateway serve to answer")
        return self.port

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)

    def log(self) -> str:
        return self.logs[-1].read_text(errors="replace") if self.logs else ""

    def ready(self) -> tuple[int, Any]:
        return call(self.port, "GET", "/readyz")

    def post(self, annotation_id: int, task_id: int) -> tuple[int, Any]:
        return call(self.port, "POST", "/api/webhooks/label-studio", webhook(annotation_id, task_id), HOOK)


def make_gateway(directory: Path, registry_url: str, prefix: list[str], **env: str) -> Gateway:
    """A gateway on `registry_url` with a local storage of PROJECT, webhooks and stored credentials
    enabled, and no background workers (what is written is only what requests wrote)."""
    bucket = directory / "bucket"
    bucket.mkdir(exist_ok=True)
    config = directory / "gateway.toml"
    config.write_text(
        f"[registry]\nurl = {json.dumps(registry_url)}\n"
        'encryption_keys = ["an-encryption-key-for-tests-0123456789abcdef"]\n'
        f'[webhooks]\nsecret = "{HOOK_SECRET}"\n'
        "[sync]\nworker = false\n[export]\nworker = false\n"
        f'[[storages]]\nid = "local"\nproject = "{PROJECT}"\ntype = "local"\n'
        f'bucket = "durable"\nroot = {json.dumps(str(bucket))}\n'
    )
    variables = {
        **os.environ,
        "GATEWAY_AUTH_SECRET": SECRET,
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        **env,
    }
    return Gateway(directory, config, prefix, variables)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    made: list[Gateway] = []

    def make(registry_url: str, *, binding_file_modes: bool = False) -> Gateway:
        prefix: list[str] = []
        if binding_file_modes and os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.fail("setpriv (util-linux) is needed to drop root's file-mode override")
            prefix = NO_DAC_OVERRIDE
        made.append(make_gateway(tmp_path, registry_url, prefix))
        return made[-1]

    yield make
    for gateway in made:
        gateway.stop()


def import_task(port: int) -> int:
    status, answer = call(port, "POST", f"/api/projects/{PROJECT}/import", [{"image": "gs://durable/a.jpg"}], ADMIN)
    assert status == 201, answer
    return answer["task_ids"][0]


def refused_while_down(gateway: Gateway, annotation_id: int, task_id: int) -> None:
    """The state every unavailable registry must produce: 503 JSON for writes, /readyz not ready,
    and one log line however many requests failed."""
    for attempt in range(3):
        status, answer = gateway.post(annotation_id + attempt, task_id)
        assert (status, answer["error"]) == (503, "registry_unavailable"), answer
    status, answer = call(gateway.port, "POST", f"/api/projects/{PROJECT}/import", [{"x": 1}], ADMIN)
    assert (status, answer["error"]) == (503, "registry_unavailable"), answer
    status, ready = gateway.ready()
    assert status == 503 and ready["checks"]["registry"].startswith("error"), ready
    assert gateway.log().count(UNAVAILABLE_LINE) == 1, gateway.log()


def versions(database: Path) -> dict[int, int]:
    with sqlite3.connect(database) as connection:
        return dict(connection.execute("SELECT id, version FROM annotations"))


@pytest.mark.slow
def test_a_removed_sqlite_file_stops_acknowledgements_and_a_restart_refuses_to_replace_it(gateway, tmp_path):
    database = tmp_path / "registry.db"
    node = gateway(f"sqlite:///{database}")
    node.serve()
    task = import_task(node.port)
    assert node.post(1, task)[0] == 200
    assert node.ready()[0] == 200
    backup = tmp_path / "backup.db"
    with sqlite3.connect(database) as source, sqlite3.connect(backup) as copy:
        source.backup(copy)  # what the operator will restore

    database.unlink()
    refused_while_down(node, 2, task)
    assert "was removed" in node.log()
    node.stop()

    process = node.start()  # the issue: a new, empty registry was created and served
    assert process.wait(timeout=30) != 0
    assert marker_for(database).exists()  # left by the first start, which created the registry
    assert "is missing" in node.log() and str(marker_for(database)) in node.log(), node.log()
    assert len(node.log().strip().splitlines()) == 1, node.log()  # one line, no traceback
    assert not database.exists()  # nothing created in its place

    shutil.copy(backup, database)  # restored: served again, with the acknowledged annotation
    node.serve()
    assert node.ready()[0] == 200
    assert versions(database) == {1: 1}
    assert node.post(1, task)[1]["versions"] == [2]


@pytest.mark.slow
def test_a_read_only_sqlite_file_is_unavailable_until_writable_again(gateway, tmp_path):
    database = tmp_path / "registry.db"
    node = gateway(f"sqlite:///{database}", binding_file_modes=True)
    node.serve()
    task = import_task(node.port)
    assert node.post(1, task)[0] == 200
    files = [path for path in tmp_path.glob("registry.db*") if path.suffix != ".created"]

    for path in files:
        path.chmod(0o444)
    refused_while_down(node, 2, task)
    assert "is read-only" in node.log()
    node.stop()
    process = node.start()  # and a start on a read-only registry says so in one line
    assert process.wait(timeout=30) != 0
    assert "[registry].url" in node.log() and "readonly" in node.log().replace("-", ""), node.log()

    for path in files:
        path.chmod(0o644)
    node.serve()
    assert node.ready()[0] == 200
    assert node.post(5, task)[0] == 200
    node.stop()
    assert versions(database) == {1: 1, 5: 1}  # acknowledged ones kept; refused ones never written


@pytest.mark.slow
def test_a_stopped_postgresql_is_unavailable_until_it_is_back(gateway, restartable_postgres):
    server, restart = restartable_postgres
    node = gateway(server.url(server.create_database()))
    node.serve()
    task = import_task(node.port)
    assert node.post(1, task)[0] == 200

    from .postgres import _stop

    _stop(server.process)
    refused_while_down(node, 2, task)

    restart()

    def recovered() -> bool:
        return node.ready()[0] == 200

    wait_until(recovered, 30, "the gateway to see PostgreSQL again")
    status, answer = node.post(1, task)
    assert status == 200 and answer["versions"] == [2], answer  # version 1 survived the outage
    assert "registry available again" in node.log()
    assert node.log().count(UNAVAILABLE_LINE) == 1, node.log()


async def test_ids_beyond_the_columns_are_unknown_not_an_outage(registry_url, caplog) -> None:
    """Found by tests/test_api_fuzz.py on PostgreSQL, where tasks.id is a 32-bit INTEGER: the
    driver refused task 999999999999999998, which was answered as an unavailable registry."""
    from gateway.registry import open_registry

    registry = open_registry(registry_url)
    try:
        [task] = await registry.add_tasks(PROJECT, [{"data": {"a": 1}}])
        for unknown in (2**31, 999_999_999_999_999_998):
            assert await registry.get_task(unknown) is None
            assert await registry.task_access(unknown) is None
        assert (await registry.get_task(task))["data"] == {"a": 1}
        assert registry.problem is None and UNAVAILABLE_LINE not in caplog.text
    finally:
        await registry.close()
