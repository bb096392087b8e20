"""Deadlines on the server's runtime, for runtime-neutral code.

Presence runs a TTL per member and an expiry per state; each would be a task
of its own if written naively. Here any number of deadlines share one
background task, which exists only while a deadline is set (so a server with
nothing due has no task to stop), sleeps until the earliest one, and starts
each due callback as a task of the server. Time is the server's
:class:`~mesh_core.runtime.Runtime`: the core reads no clock.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._server import ServerCore

__all__ = ["Timers"]

Key = tuple[str, ...]


class Timers:
    """Deadlines on the server's runtime, all served by one background task
    that exists only while a timer is set. Setting a key again replaces its
    timer; a replaced or cancelled entry is skipped when it comes up."""

    def __init__(self, server: ServerCore) -> None:
        self._server = server
        self._heap: list[tuple[float, int, Key]] = []
        self._live: dict[Key, tuple[int, Callable[[], Coroutine[Any, Any, Any]]]]
        self._live = {}
        self._seq = itertools.count()
        self._running = False
        self._wake: Any = None
        self._until = math.inf

    def __len__(self) -> int:
        return len(self._live)

    def set(
        self,
        key: Key,
        deadline: float,
        fire: Callable[[], Coroutine[Any, Any, Any]],
    ) -> None:
        seq = next(self._seq)
        self._live[key] = (seq, fire)
        heapq.heappush(self._heap, (deadline, seq, key))
        if not self._running:
            self._running = True
            self._server._group.start_soon(self._run)
        elif deadline < self._until and self._wake is not None:
            self._wake.set()

    def cancel(self, key: Key) -> None:
        if self._live.pop(key, None) is not None and not self._live and self._wake is not None:
            self._wake.set()  # nothing left: let the task end

    async def _run(self) -> None:
        runtime = self._server.runtime
        heap = self._heap
        try:
            while self._live:
                while heap and self._live.get(heap[0][2], (None,))[0] != heap[0][1]:
                    heapq.heappop(heap)  # replaced or cancelled
                if not heap:
                    break
                deadline = heap[0][0]
                now = runtime.now()
                if deadline <= now:
                    _, _, key = heapq.heappop(heap)
                    _, fire = self._live.pop(key)
                    self._server._group.start_soon(fire)
                    continue
                self._wake = runtime.event()
                self._until = deadline
                try:
                    async with runtime.timeout(deadline - now):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:
            self._running = False
            self._wake = None
            self._until = math.inf
            heap.clear()
            if self._live:  # cancelled with timers left (shutdown): nothing fires later
                self._live.clear()
