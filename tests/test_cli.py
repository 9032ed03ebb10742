"""The command line: token minting, config checks, task import, and the demo's printed URLs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest

from gateway.app import create_app
from gateway.cli import CliError, main, parse_duration
from gateway.demo import prepare_demo

from .conftest import SECRET, wait_until


def write_config(tmp_path, extra: str = "", auth: str = "") -> str:
    media = tmp_path / "media"
    media.mkdir(exist_ok=True)
    (media / "a.txt").write_text("hello")
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'[auth]\nsecret = "{SECRET}"\naudience = "media"\n{auth}'
        f'[registry]\nurl = "sqlite:///{tmp_path / "r.db"}"\n'
        f'[[storages]]\nid = "s"\nproject = 3\ntype = "local"\nbucket = "bkt"\nroot = "media"\n{extra}'
    )
    return str(path)


def test_token_prints_a_verifiable_jwt(tmp_path, capsys):
    config = write_config(tmp_path)
    argv = ["token", "--config", config, "--sub", "ann", "--task", "4", "--task", "5", "--project", "3", "--ttl", "2h"]
    assert main(argv) == 0
    token = capsys.readouterr().out.strip()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience="media")
    assert claims["sub"] == "ann" and claims["tasks"] == [4, 5] and claims["projects"] == ["3"]
    assert 7190 <= claims["exp"] - time.time() <= 7200
    assert "admin" not in claims
    assert main(["token", "--config", config, "--sub", "root", "--admin", "--all-tasks"]) == 0
    claims = jwt.decode(capsys.readouterr().out.strip(), SECRET, algorithms=["HS256"], audience="media")
    assert claims["admin"] is True and claims["tasks"] == "*"


def test_token_refuses_to_mint_beyond_the_lifetime_the_gateway_accepts(tmp_path, capsys):
    """Issue 16 case 5: `--ttl` longer than [auth].max_token_lifetime (24 h by default) is refused."""
    config = write_config(tmp_path)
    assert main(["token", "--config", config, "--sub", "ann", "--ttl", "1d"]) == 0  # the default limit itself
    capsys.readouterr()
    assert main(["token", "--config", config, "--sub", "ann", "--ttl", "2d"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "--ttl" in captured.err and "[auth].max_token_lifetime" in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    short = write_config(tmp_path, "", auth="max_token_lifetime = 600\n")
    assert main(["token", "--config", short, "--sub", "ann", "--ttl", "11m"]) == 2
    assert "(600 seconds)" in capsys.readouterr().err


def test_health_asks_the_port_of_the_config_file_and_then_of_the_environment(tmp_path, capsys, monkeypatch):
    """The image's HEALTHCHECK: a port set only in the TOML file (or only in GATEWAY_SERVER_PORT)
    is the one asked, on loopback when the server listens on every address."""
    import http.server
    import threading

    class Healthz(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *_args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthz)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        monkeypatch.delenv("GATEWAY_SERVER_PORT", raising=False)
        config = write_config(tmp_path, f'[server]\nhost = "0.0.0.0"\nport = {port}\n')
        assert main(["health", "--config", config]) == 0
        closed = write_config(tmp_path, '[server]\nhost = "0.0.0.0"\nport = 9\n')
        assert main(["health", "--config", closed]) == 1
        assert "127.0.0.1:9/healthz" in capsys.readouterr().err
        monkeypatch.setenv("GATEWAY_SERVER_PORT", str(port))
        assert main(["health", "--config", closed]) == 0
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
def test_unsent_bytes_of_a_port_are_what_its_peers_have_not_read_yet():
    """What `gateway serve` waits for before exiting (see cli._wait_for_send_queues)."""
    from gateway.cli import _unsent_bytes

    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        served, _ = listener.accept()
        served.setblocking(False)
        sent = 0
        with contextlib.suppress(BlockingIOError):
            while True:  # until the client's receive buffer and our send queue are full
                sent += served.send(b"x" * 65536)
        assert _unsent_bytes(port) > 0
        received = 0
        while received < sent:
            received += len(client.recv(1 << 20))
        wait_until(lambda: _unsent_bytes(port) == 0, timeout=5, what="the last acknowledgement")
        served.close()
        client.close()


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("45s", 45), ("30m", 1800), ("1h", 3600), ("7d", 604800)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "1w", "-5m", "1.5h", "h"])
def test_bad_durations_name_the_flag(text):
    with pytest.raises(CliError, match="--ttl"):
        parse_duration(text)


def test_check_config_reports_one_line_naming_the_key(tmp_path, capsys):
    config = write_config(tmp_path, extra="surprise = 1\n")
    assert main(["check-config", "--config", config]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "surprise" in err and err.startswith("gateway: config:")
    assert main(["check-config", "--config", write_config(tmp_path)]) == 0
    assert "config OK" in capsys.readouterr().out
    assert main(["serve"]) == 2  # no configuration at all
    assert "--config" in capsys.readouterr().err


def test_import_json_and_jsonl(tmp_path, capsys):
    config = write_config(tmp_path)
    (tmp_path / "tasks.json").write_text(json.dumps([{"data": {"t": "gs://bkt/a.txt"}}, {"t": "gs://bkt/b"}]))
    (tmp_path / "tasks.jsonl").write_text('{"data": {"t": "gs://bkt/c"}}\n\n{"t": "gs://bkt/d"}\n')
    assert (
        main(
            [
                "import",
                "--config",
                config,
                "--project",
                "3",
                str(tmp_path / "tasks.json"),
                str(tmp_path / "tasks.jsonl"),
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["task_ids"] == [1, 2, 3, 4]
    (tmp_path / "bad.jsonl").write_text('{"data": {}}\n{oops\n')
    assert main(["import", "--config", config, "--project", "3", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert main(["import", "--config", config, "--project", "99", str(tmp_path / "tasks.json")]) == 2
    assert "--project" in capsys.readouterr().err


async def test_demo_is_idempotent_and_its_printed_urls_work(tmp_path, aiohttp_client):
    _, banner = await asyncio.to_thread(prepare_demo, tmp_path / "state", "127.0.0.1", 8080)
    again, banner_again = await asyncio.to_thread(prepare_demo, tmp_path / "state", "127.0.0.1", 8080)
    ids = re.findall(r"task (\d+) ", banner)
    assert ids == re.findall(r"task (\d+) ", banner_again) and len(ids) == 4
    token = banner.splitlines()[3]
    assert jwt.decode(token, options={"verify_signature": False})["projects"] == ["demo"]
    curl = re.search(r"-H 'Authorization: Bearer (\S+)' \\\n\s+'http://127.0.0.1:8080(\S+)'", banner)
    assert curl is not None and curl.group(1) == token
    client = await aiohttp_client(create_app(again))
    response = await client.get(curl.group(2), headers={"Authorization": f"Bearer {token}", "Range": "bytes=0-1023"})
    assert response.status == 206 and len(await response.read()) == 1024
    assert response.headers["Content-Type"] == "video/mp4"
    browser_urls = re.findall(r"http://127.0.0.1:8080(/tasks/\S+&token=\S+)", banner)
    assert len(browser_urls) == 4
    for url in browser_urls:
        response = await client.get(url)  # token in the query string, as a browser would send it
        assert response.status == 200, url
        assert int(response.headers["Content-Length"]) > 1000
    viewer = re.search(r"http://127.0.0.1:8080(/view/tasks/\d+\?token=\S+)", banner)
    assert viewer is not None
    response = await client.get(viewer.group(1), allow_redirects=False)
    assert response.status == 303 and response.cookies["gateway_token"].value == token
    assert (await client.get("/ui/")).status == 200
    # The printed preview and listing commands work, and leave the demo's four tasks as they are.
    commands = re.findall(
        r"curl -s (-X POST )?-H 'Authorization: Bearer (\S+)' '?http://127.0.0.1:8080(\S+?)'?$", banner, re.M
    )
    assert [path.split("?")[0] for _, _, path in commands] == [
        "/api/storages/gcs/demo-local/preview",
        "/api/projects/demo/tasks",
    ]
    for post, admin, path in commands:
        response = await client.request("POST" if post else "GET", path, headers={"Authorization": f"Bearer {admin}"})
        assert response.status == 200, await response.text()
        answer = await response.json()
    assert answer["total"] == 4


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=timeout)


def test_serve_start_up_failures_are_one_line(tmp_path):
    config = write_config(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = run_cli("serve", "--config", config, "--port", str(busy.getsockname()[1]))
    assert result.returncode != 0
    assert "cannot listen on 127.0.0.1:" in result.stderr and "Traceback" not in result.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text(Path(config).read_text().replace(str(tmp_path / "r.db"), str(tmp_path / "missing" / "r.db")))
    result = run_cli("serve", "--config", str(broken))
    assert result.returncode == 2
    assert "[registry].url: cannot open the registry" in result.stderr and "Traceback" not in result.stderr


def test_cors_config_for_presign_buckets(tmp_path, capsys):
    argv = [
        "cors-config",
        "--origin",
        "https://ls.example.com",
        "--origin",
        "http://localhost:8080",
        "--origin",
        "null",
    ]
    assert main(argv) == 0
    (rule,) = json.loads(capsys.readouterr().out)
    assert rule["origin"] == ["https://ls.example.com", "http://localhost:8080", "null"]
    assert rule["method"] == ["GET", "HEAD"] and rule["maxAgeSeconds"] == 3600
    assert {"Content-Type", "Access-Control-Allow-Origin", "Content-Range"} <= set(rule["responseHeader"])
    config = write_config(tmp_path, extra="")
    text = Path(config).read_text().replace("[registry]", '[cors]\norigins = ["https://from.config"]\n[registry]')
    Path(config).write_text(text)
    assert main(["cors-config", "--config", config]) == 0
    assert json.loads(capsys.readouterr().out)[0]["origin"] == ["https://from.config"]
    for bad, said in ((["--origin", "ls.example.com"], "is not an origin"), ([], "or '*'")):
        assert main(["cors-config", *bad]) == 2
        assert said in capsys.readouterr().err
    # Label Studio's guide uses "*": accepted, with a warning saying what it allows.
    assert main(["cors-config", "--origin", "*", "--origin", "https://ls.example.com"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)[0]["origin"] == ["*"] and "warning: --origin '*' lets a page on any web site" in err
