"""The core's :class:`~mesh_core.runtime.Runtime` on asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, AbstractContextManager, asynccontextmanager
from typing import Any, TypeVar

from mesh_core.runtime import Event

__all__ = ["AsyncioRuntime", "RUNTIME"]

T = TypeVar("T")

_SYSTEM_TASKS: set[asyncio.Task[None]] = set()  # strong references while they run


class _TaskGroup:
    """A nursery on asyncio: tasks started here are awaited when the block
    ends, and a failing task cancels the rest (as trio does). Unlike
    ``asyncio.TaskGroup``, ``cancel()`` is public and ``len()`` counts the
    tasks still running."""

    __slots__ = ("_body", "_cancelled", "_errors", "_loop", "_tasks")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._errors: list[BaseException] = []
        self._body = asyncio.current_task()
        self._cancelled = False

    def start_soon(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        # the server's hot path: a request that waits costs this one task
        task = self._loop.create_task(fn(*args))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            self._errors.append(error)
            self.cancel()

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        body = self._body
        # the body cancelling its own group is about to leave the block (as
        # after a nursery's cancel, nothing is left for it to wait for)
        if body is not None and not body.done() and body is not asyncio.current_task():
            self._cancelled = True  # the body's CancelledError is ours to absorb
            body.cancel()

    def __len__(self) -> int:
        return len(self._tasks)

    async def _join(self) -> None:
        while self._tasks:
            await asyncio.wait(list(self._tasks))
        if self._errors:
            raise BaseExceptionGroup("task group", self._errors)


class AsyncioRuntime:
    """Stateless: one instance (:data:`RUNTIME`) serves every server and client."""

    name = "asyncio"

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def wall_ms(self) -> int:
        return int(time.time() * 1000)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def event(self) -> Event:
        return asyncio.Event()

    def timeout(self, seconds: float) -> AbstractAsyncContextManager[object]:
        return asyncio.timeout(seconds)

    async def gather(self, thunks: list[Callable[[], Awaitable[T]]]) -> list[T]:
        async def run(thunk: Callable[[], Awaitable[T]]) -> T:
            return await thunk()

        return list(await asyncio.gather(*(run(t) for t in thunks)))

    def shield(self) -> AbstractContextManager[object]:
        return contextlib.nullcontext()

    def spawn_system_task(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        task = asyncio.get_running_loop().create_task(fn())
        _SYSTEM_TASKS.add(task)
        task.add_done_callback(_SYSTEM_TASKS.discard)

    @asynccontextmanager
    async def open_task_group(self) -> AsyncIterator[_TaskGroup]:
        group = _TaskGroup()
        try:
            yield group
            await group._join()
        except asyncio.CancelledError:
            # the body (or the join) was cancelled: by the group's own
            # cancel(), which ends the block quietly as a nursery's does, or
            # from outside, which propagates once every task has ended
            for task in list(group._tasks):
                task.cancel()
            body = group._body
            own = group._cancelled and body is not None and body.uncancel() == 0
            await group._join()
            if own:
                return
            raise


RUNTIME = AsyncioRuntime()
