"""Message assembly, the one path both roles take from frames to decoded frames.

A WebSocket message reaches a connection machine in one of two shapes: as
wsproto ``TextMessage``/``BytesMessage`` events, possibly in fragments (each
with ``message_finished``), or, on the server, as a whole masked frame that
the fast scanner (:mod:`._wsframes`) unmasked itself. :class:`MessageAssembler`
turns either into one :class:`~._frames.Frame` (or a
:class:`~._frames.Violation` to count), with the same rules for both roles:

- the size limit counts UTF-8 bytes, whether wsproto hands the text over
  decoded (``str``) or the scanner hands over bytes, so a message has the
  same size on both ends of a connection;
- a message past the limit is refused with :data:`TOO_BIG` (close 1009) as
  soon as the fragment that crosses it arrives, and nothing of it is kept;
  :meth:`~MessageAssembler.refuses` lets a caller refuse a frame from its
  header alone, before buffering its payload;
- text must be UTF-8: wsproto checks its text fragments and answers bad ones
  itself with 1007 (:attr:`CloseCode.INVALID_PAYLOAD`); :func:`is_utf8` is
  the check a whole frame passes to stay off wsproto's path;
- JSON is decoded by the frame codec (:func:`~._frames.decode_frame`), with
  the role's nesting bound.

The assembler holds no connection state: the machine decides whether a
message is wanted at all (not while closing) and what a refusal does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ._close_codes import CloseCode
from ._frames import Frame, Violation, decode_frame

__all__ = ["TOO_BIG", "MessageAssembler", "Refusal", "is_utf8"]


@dataclass(frozen=True, slots=True)
class Refusal:
    """The message cannot be taken: close the connection with ``code``."""

    code: CloseCode
    reason: str


#: a message (or one frame's declared length) past the size limit
TOO_BIG: Final = Refusal(CloseCode.MESSAGE_TOO_BIG, "message too big")

_CONTINUATION: Final = 0


def is_utf8(payload: bytes) -> bool:
    """Whether a text frame's payload is valid UTF-8 (bad ones go to wsproto,
    which closes with 1007)."""
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def utf8_size(data: bytes | str) -> int:
    """A message part's size in bytes on the wire; wsproto decodes text, so a
    ``str`` is measured as the UTF-8 it came as."""
    if isinstance(data, bytes) or data.isascii():
        return len(data)
    return len(data.encode("utf-8", "surrogatepass"))


class MessageAssembler:
    """Collects one role's incoming message fragments and decodes each whole
    message. ``max_size`` bounds a message in bytes; ``max_depth`` bounds its
    JSON nesting (0: no bound)."""

    __slots__ = ("max_depth", "max_size", "parts", "size")

    def __init__(self, max_size: int, max_depth: int = 0) -> None:
        if max_size < 1:
            raise ValueError("max_size must be positive")
        self.max_size = max_size
        self.max_depth = max_depth
        #: the fragments of the message in progress (empty between messages).
        #: Never rebound, so a hot loop may hold the list itself.
        self.parts: list[bytes | str] = []
        #: their size so far, in bytes
        self.size = 0

    def whole(self, payload: bytes) -> Frame | Violation:
        """Decode a message that arrived as one frame (the scanner's case;
        the caller checked its length against :meth:`refuses` already)."""
        return decode_frame(payload, self.max_depth)

    def feed(
        self, data: bytes | bytearray | str, finished: bool
    ) -> Frame | Violation | Refusal | None:
        """Take one fragment (a wsproto message event's ``data`` and
        ``message_finished``). Returns the decoded frame when the message is
        complete, ``None`` while it is not, :data:`TOO_BIG` when it passed the
        limit (what was collected is dropped)."""
        part: bytes | str = bytes(data) if isinstance(data, bytearray) else data
        size = self.size + utf8_size(part)
        if size > self.max_size:
            self.reset()
            return TOO_BIG
        parts = self.parts
        if not finished:
            parts.append(part)
            self.size = size
            return None
        message: bytes | str
        if parts:
            parts.append(part)
            if isinstance(part, str):
                message = "".join(p for p in parts if isinstance(p, str))
            else:
                message = b"".join(p for p in parts if isinstance(p, bytes))
        else:
            message = part
        self.reset()
        return decode_frame(message, self.max_depth)

    def refuses(self, opcode: int, length: int) -> bool:
        """Whether a frame whose header declares ``length`` payload bytes
        takes its message past the limit: alone, or as the continuation of
        the message in progress. Control frames (at most 125 bytes) never do."""
        if length > self.max_size:
            return True
        return opcode == _CONTINUATION and bool(self.parts) and self.size + length > self.max_size

    def reset(self) -> None:
        """Forget the message in progress."""
        self.parts.clear()
        self.size = 0
