"""Operations endpoints: liveness, readiness with its failing check named, metrics exposition."""

from __future__ import annotations

from gateway.app import create_app

from .conftest import build_settings, free_port, sample_objects, seed


async def test_health_and_readiness(tmp_path, aiohttp_client, monkeypatch):
    local = seed("local", "ops-bucket", sample_objects()[:1], tmp_path, None)
    unreachable = {"id": "far", "project": "2", "type": "gcs", "bucket": "far-bucket"}
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")  # nothing listens there
    settings = build_settings([local, unreachable], tmp_path, upstream={"retries": 0})
    client = await aiohttp_client(create_app(settings))
    assert (await (await client.get("/healthz")).json()) == {"status": "ok"}
    response = await client.get("/readyz")
    assert response.status == 503
    body = await response.json()
    assert body["status"] == "not_ready"
    assert body["checks"]["registry"] == "ok" and body["checks"]["storage:s-local"] == "ok"
    assert body["checks"]["storage:far"].startswith("error")


async def test_ready_when_everything_is_reachable(tmp_path, aiohttp_client, emulator, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.host)
    storage = seed("gcs", "ops-ready-bucket", sample_objects()[:1], tmp_path, emulator)
    client = await aiohttp_client(create_app(build_settings([storage], tmp_path)))
    response = await client.get("/readyz")
    assert response.status == 200
    assert (await response.json())["checks"] == {"registry": "ok", "storage:s-gcs": "ok", "streams": "ok"}
    metrics = await client.get("/metrics")
    assert metrics.headers["Content-Type"].startswith("text/plain")
    text = await metrics.text()
    assert 'gateway_requests_total{mode="none",route="readyz",status="2xx"}' in text


async def test_middleware_maps_client_disconnects_and_unexpected_errors(aiohttp_client, caplog):
    from aiohttp import web

    from gateway.app import gateway_middleware

    async def gone(_request):
        raise ConnectionResetError("client went away")

    async def broken(_request):
        raise RuntimeError("a bug")

    app = web.Application(middlewares=[gateway_middleware])
    app.router.add_get("/gone", gone)
    app.router.add_get("/broken", broken)
    client = await aiohttp_client(app)
    with caplog.at_level("ERROR"):
        assert (await client.get("/gone")).status == 499  # logged as nginx does, never as a server error
        assert not [r for r in caplog.records if r.levelname == "ERROR"]
        response = await client.get("/broken", headers={"X-Request-ID": "req-7"})
        assert response.status == 500
        body = await response.json()
        assert body["error"] == "internal_error" and "req-7" in body["message"]
        assert any("req-7" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
