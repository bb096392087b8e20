"""The ASGI binding of the core: one ASGI application serving Mesh over the
ASGI WebSocket protocol.

The ASGI server owns the upgrade and the framing, so each connection is a
message-level ``ServerConnection`` (``framed=False``): whole messages in,
text messages out, the core's rules unchanged. The running library is found
with ``sniffio`` and the core gets ``mesh_asyncio``'s or ``mesh_trio``'s
runtime, so one object works under uvicorn, hypercorn and hypercorn's trio
worker. Per connection, three tasks: one reads ASGI messages into the core, one
runs the core (events, timers), one awaits ``send`` (see ``_Session``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import sniffio

from mesh_core import MeshApp, ServerCore, ServerOptions, Storage, UpgradeRequest
from mesh_core.protocol import CloseCode, ServerConnection, State
from mesh_core.runtime import Event, Runtime, TaskGroup

__all__ = ["MeshASGI"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_TEXT_PLAIN = [(b"content-type", b"text/plain; charset=utf-8")]


def _runtime() -> Runtime:
    if sniffio.current_async_library() == "trio":
        from mesh_trio import RUNTIME as trio_runtime

        return trio_runtime
    from mesh_asyncio import RUNTIME as asyncio_runtime

    return asyncio_runtime


def upgrade_request(scope: Scope) -> UpgradeRequest:
    """The ASGI scope as handshake authentication sees it: the full path (the
    mount point included) and query, the headers, the client as the peer."""
    client = scope.get("client")
    peer = (str(client[0]), int(client[1])) if client else None
    raw = scope.get("raw_path")
    path = raw.decode("latin-1") if raw else scope.get("root_path", "") + scope["path"]
    query = scope.get("query_string", b"").decode("latin-1")
    headers = tuple(
        (name.decode("latin-1").lower(), value.decode("latin-1"))
        for name, value in scope.get("headers", ())
    )
    return UpgradeRequest(f"{path}?{query}" if query else path, headers, peer)


class _Sockets:
    """The open connections, as :meth:`ServerCore.shutdown` sees them."""

    def __init__(self) -> None:
        self.open: dict[ServerConnection, TaskGroup] = {}
        self.closing = False

    async def stop_accepting(self) -> None:
        self.closing = True

    def protocols(self) -> list[ServerConnection]:
        return list(self.open)

    def abort(self) -> None:
        for group in list(self.open.values()):
            group.cancel()


class _Session:
    """One WebSocket: the core's machine between ASGI ``receive`` and ``send``.

    Three tasks: the reader feeds ``receive`` into the core; the pump runs
    the core (events, timers, the end) and never waits on the client; the
    sender awaits ``send`` for one batch at a time. The pump takes the next
    batch from the core only once the sender has flushed the last, so what a
    client does not read stays in the core, where ``max_send_buffer`` bounds
    it, whether the server's ``send`` waits for the socket (uvicorn) or not.
    A slow consumer is dropped by the pump even while the sender is stuck:
    hypercorn's trio worker shields its socket writes from cancellation, so a
    ``send`` to a client that reads nothing never returns; it is left to end
    with the socket."""

    def __init__(self, server: ServerCore, proto: ServerConnection, scope: Scope, send: Send):
        self.server, self.proto, self.scope, self._send = server, proto, scope, send
        self.runtime = server.runtime
        self.wakeup = self.runtime.event()
        self.resume = self.runtime.event()
        self.flush = self.runtime.event()
        self.outbox: list[Message] = []  # taken from the core, not flushed yet
        self.accepted = False
        self.gone = False  # the peer disconnected: nothing more to send
        proto.wake = self.poke

    def poke(self) -> None:
        self.wakeup.set()

    async def send(self, message: Message) -> None:
        if self.gone:
            return
        try:
            await self._send(message)
        except Exception:  # the server lost the client under us
            self.gone = True
            self.proto.receive_closed(CloseCode.ABNORMAL, "connection lost")

    async def read(self, receive: Receive) -> None:
        proto, runtime = self.proto, self.runtime
        while True:
            if proto.reading_paused:  # back-pressure: the core wakes us when a slot frees
                self.resume = runtime.event()
                await self.resume.wait()
                continue
            message = await receive()
            kind = message["type"]
            if kind == "websocket.receive":
                text = message.get("text")
                proto.receive_message(
                    text if text is not None else message.get("bytes") or b"", runtime.now()
                )
            elif kind == "websocket.disconnect":
                self.gone = True
                proto.receive_closed(
                    message.get("code", CloseCode.ABNORMAL), message.get("reason") or ""
                )
                self.poke()
                return
            self.poke()

    async def sender(self) -> None:
        while True:
            await self.flush.wait()
            self.flush = self.runtime.event()
            while self.outbox:
                await self.send(self.outbox[0])
                del self.outbox[0]
            self.poke()  # flushed: the pump may take the next batch

    def _post(self, messages: list[Message]) -> None:
        if messages:
            self.outbox.extend(messages)
            self.flush.set()

    def _take(self) -> None:
        """The core's next batch for the sender, once it flushed the last."""
        proto = self.proto
        if self.outbox:
            return
        batch: list[Message] = []
        if not self.accepted and proto.id is not None:
            self.accepted = True
            batch.append({"type": "websocket.accept"})
        batch += [{"type": "websocket.send", "text": text} for text in proto.messages_to_send()]
        self._post(batch)

    async def pump(self) -> None:
        """Run the core until the connection is closed and cleaned; then
        flush what is left and the close (not for a slow consumer)."""
        proto, server, runtime = self.proto, self.server, self.runtime
        while True:
            self.wakeup = runtime.event()  # before draining: a wake from now on is seen
            server.handle_events(proto, proto.events())
            if proto.state is State.CLOSED:
                server.handle_events(proto, proto.events())  # ConnectionLost: the cleanup
                break
            self._take()
            if not proto.reading_paused:
                self.resume.set()
            deadline = proto.next_deadline()
            if deadline is None:
                await self.wakeup.wait()
                continue
            delay = deadline - runtime.now()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with runtime.timeout(delay):
                        await self.wakeup.wait()
            now = runtime.now()
            if now >= deadline:
                proto.tick(now)
        if proto.aborted or self.gone:
            return  # nothing more for this client: it does not read, or it is gone
        while self.outbox:  # the last batch, then what the core queued since
            self.wakeup = runtime.event()
            await self.wakeup.wait()
        self._take()
        self._post(self._finish())
        while self.outbox and not self.gone:
            self.wakeup = runtime.event()
            await self.wakeup.wait()

    def _finish(self) -> list[Message]:
        proto = self.proto
        if proto.rejection is not None and not self.accepted:
            status, reason = proto.rejection
            if "websocket.http.response" in self.scope.get("extensions", {}):
                return [
                    {"type": "websocket.http.response.start", "status": status,
                     "headers": _TEXT_PLAIN},
                    {"type": "websocket.http.response.body", "body": reason.encode()},
                ]  # fmt: skip
            return [{"type": "websocket.close", "code": CloseCode.POLICY_VIOLATION}]
        code, reason = proto.close_to_send or (proto.close_code or CloseCode.NORMAL, "")
        return [{"type": "websocket.close", "code": code, "reason": reason}]


class MeshASGI:
    """Mesh as one ASGI application: ``app.mount("/ws", MeshASGI(mesh_app))``.

    Takes what ``MeshServer`` takes (``storage``, ``options``, option
    overrides). Storage starts and stops with the ASGI lifespan (this app's
    own, or :meth:`lifespan` passed to Starlette/FastAPI, which do not
    forward lifespan events to mounted apps), or with the first connection
    when the server runs no lifespan. :attr:`server` is the ``ServerCore``
    (``rooms``, ``broadcast``...) while it runs."""

    def __init__(
        self,
        app: MeshApp,
        *,
        storage: Storage | None = None,
        options: ServerOptions | None = None,
        **option_overrides: Any,
    ) -> None:
        self.app = app
        self._storage = storage
        self._options = options
        self._overrides = option_overrides
        self.server: ServerCore | None = None
        self._ready: Event | None = None
        self._sockets = _Sockets()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            body = b"Upgrade Required: this is a Mesh WebSocket endpoint"
            await send({"type": "http.response.start", "status": 426,
                        "headers": [*_TEXT_PLAIN, (b"upgrade", b"websocket")]})  # fmt: skip
            await send({"type": "http.response.body", "body": body})

    @asynccontextmanager
    async def lifespan(self, _app: object = None) -> AsyncIterator[None]:
        """Serve inside the block: Starlette's and FastAPI's ``lifespan=``.

        The server runs in a task of its own, not around the block: the
        shutdown of :meth:`close` ends ``serving()`` by cancelling it, which
        must not cancel the caller's block (Starlette's lifespan would end
        before the ASGI server asked it to)."""
        runtime = _runtime()
        ready = self._ready = self._ready or runtime.event()
        server = ServerCore(
            self.app, runtime=runtime, storage=self._storage, options=self._options,
            **self._overrides,
        )  # fmt: skip
        sockets = self._sockets = _Sockets()
        started, stop = runtime.event(), runtime.event()
        failure: list[Exception] = []

        async def run() -> None:
            try:
                await server.start_storage()
            except Exception as exc:
                failure.append(exc)
                started.set()
                return
            try:
                async with server.serving():
                    self.server = server
                    ready.set()
                    started.set()
                    try:
                        await stop.wait()  # or close() ends serving() here
                    finally:
                        if not sockets.closing:
                            await server.shutdown(sockets)
                await stop.wait()  # closed early: the store lives until the lifespan ends
            finally:
                await server.stop_storage()

        async with runtime.open_task_group() as group:
            group.start_soon(run)
            await started.wait()
            if failure:
                raise failure[0]
            try:
                yield
            finally:
                stop.set()

    async def close(self) -> None:
        """Mesh's graceful shutdown now (``ServerCore.shutdown``: stop taking
        connections, finish requests, close every client 1001, clean the
        store), before the ASGI server stops: it would close the sockets
        itself (uvicorn with 1012, hypercorn's trio worker by cancelling
        them) before the lifespan's shutdown comes. The store stays up until
        the lifespan ends."""
        if self.server is not None and not self._sockets.closing:
            await self.server.shutdown(self._sockets)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        started = False
        try:
            async with self.lifespan():
                started = True
                await send({"type": "lifespan.startup.complete"})
                await receive()  # lifespan.shutdown
        except Exception as exc:
            if started:
                raise
            await send({"type": "lifespan.startup.failed", "message": repr(exc)})
            return
        await send({"type": "lifespan.shutdown.complete"})

    async def _serving(self) -> ServerCore:
        """The running server; started here, for the life of the process, by
        the first connection when no lifespan started it."""
        if self._ready is None:
            runtime = _runtime()
            self._ready = runtime.event()

            async def serve_forever() -> None:
                async with self.lifespan():
                    await runtime.event().wait()

            runtime.spawn_system_task(serve_forever)
        await self._ready.wait()
        assert self.server is not None
        return self.server

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = await self._serving()
        sockets = self._sockets
        request = upgrade_request(scope)
        if (await receive())["type"] != "websocket.connect":
            return
        if sockets.closing:
            await send({"type": "websocket.close", "code": CloseCode.GOING_AWAY})
            return
        proto = server.new_protocol(request.peer, server.runtime.now(), framed=False)
        session = _Session(server, proto, scope, send)
        proto.receive_upgrade(request)
        async with server.runtime.open_task_group() as group:
            sockets.open[proto] = group
            try:
                group.start_soon(session.read, receive)
                group.start_soon(session.sender)
                await session.pump()
            finally:
                sockets.open.pop(proto, None)
                proto.receive_closed()  # if the shutdown aborted it; else nothing
                server.handle_events(proto, proto.events())  # the cleanup, if not done
                # a sender stuck in a send() that cannot be cancelled (see _Session) ends
                # with the socket; nothing of this connection is left in Mesh meanwhile
                group.cancel()
