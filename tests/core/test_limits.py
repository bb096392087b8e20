"""Limits and counters of the core, without sockets: each limit at the limit
and one past it, the in-flight queue, the violation budget, request ids, the
frame depth check, metrics and their Prometheus form, options and CLI flags."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from wsproto.events import CloseConnection, TextMessage

from mesh_core import CloseCode, ServerOptions
from mesh_core._metrics import MAX_LABELS, OTHER, Metrics, bump, prometheus_text
from mesh_core.cli import _parser, options_from_args
from mesh_core.protocol import ConnectionLost, RequestReceived, State, Violation, decode_frame
from tests.core.test_connection import Peer


def quiet(**overrides: Any) -> ServerOptions:
    return ServerOptions(ping_interval=0, latency_interval=0, **overrides)


def nested(depth: int) -> Any:
    """A payload of ``depth`` nested lists (0: a scalar)."""
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def masked(opcode: int, payload: bytes) -> bytes:
    """One masked client frame, written by hand (wsproto refuses to send
    after a close; a hostile client does not)."""
    assert len(payload) < 126
    key = os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + key + body


def requests(events: list[Any]) -> list[RequestReceived]:
    return [e for e in events if isinstance(e, RequestReceived)]


# -- JSON nesting depth --------------------------------------------------------


@pytest.mark.parametrize("max_depth", [2, 8, 64])
def test_depth_at_the_limit_decodes_and_one_past_is_a_violation(max_depth: int) -> None:
    # the frame object is level 1, so the payload may nest max_depth - 1 deep
    at = json.dumps({"id": 1, "command": "x", "payload": nested(max_depth - 1)})
    past = json.dumps({"id": 1, "command": "x", "payload": nested(max_depth)})
    for data in (at, at.encode()):
        frame = decode_frame(data, max_depth)
        assert not isinstance(frame, Violation)
        assert frame.payload == nested(max_depth - 1)
    for data in (past, past.encode()):
        assert isinstance(decode_frame(data, max_depth), Violation)
    assert not isinstance(decode_frame(past, 0), Violation)  # 0: no limit


def test_depth_counts_objects_and_arrays_but_not_brackets_in_strings() -> None:
    wide = {"a": [{"b": [1, 2]}, {"c": {"d": []}}]}  # 6 levels with the frame
    text = json.dumps({"id": 1, "command": "x", "payload": wide})
    assert not isinstance(decode_frame(text, 6), Violation)
    assert isinstance(decode_frame(text, 5), Violation)
    brackets = json.dumps({"id": 1, "command": "x", "payload": "[{" * 500})
    assert decode_frame(brackets, 4) == decode_frame(brackets)
    many_flat = json.dumps({"id": 1, "command": "x", "payload": [[1]] * 1000})
    assert not isinstance(decode_frame(many_flat, 3), Violation)
    assert isinstance(decode_frame(many_flat, 2), Violation)


def test_too_deep_message_is_counted_and_not_dispatched() -> None:
    p = Peer(quiet(max_json_depth=4))
    p.open()
    p.send_json({"id": 1, "command": "x", "payload": nested(3)})
    p.send_json({"id": 2, "command": "x", "payload": nested(4)})
    assert requests(p.server.events()) == [RequestReceived(1, "x", nested(3))]
    assert p.server.violations == 1
    assert p.server.metrics.violations == 1
    assert p.server.state is State.OPEN


# -- request ids ----------------------------------------------------------------


@pytest.mark.parametrize("rid", [0, 1, -1, 99_999_999, 2**53 + 1, 2**63 - 1, -(2**63)])
def test_ids_in_signed_64_bit_range_are_echoed(rid: int) -> None:
    p = Peer()
    p.open()
    p.send_json({"id": rid, "command": "x"})
    (request,) = requests(p.server.events())
    assert request.id == rid
    p.server.respond(request.id, request.command, None)
    assert p.pump() == [{"id": rid, "command": "x", "payload": None}]


@pytest.mark.parametrize("rid", [2**63, -(2**63) - 1, 2**64, 10**40])
def test_ids_beyond_64_bit_are_violations(rid: int) -> None:
    p = Peer()
    p.open()
    p.send(TextMessage(data=f'{{"id": {rid}, "command": "x"}}'))
    assert p.server.events() == []
    assert p.server.violations == 1
    assert p.server.state is State.OPEN


# -- violation budget -------------------------------------------------------------


@pytest.mark.parametrize("budget", [0, 1, 5])
def test_violation_budget_at_the_limit_and_one_past(budget: int) -> None:
    p = Peer(quiet(max_violations=budget))
    p.open()
    for _ in range(budget):
        p.send(TextMessage(data="not json"))
    assert p.state() is State.OPEN  # at the budget: still open
    p.send_json({"id": 1, "command": "x"})
    assert requests(p.server.events()) == [RequestReceived(1, "x", None)]
    p.send(TextMessage(data="[]"))  # one past it
    assert p.state() is State.CLOSING
    assert p.server.events() == [ConnectionLost(1008, "too many protocol violations")]
    p.pump()
    assert [c.code for c in p.closes()] == [1008]
    # nothing more is dispatched or counted against a closing connection
    p.feed(masked(0x1, b'{"id": 2, "command": "x"}'))
    assert p.server.events() == []
    assert p.server.violations == budget + 1


def test_violations_in_one_read_after_the_budget_are_ignored() -> None:
    p = Peer(quiet(max_violations=1))
    p.open()
    data = b"".join(
        p.client.send(TextMessage(data=text)) for text in ["x", "y", '{"id": 3, "command": "z"}']
    )
    p.feed(data)
    assert p.server.events() == [ConnectionLost(1008, "too many protocol violations")]
    assert p.server.violations == 2


# -- frames after close -------------------------------------------------------------


def test_frames_after_the_peers_close_are_ignored() -> None:
    p = Peer()
    p.open()
    request = json.dumps({"id": 1, "command": "x"}).encode()
    p.feed(p.client.send(CloseConnection(code=1000)) + masked(0x1, request))
    assert p.server.state is State.CLOSED
    assert [type(e) for e in p.server.events()] == [ConnectionLost]
    p.feed(masked(0x1, request))
    p.feed(b"\xff\x00garbage")
    assert p.server.events() == []
    assert p.server.violations == 0


def test_frames_after_our_close_are_not_dispatched() -> None:
    p = Peer()
    p.open()
    p.server.close(CloseCode.GOING_AWAY, "bye")
    p.server.events()
    p.feed(masked(0x1, json.dumps({"id": 1, "command": "x"}).encode()))
    p.feed(masked(0x1, b"not json"))
    assert p.server.events() == []
    assert p.server.violations == 0


# -- requests in flight ---------------------------------------------------------------


def test_requests_in_flight_at_the_limit_and_past_it_wait() -> None:
    p = Peer(quiet(max_requests_in_flight=3))
    p.open()
    for i in range(3):
        p.send_json({"id": i, "command": "x"})
    assert [r.id for r in requests(p.server.events())] == [0, 1, 2]  # at the limit
    assert p.server.requests_in_flight == 3
    p.send_json({"id": 3, "command": "x"})
    p.send_json({"id": 4, "command": "x"})
    assert p.server.events() == []  # past it: they wait, in order
    assert p.server.requests_queued == 2
    wakes = p.wakes
    p.server.request_done()
    assert [r.id for r in requests(p.server.events())] == [3]
    assert p.wakes == wakes + 1  # the adapter is told to drain the event
    p.server.request_done()
    p.server.request_done()
    assert [r.id for r in requests(p.server.events())] == [4]
    assert p.server.requests_in_flight == 3 - 2 + 1
    # a free slot: the next request goes straight through
    p.send_json({"id": 5, "command": "x"})
    assert [r.id for r in requests(p.server.events())] == [5]


def test_queue_full_pauses_reading_until_a_slot_frees() -> None:
    p = Peer(quiet(max_requests_in_flight=1, max_queued_requests=2))
    p.open()
    p.send_json({"id": 0, "command": "x"})
    p.send_json({"id": 1, "command": "x"})
    assert not p.server.reading_paused
    p.send_json({"id": 2, "command": "x"})
    assert p.server.reading_paused  # two waiting: stop reading
    # pongs are never queued: they cannot be starved by a flood
    p.send_json({"id": 9, "command": "pong"})
    p.server.events()
    p.server.request_done()
    assert not p.server.reading_paused
    assert [r.id for r in requests(p.server.events())] == [1]


def test_requests_that_come_while_opening_respect_the_limit() -> None:
    p = Peer(quiet(max_requests_in_flight=2))
    p.handshake()
    p.server.accept("conn-1")
    p.pump()
    for i in range(4):
        p.send_json({"id": i, "command": "x"})
    assert p.server.events() == []
    p.server.opened(0.0)
    assert [r.id for r in requests(p.server.events())] == [0, 1]
    p.server.request_done()
    assert [r.id for r in requests(p.server.events())] == [2]


def test_queued_requests_are_dropped_when_the_connection_goes() -> None:
    p = Peer(quiet(max_requests_in_flight=1))
    p.open()
    p.send_json({"id": 0, "command": "x"})
    p.send_json({"id": 1, "command": "x"})
    p.server.events()
    p.feed(None)
    assert [type(e) for e in p.server.events()] == [ConnectionLost]
    p.server.request_done()
    assert p.server.events() == []
    assert p.server.requests_queued == 0
    assert not p.server.reading_paused


def test_queued_requests_are_answered_when_the_server_closes() -> None:
    """Every request gets one response: those that never ran are told so
    (EUNAVAILABLE, safe to send again) before the close frame."""
    p = Peer(quiet(max_requests_in_flight=1))
    p.open()
    p.pump()
    for i in range(3):
        p.send_json({"id": i, "command": "x"})
    assert [r.id for r in requests(p.server.events())] == [0]
    p.server.close(CloseCode.GOING_AWAY, "server shutting down")
    answered = p.pump()
    assert [(f["id"], f["payload"]["code"]) for f in answered] == [
        (1, "EUNAVAILABLE"),
        (2, "EUNAVAILABLE"),
    ]
    assert [c.code for c in p.closes()] == [CloseCode.GOING_AWAY]
    assert p.server.requests_queued == 0
    p.server.request_done()
    assert requests(p.server.events()) == []


def test_request_done_without_requests_is_harmless() -> None:
    p = Peer()
    p.open()
    p.server.request_done()
    assert p.server.requests_in_flight == 0


# -- metrics ----------------------------------------------------------------------------


def test_connection_counts_bytes_violations_rejections_and_closes() -> None:
    metrics = Metrics()
    p = Peer(quiet(max_message_size=1024, max_send_buffer=2048))
    p.server.metrics = metrics
    p.open()
    before_in = metrics.bytes_in
    p.send(TextMessage(data="bad"))
    assert metrics.bytes_in > before_in
    assert metrics.bytes_out > 0  # the 101 and mesh/assign-id
    assert metrics.violations == 1
    for _ in range(3):
        p.server.send_message(b'"' + b"x" * 900 + b'"')
    assert metrics.slow_consumer_closes == 1
    assert metrics.closes == {1013: 1}
    refused = Peer()
    refused.server.metrics = metrics
    refused.handshake()
    refused.server.reject(503, "full")
    assert metrics.handshake_rejections == {503: 1}


def test_label_tables_are_capped() -> None:
    table: dict[Any, int] = {}
    for i in range(MAX_LABELS + 10):
        bump(table, f"k{i}")
    bump(table, "k0")
    assert len(table) == MAX_LABELS + 1
    assert table[OTHER] == 10 and table["k0"] == 2


def test_prometheus_text_format() -> None:
    metrics = Metrics()
    metrics.connections_total = 3
    metrics.answered("mesh/noop", "ok", 0.001)
    metrics.answered('we"ird\\name\n', "ok", 0.001)
    metrics.answered("(unknown)", "ENOTFOUND", 0.001)
    metrics.bytes_in = 10
    text = prometheus_text(metrics.snapshot(2, 1))
    lines = text.splitlines()
    assert "# TYPE mesh_connections gauge" in lines
    assert "mesh_connections 2" in lines
    assert "mesh_connections_total 3" in lines
    assert "mesh_requests_in_flight 1" in lines
    assert 'mesh_requests_total{command="mesh/noop"} 1' in lines
    assert 'mesh_requests_total{command="we\\"ird\\\\name\\n"} 1' in lines
    assert 'mesh_errors_total{code="ENOTFOUND"} 1' in lines
    assert "mesh_received_bytes_total 10" in lines
    assert "mesh_slow_consumer_closes_total 0" in lines
    assert text.endswith("\n")
    for line in lines:  # every sample line is "name{labels} value"
        if not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            assert name.startswith("mesh_") and float(value) >= 0


# -- options and flags -------------------------------------------------------------------


def test_defaults_are_safe() -> None:
    options = ServerOptions()
    assert options.max_message_size == 4 * 1024 * 1024
    assert options.max_json_depth == 64
    assert options.max_metadata_size == 64 * 1024
    assert options.max_requests_in_flight == 64
    assert options.max_connections == 10_000
    assert options.max_violations == 100
    assert options.handshake_timeout == 10.0
    assert options.allowed_origins is None


@pytest.mark.parametrize(
    "bad",
    [
        {"max_json_depth": 1},
        {"max_json_depth": -1},
        {"max_requests_in_flight": 0},
        {"max_queued_requests": 0},
        {"max_metadata_size": -1},
        {"max_connections": -1},
        {"max_violations": -1},
    ],
)
def test_invalid_limits_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ServerOptions(**bad)


def test_origin_policy() -> None:
    assert ServerOptions().origin_allowed(None)
    assert ServerOptions().origin_allowed("https://evil.example")
    options = ServerOptions(allowed_origins=["https://App.example.com/", "http://localhost:3000"])
    assert options.allowed_origins == ("https://app.example.com", "http://localhost:3000")
    assert options.origin_allowed("https://app.example.com")
    assert options.origin_allowed("HTTPS://APP.EXAMPLE.COM")
    assert options.origin_allowed("http://localhost:3000")
    assert not options.origin_allowed("https://evil.example")
    assert not options.origin_allowed("http://localhost:3001")
    assert not options.origin_allowed(None)  # no Origin header: not in the list
    assert ServerOptions(allowed_origins=("*",)).origin_allowed(None)
    assert ServerOptions(allowed_origins="https://a.example").allowed_origins == (
        "https://a.example",
    )


def test_cli_flags_become_options() -> None:
    args = _parser().parse_args(
        [
            "serve",
            "app:app",
            "--max-message-size",
            "2048",
            "--max-json-depth",
            "10",
            "--max-metadata-size",
            "512",
            "--max-requests-in-flight",
            "4",
            "--max-queued-requests",
            "8",
            "--max-connections",
            "3",
            "--max-violations",
            "7",
            "--max-send-buffer",
            "4096",
            "--handshake-timeout",
            "2.5",
            "--shutdown-timeout",
            "1",
            "--allowed-origin",
            "https://a.example",
            "--allowed-origin",
            "https://b.example",
        ]
    )
    options = options_from_args(args)
    assert options == ServerOptions(
        max_message_size=2048,
        max_json_depth=10,
        max_metadata_size=512,
        max_requests_in_flight=4,
        max_queued_requests=8,
        max_connections=3,
        max_violations=7,
        max_send_buffer=4096,
        handshake_timeout=2.5,
        shutdown_timeout=1.0,
        allowed_origins=("https://a.example", "https://b.example"),
    )
    defaults = options_from_args(_parser().parse_args(["serve", "app:app"]))
    assert defaults == ServerOptions()
    with pytest.raises(SystemExit, match="max_json_depth"):
        options_from_args(_parser().parse_args(["serve", "a:b", "--max-json-depth", "1"]))
