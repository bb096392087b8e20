"""A complete Mesh server on the standard library's ``selectors``: no asyncio,
trio or anyio, only the sans-IO core and its public API (docs/EMBEDDING.md).

    python -m examples.embedded --port 8765 [--ping-interval SECONDS]

It serves ``examples.demo:app`` on the memory store, which answers at once,
so handlers run to completion where they start (``InlineRuntime``). Each turn:
wait for sockets or the next timer; feed bytes, tick timers; hand events to
the core; write what it queued, leaving the rest in the core while the kernel
is full, so its send-buffer bound drops a client that does not read.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import selectors
import signal
import socket
import time
from typing import Any

from mesh_core import MeshApp, ServerCore
from mesh_core.protocol import ServerConnection, State
from mesh_core.runtime import InlineRuntime, run_inline

_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


@dataclasses.dataclass(eq=False, slots=True)
class _Client:
    """One accepted socket, its state machine, and bytes the kernel has not taken."""

    sock: socket.socket
    proto: ServerConnection
    out: bytes = b""
    mask: int = _READ  # what the selector watches it for


class EmbeddedServer:
    """``ServerCore`` driven by one ``selectors`` loop in the calling thread."""

    def __init__(self, app: MeshApp, host: str = "127.0.0.1", port: int = 8765, **options: Any):
        runtime = InlineRuntime(time.monotonic, lambda: int(time.time() * 1000))
        self.core = ServerCore(app, runtime=runtime, **options)
        self.listener = socket.create_server((host, port), backlog=1024)
        self.port: int = self.listener.getsockname()[1]
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, _READ, "accept")
        # stop() may come from a signal handler or another thread: it wakes the select
        self._waker, self._wake_end = socket.socketpair()
        self.listener.setblocking(False)
        self._waker.setblocking(False)
        self.selector.register(self._waker, _READ, "wake")
        self.clients: dict[ServerConnection, _Client] = {}
        self.dirty: set[_Client] = set()  # clients the core queued something for
        self.running = True
        self._stepping = False  # inside a turn of the loop (wakes need no interrupt)

    def stop(self) -> None:
        self.running = False
        self._wake_end.send(b"x")

    def serve_forever(self) -> None:
        run_inline(self.core.start_storage())
        serving = self.core.serving()
        run_inline(serving.__aenter__())
        try:
            while self.running:
                self.step()
            self.shutdown()
        finally:
            run_inline(serving.__aexit__(None, None, None))
            run_inline(self.core.stop_storage())
            self.selector.close()
            for sock in (self.listener, self._waker, self._wake_end):
                sock.close()

    def shutdown(self) -> None:
        """Stop accepting, close every client (1001), drop those still there after close_timeout."""
        self.selector.unregister(self.listener)  # closed with the rest at the end
        self.core.close_all()  # sockets still in their handshake just wait for the deadline
        self.dirty.update(self.clients.values())
        deadline = time.monotonic() + self.core.options.close_timeout
        while self.clients and time.monotonic() < deadline:
            self.step(limit=deadline)
        for client in list(self.clients.values()):
            self._drop(client)

    def step(self, limit: float | None = None) -> None:
        """One turn of the loop: wait for I/O or the next timer, then act."""
        deadlines = [d for c in self.clients.values() if (d := c.proto.next_deadline())]
        deadlines += [limit] if limit is not None else []
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        timeout = 0.0 if self.dirty else timeout
        events = self.selector.select(timeout)
        self._stepping = True
        for key, mask in events:
            if key.data == "accept":
                self._accept()
            elif key.data == "wake":
                self._waker.recv(4096)
            else:
                if mask & _READ:
                    try:  # b"" or an error: the peer is gone (None)
                        data: bytes | None = key.data.sock.recv(65536) or None
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        data = None
                    key.data.proto.receive_data(data, time.monotonic())
                self.dirty.add(key.data)  # writable, or fed: pump it
        now = time.monotonic()
        for client in list(self.clients.values()):
            deadline = client.proto.next_deadline()
            if deadline is not None and deadline <= now:
                client.proto.tick(now)
                self.dirty.add(client)
        while self.dirty:
            self._pump(self.dirty.pop())
        self._stepping = False

    def _accept(self) -> None:
        while True:
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            proto = self.core.new_protocol((addr[0], addr[1]), time.monotonic())
            client = self.clients[proto] = _Client(sock, proto)
            proto.wake = functools.partial(self._wake, client)
            self.selector.register(sock, _READ, client)

    def _wake(self, client: _Client) -> None:
        """The core queued output: pumped at the end of this turn, or, from
        outside one (another thread), interrupt the select."""
        self.dirty.add(client)
        if not self._stepping:
            self._wake_end.send(b"x")

    def _pump(self, client: _Client) -> None:
        """Events to the core (handlers run right here), then write."""
        proto = client.proto
        self.core.handle_events(proto, proto.events())
        if not client.out:  # the kernel took everything: take the core's next batch
            client.out = proto.data_to_send()
        if client.out:
            try:
                sent = client.sock.send(client.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._drop(client)
                return
            client.out = client.out[sent:]
        if proto.state is State.CLOSED:
            self._drop(client)  # also a slow consumer's (proto.aborted: nothing queued)
            return
        # reading paused (too many requests queued): the core wakes us when a slot frees
        mask = (0 if proto.reading_paused else _READ) | (_WRITE if client.out else 0)
        if mask != client.mask:
            if client.mask:
                self.selector.unregister(client.sock)
            if mask:
                self.selector.register(client.sock, mask, client)
            client.mask = mask

    def _drop(self, client: _Client) -> None:
        if self.clients.pop(client.proto, None) is None:
            return
        client.proto.receive_data(None, time.monotonic())  # closed for good: ConnectionLost
        self.core.handle_events(client.proto, client.proto.events())  # cleanup runs now
        if client.mask:
            self.selector.unregister(client.sock)
        client.sock.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--ping-interval", type=float, default=30.0, metavar="SECONDS")
    parser.add_argument("--latency-interval", type=float, default=5.0, metavar="SECONDS")
    args = parser.parse_args(argv)
    from examples.demo import app

    server = EmbeddedServer(app, args.host, args.port, ping_interval=args.ping_interval,
                            latency_interval=args.latency_interval)  # fmt: skip
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop())
    print(f"Mesh server (embedded selectors loop) listening on ws://{args.host}:{server.port}")
    server.serve_forever()


if __name__ == "__main__":
    main()
