"""A dropped slow consumer is reset, not closed (issue 14, item 8): the
server sets SO_LINGER to zero before it closes the socket, so the kernel
frees the megabytes it holds for the client at once, and the client learns
of the drop at its next read (ECONNRESET) instead of draining that backlog
for minutes and then seeing an orderly end. Plain TCP and TLS, both runtimes,
real sockets."""

from __future__ import annotations

import base64
import os
import socket
import ssl
from typing import Any

import anyio
import pytest

from examples.demo import app as demo_app
from tests.helpers.tls import OPENSSL, Certs, make_certs

pytestmark = pytest.mark.anyio

SEND_BUFFER = 1024 * 1024
PAYLOAD = 8 * 1024
#: broadcasts at most: far more than the bound, so the drop must come
MAX_BROADCASTS = 4000


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if OPENSSL is None:
        pytest.skip("needs openssl to make certificates")
    return make_certs(tmp_path_factory.mktemp("certs"))


def _open_client(port: int, context: ssl.SSLContext | None) -> socket.socket:
    """A client with a small receive buffer that upgrades and then reads
    nothing (blocking calls: run in a thread)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    if context is not None:
        # a reset is an error, not an end that TLS would call "ragged"
        sock = context.wrap_socket(sock, server_hostname="localhost", suppress_ragged_eofs=False)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        "GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, f"no upgrade: {head!r}"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def _read_all(sock: socket.socket, limit: int) -> tuple[int, BaseException | None]:
    """Read until the end, a reset or ``limit`` bytes: (bytes read, the error)."""
    received = 0
    sock.settimeout(30)  # a guard only: a reset comes at once
    try:
        while received < limit:
            data = sock.recv(65536)
            if not data:
                return received, None
            received += len(data)
    except OSError as exc:
        return received, exc
    return received, None


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
async def test_a_dropped_slow_consumer_is_reset(
    server_cls: Any, tls: bool, request: pytest.FixtureRequest
) -> None:
    options: dict[str, Any] = {}
    client_context = None
    if tls:
        certs: Certs = request.getfixturevalue("certs")
        options["ssl"] = server_cls.tls_context(str(certs.server_cert), str(certs.server_key))
        client_context = certs.client_context()
    server = server_cls(
        demo_app,
        max_message_size=64 * 1024,
        max_send_buffer=SEND_BUFFER,
        ping_interval=0,
        latency_interval=0,
        **options,
    )
    async with server.listen():
        sock = await anyio.to_thread.run_sync(_open_client, server.port, client_context)
        try:
            with anyio.fail_after(10):
                while not server.connections.local_connections():
                    await anyio.sleep(0.01)
            (conn,) = server.connections.local_connections()
            await server.add_to_room("storm", conn)
            filler = "x" * PAYLOAD
            queued = 0
            with anyio.fail_after(60):
                for n in range(MAX_BROADCASTS):
                    await server.broadcast_room("storm", "storm", {"n": n, "data": filler})
                    queued += PAYLOAD
                    if server.connections.get_local_connection(conn.id) is None:
                        break
                    if n % 20 == 19:
                        await anyio.sleep(0)  # let the server write
            assert server.connections.get_local_connection(conn.id) is None, "never dropped"
            assert server.metrics()["slow_consumer_closes"] == 1
            # the client reads only now: a reset, after at most what its own
            # small buffer held, not the backlog the server's kernel had queued
            received, error = await anyio.to_thread.run_sync(_read_all, sock, queued)
        finally:
            sock.close()
    print(f"broadcast {queued} B before the drop; the client then read {received} B: {error!r}")
    # over TLS, OpenSSL reports the reset as an end of stream that broke the
    # protocol; either way the backlog is gone, which is what the size says
    expected = (ConnectionResetError, ssl.SSLEOFError) if tls else ConnectionResetError
    assert isinstance(error, expected), (received, error)
    assert received < SEND_BUFFER // 4, received
