"""Writers of one key on this instance take turns, so local contention costs
one round trip per batch, not a retry storm.

The writer at the head of a key's queue leads: it applies its own update and
every update queued behind it in one go (for the Redis store, one
compare-and-set), then passes the turn on. Only writers on other instances
can then make a compare-and-set fail. Cancellation is handled here once: a
cancelled waiter leaves the queue (or hands on the turn it was given), and a
cancelled leader puts the updates it carried back at the head of the queue.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ..runtime import Event, Runtime

__all__ = ["Turns", "Update"]


class Update:
    """One writer's update of a metadata value, waiting its turn."""

    __slots__ = ("abandoned", "done", "error", "fn", "leads", "result")

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn
        self.done: Event | None = None
        self.leads = False
        self.abandoned = False  # its writer was cancelled while in a leader's batch
        self.result: Any = None
        self.error: BaseException | None = None

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


class Turns:
    """The queues of writers, by location (any hashable key)."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        #: location -> the writers waiting behind the one that leads
        self.writers: dict[Any, list[Update]] = {}

    async def take(
        self,
        location: Any,
        fn: Callable[[Any], Any],
        apply: Callable[[list[Update]], Awaitable[None]],
    ) -> Any:
        """Wait for the turn at ``location``, then ``apply`` a batch of
        updates (``fn``'s and those queued meanwhile), setting each one's
        ``result`` or ``error``; return ``fn``'s outcome (or raise its error)."""
        me = Update(fn)
        queue = self.writers.get(location)
        if queue is None:
            queue = self.writers[location] = []
        else:
            me.done = self._runtime.event()
            queue.append(me)
            try:
                await me.done.wait()
            except BaseException:
                # cancelled while waiting: a turn it was given, or a place in
                # the queue, must not stall the writers behind it for good
                if me.leads:
                    self._pass_turn(location, queue)
                elif any(update is me for update in queue):
                    queue.remove(me)
                else:
                    me.abandoned = True  # in a leader's batch: not retried for it
                raise
            if not me.leads:
                return me.outcome()
        batch = [me, *queue]
        queue.clear()
        try:
            await apply(batch)
        except Exception as exc:
            for update in batch:
                update.error = exc
        except BaseException:
            # The leader was cancelled: the others' updates may not have been
            # written, so they must not report success. They go back to the
            # head of the queue, the first of them leads, and they are applied
            # again to whatever Redis holds then (if the interrupted write did
            # land, applying them again is harmless: an update is computed
            # from the stored value, and the strategies are idempotent).
            queue[:0] = [update for update in batch[1:] if not update.abandoned]
            del batch[1:]
            raise
        finally:
            self._pass_turn(location, queue)
            for update in batch[1:]:
                assert update.done is not None
                update.done.set()
        return me.outcome()

    def _pass_turn(self, location: Any, queue: list[Update]) -> None:
        """Wake the next writer queued for ``location`` as its new leader."""
        if queue:
            successor = queue.pop(0)
            successor.leads = True
            assert successor.done is not None
            successor.done.set()
        else:
            del self.writers[location]
