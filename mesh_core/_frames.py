"""The frame codec: ``{"id", "command", "payload"}`` as msgspec Structs.

The decoder and encoders are built once at import; every message goes through
them. Decoding never raises: bad input comes back as a :class:`Violation`
value, so the connection can count it and carry on (PROTOCOL.md section 2).
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "Frame",
    "Violation",
    "decode_frame",
    "encode_json",
    "encode_push",
    "encode_response",
]

#: 4 MiB: big enough for the 1 MiB payloads ordinary apps send, small enough
#: that one client cannot make the server buffer the reference's 100 MiB.
DEFAULT_MAX_MESSAGE_SIZE: Final = 4 * 1024 * 1024


class Frame(msgspec.Struct, frozen=True):
    """One decoded client message. ``id`` is present on requests only."""

    command: str
    payload: Any = None
    id: int | None = None


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


def decode_frame(data: bytes | str) -> Frame | Violation:
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError as exc:
        return Violation(f"invalid frame: {exc}")
    except msgspec.DecodeError as exc:
        return Violation(f"invalid JSON: {exc}")
    except RecursionError:
        return Violation("invalid JSON: nested too deeply")
    except UnicodeError as exc:  # bad UTF-8 inside a string of a binary frame
        return Violation(f"invalid UTF-8: {exc}")


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
