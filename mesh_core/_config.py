"""Server options, gathered in one typed object with the CLI's names."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "ServerOptions"]

_Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


#: 4 MiB: big enough for the 1 MiB payloads ordinary apps send, small enough
#: that one client cannot make the server buffer the reference's 100 MiB.
DEFAULT_MAX_MESSAGE_SIZE: Final = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """Times are in seconds; sizes in bytes.

    ``ping_interval``/``max_missed_pongs``/``latency_interval`` default to the
    reference's 30 s / 1 / 5 s: the reference client reconnects when it hears
    no ping for ``2 x 30 s``, so pings must not be turned off (0 disables them
    for tests and for clients that do not need them).

    The limits default to values no ordinary client reaches, so that one
    hostile client cannot take more than its share; docs/HARDENING.md says
    what happens past each one.
    """

    ping_interval: float = 30.0
    max_missed_pongs: int = 1
    latency_interval: float = 5.0
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    #: arrays/objects nested deeper than this (the frame itself is level 1)
    #: make the message a violation
    max_json_depth: int = 64
    #: encoded JSON size of one connection's or room's metadata (0: no limit)
    max_metadata_size: int = 64 * 1024
    #: requests of one connection running at once; later ones wait their turn
    max_requests_in_flight: int = 64
    #: requests of one connection waiting for a slot before the server stops
    #: reading from it (TCP back-pressure on the flooding client)
    max_queued_requests: int = 1024
    #: WebSocket connections one server holds; more are refused with HTTP 503
    #: (0: no limit)
    max_connections: int = 10_000
    #: invalid frames one connection may send; one more closes it with 1008
    max_violations: int = 100
    #: the most messages a channel keeps, and the most one history read
    #: returns (``historyLimit``/``limit`` beyond it are refused)
    max_channel_history: int = 1000
    #: ``Origin`` header values allowed to upgrade, e.g.
    #: ``["https://app.example.com"]`` (``None``: any; ``"*"`` in the list:
    #: any, including none; ``None`` in the list: requests without an
    #: ``Origin``, i.e. non-browser clients); stored as a normalised tuple
    allowed_origins: Sequence[str | None] | None = None
    #: bytes queued for one client before it is dropped as a slow consumer
    max_send_buffer: int = 16 * 1024 * 1024
    #: a socket that has not completed the upgrade by then is dropped
    handshake_timeout: float = 10.0
    #: how long to wait for the peer's close frame after sending ours
    close_timeout: float = 5.0
    #: how long graceful shutdown waits for requests in flight
    shutdown_timeout: float = 10.0
    #: proxies whose ``X-Forwarded-For`` is believed: addresses or networks
    #: (``"10.0.0.0/8"``), or ``"*"`` for any peer; the connection's peer is
    #: then the nearest address in that header that is not a trusted proxy.
    #: Empty (the default): the header is ignored, so no client can choose
    #: the address it is logged and authenticated under.
    forwarded_allow_ips: Sequence[str] = ()

    def __post_init__(self) -> None:
        if self.ping_interval < 0 or self.latency_interval < 0:
            raise ValueError("intervals must be >= 0 (0 disables)")
        if self.max_missed_pongs < 1:
            raise ValueError("max_missed_pongs must be >= 1")
        if self.max_message_size < 1024:
            raise ValueError("max_message_size must be at least 1024 bytes")
        if self.max_send_buffer < self.max_message_size:
            raise ValueError("max_send_buffer must be at least max_message_size")
        if self.max_json_depth < 0 or 0 < self.max_json_depth < 2:
            raise ValueError("max_json_depth must be 0 (no limit) or at least 2")
        if self.max_requests_in_flight < 1 or self.max_queued_requests < 1:
            raise ValueError("max_requests_in_flight and max_queued_requests must be >= 1")
        for name in ("max_metadata_size", "max_connections", "max_violations"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.max_channel_history < 1:
            raise ValueError("max_channel_history must be >= 1")
        if self.allowed_origins is not None:
            object.__setattr__(self, "allowed_origins", _origins(self.allowed_origins))
        object.__setattr__(self, "forwarded_allow_ips", _trusted(self.forwarded_allow_ips))

    def client_peer(
        self, peer: tuple[str, int] | None, forwarded_for: str | None
    ) -> tuple[str, int] | None:
        """The address a connection is from: ``peer``, the socket's, unless
        that is a trusted proxy that says (in ``X-Forwarded-For``) for whom.
        The header is read right to left, proxies appending as they go, and
        the first address no trusted proxy put there wins (port 0: unknown),
        which is how uvicorn's ``--forwarded-allow-ips`` reads it."""
        trusted = self.forwarded_allow_ips
        if (
            not trusted
            or forwarded_for is None
            or peer is None
            or not _is_trusted(_address(peer[0]), trusted)
        ):
            return peer
        hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
        for hop in reversed(hops):
            ip = _address(hop)
            if ip is None:
                return peer  # "unknown", a name, garbage: the chain cannot be read
            if not _is_trusted(ip, trusted):
                return (hop, 0)
        return (hops[0], 0) if hops else peer

    def origin_allowed(self, origin: str | None) -> bool:
        """Is an upgrade with this ``Origin`` header (``None``: absent) allowed?"""
        allowed = self.allowed_origins
        if allowed is None or "*" in allowed:
            return True
        if origin is None:
            return None in allowed
        return _normal(origin) in allowed


def _normal(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def _origins(value: Iterable[str | None] | str) -> tuple[str | None, ...]:
    if isinstance(value, str):
        value = (value,)
    return tuple(None if origin is None else _normal(origin) for origin in value)


def _trusted(value: Iterable[str] | str) -> tuple[str, ...]:
    """Validated ``forwarded_allow_ips``: a bad address fails here, when the
    options are made, not on the first proxied connection."""
    if isinstance(value, str):
        value = value.split(",")
    items = tuple(item.strip() for item in value if item.strip())
    for item in items:
        if item != "*":
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(
                    f"forwarded_allow_ips: {item!r} is not an IP address or network"
                ) from None
    return items


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``text`` as an IP address (an IPv4-mapped one as IPv4: a proxy seen on
    a dual-stack ``::`` listener), or ``None``: a name, ``unknown``, garbage."""
    try:
        ip = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _is_trusted(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None, trusted: Sequence[str]
) -> bool:
    if "*" in trusted:
        return True
    return ip is not None and any(ip in _network(item) for item in trusted)


@functools.lru_cache(maxsize=256)
def _network(item: str) -> _Network:
    return ipaddress.ip_network(item, strict=False)
