"""The least loosening of Label Studio's SSRF protection that lets it send webhooks to the gateway.

Label Studio 1.23 refuses (at creation and again at every send) a webhook URL that resolves into
one of its default banned subnets — loopback and the private ranges included, where a gateway
usually lives. Switching the protection off opens every internal address to anyone who may create
a webhook; instead, `USE_DEFAULT_BANNED_SUBNETS=false` with `USER_ADDITIONAL_BANNED_SUBNETS` set to
the same default list minus the gateway's own address keeps every other address banned.
"""

from __future__ import annotations

import ipaddress

# Label Studio 1.23's default list (label_studio/core/utils/io.py, validate_ip), in its order.
LABEL_STUDIO_DEFAULT_BANNED_SUBNETS = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "233.252.0.0/24",
    "240.0.0.0/4",
    "255.255.255.255/32",
    "::/128",
    "::1/128",
    "::ffff:0:0/96",
    "::ffff:0:0:0/96",
    "64:ff9b::/96",
    "64:ff9b:1::/48",
    "100::/64",
    "2001:0000::/32",
    "2001:20::/28",
    "2001:db8::/32",
    "2002::/16",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
)


def banned_subnets_except(allowed: list[str]) -> list[str]:
    """Label Studio's default banned subnets with only the `allowed` addresses (or networks) cut
    out; raises ValueError naming an entry that is not an address or network."""
    holes = []
    for entry in allowed:
        try:
            holes.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"--allow {entry!r}: not an IP address or network") from None
    networks = [ipaddress.ip_network(s) for s in LABEL_STUDIO_DEFAULT_BANNED_SUBNETS]
    for hole in holes:
        cut: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for network in networks:
            if network.version == hole.version and hole.subnet_of(network):  # type: ignore[arg-type]
                cut.extend(network.address_exclude(hole))  # type: ignore[arg-type]
            elif network.version == hole.version and network.subnet_of(hole):  # type: ignore[arg-type]
                continue
            else:
                cut.append(network)
        networks = cut
    return [str(n) for n in networks]


def label_studio_env(allowed: list[str]) -> dict[str, str]:
    """The two environment variables for Label Studio (its SSRF protection stays on)."""
    return {
        "USE_DEFAULT_BANNED_SUBNETS": "false",
        "USER_ADDITIONAL_BANNED_SUBNETS": ",".join(banned_subnets_except(allowed)),
    }
