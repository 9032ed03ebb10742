"""The drop-in for Label Studio (issue 9), against a real Label Studio 1.23 behind nginx.

Label Studio runs from its own virtual environment (`make label-studio`; LABEL_STUDIO_VENV) on
loopback with analytics, version checks and Sentry off, its GCS storages pointed at
fake-gcs-server. The nginx front is config/label-studio.nginx.conf, as shipped: Label Studio's
resolve URLs go to a `gateway serve` process whose `label_studio` authenticator asks Label
Studio who may read what. A project and a GCS source storage are created and synced through
Label Studio's own API; media is then loaded through the front with Label Studio's credentials.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from gateway.labelstudio_ssrf import label_studio_env
from gateway.uris import encode_fileuri

from .conftest import CHROMIUM, CHROMIUM_FLAGS, SECRET, Emulator, free_port, wait_until
from .required import missing

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
LS_VERSION = "1.23.2"
LS_VENV = Path(
    os.environ.get("LABEL_STUDIO_VENV") or Path.home() / ".cache" / "gcs-media-gateway" / f"label-studio-{LS_VERSION}"
)
ADMIN_EMAIL, ADMIN_PASSWORD = "admin@example.com", "admin-password-123"
OUTSIDER_EMAIL, OUTSIDER_PASSWORD = "outsider@example.com", "outsider-password-123"
ADMIN_TOKEN = "0123456789abcdef0123456789abcdef01234567"  # Label Studio's legacy API token
IMAGE = os.urandom(200_000)


def png(width: int, height: int) -> bytes:
    """A real image (solid colour) for the pages that render one."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    rows = b"".join(b"\x00" + bytes((200, 40, 40)) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


PICTURE = png(320, 240)
WEBHOOK_SECRET = "webhook-secret-for-the-drop-in-tests"
PREFIX = "annotations"  # the same prefix for Label Studio's own target storage and the gateway's
WEBHOOK_ACTIONS = ["ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"]
NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")


def http(
    url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None, form: bool = False
) -> tuple[int, Message, bytes]:
    """One request, no redirects followed; (status, headers, body)."""
    data = None
    headers = dict(headers or {})
    if body is not None and form:
        data = "&".join(f"{k}={urllib.request.quote(str(v))}" for k, v in body.items()).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    elif body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *_args: Any, **_kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def cookies(headers: Message) -> dict[str, str]:
    """The session and CSRF cookies Label Studio set."""
    found = {}
    for line in headers.get_all("Set-Cookie") or []:
        for name in ("sessionid", "csrftoken"):
            match = re.search(rf"{name}=([^;]+)", line)
            if match:
                found[name] = match.group(1)
    return found


@dataclass
class LabelStudio:
    """A Label Studio server process on loopback (stopped and started again by one test)."""

    directory: Path
    emulator: Emulator
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "LABEL_STUDIO_BASE_DATA_DIR": str(self.directory),
            "COLLECT_ANALYTICS": "false",
            "LATEST_VERSION_CHECK": "false",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
            "LOG_LEVEL": "WARNING",
            # The README's SSRF configuration: protection on, only the gateway's address let through.
            "SSRF_PROTECTION_ENABLED": "true",
            **label_studio_env(["127.0.0.1"]),
            "STORAGE_EMULATOR_HOST": self.emulator.url,
            "RESOLVER_PROXY_GCS_DOWNLOAD_URL": self.emulator.url
            + "/download/storage/v1/b/{bucket_name}/o/{blob_name}?alt=media",
        }

    def start(self) -> None:
        log = (self.directory / "label-studio.log").open("ab")
        self.process = subprocess.Popen(
            [
                str(LS_VENV / "bin" / "label-studio"),
                "start",
                "--no-browser",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.directory),
                "--username",
                ADMIN_EMAIL,
                "--password",
                ADMIN_PASSWORD,
                "--user-token",
                ADMIN_TOKEN,
            ],
            env=self.env,
            cwd=self.directory,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(self.healthy, 300, "Label Studio to start (migrations on the first start)")

    def healthy(self) -> bool:
        assert self.process is not None
        assert self.process.poll() is None, self.log()
        try:
            return http(f"{self.url}/health")[0] == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def log(self) -> str:
        return (self.directory / "label-studio.log").read_text(errors="replace")[-3000:]

    def login(self, email: str, password: str, base: str | None = None) -> str:
        """A session cookie, from Label Studio's own login form."""
        base = base or self.url
        status, headers, _ = http(f"{base}/user/login/")
        assert status == 200, status
        csrf = cookies(headers)["csrftoken"]
        status, headers, body = http(
            f"{base}/user/login/",
            "POST",
            {"csrfmiddlewaretoken": csrf, "email": email, "password": password},
            {"Cookie": f"csrftoken={csrf}", "Referer": f"{base}/user/login/"},
            form=True,
        )
        assert status == 302, body[:300]
        return cookies(headers)["sessionid"]

    def api(self, method: str, path: str, body: Any = None, **headers: str) -> Any:
        headers.setdefault("Authorization", f"Token {ADMIN_TOKEN}")
        status, _, raw = http(f"{self.url}{path}", method, body, headers)
        assert 200 <= status < 300, f"{method} {path}: {status} {raw[:500]!r}"
        return json.loads(raw) if raw else None

    def enable_api_tokens(self) -> str:
        """New organisations refuse legacy API tokens: switch them on, as an admin would. The
        admin's session cookie."""
        session = self.login(ADMIN_EMAIL, ADMIN_PASSWORD)
        csrf = cookies(http(f"{self.url}/user/login/")[1])["csrftoken"]
        self.api(
            "POST",
            "/api/jwt/settings",
            {"api_tokens_enabled": True, "legacy_api_tokens_enabled": True},
            Authorization="",
            Cookie=f"sessionid={session}; csrftoken={csrf}",
            **{"X-CSRFToken": csrf, "Referer": f"{self.url}/"},
        )
        return session

    def synced_project(self, bucket: str, prefix: str) -> tuple[int, list[dict[str, Any]]]:
        """A project with a GCS source storage in proxy mode (Label Studio streams the objects
        itself), synced: the project id and its tasks with their data as stored."""
        config = (
            '<View><Image name="image" value="$image"/>'
            '<Choices name="c" toName="image"><Choice value="a"/></Choices>'
            '<RectangleLabels name="box" toName="image"><Label value="thing"/></RectangleLabels></View>'
        )
        project = self.api("POST", "/api/projects/", {"title": "Gateway drop-in", "label_config": config})["id"]
        fields = {"project": project, "bucket": bucket, "prefix": prefix, "use_blob_urls": True, "presign": False}
        storage = self.api("POST", "/api/storages/gcs/", fields)
        self.api("POST", f"/api/storages/gcs/{storage['id']}/sync")
        return project, self.api("GET", f"/api/tasks/?project={project}&resolve_uri=false")["tasks"]

    def manage(self, script: str) -> None:
        """Run Python with Label Studio's Django set up on its database."""
        prelude = textwrap.dedent(
            """
            import os, sys
            import label_studio
            sys.path.insert(0, os.path.dirname(label_studio.__file__))
            os.environ.setdefault("DJANGO_SETTINGS_MODULE", "core.settings.label_studio")
            import django
            django.setup()
            """
        )
        subprocess.run(
            [str(LS_VENV / "bin" / "python"), "-c", prelude + textwrap.dedent(script)],
            env=self.env,
            cwd=self.directory,
            check=True,
            timeout=120,
            capture_output=True,
        )


@dataclass
class Front:
    ls: LabelStudio
    front: str  # nginx: Label Studio and the gateway behind one origin
    gateway: str  # the gateway itself (for /metrics)
    bucket: str
    project: int
    tasks: dict[str, int]  # object key -> Label Studio task id
    admin_session: str
    outsider_session: str
    gateway_log: Path
    emulator: Emulator
    ls_target: str  # the bucket Label Studio's own GCS target storage writes to
    gateway_target: str  # the bucket the gateway's target storage writes to
    ls_target_storage: int  # Label Studio's id of its own target storage

    def resolve(self, key: str, task: int | None = None, bucket: str | None = None) -> str:
        fileuri = encode_fileuri(f"gs://{bucket or self.bucket}/{key}")
        return f"{self.front}/tasks/{task or self.tasks[key]}/resolve/?fileuri={fileuri}"

    def checks(self, result: str) -> float:
        _, _, body = http(f"{self.gateway}/metrics")
        match = re.search(rf'^gateway_label_studio_checks_total{{result="{result}"}} (\S+)$', body.decode(), re.M)
        return float(match.group(1)) if match else 0.0


def _require_tools() -> None:
    tools = (("Label Studio", (LS_VENV / "bin" / "label-studio").exists()), ("nginx", NGINX is not None))
    absent = [name for name, ok in tools if not ok]
    if absent:
        message = f"{' and '.join(absent)} not installed (`make label-studio nginx`; LABEL_STUDIO_VENV={LS_VENV})"
        missing(message)


@pytest.fixture(scope="module")
def front(emulator: Emulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    _require_tools()
    directory = tmp_path_factory.mktemp("label-studio")
    bucket = f"ls-{uuid.uuid4().hex[:12]}"
    emulator.create_bucket(bucket)
    for key in ("img/a.jpg", "img/b.jpg"):
        emulator.upload(bucket, key, IMAGE, "image/jpeg")
    emulator.upload(bucket, "img/c.png", PICTURE, "image/png")
    emulator.upload(bucket, "private/secret.jpg", b"no task references this", "image/jpeg")

    ls = LabelStudio(directory / "ls", emulator)
    ls.directory.mkdir()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        ls.start()
        session = ls.enable_api_tokens()
        project, listed = ls.synced_project(bucket, "img")
        tasks = {t["data"]["image"].removeprefix(f"gs://{bucket}/"): t["id"] for t in listed}
        assert sorted(tasks) == ["img/a.jpg", "img/b.jpg", "img/c.png"], listed
        ls.manage(
            f"""
            from organizations.models import Organization
            from users.models import User
            user = User.objects.create_user(email={OUTSIDER_EMAIL!r}, password={OUTSIDER_PASSWORD!r})
            user.username = "outsider"
            user.active_organization = Organization.create_organization(created_by=user, title="Elsewhere")
            user.save()
            """
        )
        outsider = ls.login(OUTSIDER_EMAIL, OUTSIDER_PASSWORD)
        ls_target, gateway_target = f"{bucket}-ls-target", f"{bucket}-gw-target"
        for name in (ls_target, gateway_target, f"{ls_target}-tasks", f"{gateway_target}-tasks"):
            emulator.create_bucket(name)
        # Label Studio's own GCS target storage, beside the gateway's: the two objects are compared.
        target = ls.api("POST", "/api/storages/export/gcs", {"project": project, "bucket": ls_target, "prefix": PREFIX})

        # The gateway, a real process, serving the bucket for Label Studio's project.
        gateway_port = free_port()
        config_file = directory / "gateway.toml"
        config_file.write_text(
            textwrap.dedent(
                f"""
                [registry]
                url = "sqlite:///{directory / "registry.db"}"
                [label_studio]
                url = "{ls.url}"
                api_token = "{ADMIN_TOKEN}"
                cache_ttl = 30.0
                negative_cache_ttl = 2.0
                [webhooks]
                secret = "{WEBHOOK_SECRET}"
                [export]
                retry_base = 0.2
                retry_max = 2.0
                [[export_storages]]
                id = "annotations"
                project = "{project}"
                type = "gcs"
                bucket = "{gateway_target}"
                prefix = "{PREFIX}"
                can_delete_objects = true
                [[export_storages]]
                id = "tasks"
                project = "{project}"
                type = "gcs"
                bucket = "{gateway_target}-tasks"
                prefix = "{PREFIX}"
                layout = "task"
                json_extension = true
                [[storages]]
                id = "label-studio-media"
                project = "{project}"
                type = "gcs"
                bucket = "{bucket}"
                """
            )
        )
        env = {**os.environ, "GATEWAY_AUTH_SECRET": SECRET, "STORAGE_EMULATOR_HOST": emulator.host}
        env["PYTHONPATH"] = str(ROOT)
        gateway_log = (directory / "gateway.log").open("wb")
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(config_file), "--port", str(gateway_port)],
                env=env,
                stdout=gateway_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        gateway = f"http://127.0.0.1:{gateway_port}"
        wait_until(lambda: _up(f"{gateway}/healthz"), 30, "the gateway")

        # The README's webhook step, through Label Studio's own API (its SSRF check included).
        ls.api(
            "POST",
            "/api/webhooks/",
            {
                "project": project,
                "url": f"{gateway}/api/webhooks/label-studio",
                "headers": {"X-Gateway-Webhook-Secret": WEBHOOK_SECRET},
                "send_payload": True,
                "send_for_all_actions": False,
                "actions": WEBHOOK_ACTIONS,
            },
        )

        front_port = free_port()
        processes.append(start_front(directory / "nginx", gateway_port, ls.port, front_port))
        front_url = f"http://127.0.0.1:{front_port}"
        yield Front(
            ls,
            front_url,
            gateway,
            bucket,
            project,
            tasks,
            session,
            outsider,
            directory / "gateway.log",
            emulator,
            ls_target,
            gateway_target,
            target["id"],
        )
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=20)
        ls.stop()


def start_front(
    directory: Path, gateway: int, label_studio: int, port: int, extra: str = ""
) -> subprocess.Popen[bytes]:
    """nginx with the shipped recipe (config/label-studio.nginx.conf), only its ports changed, and
    `extra` server blocks beside it; returns once it answers on `port`."""
    recipe = (ROOT / "config" / "label-studio.nginx.conf").read_text()
    recipe = recipe.replace("127.0.0.1:8080", f"127.0.0.1:{gateway}").replace(
        "127.0.0.1:8081", f"127.0.0.1:{label_studio}"
    )
    recipe = recipe.replace("listen 127.0.0.1:8000", f"listen 127.0.0.1:{port}")
    directory.mkdir()
    (directory / "front.conf").write_text(recipe + extra)
    (directory / "nginx.conf").write_text(
        textwrap.dedent(
            f"""
            worker_processes 2;
            daemon off;
            pid {directory}/nginx.pid;
            error_log {directory}/error.log warn;
            events {{ worker_connections 1024; }}
            http {{
                access_log off;
                client_body_temp_path {directory}/body;
                proxy_temp_path {directory}/proxy;
                fastcgi_temp_path {directory}/fastcgi;
                uwsgi_temp_path {directory}/uwsgi;
                scgi_temp_path {directory}/scgi;
                include {directory}/front.conf;
            }}
            """
        )
    )
    assert NGINX is not None
    process = subprocess.Popen(
        [NGINX, "-p", str(directory), "-c", str(directory / "nginx.conf")],
        stdout=subprocess.DEVNULL,
        stderr=(directory / "stderr.log").open("wb"),
        start_new_session=True,
    )
    try:
        wait_until(lambda: _up(f"http://127.0.0.1:{port}/health"), 30, "nginx")
    except BaseException:
        process.terminate()
        raise
    return process


def _up(url: str) -> bool:
    try:
        return http(url)[0] == 200
    except OSError:
        return False


def session(front: Front, which: str = "admin") -> dict[str, str]:
    value = front.admin_session if which == "admin" else front.outsider_session
    return {"Cookie": f"sessionid={value}"}


# -- the tests ---------------------------------------------------------------------------------


def test_a_project_members_session_gets_bytes_from_the_gateway(front: Front) -> None:
    allowed, cached = front.checks("allowed"), front.checks("cached")
    url = front.resolve("img/a.jpg")
    status, headers, body = http(url, headers=session(front))
    assert status == 200 and body == IMAGE
    assert "X-Request-ID" in headers  # the gateway answered, not Label Studio's own proxy
    etag = headers["ETag"]

    status, headers, body = http(url, headers={**session(front), "Range": "bytes=-2"})
    assert status == 206 and body == IMAGE[-2:]
    assert headers["Content-Range"] == f"bytes {len(IMAGE) - 2}-{len(IMAGE) - 1}/{len(IMAGE)}"
    status, headers, body = http(url, "HEAD", headers=session(front))
    assert status == 200 and body == b"" and headers["Content-Length"] == str(len(IMAGE))
    status, _, body = http(url, headers={**session(front), "Range": "bytes=0-9", "If-Range": '"stale-etag"'})
    assert status == 200 and body == IMAGE  # a stale If-Range gets the whole, current object
    status, _, body = http(url, headers={**session(front), "Range": "bytes=0-9", "If-Range": etag})
    assert status == 206 and body == IMAGE[:10]

    # A video's many range requests: one question to Label Studio, the rest from the cache.
    for start in range(0, 100_000, 10_000):
        status, _, body = http(url, headers={**session(front), "Range": f"bytes={start}-{start + 9}"})
        assert status == 206 and body == IMAGE[start : start + 10]
    assert front.checks("allowed") == allowed + 1
    assert front.checks("cached") >= cached + 14

    # Project-level resolve: any object inside a gateway storage of the project.
    fileuri = encode_fileuri(f"gs://{front.bucket}/img/b.jpg")
    status, _, body = http(f"{front.front}/projects/{front.project}/resolve/?fileuri={fileuri}", headers=session(front))
    assert status == 200 and body == IMAGE


def test_label_studio_api_tokens_and_jwt_access_tokens(front: Front) -> None:
    url = front.resolve("img/b.jpg")
    status, _, body = http(url, headers={"Authorization": f"Token {ADMIN_TOKEN}"})
    assert status == 200 and body == IMAGE
    refresh = front.ls.api(
        "POST",
        "/api/token/",
        Authorization="",
        Cookie=f"sessionid={front.admin_session}; csrftoken=x",
        **{"X-CSRFToken": "x", "Referer": f"{front.ls.url}/"},
    )["token"]
    access = front.ls.api("POST", "/api/token/refresh/", {"refresh": refresh}, Authorization="")["access"]
    status, _, body = http(url, headers={"Authorization": f"Bearer {access}"})
    assert status == 200 and body == IMAGE


def test_who_may_not_read(front: Front) -> None:
    url = front.resolve("img/a.jpg")
    status, _, body = http(url, headers=session(front, "outsider"))
    assert status == 403 and json.loads(body)["error"] == "label_studio_denied"
    status, _, body = http(url)
    assert status == 401
    status, _, body = http(url, headers={"Authorization": "Token not-a-real-token"})
    assert status in (401, 403) and json.loads(body)["error"].startswith("label_studio")
    # An object of the bucket that the task does not reference: Label Studio's own proxy serves
    # it to any member; the gateway does not.
    status, _, body = http(front.resolve("private/secret.jpg", task=front.tasks["img/a.jpg"]), headers=session(front))
    assert status == 403 and json.loads(body)["error"] == "not_referenced"
    status, _, body = http(front.resolve("img/b.jpg", task=front.tasks["img/a.jpg"]), headers=session(front))
    assert status == 403 and json.loads(body)["error"] == "not_referenced"
    fileuri = encode_fileuri(f"gs://{front.bucket}/img/a.jpg")
    status, _, _ = http(
        f"{front.front}/projects/{front.project}/resolve/?fileuri={fileuri}", headers=session(front, "outsider")
    )
    assert status == 403


def test_concurrent_first_requests_share_one_label_studio_call(front: Front) -> None:
    """A player opening a video sends several ranges at once; they wait for one decision."""
    url = front.resolve("img/b.jpg")
    # A credential the gateway has not seen for this task: the admin's session in a new login.
    fresh = {"Cookie": f"sessionid={front.ls.login(ADMIN_EMAIL, ADMIN_PASSWORD)}"}
    allowed = front.checks("allowed")
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda n: http(url, headers={**fresh, "Range": f"bytes={n}-{n}"}), range(8)))
    assert [(status, body) for status, _, body in answers] == [(206, IMAGE[n : n + 1]) for n in range(8)]
    assert front.checks("allowed") == allowed + 1


def test_credentials_are_never_logged(front: Front) -> None:
    http(front.resolve("img/a.jpg"), headers=session(front))
    http(front.resolve("img/a.jpg"), headers={"Authorization": f"Token {ADMIN_TOKEN}"})
    log = (front.gateway_log).read_text(errors="replace")
    assert f"/tasks/{front.tasks['img/a.jpg']}/resolve/" in log  # the access log is on
    for secret in (front.admin_session, front.outsider_session, ADMIN_TOKEN):
        assert secret not in log


def test_label_studio_down_is_503_and_recovery(front: Front) -> None:
    url = front.resolve("img/b.jpg")  # not asked with this session yet: not in the cache
    front.ls.stop()
    try:
        status, _, body = http(url, headers=session(front))
        assert status == 503 and json.loads(body)["error"] == "label_studio_unavailable"
    finally:
        front.ls.start()
    status, _, body = http(url, headers=session(front))
    assert status == 200 and body == IMAGE


def test_a_browser_logs_in_through_the_front_and_gets_media_from_the_gateway(front: Front) -> None:
    """Label Studio's login form in chromium, through the shipped recipe on a non-default port: the
    browser sends `Origin: http://127.0.0.1:PORT`, which Django's CSRF check compares with the
    Host the front passes on (urllib's logins send no Origin and cannot see a dropped port)."""
    if not os.path.exists(CHROMIUM):
        missing("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            posts: list[int] = []
            page.on("response", lambda r: r.request.method == "POST" and posts.append(r.status))
            page.goto(f"{front.front}/user/login/")
            page.fill("#email", ADMIN_EMAIL)
            page.fill("#password", ADMIN_PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_load_state()
            assert posts == [302], posts  # 403 when the front drops the port from Host
            assert "/user/login" not in page.url
            assert any(c["name"] == "sessionid" for c in page.context.cookies())
            media = page.goto(front.resolve("img/a.jpg"))
            assert media is not None and media.status == 200 and media.body() == IMAGE
            assert "x-request-id" in media.headers  # the gateway's answer, with the browser's own session

            # The gateway's viewer, through the same front, opened by Label Studio's session alone.
            task = front.tasks["img/c.png"]
            with page.expect_response(lambda r: "/resolve/" in r.url) as resolved:
                page.goto(f"{front.front}/view/tasks/{task}")
            assert resolved.value.status == 200 and resolved.value.body() == PICTURE
            assert "x-request-id" in resolved.value.headers
            page.wait_for_function("() => document.querySelector('#media img')?.naturalWidth === 320")
            listing = page.request.get(f"{front.front}/view/tasks/{task}/media").json()
            assert [(m["field"], m["kind"], m["name"]) for m in listing["media"]] == [("image", "image", "c.png")]
            # Another task's listing is Label Studio's decision too: the outsider's session is refused.
            refused = http(f"{front.front}/view/tasks/{task}/media", headers=session(front, "outsider"))
            assert refused[0] == 403 and json.loads(refused[2])["error"] == "label_studio_denied"
        finally:
            browser.close()


def download(emulator: Emulator, bucket: str, key: str) -> tuple[int, bytes]:
    quoted = urllib.parse.quote(key, safe="")
    status, _, body = http(f"{emulator.url}/storage/v1/b/{bucket}/o/{quoted}?alt=media")
    return status, body


def exported(front: Front, key: str) -> tuple[Any, Any]:
    """Label Studio's object and the gateway's, once both are written (Label Studio writes its own
    before its annotation API answers; the gateway's export worker a moment later)."""
    wait_until(lambda: download(front.emulator, front.gateway_target, key)[0] == 200, 30, f"the gateway's {key}")
    _, ours = download(front.emulator, front.gateway_target, key)
    status_ls, theirs = download(front.emulator, front.ls_target, key)
    assert status_ls == 200, theirs[:300]
    return json.loads(theirs), json.loads(ours)


def field_differences(theirs: Any, ours: Any, path: str = "") -> dict[str, tuple[Any, Any]]:
    """Every field (dotted path, objects compared field by field) whose values differ."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        found: dict[str, tuple[Any, Any]] = {}
        for key in sorted(set(theirs) | set(ours)):
            where = f"{path}.{key}" if path else key
            if key not in theirs or key not in ours:
                found[where] = (theirs.get(key, "<absent>"), ours.get(key, "<absent>"))
            else:
                found |= field_differences(theirs[key], ours[key], where)
        return found
    return {} if theirs == ours else {path: (theirs, ours)}


def annotate(front: Front, task: int, label: str = "a") -> dict[str, Any]:
    """An annotation created through Label Studio's API, as its editor's Submit does."""
    result = [{"from_name": "c", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]
    return front.ls.api("POST", f"/api/tasks/{task}/annotations/", {"result": result, "lead_time": 3.5})


def test_label_studio_refuses_other_internal_webhook_addresses(front: Front) -> None:
    """The README's SSRF loosening lets Label Studio reach the gateway's address and nothing else
    internal: loopback neighbours and the cloud metadata address stay banned."""
    for url in ("http://127.0.0.2:9/hook", "http://169.254.169.254/computeMetadata/v1/", "http://10.0.0.1/hook"):
        status, _, body = http(
            f"{front.ls.url}/api/webhooks/",
            "POST",
            {"project": front.project, "url": url, "send_payload": True},
            {"Authorization": f"Token {ADMIN_TOKEN}"},
        )
        assert status in (400, 403) and b"reserved network address" in body, (url, status, body[:300])


def sync_label_studios_target(front: Front) -> None:
    """Label Studio's own Sync of its target storage: every annotation written again, now."""
    path = f"/api/storages/export/gcs/{front.ls_target_storage}"
    before = front.ls.api("GET", path).get("last_sync")
    front.ls.api("POST", f"{path}/sync")
    wait_until(lambda: front.ls.api("GET", path).get("last_sync") not in (None, before), 60, "Label Studio's sync")


def test_the_exported_annotation_equals_label_studios_own(front: Front) -> None:
    """Field by field, an annotation Label Studio sent by webhook, as the gateway wrote it and as
    Label Studio's own GCS target storage wrote it. On the annotation's save Label Studio writes
    its object before the same request stamps the task's `updated_by`/`updated_at` (the webhook,
    sent after, carries the stamped task); its Sync rewrites the object with the stamped task, and
    then the two are equal in every field."""
    annotation = annotate(front, front.tasks["img/a.jpg"])
    theirs, ours = exported(front, f"{PREFIX}/{annotation['id']}")
    assert isinstance(theirs["completed_by"], dict) and theirs["completed_by"]["email"] == ADMIN_EMAIL
    assert set(field_differences(theirs, ours)) <= {"task.updated_at", "task.updated_by"}
    assert ours["task"]["updated_by"] == theirs["completed_by"]["id"]

    sync_label_studios_target(front)
    theirs, ours = exported(front, f"{PREFIX}/{annotation['id']}")
    assert field_differences(theirs, ours) == {}


def test_the_per_task_layout_equals_label_studios_own(front: Front) -> None:
    """Label Studio's second layout (FUTURE_SAVE_TASK_TO_STORAGE: `<prefix>/<task id>.json`, the
    task with all its annotations): two annotations of one task, sent by Label Studio's webhook,
    against the object Label Studio's own GCS target storage writes in that layout (its own code,
    run with the setting on, after both annotations)."""
    task = front.tasks["img/b.jpg"]
    first, second = annotate(front, task, "a"), annotate(front, task, "a")
    key = f"{PREFIX}/{task}.json"

    def both_in() -> bool:
        status, body = download(front.emulator, f"{front.gateway_target}-tasks", key)
        return status == 200 and [a["id"] for a in json.loads(body)["annotations"]] == [first["id"], second["id"]]

    wait_until(both_in, 30, "the gateway's task object with both annotations")
    front.ls.manage(
        f"""
        from django.test import override_settings
        from io_storages.gcs.models import GCSExportStorage
        from tasks.models import Annotation
        storage = GCSExportStorage.objects.get(id={front.ls_target_storage})
        storage.bucket = "{front.ls_target}-tasks"  # this write only; not saved
        with override_settings(FUTURE_SAVE_TASK_TO_STORAGE=True, FUTURE_SAVE_TASK_TO_STORAGE_JSON_EXT=True):
            storage.save_annotation(Annotation.objects.get(id={second["id"]}))
        """
    )
    status, theirs = download(front.emulator, f"{front.ls_target}-tasks", key)
    assert status == 200, theirs[:300]
    _, ours = download(front.emulator, f"{front.gateway_target}-tasks", key)
    theirs_json, ours_json = json.loads(theirs), json.loads(ours)
    assert theirs_json["annotations"][0]["completed_by"]["email"] == ADMIN_EMAIL
    assert field_differences(theirs_json, ours_json) == {}


def test_an_annotator_labels_in_the_browser_and_the_export_equals_label_studios(front: Front) -> None:
    """End to end, as an annotator and an admin use it: chromium logs in through the shipped front,
    opens a task in Label Studio's labeling page, the image renders from the gateway, a rectangle
    is drawn and submitted; Label Studio's own webhook brings the annotation to the gateway, whose
    object in the target bucket equals the one Label Studio's own target storage writes."""
    if not os.path.exists(CHROMIUM):
        missing("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    task = front.tasks["img/c.png"]
    allowed = front.checks("allowed") + front.checks("cached")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            media: list[tuple[int, bool]] = []
            page.on(
                "response", lambda r: "/resolve/" in r.url and media.append((r.status, "x-request-id" in r.headers))
            )
            page.goto(f"{front.front}/user/login/")
            page.fill("#email", ADMIN_EMAIL)
            page.fill("#password", ADMIN_PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(lambda url: "/user/login" not in url)

            page.goto(f"{front.front}/projects/{front.project}/data?task={task}")
            page.wait_for_function(
                "() => [...document.querySelectorAll('img')]"
                ".some(i => i.src.includes('/resolve/') && i.complete && i.naturalWidth === 320)",
                timeout=60_000,
            )
            assert media and all(status in (200, 304) and ours for status, ours in media), media
            page.get_by_text("thing", exact=True).first.click()
            stage = page.locator(".konvajs-content").first.bounding_box()
            assert stage is not None
            x, y, w, h = stage["x"], stage["y"], stage["width"], stage["height"]
            page.mouse.move(x + w * 0.2, y + h * 0.2)
            page.mouse.down()
            page.mouse.move(x + w * 0.6, y + h * 0.7, steps=10)
            page.mouse.up()
            with page.expect_response(
                lambda r: f"/api/tasks/{task}/annotations" in r.url and r.request.method == "POST"
            ) as submitted:
                page.get_by_role("button", name="Submit").first.click()
            assert submitted.value.status == 201, submitted.value.text()[:300]
            annotation = submitted.value.json()
        finally:
            browser.close()
    assert (
        front.checks("allowed") + front.checks("cached") > allowed
    )  # the gateway decided, Label Studio's proxy did not serve
    [box] = annotation["result"]
    assert box["type"] == "rectanglelabels" and box["value"]["rectanglelabels"] == ["thing"]

    sync_label_studios_target(front)
    theirs, ours = exported(front, f"{PREFIX}/{annotation['id']}")
    assert ours["result"] == annotation["result"]
    assert field_differences(theirs, ours) == {}
