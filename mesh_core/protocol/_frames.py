"""The frame codec: ``{"id", "command", "payload"}`` as msgspec Structs.

The decoder and encoders are built once at import; every message goes through
them. Decoding never raises: bad input comes back as a :class:`Violation`
value, so the connection can count it and carry on (PROTOCOL.md section 2).
"""

from __future__ import annotations

from typing import Annotated, Any, Final

import msgspec

from .._config import DEFAULT_MAX_MESSAGE_SIZE

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "Frame",
    "Violation",
    "decode_frame",
    "encode_json",
    "encode_push",
    "encode_response",
]


#: Request ids must fit a signed 64-bit integer: every JSON library (and the
#: reference's Redis layout) can echo those back; larger ones are violations.
RequestId = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class Frame(msgspec.Struct, frozen=True):
    """One decoded client message. ``id`` is present on requests only."""

    command: str
    payload: Any = None
    id: RequestId | None = None


class _Response(msgspec.Struct):
    id: int
    command: str
    payload: Any


class _Push(msgspec.Struct):
    command: str
    payload: Any


class Violation(msgspec.Struct, frozen=True):
    """A message that is not a valid frame; ``reason`` says why."""

    reason: str


_decoder: Final = msgspec.json.Decoder(Frame)
_encoder: Final = msgspec.json.Encoder()


def decode_frame(data: bytes | str, max_depth: int = 0) -> Frame | Violation:
    """Decode one message. ``max_depth`` (0: no limit) bounds the nesting of
    arrays and objects, the frame object itself counting as 1."""
    try:
        frame = _decoder.decode(data)
    except msgspec.ValidationError as exc:
        return Violation(f"invalid frame: {exc}")
    except msgspec.DecodeError as exc:
        return Violation(f"invalid JSON: {exc}")
    except RecursionError:
        return Violation("invalid JSON: nested too deeply")
    except UnicodeError as exc:  # bad UTF-8 inside a string of a binary frame
        return Violation(f"invalid UTF-8: {exc}")
    # nesting n deep needs 2n bytes: short messages (most) skip the check
    if max_depth and len(data) > 2 * max_depth and _too_deep(data, frame, max_depth):
        return Violation(f"nested deeper than {max_depth} levels")
    return frame


def _too_deep(data: bytes | str, frame: Frame, max_depth: int) -> bool:
    """Nesting ``n`` deep needs ``n`` opening brackets, counted in C, so flat
    messages skip the walk; brackets inside strings only make it a "maybe"."""
    if isinstance(data, str):
        brackets = data.count("{") + data.count("[")
    else:
        brackets = data.count(b"{") + data.count(b"[")
    return brackets > max_depth and _deeper_than(frame.payload, max_depth - 1)


def _deeper_than(value: Any, limit: int) -> bool:
    """Does ``value`` nest arrays/objects more than ``limit`` levels deep?"""
    if not isinstance(value, (dict, list)):
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        if depth > limit:
            return True
        for child in children:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


def encode_response(id: int, command: str, payload: Any) -> bytes:
    """Encode a response; raises ``TypeError``/``msgspec.EncodeError`` if the
    payload is not JSON-serialisable (the caller turns that into an error
    payload)."""
    return _encoder.encode(_Response(id, command, payload))


def encode_push(command: str, payload: Any) -> bytes:
    return _encoder.encode(_Push(command, payload))


def encode_json(value: Any) -> bytes:
    return _encoder.encode(value)


def decode_json(data: bytes | str) -> Any:
    return msgspec.json.decode(data)
