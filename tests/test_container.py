"""The container image as an operator runs it (issue 19), with podman: `make image` builds it
(tests/container/build.sh) on a locally debootstrapped Debian, this module starts it with a config
file, a local-directory storage and a volume for the SQLite registry, imports a task and mints a
token with the image's own CLI, fetches media, runs the HEALTHCHECK, and sends SIGTERM while a
stream is in flight. Without podman or the image these tests skip, and fail under CI=true.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.uris import encode_fileuri

from .conftest import free_port, wait_until
from .postgres import _missing

ROOT = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("GATEWAY_TEST_IMAGE", "localhost/media-gateway:test")
SECRET = "container-test-secret-0123456789abcdef0123456789"
PORT = 8081  # set only in the config file: the health check must find it there
MiB = 1024 * 1024


@dataclass
class Container:
    name: str
    volume: str
    port: int  # on the host
    directory: Path
    photo: bytes
    video: bytes
    env: dict[str, str]

    def podman(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        answer = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and answer.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: {answer.returncode}\n{answer.stdout}{answer.stderr}")
        return answer

    def once(self, *args: str) -> str:
        """A one-off `gateway …` in the image, with the server's config, volume and secret."""
        return self.podman("run", "--rm", *self.mounts(), IMAGE, *args).stdout

    def mounts(self) -> list[str]:
        return [
            f"--volume={self.directory / 'gateway.toml'}:/etc/gateway/gateway.toml:ro",
            f"--volume={self.directory / 'media'}:/media:ro",
            f"--volume={self.volume}:/var/lib/gateway",
            f"--env=GATEWAY_AUTH_SECRET={SECRET}",
        ]

    def request(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.headers), response.read()
        finally:
            conn.close()


def podman_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(ROOT / "tests" / "container" / "containers.conf"))
    return env


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    if shutil.which("podman") is None:
        _missing("podman is not installed", "`make image` as root installs podman, runc and debootstrap")
    env = podman_env()
    if subprocess.run(["podman", "image", "exists", IMAGE], env=env).returncode != 0:
        _missing(f"the image {IMAGE} is not built", "`make image` (as root)")
    directory = tmp_path_factory.mktemp("container")
    (directory / "media").mkdir()
    photo, video = os.urandom(300_000), os.urandom(48 * MiB)
    (directory / "media" / "photo.jpg").write_bytes(photo)
    (directory / "media" / "video.bin").write_bytes(video)
    (directory / "media" / "files").mkdir()
    (directory / "media" / "files" / "tasks.parquet").write_bytes(b"PAR1 a Parquet file")
    (directory / "gateway.toml").write_text(
        f"""
[server]
host = "0.0.0.0"
port = {PORT}
shutdown_timeout = 30.0

[registry]
url = "sqlite:////var/lib/gateway/registry.db"

[[storages]]
id = "media"
project = "1"
type = "local"
bucket = "media"
root = "/media"

[[storages]]
id = "task-files"
project = "2"
type = "local"
bucket = "media"
root = "/media"
prefix = "files/"
use_blob_urls = false
"""
    )
    tag = uuid.uuid4().hex[:8]
    world = Container(f"gateway-test-{tag}", f"gateway-test-{tag}", free_port(), directory, photo, video, env)
    world.podman("volume", "create", world.volume)
    try:
        yield world
    finally:
        world.podman("rm", "--force", "--volumes", world.name, check=False)
        world.podman("volume", "rm", "--force", world.volume, check=False)


@pytest.mark.parametrize(("lock", "extras"), [("requirements.lock", set()), ("requirements-parquet.lock", {"parquet"})])
def test_the_lock_files_pin_what_pyproject_asks(lock: str, extras: set[str]):
    """The image installs only the lock (`--no-deps` for the gateway itself): a dependency added to
    pyproject.toml without `make lock` would be missing from the image."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / lock).read_text().splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            name, version = line.split(" ")[0].split("==")
            pins[name.lower().replace("_", "-")] = version
            assert "--hash=sha256:" in (ROOT / lock).read_text().split(line, 1)[1].split("\n", 2)[1], line
    wanted = [Requirement(r) for r in project["dependencies"]]
    wanted += [Requirement(r) for extra in extras for r in project["optional-dependencies"][extra]]
    for requirement in wanted:
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{lock} lacks {name}: run `make lock`"
        assert requirement.specifier.contains(pins[name]), f"{lock}: {name}=={pins[name]} is not {requirement}"
    assert ("pyarrow" in pins) == ("parquet" in extras)


def test_the_image_is_built_as_the_issue_asks(container):
    (image,) = json.loads(container.podman("image", "inspect", IMAGE).stdout)
    config = image["Config"]
    assert config["User"] == "10001:10001"
    assert "/var/lib/gateway" in config["Volumes"]
    assert not [v for v in config["Env"] if v.startswith("GATEWAY_SERVER_")], config["Env"]
    assert image["Healthcheck"]["Test"] == ["CMD", "gateway", "health"]  # kept by --format docker
    assert config["Entrypoint"] == ["gateway"] and config["Cmd"] == ["serve"]
    ids = container.podman("run", "--rm", "--entrypoint=id", IMAGE).stdout
    assert ids.startswith("uid=10001(gateway) gid=10001(gateway)"), ids
    print(f"\n{IMAGE}: {image['Size'] / 1e6:.0f} MB")


def test_a_parquet_task_file_meets_the_image_without_pyarrow(container):
    """The default image leaves pyarrow out (154 MB of 407): a Parquet task file is then a file
    error naming what to install, and the rest of the sync goes on."""
    answer = container.podman("run", "--rm", *container.mounts(), IMAGE, "sync", "task-files", check=False)
    printed = answer.stdout + answer.stderr
    assert answer.returncode == 1, printed
    assert "completed_with_errors" in printed and "files/tasks.parquet" in printed, printed
    assert "needs pyarrow" in printed and "gcs-media-gateway[parquet]" in printed, printed


def test_serves_media_checks_health_and_drains_on_sigterm(container):
    tasks = container.directory / "media" / "tasks.json"
    tasks.write_text(json.dumps([{"data": {"image": "gs://media/photo.jpg", "video": "gs://media/video.bin"}}]))
    imported = json.loads(container.once("import", "--project", "1", "/media/tasks.json"))
    (task,) = imported["task_ids"]
    token = container.once("token", "--sub", "alice", "--task", str(task), "--ttl", "10m").strip()
    auth = {"Authorization": f"Bearer {token}"}

    container.podman(
        "run",
        "--detach",
        f"--name={container.name}",
        f"--publish=127.0.0.1:{container.port}:{PORT}",
        "--read-only",  # as deploy/kubernetes runs it: read-only root (podman mounts a tmpfs on /tmp)
        "--cap-drop=ALL",
        *container.mounts(),
        IMAGE,
        check=True,
    )

    def healthy() -> bool:
        state = container.podman("inspect", "--format", "{{.State.Running}}", container.name).stdout.strip()
        assert state == "true", container.podman("logs", container.name, check=False).stderr[-3000:]
        with contextlib.suppress(OSError):
            return container.request("/healthz")[0] == 200
        return False

    wait_until(healthy, timeout=60, what="the container's /healthz")
    assert container.podman("healthcheck", "run", container.name, check=False).returncode == 0

    photo = f"/tasks/{task}/resolve/?fileuri={encode_fileuri('gs://media/photo.jpg')}"
    status, _, body = container.request(photo, auth)
    assert status == 200 and body == container.photo
    status, headers, body = container.request(photo, auth | {"Range": "bytes=1000-1999"})
    assert status == 206 and body == container.photo[1000:2000]
    assert headers["Content-Range"] == f"bytes 1000-1999/{len(container.photo)}"
    status, _, body = container.request(photo)
    assert status == 401 and json.loads(body)["error"] == "missing_token"

    # SIGTERM while a stream is in flight: the client holds it open (reading nothing) until the
    # signal is sent, then reads the rest; the body must be whole and the container exit 0.
    video = f"/tasks/{task}/resolve/?fileuri={encode_fileuri('gs://media/video.bin')}"
    conn = http.client.HTTPConnection("127.0.0.1", container.port, timeout=30)
    try:
        conn.request("GET", video, headers=auth)
        response = conn.getresponse()
        assert response.status == 200
        digest, received = hashlib.sha256(), 0
        first = response.read(MiB)
        digest.update(first)
        received += len(first)
        container.podman("kill", "--signal=TERM", container.name)
        while chunk := response.read(MiB):
            digest.update(chunk)
            received += len(chunk)
    finally:
        conn.close()
    assert received == len(container.video), (
        received,
        container.podman("logs", container.name, check=False).stderr[-3000:],
    )
    assert digest.hexdigest() == hashlib.sha256(container.video).hexdigest()
    exit_code = container.podman("wait", container.name, timeout=60).stdout.strip()
    assert exit_code == "0", container.podman("logs", container.name, check=False).stderr[-3000:]
