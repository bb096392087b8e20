"""The metrics port's listener, in the server's own process: it closes with
the server, even when the shutdown fails."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from mesh_core import MeshApp

pytestmark = pytest.mark.anyio


class _Boom(Exception):
    pass


async def test_the_metrics_listener_closes_when_the_shutdown_fails(server_cls: Any) -> None:
    server = server_cls(MeshApp(), metrics_port=0, ping_interval=0, latency_interval=0)

    async def failing_shutdown(sockets: Any) -> None:
        await sockets.stop_accepting()
        raise _Boom("the shutdown failed")

    server.shutdown = failing_shutdown
    with pytest.raises((_Boom, BaseExceptionGroup)) as raised:
        async with server.listen():
            port = server.metrics_port
            assert port
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass  # listening
    # trio's nursery wraps it in a group
    assert isinstance(raised.value, _Boom) or raised.group_contains(_Boom)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
