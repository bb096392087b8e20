"""The frame codec (PROTOCOL.md section 2): decoding never raises, encoding is exact."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mesh_core.protocol import Frame, Violation, decode_frame, encode_push
from mesh_core.protocol._frames import encode_response

# -- decoding valid frames ------------------------------------------------------


@pytest.mark.parametrize("as_str", [False, True], ids=["bytes", "str"])
def test_decode_full_request(as_str: bool) -> None:
    raw = '{"id": 7, "command": "chat", "payload": {"text": "hi", "n": [1, 2.5, null]}}'
    frame = decode_frame(raw if as_str else raw.encode())
    assert frame == Frame(command="chat", payload={"text": "hi", "n": [1, 2.5, None]}, id=7)
    assert isinstance(frame, Frame)
    assert type(frame.id) is int


def test_payload_absent_is_none() -> None:
    frame = decode_frame(b'{"id": 1, "command": "mesh/noop"}')
    assert frame == Frame(command="mesh/noop", payload=None, id=1)


def test_id_absent_is_none() -> None:
    frame = decode_frame(b'{"command": "ping", "payload": {}}')
    assert frame == Frame(command="ping", payload={}, id=None)


def test_id_null_is_none() -> None:
    assert decode_frame(b'{"command": "x", "id": null}') == Frame(command="x", id=None)


def test_extra_fields_are_ignored() -> None:
    frame = decode_frame(b'{"command": "x", "id": 3, "extra": [1], "payload": 1, "z": {"a": 1}}')
    assert frame == Frame(command="x", payload=1, id=3)


@pytest.mark.parametrize(
    "payload",
    [None, True, False, 0, -1, 1.5, "s", [], {}, [[]], {"a": {"b": [1, {"c": None}]}}],
)
def test_payload_round_trips_any_json_value(payload: Any) -> None:
    raw = json.dumps({"id": 1, "command": "c", "payload": payload})
    frame = decode_frame(raw)
    assert isinstance(frame, Frame)
    assert frame.payload == payload
    assert type(frame.payload) is type(payload)


def test_unicode_command_and_payload() -> None:
    raw = '{"id": 2, "command": "héllo/世界", "payload": {"emoji": "😀", "k€y": "ü"}}'
    expected = Frame(command="héllo/世界", payload={"emoji": "😀", "k€y": "ü"}, id=2)
    assert decode_frame(raw) == expected
    assert decode_frame(raw.encode("utf-8")) == expected


def test_escaped_unicode() -> None:
    frame = decode_frame(b'{"command": "\\u00e9", "payload": "\\ud83d\\ude00"}')
    assert frame == Frame(command="é", payload="😀")


def test_large_integer_id_is_kept() -> None:
    # the reference client's ids are < 10**8; bigger ones are still echoed as-is
    frame = decode_frame(b'{"command": "x", "id": 99999999}')
    assert frame == Frame(command="x", id=99999999)


# -- violations -----------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"{",
        b'{"command": "x",}',
        b"\xff\xfe",
        b'{"command": "x"} trailing',
    ],
    ids=["empty", "garbage", "truncated", "trailing-comma", "bad-utf8", "trailing-data"],
)
def test_invalid_json_is_a_violation(raw: bytes) -> None:
    result = decode_frame(raw)
    assert isinstance(result, Violation)
    assert result.reason.startswith("invalid JSON")


@pytest.mark.parametrize("raw", [b"[]", b"[1,2]", b'"command"', b"1", b"null", b"true"])
def test_non_object_json_is_a_violation(raw: bytes) -> None:
    result = decode_frame(raw)
    assert isinstance(result, Violation)
    assert result.reason.startswith("invalid frame")


@pytest.mark.parametrize(
    "raw",
    [
        b"{}",
        b'{"id": 1, "payload": {}}',
        b'{"command": 1}',
        b'{"command": null}',
        b'{"command": ["x"]}',
        b'{"command": {"name": "x"}}',
        b'{"command": true}',
    ],
)
def test_missing_or_non_string_command_is_a_violation(raw: bytes) -> None:
    result = decode_frame(raw)
    assert isinstance(result, Violation)
    assert result.reason.startswith("invalid frame")


@pytest.mark.parametrize("id_text", ["1.0", "1.5", "1e2", '"1"', "true", "[1]", "{}"])
def test_non_integer_id_is_a_violation(id_text: str) -> None:
    result = decode_frame(f'{{"command": "x", "id": {id_text}}}'.encode())
    assert isinstance(result, Violation)
    assert result.reason.startswith("invalid frame")


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deep_nesting_is_a_violation_not_an_exception(depth: int) -> None:
    raw = b'{"command": "x", "payload": ' + b"[" * depth + b"]" * depth + b"}"
    result = decode_frame(raw)
    assert isinstance(result, (Frame, Violation))
    if depth >= 100_000:
        assert isinstance(result, Violation)


def test_deep_nesting_of_objects_is_a_violation() -> None:
    depth = 100_000
    raw = b'{"command": "x", "payload": ' + b'{"a":' * depth + b"1" + b"}" * depth + b"}"
    assert isinstance(decode_frame(raw), Violation)


def test_deep_nesting_as_top_level_value_is_a_violation() -> None:
    assert isinstance(decode_frame(b"[" * 100_000 + b"]" * 100_000), Violation)


# -- encoding -------------------------------------------------------------------


def test_encode_response_exact_bytes() -> None:
    assert encode_response(7, "chat", {"ok": True}) == (
        b'{"id":7,"command":"chat","payload":{"ok":true}}'
    )


def test_encode_response_null_payload_is_explicit() -> None:
    assert encode_response(1, "x", None) == b'{"id":1,"command":"x","payload":null}'


def test_encode_push_exact_bytes() -> None:
    assert encode_push("ping", {}) == b'{"command":"ping","payload":{}}'
    assert encode_push("mesh/assign-id", "conn-1") == (
        b'{"command":"mesh/assign-id","payload":"conn-1"}'
    )


def test_encode_push_null_payload_is_explicit() -> None:
    assert encode_push("x", None) == b'{"command":"x","payload":null}'


def test_encode_unicode_is_utf8_not_escaped() -> None:
    out = encode_push("é", {"s": "😀世"})
    assert out == '{"command":"é","payload":{"s":"😀世"}}'.encode()
    assert json.loads(out) == {"command": "é", "payload": {"s": "😀世"}}


def test_encode_returns_bytes() -> None:
    assert type(encode_push("x", 1)) is bytes
    assert type(encode_response(1, "x", 1)) is bytes


def test_encode_response_rejects_non_json_value() -> None:
    with pytest.raises(TypeError):
        encode_response(1, "x", object())


@pytest.mark.parametrize(
    "payload",
    [None, 0, -5, 1.25, "", 't"q\\\n', [], {}, [1, "a", None], {"n": {"m": [True, False]}}],
)
def test_response_round_trip(payload: Any) -> None:
    encoded = encode_response(42, "cmd", payload)
    assert json.loads(encoded) == {"id": 42, "command": "cmd", "payload": payload}
    assert decode_frame(encoded) == Frame(command="cmd", payload=payload, id=42)


def test_push_round_trip_has_no_id() -> None:
    encoded = encode_push("room-msg", {"a": [1, 2]})
    assert "id" not in json.loads(encoded)
    assert decode_frame(encoded) == Frame(command="room-msg", payload={"a": [1, 2]}, id=None)


@pytest.mark.parametrize(
    "raw",
    [b'{"command": "\xff"}', b'{"command": "x", "payload": {"\xc3": 1}}'],
    ids=["in-command", "in-key"],
)
def test_invalid_utf8_inside_a_string_is_a_violation(raw: bytes) -> None:
    result = decode_frame(raw)
    assert isinstance(result, Violation)


def test_str_with_lone_surrogate_is_a_violation() -> None:
    result = decode_frame('{"command": "\ud800"}')
    assert isinstance(result, Violation)
