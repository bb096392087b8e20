"""The storage contract every driver implements (memory, Redis, ...)."""

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

    ``execute`` runs one operation of :mod:`mesh_core._ops` and returns its
    result. Merges (``UpdateMetadata``) must be atomic across every instance
    sharing the store. ``start`` registers the instance and its delivery
    callback; ``stop`` releases what ``start`` took.
    """

    async def start(self, instance_id: str, deliver: DeliverCallback) -> None: ...

    async def stop(self) -> None: ...

    async def execute(self, op: Op) -> Any: ...
