"""Encoding Redis commands, shared by both runtimes' transports.

hiredis does the work; it is imported here, not in the rest of the core, so
that only users of the Redis store need it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any, Protocol, TypeVar, cast

import hiredis

__all__ = ["PING", "Arg", "forget_channel", "on_pubsub_reply", "pack"]

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


def forget_channel(
    channel: str,
    subscribers: MutableMapping[bytes, Callable[[bytes], None]],
    waiting: MutableMapping[bytes, Any],
) -> bytes | None:
    """A transport's bookkeeping for ``unsubscribe(channel)``: drop the
    channel from what a reconnect subscribes (at once, whether or not Redis
    can be told) and return the UNSUBSCRIBE to send on the pub/sub
    connection, or ``None`` if the channel was not subscribed. A message
    still in flight for it finds no callback and is dropped."""
    key = channel.encode()
    if subscribers.pop(key, None) is None:
        return None
    waiting.pop(key, None)
    return pack(("UNSUBSCRIBE", key))
