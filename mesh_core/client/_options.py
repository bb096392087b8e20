"""What a client is configured with, and the pure helpers around it: the
options, the reconnect backoff, the URL split, the status enum and the error
shape of a response. No state, no I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from .._errors import MeshCommandError
from ..protocol import DEFAULT_MAX_MESSAGE_SIZE

__all__ = [
    "ClientOptions",
    "ClientStatus",
    "Endpoint",
    "LIFECYCLE_EVENTS",
    "check_response",
    "is_error_payload",
    "parse_url",
    "reconnect_delay",
]


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """Times in seconds. ``max_reconnect_attempts=None`` retries forever (the
    reference's default); ``reconnect_jitter`` is a fraction of each delay."""

    ping_timeout: float = 30.0
    max_missed_pings: int = 1
    reconnect: bool = True
    reconnect_interval: float = 2.0
    max_reconnect_interval: float = 30.0
    max_reconnect_attempts: int | None = None
    reconnect_jitter: float = 0.25
    raise_errors: bool = True
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    #: TCP + TLS + upgrade + ``mesh/assign-id``, per attempt
    connect_timeout: float = 10.0
    #: how long ``close()`` waits for the server's close frame
    close_timeout: float = 5.0
    #: pushes an unread ``pushes()`` iterator keeps before dropping the oldest
    push_buffer: int = 1024

    def __post_init__(self) -> None:
        if self.max_missed_pings < 0:
            raise ValueError("max_missed_pings must be >= 0")
        if self.reconnect_interval < 0 or self.max_reconnect_interval < 0:
            raise ValueError("reconnect intervals must be >= 0")
        if not 0 <= self.reconnect_jitter <= 1:
            raise ValueError("reconnect_jitter must be between 0 and 1")
        if self.max_reconnect_attempts is not None and self.max_reconnect_attempts < 0:
            raise ValueError("max_reconnect_attempts must be >= 0 or None")
        if self.max_message_size < 1024:
            raise ValueError("max_message_size must be at least 1024 bytes")
        if self.push_buffer < 1:
            raise ValueError("push_buffer must be at least 1")


def reconnect_delay(attempt: int, options: ClientOptions, rand: float) -> float:
    """Delay before retry number ``attempt + 1`` (``attempt`` >= 1 failed so
    far): exponential from ``reconnect_interval`` up to
    ``max_reconnect_interval``, spread by ±jitter so that a restarted server
    is not hit by every client at the same instant. ``rand`` is in [0, 1)."""
    base = min(
        options.reconnect_interval * 2.0 ** max(0, attempt - 1), options.max_reconnect_interval
    )
    base = max(base, options.reconnect_interval)
    return max(0.0, base * (1 + options.reconnect_jitter * (2 * rand - 1)))


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a ``ws://``/``wss://`` URL points, split for the socket layer
    (``host``, ``port``, ``secure``) and for the upgrade (``host_header``,
    ``target`` with the query string)."""

    host: str
    port: int
    secure: bool
    host_header: str
    target: str


def parse_url(url: str) -> Endpoint:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss"):
        raise ValueError(f"expected a ws:// or wss:// URL, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    secure = scheme == "wss"
    default = 443 if secure else 80
    port = parts.port or default
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == default else f"{shown}:{port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Endpoint(host, port, secure, host_header, target)


def is_error_payload(payload: Any) -> bool:
    """The reference's error shape: ``{"error": str, "code": str, ...}``."""
    return (
        isinstance(payload, dict)
        and isinstance(payload.get("error"), str)
        and isinstance(payload.get("code"), str)
    )


def check_response(command: str, payload: Any, raise_errors: bool) -> Any:
    if raise_errors and is_error_payload(payload):
        raise MeshCommandError(command, payload)
    return payload


class ClientStatus(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    ONLINE = "online"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


#: names ``on()`` treats as client lifecycle events rather than push commands
LIFECYCLE_EVENTS: Final = frozenset(
    {"connect", "disconnect", "reconnect", "reconnect_failed", "close", "latency"}
)
