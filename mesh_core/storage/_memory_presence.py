"""The in-memory store's presence: present sets and member states.

Nothing here expires by itself: the instance that holds a member runs its
TTL and its state's expiry on its own timers (``mesh_core.app._presence``)
and removes what ran out, on this store as on Redis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..protocol._frames import decode_json
from . import _ops as ops

__all__ = ["MemoryPresence"]


class MemoryPresence:
    """Mixed into :class:`~mesh_core.storage.MemoryStore`: the handlers of
    the presence operations (:data:`~mesh_core.storage._ops.HANDLER_NAMES`)."""

    # room -> ordered set of present ids; (room, id) -> state as JSON text
    _present: dict[str, dict[str, None]]
    _presence_states: dict[tuple[str, str], bytes]

    def _init_presence(self) -> None:
        self._present = {}
        self._presence_states = {}

    if TYPE_CHECKING:  # MemoryStore's

        def _publish_message(self, op: ops.PublishMessage) -> None: ...

        def _add_to_room(self, op: ops.AddToRoom) -> bool: ...

    def _presence_announce(self, room: str, announce: bytes | None) -> None:
        if announce is not None:
            self._publish_message(ops.PublishMessage(ops.presence_channel(room), announce))

    def _mark_present(self, op: ops.MarkPresent) -> bool:
        members = self._present.setdefault(op.room, {})
        added = op.connection_id not in members
        members[op.connection_id] = None
        self._presence_announce(op.room, op.announce)
        return added

    def _join_present(self, op: ops.JoinPresent) -> bool:
        added = self._add_to_room(ops.AddToRoom(op.room, op.connection_id))
        self._mark_present(op)
        return added

    def _mark_absent(self, op: ops.MarkAbsent) -> bool:
        self._presence_states.pop((op.room, op.connection_id), None)
        members = self._present.get(op.room)
        removed = members is not None and members.pop(op.connection_id, _GONE) is not _GONE
        if members is not None and not members:
            del self._present[op.room]
        self._presence_announce(op.room, op.announce)
        return removed

    def _get_present(self, op: ops.GetPresent) -> list[str]:
        return list(self._present.get(op.room, ()))

    def _store_presence_state(self, op: ops.StorePresenceState) -> None:
        self._presence_states[op.room, op.connection_id] = bytes(op.state)
        self._presence_announce(op.room, op.announce)

    def _delete_presence_state(self, op: ops.DeletePresenceState) -> bool:
        deleted = self._presence_states.pop((op.room, op.connection_id), None) is not None
        self._presence_announce(op.room, op.announce)
        return deleted

    def _get_presence_states(self, op: ops.GetPresenceStates) -> list[Any]:
        states = self._presence_states
        result = []
        for cid in op.connection_ids:
            raw = states.get((op.room, cid))
            result.append(None if raw is None else decode_json(raw))
        return result


_GONE = object()
