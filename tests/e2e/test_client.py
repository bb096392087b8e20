"""The Python client: the sans-IO client role wired to the server role in
memory, then ``MeshClient`` end to end, one test body run on asyncio and on
trio (anyio's pytest plugin), then each runtime's client against the other
runtime's server.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import pytest
import trio
from anyio.abc import SocketAttribute
from anyio.streams.tls import TLSListener

import mesh_asyncio
import mesh_trio
from examples.demo import app as demo_app
from mesh_core import Context, MeshApp, MeshError, Reject, ServerOptions, UpgradeRequest
from mesh_core._errors import (
    CommandTimeout,
    ConnectionRejected,
    MeshCommandError,
    MeshConnectionError,
)
from mesh_core.client import ClientOptions as _ClientOptions
from mesh_core.client import ClientStatus, parse_url, reconnect_delay
from mesh_core.protocol import HandshakeReceived, RequestReceived, ServerConnection
from mesh_core.protocol._client_connection import (
    ClientConnection,
    ClientState,
    Closed,
    Connected,
    LatencyUpdated,
    Push,
    Rejected,
    Response,
)

# -- the sans-IO client role against the sans-IO server role ------------------


class Pair:
    """A client and a server state machine exchanging bytes in memory."""

    def __init__(self, **client_kwargs: Any) -> None:
        self.now = 0.0
        self.server = ServerConnection(
            ServerOptions(ping_interval=1.0, latency_interval=2.0, max_message_size=2048),
            now=0.0,
        )
        self.client = ClientConnection(**client_kwargs)
        self.server_events: list[Any] = []

    def pump(self) -> list[Any]:
        events: list[Any] = []
        for _ in range(10):
            out = self.client.data_to_send()
            if out:
                self.server.receive_data(out, self.now)
            self.server_events += self.server.events()
            back = self.server.data_to_send()
            if back:
                events += self.client.receive_data(back, self.now)
            if not out and not back:
                break
        return events

    def open(self, target: str = "/") -> list[Any]:
        self.client.initiate("example.test", target, [("x-token", "abc")])
        self.pump()
        handshake = self.server_events.pop(0)
        assert isinstance(handshake, HandshakeReceived)
        self.request: UpgradeRequest = handshake.request
        self.server.accept("conn-1")
        self.server.opened(self.now)
        return self.pump()


def test_core_handshake_request_response_and_ids() -> None:
    pair = Pair()
    events = pair.open("/ws?token=t1")
    assert events == [Connected("conn-1")]
    assert pair.client.state is ClientState.OPEN
    assert pair.request.query_param("token") == "t1"
    assert pair.request.header("x-token") == "abc"

    first = pair.client.send_request("echo", None)
    second = pair.client.send_request("echo", [1])
    assert first != second and pair.client.in_flight == 2
    pair.pump()
    requests = [e for e in pair.server_events if isinstance(e, RequestReceived)]
    assert [(r.id, r.payload) for r in requests] == [(first, {}), (second, [1])]
    # answered out of order, matched by id
    pair.server.respond(second, "echo", "two")
    pair.server.respond(first, "echo", "one")
    assert pair.pump() == [Response(second, "echo", "two"), Response(first, "echo", "one")]
    assert pair.client.in_flight == 0

    # a discarded (timed out) request frees its id; its late answer is dropped
    late = pair.client.send_request("slow")
    assert pair.client.discard_request(late)
    pair.server.respond(late, "slow", "too late")
    assert pair.pump() == []


def test_core_ping_latency_and_pushes() -> None:
    pair = Pair(ping_timeout=1.5, max_missed_pings=1)
    pair.open()
    assert pair.client.next_deadline() == 3.0
    pair.now = 1.0
    pair.server.tick(pair.now)  # ping
    assert pair.pump() == []
    assert pair.client.last_ping_at == 1.0
    assert not pair.server._awaiting_pong  # the client's pong arrived
    pair.now = 2.0
    pair.server.tick(pair.now)  # ping + latency:request
    pair.pump()
    pair.now = 4.0
    pair.server.tick(pair.now)  # latency (the measured round trip)
    events = pair.pump()
    assert [type(e) for e in events] == [LatencyUpdated]
    assert pair.client.latency == 0.0
    pair.server.send_push("chat", {"text": "hi"})
    assert pair.pump() == [Push("chat", {"text": "hi"})]
    assert not pair.client.is_dead(5.0)
    assert pair.client.is_dead(4.0 + 3.0)


def test_core_close_and_limits() -> None:
    pair = Pair(max_message_size=1024)
    pair.open()
    pair.server.send_push("big", "x" * 2000)
    events = pair.pump()
    assert events == [Closed(1009, "message too big")]
    with pytest.raises(RuntimeError):
        pair.client.send_request("echo")

    pair = Pair()
    pair.open()
    pair.client.close()
    assert pair.client.state is ClientState.CLOSING
    assert pair.pump() == [Closed(1000, "")]
    assert pair.client.state in {ClientState.CLOSED}

    pair = Pair()
    pair.open()
    assert pair.client.receive_data(None, 0.0) == [Closed(1006, "connection lost")]


def test_core_rejected() -> None:
    pair = Pair()
    pair.client.initiate("example.test", "/")
    pair.pump()
    pair.server.reject(403, "go away")
    assert pair.pump() == [Rejected(403, b"go away")]


def test_url_and_backoff() -> None:
    endpoint = parse_url("wss://example.com/mesh?token=a%20b")
    assert (endpoint.host, endpoint.port, endpoint.secure) == ("example.com", 443, True)
    assert endpoint.target == "/mesh?token=a%20b"
    assert endpoint.host_header == "example.com"
    endpoint = parse_url("ws://[::1]:8080")
    assert (endpoint.host, endpoint.host_header, endpoint.target) == ("::1", "[::1]:8080", "/")
    with pytest.raises(ValueError):
        parse_url("http://example.com")
    options = _ClientOptions(reconnect_interval=1.0, max_reconnect_interval=5.0)
    assert reconnect_delay(1, options, 0.5) == 1.0
    assert reconnect_delay(3, options, 0.5) == 4.0
    assert reconnect_delay(10, options, 0.5) == 5.0
    assert 0.75 <= reconnect_delay(1, options, 0.0) <= reconnect_delay(1, options, 0.999) <= 1.25


# -- MeshClient end to end, on both runtimes ----------------------------------

test_app = MeshApp()


@test_app.command("echo")
async def _echo(ctx: Context) -> Any:
    return ctx.payload


@test_app.command("sleep")
async def _sleep(ctx: Context) -> str:
    await anyio.sleep(ctx.payload["seconds"])
    return "slept"


@test_app.command("fail")
async def _fail(ctx: Context) -> None:
    raise MeshError("nope", code="ENOPE")


@test_app.command("my-rooms")
async def _my_rooms(ctx: Context) -> list[str]:
    return sorted(await ctx.server.rooms.get_connection_rooms(ctx.connection))


@test_app.command("broadcast-room")
async def _broadcast_room(ctx: Context) -> bool:
    await ctx.server.broadcast_room(
        ctx.payload["roomName"], ctx.payload["event"], ctx.payload["data"]
    )
    return True


auth_app = MeshApp()


@auth_app.authenticate_connection
async def _authenticate(request: UpgradeRequest) -> Any:
    if request.query_param("token") != "secret" or request.header("x-client") != "tests":
        raise Reject("bad token", status=403)
    return {"user": "ada"}


def _server_class(backend: str) -> Any:
    return mesh_asyncio.MeshServer if backend == "asyncio" else mesh_trio.MeshServer


def _client_class(backend: str) -> Any:
    return mesh_asyncio.MeshClient if backend == "asyncio" else mesh_trio.MeshClient


@asynccontextmanager
async def serve(backend: str, app: MeshApp = test_app, port: int = 0, **options: Any) -> Any:
    server = _server_class(backend)(app, **options)
    async with server.listen("127.0.0.1", port):
        yield server


async def wait_for(condition: Any, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)


def record(client: Any, *names: str) -> list[str]:
    seen: list[str] = []
    for name in names:
        client.on(name, lambda name=name: seen.append(name))
    return seen


@pytest.mark.anyio
async def test_connect_and_handshake_data(anyio_backend: str) -> None:
    Client = _client_class(anyio_backend)
    async with serve(anyio_backend, auth_app) as server:
        url = f"ws://127.0.0.1:{server.port}/mesh?token=secret"
        async with Client(url, headers={"x-client": "tests"}) as client:
            assert client.status is ClientStatus.ONLINE
            assert client.connection_id is not None
            assert server.connections.get_local_connection(client.connection_id) is not None
            assert await client.get_connection_metadata() == {"user": "ada"}
        with pytest.raises(ConnectionRejected) as info:
            async with Client(url.replace("secret", "wrong"), headers={"x-client": "tests"}):
                pass
        assert info.value.status == 403
        port = server.port
    with pytest.raises(MeshConnectionError):
        async with Client(f"ws://127.0.0.1:{port}"):
            pass


@pytest.mark.anyio
async def test_helpers(anyio_backend: str) -> None:
    Client = _client_class(anyio_backend)
    async with serve(anyio_backend, demo_app) as server:
        url = f"ws://127.0.0.1:{server.port}"
        async with Client(url) as alice, Client(url) as bob:
            assert await alice.command("mesh/noop") is True
            present = await alice.join_room("lobby")
            assert [member["id"] for member in present] == [alice.connection_id]
            present = await bob.join_room("lobby")
            assert {member["id"] for member in present} == {alice.connection_id, bob.connection_id}
            assert alice.rooms == {"lobby"}
            assert sorted(await server.rooms.get_room_members("lobby")) == sorted(
                [alice.connection_id, bob.connection_id]
            )

            assert await alice.get_room_metadata("lobby") is None
            await server.rooms.set_metadata("lobby", {"topic": "tea"})
            assert await bob.get_room_metadata("lobby") == {"topic": "tea"}

            stamped = await alice.get_connection_metadata()
            assert set(stamped) == {"connectedAt"}  # the demo's on_connection hook
            assert await alice.set_connection_metadata({"name": "alice"}, strategy="merge") is True
            assert await alice.get_connection_metadata() == {**stamped, "name": "alice"}
            assert await bob.get_connection_metadata(alice.connection_id) == {
                **stamped,
                "name": "alice",
            }
            assert await alice.set_connection_metadata({"name": "a"}) is True
            assert await bob.get_connection_metadata(alice.connection_id) == {"name": "a"}
            assert await bob.get_connection_metadata("conn-unknown") is None
            with pytest.raises(MeshCommandError):
                await alice.set_connection_metadata({}, strategy="bogus")

            assert await bob.leave_room("lobby") is True
            assert await server.rooms.get_room_members("lobby") == [alice.connection_id]
            assert bob.rooms == frozenset()


@pytest.mark.anyio
async def test_concurrent_commands(anyio_backend: str) -> None:
    Client = _client_class(anyio_backend)
    async with serve(anyio_backend) as server, Client(f"ws://127.0.0.1:{server.port}") as client:
        results: dict[int, Any] = {}

        async def one(i: int) -> None:
            # the slow ones first: responses come back out of order
            await client.command("sleep", {"seconds": (50 - i) / 1000})
            results[i] = await client.command("echo", {"i": i})

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(one, i)
        assert results == {i: {"i": i} for i in range(50)}


@pytest.mark.anyio
async def test_timeout_frees_the_id(anyio_backend: str) -> None:
    Client = _client_class(anyio_backend)
    async with (
        serve(anyio_backend, shutdown_timeout=0.5) as server,
        Client(f"ws://127.0.0.1:{server.port}") as client,
    ):
        with pytest.raises(CommandTimeout) as info:
            await client.command("sleep", {"seconds": 1}, timeout=0.2)
        assert isinstance(info.value, TimeoutError)
        assert info.value.code == "ETIMEOUT"
        assert client._supervisor.link.conn.in_flight == 0
        assert await client.command("echo", "still fine", timeout=5) == "still fine"


@pytest.mark.anyio
async def test_typed_errors_and_raw_payloads(anyio_backend: str) -> None:
    Client = _client_class(anyio_backend)
    async with serve(anyio_backend) as server:
        url = f"ws://127.0.0.1:{server.port}"
        async with Client(url) as client:
            with pytest.raises(MeshCommandError) as info:
                await client.command("fail")
            assert (info.value.code, info.value.name, str(info.value)) == (
                "ENOPE",
                "Error",
                "nope",
            )
            assert info.value.payload == {"error": "nope", "code": "ENOPE", "name": "Error"}
            with pytest.raises(MeshCommandError) as info:
                await client.command("no-such-command")
            assert (info.value.code, info.value.name) == ("ENOTFOUND", "CommandError")
        async with Client(url, raise_errors=False) as raw:
            assert await raw.command("fail") == {
                "error": "nope",
                "code": "ENOPE",
                "name": "Error",
            }


@pytest.mark.anyio
async def test_pushes_by_callback_and_iterator(anyio_backend: str) -> None:
    Client = _client_class(anyio_backend)
    async with serve(anyio_backend, demo_app) as server:
        url = f"ws://127.0.0.1:{server.port}"
        async with Client(url) as listener, Client(url) as sender:
            sync_seen: list[Any] = []
            async_seen: list[Any] = []

            async def on_chat(payload: Any) -> None:
                await anyio.sleep(0)
                async_seen.append(payload)

            listener.on("chat", sync_seen.append)
            listener.on("chat", on_chat)
            pushes = listener.pushes()
            await listener.join_room("room-1")
            for n in range(3):
                await sender.command(
                    "broadcast-room", {"roomName": "room-1", "event": "chat", "data": {"n": n}}
                )
            with anyio.fail_after(5):
                received = [await pushes.__anext__() for _ in range(3)]
            assert received == [Push("chat", {"n": n}) for n in range(3)]
            await wait_for(lambda: len(async_seen) == 3)
            assert sync_seen == async_seen == [{"n": n} for n in range(3)]

            # `async for` over the client itself; it ends when the client closes
            got: list[Push] = []

            async def consume() -> None:
                async for push in listener:
                    got.append(push)

            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                await anyio.sleep(0.05)
                await sender.command(
                    "broadcast-room", {"roomName": "room-1", "event": "news", "data": "x"}
                )
                await wait_for(lambda: got == [Push("news", "x")])
                await listener.close()
            assert got == [Push("news", "x")]


@pytest.mark.anyio
async def test_reconnect_rejoins_rooms_then_sends_queued_commands(anyio_backend: str) -> None:
    Client = _client_class(anyio_backend)
    events: list[str] = []
    async with serve(anyio_backend, close_timeout=1.0) as server:
        port = server.port
        client = Client(
            f"ws://127.0.0.1:{port}", reconnect_interval=0.05, max_reconnect_interval=0.2
        )
        async with client:
            events = record(client, "connect", "disconnect", "reconnect", "close")
            await client.join_room("lobby")
            await client.join_room("kitchen")
            first_id = client.connection_id
            await server.close()  # the server goes away: close 1001
            await wait_for(lambda: "disconnect" in events)
            assert client.status is ClientStatus.RECONNECTING

            answers: list[Any] = []

            async def queued() -> None:
                answers.append(await client.command("my-rooms", timeout=10))

            async with anyio.create_task_group() as tg:
                tg.start_soon(queued)
                await anyio.sleep(0.3)  # the client keeps failing to reconnect
                assert answers == []
                async with serve(anyio_backend, port=port) as restarted:
                    await wait_for(lambda: bool(answers), timeout=10)
                    # the rooms were re-joined before the queued command ran
                    assert answers == [["kitchen", "lobby"]]
                    assert client.connection_id != first_id
                    assert await restarted.rooms.get_room_members("lobby") == [client.connection_id]
                    assert events == ["disconnect", "connect", "reconnect"]
                    assert await client.command("echo", 1) == 1
        assert events[-1] == "close"


@pytest.mark.anyio
async def test_dead_link_is_detected(anyio_backend: str) -> None:
    Client = _client_class(anyio_backend)
    async with serve(anyio_backend, ping_interval=0) as server:
        client = Client(
            f"ws://127.0.0.1:{server.port}",
            ping_timeout=0.3,
            max_missed_pings=1,
            reconnect_interval=0.05,
        )
        async with client:
            events = record(client, "disconnect", "reconnect")
            await client.join_room("lobby")
            first_id = client.connection_id
            await wait_for(lambda: "reconnect" in events)
            assert client.connection_id != first_id
            assert await client.command("echo", "ok") == "ok"
            await wait_for(
                lambda: server.connections.get_local_connection(first_id) is None  # cleaned up
            )
            assert client.connection_id in await server.rooms.get_room_members("lobby")


def _own_tasks(backend: str) -> set[Any]:
    if backend == "asyncio":
        return {task for task in asyncio.all_tasks() if task is not asyncio.current_task()}
    return set()


@pytest.mark.anyio
async def test_clean_close(anyio_backend: str) -> None:
    Client = _client_class(anyio_backend)
    async with serve(anyio_backend) as server:
        before = _own_tasks(anyio_backend)
        client = Client(f"ws://127.0.0.1:{server.port}", reconnect_interval=0.01)
        async with client:
            events = record(client, "connect", "disconnect", "reconnect", "close")
            closed_async: list[bool] = []

            async def on_close() -> None:
                await anyio.sleep(0)
                closed_async.append(True)

            client.on("close", on_close)
            await client.join_room("lobby")
            connection_id = client.connection_id
            pushes = client.pushes()
            await client.close()
            await client.close()  # idempotent
            assert client.status is ClientStatus.CLOSED
            assert closed_async == [True]
            with pytest.raises(StopAsyncIteration):
                await pushes.__anext__()
            with pytest.raises(MeshConnectionError):
                await client.command("echo", 1)
            await wait_for(lambda: server.connections.get_local_connection(connection_id) is None)
            assert await server.rooms.get_room_members("lobby") == []
            await anyio.sleep(0.2)
            assert events == ["disconnect", "close"]
            if anyio_backend == "trio":
                assert client._nursery is not None and not client._nursery.child_tasks
            assert _own_tasks(anyio_backend) == before
        assert _own_tasks(anyio_backend) == before


@pytest.mark.anyio
async def test_no_reconnect_when_disabled(anyio_backend: str) -> None:
    Client = _client_class(anyio_backend)
    async with serve(anyio_backend) as server:
        client = Client(f"ws://127.0.0.1:{server.port}", reconnect=False)
        async with client:
            events = record(client, "disconnect", "reconnect", "close")
            await server.close()
            await wait_for(lambda: "close" in events)
            assert events == ["disconnect", "close"]
            assert client.status is ClientStatus.CLOSED
            with pytest.raises(MeshConnectionError):
                await client.command("echo", 1)


@pytest.mark.anyio
async def test_reconnect_gives_up(anyio_backend: str) -> None:
    Client = _client_class(anyio_backend)
    async with serve(anyio_backend) as server:
        client = Client(
            f"ws://127.0.0.1:{server.port}",
            max_reconnect_attempts=2,
            reconnect_interval=0.01,
            connect_timeout=1.0,
        )
        async with client:
            events = record(client, "disconnect", "reconnect_failed", "close")
            await server.close()
            with pytest.raises(MeshConnectionError):
                await client.command("echo", 1, timeout=5)
            assert events == ["disconnect", "reconnect_failed", "close"]


@pytest.mark.anyio
async def test_body_exception_propagates_unwrapped(anyio_backend: str) -> None:
    Client = _client_class(anyio_backend)
    async with serve(anyio_backend) as server:
        with pytest.raises(ZeroDivisionError):
            async with Client(f"ws://127.0.0.1:{server.port}") as client:
                await client.join_room("lobby")
                1 / 0  # noqa: B018
        await wait_for(lambda: not server.connections.local_connections())


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", key, "-out", cert, "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


class Proxy:
    """A TCP proxy in front of the server (optionally terminating TLS) that
    can black-hole the connections it holds: bytes are swallowed, sockets
    stay open, so only the missing pings can tell the client."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.frozen: set[int] = set()
        self.count = 0

    async def _pipe(self, index: int, source: Any, sink: Any) -> None:
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            async for chunk in source:
                if index not in self.frozen:
                    await sink.send(chunk)

    async def _handle(self, downstream: Any) -> None:
        index, self.count = self.count, self.count + 1
        async with (
            downstream,
            await anyio.connect_tcp("127.0.0.1", self.upstream_port) as upstream,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(self._pipe, index, downstream, upstream)
            await self._pipe(index, upstream, downstream)
            tg.cancel_scope.cancel()

    def black_hole(self) -> None:
        self.frozen.update(range(self.count))

    @asynccontextmanager
    async def run(self, context: ssl.SSLContext | None = None) -> AsyncIterator[int]:
        tcp = await anyio.create_tcp_listener(local_host="127.0.0.1")
        listener: Any = tcp if context is None else TLSListener(tcp, context, False)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, self._handle)
            yield tcp.extra(SocketAttribute.local_port)
            tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_wss(anyio_backend: str, tls_files: tuple[str, str]) -> None:
    """wss:// through a TLS-terminating proxy in front of the plain server."""
    cert, key = tls_files
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=cert)
    Client = _client_class(anyio_backend)
    async with (
        serve(anyio_backend, auth_app) as server,
        Proxy(server.port).run(server_context) as port,
    ):
        url = f"wss://127.0.0.1:{port}/?token=secret"
        client = Client(url, headers=[("x-client", "tests")], ssl_context=client_context)
        async with client:
            assert await client.get_connection_metadata() == {"user": "ada"}
            assert await client.command("mesh/noop") is True


@pytest.mark.anyio
async def test_black_holed_socket_is_detected(anyio_backend: str) -> None:
    Client = _client_class(anyio_backend)
    async with serve(anyio_backend, ping_interval=0.1) as server:
        proxy = Proxy(server.port)
        async with proxy.run() as port:
            client = Client(f"ws://127.0.0.1:{port}", ping_timeout=0.2, reconnect_interval=0.05)
            async with client:
                events = record(client, "disconnect", "reconnect")
                await client.join_room("lobby")
                first_id = client.connection_id
                await anyio.sleep(0.5)  # pings keep an idle link alive
                assert events == []
                proxy.black_hole()
                await wait_for(lambda: "reconnect" in events)
                assert client.connection_id != first_id
                assert await client.command("my-rooms") == ["lobby"]


# -- across runtimes: each client against the other runtime's server ----------


@contextmanager
def server_in_thread(runtime: str) -> Iterator[int]:
    """Run a server on its own event loop in a thread; yields its port."""
    started = threading.Event()
    port: list[int] = []
    stop: list[Any] = []

    async def run_asyncio() -> None:
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        stop.append(lambda: loop.call_soon_threadsafe(done.set))
        async with mesh_asyncio.MeshServer(demo_app).listen("127.0.0.1", 0) as server:
            port.append(server.port)
            started.set()
            await done.wait()

    async def run_trio() -> None:
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()
        stop.append(lambda: trio.from_thread.run_sync(done.set, trio_token=token))
        async with mesh_trio.MeshServer(demo_app).listen("127.0.0.1", 0) as server:
            port.append(server.port)
            started.set()
            await done.wait()

    def main() -> None:
        try:
            if runtime == "asyncio":
                asyncio.run(run_asyncio())
            else:
                trio.run(run_trio)
        finally:
            started.set()

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    assert started.wait(10) and port, "the server did not start"
    try:
        yield port[0]
    finally:
        stop[0]()
        thread.join(15)
        assert not thread.is_alive()


async def _exercise(Client: Any, port: int) -> dict[str, Any]:
    url = f"ws://127.0.0.1:{port}"
    async with Client(url) as alice, Client(url) as bob:
        pushes = alice.pushes()
        present = await alice.join_room("x")
        await bob.join_room("x")
        assert await alice.set_connection_metadata({"k": 1}, strategy="merge")
        await bob.command("broadcast-room", {"roomName": "x", "event": "hello", "data": [1]})
        push = await pushes.__anext__()
        return {
            "present": [m["id"] for m in present] == [alice.connection_id],
            "echo": await alice.command("echo", {"a": "é"}),
            "meta": (await bob.get_connection_metadata(alice.connection_id))["k"],
            "push": push,
        }


EXPECTED = {"present": True, "echo": {"a": "é"}, "meta": 1, "push": Push("hello", [1])}


def test_trio_client_against_asyncio_server() -> None:
    async def main() -> dict[str, Any]:
        with trio.fail_after(20):
            return await _exercise(mesh_trio.MeshClient, port)

    with server_in_thread("asyncio") as port:
        result = trio.run(main)
    assert result == EXPECTED


def test_asyncio_client_against_trio_server() -> None:
    with server_in_thread("trio") as port:
        result = asyncio.run(asyncio.wait_for(_exercise(mesh_asyncio.MeshClient, port), 20))
    assert result == EXPECTED
