"""The server-side API objects handlers receive: ``Connection`` (one client
held here), ``ConnectionsAPI`` (``server.connections``: connection metadata)
and ``RoomsAPI`` (``server.rooms``: rooms and room metadata).

Each API object is a thin, typed face over storage operations
(:mod:`mesh_core.storage._ops`): a method builds an operation and hands it to
the server, which applies the app's limits and runs it on the store. A new
capability (presence, channels, records) adds its API object here, in the
same shape (``class PresenceAPI`` over its own operations), and the server
creates it in ``ServerCore.__init__`` next to ``connections`` and ``rooms``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ..protocol import CloseCode, ServerConnection, UpgradeRequest
from ..storage import _ops as ops
from ..storage._strategies import updater

if TYPE_CHECKING:
    from ._server import ServerCore

__all__ = ["Connection", "ConnectionRef", "ConnectionsAPI", "RoomsAPI", "id_set", "ref_id"]


class Connection:
    """A connection this server holds: what hooks and handlers receive."""

    __slots__ = ("_cleaned", "_lost", "_phase", "id", "opened_at", "proto", "request", "server")

    def __init__(
        self, server: ServerCore, proto: ServerConnection, request: UpgradeRequest
    ) -> None:
        assert proto.id is not None
        self.id: str = proto.id
        self.server = server
        self.proto = proto
        self.request = request
        self._phase = "opening"  # opening -> open -> done
        #: the runtime clock (seconds) when the upgrade was accepted
        self.opened_at: float = server.runtime.now()
        self._lost = False
        self._cleaned = False

    def __repr__(self) -> str:
        return f"<Connection {self.id} {self.proto.state.value}>"

    @property
    def remote_address(self) -> tuple[str, int] | None:
        return self.proto.peer

    @property
    def latency(self) -> float | None:
        """The last measured round trip in milliseconds."""
        return self.proto.latency

    @property
    def is_open(self) -> bool:
        return not self._lost

    def send(self, command: str, payload: Any = None) -> bool:
        """Push ``{"command", "payload"}`` to this client (no id)."""
        return self.proto.send_push(command, payload)

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        self.proto.close(code, reason)

    async def get_metadata(self) -> Any:
        return await self.server.connections.get_metadata(self)

    async def set_metadata(self, value: Any, strategy: str = "replace") -> Any:
        return await self.server.connections.set_metadata(self, value, strategy=strategy)


ConnectionRef = Connection | str


def ref_id(connection: ConnectionRef) -> str:
    """The id of a :class:`Connection`, or the id itself."""
    if isinstance(connection, Connection):
        return connection.id
    if isinstance(connection, str):
        return connection
    raise TypeError(f"expected a Connection or a connection id, got {type(connection).__name__}")


def _rows(pairs: Iterable[tuple[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": key, "metadata": value} for key, value in pairs]


class ConnectionsAPI:
    """Connection metadata. Every method takes a :class:`Connection` or a
    connection id (of a connection on any instance sharing the store)."""

    def __init__(self, server: ServerCore) -> None:
        self._server = server

    async def set_metadata(
        self, connection: ConnectionRef, value: Any, *, strategy: str = "replace"
    ) -> Any:
        """Store ``value`` with a strategy (``replace``/``merge``/``deepMerge``);
        the merge is atomic. Returns the stored value."""
        return await self._server.execute(
            ops.UpdateMetadata(
                "connection", ref_id(connection), updater(strategy, value), strategy, value
            )
        )

    async def update_metadata(self, connection: ConnectionRef, update: Callable[[Any], Any]) -> Any:
        """Atomic read-modify-write: store ``update(old)`` (``old`` is ``None``
        when there is none). ``update`` must be a pure function: a shared store
        may call it again if another writer got in first."""
        return await self._server.execute(
            ops.UpdateMetadata("connection", ref_id(connection), update)
        )

    async def get_metadata(self, connection: ConnectionRef) -> Any:
        (value,) = await self._server.execute(ops.GetMetadata("connection", (ref_id(connection),)))
        return value

    async def get_all_metadata(self) -> list[dict[str, Any]]:
        """``[{"id", "metadata"}]`` for every connection on every instance."""
        return _rows(await self._server.execute(ops.GetAllMetadata("connection")))

    async def get_all_metadata_for_room(self, room: str) -> list[dict[str, Any]]:
        return _rows(await self._server.execute(ops.GetRoomMembersMetadata(room)))

    def get_local_connection(self, connection_id: str) -> Connection | None:
        return self._server._local.get(connection_id)

    def local_connections(self) -> list[Connection]:
        return list(self._server._local.values())


class RoomsAPI:
    """Room metadata and membership."""

    def __init__(self, server: ServerCore) -> None:
        self._server = server

    async def set_metadata(self, room: str, value: Any, *, strategy: str = "replace") -> Any:
        """Store room metadata (``None`` stores JSON null; it does not delete)."""
        return await self._server.execute(
            ops.UpdateMetadata("room", room, updater(strategy, value), strategy, value)
        )

    async def update_metadata(self, room: str, update: Callable[[Any], Any]) -> Any:
        """Atomic read-modify-write of the room's metadata; see
        :meth:`ConnectionsAPI.update_metadata`."""
        return await self._server.execute(ops.UpdateMetadata("room", room, update))

    async def get_metadata(self, room: str) -> Any:
        (value,) = await self._server.execute(ops.GetMetadata("room", (room,)))
        return value

    async def get_all_metadata(self) -> list[dict[str, Any]]:
        return _rows(await self._server.execute(ops.GetAllMetadata("room")))

    async def delete_metadata(self, room: str) -> bool:
        """Drop the room's metadata only; members stay."""
        return bool(await self._server.execute(ops.DeleteRoomMetadata(room)))

    async def add_to_room(self, room: str, connection: ConnectionRef) -> bool:
        return bool(await self._server.execute(ops.AddToRoom(room, ref_id(connection))))

    async def remove_from_room(self, room: str, connection: ConnectionRef) -> bool:
        return bool(await self._server.execute(ops.RemoveFromRoom(room, ref_id(connection))))

    async def is_in_room(self, room: str, connection: ConnectionRef) -> bool:
        return bool(await self._server.execute(ops.IsInRoom(room, ref_id(connection))))

    async def get_room_members(self, room: str) -> list[str]:
        return list(await self._server.execute(ops.GetRoomMembers(room)))

    async def get_connection_rooms(self, connection: ConnectionRef) -> list[str]:
        return list(await self._server.execute(ops.GetConnectionRooms(ref_id(connection))))

    async def get_all_rooms(self) -> list[str]:
        """Rooms with at least one member."""
        return list(await self._server.execute(ops.GetAllRooms()))

    async def clear_room(self, room: str) -> list[str]:
        """Remove every member; the room's metadata stays."""
        return list(await self._server.execute(ops.ClearRoom(room)))

    async def delete_room(self, room: str) -> list[str]:
        """Remove every member and the room's metadata."""
        return list(await self._server.execute(ops.DeleteRoom(room)))


def id_set(exclude: ConnectionRef | Iterable[ConnectionRef]) -> set[str]:
    """The ids of one connection (or id) or of several."""
    if isinstance(exclude, (Connection, str)):
        return {ref_id(exclude)}
    return {ref_id(item) for item in exclude}
