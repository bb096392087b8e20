"""Named-channel publish/subscribe on Redis: the storage operations
``Subscribe`` / ``Unsubscribe`` / ``PublishMessage`` of :mod:`mesh_core.storage`.

A channel is the Redis pub/sub channel of the same name and a message is
sent as it is (``PUBLISH <channel> <data>``, no envelope), so reference
instances on the same Redis publish and receive the very same bytes (their
``writeChannel`` publishes on the channel name itself). The subscription
rides on the transport's one pub/sub connection, which re-subscribes every
channel after a reconnect. One subscription per channel: the core counts
its local subscribers (:class:`mesh_core.app.PubSub`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..storage import _ops as ops
from ._layout import keys
from ._resp import Arg

if TYPE_CHECKING:
    from ._transport import RedisTransport

__all__ = ["RedisPubSub"]


class RedisPubSub:
    """The pub/sub handlers of :class:`~mesh_core.redis.RedisStoreCore`
    (a mixin: the handler table is read from the driver's own methods)."""

    transport: RedisTransport
    instance_id: str

    def _reserved(self, channel: str) -> bool:
        # the instance's own delivery channel is the store's, not a topic's:
        # subscribing it here would replace the store's callback
        return channel == keys.pubsub(self.instance_id)

    async def _subscribe(self, op: ops.Subscribe) -> None:
        if self._reserved(op.channel):
            raise ValueError(f"{op.channel!r} is this instance's delivery channel")
        channel, callback = op.channel, op.callback

        def deliver(data: bytes) -> None:
            callback(channel, data)

        await self.transport.subscribe(channel, deliver)

    async def _unsubscribe(self, op: ops.Unsubscribe) -> None:
        if not self._reserved(op.channel):
            await self.transport.unsubscribe(op.channel)

    async def _publish_message(self, op: ops.PublishMessage) -> None:
        data: Arg = op.data
        await self.transport.execute("PUBLISH", op.channel, data)
