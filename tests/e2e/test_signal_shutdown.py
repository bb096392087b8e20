"""A server process told to stop (SIGTERM, SIGINT) closes its clients 1001
(going away), as ``mesh serve`` does: the embedded loop, and the ASGI app
started from code (``python -m examples.asgi_app``), where Mesh's shutdown
runs before the ASGI server's own. (Run by their CLIs, uvicorn closes
WebSockets 1012 and hypercorn's trio worker cancels them: docs/EMBEDDING.md.)"""

from __future__ import annotations

import signal

import anyio
import pytest

from tests.helpers.server_process import serve_demo
from tests.helpers.wsclient import WSClient

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the client's runtime; the servers are processes


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("kind", ["embedded", "asgi_app-uvicorn", "asgi_app-hypercorn-trio"])
async def test_a_stopped_server_process_closes_its_clients_1001(
    kind: str, sig: signal.Signals
) -> None:
    with serve_demo(kind) as server:
        assert server.proc is not None
        clients = [await WSClient.connect(server.port, server.path) for _ in range(2)]
        for client in clients:
            assert (await client.request("mesh/join-room", {"roomName": "r"}))["success"]
        server.proc.send_signal(sig)
        for client in clients:
            closed = await client.wait_closed(timeout=10)
            assert closed.code == 1001
            await client.abort()
        with anyio.fail_after(15):
            while server.proc.poll() is None:
                await anyio.sleep(0.05)
