"""What the Redis store asks of a transport, and which transport a URL gets.

:class:`RedisTransport` is the whole interface between the store's logic
and the I/O: raw commands in, raw replies out, pub/sub, and the two
capabilities that differ on a Cluster (``cluster``, ``scan_all``).
:func:`open_transport` picks the transport for a URL, so both runtimes
agree on what each URL form means.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..runtime import Runtime
from ._cluster import ClusterTransportCore, is_cluster_url
from ._connection import ReconnectHook
from ._resp import Arg

__all__ = ["DEFAULT_URL", "NodeClient", "RedisTransport", "open_transport"]

#: a runtime's Redis client class: ``client(url, **options)``
NodeClient = Callable[..., "RedisTransport"]

#: the URL a ``RedisStore()`` without one talks to
DEFAULT_URL = "redis://127.0.0.1:6379/0"


class RedisTransport(Protocol):
    """The I/O a runtime supplies: raw commands in, raw replies out."""

    #: True on a Redis Cluster: the store then keeps every script to the
    #: keys of one slot (see :mod:`mesh_core.redis._store`)
    cluster: bool

    async def connect(self) -> None: ...

    async def execute(self, *args: Arg) -> Any: ...

    async def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Any]: ...

    async def subscribe(self, channel: str, callback: Callable[[bytes], None]) -> None: ...

    async def unsubscribe(self, channel: str) -> None:
        """Forget the channel at once (never renewed on reconnect) and send
        UNSUBSCRIBE if connected; never raises for an unreachable Redis."""
        ...

    async def scan_all(self, pattern: str, count: int) -> list[bytes]:
        """Every key matching ``pattern`` (``SCAN``, never ``KEYS``; on a
        Cluster, on every primary: ``SCAN`` sees one node's keys only)."""
        ...

    def on_reconnect(self, hook: ReconnectHook | None, *, first: bool = False) -> None:
        """Send ``hook()`` 's commands first, before any other, on a
        connection that replaces lost ones (Redis restarted, or Sentinel
        switched masters): what the store must have put back before it
        serves anything (with ``first``, on the first connection too)."""
        ...

    async def aclose(self) -> None: ...


def open_transport(
    url: str, client: NodeClient, runtime: Runtime, **options: Any
) -> RedisTransport:
    """The transport for ``url``: ``client(url, **options)`` (a runtime's
    :class:`~mesh_core.redis.RedisClient`) for a node or a Sentinel
    service; for ``redis+cluster://`` the Cluster router over one such
    client per node."""
    if is_cluster_url(url):
        return ClusterTransportCore(
            url, make_node=lambda node_url: client(node_url, **options), runtime=runtime
        )
    return client(url, **options)
