"""The floor on asyncio: a bare wsproto + msgspec server, nothing else.

``python -m benchmarks.bare_asyncio --port N [--uvloop]``. It upgrades every
connection, sends one ``mesh/assign-id`` push, and answers every text frame
with ``{"id", "command", "payload": true}``: no routing, no tasks, no store.
What Mesh costs on top of its own stack is measured against this.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import cast

import msgspec
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from ._util import raise_fd_limit


class Frame(msgspec.Struct):
    command: str
    payload: msgspec.Raw = msgspec.Raw(b"null")
    id: int | None = None


class Response(msgspec.Struct):
    id: int | None
    command: str
    payload: bool


DECODER = msgspec.json.Decoder(Frame)
ENCODER = msgspec.json.Encoder()
ASSIGN_ID = ENCODER.encode({"command": "mesh/assign-id", "payload": "bare"}).decode()


class BareProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.ws = WSConnection(ConnectionType.SERVER)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        ws = self.ws
        ws.receive_data(data)
        out = bytearray()
        for event in ws.events():
            if isinstance(event, TextMessage):
                frame = DECODER.decode(event.data)
                reply = ENCODER.encode(Response(frame.id, frame.command, True))
                out += ws.send(TextMessage(data=reply.decode()))
            elif isinstance(event, Request):
                out += ws.send(AcceptConnection())
                out += ws.send(TextMessage(data=ASSIGN_ID))
            elif isinstance(event, CloseConnection):
                out += ws.send(event.response())
        if out and self.transport is not None:
            self.transport.write(bytes(out))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(BareProtocol, "127.0.0.1", port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    raise_fd_limit()
    if args.uvloop:
        import uvloop

        uvloop.run(serve(args.port))
    else:
        asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
