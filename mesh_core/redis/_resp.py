"""Encoding Redis commands and routing pub/sub replies, shared by every transport.

hiredis does the work; it is imported here, not in the rest of the core, so
that only users of the Redis store need it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from typing import Any, Protocol, TypeVar, cast

import hiredis

__all__ = ["PING", "Arg", "on_pubsub_reply", "pack", "scan_keys"]

Arg = bytes | str | int | float

# hiredis' stub types the argument as a 1-tuple; it takes any tuple of str/bytes/int/float.
_pack_command = cast(Callable[[tuple[Arg, ...]], bytes], hiredis.pack_command)
PING = _pack_command(("PING",))


def pack(args: Sequence[Arg]) -> bytes:
    if not args:
        raise ValueError("empty Redis command")
    try:
        return _pack_command(tuple(args))
    except TypeError:
        fixed: list[Arg] = []
        for a in args:
            if isinstance(a, bytearray | memoryview):
                fixed.append(bytes(a))
            elif isinstance(a, bytes | str | float) or (
                isinstance(a, int) and not isinstance(a, bool)
            ):
                fixed.append(a)
            else:
                kind = type(a).__name__
                raise TypeError(
                    f"Redis command arguments must be bytes, str, int or float, not {kind}"
                ) from None
        return _pack_command(tuple(fixed))


class _Settable(Protocol):
    def set(self) -> None: ...


E = TypeVar("E", bound=_Settable)


def on_pubsub_reply(
    msg: Any,
    subscribers: Mapping[bytes, Callable[[bytes], None]],
    waiting: MutableMapping[bytes, E],
    log: logging.Logger,
) -> bool:
    """Route one reply read on a pub/sub connection: a message to its
    channel's callback (a failing callback is logged, delivery goes on), a
    subscribe confirmation to whoever waits for it. True for a confirmation."""
    if not isinstance(msg, list) or len(msg) < 2:
        return False
    kind = msg[0]
    if kind == b"message" and len(msg) == 3:
        callback = subscribers.get(msg[1])
        if callback is not None:
            try:
                callback(msg[2])
            except Exception:
                log.exception("pub/sub callback for %r failed", msg[1])
        return False
    if kind == b"subscribe":
        event = waiting.pop(msg[1], None)
        if event is not None:
            event.set()
        return True
    return False


async def scan_keys(
    execute: Callable[..., Awaitable[Any]], pattern: str, count: int
) -> list[bytes]:
    """Every key of one node matching ``pattern``, by ``SCAN`` cursor."""
    found: list[bytes] = []
    cursor: bytes | int = 0
    while True:
        cursor, keys = await execute("SCAN", cursor, "MATCH", pattern, "COUNT", count)
        found += keys
        if int(cursor) == 0:
            return found
