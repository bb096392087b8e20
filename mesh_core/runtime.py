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

from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any, Protocol, TypeVar

__all__ = ["CollectingTaskGroup", "Event", "Runtime", "TLSContext", "TaskGroup"]

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
