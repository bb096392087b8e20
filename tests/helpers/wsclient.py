"""A small raw WebSocket test client on anyio (so one test body runs on
asyncio and on trio), speaking the Mesh frame format by hand.

It is deliberately independent of the project's own client: the server is
tested against the wire, not against code that shares its assumptions.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from typing import Any

import anyio
from anyio.abc import SocketStream
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)


class Rejected(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"upgrade rejected with HTTP {status}")
        self.status = status
        self.body = body


class WSClient:
    def __init__(self, stream: SocketStream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self.messages: list[Any] = []  # every decoded frame, in order
        self.pushes: list[dict[str, Any]] = []
        self.responses: dict[int, dict[str, Any]] = {}
        self.closed: CloseConnection | None = None
        self.connection_id = ""  # set by mesh/assign-id
        self.auto_pong = True
        self.auto_latency = True
        self._ids = itertools.count(1)
        self._buffer: list[str] = []
        self._pending_out: list[dict[str, Any]] = []

    @classmethod
    async def connect(
        cls,
        port: int,
        target: str = "/",
        headers: list[tuple[bytes, bytes]] | None = None,
        wait_id: bool = True,
        stream: Any = None,
    ) -> WSClient:
        """``stream``: an anyio byte stream already connected (TLS, another
        source address...) instead of a plain TCP connection to ``port``."""
        if stream is None:
            stream = await anyio.connect_tcp("127.0.0.1", port)
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send(
            ws.send(Request(host="localhost", target=target, extra_headers=headers or []))
        )
        client = cls(stream, ws)
        status: int | None = None
        body = b""
        while True:
            data = await stream.receive()
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    status = 101
                elif isinstance(event, RejectConnection):
                    status = event.status_code
                    if not event.has_body:
                        raise Rejected(status, b"")
                elif isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished:
                        raise Rejected(status or 0, body)
                elif isinstance(event, TextMessage):
                    client._on_text(event)
            if status == 101:
                break
        if wait_id:
            while not client.connection_id:
                await client._read_once()
        return client

    # -- reading ----------------------------------------------------------------

    def _on_text(self, event: Message[Any]) -> None:
        self._buffer.append(event.data if isinstance(event.data, str) else event.data.decode())
        if not event.message_finished:
            return
        frame = json.loads("".join(self._buffer))
        self._buffer.clear()
        self.messages.append(frame)
        command = frame.get("command")
        if "id" in frame:
            self.responses[frame["id"]] = frame
            return
        if command == "mesh/assign-id":
            self.connection_id = frame["payload"]
        elif command == "ping" and self.auto_pong:
            self._pending_out.append(
                {"id": next(self._ids) + 10_000_000, "command": "pong", "payload": {}}
            )
        elif command == "latency:request" and self.auto_latency:
            self._pending_out.append(
                {"id": next(self._ids) + 10_000_000, "command": "latency:response", "payload": {}}
            )
        self.pushes.append(frame)

    async def _read_once(self) -> None:
        try:
            data = await self.stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.ws.receive_data(None)
            data = None
        if data is not None:
            self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                self._on_text(event)
            elif isinstance(event, CloseConnection):
                self.closed = event
                with contextlib.suppress(Exception):
                    await self.stream.send(self.ws.send(event.response()))
            elif isinstance(event, Ping):
                await self.stream.send(self.ws.send(event.response()))
        while self._pending_out:
            await self.send_json(self._pending_out.pop(0))
        if data is None and self.closed is None:
            self.closed = CloseConnection(code=1006)

    async def wait_for(self, predicate: Any, timeout: float = 5.0) -> None:
        with anyio.fail_after(timeout):
            while not predicate():
                if self.closed is not None:
                    raise ConnectionError(f"closed: {self.closed.code} {self.closed.reason}")
                await self._read_once()

    async def wait_closed(self, timeout: float = 5.0) -> CloseConnection:
        with anyio.fail_after(timeout):
            while self.closed is None:
                await self._read_once()
        return self.closed

    async def wait_push(self, command: str, timeout: float = 5.0) -> dict[str, Any]:
        def found() -> bool:
            return any(p["command"] == command for p in self.pushes)

        await self.wait_for(found, timeout)
        for i, push in enumerate(self.pushes):
            if push["command"] == command:
                return self.pushes.pop(i)
        raise AssertionError("unreachable")

    # -- writing ----------------------------------------------------------------

    async def send_json(self, frame: Any) -> None:
        await self.send_text(json.dumps(frame))

    async def send_text(self, text: str) -> None:
        await self.stream.send(self.ws.send(TextMessage(data=text)))

    async def send_bytes(self, data: bytes) -> None:
        await self.stream.send(self.ws.send(BytesMessage(data=data)))

    async def request(self, command: str, payload: Any = None, timeout: float = 5.0) -> Any:
        """Send one request and return the response's payload."""
        rid = await self.send_request(command, payload)
        return await self.response(rid, timeout)

    async def send_request(self, command: str, payload: Any = None) -> int:
        rid = next(self._ids)
        await self.send_json(
            {"id": rid, "command": command, "payload": {} if payload is None else payload}
        )
        return rid

    async def response(self, rid: int, timeout: float = 5.0) -> Any:
        await self.wait_for(lambda: rid in self.responses, timeout)
        frame = self.responses.pop(rid)
        return frame["payload"]

    async def close(self, code: int = 1000) -> None:
        if self.closed is None:
            try:
                await self.stream.send(self.ws.send(CloseConnection(code=code)))
                with anyio.move_on_after(2):
                    while self.closed is None:
                        await self._read_once()
            except Exception:
                pass
        await self.stream.aclose()

    async def abort(self) -> None:
        await self.stream.aclose()
