"""The core's :class:`~mesh_core.runtime.Runtime` on trio."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractContextManager, asynccontextmanager
from typing import Any, TypeVar

import trio

from mesh_core.runtime import Event

__all__ = ["TrioRuntime", "RUNTIME"]

T = TypeVar("T")


class _TaskGroup:
    """A nursery seen through the core's ``TaskGroup`` protocol."""

    __slots__ = ("_nursery", "start_soon")

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        # the nursery's own method: a request task costs one start_soon, as
        # on a bare nursery (no wrapper call on the hot path)
        self.start_soon: Callable[..., None] = nursery.start_soon

    def cancel(self) -> None:
        self._nursery.cancel_scope.cancel()

    def __len__(self) -> int:
        return len(self._nursery.child_tasks)


class TrioRuntime:
    """Stateless: one instance (:data:`RUNTIME`) serves every server and client."""

    name = "trio"

    def now(self) -> float:
        return trio.current_time()

    def wall_ms(self) -> int:
        return int(time.time() * 1000)

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)

    def event(self) -> Event:
        return trio.Event()

    @asynccontextmanager
    async def timeout(self, seconds: float) -> AsyncIterator[None]:
        try:
            with trio.fail_after(seconds):
                yield
        except trio.TooSlowError:
            raise TimeoutError(f"timed out after {seconds:g} s") from None

    async def gather(self, thunks: list[Callable[[], Awaitable[T]]]) -> list[T]:
        results: list[Any] = [None] * len(thunks)

        async def run(i: int, thunk: Callable[[], Awaitable[T]]) -> None:
            results[i] = await thunk()

        async with trio.open_nursery() as nursery:
            for i, thunk in enumerate(thunks):
                nursery.start_soon(run, i, thunk)
        return results

    @asynccontextmanager
    async def open_task_group(self) -> AsyncIterator[_TaskGroup]:
        async with trio.open_nursery() as nursery:
            yield _TaskGroup(nursery)

    def shield(self) -> AbstractContextManager[object]:
        return trio.CancelScope(shield=True)

    def spawn_system_task(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        trio.lowlevel.spawn_system_task(fn, name=getattr(fn, "__qualname__", None))


RUNTIME = TrioRuntime()
