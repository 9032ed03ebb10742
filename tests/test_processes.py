"""Process-level tests: the real `gateway serve` command in front of a real fake-gcs-server.

Each test writes a TOML config, registers a task with `gateway import`, starts `python -m gateway
serve` as its own process group and talks to it over TCP like a browser would. What they pin
down is what unit tests cannot see: resident memory while hundreds of MB stream through, the
upstream connections left behind by clients that walk away, metrics summed over forked workers,
and a graceful shutdown that finishes the stream in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.uris import encode_fileuri

from .conftest import PROJECT, SECRET, Emulator, free_port, make_token, wait_until

pytestmark = pytest.mark.slow

MiB = 1 << 20
BIG_SIZE = 220 * MiB
RSS_BOUND = 40 * MiB

# Imported by the gateway's interpreter (PYTHONPATH) in the multi-worker test: each forked
# multiprocessing child records its exit code, which only its parent (the supervisor) could see.
EXIT_RECORDER = """\
import multiprocessing.process
import os

_bootstrap = multiprocessing.process.BaseProcess._bootstrap


def _recording_bootstrap(self, *args, **kwargs):
    code = _bootstrap(self, *args, **kwargs)
    with open(os.path.join(os.environ["GATEWAY_TEST_EXIT_DIR"], str(os.getpid())), "w") as f:
        f.write(str(code))
    return code


multiprocessing.process.BaseProcess._bootstrap = _recording_bootstrap
"""


def stamped_blocks(count: int, seed: bytes) -> Iterator[bytes]:
    """`count` distinct 1 MiB blocks: one random block, each copy stamped with its index."""
    for index in range(count):
        yield index.to_bytes(8, "big") + seed[8:]


@dataclass(frozen=True)
class BigObject:
    bucket: str
    key: str
    size: int
    sha256: str
    seed: bytes
    small_key: str
    small: bytes

    def prefix_sha256(self, length: int) -> str:
        """sha256 of the first `length` bytes (a whole number of MiB)."""
        digest = hashlib.sha256()
        for block in stamped_blocks(length // MiB, self.seed):
            digest.update(block)
        return digest.hexdigest()


@pytest.fixture(scope="module")
def big_object(emulator: Emulator) -> BigObject:
    """220 MiB of stamped random blocks plus a 1 MiB warm-up object, uploaded once per module."""
    bucket = f"proc-big-{uuid.uuid4().hex[:10]}"
    emulator.create_bucket(bucket)
    seed = os.urandom(MiB)
    digest = hashlib.sha256()
    blocks = list(stamped_blocks(BIG_SIZE // MiB, seed))
    for block in blocks:
        digest.update(block)
    emulator.upload(bucket, "video/big.bin", b"".join(blocks), "application/octet-stream")
    del blocks
    small = os.urandom(MiB)
    emulator.upload(bucket, "video/small.bin", small, "application/octet-stream")
    return BigObject(bucket, "video/big.bin", BIG_SIZE, digest.hexdigest(), seed, "video/small.bin", small)


# ---------------------------------------------------------------- the gateway process


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    port: int
    bucket: str
    task: int
    directory: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def path(self, key: str, task: int | None = None) -> str:
        fileuri = encode_fileuri(f"gs://{self.bucket}/{key}")
        return f"/tasks/{self.task if task is None else task}/resolve/?fileuri={fileuri}"

    def auth(self, tasks: list[int] | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {make_token(tasks=[self.task] if tasks is None else tasks)}"}

    def raw_request(self, key: str) -> bytes:
        headers = "".join(f"{k}: {v}\r\n" for k, v in self.auth().items())
        return f"GET {self.path(key)} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n{headers}\r\n".encode()

    def workers(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss(self) -> int:
        total = 0
        for process in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += process.memory_info().rss
        return total

    def bytes_read(self) -> int:
        """Bytes the gateway has read through read(2): upstream socket traffic (libuv reads sockets with read)."""
        total = 0
        for process in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += process.io_counters().read_chars
        return total

    def upstream_connections(self, upstream_port: int) -> list[str]:
        """States of the TCP connections the gateway's processes hold to the emulator."""
        states = []
        for process in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                states += [
                    c.status for c in process.net_connections(kind="tcp") if c.raddr and c.raddr.port == upstream_port
                ]
        return states

    def request(
        self, path: str, headers: dict[str, str] | None = None, method: str = "GET"
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One request on a new connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        try:
            conn.request(method, path, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.headers, response.read()
        finally:
            conn.close()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, _, body = self.request("/metrics")
        assert status == 200
        return parse_metrics(body.decode())

    def healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"gateway exited with {self.process.returncode} at start:\n{self.log()}")
        try:
            return self.request("/healthz")[0] == 200
        except OSError:
            return False

    def log(self, tail: int = 4000) -> str:
        return (self.directory / "stderr.log").read_text(errors="replace")[-tail:]

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the process group (the supervisor forwards it to its workers), then kill by pid."""
        processes = self.tree()
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        for process in processes:  # psutil refuses to signal a reused pid
            with contextlib.suppress(psutil.Error):
                process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def toml_config(directory: Path, bucket: str, port: int) -> str:
    q = json.dumps  # a JSON string is a valid TOML basic string
    return f"""
[server]
host = "127.0.0.1"
port = {port}
shutdown_timeout = 30.0

[auth]
secret = {q(SECRET)}

[registry]
url = {q(f"sqlite:///{directory / 'r.db'}")}

[[storages]]
id = "media"
project = {q(PROJECT)}
type = "gcs"
bucket = {q(bucket)}
prefix = "video/"
"""


@pytest.fixture
def start_gateway(tmp_path: Path, emulator: Emulator) -> Iterator[Callable[..., Gateway]]:
    """Start `gateway serve` processes; every one is stopped at teardown, whatever the test did."""
    started: list[Gateway] = []

    def start(bucket: str, keys: list[str], workers: int = 1, env: dict[str, str] | None = None) -> Gateway:
        directory = tmp_path / f"gateway-{len(started)}"
        directory.mkdir()
        (directory / "tmp").mkdir()
        port = free_port()
        config = directory / "gateway.toml"
        config.write_text(toml_config(directory, bucket, port))
        tasks = directory / "tasks.json"
        tasks.write_text(json.dumps([{"data": {"media": [f"gs://{bucket}/{key}" for key in keys]}}]))
        imported = subprocess.run(
            [sys.executable, "-m", "gateway", "import", "--config", str(config), "--project", PROJECT, str(tasks)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert imported.returncode == 0, imported.stderr
        (task,) = json.loads(imported.stdout)["task_ids"]

        process_env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "PROMETHEUS_"))}
        # TMPDIR keeps the supervisor's PROMETHEUS_MULTIPROC_DIR (mkdtemp) inside tmp_path.
        process_env |= {"STORAGE_EMULATOR_HOST": emulator.host, "TMPDIR": str(directory / "tmp"), **(env or {})}
        command = [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port)]
        if workers > 1:
            command += ["--workers", str(workers)]
        with open(directory / "stdout.log", "wb") as out, open(directory / "stderr.log", "wb") as err:
            process = subprocess.Popen(
                command, env=process_env, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True
            )
        gateway = Gateway(process, port, bucket, task, directory)
        started.append(gateway)
        wait_until(gateway.healthy, timeout=30, what="gateway /healthz")
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


class RssSampler:
    """Samples the gateway tree's RSS every `interval` seconds from a background thread."""

    def __init__(self, gateway: Gateway, interval: float = 0.05) -> None:
        self._gateway, self._interval = gateway, interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.samples: list[int] = []

    def _run(self) -> None:
        while not self._stopped.is_set():
            self.samples.append(self._gateway.rss())
            self._stopped.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)

    @property
    def peak(self) -> int:
        return max(self.samples)


def warm_baseline(gateway: Gateway, obj: BigObject) -> int:
    """Fetch the small object twice (upstream session, caches, first-use allocations); then the RSS."""
    for _ in range(2):
        status, _, body = gateway.request(gateway.path(obj.small_key), gateway.auth())
        assert status == 200
        assert body == obj.small
    return gateway.rss()


# ---------------------------------------------------------------- 1. large stream, bounded memory


def test_large_stream_is_byte_exact_and_memory_stays_bounded(start_gateway, big_object):
    gateway = start_gateway(big_object.bucket, [big_object.key, big_object.small_key])
    baseline = warm_baseline(gateway, big_object)

    digest, received = hashlib.sha256(), 0
    started = time.monotonic()
    with RssSampler(gateway) as sampler:
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
        try:
            conn.request("GET", gateway.path(big_object.key), headers=gateway.auth())
            response = conn.getresponse()
            assert response.status == 200
            assert int(response.headers["Content-Length"]) == big_object.size
            while chunk := response.read(MiB):
                digest.update(chunk)
                received += len(chunk)
        finally:
            conn.close()
    seconds = time.monotonic() - started

    growth = sampler.peak - baseline
    print(
        f"\n220 MiB stream: {seconds:.2f} s ({big_object.size / MiB / seconds:.0f} MiB/s), "
        f"baseline RSS {baseline / MiB:.1f} MiB, peak {sampler.peak / MiB:.1f} MiB, "
        f"growth {growth / MiB:.1f} MiB over {len(sampler.samples)} samples"
    )
    assert received == big_object.size
    assert digest.hexdigest() == big_object.sha256
    assert len(sampler.samples) >= 3, "the transfer was too short to sample"
    assert growth < RSS_BOUND, f"gateway RSS grew by {growth / MiB:.1f} MiB while streaming 220 MiB"


def test_slow_reader_gets_backpressure_not_buffering(start_gateway, big_object):
    """A client reading 20 MiB slowly through a tiny receive window: the gateway must not pull
    (and hold) the rest of the 220 MiB object from upstream faster than the client takes it."""
    gateway = start_gateway(big_object.bucket, [big_object.key, big_object.small_key])
    baseline = warm_baseline(gateway, big_object)
    read_before = gateway.bytes_read()
    want, rate = 20 * MiB, 8 * MiB  # bytes to read, bytes per second

    digest, body = hashlib.sha256(), 0
    with RssSampler(gateway) as sampler, socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", gateway.port))
        sock.sendall(gateway.raw_request(big_object.key))
        head = b""
        while b"\r\n\r\n" not in head:
            piece = sock.recv(4096)
            assert piece, "connection closed before the response headers"
            head += piece
        head, _, rest = head.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        digest.update(rest)
        body = len(rest)
        started = time.monotonic()
        while body < want:
            piece = sock.recv(min(4096, want - body))
            assert piece, "the gateway closed the stream early"
            digest.update(piece)
            body += len(piece)
            ahead = body / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
        seconds = time.monotonic() - started
        pulled = gateway.bytes_read() - read_before
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    growth = sampler.peak - baseline
    print(
        f"\nslow reader: {body / MiB:.0f} MiB in {seconds:.2f} s, gateway read {pulled / MiB:.1f} MiB "
        f"from its sockets, RSS growth {growth / MiB:.1f} MiB (baseline {baseline / MiB:.1f} MiB)"
    )
    assert digest.hexdigest() == big_object.prefix_sha256(want)
    assert growth < RSS_BOUND, f"gateway RSS grew by {growth / MiB:.1f} MiB for a client that read 20 MiB"
    assert pulled < want + RSS_BOUND, f"the gateway pulled {pulled / MiB:.0f} MiB upstream for 20 MiB delivered"
    # The abandoned stream is torn down and the gateway keeps serving.
    wait_until(lambda: metric(gateway.metrics(), "gateway_active_streams") == 0, timeout=10, what="stream closed")
    assert gateway.request(gateway.path(big_object.small_key), gateway.auth())[2] == big_object.small


# ---------------------------------------------------------------- 2. disconnecting clients


async def open_and_abandon(gateway: Gateway, key: str, clients: int, concurrency: int, check: Callable[[], None]):
    """`clients` connections each get the headers and 4 KiB of body; all stay open while `check`
    runs, then each is reset (SO_LINGER 0) with most of the body unread."""
    gate = asyncio.Semaphore(concurrency)
    request = gateway.raw_request(key)
    writers: list[asyncio.StreamWriter] = []

    async def open_one() -> None:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writers.append(writer)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head[:200]
            await reader.readexactly(4096)

    try:
        async with asyncio.timeout(60):
            await asyncio.gather(*(open_one() for _ in range(clients)))
        await asyncio.to_thread(check)
    finally:
        for writer in writers:
            with contextlib.suppress(OSError):
                writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        await asyncio.sleep(0)


def test_clients_that_disconnect_mid_stream_leave_no_upstream_connection(start_gateway, emulator):
    bucket, key, clients = f"proc-abandon-{uuid.uuid4().hex[:10]}", "video/abandoned.bin", 200
    emulator.create_bucket(bucket)
    emulator.upload(bucket, key, b"".join(stamped_blocks(30, os.urandom(MiB))), "application/octet-stream")
    # 200 streams of one token: the per-subject cap (64 by default) is not what this test is about.
    gateway = start_gateway(bucket, [key], env={"GATEWAY_LIMITS_MAX_STREAMS_PER_SUBJECT": "0"})
    upstream_port = int(emulator.host.rsplit(":", 1)[1])
    assert gateway.upstream_connections(upstream_port) == []

    def all_streaming() -> None:
        # The measurement sees the streams it must later see gone.
        states = gateway.upstream_connections(upstream_port)
        assert states.count(psutil.CONN_ESTABLISHED) == clients, states
        assert metric(gateway.metrics(), "gateway_active_streams") == clients

    started = time.monotonic()
    asyncio.run(open_and_abandon(gateway, key, clients, concurrency=50, check=all_streaming))

    def upstream_closed() -> bool:
        return gateway.upstream_connections(upstream_port) == []

    try:
        wait_until(upstream_closed, timeout=15, what="upstream connections to close")
    except AssertionError:
        states = gateway.upstream_connections(upstream_port)
        raise AssertionError(f"{len(states)} upstream connections left open: {sorted(set(states))}") from None
    wait_until(lambda: metric(gateway.metrics(), "gateway_active_streams") == 0, timeout=10, what="active streams 0")
    print(f"\n{clients} abandoned streams cleaned up {time.monotonic() - started:.2f} s after the first connect")
    assert gateway.process.poll() is None
    # A client walking away is routine: the response is still accounted (metrics, access log) as
    # the 200 it was, and it is no server error.
    log = gateway.log(tail=10**8)
    errors = log.count("Error handling request")
    raised = sorted({line for line in log.splitlines() if line.startswith(("ConnectionError", "ConnectionResetError"))})
    assert errors == 0, f"{errors} client disconnects logged as server errors (tracebacks ending in {raised})"
    answered = metric(gateway.metrics(), "gateway_requests_total", route="task_resolve", mode="proxy", status="2xx")
    assert answered == clients, f"only {answered:.0f} of {clients} abandoned streams reached the request metrics"
    access_lines = (gateway.directory / "stdout.log").read_text().count('"path":"/tasks/')
    assert access_lines == clients, f"only {access_lines} of {clients} abandoned streams were access-logged"


# ---------------------------------------------------------------- 3. metrics across two workers


def test_metrics_are_summed_across_two_workers_and_shutdown_is_clean(start_gateway, emulator, tmp_path):
    bucket, key, size, requests = f"proc-metrics-{uuid.uuid4().hex[:10]}", "video/m.bin", 256 * 1024, 60
    data = os.urandom(size)
    emulator.create_bucket(bucket)
    emulator.upload(bucket, key, data, "application/octet-stream")
    recorder = tmp_path / "recorder"
    recorder.mkdir()
    (recorder / "sitecustomize.py").write_text(EXIT_RECORDER)
    exits = tmp_path / "exits"
    exits.mkdir()
    gateway = start_gateway(
        bucket, [key], workers=2, env={"PYTHONPATH": str(recorder), "GATEWAY_TEST_EXIT_DIR": str(exits)}
    )

    def workers_listening() -> bool:
        workers = gateway.workers()
        return len(workers) == 2 and all(
            any(c.status == psutil.CONN_LISTEN and c.laddr.port == gateway.port for c in w.net_connections("tcp"))
            for w in workers
        )

    wait_until(workers_listening, timeout=20, what="two workers listening")
    workers = gateway.workers()
    worker_pids = {w.pid for w in workers}

    def answered_by(path: str, headers: dict[str, str]) -> tuple[int, bytes, int]:
        """One request on a new kept-alive connection; the worker is the one holding its server end."""
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=20)
        try:
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            body = response.read()
            client_port = conn.sock.getsockname()[1]
            owners = [
                w.pid
                for w in workers
                for c in w.net_connections("tcp")
                if c.raddr and c.raddr.port == client_port and c.laddr.port == gateway.port
            ]
            assert len(owners) == 1, owners
            return response.status, body, owners[0]
        finally:
            conn.close()

    served: dict[int, int] = dict.fromkeys(worker_pids, 0)
    for _ in range(requests):
        status, body, owner = answered_by(gateway.path(key), gateway.auth())
        assert status == 200
        assert body == data
        served[owner] += 1
    refusals = [
        ({}, 401, "missing_token"),
        ({}, 401, "missing_token"),
        ({}, 401, "missing_token"),
        ({"Authorization": f"Bearer {make_token(key='x' * 40, tasks=[gateway.task])}"}, 401, "invalid_token"),
        ({"Authorization": f"Bearer {make_token(key='y' * 40, tasks=[gateway.task])}"}, 401, "invalid_token"),
        (gateway.auth(tasks=[gateway.task + 1000]), 403, "no_grant"),
        (gateway.auth(tasks=[gateway.task + 1001]), 403, "no_grant"),
        (gateway.auth(tasks=[gateway.task + 1002]), 403, "no_grant"),
        (gateway.auth(tasks=[gateway.task + 1003]), 403, "no_grant"),
    ]
    for headers, expected_status, reason in refusals:
        status, body, owner = answered_by(gateway.path(key), headers)
        assert status == expected_status
        assert json.loads(body)["error"] == reason
        served[owner] += 1
    print(f"\nrequests per worker: {served}")
    assert all(count > 0 for count in served.values()), f"SO_REUSEPORT did not spread connections: {served}"

    reasons = {"missing_token": 3, "invalid_token": 2, "no_grant": 4}

    def check(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> None:
        def count(**labels: str) -> float:
            return metric(samples, "gateway_requests_total", route="task_resolve", mode="proxy", **labels)

        assert count(status="2xx") == requests
        assert count(status="4xx") == len(refusals)
        for reason, expected in reasons.items():
            assert metric(samples, "gateway_auth_failures_total", reason=reason) == expected, reason
        failures = sum(v for (name, _), v in samples.items() if name == "gateway_auth_failures_total")
        assert failures == len(refusals)
        assert metric(samples, "gateway_response_bytes_total", route="task_resolve") >= requests * size
        assert metric(samples, "gateway_active_streams") == 0

    def converged() -> bool:  # the access logger counts a response just after its last byte is sent
        try:
            check(gateway.metrics())
            return True
        except AssertionError:
            return False

    wait_until(converged, timeout=10, what="metrics to count every request")
    scrapes: dict[int, int] = dict.fromkeys(worker_pids, 0)
    for _ in range(40):  # until each worker has answered at least two scrapes
        status, body, owner = answered_by("/metrics", {})
        assert status == 200
        check(parse_metrics(body.decode()))
        scrapes[owner] += 1
        if min(scrapes.values()) >= 2:
            break
    print(f"scrapes per worker: {scrapes}")
    assert min(scrapes.values()) >= 2, scrapes

    started = time.monotonic()
    gateway.process.send_signal(signal.SIGTERM)
    assert gateway.process.wait(timeout=20) == 0, gateway.log()
    _, alive = psutil.wait_procs(workers, timeout=5)
    print(f"supervisor and workers exited {time.monotonic() - started:.2f} s after SIGTERM")
    assert not alive
    recorded = {int(p.name): int(p.read_text()) for p in exits.iterdir()}
    assert recorded == dict.fromkeys(worker_pids, 0), gateway.log()
    assert "Traceback" not in gateway.log(tail=10**8)


# ---------------------------------------------------------------- 4. graceful shutdown


def test_sigterm_lets_the_running_stream_finish_and_closes_the_listener(start_gateway, emulator):
    bucket, key, size = f"proc-drain-{uuid.uuid4().hex[:10]}", "video/drain.bin", 50 * MiB
    seed = os.urandom(MiB)
    data = b"".join(stamped_blocks(size // MiB, seed))
    expected = hashlib.sha256(data).hexdigest()
    emulator.create_bucket(bucket)
    emulator.upload(bucket, key, data, "application/octet-stream")
    del data
    gateway = start_gateway(bucket, [key])

    progress = {"received": 0, "done": False, "error": None, "status": None}
    digest = hashlib.sha256()

    def read_steadily(rate: int = 16 * MiB) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
        try:
            conn.request("GET", gateway.path(key), headers=gateway.auth())
            response = conn.getresponse()
            progress["status"] = response.status
            started = time.monotonic()
            while chunk := response.read(256 * 1024):
                digest.update(chunk)
                progress["received"] += len(chunk)
                ahead = progress["received"] / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        except Exception as exc:
            progress["error"] = exc
        finally:
            conn.close()
            progress["done"] = True

    reader = threading.Thread(target=read_steadily, daemon=True)
    reader.start()
    wait_until(lambda: progress["received"] >= 8 * MiB, timeout=20, what="the stream to get going")
    os.kill(gateway.pid, signal.SIGTERM)
    signalled_at, received_at_signal = time.monotonic(), progress["received"]

    def listener_closed() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", gateway.port), timeout=1) as probe:
                probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                return not probe.recv(64).startswith(b"HTTP/1.1 200")
        except ConnectionRefusedError:
            return True
        except (TimeoutError, ConnectionResetError):
            return True  # accepted by the kernel but never answered

    wait_until(listener_closed, timeout=5, what="the listener to close after SIGTERM")
    closed_at, stream_running = time.monotonic(), not progress["done"]
    reader.join(timeout=30)
    assert not reader.is_alive(), "the client never finished reading"
    print(
        f"\nSIGTERM after {received_at_signal / MiB:.1f} MiB; listener closed {closed_at - signalled_at:.2f} s later; "
        f"stream finished {time.monotonic() - signalled_at:.2f} s after SIGTERM"
    )
    assert progress["error"] is None, progress["error"]
    assert progress["status"] == 200
    assert received_at_signal < size
    assert stream_running, "the stream had already ended when the listener closed: nothing was in flight"
    assert progress["received"] == size
    assert digest.hexdigest() == expected
    assert gateway.process.wait(timeout=15) == 0, gateway.log()
