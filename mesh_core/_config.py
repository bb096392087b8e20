"""Server options, gathered in one typed object with the CLI's names."""

from __future__ import annotations

from dataclasses import dataclass

from ._frames import DEFAULT_MAX_MESSAGE_SIZE

__all__ = ["ServerOptions"]


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """Times are in seconds; sizes in bytes.

    ``ping_interval``/``max_missed_pongs``/``latency_interval`` default to the
    reference's 30 s / 1 / 5 s: the reference client reconnects when it hears
    no ping for ``2 x 30 s``, so pings must not be turned off (0 disables them
    for tests and for clients that do not need them).
    """

    ping_interval: float = 30.0
    max_missed_pongs: int = 1
    latency_interval: float = 5.0
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    #: bytes queued for one client before it is dropped as a slow consumer
    max_send_buffer: int = 16 * 1024 * 1024
    #: a socket that has not completed the upgrade by then is dropped
    handshake_timeout: float = 10.0
    #: how long to wait for the peer's close frame after sending ours
    close_timeout: float = 5.0
    #: how long graceful shutdown waits for requests in flight
    shutdown_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.ping_interval < 0 or self.latency_interval < 0:
            raise ValueError("intervals must be >= 0 (0 disables)")
        if self.max_missed_pongs < 1:
            raise ValueError("max_missed_pongs must be >= 1")
        if self.max_message_size < 1024:
            raise ValueError("max_message_size must be at least 1024 bytes")
        if self.max_send_buffer < self.max_message_size:
            raise ValueError("max_send_buffer must be at least max_message_size")
