"""The embedded in-memory store: one process, no server, the default.

Every operation runs synchronously inside ``execute`` with no await in
between, so a read-modify-write can never interleave with another on the
same event loop: concurrent merges cannot lose keys. Several servers in one
process may share one store (instances in one process, as on one Redis); a
frame for a connection another instance holds is handed to that instance's
delivery callback, the in-process counterpart of Redis pub/sub.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from ..protocol._frames import decode_json, encode_json
from . import _ops as ops
from ._base import DeliverCallback
from ._memory_channels import MemoryChannels
from ._memory_presence import MemoryPresence
from ._memory_records import MemoryRecords

__all__ = ["MemoryStore"]

log = logging.getLogger("mesh_core.storage")


class MemoryStore(MemoryChannels, MemoryRecords, MemoryPresence):
    #: every operation completes inside ``execute``: the server answers
    #: built-ins on this store without a task (see :class:`Storage`)
    answers_inline = True

    def __init__(self) -> None:
        super().__init__()
        self._owner: dict[str, str] = {}  # connection id -> instance id
        # metadata is kept as JSON text, as Redis keeps it: a value that could
        # not be stored in Redis fails here too, and readers get fresh copies
        self._conn_meta: dict[str, bytes] = {}
        self._room_members: dict[str, dict[str, None]] = {}  # ordered sets
        self._conn_rooms: dict[str, dict[str, None]] = {}
        self._room_meta: dict[str, bytes] = {}
        self._instances: dict[str, DeliverCallback] = {}
        self._init_presence()
        # channel -> instance id -> callback: the in-process message bus
        self._subscriptions: dict[str, dict[str, ops.MessageCallback]] = {}
        self._init_records()
        self._handlers = ops.handlers(self)

    # -- the Storage contract -------------------------------------------------

    async def start(self, instance_id: str, deliver: DeliverCallback) -> None:
        self._instances[instance_id] = deliver

    async def run(self) -> None:
        """No background duties: nothing expires, nothing to sweep."""

    def detach(self, instance_id: str) -> None:
        """Forget an instance that stopped: its delivery callback and every
        channel subscription it still had (a stopped server receives nothing)."""
        self._instances.pop(instance_id, None)
        for channel in list(self._subscriptions):
            self._unsubscribe(ops.Unsubscribe(channel, instance_id))

    async def stop(self) -> None:
        """Nothing to release: instances unregister through :meth:`detach`."""

    async def execute(self, op: ops.Op) -> Any:
        return self.apply(op)

    def apply(self, op: ops.Op) -> Any:
        """Run one operation synchronously (the core's tests drive this)."""
        return self._handlers[type(op)](op)

    # -- connections ----------------------------------------------------------

    def _register(self, op: ops.RegisterConnection) -> None:
        self._owner[op.connection_id] = op.instance_id
        if op.metadata is not None:
            self._conn_meta[op.connection_id] = encode_json(op.metadata)

    def _unregister(self, op: ops.UnregisterConnection) -> list[str]:
        cid = op.connection_id
        rooms = list(self._conn_rooms.pop(cid, ()))
        for room in rooms:
            members = self._room_members.get(room)
            if members is not None:
                members.pop(cid, None)
                if not members:
                    del self._room_members[room]
        self._conn_meta.pop(cid, None)
        self._owner.pop(cid, None)
        return rooms

    def _get_all_connection_ids(self, op: ops.GetAllConnectionIds) -> list[tuple[str, str]]:
        return list(self._owner.items())

    # -- metadata -------------------------------------------------------------

    def _table(self, scope: ops.Scope) -> dict[str, bytes]:
        return self._conn_meta if scope == "connection" else self._room_meta

    def _get_metadata(self, op: ops.GetMetadata) -> list[Any]:
        table = self._table(op.scope)
        return [_load(table.get(key)) for key in op.keys]

    def _get_all_metadata(self, op: ops.GetAllMetadata) -> list[tuple[str, Any]]:
        if op.scope == "connection":
            return [(cid, _load(self._conn_meta.get(cid))) for cid in self._owner]
        return [(room, decode_json(value)) for room, value in self._room_meta.items()]

    def _update_metadata(self, op: ops.UpdateMetadata) -> Any:
        if op.scope == "connection" and op.key not in self._owner:
            raise ops.UnknownConnection(f"Connection {op.key!r} is not connected")
        table = self._table(op.scope)
        old = table.get(op.key)
        new = op.update(_load(old))
        if new is ops.UNCHANGED:
            return _load(old)
        table[op.key] = encode_json(new)
        return new

    def _delete_room_metadata(self, op: ops.DeleteRoomMetadata) -> bool:
        return self._room_meta.pop(op.room, _MISSING) is not _MISSING

    # -- rooms ----------------------------------------------------------------

    def _add_to_room(self, op: ops.AddToRoom) -> bool:
        members = self._room_members.setdefault(op.room, {})
        if op.connection_id in members:
            return False
        members[op.connection_id] = None
        self._conn_rooms.setdefault(op.connection_id, {})[op.room] = None
        return True

    def _remove_from_room(self, op: ops.RemoveFromRoom) -> bool:
        members = self._room_members.get(op.room)
        if members is None or op.connection_id not in members:
            return False
        del members[op.connection_id]
        if not members:
            del self._room_members[op.room]
        rooms = self._conn_rooms.get(op.connection_id)
        if rooms is not None:
            rooms.pop(op.room, None)
            if not rooms:
                del self._conn_rooms[op.connection_id]
        return True

    def _is_in_room(self, op: ops.IsInRoom) -> bool:
        return op.connection_id in self._room_members.get(op.room, ())

    def _get_room_members(self, op: ops.GetRoomMembers) -> list[str]:
        return list(self._room_members.get(op.room, ()))

    def _get_room_members_metadata(self, op: ops.GetRoomMembersMetadata) -> list[tuple[str, Any]]:
        return [
            (cid, _load(self._conn_meta.get(cid))) for cid in self._room_members.get(op.room, ())
        ]

    def _get_connection_rooms(self, op: ops.GetConnectionRooms) -> list[str]:
        return list(self._conn_rooms.get(op.connection_id, ()))

    def _get_all_rooms(self, op: ops.GetAllRooms) -> list[str]:
        return list(self._room_members)

    def _clear_room(self, op: ops.ClearRoom) -> list[str]:
        members = list(self._room_members.get(op.room, ()))
        for cid in members:
            self._remove_from_room(ops.RemoveFromRoom(op.room, cid))
        return members

    def _delete_room(self, op: ops.DeleteRoom) -> list[str]:
        removed = self._clear_room(ops.ClearRoom(op.room))
        self._room_meta.pop(op.room, None)
        return removed

    # -- delivery -------------------------------------------------------------

    def _publish(self, op: ops.Publish) -> None:
        by_owner: defaultdict[str, list[str]] = defaultdict(list)
        for cid in op.connection_ids:
            owner = self._owner.get(cid)
            if owner is not None:
                by_owner[owner].append(cid)
        for owner, ids in by_owner.items():
            deliver = self._instances.get(owner)
            if deliver is not None:
                deliver(ids, op.command, op.payload)

    # -- publish/subscribe ----------------------------------------------------

    def _subscribe(self, op: ops.Subscribe) -> None:
        self._subscriptions.setdefault(op.channel, {})[op.instance_id] = op.callback

    def _unsubscribe(self, op: ops.Unsubscribe) -> None:
        subscribers = self._subscriptions.get(op.channel)
        if subscribers is not None:
            subscribers.pop(op.instance_id, None)
            if not subscribers:
                del self._subscriptions[op.channel]

    def _publish_message(self, op: ops.PublishMessage) -> None:
        subscribers = self._subscriptions.get(op.channel)
        if not subscribers:
            return
        data = op.data.encode() if isinstance(op.data, str) else bytes(op.data)
        # a copy: a callback may subscribe or unsubscribe
        for callback in list(subscribers.values()):
            try:
                callback(op.channel, data)
            except Exception:
                log.exception("message callback for channel %r failed", op.channel)


_MISSING = object()


def _load(raw: bytes | None) -> Any:
    return None if raw is None else decode_json(raw)
