"""The Redis Cluster transport on asyncio: the core's router over one
:class:`AsyncioRedisTransport` per node.

Routing, redirects and the pub/sub move live in
:mod:`mesh_core._redis_cluster`; the node transports keep doing pooling,
auto-pipelining, timeouts and the mapping of failures to ``RedisUnavailable``.
This module only supplies asyncio's ways to run coroutines side by side and to
keep the pub/sub watchdog running in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from mesh_core.redis import ClusterTransportCore, NodeTransport, Thunk

from ._redis_transport import AsyncioRedisTransport

__all__ = ["AsyncioRedisClusterTransport"]


async def _gather(thunks: list[Thunk]) -> list[Any]:
    return list(await asyncio.gather(*(thunk() for thunk in thunks)))


class AsyncioRedisClusterTransport(ClusterTransportCore):
    """``redis+cluster://[[user]:password@]host[:port][,host[:port]...]`` on asyncio.

    ``command_timeout``, ``connect_timeout`` and any other keyword go to each
    node's :class:`AsyncioRedisTransport`.
    """

    def __init__(
        self,
        url: str,
        *,
        command_timeout: float = 2.0,
        connect_timeout: float = 2.0,
        max_redirects: int = 5,
        pubsub_check_interval: float = 2.0,
        **node_options: Any,
    ) -> None:
        def make_node(node_url: str) -> NodeTransport:
            return AsyncioRedisTransport(
                node_url,
                command_timeout=command_timeout,
                connect_timeout=connect_timeout,
                **node_options,
            )

        super().__init__(
            url,
            make_node=make_node,
            gather=_gather,
            sleep=asyncio.sleep,
            clock=time.monotonic,
            max_redirects=max_redirects,
            pubsub_check_interval=pubsub_check_interval,
        )
        self._watchdog: asyncio.Task[None] | None = None

    def start_watchdog(self) -> None:
        if self._watchdog is None and not self._closed:
            self._watchdog = asyncio.get_running_loop().create_task(self.watch_pubsub())

    async def aclose(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
        await super().aclose()
