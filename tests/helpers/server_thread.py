"""Run a MeshServer of either runtime on its own event loop in a thread.

For tests that need two runtimes at once (an asyncio instance and a trio
instance on one Redis), or a server beside a synchronous driver. ``call``
runs a coroutine function on the server's loop and returns its result.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any


class ServerThread:
    def __init__(
        self,
        runtime: str,
        app: Any,
        *,
        storage: Callable[[], Any] | None = None,
        port: int = 0,
        **options: Any,
    ) -> None:
        self.runtime = runtime
        self.app = app
        self.storage_factory = storage
        self.requested_port = port
        self.options = options
        self.port = 0
        self.server: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stop: Callable[[], None] = lambda: None
        self._call: Callable[[Callable[[], Awaitable[Any]]], Any] | None = None

    def __enter__(self) -> ServerThread:
        target = self._run_asyncio if self.runtime == "asyncio" else self._run_trio
        self._thread = threading.Thread(target=target, daemon=True, name=f"mesh-{self.runtime}")
        self._thread.start()
        if not self._ready.wait(20):
            raise TimeoutError("server thread did not start")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._stop()
            self._thread.join(30)

    def call(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        assert self._call is not None
        return self._call(fn)

    def _make_server(self, cls: Any) -> Any:
        storage = self.storage_factory() if self.storage_factory is not None else None
        return cls(self.app, storage=storage, **self.options)

    def _run_asyncio(self) -> None:
        import asyncio

        from mesh_asyncio import MeshServer

        async def main() -> None:
            try:
                server = self.server = self._make_server(MeshServer)
                await server.start("127.0.0.1", self.requested_port)
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                return
            self.port = server.port
            loop = asyncio.get_running_loop()
            stopped = asyncio.Event()

            def stop() -> None:
                loop.call_soon_threadsafe(stopped.set)

            self._stop = stop

            def call(fn: Callable[[], Awaitable[Any]]) -> Any:
                async def run() -> Any:
                    return await fn()

                return asyncio.run_coroutine_threadsafe(run(), loop).result(30)

            self._call = call
            self._ready.set()
            await stopped.wait()
            await server.close()

        asyncio.run(main())

    def _run_trio(self) -> None:
        import trio

        from mesh_trio import MeshServer

        async def main() -> None:
            try:
                server = self.server = self._make_server(MeshServer)
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                return
            async with trio.open_nursery() as nursery:
                try:
                    await nursery.start(server.serve, "127.0.0.1", self.requested_port)
                except BaseException as exc:
                    self._error = exc
                    self._ready.set()
                    return
                self.port = server.port
                token = trio.lowlevel.current_trio_token()
                stopped = trio.Event()
                self._stop = lambda: trio.from_thread.run_sync(stopped.set, trio_token=token)
                self._call = lambda fn: trio.from_thread.run(fn, trio_token=token)
                self._ready.set()
                await stopped.wait()
                await server.close()

        trio.run(main)
