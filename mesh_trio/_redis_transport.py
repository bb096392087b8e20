"""trio's socket shim under the project's Redis client (``mesh_core.redis.RedisClient``).

The client's logic (handshake, pool, request FIFO, batching, pub/sub,
Sentinel) is runtime-neutral; this module only supplies trio's streams. On a command
connection a caller writes directly when nothing else is being sent (saving a
task switch); meanwhile other callers' commands queue up and a writer task
sends them in one ``send_all`` (automatic pipelining). Callers park with
trio's low-level primitives rather than a ``trio.Event`` (one per command was
a visible share of the cost). Why this client: see :mod:`mesh_core.redis._client`.
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Any

import trio

from mesh_core.redis import Multiplexed, RedisClient, RedisReplyError, RedisUnavailable, Stream
from mesh_core.runtime import TLSContext

from ._runtime import RUNTIME

__all__ = ["RedisReplyError", "RedisUnavailable", "TrioRedisTransport"]

_log = logging.getLogger("mesh_trio.redis")

_READ_SIZE = 65536
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


class _Stream:
    """``mesh_core.redis.Stream`` over a trio stream; ``close()`` closes the
    socket at once, which wakes whoever waits on it."""

    def __init__(self, stream: trio.abc.Stream, sock: trio.socket.SocketType) -> None:
        self.stream = stream
        self.sock = sock
        self.lock = trio.Lock()

    async def send_all(self, data: bytes) -> None:
        async with self.lock:
            try:
                await self.stream.send_all(data)
            except _GONE as exc:
                raise ConnectionResetError(f"connection lost: {exc!r}") from exc

    async def receive_some(self) -> bytes | bytearray:
        try:
            return await self.stream.receive_some(_READ_SIZE)
        except _GONE as exc:
            raise ConnectionResetError(f"connection lost: {exc!r}") from exc

    def close(self) -> None:
        self.sock.close()


class _Waiter:
    """``mesh_core.redis.Waiter`` that parks its task with trio's low-level primitives."""

    __slots__ = ("done", "error", "expected", "replies", "sent_at", "task")

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.replies: list[Any] = []
        self.error: RedisUnavailable | None = None
        self.sent_at = 0.0
        self.done = False
        self.task: trio.lowlevel.Task | None = None

    def set(self) -> None:
        if self.done:
            return
        self.done = True
        task, self.task = self.task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    async def wait(self) -> None:
        if self.done:
            await trio.lowlevel.checkpoint()
            return
        self.task = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self.task = None  # cancelled: a late reply wakes nobody
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


class _Link:
    """A multiplexed command connection: one reader, one writer, one watcher task."""

    def __init__(self, stream: _Stream, state: Multiplexed, timeout: float) -> None:
        self.stream = stream.stream
        self.sock = stream.sock
        self.state = state
        self.timeout = timeout
        self.lot = trio.lowlevel.ParkingLot()
        self.sending = False
        self.scope = trio.CancelScope()
        # the scope of a caller's direct write (see submit); a failure cancels it
        self.send_scope = trio.CancelScope()
        state.on_fail = self._on_fail

    async def submit(self, data: bytes, waiter: Any) -> None:
        """The direct write is shielded from the caller's cancellation, so a
        command is never half-written; a socket that takes nothing for a
        whole timeout is a stuck connection, which the watcher fails
        (cancelling that write)."""
        state = self.state
        if not state.queue(waiter, trio.current_time(), data):
            return
        if self.sending or len(state.out) > 1:
            return  # the writer sends it with the rest
        data = state.take_output()
        self.sending = True
        try:
            with trio.CancelScope(shield=True) as self.send_scope:
                await self.stream.send_all(data)
        except (*_GONE, OSError) as exc:
            self._lost(exc)
        finally:
            self.sending = False
            if state.out:
                self.lot.unpark_all()

    def _lost(self, exc: BaseException) -> None:
        self.state.fail(RedisUnavailable(f"Redis connection to {self.state.label} lost: {exc!r}"))

    def _on_fail(self) -> None:
        self.scope.cancel()
        self.send_scope.cancel()

    async def run(self) -> None:
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_loop)
                    nursery.start_soon(self._watch_loop)
                    await self._read_loop()
        finally:
            self.sock.close()

    async def _watch_loop(self) -> None:
        while True:
            await trio.sleep(self.timeout / 8)
            self.state.check(trio.current_time(), self.timeout)

    async def _write_loop(self) -> None:
        try:
            while True:
                if not self.state.out or self.sending:
                    await self.lot.park()
                    continue
                data = self.state.take_output()
                self.sending = True
                try:
                    await self.stream.send_all(data)
                finally:
                    self.sending = False
        except (*_GONE, OSError) as exc:
            self._lost(exc)

    async def _read_loop(self) -> None:
        state = self.state
        try:
            while state.error is None:
                state.feed(await self.stream.receive_some(_READ_SIZE), trio.current_time())
        except (*_GONE, OSError) as exc:
            self._lost(exc)
        except Exception as exc:
            _log.exception("Redis connection reader failed")
            state.fail(RedisUnavailable(f"Redis connection to {state.label} failed: {exc!r}"))


class _Network:
    """``mesh_core.redis.Network`` on trio."""

    create_tls_context = staticmethod(ssl.create_default_context)

    async def open(
        self, host: str, port: int, *, unix_path: str | None = None, keepalive: bool = True
    ) -> _Stream:
        if unix_path is not None:
            stream = await trio.open_unix_socket(unix_path)
        else:
            stream = await trio.open_tcp_stream(host, port)
            if keepalive:
                stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return _Stream(stream, stream.socket)

    async def start_tls(self, stream: Stream, context: TLSContext, hostname: str) -> _Stream:
        assert isinstance(stream, _Stream)
        assert isinstance(context, ssl.SSLContext)
        tls = trio.SSLStream(stream.stream, context, server_hostname=hostname)
        try:
            await tls.do_handshake()
        except _GONE as exc:
            raise ConnectionResetError(f"TLS handshake failed: {exc!r}") from exc
        return _Stream(tls, stream.sock)

    def link(self, stream: Stream, state: Multiplexed, timeout: float) -> _Link:
        assert isinstance(stream, _Stream)
        return _Link(stream, state, timeout)

    def waiter(self, expected: int) -> _Waiter:
        return _Waiter(expected)


class TrioRedisTransport(RedisClient):
    """The Redis client on trio (implements the ``RedisTransport`` protocol);
    options: see :class:`mesh_core.redis.RedisClient`. Its background tasks
    run in ``nursery`` if given, else in a trio system task."""

    def __init__(self, url: str, *, nursery: trio.Nursery | None = None, **options: Any) -> None:
        spawn = None if nursery is None else nursery.start_soon
        super().__init__(
            url, runtime=RUNTIME, network=_Network(), logger=_log, spawn=spawn, **options
        )
