"""Scenario 8: the Label Studio drop-in — 64 KiB range GETs of one task's object through a front,
served by the gateway (config/label-studio.nginx.conf, as shipped) vs. by Label Studio's own
storage proxy (the same nginx, every path to Label Studio), alternating, same credential
(Label Studio's API token) and the same ranges.

Label Studio 1.23 comes from its own virtual environment (`make label-studio`, LABEL_STUDIO_VENV);
it is started, given a project and a GCS source storage on fake-gcs-server and synced through its
own API exactly as the drop-in tests do (tests/test_label_studio.py provides the process helper).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

from .checks import check_range
from .objects import SeededObject, _upload
from .procs import HOST, free_port
from .scenarios import SPAN, Bar, Context, Row, ScenarioResult, Target, medians, ratio
from .wrk import WrkSpec, expect

BUCKET = "bench-label-studio"
KEY = "media/object-8MiB.bin"
SIZE = 8 * 1024 * 1024
CONNECTIONS = 16
ROOT = Path(__file__).resolve().parent.parent


def label_studio_ranges(ctx: Context) -> ScenarioResult:
    from tests.test_label_studio import ADMIN_TOKEN, LS_VENV, NGINX, LabelStudio, start_front

    result = ScenarioResult("8", "Label Studio drop-in: 64 KiB ranges through the front, gateway vs Label Studio")
    if not (LS_VENV / "bin" / "label-studio").exists() or NGINX is None:
        result.status = "skipped"
        result.notes.append(f"Label Studio ({LS_VENV}) or nginx missing: `make label-studio nginx`")
        return result
    assert ctx.emulator is not None
    ctx.emulator.create_bucket(BUCKET)
    obj = _upload(ctx.emulator, SeededObject(KEY, SIZE, bucket=BUCKET, data=os.urandom(SIZE)))
    workdir = ctx.workdir / "label-studio"
    (workdir / "ls").mkdir(parents=True)
    stack = contextlib.ExitStack()
    with stack:
        ls = LabelStudio(workdir / "ls", SimpleNamespace(url=ctx.emulator_url))  # type: ignore[arg-type]
        stack.callback(ls.stop)
        ctx.log("bench: starting Label Studio (migrations take a minute on the first start)")
        ls.start()
        ls.enable_api_tokens()
        project, [task] = ls.synced_project(BUCKET, "media")
        path = str(ls.api("GET", f"/api/tasks/{task['id']}/")["data"]["image"])  # the URL its pages use
        if not path.startswith(f"/tasks/{task['id']}/resolve/?fileuri="):
            raise ValueError(f"unexpected resolve URL from Label Studio: {path!r}")

        gateway_port = _start_gateway(ctx, stack, workdir, ls.url, project)
        front_port, plain_port = free_port(), free_port()
        plain = f"""
        server {{
            listen {HOST}:{plain_port};
            location / {{
                proxy_pass http://label_studio;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
                proxy_set_header Host $http_host;
                proxy_read_timeout 300s;
            }}
        }}
        """  # the same front without the gateway: every path to Label Studio, its own proxy included
        nginx = start_front(workdir / "nginx", gateway_port, ls.port, front_port, plain)
        stack.callback(_terminate, nginx)
        token = {"Authorization": f"Token {ADMIN_TOKEN}"}
        targets = [
            Target("label-studio", plain_port, lambda _o: path, token),
            Target("gateway", front_port, lambda _o: path, token),
        ]
        offsets = [0, SPAN * 7, SIZE - SPAN]

        def checks(phase: str) -> None:
            ctx.sample(
                result,
                phase,
                (check_range("8", phase, t.name, t.port, path, t.headers, obj, o) for t in targets for o in offsets),
            )

        checks("before")
        ctx.alternate(
            result,
            targets,
            lambda t: WrkSpec(
                t.port,
                path,
                connections=CONNECTIONS,
                headers=tuple(t.headers.items()),
                lua=("range",),
                args=(str(SIZE), str(SPAN)),
                timeout_s=30,
            ),
            lambda _t, run: expect(run, body=SPAN, connections=CONNECTIONS),
        )
        checks("after")

    failed = result.failed_targets()
    rps = medians(result, lambda r: r.rps)
    g_l = ratio(rps["gateway"], rps["label-studio"])
    result.rows.append(Row("requests/s", rps, {"gw/label-studio": g_l}, failed=failed))
    for pct in ("p50", "p99"):
        lat = medians(result, lambda r, p=pct: r.latency_ms.get(p, 0.0))
        ratios = {"gw/label-studio": ratio(lat["gateway"], lat["label-studio"])}
        result.rows.append(Row(f"{pct} latency ms", lat, ratios, failed=failed, decimals=2))
    result.bars = [Bar("gw/label-studio req/s", g_l, None, failed=bool(failed))]
    return result


def _start_gateway(ctx: Context, stack: contextlib.ExitStack, workdir: Path, ls_url: str, project: int) -> int:
    """A `gateway serve` whose label_studio authenticator asks this Label Studio."""
    from tests.conftest import wait_until
    from tests.test_label_studio import http as request

    port = free_port()
    config = workdir / "gateway.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [server]
            access_log = false
            [auth]
            secret = "{os.urandom(24).hex()}"
            [registry]
            url = "sqlite:///{workdir / "registry.db"}"
            [label_studio]
            url = "{ls_url}"
            [[storages]]
            id = "label-studio-media"
            project = "{project}"
            type = "gcs"
            bucket = "{BUCKET}"
            """
        )
    )
    workers = str(ctx.gateway.workers if ctx.gateway is not None else 2)
    assert ctx.emulator is not None
    env = {**os.environ, "STORAGE_EMULATOR_HOST": ctx.emulator.host, "PYTHONPATH": str(ROOT)}
    log = (workdir / "gateway.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port), "--workers", workers],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    stack.callback(_terminate, process)
    wait_until(lambda: _answers(request, f"http://{HOST}:{port}/healthz"), 30, "the drop-in gateway")
    return port


def _answers(request, url: str) -> bool:  # type: ignore[no-untyped-def]
    try:
        return request(url)[0] == 200
    except OSError:
        return False


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
