"""The network boundary: client addresses behind trusted proxies, client allowlists, stream caps.

Address resolution is tested as a pure function (any address), then end to end through a real
gateway: the test client connects from 127.0.0.1, which is made a trusted proxy where a test
needs the gateway to see another client address. Streams are held open by an upstream the test
controls (a gate in front of fake-gcs-server), never by sleeping.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import REGISTRY as PROMETHEUS

from gateway.app import create_app
from gateway.cli import main
from gateway.config import ConfigError, LimitSettings, settings_from_dict
from gateway.errors import Refused
from gateway.netguard import AddressSet, StreamLimiter, client_address, forwarded_for, parse_node, x_forwarded_for
from gateway.state import LIMITER, REGISTRY

from .conftest import PROJECT, SECRET, MediaWorld, build_settings, sample_objects, seed, wait_until
from .test_faults import FaultProxy
from .test_presign import service_account_json
from .test_processes import metric, parse_metrics, start_gateway  # noqa: F401 (the `gateway serve` fixture)

SAFETY = 10.0  # a bounded wait; a healthy gateway settles every case long before


async def eventually(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SAFETY
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def sample(name: str, **labels: str) -> float:
    return PROMETHEUS.get_sample_value(name, labels) or 0.0


# ---------------------------------------------------------------- pure address resolution


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("203.0.113.7", "203.0.113.7"),
        (" 203.0.113.7 ", "203.0.113.7"),
        ("203.0.113.7:51234", "203.0.113.7"),
        ("2001:db8::7", "2001:db8::7"),
        ("[2001:db8::7]", "2001:db8::7"),
        ("[2001:db8::7]:4711", "2001:db8::7"),
        ('"[2001:db8::7]:4711"', "2001:db8::7"),
        ("::ffff:192.0.2.5", "192.0.2.5"),  # IPv4-mapped: compared as IPv4
        ("[::ffff:192.0.2.5]:80", "192.0.2.5"),
        ("unknown", None),
        ("_hidden", None),
        ("", None),
        ("203.0.113.7:http", None),
        ("[2001:db8::7", None),
        ("[2001:db8::7]x", None),
        ("01.2.3.4", None),
        ("203.0.113.300", None),
        ("evil.example", None),
        ("1" * 200, None),  # never parsed (nor cached)
    ],
)
def test_parse_node(text, expected):
    parsed = parse_node(text)
    assert parsed == (None if expected is None else ip_address(expected))


TRUSTED = AddressSet(["10.0.0.0/8", "2001:db8:ffff::/48"])


@pytest.mark.parametrize(
    ("peer", "hops", "client"),
    [
        # An untrusted peer is the client, whatever it claims in headers.
        ("198.51.100.9", ["192.0.2.1"], "198.51.100.9"),
        # One trusted proxy: the hop it appended is the client.
        ("10.0.0.1", ["192.0.2.1"], "192.0.2.1"),
        # The client prepended a spoofed hop: only the right-most untrusted hop counts.
        ("10.0.0.1", ["6.6.6.6", "192.0.2.1"], "192.0.2.1"),
        # Several proxies (each trusted hop is skipped from the right).
        ("10.0.0.1", ["1.1.1.1", "192.0.2.1", "10.0.0.7", "10.0.0.8"], "192.0.2.1"),
        # Every hop is a trusted proxy: the left-most one made the request.
        ("10.0.0.1", ["10.0.0.5", "10.0.0.7"], "10.0.0.5"),
        # A trusted proxy without a header: the request is the proxy's own.
        ("10.0.0.1", [], "10.0.0.1"),
        # IPv6 proxies and clients, with brackets and ports.
        ("2001:db8:ffff::1", ["[2001:db8:1::7]:4711", "2001:db8:ffff::2"], "2001:db8:1::7"),
        # A peer connected through an IPv4-mapped socket matches the IPv4 trusted range.
        ("::ffff:10.0.0.1", ["192.0.2.1"], "192.0.2.1"),
        # Garbage where the client should be: unknown, never the proxy and never an entry further left.
        ("10.0.0.1", ["192.0.2.1", "garbage"], None),
        ("10.0.0.1", ["192.0.2.1", "unknown", "10.0.0.7"], None),
        # Garbage left of the client is the client's own business and ignored.
        ("10.0.0.1", ["garbage", "192.0.2.1"], "192.0.2.1"),
        (None, ["192.0.2.1"], None),
    ],
)
def test_client_address(peer, hops, client):
    resolved = client_address(peer, hops, TRUSTED)
    assert resolved == (None if client is None else ip_address(client))


def test_forwarded_header_chains():
    assert x_forwarded_for(["192.0.2.1, 10.0.0.7", "10.0.0.8"]) == ["192.0.2.1", " 10.0.0.7", "10.0.0.8"]
    hops = forwarded_for(
        [
            'for=192.0.2.60;proto=http;by=203.0.113.43, For="[2001:db8:cafe::17]:4711"',
            'proto=https, for="_gazonk", for=1.2.3.4;for=5.6.7.8, for="198.51.100.1;x,y"',
        ]
    )
    assert hops == ["192.0.2.60", '"[2001:db8:cafe::17]:4711"', "", '"_gazonk"', "", '"198.51.100.1;x,y"']
    assert [parse_node(h) for h in hops[:2]] == [ip_address("192.0.2.60"), ip_address("2001:db8:cafe::17")]
    assert all(parse_node(h) is None for h in hops[2:])


def test_address_sets_match_ipv4_mapped_and_ipv6():
    allowed = AddressSet(["192.0.2.0/24", "::ffff:198.51.100.0/120", "2001:db8::/32", "203.0.113.9"])
    for inside in ("192.0.2.200", "::ffff:192.0.2.1", "198.51.100.77", "2001:db8:1:2::3", "203.0.113.9"):
        assert parse_node(inside) in allowed, inside
    for outside in ("192.0.3.1", "198.51.101.1", "2001:db9::1", "203.0.113.10", "::1"):
        assert parse_node(outside) not in allowed, outside
    assert not AddressSet([])


# ---------------------------------------------------------------- the stream limiter (pure)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_stream_limiter_caps_releases_and_holds_readiness():
    clock = Clock()
    limiter = StreamLimiter(
        LimitSettings(max_streams=2, max_streams_per_subject=1, retry_after=7, not_ready_after_shedding=5), clock
    )
    with limiter.slot("alice"):
        with pytest.raises(Refused) as same_subject, limiter.slot("alice"):
            pass
        assert (same_subject.value.status, same_subject.value.reason) == (429, "too_many_streams")
        assert same_subject.value.headers == {"Retry-After": "7"}
        assert limiter.shedding() is None  # one greedy subject is not process overload
        with limiter.slot("bob"):
            assert limiter.shedding() == "at the stream limit (2 of 2)"
            with pytest.raises(Refused) as full, limiter.slot("carol"):
                pass
            assert (full.value.status, full.value.reason) == (503, "overloaded")
    assert (limiter.active, limiter.by_subject) == (0, {})
    assert limiter.shedding() is not None  # refused 0 s ago
    clock.now += 4.9
    assert limiter.shedding() is not None
    clock.now += 0.2
    assert limiter.shedding() is None


@pytest.mark.parametrize("error", [ConnectionResetError, asyncio.CancelledError, RuntimeError])
def test_stream_slots_are_released_on_every_exit(error):
    limiter = StreamLimiter(LimitSettings(max_streams=1, max_streams_per_subject=1))
    with pytest.raises(error), limiter.slot("alice"):
        raise error()
    assert (limiter.active, limiter.by_subject) == (0, {})
    with limiter.slot("alice"):  # the slot is free again
        assert limiter.active == 1


# ---------------------------------------------------------------- configuration


def _settings(tmp_path, **raw: Any):  # type: ignore[no-untyped-def]
    return settings_from_dict({"auth": {"secret": SECRET}, **raw}, env={}, base_dir=tmp_path)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"network": {"client_allowlist": ["10.0.0.0/33"]}}, "[network].client_allowlist: '10.0.0.0/33' is not"),
        ({"network": {"trusted_proxies": ["proxy.internal"]}}, "[network].trusted_proxies: 'proxy.internal' is not"),
        ({"network": {"client_allowlist": ["10.1.2.3/8"]}}, "host bits set (the network is 10.0.0.0/8)"),
        ({"network": {"client_allowlist": 7}}, "[network].client_allowlist: expected a list of strings"),
        ({"network": {"forwarded_header": "X-Real-IP"}}, "[network].forwarded_header: expected 'X-Forwarded-For'"),
        ({"limits": {"max_streams": -1}}, "[limits].max_streams: expected 0 or more"),
        ({"limits": {"max_streams_per_subject": "two"}}, "[limits].max_streams_per_subject: expected an integer"),
        ({"limits": {"burst": 1}}, "[limits].burst: unknown key"),
        (
            {
                "storages": [
                    {"id": "s", "project": 1, "type": "gcs", "bucket": "bkt", "client_allowlist": ["2001:db8::/129"]}
                ]
            },
            "[[storages]] id='s'.client_allowlist: '2001:db8::/129' is not",
        ),
    ],
)
def test_config_errors_name_the_field(tmp_path, raw, message):
    with pytest.raises(ConfigError) as error:
        _settings(tmp_path, **raw)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_network_settings_from_file_and_environment(tmp_path):
    settings = settings_from_dict(
        {"auth": {"secret": SECRET}, "network": {"trusted_proxies": ["10.0.0.0/8"], "forwarded_header": "forwarded"}},
        env={"GATEWAY_NETWORK_CLIENT_ALLOWLIST": "192.0.2.0/24, 2001:db8::/32", "GATEWAY_LIMITS_MAX_STREAMS": "3"},
    )
    assert settings.network.client_allowlist == ("192.0.2.0/24", "2001:db8::/32")
    assert settings.network.trusted_proxies == ("10.0.0.0/8",)
    assert settings.limits.max_streams == 3 and settings.limits.max_streams_per_subject == 64
    with pytest.raises(ConfigError, match=r"^\[network\].client_allowlist: 'nope' is not"):
        settings_from_dict({"auth": {"secret": SECRET}}, env={"GATEWAY_NETWORK_CLIENT_ALLOWLIST": "nope"})


# ---------------------------------------------------------------- allowlists through a real gateway


async def local_gateway(tmp_path, aiohttp_client, storage: dict[str, Any] | None = None, **sections: Any) -> MediaWorld:
    """A gateway over a local storage with one task (task_a) referencing every sample object."""
    bucket = f"net-{uuid.uuid4().hex[:8]}"
    objects = sample_objects()[:2]
    entry = {**seed("local", bucket, objects, tmp_path, None), **(storage or {})}
    settings = build_settings([entry], tmp_path, **sections)
    world = MediaWorld("local", bucket, {o.key: o for o in objects}, settings)
    app = create_app(settings)
    (world.task_a,) = await app[REGISTRY].add_tasks(PROJECT, [{"data": {"k": [world.uri(o.key) for o in objects]}}])
    world.client = await aiohttp_client(app)
    world.extra["app"] = app
    return world


KEY = "video/clip.bin"


async def refusal(response: aiohttp.ClientResponse, status: int, reason: str) -> str:
    body = await response.json()
    assert (response.status, body["error"]) == (status, reason), body
    return body["message"]


async def test_global_allowlist_refuses_before_any_token_work(tmp_path, aiohttp_client):
    world = await local_gateway(tmp_path, aiohttp_client, network={"client_allowlist": ["192.0.2.0/24"]})
    refused = sample("gateway_auth_failures_total", reason="ip_not_allowed")
    invalid = sample("gateway_auth_failures_total", reason="invalid_token")
    client = world.client
    # A refused client gets 403 for an invalid token (not 401), for no token, and for an
    # unknown task (not 404): neither the token nor the registry was looked at.
    message = await refusal(
        await client.get(world.url(KEY), headers={"Authorization": "Bearer not-a-jwt"}), 403, "ip_not_allowed"
    )
    assert message == "client address 127.0.0.1 is not allowed"
    await refusal(await client.get(world.url(KEY)), 403, "ip_not_allowed")
    await refusal(await client.get(world.url(KEY, task=999999), headers=world.auth()), 403, "ip_not_allowed")
    await refusal(await client.get("/api/tasks/1", headers=world.auth(admin=True)), 403, "ip_not_allowed")
    await refusal(await client.get("/metrics"), 403, "ip_not_allowed")
    assert sample("gateway_auth_failures_total", reason="ip_not_allowed") - refused == 5
    assert sample("gateway_auth_failures_total", reason="invalid_token") == invalid
    # Load balancer probes are not behind the allowlist.
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200


async def test_global_allowlist_refuses_cors_preflights_of_media_routes_too(tmp_path, aiohttp_client):
    """The media core admits GET and HEAD; a preflight on a media route is the middleware's to refuse."""
    world = await local_gateway(
        tmp_path,
        aiohttp_client,
        network={"client_allowlist": ["192.0.2.0/24"]},
        cors={"origins": ["https://labels.example"]},
    )
    preflight = await world.client.options(
        world.url(KEY), headers={"Origin": "https://labels.example", "Access-Control-Request-Method": "GET"}
    )
    await refusal(preflight, 403, "ip_not_allowed")
    assert "Access-Control-Allow-Origin" not in preflight.headers


async def test_global_allowlist_admits_listed_clients(tmp_path, aiohttp_client):
    world = await local_gateway(tmp_path, aiohttp_client, network={"client_allowlist": ["10.0.0.0/8", "127.0.0.0/8"]})
    response = await world.client.get(world.url(KEY), headers=world.auth())
    assert response.status == 200
    assert await response.read() == world.objects[KEY].data
    # Once admitted, the token checks run as usual.
    await refusal(await world.client.get(world.url(KEY), headers={"Authorization": "Bearer x"}), 401, "invalid_token")


async def test_ipv6_loopback_rule_does_not_admit_ipv4_loopback(tmp_path, aiohttp_client):
    world = await local_gateway(tmp_path, aiohttp_client, network={"client_allowlist": ["::1/128"]})
    await refusal(await world.client.get(world.url(KEY), headers=world.auth()), 403, "ip_not_allowed")


BEHIND_PROXY = {"trusted_proxies": ["127.0.0.1"], "client_allowlist": ["192.0.2.0/24", "2001:db8::/32"]}


@pytest.mark.parametrize(
    ("forwarded", "status"),
    [
        ("192.0.2.5", 200),
        ("::ffff:192.0.2.5", 200),  # IPv4-mapped IPv6 matches the IPv4 rule
        ("2001:db8::7", 200),
        ("[2001:db8::7]:4711", 200),
        ("198.51.100.1", 403),
        ("2001:db9::1", 403),
        ("192.0.2.5, 198.51.100.1", 403),  # the right-most hop is the client, not the spoofed left one
        ("198.51.100.1, 192.0.2.5", 200),
        ("192.0.2.5, 127.0.0.1", 200),  # a second trusted proxy is skipped
        ("192.0.2.5, garbage", 403),  # unknown client: refused, never the proxy's address
    ],
)
async def test_client_behind_a_trusted_proxy(tmp_path, aiohttp_client, forwarded, status):
    world = await local_gateway(tmp_path, aiohttp_client, network=BEHIND_PROXY)
    response = await world.client.get(world.url(KEY), headers={**world.auth(), "X-Forwarded-For": forwarded})
    assert response.status == status, await response.text()
    if status == 403:
        assert (await response.json())["error"] == "ip_not_allowed"


async def test_several_x_forwarded_for_headers_are_one_chain(tmp_path, aiohttp_client):
    world = await local_gateway(tmp_path, aiohttp_client, network=BEHIND_PROXY)
    headers = [("Authorization", world.auth()["Authorization"])]
    allowed_last = [*headers, ("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-For", "192.0.2.5")]
    assert (await world.client.get(world.url(KEY), headers=allowed_last)).status == 200
    refused_last = [*headers, ("X-Forwarded-For", "192.0.2.5"), ("X-Forwarded-For", "198.51.100.1")]
    assert (await world.client.get(world.url(KEY), headers=refused_last)).status == 403


async def test_spoofed_x_forwarded_for_from_an_untrusted_peer_is_ignored(tmp_path, aiohttp_client, caplog):
    world = await local_gateway(tmp_path, aiohttp_client, network={"client_allowlist": ["192.0.2.0/24"]})
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        response = await world.client.get(
            world.url(KEY), headers={**world.auth(), "X-Forwarded-For": "192.0.2.5", "Forwarded": "for=192.0.2.5"}
        )
        assert "127.0.0.1 is not allowed" in await refusal(response, 403, "ip_not_allowed")
        await eventually(lambda: access_lines(caplog), "the access log line")
    (line,) = access_lines(caplog)
    assert (line["remote"], line["peer"], line["error"]) == ("127.0.0.1", "127.0.0.1", "ip_not_allowed")


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]


async def test_access_log_names_the_resolved_client(tmp_path, aiohttp_client, caplog):
    world = await local_gateway(tmp_path, aiohttp_client, network={"trusted_proxies": ["127.0.0.0/8"]})
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        for forwarded in ("198.51.100.1, [2001:db8::7]:4711", "not-an-address"):
            response = await world.client.get(world.url(KEY), headers={**world.auth(), "X-Forwarded-For": forwarded})
            assert response.status == 200  # no allowlist: an unknown client is served, logged as unknown
            await response.read()
        await eventually(lambda: len(access_lines(caplog)) == 2, "two access log lines")
    first, second = access_lines(caplog)
    assert (first["remote"], first["peer"]) == ("2001:db8::7", "127.0.0.1")
    assert (second["remote"], second["peer"]) == (None, "127.0.0.1")


async def test_rfc_7239_forwarded_header(tmp_path, aiohttp_client):
    network = {**BEHIND_PROXY, "forwarded_header": "Forwarded"}
    world = await local_gateway(tmp_path, aiohttp_client, network=network)
    auth = world.auth()

    async def status(**headers: str) -> int:
        return (await world.client.get(world.url(KEY), headers={**auth, **headers})).status

    assert await status(Forwarded='for="[2001:db8::7]:4711";proto=https') == 200
    assert await status(Forwarded="for=198.51.100.1, for=192.0.2.5;proto=https") == 200
    assert await status(Forwarded="for=192.0.2.5, for=198.51.100.1") == 403
    assert await status(Forwarded="for=_hidden") == 403
    assert await status(Forwarded="proto=https") == 403  # no for=: unknown client
    # Only the configured header is read: an X-Forwarded-For the proxy passed along counts for nothing.
    assert await status(Forwarded="for=198.51.100.1", **{"X-Forwarded-For": "192.0.2.5"}) == 403


async def test_storage_allowlist_applies_once_the_storage_is_known(tmp_path, aiohttp_client):
    world = await local_gateway(
        tmp_path,
        aiohttp_client,
        storage={"client_allowlist": ["192.0.2.0/24", "2001:db8::/32"]},
        network={"trusted_proxies": ["127.0.0.1"]},
    )
    auth = world.auth()

    async def get(forwarded: str, headers: dict[str, str] = auth, url: str | None = None) -> aiohttp.ClientResponse:
        return await world.client.get(url or world.url(KEY), headers={**headers, "X-Forwarded-For": forwarded})

    for inside in ("192.0.2.5", "2001:db8::7", "::ffff:192.0.2.9"):
        response = await get(inside)
        assert response.status == 200, inside
        assert await response.read() == world.objects[KEY].data
    for outside in ("198.51.100.1", "2001:db9::1", "garbage"):
        message = await refusal(await get(outside), 403, "ip_not_allowed_for_storage")
        assert message.endswith(f"for storage {world.settings.storages[0].id}")
    # The project route resolves the storage too; HEAD is checked as well.
    await refusal(
        await get("198.51.100.1", world.auth(projects=[PROJECT]), world.project_url(KEY)),
        403,
        "ip_not_allowed_for_storage",
    )
    head = await world.client.head(world.url(KEY), headers={**auth, "X-Forwarded-For": "198.51.100.1"})
    assert head.status == 403
    # The storage is known only after the token: a bad token is 401 whatever the address.
    await refusal(await get("198.51.100.1", {"Authorization": "Bearer x"}), 401, "invalid_token")


# ---------------------------------------------------------------- load shedding through a real gateway

HELD_HEAD = 1024  # bytes sent before a held stream waits for the gate


@dataclass
class Gate:
    """Media downloads send their headers and first bytes, then wait until the test opens the gate."""

    opened: asyncio.Event
    waiting: int = 0


def held(proxy: FaultProxy, gate: Gate):  # type: ignore[no-untyped-def]
    async def fault(request: web.Request) -> web.StreamResponse:
        status, headers, body = await proxy._real(request)
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[:HELD_HEAD])
        gate.waiting += 1
        try:
            await gate.opened.wait()
        finally:
            gate.waiting -= 1
        await response.write(body[HELD_HEAD:])
        await response.write_eof()
        return response

    return fault


@dataclass
class Held:
    world: MediaWorld
    app: web.Application
    gate: Gate
    proxy: FaultProxy

    async def get(self, sub: str = "alice", **headers: str) -> aiohttp.ClientResponse:
        auth = self.world.auth(sub=sub)
        return await self.world.client.get(self.world.url(KEY), headers={**auth, **headers})

    @property
    def active(self) -> int:
        return self.app[LIMITER].active


@pytest.fixture(params=["aiohttp", "front"])
def held_lane(request) -> str:
    return request.param


@pytest.fixture
async def held_gateway(
    request, held_lane, emulator, aiohttp_server, aiohttp_client, fastlane, monkeypatch, tmp_path
) -> AsyncIterator[Held]:
    """Downloads held at a gate after their first bytes; served by aiohttp alone and by `gateway
    serve`'s front (every media answer's lane checked)."""
    limits = {"max_streams": 2, "not_ready_after_shedding": 0.0, "retry_after": 3, **getattr(request, "param", {})}
    proxy = FaultProxy(emulator.url)
    gate = Gate(asyncio.Event())
    proxy.otherwise = held(proxy, gate)
    server = await aiohttp_server(proxy.app, host="127.0.0.1")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"127.0.0.1:{server.port}")
    bucket = f"shed-{uuid.uuid4().hex[:8]}"
    objects = [o for o in sample_objects() if o.key == KEY]
    storage = seed("gcs", bucket, objects, tmp_path, emulator)
    settings = build_settings([storage], tmp_path, limits=limits)
    world = MediaWorld("gcs", bucket, {o.key: o for o in objects}, settings)
    app = create_app(settings)
    (world.task_a,) = await app[REGISTRY].add_tasks(PROJECT, [{"data": {"video": world.uri(KEY)}}])
    world.client = await (fastlane(app) if held_lane == "front" else aiohttp_client(app, auto_decompress=False))
    try:
        yield Held(world, app, gate, proxy)
    finally:
        gate.opened.set()
        proxy.release.set()


async def test_stream_cap_sheds_with_503_and_recovers(held_gateway: Held):
    rig = held_gateway
    data = rig.world.objects[KEY].data
    shed = sample("gateway_shed_requests_total", reason="process_streams")
    first, second = await rig.get("alice"), await rig.get("bob")
    assert (first.status, second.status) == (200, 200)  # headers are out; both bodies wait at the gate
    assert rig.active == 2  # slots are taken before the upstream request, so held once headers arrived
    await eventually(lambda: rig.gate.waiting == 2, "both downloads to wait at the gate")

    third = await rig.get("carol")
    assert third.headers["Retry-After"] == "3"
    assert "stream limit" in await refusal(third, 503, "overloaded")
    assert sample("gateway_shed_requests_total", reason="process_streams") - shed == 1
    assert rig.proxy.media_requests == 2  # a shed request never reaches the storage
    # HEAD streams nothing and is not shed.
    head = await rig.world.client.head(rig.world.url(KEY), headers=rig.world.auth())
    assert head.status == 200 and int(head.headers["Content-Length"]) == len(data)

    ready = await rig.world.client.get("/readyz")
    assert ready.status == 503
    assert (await ready.json())["checks"]["streams"] == "shedding: at the stream limit (2 of 2)"

    rig.gate.opened.set()
    assert await first.read() == data and await second.read() == data
    await eventually(lambda: rig.active == 0, "the stream slots to be released")
    ready = await rig.world.client.get("/readyz")
    assert ready.status == 200 and (await ready.json())["checks"]["streams"] == "ok"
    again = await rig.get("carol")
    assert again.status == 200 and await again.read() == data


@pytest.mark.parametrize("held_gateway", [{"max_streams": 10, "max_streams_per_subject": 1}], indirect=True)
async def test_stream_cap_per_subject_is_429(held_gateway: Held):
    rig = held_gateway
    shed = sample("gateway_shed_requests_total", reason="subject_streams")
    alice = await rig.get("alice")
    assert alice.status == 200
    second = await rig.get("alice")
    assert second.headers["Retry-After"] == "3"
    await refusal(second, 429, "too_many_streams")
    assert sample("gateway_shed_requests_total", reason="subject_streams") - shed == 1
    bob = await rig.get("bob")
    assert bob.status == 200
    assert (await rig.world.client.get("/readyz")).status == 200  # one subject's cap is not overload
    rig.gate.opened.set()
    assert await alice.read() == await bob.read() == rig.world.objects[KEY].data
    await eventually(lambda: rig.active == 0, "the stream slots to be released")
    assert (await rig.get("alice")).status == 200


@pytest.mark.parametrize("held_gateway", [{"max_streams": 1}], indirect=True)
async def test_stream_slot_is_released_when_the_client_leaves(held_gateway: Held):
    rig = held_gateway
    response = await rig.get()
    assert response.status == 200 and rig.active == 1
    response.close()  # hang up while the body waits at the gate
    rig.gate.opened.set()  # the gateway's next write fails: the slot must come back
    await eventually(lambda: rig.active == 0, "the slot of the abandoned stream to be released")
    again = await rig.get()
    assert again.status == 200 and await again.read() == rig.world.objects[KEY].data


@pytest.mark.parametrize("held_gateway", [{"max_streams": 1}], indirect=True)
async def test_stream_slot_is_released_when_the_upstream_breaks(held_gateway: Held):
    rig = held_gateway
    rig.proxy.script = [rig.proxy.cut_after(HELD_HEAD)]
    response = await rig.get()
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    await eventually(lambda: rig.active == 0, "the slot of the broken stream to be released")
    rig.gate.opened.set()
    again = await rig.get()
    assert again.status == 200 and await again.read() == rig.world.objects[KEY].data


@pytest.mark.parametrize("held_gateway", [{"max_streams": 1, "not_ready_after_shedding": 60.0}], indirect=True)
async def test_readyz_stays_not_ready_for_a_while_after_shedding(held_gateway: Held):
    rig = held_gateway
    first = await rig.get()
    await refusal(await rig.get("bob"), 503, "overloaded")
    rig.gate.opened.set()
    await first.read()
    await eventually(lambda: rig.active == 0, "the stream slot to be released")
    ready = await rig.world.client.get("/readyz")
    assert ready.status == 503
    assert (await ready.json())["checks"]["streams"] == "shedding: refused streams in the last 60 s"


# ---------------------------------------------------------------- gateway ip-filter-config

NETWORK = "projects/my-project/global/networks/default"


def ip_filter(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any] | None, str]:
    code = main(["ip-filter-config", *argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def assert_documented_shape(document: dict[str, Any]) -> None:
    """The --ip-filter-file shape of `gcloud storage buckets update` (README cites the page)."""
    assert set(document) <= {
        "mode",
        "publicNetworkSource",
        "vpcNetworkSources",
        "allowCrossOrgVpcs",
        "allowAllServiceAgentAccess",
    }
    assert document["mode"] in ("Enabled", "Disabled")
    assert isinstance(document["allowCrossOrgVpcs"], bool)
    assert isinstance(document["allowAllServiceAgentAccess"], bool)
    if "publicNetworkSource" in document:
        assert set(document["publicNetworkSource"]) == {"allowedIpCidrRanges"}
    for source in document.get("vpcNetworkSources", []):
        assert set(source) == {"network", "allowedIpCidrRanges"}
    ranges = [
        *document.get("publicNetworkSource", {}).get("allowedIpCidrRanges", []),
        *(r for s in document.get("vpcNetworkSources", []) for r in s["allowedIpCidrRanges"]),
    ]
    assert all(isinstance(ip_network(r), IPv4Network | IPv6Network) for r in ranges)
    assert len(ranges) <= 200 and len(document.get("vpcNetworkSources", [])) <= 25


def test_ip_filter_config_public_and_vpc_sources(capsys):
    code, document, _ = ip_filter(
        capsys,
        *("--cidr", "203.0.113.7", "--cidr", "2001:DB8::/32"),
        *("--vpc-network", NETWORK, "--vpc-cidr", "10.0.0.0/8", "--vpc-cidr", "fd00::/8"),
        *("--vpc-network", "projects/other-project/global/networks/vpc-2", "--vpc-cidr", "0.0.0.0/0"),
        "--allow-service-agents",
    )
    assert code == 0 and document is not None
    assert_documented_shape(document)
    assert document == {
        "mode": "Enabled",
        "publicNetworkSource": {"allowedIpCidrRanges": ["203.0.113.7/32", "2001:db8::/32"]},
        "vpcNetworkSources": [
            {"network": NETWORK, "allowedIpCidrRanges": ["10.0.0.0/8", "fd00::/8"]},
            {"network": "projects/other-project/global/networks/vpc-2", "allowedIpCidrRanges": ["0.0.0.0/0"]},
        ],
        "allowCrossOrgVpcs": False,
        "allowAllServiceAgentAccess": True,
    }
    code, document, _ = ip_filter(capsys, "--mode", "Disabled", "--allow-cross-org-vpcs")
    assert code == 0 and document is not None
    assert_documented_shape(document)
    assert document == {"mode": "Disabled", "allowCrossOrgVpcs": True, "allowAllServiceAgentAccess": False}


def test_ip_filter_config_limits(capsys):
    many = [arg for n in range(200) for arg in ("--cidr", f"198.18.{n // 256}.{n % 256}")]
    code, document, _ = ip_filter(capsys, *many)
    assert code == 0 and document is not None
    assert_documented_shape(document)
    code, _, err = ip_filter(capsys, *many, "--vpc-network", NETWORK, "--vpc-cidr", "10.0.0.0/8")
    assert code == 2
    assert err.strip() == "gateway: --cidr/--vpc-cidr: 201 ranges; a bucket IP filter allows at most 200 in all"
    networks = [
        arg
        for n in range(25)
        for arg in ("--vpc-network", f"projects/p-{n:04d}/global/networks/n", "--vpc-cidr", "10.0.0.0/8")
    ]
    code, document, _ = ip_filter(capsys, *networks)
    assert code == 0 and document is not None and len(document["vpcNetworkSources"]) == 25
    extra = ("--vpc-network", "projects/p-9999/global/networks/n", "--vpc-cidr", "10.0.0.0/8")
    code, _, err = ip_filter(capsys, *networks, *extra)
    assert code == 2 and "26 networks; a bucket IP filter allows at most 25" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cidr", "203.0.113.0/33"], "gateway: --cidr: '203.0.113.0/33' is not an IP network"),
        (["--cidr", "gateway.example"], "gateway: --cidr: 'gateway.example' is not an IP network"),
        (["--cidr", "203.0.113.9/24"], "--cidr: '203.0.113.9/24' has host bits set (the network is 203.0.113.0/24)"),
        (["--vpc-network", NETWORK, "--vpc-cidr", "10.0.0.1/8"], "gateway: --vpc-cidr: '10.0.0.1/8' has host bits set"),
        (["--vpc-cidr", "10.0.0.0/8", "--vpc-network", NETWORK], "gateway: --vpc-cidr: '10.0.0.0/8' comes before"),
        (["--vpc-network", "default", "--vpc-cidr", "10.0.0.0/8"], "gateway: --vpc-network: 'default' is not like"),
        (["--vpc-network", "projects/p/global/networks/n", "--vpc-cidr", "10.0.0.0/8"], "has project id 'p', which is"),
        (["--vpc-network", "projects/my-project/global/networks/Net_1"], "has network name 'Net_1', which is not"),
        (["--vpc-network", NETWORK], "needs --vpc-cidr ranges"),
        (["--vpc-network", NETWORK, "--vpc-cidr", "10.0.0.0/8"] * 2, "is given twice"),
        ([], "an enabled filter without --cidr or --vpc-network would refuse every request"),
    ],
)
def test_ip_filter_config_refuses_bad_input_in_one_line(capsys, argv, message):
    code, _, err = ip_filter(capsys, *argv)
    assert code == 2
    assert err.startswith("gateway: ") and message in err
    assert err.count("\n") == 1


# ---------------------------------------------------------------- end to end: a real `gateway serve`


@pytest.mark.slow
def test_serve_process_behind_a_trusted_proxy(start_gateway, emulator):  # noqa: F811
    """The real command, configured from the environment, over TCP: allowlist, chain, log, metrics."""
    bucket = f"net-proc-{uuid.uuid4().hex[:8]}"
    emulator.create_bucket(bucket)
    data = b"inside the boundary" * 100
    emulator.upload(bucket, "video/a.bin", data, "application/octet-stream")
    env = {"GATEWAY_NETWORK_TRUSTED_PROXIES": "127.0.0.1", "GATEWAY_NETWORK_CLIENT_ALLOWLIST": "192.0.2.0/24"}
    gateway = start_gateway(bucket, ["video/a.bin"], env=env)
    path, auth = gateway.path("video/a.bin"), gateway.auth()

    status, _, body = gateway.request(path, {**auth, "X-Forwarded-For": "192.0.2.5"})
    assert (status, body) == (200, data)
    status, _, body = gateway.request(path, auth)  # the proxy's own request: 127.0.0.1 is not allowed
    assert status == 403 and json.loads(body)["error"] == "ip_not_allowed"
    status, _, body = gateway.request(path, {"Authorization": "Bearer x", "X-Forwarded-For": "192.0.2.5, 198.51.100.1"})
    assert status == 403 and json.loads(body)["message"] == "client address 198.51.100.1 is not allowed"

    status, _, body = gateway.request("/metrics", {"X-Forwarded-For": "192.0.2.9"})
    assert status == 200
    assert metric(parse_metrics(body.decode()), "gateway_auth_failures_total", reason="ip_not_allowed") == 2
    assert metric(parse_metrics(body.decode()), "gateway_auth_failures_total", reason="invalid_token") == 0

    def logged() -> list[dict[str, Any]]:
        lines = (gateway.directory / "stdout.log").read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    route = path.partition("?")[0]  # the access log never holds the query string
    wait_until(lambda: len([line for line in logged() if line["path"] == route]) == 3, what="three access log lines")
    media = [(line["status"], line["remote"], line["peer"]) for line in logged() if line["path"] == route]
    assert media == [
        (200, "192.0.2.5", "127.0.0.1"),
        (403, "127.0.0.1", "127.0.0.1"),
        (403, "198.51.100.1", "127.0.0.1"),
    ]


async def test_presign_redirects_hold_no_stream_slot_but_pass_the_storage_allowlist(
    tmp_path, emulator, aiohttp_client, monkeypatch
):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.host)
    bucket = f"net-signed-{uuid.uuid4().hex[:8]}"
    objects = [o for o in sample_objects() if o.key == KEY]
    signed = seed("gcs", bucket, objects, tmp_path, emulator)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    signed.update(presign=True, google_application_credentials=service_account_json(key))
    signed["client_allowlist"] = ["192.0.2.0/24"]
    settings = build_settings([signed], tmp_path, limits={"max_streams": 1}, network={"trusted_proxies": ["127.0.0.1"]})
    app = create_app(settings)
    (task,) = await app[REGISTRY].add_tasks(PROJECT, [{"data": {"video": f"gs://{bucket}/{KEY}"}}])
    world = MediaWorld("gcs", bucket, {o.key: o for o in objects}, settings, task_a=task)
    client = await aiohttp_client(app)
    signing = sample("gateway_signed_urls_total", method="local")
    with app[LIMITER].slot("someone else"):  # the process is at its cap
        inside = {**world.auth(), "X-Forwarded-For": "192.0.2.5"}
        redirect = await client.get(world.url(KEY), headers=inside, allow_redirects=False)
        assert redirect.status == 303 and "X-Goog-Signature=" in redirect.headers["Location"]
        outside = {**world.auth(), "X-Forwarded-For": "198.51.100.1"}
        refused = await client.get(world.url(KEY), headers=outside, allow_redirects=False)
        await refusal(refused, 403, "ip_not_allowed_for_storage")
    assert sample("gateway_signed_urls_total", method="local") - signing == 1  # nothing signed for the refused
