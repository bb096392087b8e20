"""``wss://``: ``MeshServer(ssl=...)`` and ``mesh serve --ssl-*`` on both
runtimes, with certificates each test run makes (issue 14, item 12): the
Python client and the JavaScript client connect over TLS, client certificates
are required with ``--ssl-ca-certs``, a bad file fails the start in one line,
``--workers`` serves TLS too."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import Request, TextMessage

import mesh_asyncio
import mesh_trio
from examples.demo import app as demo_app
from mesh_core import MeshConnectionError, ServerStartupError
from tests.e2e.test_node_client import NODE, NODE_DIR, run_harness
from tests.helpers.redis_server import RedisServer, free_port
from tests.helpers.server_process import run_failing, start_server
from tests.helpers.tls import OPENSSL, Certs, make_certs

pytestmark = pytest.mark.skipif(OPENSSL is None, reason="needs openssl to make certificates")

QUIET = {"ping_interval": 0, "latency_interval": 0}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def client_cls(backend: str) -> Any:
    return mesh_trio.MeshClient if backend == "trio" else mesh_asyncio.MeshClient


def server_context(server_cls: Any, certs: Certs, *, ca: bool = False) -> Any:
    return server_cls.tls_context(
        str(certs.server_cert),
        str(certs.server_key),
        ca_certs=str(certs.ca) if ca else None,
    )


async def refused(client: Any) -> None:
    """The client's first connect fails (as trio's client wants: in ``async with``)."""
    with pytest.raises(MeshConnectionError):
        async with client:
            pass


# -- MeshServer(ssl=...) ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_python_client_over_wss(
    server_cls: Any, anyio_backend: str, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    server = server_cls(demo_app, ssl=server_context(server_cls, certs), **QUIET)
    async with server.listen():
        port = server.port
        url = f"wss://localhost:{port}"
        big = "x" * 300_000  # many TLS records each way
        async with client_cls(anyio_backend)(url, ssl_context=certs.client_context()) as client:
            assert await client.command("echo", {"hello": "tls"}) == {"hello": "tls"}
            assert await client.command("echo", {"big": big}) == {"big": big}
            assert await client.join_room("lobby")
            assert await server.get_room_members("lobby") == [client.connection_id]
    assert f"listening on wss://127.0.0.1:{port}" in caplog.text


@pytest.mark.anyio
async def test_a_plain_client_on_a_tls_port_gets_no_websocket(
    server_cls: Any, anyio_backend: str, certs: Certs
) -> None:
    server = server_cls(demo_app, ssl=server_context(server_cls, certs), **QUIET)
    async with server.listen():
        client = client_cls(anyio_backend)(
            f"ws://127.0.0.1:{server.port}", reconnect=False, connect_timeout=5
        )
        await refused(client)
        assert server.metrics()["connections_total"] == 0


@pytest.mark.anyio
async def test_client_certificates_are_required_with_ca_certs(
    server_cls: Any, anyio_backend: str, certs: Certs
) -> None:
    server = server_cls(demo_app, ssl=server_context(server_cls, certs, ca=True), **QUIET)
    MeshClient = client_cls(anyio_backend)
    async with server.listen():
        url = f"wss://localhost:{server.port}"
        for context in (certs.client_context(), certs.client_context(stranger=True)):
            await refused(MeshClient(url, ssl_context=context, reconnect=False, connect_timeout=5))
        assert server.metrics()["connections_total"] == 0
        served = certs.client_context(with_cert=True)
        async with MeshClient(url, ssl_context=served) as client:
            assert await client.command("echo", {"with": "cert"}) == {"with": "cert"}


def _read_through_tls(port: int, context: ssl.SSLContext) -> str:
    """What a blocking TLS client reads first: the server's answer or why not."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:  # the alert comes in the handshake (TLS 1.2) or at the first read (1.3)
        with raw, context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            return repr(tls.recv(100))
    except OSError as exc:
        return repr(exc)


@pytest.mark.anyio
async def test_a_refused_handshake_tells_the_client_why(
    server_cls: Any, anyio_backend: str, certs: Certs, request: pytest.FixtureRequest
) -> None:
    """A client without the certificate the server requires reads TLS's
    alert (certificate required), not a bare end of stream."""
    if anyio_backend == "asyncio":
        request.applymarker(
            pytest.mark.xfail(
                strict=True,
                reason="asyncio's SSLProtocol closes a failed handshake without its alert",
            )
        )
    server = server_cls(demo_app, ssl=server_context(server_cls, certs, ca=True), **QUIET)
    async with server.listen():
        port = server.port
        read = await anyio.to_thread.run_sync(_read_through_tls, port, certs.client_context())
    assert "CERTIFICATE_REQUIRED" in read


@pytest.mark.anyio
async def test_a_stalled_tls_handshake_blocks_no_one_and_times_out(
    server_cls: Any, anyio_backend: str, certs: Certs
) -> None:
    """A client that opens TCP and never starts TLS: others are served
    meanwhile, and the server drops it after ``handshake_timeout``."""
    server = server_cls(
        demo_app, ssl=server_context(server_cls, certs), handshake_timeout=0.5, **QUIET
    )
    async with server.listen():
        stalled = [await anyio.connect_tcp("127.0.0.1", server.port) for _ in range(3)]
        url = f"wss://localhost:{server.port}"
        async with client_cls(anyio_backend)(url, ssl_context=certs.client_context()) as client:
            assert await client.command("echo", 1) == 1
        with anyio.fail_after(10):  # generous: the timeout is 0.5 s
            for stream in stalled:
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError, OSError)):
                    await stream.receive()
                await stream.aclose()


@pytest.mark.parametrize("server_cls", [mesh_asyncio.MeshServer, mesh_trio.MeshServer])
def test_tls_context_names_the_bad_file(server_cls: Any, certs: Certs, tmp_path: Path) -> None:
    with pytest.raises(ServerStartupError, match="cannot read --ssl-certfile"):
        server_cls.tls_context(str(tmp_path / "missing.pem"), str(certs.server_key))
    with pytest.raises(ServerStartupError, match="does not match the certificate"):
        server_cls.tls_context(str(certs.server_cert), str(certs.client_key))
    with pytest.raises(TypeError, match=r"ssl\.SSLContext"):
        server_cls(demo_app, ssl="cert.pem")


# -- mesh serve --ssl-* ----------------------------------------------------------------------


def _tls_flags(certs: Certs, *, ca: bool = False) -> list[str]:
    flags = ["--ssl-certfile", str(certs.server_cert), "--ssl-keyfile", str(certs.server_key)]
    return [*flags, "--ssl-ca-certs", str(certs.ca)] if ca else flags


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out


def _read_until(proc: subprocess.Popen[str], text: str, count: int, timeout: float = 30) -> str:
    """The server's output until ``text`` came ``count`` times (read from the
    pipe's descriptor: what is read here is not left in a buffer)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    out = b""
    deadline = time.monotonic() + timeout
    while out.decode(errors="replace").count(text) < count and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            out += chunk
    return out.decode(errors="replace")


def _echo_over_wss(port: int, context: ssl.SSLContext, connections: int = 1) -> list[Any]:
    async def scenario() -> list[Any]:
        answers = []
        for n in range(connections):
            url = f"wss://localhost:{port}"
            async with mesh_asyncio.MeshClient(url, ssl_context=context) as client:
                answers.append(await client.command("echo", {"n": n}))
        return answers

    return anyio.run(scenario)


@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_mesh_serve_tls_with_client_certificates(runtime: str, certs: Certs) -> None:
    port = free_port()
    proc = start_server(runtime, port, *_tls_flags(certs, ca=True), "--ping-interval", "0")
    try:
        assert _echo_over_wss(port, certs.client_context(with_cert=True)) == [{"n": 0}]
        with pytest.raises(MeshConnectionError):
            _echo_over_wss(port, certs.client_context())
    finally:
        out = _stop(proc)
    assert f"listening on wss://127.0.0.1:{port}" in out
    assert proc.returncode == 0, out
    assert "Traceback" not in out


@pytest.mark.skipif(
    NODE is None or not (NODE_DIR / "node_modules" / "ws").is_dir(),
    reason="needs node and `npm ci` in tests/node",
)
@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_js_client_over_wss(runtime: str, certs: Certs) -> None:
    """The JavaScript client, unmodified: Node trusts the test CA through
    NODE_EXTRA_CA_CERTS, as an operator's private CA would be trusted."""
    port = free_port()
    proc = start_server(runtime, port, *_tls_flags(certs))
    try:
        env = {**os.environ, "NODE_EXTRA_CA_CERTS": str(certs.ca)}
        result = run_harness(f"wss://localhost:{port}", env=env)
    finally:
        out = _stop(proc)
    assert result["ok"] is True and not result["failed_checks"]
    assert result["steps"]["echo"] == {"hello": "world", "n": [1, 2, 3]}
    assert result["steps"]["chat_push"] == {"text": "yo"}
    assert proc.returncode == 0, out


@pytest.fixture
def redis_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


def test_workers_serve_wss(redis_url: str, certs: Certs) -> None:
    port = free_port()
    flags = ["--workers", "2", "--redis", redis_url, *_tls_flags(certs)]
    proc = start_server("asyncio", port, *flags)
    listening = f"listening on wss://127.0.0.1:{port}"
    try:
        started = _read_until(proc, listening, count=2)
        answers = _echo_over_wss(port, certs.client_context(), connections=6)
    finally:
        out = _stop(proc)
    assert answers == [{"n": n} for n in range(6)]
    assert started.count(listening) == 2, started + out
    assert "Traceback" not in out


# -- startup failures ------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_a_missing_certificate_fails_the_start_in_one_line(runtime: str, certs: Certs) -> None:
    proc = run_failing("--runtime", runtime, "--port", "0", "--ssl-certfile", "/nonexistent.pem")
    assert proc.returncode == 1
    assert "--ssl-certfile '/nonexistent.pem': No such file or directory" in proc.stderr


def test_a_key_that_does_not_match_fails_the_start(certs: Certs) -> None:
    key = str(certs.client_key)
    proc = run_failing(
        "--port", "0", "--ssl-certfile", str(certs.server_cert), "--ssl-keyfile", key
    )
    assert f"the key {key!r} does not match the certificate" in proc.stderr


def test_a_bad_ca_file_fails_the_start(certs: Certs, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    flags = [*_tls_flags(certs), "--ssl-ca-certs", str(junk)]
    proc = run_failing("--runtime", "trio", "--port", "0", *flags)
    assert "--ssl-ca-certs" in proc.stderr and "no CA certificate" in proc.stderr


def test_ssl_flags_need_a_certificate(certs: Certs) -> None:
    proc = run_failing("--ssl-keyfile", str(certs.server_key))
    assert "need --ssl-certfile" in proc.stderr


def test_a_bad_certificate_fails_before_workers_start(redis_url: str) -> None:
    flags = ["--workers", "2", "--redis", redis_url, "--port", "0"]
    proc = run_failing(*flags, "--ssl-certfile", "/nonexistent.pem", timeout=60)
    assert "--ssl-certfile '/nonexistent.pem'" in proc.stderr


def test_port_in_use_with_tls_is_still_one_line(certs: Certs) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_failing("--port", str(port), *_tls_flags(certs))
    assert "address already in use" in proc.stderr


# -- back-pressure through TLS -----------------------------------------------------------------


def _read_pushes(port: int, context: ssl.SSLContext, count: int) -> list[int]:
    """A TLS client with a small receive buffer that reads slowly, so the
    server's socket is full again and again: the ``n`` of every push."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    raw.settimeout(30)
    raw.connect(("127.0.0.1", port))
    with context.wrap_socket(raw, server_hostname="localhost") as sock:
        ws = WSConnection(ConnectionType.CLIENT)
        sock.sendall(ws.send(Request(host="localhost", target="/")))
        seen: list[int] = []
        text: list[str] = []
        while len(seen) < count:
            data = sock.recv(4096)
            assert data, f"closed after {len(seen)} pushes"
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, TextMessage):
                    text.append(event.data)
                    if event.message_finished:
                        message = json.loads("".join(text))
                        text.clear()
                        if message.get("command") == "flood":
                            seen.append(message["payload"]["n"])
            time.sleep(0.0005)
    return seen


@pytest.mark.anyio
async def test_a_slow_tls_reader_gets_every_byte_in_order(server_cls: Any, certs: Certs) -> None:
    """The trio binding's TLS layer holds back what the socket did not take
    (a short send), and sends it once the socket drains: nothing lost,
    nothing twice. Under max_send_buffer, so the reader is not dropped."""
    server = server_cls(demo_app, ssl=server_context(server_cls, certs), **QUIET)
    count = 300
    async with server.listen(), anyio.create_task_group() as tg:
        port = server.port
        result: list[list[int]] = []

        async def read() -> None:
            context = certs.client_context()
            result.append(await anyio.to_thread.run_sync(_read_pushes, port, context, count))

        tg.start_soon(read)
        with anyio.fail_after(30):
            while not server.connections.local_connections():
                await anyio.sleep(0.01)
        (conn,) = server.connections.local_connections()
        await server.add_to_room("flood", conn)
        filler = "y" * 20_000  # 6 MB in all, past any socket buffer
        for n in range(count):
            await server.broadcast_room("flood", "flood", {"n": n, "data": filler})
    assert result == [list(range(count))]
    assert server.metrics()["slow_consumer_closes"] == 0


class _StalledHandshake:
    """A TLS client that stops before its Finished, and goes on when told."""

    def __init__(self, port: int, certs: Certs) -> None:
        self.raw = socket.create_connection(("127.0.0.1", port), timeout=3)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = certs.client_context().wrap_bio(
            self.incoming, self.outgoing, server_hostname="localhost"
        )
        while True:  # up to the client's last flight, which is held back
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if self.outgoing.pending:
                    self.raw.sendall(self.outgoing.read())
                self.incoming.write(self.raw.recv(65536))

    def upgrade(self) -> tuple[bytes, bool]:
        """Finish the handshake and ask for the upgrade: what came back, and
        whether the server ended the connection (rather than our timeout)."""
        ws = WSConnection(ConnectionType.CLIENT)
        self.tls.write(ws.send(Request(host="localhost", target="/")))
        self.raw.sendall(self.outgoing.read())
        answer = b""
        ended = False
        try:
            while not ended:
                data = self.raw.recv(65536)
                if not data:
                    ended = True
                    break
                self.incoming.write(data)
                while True:
                    try:
                        chunk = self.tls.read(65536)
                    except ssl.SSLWantReadError:
                        break
                    except ssl.SSLZeroReturnError:  # the server's close_notify
                        ended = True
                        break
                    if not chunk:
                        ended = True
                        break
                    answer += chunk
        except TimeoutError:
            pass
        except OSError:
            ended = True  # reset
        self.raw.close()
        return answer, ended


def _finished_then_a_corrupt_record(port: int, certs: Certs) -> None:
    """A client whose TLS Finished arrives with a corrupt record behind it,
    in one segment: the server reads both at once, before its first wait."""
    client = _StalledHandshake(port, certs)
    finished = client.outgoing.read()
    client.tls.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    record = bytearray(client.outgoing.read())
    record[-3] ^= 1  # the MAC no longer matches
    client.raw.sendall(finished + bytes(record))
    with contextlib.suppress(OSError):
        client.raw.recv(100)  # the server ends this connection, whatever it sends first
    client.raw.close()


@pytest.mark.anyio
async def test_a_corrupt_record_behind_the_handshake_ends_that_connection_only(
    server_cls: Any, anyio_backend: str, certs: Certs
) -> None:
    server = server_cls(demo_app, ssl=server_context(server_cls, certs), **QUIET)
    async with server.listen():
        for _ in range(3):
            await anyio.to_thread.run_sync(_finished_then_a_corrupt_record, server.port, certs)
        url = f"wss://localhost:{server.port}"
        async with client_cls(anyio_backend)(url, ssl_context=certs.client_context()) as client:
            assert await client.command("echo", {"still": "serving"}) == {"still": "serving"}


@pytest.mark.anyio
async def test_a_tls_handshake_that_ends_during_shutdown_is_refused(
    server_cls: Any, certs: Certs
) -> None:
    """Shutdown closes the upgrades in progress; a socket still in its TLS
    handshake then is not one of them yet. Handed over later, it must be
    closed at once, not upgraded nor left open with nobody to close it."""
    server = server_cls(demo_app, ssl=server_context(server_cls, certs), close_timeout=3, **QUIET)
    async with server.listen():
        stalled = await anyio.to_thread.run_sync(_StalledHandshake, server.port, certs)
        async with anyio.create_task_group() as group:
            group.start_soon(server.close)
            await anyio.sleep(0.2)
            answer, ended = await anyio.to_thread.run_sync(stalled.upgrade)
        assert not answer.startswith(b"HTTP/1.1 101"), answer
        assert ended  # not left open past the server's life
        assert server.connections.local_connections() == []
