"""Encoding Redis commands, shared by both runtimes' transports.

hiredis does the work; it is imported here, not in the rest of the core, so
that only users of the Redis store need it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import hiredis

__all__ = ["PING", "Arg", "pack"]

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
