"""The storage contract every driver implements (memory, Redis, ...).

Everything the server needs to know about a driver is declared here, so the
server never asks which driver it holds: whether its operations can suspend
(``answers_inline``), what it runs in the background (``run``), how one
instance of several sharing it leaves (``detach``, then ``stop``). A new
capability (presence, channels, records) adds its operations to
:mod:`mesh_core.storage._ops` and a handler per operation to each driver; this
contract does not change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from ._ops import Op

__all__ = ["DeliverCallback", "Storage"]

#: Called by a driver when another instance publishes frames for connections
#: this instance holds: ``deliver(connection_ids, command, payload)``.
DeliverCallback = Callable[[Sequence[str], str, Any], None]


@runtime_checkable
class Storage(Protocol):
    """A storage driver.

    ``execute`` runs one operation of :mod:`mesh_core.storage._ops` and
    returns its result. Merges (``UpdateMetadata``) must be atomic across
    every instance sharing the store. ``start`` registers the instance and
    its delivery callback; ``run`` is the driver's background duties for as
    long as the server runs; ``detach`` then ``stop`` release what ``start``
    took.

    Two optional members, looked up with ``getattr`` so that a driver
    without them still satisfies the protocol: ``async def check()`` raises
    :class:`~mesh_core.StorageUnavailable` unless the store answers now
    (``/healthz``), and ``reconnects`` counts connections the driver opened
    again after losing one (``mesh_redis_reconnects_total``).
    """

    #: ``True`` when ``execute`` never suspends (it awaits nothing that
    #: waits): the server then answers built-ins right where the frame
    #: arrived, without a task per request. Only a driver whose every
    #: operation completes synchronously may say so (the in-memory store).
    answers_inline: bool

    async def start(self, instance_id: str, deliver: DeliverCallback) -> None: ...

    async def run(self) -> None:
        """The driver's background duties (heartbeats, sweeps), run by the
        server beside its listener and cancelled at shutdown. A driver with
        none returns at once."""
        ...

    def detach(self, instance_id: str) -> None:
        """Instance ``instance_id`` leaves: deliver nothing more to it. A
        store several servers of one process share forgets that one's
        callback; a driver whose ``stop`` already does this does nothing."""
        ...

    async def stop(self) -> None: ...

    async def execute(self, op: Op) -> Any: ...
