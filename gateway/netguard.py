"""The network boundary: who the client is, whether it may come in, how many streams it may hold.

* `client_address` finds the client behind trusted proxies. Only a peer listed in
  `[network] trusted_proxies` is believed about the client; the forwarded chain is read from the
  right and the first hop that is not a trusted proxy is the client. Entries further left were
  written by that client and are never looked at, so a client cannot spoof its address by sending
  the header itself. An entry that is not an IP address where the client should be makes the
  client *unknown* (None), which no allowlist admits — garbage is never trusted, and never skipped.
* `AddressSet` is a CIDR allowlist; IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`) and ranges
  are taken as the IPv4 ones, so one IPv4 rule covers a dual-stack socket.
* `StreamLimiter` caps concurrent media streams per process and per token subject, refusing at
  once (503 / 429 with Retry-After) instead of queueing, and tells /readyz while it sheds.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import time
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address, IPv6Address

from multidict import CIMultiDictProxy

from . import metrics
from .config import LimitSettings, NetworkSettings, parse_network
from .errors import Refused

IPAddress = IPv4Address | IPv6Address

_PORT = re.compile(r":\d{1,5}")
_LONGEST_NODE = 100  # '"[IPv6 with an embedded IPv4 and a zone]:port"' fits; longer text is garbage


class AddressSet:
    """A set of networks; empty means "no rule" (callers decide what that allows)."""

    def __init__(self, cidrs: Iterable[str]) -> None:
        networks = [parse_network(c) for c in cidrs]
        # (version, first, last) as integers: a few comparisons instead of ipaddress's __contains__
        self._ranges = tuple((n.version, int(n.network_address), int(n.broadcast_address)) for n in networks)

    def __bool__(self) -> bool:
        return bool(self._ranges)

    def __contains__(self, ip: IPAddress) -> bool:
        version, value = ip.version, int(ip)
        return any(v == version and first <= value <= last for v, first, last in self._ranges)

    @staticmethod
    @functools.lru_cache(maxsize=1024)
    def of(cidrs: tuple[str, ...]) -> AddressSet:
        """One compiled set per distinct list (storage allowlists are checked per request)."""
        return AddressSet(cidrs)


def parse_node(text: str) -> IPAddress | None:
    """An address as proxies write it: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`, `[2001:db8::1]:443`.

    None for anything else (`unknown`, RFC 7239 obfuscated `_hidden`, garbage). IPv4-mapped IPv6
    addresses come back as IPv4.
    """
    return None if len(text) > _LONGEST_NODE else _parse_node(text)


@functools.lru_cache(maxsize=4096)  # peers and proxy hops repeat; parsing an address costs microseconds
def _parse_node(text: str) -> IPAddress | None:
    text = text.strip()
    if text.startswith('"') and text.endswith('"') and len(text) >= 2:
        text = text[1:-1]
    if text.startswith("["):
        host, closed, port = text[1:].partition("]")
        if not closed or (port and not _PORT.fullmatch(port)):
            return None
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not _PORT.fullmatch(":" + port):
            return None
    else:
        host = text
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return (ip.ipv4_mapped or ip) if isinstance(ip, IPv6Address) else ip


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    parts, current, quoted, escaped = [], [], False, False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


def x_forwarded_for(values: Iterable[str]) -> list[str]:
    """The hops of every `X-Forwarded-For` header, concatenated in order, left (first) to right."""
    return [hop for value in values for hop in value.split(",")]


def forwarded_for(values: Iterable[str]) -> list[str]:
    """The `for=` node of each element of every RFC 7239 `Forwarded` header, in order.

    An element without `for=` (or with it twice) yields "", which `parse_node` refuses.
    """
    hops = []
    for value in values:
        for element in _split_outside_quotes(value, ","):
            nodes = [
                pair.partition("=")[2]
                for pair in _split_outside_quotes(element, ";")
                if pair.partition("=")[0].strip().lower() == "for"
            ]
            hops.append(nodes[0] if len(nodes) == 1 else "")
    return hops


_CHAINS: dict[str, Callable[[Iterable[str]], list[str]]] = {
    "x-forwarded-for": x_forwarded_for,
    "forwarded": forwarded_for,
}


def client_address(peer: str | None, hops: list[str], trusted: AddressSet) -> IPAddress | None:
    """The client: the socket peer, or — when the peer is a trusted proxy — the right-most hop of
    the forwarded chain that is not a trusted proxy itself (the left-most one when all are)."""
    client = parse_node(peer) if peer else None
    if client is None or client not in trusted:
        return client
    for hop in reversed(hops):
        address = parse_node(hop)
        if address is None:
            return None  # garbage where a trusted proxy's client should be: unknown
        client = address
        if address not in trusted:
            break
    return client


class ClientGuard:
    """Resolves the client of each request and applies the client allowlists."""

    def __init__(self, network: NetworkSettings) -> None:
        self.trusted = AddressSet(network.trusted_proxies)
        self.allowed = AddressSet(network.client_allowlist)
        self._header = network.forwarded_header
        self._chain = _CHAINS[network.forwarded_header.lower()]

    def client(self, peer: str | None, headers: CIMultiDictProxy[str]) -> IPAddress | None:
        if not self.trusted:
            return parse_node(peer) if peer else None
        return client_address(peer, self._chain(headers.getall(self._header, ())), self.trusted)

    def admit(self, client: IPAddress | None) -> None:
        check_allowlist(self.allowed, client, "ip_not_allowed", "")


def check_allowlist(allowed: AddressSet, client: IPAddress | None, reason: str, scope: str) -> None:
    """403 unless the allowlist is empty or holds the client (an unknown client never passes)."""
    if not allowed or (client is not None and client in allowed):
        return
    who = "the client address could not be determined" if client is None else f"client address {client} is not allowed"
    raise Refused(403, reason, f"{who}{scope}")


def admit_to_storage(storage_id: str, allowlist: tuple[str, ...], client: IPAddress | None) -> None:
    """A storage's own `client_allowlist` (checked once the token and the task have named it)."""
    if allowlist:
        check_allowlist(AddressSet.of(allowlist), client, "ip_not_allowed_for_storage", f" for storage {storage_id}")


class StreamLimiter:
    """Concurrent media streams per process and per token subject; refuses beyond the caps.

    Synchronous bookkeeping on the event loop (no awaits between check and count), so it needs no
    lock. `shedding()` stays true while the process is at its cap and for
    `not_ready_after_shedding` seconds after it last refused, so a load balancer probing /readyz
    routes new clients elsewhere instead of into more 503s.
    """

    def __init__(self, limits: LimitSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = limits
        self._clock = clock
        self.active = 0
        self.by_subject: dict[str, int] = {}
        self._last_shed: float | None = None

    def _cap_reached(self, subject: str) -> str | None:
        """Which cap a new stream of `subject` would exceed: "process", "subject", or None."""
        limits = self._limits
        if limits.max_streams and self.active >= limits.max_streams:
            return "process"
        if limits.max_streams_per_subject and self.by_subject.get(subject, 0) >= limits.max_streams_per_subject:
            return "subject"
        return None

    def admits(self, subject: str) -> bool:
        """Whether `slot(subject)` would be given now (asked without counting a refusal)."""
        return self._cap_reached(subject) is None

    def slot(self, subject: str) -> _Slot:
        """Held (`with limiter.slot(sub):`) from before the first upstream request until the body
        is sent or abandoned; refused at once beyond a cap."""
        held = self.by_subject.get(subject, 0)
        cap = self._cap_reached(subject)
        if cap == "process":
            self._last_shed = self._clock()
            self._refuse(503, "overloaded", "process_streams", "the gateway is at its stream limit; retry later")
        if cap == "subject":
            self._refuse(
                429,
                "too_many_streams",
                "subject_streams",
                f"this token's subject already holds {held} streams (the limit); retry when one ends",
            )
        self.active += 1
        self.by_subject[subject] = held + 1
        return _Slot(self, subject)

    def _release(self, subject: str) -> None:
        self.active -= 1
        left = self.by_subject[subject] - 1
        if left:
            self.by_subject[subject] = left
        else:
            del self.by_subject[subject]

    def _refuse(self, status: int, reason: str, metric: str, message: str) -> None:
        metrics.SHED.labels(metric).inc()
        raise Refused(status, reason, message, headers={"Retry-After": str(self._limits.retry_after)})

    def shedding(self) -> str | None:
        """Why this process should not get new clients now, or None."""
        limits = self._limits
        if limits.max_streams and self.active >= limits.max_streams:
            return f"at the stream limit ({self.active} of {limits.max_streams})"
        if self._last_shed is not None and self._clock() - self._last_shed < limits.not_ready_after_shedding:
            return f"refused streams in the last {limits.not_ready_after_shedding:g} s"
        return None


class _Slot:
    """A taken stream slot; leaving the `with` block (normally, by an error or by cancellation)
    gives it back. A plain class: a @contextmanager generator costs a few microseconds per request."""

    __slots__ = ("_limiter", "_subject")

    def __init__(self, limiter: StreamLimiter, subject: str) -> None:
        self._limiter: StreamLimiter | None = limiter
        self._subject = subject

    def __enter__(self) -> None:
        return None

    def __exit__(self, *_exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Give the slot back (once; later calls do nothing)."""
        limiter, self._limiter = self._limiter, None
        if limiter is not None:
            limiter._release(self._subject)
