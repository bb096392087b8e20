"""The server's side of the store's message bus: local listeners per channel.

Channels, presence and records all listen to named channels of the store
(:class:`~mesh_core.storage.Subscribe`). However many local listeners a
channel has, the instance holds one store subscription for it: made for the
first listener, ended after the last one leaves. That count is kept here,
once, so that no driver has to, and so that a channel nobody here listens to
any more costs the store nothing (no subscription outlives its listeners).

A listener is a plain function ``listener(channel, data)`` called on the
event loop for every message; it must not block. It is told apart by
identity (``==``), so a bound method may be used.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..runtime import Event
from ..storage import _ops as ops

__all__ = ["Listener", "PubSub"]

log = logging.getLogger("mesh_core.pubsub")

#: ``listener(channel, data)``: see the module docstring.
Listener = Callable[[str, bytes], None]


class _Channel:
    """One channel's local listeners and where its store subscription is."""

    __slots__ = ("busy", "listeners", "subscribed")

    def __init__(self) -> None:
        self.listeners: list[Listener] = []
        self.subscribed = False
        # set while a Subscribe/Unsubscribe of this channel is under way:
        # one at a time per channel, so the store never sees them reordered
        self.busy: Event | None = None


class PubSub:
    """Local listeners over the store's channels (``server.pubsub``).

    ``execute`` runs one storage operation (the server's); ``new_event``
    makes the runtime's event, waited on only when two tasks change one
    channel's subscription at the same moment.
    """

    def __init__(
        self,
        execute: Callable[[ops.Op], Awaitable[Any]],
        instance_id: str,
        new_event: Callable[[], Event],
    ) -> None:
        self._execute = execute
        self.instance_id = instance_id
        self._new_event = new_event
        self._channels: dict[str, _Channel] = {}

    # -- the API ----------------------------------------------------------------

    async def subscribe(self, channel: str, listener: Listener) -> None:
        """Call ``listener`` for every message on ``channel`` from now on.

        Returns once the store subscription is in place: a message published
        after this returns reaches the listener. Adding a listener already
        there does nothing. Raises what the store raises (``RedisUnavailable``)
        and then leaves no listener behind."""
        entry = self._channels.get(channel)
        if entry is None:
            entry = self._channels[channel] = _Channel()
        if listener in entry.listeners:
            await self._settle(channel, entry)
            return
        # listed before the store is asked: a message that arrives the
        # moment the subscription exists already finds it
        entry.listeners.append(listener)
        try:
            await self._settle(channel, entry)
        except BaseException:
            if listener in entry.listeners:
                entry.listeners.remove(listener)
            self._forget_if_idle(channel, entry)
            raise

    async def unsubscribe(self, channel: str, listener: Listener) -> bool:
        """Stop calling ``listener`` for ``channel``; the store subscription
        ends with the last listener. ``True`` if the listener was there."""
        entry = self._channels.get(channel)
        if entry is None or listener not in entry.listeners:
            return False
        entry.listeners.remove(listener)
        await self._settle(channel, entry)
        return True

    async def publish(self, channel: str, data: bytes | str) -> None:
        """Send ``data`` to every listener of ``channel`` on every instance
        (here too, through the store, like any other instance)."""
        await self._execute(ops.PublishMessage(channel, data))

    def channels(self) -> list[str]:
        """The channels this instance has listeners for."""
        return [name for name, entry in self._channels.items() if entry.listeners]

    def listeners(self, channel: str) -> list[Listener]:
        entry = self._channels.get(channel)
        return list(entry.listeners) if entry is not None else []

    def is_subscribed(self, channel: str) -> bool:
        """Whether the store subscription of ``channel`` is in place."""
        entry = self._channels.get(channel)
        return entry is not None and entry.subscribed

    def clear(self) -> None:
        """Forget every listener and subscription at once, without asking the
        store (it is stopping and drops its subscriptions itself)."""
        self._channels.clear()

    # -- the store subscription follows the listeners -------------------------

    async def _settle(self, channel: str, entry: _Channel) -> None:
        """Make the store subscription match whether anyone listens: one
        Subscribe/Unsubscribe of a channel at a time; whoever finds one under
        way waits for it and then looks again."""
        while True:
            while entry.busy is not None:
                await entry.busy.wait()
            wanted = bool(entry.listeners)
            if wanted == entry.subscribed:
                self._forget_if_idle(channel, entry)
                return
            busy = entry.busy = self._new_event()
            # (cancelled during a Subscribe, the entry stays "not subscribed":
            # the next subscriber asks again, which is harmless; a store
            # subscription that did get made meanwhile only delivers to a
            # channel nobody listens to, and is dropped: see _on_message)
            try:
                if wanted:
                    await self._execute(ops.Subscribe(channel, self.instance_id, self._on_message))
                    entry.subscribed = True
                else:
                    # forgotten by the store even if Redis cannot be told
                    entry.subscribed = False
                    await self._execute(ops.Unsubscribe(channel, self.instance_id))
            finally:
                entry.busy = None
                busy.set()

    def _forget_if_idle(self, channel: str, entry: _Channel) -> None:
        if (
            not entry.listeners
            and not entry.subscribed
            and entry.busy is None
            and self._channels.get(channel) is entry
        ):
            del self._channels[channel]

    def _on_message(self, channel: str, data: bytes) -> None:
        entry = self._channels.get(channel)
        if entry is None:
            return  # unsubscribed meanwhile: a message already in flight
        for listener in list(entry.listeners):
            try:
                listener(channel, data)
            except Exception:
                log.exception("listener for channel %r failed", channel)
