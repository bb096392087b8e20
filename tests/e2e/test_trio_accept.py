"""The trio server's own accept loop (asyncio's event loop has its own).

accept() can fail for one connection (a reset before it was accepted, a
firewall, pending network errors Linux reports there): the server skips it
and goes on serving, as trio.SocketListener does."""

from __future__ import annotations

import errno
import socket
from typing import Any

import pytest
import trio

from mesh_core import MeshApp
from mesh_trio import MeshServer
from tests.helpers.wsclient import WSClient


@pytest.mark.parametrize("code", [errno.ECONNABORTED, errno.EPROTO, errno.EPERM])
def test_an_accept_error_about_one_connection_is_skipped(
    code: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_accept = socket.socket.accept
    failed: list[int] = []

    def accept(self: socket.socket) -> Any:
        if not failed:
            failed.append(code)
            raise OSError(code, "injected")
        return real_accept(self)

    monkeypatch.setattr(socket.socket, "accept", accept)

    async def main() -> None:
        server = MeshServer(MeshApp(), ping_interval=0, latency_interval=0)
        async with server.listen():
            first = socket.create_connection(("127.0.0.1", server.port))
            client = await WSClient.connect(server.port)
            rid = await client.send_request("mesh/noop", {})
            await client.wait_for(lambda: rid in client.responses, timeout=5)
            assert client.responses[rid]["payload"] is True
            await client.close()
            first.close()

    trio.run(main)
    assert failed == [code]
