"""What an adapter supplies to the core: the runtime's services, as one small
protocol passed in (composition), never as subclass hooks.

The core never imports a runtime. Where runtime-neutral code must wait, start
background work or read a clock (the server's dispatch and shutdown, the
client's supervisor, the Redis store's heartbeat and batching, Cluster
routing), it asks the :class:`Runtime` it was given. ``mesh_asyncio`` and
``mesh_trio`` each implement it in one short file (``_runtime.py``); an
embedder on another loop implements these few methods and nothing else.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, AbstractContextManager, asynccontextmanager
from typing import Any, Protocol, TypeVar

__all__ = [
    "CollectingTaskGroup",
    "Event",
    "InlineRuntime",
    "Runtime",
    "TLSContext",
    "TaskGroup",
    "run_inline",
]

T = TypeVar("T")


class Event(Protocol):
    """A one-shot flag tasks can wait on (``asyncio.Event`` / ``trio.Event``)."""

    def set(self) -> None: ...

    def is_set(self) -> bool: ...

    async def wait(self) -> Any: ...


class TLSContext(Protocol):
    """An ``ssl.SSLContext`` as the core sees it. The runtime side creates
    contexts (loading CA files is I/O) and wraps sockets with them; the core
    only passes them on, and relaxes verification for ``rediss://`` URLs that
    ask for it."""

    check_hostname: bool
    verify_mode: Any


class TaskGroup(Protocol):
    """Background tasks started together and waited for (or cancelled)
    together: a trio nursery, or its asyncio equivalent. Leaving the ``async
    with`` block waits for every task started in it."""

    def start_soon(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None: ...

    def cancel(self) -> None:
        """Cancel every task of the group (and the block's own body)."""
        ...

    def __len__(self) -> int:
        """How many tasks of the group are still running."""
        ...


class Runtime(Protocol):
    """The services of one event-loop library."""

    #: ``"asyncio"`` or ``"trio"`` (or the embedder's own name): for logs only
    name: str

    def now(self) -> float:
        """Monotonic seconds: every deadline and timer the core computes."""
        ...

    def wall_ms(self) -> int:
        """Unix time in milliseconds: values other processes read (heartbeats,
        push timestamps)."""
        ...

    async def sleep(self, seconds: float) -> None: ...

    def event(self) -> Event: ...

    def timeout(self, seconds: float) -> AbstractAsyncContextManager[object]:
        """``async with runtime.timeout(s):`` raises ``TimeoutError`` if the
        block runs longer than ``seconds``."""
        ...

    async def gather(self, thunks: list[Callable[[], Awaitable[T]]]) -> list[T]:
        """Run the thunks side by side; their results in order. The first
        exception cancels the others and propagates."""
        ...

    def open_task_group(self) -> AbstractAsyncContextManager[TaskGroup]: ...

    def shield(self) -> AbstractContextManager[object]:
        """``with runtime.shield():`` a block the caller's cancellation does
        not interrupt, for clean-up that must finish (closing connections):
        trio's shielded cancel scope; on asyncio, which delivers a
        cancellation once, a plain block."""
        ...

    def spawn_system_task(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``fn()`` in the background, outliving the task that started it
        (a trio system task, an asyncio task kept referenced); ``fn`` ends
        itself (by an event or its own task group) and handles its errors."""
        ...


class CollectingTaskGroup:
    """A :class:`TaskGroup` that runs nothing: it keeps every coroutine
    started in it (:attr:`started`, in order) for the caller to step or
    await. For driving the sans-IO core by hand, as its tests and the core
    benchmark do, with no event loop."""

    __slots__ = ("started",)

    def __init__(self) -> None:
        self.started: list[Coroutine[Any, Any, Any]] = []

    def start_soon(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        self.started.append(fn(*args))

    def cancel(self) -> None:
        """Close every coroutine not run yet."""
        for coro in self.started:
            coro.close()
        self.started.clear()

    def __len__(self) -> int:
        return len(self.started)


def run_inline(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never really suspends to completion, right now,
    and return its result.

    Mesh's handlers, hooks and built-ins are coroutines only because a store
    *may* wait; on a store that answers inline (``Storage.answers_inline``:
    the memory store) nothing on their path suspends, so a driver with no
    event loop at all (a ``selectors`` loop, a game loop) runs them with
    this. A coroutine that does suspend (it awaited ``asyncio.sleep``, a
    network store) cannot be resumed by anyone here: it is closed and
    ``RuntimeError`` raised, loudly, rather than left half run."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    name = getattr(coro, "__qualname__", coro)
    raise RuntimeError(f"{name} suspended: it needs an event loop, not run_inline")


class InlineEvent:
    """An :class:`Event` for :class:`InlineRuntime`: waiting on one that is
    not set would suspend, which nothing inline can do."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    async def wait(self) -> bool:
        if not self._set:
            raise RuntimeError("waiting on an unset event: it needs an event loop")
        return True


class InlineTaskGroup:
    """A :class:`TaskGroup` whose tasks run to completion as they start
    (:func:`run_inline`): the task group of :class:`InlineRuntime`."""

    __slots__ = ()

    def start_soon(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        run_inline(fn(*args))

    def cancel(self) -> None:
        """Nothing runs in the background, so nothing to cancel."""

    def __len__(self) -> int:
        return 0


class InlineRuntime:
    """A :class:`Runtime` with no event loop, for driving ``ServerCore`` from a
    loop of your own (``examples/embedded.py``) on a store that answers
    inline. Every task runs to completion when it starts; nothing sleeps, so
    :meth:`ServerCore.shutdown` (which waits) is not for it: close the
    connections with ``close_all()`` and flush the sockets yourself.

    The clocks are passed in, as everywhere in the core: ``now`` is monotonic
    seconds (``time.monotonic``), ``wall_ms`` Unix milliseconds."""

    __slots__ = ("_now", "_wall_ms", "name")

    def __init__(self, now: Callable[[], float], wall_ms: Callable[[], int]) -> None:
        self.name = "inline"
        self._now = now
        self._wall_ms = wall_ms

    def now(self) -> float:
        return self._now()

    def wall_ms(self) -> int:
        return self._wall_ms()

    async def sleep(self, seconds: float) -> None:
        if seconds > 0:
            raise RuntimeError("InlineRuntime cannot sleep: it has no event loop")

    def event(self) -> Event:
        return InlineEvent()

    @asynccontextmanager
    async def timeout(self, seconds: float) -> AsyncIterator[object]:
        yield None  # nothing inline can take time

    async def gather(self, thunks: list[Callable[[], Awaitable[T]]]) -> list[T]:
        return [await thunk() for thunk in thunks]

    @asynccontextmanager
    async def open_task_group(self) -> AsyncIterator[TaskGroup]:
        yield InlineTaskGroup()

    def shield(self) -> AbstractContextManager[object]:
        return contextlib.nullcontext()

    def spawn_system_task(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        run_inline(fn())
