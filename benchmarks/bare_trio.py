"""The floor on trio: a bare wsproto + msgspec server, nothing else.

``python -m benchmarks.bare_trio --port N``: one task per connection that
reads, feeds wsproto, answers every text frame with ``{"id", "command",
"payload": true}`` and writes; the trio counterpart of ``bare_asyncio``.
"""

from __future__ import annotations

import argparse
import signal
from functools import partial

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from ._util import raise_fd_limit
from .bare_asyncio import ASSIGN_ID, DECODER, ENCODER, Response


async def handle(stream: trio.SocketStream) -> None:
    ws = WSConnection(ConnectionType.SERVER)
    try:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            ws.receive_data(data)
            out = bytearray()
            closing = False
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
                    closing = True
            if out:
                await stream.send_all(bytes(out))
            if closing:
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return
    finally:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)


async def serve(port: int) -> None:
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1", backlog=1024)
        nursery.start_soon(partial(trio.serve_listeners, handle, listeners))
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    raise_fd_limit()
    trio.run(serve, args.port)


if __name__ == "__main__":
    main()
