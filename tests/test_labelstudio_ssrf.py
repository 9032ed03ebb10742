"""`gateway label-studio-ssrf`: Label Studio's default banned subnets with only the gateway cut out."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.cli import main
from gateway.labelstudio_ssrf import LABEL_STUDIO_DEFAULT_BANNED_SUBNETS, banned_subnets_except


def banned(subnets: list[str], address: str) -> bool:
    """Label Studio's own test (core/utils/io.py validate_ip): inside any listed network."""
    return any(ipaddress.ip_address(address) in ipaddress.ip_network(s) for s in subnets)


@pytest.mark.parametrize("gateway", ["127.0.0.1", "10.20.30.40", "192.168.1.7", "fd00::5"])
def test_only_the_gateway_is_let_through(gateway: str) -> None:
    subnets = banned_subnets_except([gateway])
    assert not banned(subnets, gateway)
    for other in ("127.0.0.2", "127.255.255.254", "10.0.0.1", "169.254.169.254", "172.16.0.1", "192.168.0.1", "::1"):
        if other != gateway:
            assert banned(subnets, other), other
    everything = [ipaddress.ip_network(s) for s in LABEL_STUDIO_DEFAULT_BANNED_SUBNETS]
    covered = sum(n.num_addresses for n in map(ipaddress.ip_network, subnets) if n.version == 4)
    assert covered == sum(n.num_addresses for n in everything if n.version == 4) - (":" not in gateway)


def test_a_network_can_be_let_through_and_public_addresses_stay_allowed() -> None:
    subnets = banned_subnets_except(["10.1.0.0/16"])
    assert not banned(subnets, "10.1.2.3") and banned(subnets, "10.2.0.1")
    assert not banned(subnets, "8.8.8.8")


def test_the_command_prints_label_studios_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["label-studio-ssrf", "--allow", "10.20.30.40"]) == 0
    lines = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["USE_DEFAULT_BANNED_SUBNETS"] == "false"
    assert lines["USER_ADDITIONAL_BANNED_SUBNETS"].split(",") == banned_subnets_except(["10.20.30.40"])
    assert main(["label-studio-ssrf", "--allow", "gateway.internal"]) == 2
    assert "--allow 'gateway.internal': not an IP address or network" in capsys.readouterr().err
