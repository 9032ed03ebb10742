"""Several processes on one registry: two `gateway serve` replicas and `gateway worker` processes.

A storage created through one replica is synced by a separate worker process, its status read
through the other replica, and its tasks served by either; a worker killed in the middle of a
sync is replaced by another, which finishes the job with exactly one task per object; a worker
killed in the middle of annotation uploads is restarted and every annotation reaches the
bucket exactly once. Run on SQLite (one file, WAL) and on PostgreSQL.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .conftest import SECRET, Emulator, free_port, make_token, wait_until

pytestmark = pytest.mark.slow

PROJECT = "9"
ADMIN = {"Authorization": f"Bearer {make_token('ops', admin=True, ttl=3600)}"}


def service_account_json() -> tuple[str, str]:
    """A syntactically valid service-account key (never used against Google) and its key body."""
    pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        .decode()
    )
    info = {
        "type": "service_account",
        "project_id": "p",
        "private_key_id": "k1",
        "private_key": pem,
        "client_email": "sync@p.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    body = pem.splitlines()[1]  # a line of the key material itself
    return json.dumps(info), body


def call(port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, method=method, headers={**ADMIN, **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            return response.status, (
                json.loads(raw) if raw and response.headers.get_content_type().endswith("json") else raw
            )
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, json.loads(raw) if raw else None


@dataclass
class Processes:
    directory: Path
    config: Path
    env: dict[str, str]
    started: list[tuple[subprocess.Popen[bytes], Path]]

    def start(self, *args: str, name: str) -> subprocess.Popen[bytes]:
        log = self.directory / f"{name}.log"
        handle = log.open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", *args, "--config", str(self.config)],
            env=self.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started.append((process, log))
        return process

    def serve(self, name: str) -> int:
        port = free_port()
        self.start("serve", "--port", str(port), name=name)

        def healthy() -> bool:
            try:
                return call(port, "GET", "/healthz")[0] == 200
            except OSError:
                return False

        wait_until(healthy, 20, f"replica {name}")
        return port

    def logs(self) -> str:
        return "".join(log.read_text(errors="replace") for _, log in self.started)


@pytest.fixture
def cluster(tmp_path: Path, emulator: Emulator, registry_url: str) -> Iterator[Callable[..., Processes]]:
    made: list[Processes] = []

    def make(sections: dict[str, dict[str, Any]] | None = None, **sync: Any) -> Processes:
        settings = {"worker": False, "poll_interval": 0.1, "heartbeat_interval": 0.2, "stale_after": 1.0, **sync}
        lines = [
            "[registry]",
            f"url = {json.dumps(registry_url)}",
            'encryption_keys = ["test-encryption-key-0123456789abcdef"]',
            "storage_refresh = 0.2",
            "[sync]",
            *(f"{key} = {json.dumps(value)}" for key, value in settings.items()),
        ]
        for name, values in (sections or {}).items():
            lines += [f"[{name}]", *(f"{key} = {json.dumps(value)}" for key, value in values.items())]
        config = tmp_path / "gateway.toml"
        config.write_text("\n".join(lines) + "\n")
        env = {
            **os.environ,
            "GATEWAY_AUTH_SECRET": SECRET,
            "STORAGE_EMULATOR_HOST": emulator.host,
            "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        }
        processes = Processes(tmp_path, config, env, [])
        made.append(processes)
        return processes

    yield make
    for processes in made:
        for process, _ in processes.started:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process, _ in processes.started:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def seed_bucket(emulator: Emulator, count: int) -> tuple[str, dict[str, bytes]]:
    bucket = f"sync-{uuid.uuid4().hex[:12]}"
    emulator.create_bucket(bucket)
    objects = {f"img/{n:05d}.jpg": f"image {n}".encode() for n in range(count)}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: emulator.upload(bucket, item[0], item[1], "image/jpeg"), objects.items()))
    return bucket, objects


def wait_for_status(port: int, storage_id: int, statuses: set[str], timeout: float = 60) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def done() -> bool:
        status, body = call(port, "GET", f"/api/storages/gcs/{storage_id}")
        seen.update(body if status == 200 else {})
        return status == 200 and body["status"] in statuses

    wait_until(done, timeout, f"storage {storage_id} to reach {statuses}")
    return seen


def test_replicas_and_a_worker_share_one_registry(cluster, emulator: Emulator) -> None:
    bucket, objects = seed_bucket(emulator, 30)
    processes = cluster()
    first, second = processes.serve("replica-a"), processes.serve("replica-b")
    processes.start("worker", name="worker")
    credentials, key_material = service_account_json()

    status, created = call(
        first,
        "POST",
        "/api/storages/gcs",
        {
            "project": PROJECT,
            "title": "Images",
            "bucket": bucket,
            "prefix": "img",
            "google_application_credentials": credentials,
        },
    )
    assert status == 201, created
    storage_id = created["id"]
    assert created["has_credentials"] is True and "google_application_credentials" not in created

    # The other replica learns about the storage from the registry, then queues its sync.
    wait_until(lambda: call(second, "GET", f"/api/storages/gcs/{storage_id}")[0] == 200, 10, "replica b to see it")
    status, queued = call(second, "POST", f"/api/storages/gcs/{storage_id}/sync")
    assert status == 202 and queued["status"] in ("queued", "in_progress", "completed")
    done = wait_for_status(second, storage_id, {"completed", "completed_with_errors", "failed"})
    assert done["status"] == "completed", done
    assert done["meta"]["created"] == len(objects) and done["last_sync_count"] == len(objects)

    status, page = call(first, "GET", f"/api/projects/{PROJECT}/tasks?storage={storage_id}&page_size=100&resolve=true")
    assert status == 200 and page["total"] == len(objects)
    task = next(t for t in page["tasks"] if t["storage_filename"] == "img/00007.jpg")
    media = {"Authorization": f"Bearer {make_token(tasks=[task['id']])}"}
    status, body = call(second, "GET", task["data"]["$undefined$"], headers=media)
    assert status == 200 and body == objects["img/00007.jpg"]

    assert key_material not in processes.logs() and "BEGIN PRIVATE KEY" not in processes.logs()


def test_a_worker_killed_mid_sync_is_replaced_and_no_task_is_duplicated(cluster, emulator: Emulator) -> None:
    count = 400
    bucket, objects = seed_bucket(emulator, count)
    processes = cluster(page_size=4, batch_size=4)  # many small pages: the kill lands mid-sync
    api = processes.serve("replica")
    status, created = call(api, "POST", "/api/storages/gcs", {"project": PROJECT, "bucket": bucket, "prefix": "img"})
    assert status == 201, created
    storage_id = created["id"]
    doomed = processes.start("worker", name="doomed-worker")
    call(api, "POST", f"/api/storages/gcs/{storage_id}/sync")

    def imported() -> int:
        return call(api, "GET", f"/api/projects/{PROJECT}/tasks?storage={storage_id}&page_size=1")[1]["total"]

    wait_until(lambda: imported() >= 20, 30, "the first worker to import some tasks")
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait()
    partial = imported()
    assert 0 < partial < count, "the kill must land in the middle of the sync"
    assert call(api, "GET", f"/api/storages/gcs/{storage_id}")[1]["status"] == "in_progress"

    processes.start("worker", name="rescuer")  # re-queues the job once its heartbeat is stale
    done = wait_for_status(api, storage_id, {"completed", "completed_with_errors", "failed"})
    assert done["status"] == "completed", done
    assert done["meta"]["attempts"] == 2
    status, page = call(api, "GET", f"/api/projects/{PROJECT}/tasks?storage={storage_id}&page_size=1000")
    keys = [t["storage_filename"] for t in page["tasks"]]
    assert page["total"] == count and sorted(keys) == sorted(objects)  # each object once

    # The unchanged re-sync writes nothing.
    call(api, "POST", f"/api/storages/gcs/{storage_id}/sync")
    wait_until(
        lambda: call(api, "GET", f"/api/storages/gcs/{storage_id}")[1]["last_sync_job"] != done["last_sync_job"],
        10,
        "a new job",
    )
    again = wait_for_status(api, storage_id, {"completed", "completed_with_errors", "failed"})
    assert again["status"] == "completed"
    assert (again["meta"]["created"], again["meta"]["updated"], again["meta"]["removed"]) == (0, 0, 0)
    assert again["meta"]["listed"] == count


class UploadGate:
    """A forwarding proxy between the gateway's processes and the emulator that holds object
    uploads while `holding` is set (they are never forwarded: the uploading process dies first)
    and counts the uploads it did forward, per object name."""

    def __init__(self, emulator: Emulator) -> None:
        self.upstream = emulator.url.rstrip("/")
        self.holding = threading.Event()
        self.held = threading.Event()  # an upload is being held now
        self.forwarded: Counter[str] = Counter()
        gate = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def handle_one(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                upload = self.command == "POST" and self.path.startswith("/upload/")
                if upload and gate.holding.is_set():
                    gate.held.set()
                    threading.Event().wait(30)  # until the test ends; the client is killed meanwhile
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                request = urllib.request.Request(
                    gate.upstream + self.path, data=body or None, method=self.command, headers=headers
                )
                try:
                    with urllib.request.urlopen(request, timeout=10) as answer:
                        status, answer_headers, data = answer.status, answer.headers, answer.read()
                except urllib.error.HTTPError as exc:
                    status, answer_headers, data = exc.code, exc.headers, exc.read()
                if upload and status in (200, 201):
                    name = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)["name"][0]
                    gate.forwarded[name] += 1
                self.send_response(status)
                for name, value in answer_headers.items():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = handle_one

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_worker_killed_mid_upload_is_restarted_and_every_annotation_lands_once(cluster, emulator: Emulator) -> None:
    gate = UploadGate(emulator)
    try:
        bucket = f"export-{uuid.uuid4().hex[:12]}"
        emulator.create_bucket(bucket)
        hook_secret = "process-test-webhook-secret"
        processes = cluster(
            {
                "webhooks": {"secret": hook_secret},
                "export": {
                    "worker": False,
                    "poll_interval": 0.05,
                    "lease_seconds": 2.0,
                    "retry_base": 0.1,
                    "retry_max": 0.5,
                },
            }
        )
        processes.env["STORAGE_EMULATOR_HOST"] = gate.host
        api = processes.serve("replica")
        status, target = call(
            api, "POST", "/api/storages/export/gcs", {"project": PROJECT, "bucket": bucket, "prefix": "ann"}
        )
        assert status == 201, target
        ids = list(range(9001, 9021))
        payload = {
            "action": "ANNOTATIONS_CREATED",
            "project": {"id": PROJECT},
            "annotation": [{"id": a, "task": 90, "result": [{"value": {"choices": [str(a)]}}]} for a in ids],
            "task": [{"id": 90, "data": {"image": "gs://media/90.jpg"}}],
        }
        hook = {"X-Gateway-Webhook-Secret": hook_secret, "Content-Type": "application/json"}
        status, answer = call(api, "POST", "/api/webhooks/label-studio", payload, headers=hook)
        assert status == 200 and answer["count"] == len(ids), answer

        gate.holding.set()
        doomed = processes.start("worker", name="doomed-exporter")
        assert gate.held.wait(30), "the worker never started an upload"
        os.killpg(doomed.pid, signal.SIGKILL)  # mid-upload: its leases stay until they expire
        doomed.wait()
        assert not gate.forwarded  # nothing reached the bucket yet
        status, before = call(api, "GET", f"/api/storages/export/gcs/{target['id']}")
        assert before["meta"]["pending"] == len(ids) and before["status"] == "in_progress", before

        gate.holding.clear()
        processes.start("worker", name="restarted-exporter")

        def completed() -> bool:
            status, body = call(api, "GET", f"/api/storages/export/gcs/{target['id']}")
            return status == 200 and body["status"] == "completed"

        wait_until(completed, 60, "every annotation to be exported")
        done = call(api, "GET", f"/api/storages/export/gcs/{target['id']}")[1]
        assert done["meta"]["delivered"] == len(ids) and done["meta"]["pending"] == 0
        keys = {f"ann/{a}" for a in ids}
        assert set(gate.forwarded) == keys and set(gate.forwarded.values()) == {1}  # each exactly once
        for a in ids:
            blob = urllib.request.urlopen(f"{emulator.url}/storage/v1/b/{bucket}/o/ann%2F{a}?alt=media").read()
            assert json.loads(blob)["result"][0]["value"]["choices"] == [str(a)]
    finally:
        gate.close()
