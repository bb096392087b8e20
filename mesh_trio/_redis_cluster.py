"""The Redis Cluster transport on trio: the core's router over one
:class:`TrioRedisTransport` per node.

Routing, redirects and the pub/sub move live in
:mod:`mesh_core._redis_cluster`; the node transports keep doing their
multiplexed connections, timeouts and the mapping of failures to
``RedisUnavailable``. This module only supplies trio's ways to run coroutines
side by side and to keep the pub/sub watchdog running in the background.
"""

from __future__ import annotations

from typing import Any

import trio

from mesh_core.redis import ClusterTransportCore, NodeTransport, Thunk

from ._redis_transport import TrioRedisTransport

__all__ = ["TrioRedisClusterTransport"]


async def _gather(thunks: list[Thunk]) -> list[Any]:
    results: list[Any] = [None] * len(thunks)

    async def run(i: int, thunk: Thunk) -> None:
        results[i] = await thunk()

    async with trio.open_nursery() as nursery:
        for i, thunk in enumerate(thunks):
            nursery.start_soon(run, i, thunk)
    return results


class TrioRedisClusterTransport(ClusterTransportCore):
    """``redis+cluster://[[user]:password@]host[:port][,host[:port]...]`` on trio.

    ``command_timeout``, ``connect_timeout`` and any other keyword (``nursery=``,
    ``max_connections=``...) go to each node's :class:`TrioRedisTransport`.
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
            return TrioRedisTransport(
                node_url,
                command_timeout=command_timeout,
                connect_timeout=connect_timeout,
                **node_options,
            )

        super().__init__(
            url,
            make_node=make_node,
            gather=_gather,
            sleep=trio.sleep,
            clock=trio.current_time,
            max_redirects=max_redirects,
            pubsub_check_interval=pubsub_check_interval,
        )
        self._watch_scope: trio.CancelScope | None = None
        self._watch_done = trio.Event()

    def start_watchdog(self) -> None:
        if self._watch_scope is None and not self._closed:
            self._watch_scope = trio.CancelScope()
            # a system task, like the node transports' own: it must outlive
            # the task that happened to subscribe
            trio.lowlevel.spawn_system_task(self._watch, self._watch_scope)

    async def _watch(self, scope: trio.CancelScope) -> None:
        try:
            with scope:
                await self.watch_pubsub()
        finally:
            self._watch_done.set()

    async def _close_node(self, transport: NodeTransport) -> None:
        with trio.CancelScope(shield=True):
            await transport.aclose()

    async def aclose(self) -> None:
        if self._watch_scope is not None:
            self._watch_scope.cancel()
            # a move it was making closes what it opened before it ends
            with trio.CancelScope(shield=True):
                await self._watch_done.wait()
        await super().aclose()
