"""The client's supervisor without sockets: ``ClientCore`` bound to an
in-memory stream whose far end is the sans-IO server role
(``ServerConnection``), run on each runtime through the runtime's
``RUNTIME`` alone. What these tests see (re-join before queued commands, the
backoff delays, ids freed on timeout, the ping watchdog, close leaving no
task) is the one implementation both adapters' ``MeshClient`` use.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any

import anyio
import pytest
from anyio.abc import TaskGroup

from mesh_asyncio._runtime import RUNTIME as ASYNCIO_RUNTIME
from mesh_core import CloseCode, ServerOptions
from mesh_core.client import (
    ClientBinding,
    ClientCore,
    ClientStatus,
    CommandTimeout,
    Endpoint,
    MeshConnectionError,
)
from mesh_core.protocol import (
    HandshakeReceived,
    Push,
    RequestReceived,
    ServerConnection,
    State,
)
from mesh_core.runtime import Event, Runtime, TLSContext
from mesh_core.runtime import TaskGroup as CoreTaskGroup
from mesh_trio._runtime import RUNTIME as TRIO_RUNTIME

pytestmark = pytest.mark.anyio


class RecordingRuntime:
    """The adapter's runtime, with every ``sleep`` recorded (the backoff
    delays, among the fake's own ``sleep(0)``)."""

    def __init__(self, inner: Runtime) -> None:
        self.inner = inner
        self.name = inner.name
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.inner.now()

    def wall_ms(self) -> int:
        return self.inner.wall_ms()

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await self.inner.sleep(seconds)

    def event(self) -> Event:
        return self.inner.event()

    def timeout(self, seconds: float) -> AbstractAsyncContextManager[object]:
        return self.inner.timeout(seconds)

    async def gather(self, thunks: list[Any]) -> list[Any]:
        return await self.inner.gather(thunks)

    def open_task_group(self) -> AbstractAsyncContextManager[CoreTaskGroup]:
        return self.inner.open_task_group()

    def shield(self) -> AbstractContextManager[object]:
        return self.inner.shield()

    def spawn_system_task(self, fn: Any) -> None:
        self.inner.spawn_system_task(fn)


class FakeStream:
    """One client connection, served in memory by a ``ServerConnection``."""

    def __init__(self, server: FakeServer, connection_id: str) -> None:
        self.server = server
        self.runtime = server.runtime
        self.connection_id = connection_id
        self.conn = ServerConnection(server.options, now=self.runtime.now())
        self.inbound = bytearray()
        self.readable = self.runtime.event()
        self.gone = False  # the socket is closed (either end)
        self.black_holed = False
        self.closed_how: str | None = None
        self.requests: list[tuple[str, Any]] = []

    # the ClientStream protocol

    async def receive_some(self, max_bytes: int) -> bytes:
        while not self.inbound and not self.gone:
            self.readable = self.runtime.event()
            await self.readable.wait()
        data = bytes(self.inbound[:max_bytes])
        del self.inbound[:max_bytes]
        return data

    async def send_all(self, data: bytes) -> None:
        await self.runtime.sleep(0)
        if self.gone:
            raise ConnectionResetError("gone")
        if self.black_holed:
            return
        now = self.runtime.now()
        self.conn.receive_data(data, now)
        for event in self.conn.events():
            if isinstance(event, HandshakeReceived):
                self.conn.accept(self.connection_id)
                self.conn.opened(now)
            elif isinstance(event, RequestReceived):
                self.requests.append((event.command, event.payload))
                handler = self.server.handlers.get(event.command)
                if handler is not None:
                    self.conn.respond(event.id, event.command, handler(event.payload))
        self.deliver()

    async def aclose(self) -> None:
        self.closed_how = self.closed_how or "graceful"
        self.vanish()

    async def abort(self) -> None:
        self.closed_how = self.closed_how or "aborted"
        self.vanish()

    # the test's levers

    def deliver(self) -> None:
        out = self.conn.data_to_send()
        if out and not self.black_holed and not self.gone:
            self.inbound += out
            self.readable.set()

    def push(self, command: str, payload: Any) -> None:
        self.conn.send_push(command, payload)
        self.deliver()

    def vanish(self) -> None:
        """The socket is gone: reads end, writes fail."""
        self.gone = True
        self.readable.set()


class FakeServer:
    """Where ``open_stream`` connects: counts connections, can refuse them."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.options = ServerOptions(ping_interval=0, latency_interval=0)
        self.refuse = False
        self.attempts = 0
        self.streams: list[FakeStream] = []
        self.handlers: dict[str, Callable[[Any], Any]] = {
            "echo": lambda payload: payload,
            "mesh/join-room": lambda payload: {"success": True, "present": []},
        }

    async def open_stream(self, endpoint: Endpoint, ssl_context: TLSContext | None) -> Any:
        assert (endpoint.host, endpoint.port, ssl_context) == ("mesh.test", 80, None)
        self.attempts += 1
        await self.runtime.sleep(0)
        if self.refuse:
            raise ConnectionRefusedError("refused")
        stream = FakeStream(self, f"conn-{len(self.streams) + 1}")
        self.streams.append(stream)
        return stream

    @property
    def last(self) -> FakeStream:
        return self.streams[-1]


def _no_tls() -> ssl.SSLContext:
    raise AssertionError("a ws:// URL needs no TLS context")


def make_client(runtime: Runtime, server: FakeServer, tg: TaskGroup, **options: Any) -> ClientCore:
    def start_task(fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        tg.start_soon(fn, *args)

    class Client(ClientCore):
        binding = ClientBinding(runtime, server.open_stream, start_task, _no_tls)

    options.setdefault("ping_timeout", 0)  # the fake server does not ping
    options.setdefault("reconnect_interval", 0.01)
    return Client("ws://mesh.test/", **options)


@pytest.fixture
def runtime(anyio_backend: str) -> RecordingRuntime:
    return RecordingRuntime(ASYNCIO_RUNTIME if anyio_backend == "asyncio" else TRIO_RUNTIME)


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.005)


def record(client: ClientCore, *names: str) -> list[str]:
    seen: list[str] = []
    for name in names:
        client.on(name, lambda name=name: seen.append(name))
    return seen


async def test_commands_pushes_and_a_clean_close(runtime: RecordingRuntime) -> None:
    server = FakeServer(runtime)
    with anyio.fail_after(5):  # the task group ends: close() left no task
        async with anyio.create_task_group() as tg:
            client = make_client(runtime, server, tg)
            events = record(client, "connect", "disconnect", "close")
            await client.connect()
            assert (client.status, client.connection_id) == (ClientStatus.ONLINE, "conn-1")
            assert await client.command("echo", {"n": 1}) == {"n": 1}

            seen: list[Any] = []

            async def on_chat(payload: Any) -> None:
                seen.append(payload)

            client.on("chat", on_chat)
            pushes = client.pushes()
            server.last.push("chat", "hi")
            assert await pushes.__anext__() == Push("chat", "hi")
            await wait_for(lambda: seen == ["hi"])

            await client.close()
            stream = server.last
            assert stream.conn.state in (State.CLOSING, State.CLOSED)  # our close frame came
            assert stream.closed_how == "graceful"  # after the closing handshake
            assert client.status is ClientStatus.CLOSED
            assert events == ["connect", "disconnect", "close"]
            with pytest.raises(StopAsyncIteration):
                await pushes.__anext__()
            with pytest.raises(MeshConnectionError):
                await client.command("echo", 1)


async def test_a_timeout_frees_the_id(runtime: RecordingRuntime) -> None:
    server = FakeServer(runtime)
    async with anyio.create_task_group() as tg:
        client = make_client(runtime, server, tg)
        await client.connect()
        with pytest.raises(CommandTimeout):
            await client.command("never-answered", timeout=0.05)
        link = client._supervisor.link
        assert link is not None and link.conn.in_flight == 0
        assert await client.command("echo", "still fine") == "still fine"
        await client.close()


async def test_reconnect_backs_off_then_rejoins_before_queued_commands(
    runtime: RecordingRuntime,
) -> None:
    server = FakeServer(runtime)
    async with anyio.create_task_group() as tg:
        client = make_client(
            runtime, server, tg, reconnect_interval=0.01, max_reconnect_interval=0.04
        )
        client._supervisor.rand = lambda: 0.5  # no jitter: the delays are exact
        events = record(client, "connect", "disconnect", "reconnect")
        await client.connect()
        await client.join_room("lobby")
        await client.join_room("kitchen")
        in_flight: list[BaseException] = []

        async def lost() -> None:
            try:
                await client.command("never-answered")
            except MeshConnectionError as exc:
                in_flight.append(exc)

        tg.start_soon(lost)
        await wait_for(lambda: len(server.last.requests) == 3)
        server.refuse = True
        server.last.vanish()
        await wait_for(lambda: client.status is ClientStatus.RECONNECTING)
        await wait_for(lambda: len(in_flight) == 1)  # failed, never resent
        answers: list[Any] = []

        async def queued() -> None:
            answers.append(await client.command("echo", "queued", timeout=5))

        tg.start_soon(queued)
        await wait_for(lambda: server.attempts >= 6)  # the first connection + 5 retries
        assert answers == []
        server.refuse = False
        await wait_for(lambda: bool(answers))
        assert answers == ["queued"]
        assert client.connection_id == "conn-2"
        first, second, third = server.last.requests
        assert {first[0], second[0]} == {"mesh/join-room"}
        assert sorted([first[1]["roomName"], second[1]["roomName"]]) == ["kitchen", "lobby"]
        assert third == ("echo", "queued")
        assert events == ["connect", "disconnect", "connect", "reconnect"]
        # exponential from reconnect_interval, capped at max_reconnect_interval
        assert [s for s in runtime.sleeps if s][:4] == [0.01, 0.02, 0.04, 0.04]
        await client.close()


async def test_a_silent_link_is_declared_dead(runtime: RecordingRuntime) -> None:
    server = FakeServer(runtime)
    async with anyio.create_task_group() as tg:
        client = make_client(runtime, server, tg, ping_timeout=0.05, max_missed_pings=0)
        events = record(client, "disconnect", "reconnect")
        await client.connect()
        server.last.black_holed = True  # open, but nothing comes through
        await wait_for(lambda: events == ["disconnect", "reconnect"])
        assert server.streams[0].closed_how == "aborted"
        assert client.connection_id == "conn-2"
        await client.close()


async def test_giving_up_closes_the_client(runtime: RecordingRuntime) -> None:
    server = FakeServer(runtime)
    async with anyio.create_task_group() as tg:
        client = make_client(runtime, server, tg, max_reconnect_attempts=2)
        events = record(client, "disconnect", "reconnect_failed", "close")
        await client.connect()
        server.refuse = True
        server.last.conn.close(CloseCode.GOING_AWAY, "bye")
        server.last.deliver()
        await wait_for(lambda: client.status is ClientStatus.CLOSED)
        assert events == ["disconnect", "reconnect_failed", "close"]
        assert server.attempts == 3  # the first connection and two retries
        assert server.streams[0].closed_how == "graceful"  # we answered the close


async def test_close_from_an_async_listener(runtime: RecordingRuntime) -> None:
    server = FakeServer(runtime)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            client = make_client(runtime, server, tg)
            done: list[bool] = []

            async def on_bye(payload: Any) -> None:
                await client.close()  # must not cancel itself or wait for itself
                done.append(True)

            client.on("bye", on_bye)
            await client.connect()
            server.last.push("bye", None)
            await wait_for(lambda: done == [True])
            assert client.status is ClientStatus.CLOSED
