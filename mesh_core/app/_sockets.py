"""What both adapters do to an accepted socket the same way, without the
core importing ``socket``: the adapter hands in its socket's ``setsockopt``
and the platform's constants, the value and the rule are written here."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable

__all__ = ["LINGER_RESET", "reset_on_close"]

#: ``SO_LINGER`` on, with a zero timeout (``struct linger {1, 0}``):
#: ``close()`` then sends a reset and frees the socket's buffers at once,
#: instead of trickling them out to the peer
LINGER_RESET = struct.pack("ii", 1, 0)


def reset_on_close(
    setsockopt: Callable[[int, int, bytes], object], level: int, option: int
) -> None:
    """Make the coming ``close()`` of a dropped slow consumer's socket a
    reset, so the megabytes the kernel still holds for a client that does
    not read are freed now and the client learns of the drop at its next
    read (ECONNRESET), not minutes later. ``setsockopt`` is the socket's (the
    one under a TLS layer), ``level`` and ``option`` are ``socket.SOL_SOCKET``
    and ``socket.SO_LINGER``. A socket already gone is left alone."""
    with contextlib.suppress(OSError):
        setsockopt(level, option, LINGER_RESET)
