"""A fast path for the frames clients send most: whole, masked data frames.

wsproto parses every frame generically, which is most of what handling a
small message costs. Nearly every client message is one final, masked text
frame; :func:`scan` recognises exactly those at the head of a buffer and
unmasks them in one big-integer XOR. Everything else (control frames,
fragments, reserved bits, unmasked or malformed frames) is handed to wsproto
untouched, frame by frame, so wsproto stays the authority on the RFC.
"""

from __future__ import annotations

from typing import Final

__all__ = ["FAST", "INCOMPLETE", "SLOW", "scan", "unmask"]

INCOMPLETE: Final = 0  #: not a whole frame yet
FAST: Final = 1  #: a final masked text/binary frame: payload unmasked here
SLOW: Final = 2  #: any other frame: give its bytes to wsproto


def unmask(payload: bytes | bytearray | memoryview, mask: bytes | bytearray) -> bytes:
    n = len(payload)
    if n == 0:
        return b""
    key = (bytes(mask) * ((n + 3) >> 2))[:n]
    value = int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")
    return value.to_bytes(n, "little")


def scan(buf: bytearray, pos: int) -> tuple[int, int, int, bytes | None, int]:
    """Look at the frame starting at ``buf[pos]``.

    Returns ``(kind, end, opcode, payload, length)``: for ``FAST`` the
    unmasked payload; for ``SLOW`` the frame spans ``buf[pos:end]``; for
    ``INCOMPLETE`` (``end`` is 0) ``length`` is the declared payload length
    when the header is complete (-1 otherwise), so a caller can refuse an
    oversized frame before buffering it.
    """
    available = len(buf) - pos
    if available < 2:
        return INCOMPLETE, 0, 0, None, -1
    b0 = buf[pos]
    b1 = buf[pos + 1]
    length = b1 & 0x7F
    header = 2
    if length == 126:
        if available < 4:
            return INCOMPLETE, 0, 0, None, -1
        length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
        header = 4
    elif length == 127:
        if available < 10:
            return INCOMPLETE, 0, 0, None, -1
        length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
        header = 10
    masked = b1 & 0x80
    if masked:
        header += 4
    end = pos + header + length
    opcode = b0 & 0x0F
    if len(buf) < end:
        return INCOMPLETE, 0, opcode, None, length
    # FIN set, no RSV bits, text or binary, masked: the common case
    if (b0 & 0xF0) == 0x80 and opcode in (1, 2) and masked:
        start = pos + header
        payload = unmask(memoryview(buf)[start:end], buf[start - 4 : start])
        return FAST, end, opcode, payload, length
    return SLOW, end, opcode, None, length
