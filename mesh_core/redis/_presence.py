"""The Redis store's presence: the reference's key layout, and the sweep's
share of it (PROTOCOL.md, presence).

Keys (shared with reference instances on the same Redis):

- ``mesh:presence:room:<room>``: set of the ids present;
- ``mesh:presence:room:<room>:conn:<id>``: ``""``, with ``EX`` of the room's
  TTL when it has one (refreshed by the member's pongs);
- ``mesh:presence:state:<room>:conn:<id>``: the member's state as JSON, with
  ``PX expireAfter`` when given;
- updates are published on the channel ``mesh:presence:updates:<room>``.

Redis expiry is kept for reference instances and for tidiness only: this
project needs no keyspace notifications, because the instance holding a
member runs its TTL and state expiry on its own timers, and the dead-instance
sweep (:meth:`RedisPresence._sweep_presence`) removes a crashed instance's
members and publishes their leaves. Every command here touches one key, so
it routes on a Redis Cluster as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from ..storage import _ops as ops
from ._layout import keys

if TYPE_CHECKING:
    from ..runtime import Runtime
    from ._transport import RedisTransport

__all__ = ["RedisPresence", "presence_keys"]

log = logging.getLogger("mesh_core.redis")

_encode = msgspec.json.Encoder().encode


class presence_keys:
    """The presence part of the shared layout."""

    @staticmethod
    def room(room: str) -> str:
        return f"mesh:presence:room:{room}"

    @staticmethod
    def member(room: str, connection_id: str) -> str:
        return f"mesh:presence:room:{room}:conn:{connection_id}"

    @staticmethod
    def state(room: str, connection_id: str) -> str:
        return f"mesh:presence:state:{room}:conn:{connection_id}"


def _announce(room: str, announce: bytes | None) -> list[Sequence[Any]]:
    """The ``PUBLISH`` that goes out in a write's pipeline, after it."""
    return [] if announce is None else [("PUBLISH", ops.presence_channel(room), announce)]


def _present_commands(op: ops.MarkPresent) -> list[Sequence[Any]]:
    member = presence_keys.member(op.room, op.connection_id)
    expiry: Sequence[Any] = () if not op.ttl_ms else ("EX", _ttl_seconds(op.ttl_ms))
    return [
        ("SADD", presence_keys.room(op.room), op.connection_id),
        ("SET", member, "", *expiry),
        *_announce(op.room, op.announce),
    ]


def _ttl_seconds(ttl_ms: int) -> int:
    # the reference's rounding: whole seconds, at least one
    return max(1, ttl_ms // 1000)


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _state(raw: Any) -> Any:
    if raw is None or raw == b"" or raw == "":
        return None
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError:  # a foreign writer's bad text: as if absent
        return None


class RedisPresence:
    """Mixed into :class:`~mesh_core.redis.RedisStoreCore`: the handlers of
    the presence operations, and the sweep's removal of a gone connection's
    presence."""

    transport: RedisTransport
    runtime: Runtime

    if TYPE_CHECKING:  # the store's

        def _add_to_room_commands(self, op: ops.AddToRoom) -> list[Sequence[Any]]: ...

        def _joining(self, room: str, cid: str) -> int: ...

        def _joined(self, room: str, cid: str, token: int) -> None: ...

    async def _mark_present(self, op: ops.MarkPresent) -> bool:
        added, *_ = await self.transport.pipeline(_present_commands(op))
        return bool(added)

    async def _join_present(self, op: ops.JoinPresent) -> bool:
        commands = self._add_to_room_commands(ops.AddToRoom(op.room, op.connection_id))
        token = self._joining(op.room, op.connection_id)
        joined, *_ = await self.transport.pipeline([*commands, *_present_commands(op)])
        self._joined(op.room, op.connection_id, token)
        return bool(joined)

    async def _mark_absent(self, op: ops.MarkAbsent) -> bool:
        removed, *_ = await self.transport.pipeline(
            [
                ("SREM", presence_keys.room(op.room), op.connection_id),
                ("DEL", presence_keys.member(op.room, op.connection_id)),
                ("DEL", presence_keys.state(op.room, op.connection_id)),
                *_announce(op.room, op.announce),
            ]
        )
        return bool(removed)

    async def _get_present(self, op: ops.GetPresent) -> list[str]:
        members = await self.transport.execute("SMEMBERS", presence_keys.room(op.room))
        return sorted(_text(m) for m in members)

    async def _store_presence_state(self, op: ops.StorePresenceState) -> None:
        key = presence_keys.state(op.room, op.connection_id)
        expiry: Sequence[Any] = ("PX", op.expire_after_ms) if op.expire_after_ms else ()
        await self.transport.pipeline(
            [("SET", key, op.state, *expiry), *_announce(op.room, op.announce)]
        )

    async def _delete_presence_state(self, op: ops.DeletePresenceState) -> bool:
        key = presence_keys.state(op.room, op.connection_id)
        deleted, *_ = await self.transport.pipeline(
            [("DEL", key), *_announce(op.room, op.announce)]
        )
        return bool(deleted)

    async def _get_presence_states(self, op: ops.GetPresenceStates) -> list[Any]:
        if not op.connection_ids:
            return []
        raw = await self.transport.pipeline(
            [("GET", presence_keys.state(op.room, cid)) for cid in op.connection_ids]
        )
        return [_state(value) for value in raw]

    async def _sweep_presence(self, connection_id: str) -> None:
        """A connection of a dead instance, or one of ours whose cleanup
        Redis missed (retried by the heartbeat): remove it from every present
        set it is in and publish one leave per room it was removed from. The
        ``SREM`` reply decides, so however many instances sweep, one leave
        goes out per room (and none for a member already gone)."""

        rooms = sorted(
            _text(r)
            for r in await self.transport.execute("SMEMBERS", keys.connection_rooms(connection_id))
        )
        if not rooms:
            return
        removed = await self.transport.pipeline(
            [("SREM", presence_keys.room(room), connection_id) for room in rooms]
        )
        gone = [room for room, was in zip(rooms, removed, strict=True) if was]
        if not gone:
            return
        now = self.runtime.wall_ms()
        commands: list[Sequence[Any]] = []
        for room in gone:
            commands += [
                ("DEL", presence_keys.member(room, connection_id)),
                ("DEL", presence_keys.state(room, connection_id)),
                (
                    "PUBLISH",
                    ops.presence_channel(room),
                    _encode(ops.presence_update("leave", connection_id, room, now)),
                ),
            ]
        await self.transport.pipeline(commands)
        log.info("swept presence of %s in %d room(s)", connection_id, len(gone))
