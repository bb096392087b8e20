"""The runtime-neutral half of a server: dispatch, lifecycle, the Mesh API.

Everything here is plain ``async def`` code that awaits only the storage
driver and the application's own handlers, so it runs unchanged on asyncio
and on trio. An adapter subclasses :class:`ServerCore` and supplies the few
things that need a runtime: a clock (``_now``), a way to start a background
task (``_spawn``) and the sockets.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import secrets
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any

from .._config import ServerOptions
from .._errors import MeshError, RedisUnavailable, error_payload, not_found_payload
from .._metrics import UNKNOWN_COMMAND, Metrics, bump, prometheus_text
from ..protocol._frames import encode_json, encode_push
from ..protocol._handshake import Reject, UpgradeRequest
from ..protocol._server_connection import (
    CloseCode,
    ConnectionLost,
    Event,
    HandshakeReceived,
    PongReceived,
    RequestReceived,
    text_frame,
)
from ..protocol._server_connection import ServerConnection as Protocol
from ..runtime import Event as RuntimeEvent
from ..runtime import Runtime
from ..storage import _ops as ops
from ..storage._base import Storage
from ..storage._memory import MemoryStore
from ..storage._strategies import updater
from ._app import Context, MeshApp
from ._builtins import BUILTINS, CheckClientWrite, Steps
from ._presence import PRESENCE_GUARDED, PresenceAPI, PresenceHub, PresenceStep
from ._pubsub import PubSub

__all__ = ["Connection", "ConnectionRef", "ConnectionsAPI", "RoomsAPI", "ServerCore"]

log = logging.getLogger("mesh_core.server")


class Connection:
    """A connection this server holds: what hooks and handlers receive."""

    __slots__ = ("_cleaned", "_lost", "_phase", "id", "proto", "request", "server")

    def __init__(self, server: ServerCore, proto: Protocol, request: UpgradeRequest) -> None:
        assert proto.id is not None
        self.id: str = proto.id
        self.server = server
        self.proto = proto
        self.request = request
        self._phase = "opening"  # opening -> open -> done
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


def _cid(connection: ConnectionRef) -> str:
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
        return await self._server._execute(
            ops.UpdateMetadata(
                "connection", _cid(connection), updater(strategy, value), strategy, value
            )
        )

    async def update_metadata(self, connection: ConnectionRef, update: Callable[[Any], Any]) -> Any:
        """Atomic read-modify-write: store ``update(old)`` (``old`` is ``None``
        when there is none). ``update`` must be a pure function: a shared store
        may call it again if another writer got in first."""
        return await self._server._execute(
            ops.UpdateMetadata("connection", _cid(connection), update)
        )

    async def get_metadata(self, connection: ConnectionRef) -> Any:
        (value,) = await self._server._execute(ops.GetMetadata("connection", (_cid(connection),)))
        return value

    async def get_all_metadata(self) -> list[dict[str, Any]]:
        """``[{"id", "metadata"}]`` for every connection on every instance."""
        return _rows(await self._server._execute(ops.GetAllMetadata("connection")))

    async def get_all_metadata_for_room(self, room: str) -> list[dict[str, Any]]:
        return _rows(await self._server._execute(ops.GetRoomMembersMetadata(room)))

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
        return await self._server._execute(
            ops.UpdateMetadata("room", room, updater(strategy, value), strategy, value)
        )

    async def update_metadata(self, room: str, update: Callable[[Any], Any]) -> Any:
        """Atomic read-modify-write of the room's metadata; see
        :meth:`ConnectionsAPI.update_metadata`."""
        return await self._server._execute(ops.UpdateMetadata("room", room, update))

    async def get_metadata(self, room: str) -> Any:
        (value,) = await self._server._execute(ops.GetMetadata("room", (room,)))
        return value

    async def get_all_metadata(self) -> list[dict[str, Any]]:
        return _rows(await self._server._execute(ops.GetAllMetadata("room")))

    async def delete_metadata(self, room: str) -> bool:
        """Drop the room's metadata only; members stay."""
        return bool(await self._server._execute(ops.DeleteRoomMetadata(room)))

    async def add_to_room(self, room: str, connection: ConnectionRef) -> bool:
        return bool(await self._server._execute(ops.AddToRoom(room, _cid(connection))))

    async def remove_from_room(self, room: str, connection: ConnectionRef) -> bool:
        return bool(await self._server._execute(ops.RemoveFromRoom(room, _cid(connection))))

    async def is_in_room(self, room: str, connection: ConnectionRef) -> bool:
        return bool(await self._server._execute(ops.IsInRoom(room, _cid(connection))))

    async def get_room_members(self, room: str) -> list[str]:
        return list(await self._server._execute(ops.GetRoomMembers(room)))

    async def get_connection_rooms(self, connection: ConnectionRef) -> list[str]:
        return list(await self._server._execute(ops.GetConnectionRooms(_cid(connection))))

    async def get_all_rooms(self) -> list[str]:
        """Rooms with at least one member."""
        return list(await self._server._execute(ops.GetAllRooms()))

    async def clear_room(self, room: str) -> list[str]:
        """Remove every member; the room's metadata stays."""
        return list(await self._server._execute(ops.ClearRoom(room)))

    async def delete_room(self, room: str) -> list[str]:
        """Remove every member and the room's metadata."""
        return list(await self._server._execute(ops.DeleteRoom(room)))


class ServerCore:
    """Runtime-neutral server: subclassed by ``mesh_asyncio.MeshServer`` and
    ``mesh_trio.MeshServer``, which add sockets, a clock and task spawning."""

    #: the adapter's runtime services (timers of presence, wall-clock stamps)
    runtime: Runtime

    def __init__(
        self,
        app: MeshApp,
        *,
        storage: Storage | None = None,
        options: ServerOptions | None = None,
        instance_id: str | None = None,
        **option_overrides: Any,
    ) -> None:
        if not isinstance(app, MeshApp):
            raise TypeError(f"expected a MeshApp, got {type(app).__name__}")
        base = options or ServerOptions()
        if option_overrides:
            fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
            unknown = set(option_overrides) - set(fields)
            if unknown:
                raise TypeError(f"unknown server options: {', '.join(sorted(unknown))}")
            base = ServerOptions(**{**fields, **option_overrides})
        self.app = app
        self.options = base
        self.storage: Storage = storage if storage is not None else MemoryStore()
        self.instance_id = instance_id or f"inst-{secrets.token_hex(8)}"
        self._local: dict[str, Connection] = {}
        self._inflight = 0  # requests being handled, for graceful shutdown
        self._metrics = Metrics()
        self.connections = ConnectionsAPI(self)
        self.rooms = RoomsAPI(self)
        self.presence = PresenceAPI(self)
        self._presence = PresenceHub(self)
        #: the store's named channels, one store subscription per channel
        self.pubsub = PubSub(self._execute, self.instance_id, self._new_event)
        # the reference's names, on the server itself
        self.add_to_room = self.rooms.add_to_room
        self.remove_from_room = self.rooms.remove_from_room
        self.is_in_room = self.rooms.is_in_room
        self.get_room_members = self.rooms.get_room_members
        self.get_all_rooms = self.rooms.get_all_rooms
        self.clear_room = self.rooms.clear_room
        self.delete_room = self.rooms.delete_room

    # -- what the adapter provides --------------------------------------------

    def _now(self) -> float:
        raise NotImplementedError

    def _spawn(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        raise NotImplementedError

    def _new_event(self) -> RuntimeEvent:
        raise NotImplementedError

    def _new_protocol(self, peer: tuple[str, int] | None, now: float) -> Protocol:
        """The state machine for a socket the adapter just accepted."""
        proto = Protocol(self.options, peer=peer, now=now, metrics=self._metrics)
        proto.report_pongs = bool(self.app.presence)  # pongs refresh presence
        return proto

    # -- observability --------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        """The server's counters as a plain dict: connections (current and
        total), requests by command, errors by code, violations, bytes in and
        out, slow-consumer closes, closes by code, refused upgrades."""
        return self._metrics.snapshot(len(self._local), self._inflight)

    def metrics_prometheus(self, prefix: str = "mesh") -> str:
        """The same counters in the Prometheus text exposition format, ready
        to serve from a ``/metrics`` endpoint (no dependency needed)."""
        return prometheus_text(self.metrics(), prefix)

    # -- storage --------------------------------------------------------------

    async def _execute(self, op: ops.Op) -> Any:
        if isinstance(op, CheckClientWrite):
            return await self._check_client_write(op)
        if isinstance(op, PresenceStep):
            return await self._presence.execute(op)
        if isinstance(op, ops.UpdateMetadata) and self.options.max_metadata_size:
            op = self._bounded(op)
        if self.app.presence.tracks and isinstance(op, _MEMBERSHIP):
            # every change of membership passes here (built-ins and the
            # rooms API alike): presence follows it
            return await self._presence.follow(op, self.storage.execute)
        return await self.storage.execute(op)

    async def _drive(self, steps: Steps, reader: Connection | None = None) -> Any:
        """Run a built-in: execute each operation it yields, resume it with
        the result, return what it returns. With a ``reader`` (the client the
        built-in runs for), what it reads about other connections passes the
        app's read policy first."""
        guarded = reader is not None and self.app.client_metadata_reads != "allow"
        try:
            op = next(steps)
            while True:
                result = await self._execute(op)
                if guarded:
                    assert reader is not None
                    result = await self._guard_read(reader, op, result)
                op = steps.send(result)
        except StopIteration as stop:
            return stop.value
        finally:
            steps.close()

    # -- policies -------------------------------------------------------------

    def _bounded(self, op: ops.UpdateMetadata) -> ops.UpdateMetadata:
        """Refuse (``ETOOLARGE``, nothing stored) metadata whose JSON is over
        ``max_metadata_size``: checked inside the atomic update, on the value
        that would be stored, and up front for ``replace`` (which a driver
        may store without calling ``update``)."""
        limit = self.options.max_metadata_size
        scope, key, update, value = op.scope, op.key, op.update, op.value
        replacing = op.strategy == "replace"
        if replacing:
            _check_size(scope, key, value, limit)

        def checked(old: Any) -> Any:
            new = update(old)
            if new is not ops.UNCHANGED and not (replacing and new is value):
                _check_size(scope, key, new, limit)
            return new

        return ops.UpdateMetadata(scope, key, checked, op.strategy, value)

    async def _guard_read(self, reader: Connection, op: ops.Op, result: Any) -> Any:
        """Blank (``None``) the metadata of other connections that the
        ``client_metadata_reads`` policy does not let ``reader`` see."""
        if isinstance(op, ops.GetMetadata) and op.scope == "connection":
            return [
                value if await self._may_read(reader, key) else None
                for key, value in zip(op.keys, result, strict=True)
            ]
        if isinstance(op, ops.GetRoomMembersMetadata) or (
            isinstance(op, ops.GetAllMetadata) and op.scope == "connection"
        ):
            return [
                (cid, value if await self._may_read(reader, cid) else None) for cid, value in result
            ]
        return result

    async def _may_read(self, reader: Connection, target_id: str) -> bool:
        if target_id == reader.id:
            return True  # a client may always read its own metadata
        policy = self.app.client_metadata_reads
        if policy == "allow":
            return True
        if policy == "deny" or not callable(policy):
            return False
        verdict = policy(reader, target_id)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        return bool(verdict)

    async def _check_client_write(self, op: CheckClientWrite) -> bool:
        policy = self.app.client_metadata_writes
        if policy == "allow":
            return True
        if policy == "deny" or not callable(policy):
            return False
        connection = self._local.get(op.connection_id)
        if connection is None:
            return False
        verdict = policy(connection, op.value, op.strategy)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        return bool(verdict)

    async def _start_storage(self) -> None:
        await self.storage.start(self.instance_id, self._deliver_from_elsewhere)

    async def _stop_storage(self) -> None:
        self.pubsub.clear()  # the store drops its subscriptions as it stops
        if isinstance(self.storage, MemoryStore):
            self.storage.detach(self.instance_id)
        await self.storage.stop()

    # -- the connection lifecycle (the adapter feeds protocol events here) ----

    def _handle_events(self, proto: Protocol, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, RequestReceived):
                connection = self._local.get(proto.id or "")
                if connection is None:
                    proto.request_done()
                elif self._runs_inline(event.command):
                    _run_inline(self._handle_request(connection, event))
                else:
                    self._spawn(self._handle_request, connection, event)
            elif isinstance(event, PongReceived):
                connection = self._local.get(proto.id or "")
                if connection is not None and self._presence.holds(connection.id):
                    self._spawn(self._presence.pong, connection.id)
            elif isinstance(event, ConnectionLost):
                connection = self._local.get(proto.id or "")
                if connection is not None:
                    self._connection_lost(connection)
            elif isinstance(event, HandshakeReceived):
                self._spawn(self._handshake, proto, event.request)

    def _runs_inline(self, command: str) -> bool:
        """Whether a request can be answered without a task of its own: a
        built-in on the in-memory store (or one that touches no store), with
        no application code (middleware, policy functions) on its path, never
        waits, so it runs right here. That is most traffic, and a task per
        request is most of its cost."""
        app = self.app
        return (
            command in BUILTINS
            and command not in app.commands
            and (type(self.storage) is MemoryStore or command in _STORELESS)
            and not app.global_middleware
            and command not in app.command_middleware
            and not (callable(app.client_metadata_writes) and command in _WRITES_POLICED)
            and not (callable(app.client_metadata_reads) and command in _READS_POLICED)
            and not (app.presence.guarded and command in PRESENCE_GUARDED)
        )

    def _full(self) -> bool:
        limit = self.options.max_connections
        return bool(limit) and len(self._local) >= limit

    async def _handshake(self, proto: Protocol, request: UpgradeRequest) -> None:
        if not self.options.origin_allowed(request.header("origin")):
            log.debug("refused an upgrade from origin %r", request.header("origin"))
            proto.reject(403, "Forbidden: origin not allowed")
            return
        if self._full():
            proto.reject(503, "Service Unavailable: too many connections")
            return
        metadata: Any = None
        authenticate = self.app.authenticator
        if authenticate is not None:
            try:
                metadata = await authenticate(request)
            except Reject as exc:
                proto.reject(exc.status, str(exc))
                return
            except Exception:
                log.exception("authenticate_connection failed; refusing the upgrade")
                proto.reject(500, "Internal Server Error")
                return
            if not metadata:
                proto.reject(401, "Unauthorized")
                return
            limit = self.options.max_metadata_size
            if limit:
                try:
                    _check_size("connection", "(new)", metadata, limit)
                except MeshError as exc:  # the app's doing: not stored, not admitted
                    log.error("authenticate_connection returned metadata too large: %s", exc)
                    proto.reject(500, "Internal Server Error")
                    return
                except Exception:
                    log.exception("authenticate_connection returned metadata that is not JSON")
                    proto.reject(500, "Internal Server Error")
                    return
            if self._full():  # others got in while this one authenticated
                proto.reject(503, "Service Unavailable: too many connections")
                return
        proto.accept(f"conn-{secrets.token_hex(12)}")
        if proto.id is None:  # the peer left during authentication
            return
        self._metrics.connections_total += 1
        connection = Connection(self, proto, request)
        self._local[connection.id] = connection
        await self._open(connection, metadata)

    async def _open(self, connection: Connection, metadata: Any) -> None:
        try:
            await self._execute(ops.RegisterConnection(connection.id, self.instance_id, metadata))
            for hook in self.app.connection_hooks:
                await hook(connection)
        except Exception:
            log.exception("opening connection %s failed", connection.id)
            connection.proto.close(CloseCode.INTERNAL_ERROR, "connection setup failed")
        if connection._lost:
            connection._phase = "done"
            await self._cleanup(connection)
        else:
            connection._phase = "open"
            connection.proto.opened(self._now())

    def _connection_lost(self, connection: Connection) -> None:
        connection._lost = True
        if connection._phase == "open":
            connection._phase = "done"
            self._spawn(self._cleanup, connection)
        # while opening, _open cleans up when it finishes

    async def _cleanup(self, connection: Connection) -> None:
        if connection._cleaned:
            return
        connection._cleaned = True
        try:
            for hook in self.app.disconnection_hooks:
                try:
                    await hook(connection)
                except Exception:
                    log.exception("on_disconnection hook failed for %s", connection.id)
            await self._presence.connection_gone(connection.id)
            await self._execute(ops.UnregisterConnection(connection.id, self.instance_id))
        except Exception:
            log.exception("cleaning up connection %s failed", connection.id)
        finally:
            self._local.pop(connection.id, None)

    # -- requests -------------------------------------------------------------

    async def _handle_request(self, connection: Connection, request: RequestReceived) -> None:
        ctx = Context(request.command, request.payload, connection, self, request.id)
        proto = connection.proto
        self._inflight += 1
        try:
            try:
                result = await self._run_command(ctx)
            except (MeshError, ops.UnknownConnection) as exc:  # expected: the client's doing
                result = error_payload(exc)
                bump(self._metrics.errors, result["code"])
            except RedisUnavailable as exc:  # an outage: no traceback per request
                log.warning("command %r: %s", request.command, exc)
                result = error_payload(exc)
                bump(self._metrics.errors, result["code"])
            except Exception as exc:
                log.exception("command %r failed", request.command)
                result = error_payload(exc)
                bump(self._metrics.errors, result["code"])
            try:
                proto.respond(request.id, request.command, result)
            except Exception as exc:  # not JSON: unsupported type, cycle, bad str
                log.error("command %r returned a value that is not JSON: %s", request.command, exc)
                bump(self._metrics.errors, "ESERVER")
                proto.respond(
                    request.id,
                    request.command,
                    {
                        "error": f"response is not JSON-serialisable: {exc}",
                        "code": "ESERVER",
                        "name": "EncodeError",
                    },
                )
        finally:
            # also when cancelled: the slot frees, the next queued request runs
            self._inflight -= 1
            proto.request_done()

    async def _run_command(self, ctx: Context) -> Any:
        name = ctx.command
        handler = self.app.commands.get(name)
        builtin = BUILTINS.get(name) if handler is None else None
        if handler is None and builtin is None:
            bump(self._metrics.requests, UNKNOWN_COMMAND)
            bump(self._metrics.errors, "ENOTFOUND")
            return not_found_payload(name)
        counts = self._metrics.requests
        if name in counts:
            counts[name] += 1
        else:
            bump(counts, name)
        for middleware in self.app.global_middleware:
            await middleware(ctx)
        for middleware in self.app.command_middleware.get(name, ()):
            await middleware(ctx)
        if builtin is not None:
            return await self._drive(builtin(ctx.connection.id, ctx.payload), ctx.connection)
        assert handler is not None
        return await handler(ctx)

    # -- delivery -------------------------------------------------------------

    def _send_local(self, connection_ids: Iterable[str], data: bytes) -> list[str]:
        """Send to the ids held here; return the ids held elsewhere."""
        remote = []
        local = self._local
        frame = None
        for cid in connection_ids:
            connection = local.get(cid)
            if connection is None:
                remote.append(cid)
            else:
                if frame is None:
                    frame = text_frame(data)
                connection.proto.send_frame(frame)
        return remote

    def _deliver_from_elsewhere(
        self, connection_ids: Sequence[str], command: str, payload: Any
    ) -> None:
        self._send_local(connection_ids, encode_push(command, payload))

    async def _deliver(self, connection_ids: Iterable[str], command: str, payload: Any) -> None:
        remote = self._send_local(connection_ids, encode_push(command, payload))
        if remote:
            await self._execute(ops.Publish(tuple(remote), command, payload))

    async def broadcast(self, command: str, payload: Any = None) -> None:
        """Push to every connection on every instance."""
        await self.broadcast_exclude(command, payload, ())

    async def broadcast_exclude(
        self, command: str, payload: Any, exclude: ConnectionRef | Iterable[ConnectionRef]
    ) -> None:
        skip = _id_set(exclude)
        everyone = await self._execute(ops.GetAllConnectionIds())
        await self._deliver((cid for cid, _ in everyone if cid not in skip), command, payload)

    async def broadcast_room(self, room: str, command: str, payload: Any = None) -> None:
        """Push to every member of a room, wherever it is connected."""
        await self.broadcast_room_exclude(room, command, payload, ())

    async def broadcast_room_exclude(
        self,
        room: str,
        command: str,
        payload: Any,
        exclude: ConnectionRef | Iterable[ConnectionRef],
    ) -> None:
        skip = _id_set(exclude)
        members = await self._execute(ops.GetRoomMembers(room))
        await self._deliver((cid for cid in members if cid not in skip), command, payload)

    # -- shutdown -------------------------------------------------------------

    def _close_all(
        self, code: int = CloseCode.GOING_AWAY, reason: str = "server shutting down"
    ) -> None:
        for connection in list(self._local.values()):
            connection.proto.close(code, reason)


def _check_size(scope: str, key: str, value: Any, limit: int) -> None:
    size = len(encode_json(value))
    if size > limit:
        raise MeshError(
            f"{scope} metadata for {key!r} is {size} bytes, over the limit of {limit}",
            code="ETOOLARGE",
            name="MetadataTooLarge",
        )


def _id_set(exclude: ConnectionRef | Iterable[ConnectionRef]) -> set[str]:
    if isinstance(exclude, (Connection, str)):
        return {_cid(exclude)}
    return {_cid(item) for item in exclude}


_MEMBERSHIP = (ops.AddToRoom, ops.RemoveFromRoom, ops.ClearRoom, ops.DeleteRoom)

#: built-ins that yield no storage operation: inline on any store
_STORELESS = frozenset({"mesh/noop"})
#: built-ins on whose path a policy function of the application runs
_WRITES_POLICED = frozenset({"mesh/set-my-connection-metadata"})
_READS_POLICED = frozenset({"mesh/get-connection-metadata", "mesh/join-room"})


def _run_inline(coro: Coroutine[Any, Any, Any]) -> None:
    """Run a coroutine that cannot suspend to completion, right now.

    Only for requests :meth:`ServerCore._runs_inline` vouches for: their
    whole path awaits nothing that waits. (A coroutine that did suspend here
    would have started waiting on behalf of whichever task called us, so it
    cannot be handed to a task afterwards: that is a bug, said loudly.)"""
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()
    raise RuntimeError("a request run inline suspended; it must run in a task")
