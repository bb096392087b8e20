"""The other servers of Mesh, behind ``MeshServer``'s test-facing surface
(``Server(app, **options)``, ``async with server.listen()``, ``port``,
``close()``, and the core's API: ``rooms``, ``connections``, ``broadcast``...),
so one e2e test body runs against each:

- ``EmbeddedServer``: ``examples/embedded.py``'s selectors loop, in a thread;
  the core's coroutine API is run on that thread (between two turns of its
  loop), as the loop's own handlers are;
- ``UvicornServer``: ``mesh_asgi.MeshASGI`` under uvicorn, in the test's
  asyncio loop;
- ``HypercornTrioServer``: the same under hypercorn's trio worker
  (``hypercorn.trio.serve``), in the test's trio run.

All serve over real sockets on 127.0.0.1.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import queue
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio

from examples import embedded
from mesh_asgi import MeshASGI
from mesh_core.runtime import run_inline

__all__ = ["SERVERS", "EmbeddedLoop", "EmbeddedServer", "HypercornTrioServer", "UvicornServer"]


class _Proxy:
    """An API object of the core whose coroutine methods run on the loop's thread."""

    def __init__(self, target: Any, call: Callable[[Callable[[], Any]], Any]) -> None:
        self._target, self._call = target, call

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if not inspect.iscoroutinefunction(value):
            return _Proxy(value, self._call) if hasattr(value, "execute") else value
        call = self._call

        async def on_loop(*args: Any, **kwargs: Any) -> Any:
            return await anyio.to_thread.run_sync(call, lambda: run_inline(value(*args, **kwargs)))

        return on_loop


class EmbeddedLoop(embedded.EmbeddedServer):
    """The example's server, taking calls from other threads between turns."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]]
        self.calls = queue.SimpleQueue()
        self.done = False

    def step(self, limit: float | None = None) -> None:
        while not self.calls.empty():
            fn, future = self.calls.get()
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)
        super().step(limit)

    def serve_forever(self) -> None:
        try:
            super().serve_forever()
        finally:
            self.done = True

    def call(self, fn: Callable[[], Any]) -> Any:
        if self.done:  # the loop has ended: nothing runs beside the caller
            return fn()
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.calls.put((fn, future))
        self._wake_end.send(b"x")
        return future.result(30)


class EmbeddedServer:
    def __init__(self, app: Any, **options: Any) -> None:
        self._loop = EmbeddedLoop(app, "127.0.0.1", 0, **options)
        self.port = self._loop.port
        self._thread: threading.Thread | None = None

    def __getattr__(self, name: str) -> Any:
        return _Proxy(self._loop.core, self._loop.call).__getattr__(name)

    @asynccontextmanager
    async def listen(self) -> AsyncIterator[EmbeddedServer]:
        self._thread = threading.Thread(target=self._loop.serve_forever, daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            await self.close()

    async def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._loop.stop()
            await anyio.to_thread.run_sync(thread.join, 30)


class _ASGIServer:
    def __init__(self, app: Any, **options: Any) -> None:
        self.mesh = MeshASGI(app, **options)
        self.port = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.mesh.server, name)

    async def close(self) -> None:
        """As ``MeshServer.close``: Mesh's own graceful shutdown (1001 to every
        client, the store cleaned), then the ASGI server stops."""
        await self.mesh.close()
        await self._stop()

    async def _stop(self) -> None:
        raise NotImplementedError


class UvicornServer(_ASGIServer):
    @asynccontextmanager
    async def listen(self) -> AsyncIterator[UvicornServer]:
        import asyncio
        import socket

        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.mesh, lifespan="on", log_level="warning")
        server = uvicorn.Server(config)
        task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))

        async def stop() -> None:
            server.should_exit = True
            await task

        self._stop = stop  # type: ignore[method-assign]
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        try:
            yield self
        finally:
            await self.close()
            sock.close()


class HypercornTrioServer(_ASGIServer):
    @asynccontextmanager
    async def listen(self) -> AsyncIterator[HypercornTrioServer]:
        import trio
        from hypercorn.config import Config
        from hypercorn.trio import serve

        config = Config()
        config.bind = ["127.0.0.1:0"]
        config.graceful_timeout = 1
        done = trio.Event()

        async def stop() -> None:
            done.set()

        self._stop = stop  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            app: Any = self.mesh  # an ASGI app; hypercorn's types name its own
            binds = await nursery.start(lambda task_status: serve(
                app, config, shutdown_trigger=done.wait, task_status=task_status
            ))  # fmt: skip
            self.port = int(binds[0].rsplit(":", 1)[1])
            try:
                yield self
            finally:
                await self.close()


#: (the anyio backend the test body runs on, the server's id, its class or None: MeshServer)
SERVERS: list[tuple[str, str, Any]] = [
    ("asyncio", "asyncio", None),
    ("trio", "trio", None),
    ("asyncio", "embedded", EmbeddedServer),
    ("asyncio", "uvicorn", UvicornServer),
    ("trio", "hypercorn-trio", HypercornTrioServer),
]
