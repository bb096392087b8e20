"""The fast frame path agrees with wsproto on every frame it takes."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol, Opcode

from mesh_core.protocol._wsframes import FAST, INCOMPLETE, SLOW, scan, unmask


def client_frame(payload: bytes, opcode: Opcode = Opcode.TEXT, fin: bool = True) -> bytes:
    proto = FrameProtocol(client=True, extensions=[])
    return bytes(proto._serialize_frame(opcode, payload, fin))


@given(st.binary(max_size=70_000))
def test_unmask_is_xor(payload: bytes) -> None:
    mask = os.urandom(4)
    expected = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert unmask(payload, mask) == expected


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 100_000])
def test_fast_frames_of_every_length_encoding(size: int) -> None:
    payload = os.urandom(size)
    frame = client_frame(payload, Opcode.BINARY)
    buf = bytearray(b"xx" + frame)
    kind, end, opcode, got, length = scan(buf, 2)
    assert (kind, end, opcode, got, length) == (FAST, len(buf), 2, payload, size)
    # every strict prefix is incomplete
    for cut in {1, 2, 3, 5, 9, len(frame) - 1}:
        if 0 < cut < len(frame):
            assert scan(bytearray(frame[:cut]), 0)[0] == INCOMPLETE


def test_declared_length_known_before_payload_arrives() -> None:
    frame = client_frame(b"a" * 70_000)
    kind, end, _, _, length = scan(bytearray(frame[:20]), 0)
    assert (kind, end, length) == (INCOMPLETE, 0, 70_000)


@pytest.mark.parametrize(
    "frame",
    [
        client_frame(b"", Opcode.PING),
        client_frame(b"\x03\xe8", Opcode.CLOSE),
        client_frame(b"part", Opcode.TEXT, fin=False),
        client_frame(b"rest", Opcode.CONTINUATION),
        FrameProtocol(client=False, extensions=[])._serialize_frame(Opcode.TEXT, b"unmasked", True),
        bytes([0xC1]) + client_frame(b"rsv")[1:],  # RSV1 set
    ],
)
def test_everything_else_goes_to_wsproto(frame: bytes) -> None:
    kind, end, _, payload, _ = scan(bytearray(frame), 0)
    assert (kind, end, payload) == (SLOW, len(frame), None)


def test_consecutive_frames() -> None:
    buf = bytearray(
        client_frame(b'{"a":1}') + client_frame(b"", Opcode.PING) + client_frame(b"x")[:3]
    )
    kind, end, _, payload, _ = scan(buf, 0)
    assert (kind, payload) == (FAST, b'{"a":1}')
    kind, end2, _, _, _ = scan(buf, end)
    assert kind == SLOW
    assert scan(buf, end2)[0] == INCOMPLETE
