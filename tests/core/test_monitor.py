"""The metrics port's HTTP exchange and the summing of snapshots, sans-IO."""

from __future__ import annotations

import pytest

from mesh_core.app import HttpExchange, combine_metrics, prometheus_text


def exchange(*chunks: bytes | None) -> HttpExchange:
    ex = HttpExchange()
    for chunk in chunks:
        ex.receive_data(chunk)
    return ex


@pytest.mark.parametrize(
    ("path", "route"),
    [("/metrics", "metrics"), ("/healthz?x=1", "healthz"), ("/metrics.json", "metrics.json")],
)
def test_routes_in_pieces(path: str, route: str) -> None:
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    ex = exchange(request[:5], request[5:])
    assert ex.done and ex.route == route and ex.response is None


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /nope HTTP/1.1\r\n\r\n", b"404"),
        (b"DELETE /metrics HTTP/1.1\r\n\r\n", b"405"),
        (b"GET /metrics SPDY/3\r\n\r\n", b"400"),
        (b"\xff\xfe\r\n\r\n", b"400"),
        (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000, b"431"),
    ],
)
def test_refusals(request_bytes: bytes, status: bytes) -> None:
    ex = exchange(request_bytes)
    assert ex.done and ex.response is not None
    assert ex.response.startswith(b"HTTP/1.1 " + status)
    assert b"Connection: close" in ex.response


def test_a_peer_that_leaves_gets_nothing() -> None:
    ex = exchange(b"GET /met", None)
    assert ex.done and ex.response == b""


def test_head_has_no_body() -> None:
    ex = exchange(b"HEAD /healthz HTTP/1.1\r\n\r\n")
    response = ex.health_response(False, "store unreachable")
    assert response.startswith(b"HTTP/1.1 503") and response.endswith(b"\r\n\r\n")
    assert b"Content-Length: 0" not in response  # the length of the body a GET gets


def test_snapshots_add_up_and_render_per_worker() -> None:
    from mesh_core._metrics import Metrics

    one, two = Metrics(), Metrics()
    one.answered("echo", "ok", 0.002)
    two.answered("echo", "ok", 20.0)
    two.answered("echo", "EUNAVAILABLE", 0.0001)
    parts = {"1": one.snapshot(3, 0, 1), "2": two.snapshot(4, 1, 2), "3": None}
    total = combine_metrics([p for p in parts.values() if p is not None])
    assert total["connections_current"] == 7 and total["redis_reconnects"] == 3
    assert total["commands"] == {"echo": {"ok": 2, "EUNAVAILABLE": 1}}
    text = prometheus_text(total, workers=parts)
    assert 'mesh_connections{worker="1"} 3' in text
    assert 'mesh_connections{worker="2"} 4' in text
    assert 'mesh_worker_up{worker="3"} 0' in text
    assert 'mesh_commands_total{command="echo",outcome="ok"} 2' in text
    assert 'mesh_command_duration_seconds_bucket{le="0.0025"} 2' in text
    assert 'mesh_command_duration_seconds_bucket{le="+Inf"} 3' in text
    assert "mesh_command_duration_seconds_count 3" in text
    assert "mesh_redis_reconnects_total 3" in text
    assert prometheus_text(combine_metrics([])).count("mesh_connections 0") == 1


def test_answer_routes_and_asks_only_what_its_route_needs() -> None:
    def never() -> str:
        raise AssertionError("asked for what this route does not answer")

    ex = exchange(b"GET /metrics HTTP/1.1\r\n\r\n")
    assert not ex.wants_health
    response = ex.answer(None, never, lambda: "mesh_connections 0\n")
    assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"mesh_connections 0\n")
    ex = exchange(b"GET /metrics.json HTTP/1.1\r\n\r\n")
    assert ex.answer(None, lambda: {"a": 1}, never).endswith(b'{"a":1}')
    ex = exchange(b"GET /healthz HTTP/1.1\r\n\r\n")
    assert ex.wants_health
    assert ex.answer((False, "store unreachable"), never, never).startswith(b"HTTP/1.1 503")
    with pytest.raises(ValueError):
        ex.answer(None, never, never)
    ex = exchange(b"GET /nope HTTP/1.1\r\n\r\n")  # a refusal is answered as is
    assert not ex.wants_health and ex.answer(None, never, never).startswith(b"HTTP/1.1 404")
    assert exchange(b"GET /met", None).answer(None, never, never) == b""
