"""The runtime-neutral half of a server: dispatch, lifecycle, the Mesh API.

Everything here is plain ``async def`` code that awaits only the storage
driver, the application's own handlers and the :class:`~mesh_core.runtime.Runtime`
it was given, so it runs unchanged on asyncio and on trio.

**The adapter API.** An adapter (``mesh_asyncio``, ``mesh_trio``) owns the
sockets and nothing else; it drives a :class:`ServerCore` through these
public members only, in this order:

1. ``ServerCore(app, ..., runtime=RUNTIME)``: the runtime's services are
   passed in (composition), never supplied as subclass hooks.
2. :meth:`ServerCore.start_storage`, then ``async with`` :meth:`ServerCore.serving`:
   the task group the core starts its tasks in (handshakes, requests that
   wait, cleanups) and the store's background duties (``Storage.run``).
3. For each accepted socket, :meth:`ServerCore.new_protocol` makes its state
   machine; the adapter feeds it bytes and timer ticks, hands every batch of
   its events to :meth:`ServerCore.handle_events`, and writes what it queued.
4. To stop, :meth:`ServerCore.shutdown` with the adapter's
   :class:`ServerSockets` (stop the listener, list and abort sockets): the
   whole graceful sequence is written here, once.
5. After ``serving`` is left, :meth:`ServerCore.stop_storage`.

**Where a capability plugs in.** Presence, channels, records: each adds its
built-ins (generators plus a :class:`~mesh_core.app._builtins.BuiltinCommand`
record in ``_builtins.BUILTINS``: dispatch here finds them by name and reads
their flags), its storage operations (``mesh_core.storage._ops``, one handler
per driver), and a server-side API object like ``server.rooms``
(``_api.py``), created in :meth:`ServerCore.__init__` under
"the server-side API". Nothing else in this module changes.
"""

from __future__ import annotations

import dataclasses
import errno
import inspect
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

from .._config import ServerOptions
from .._errors import (
    MeshError,
    ServerStartupError,
    StorageUnavailable,
    error_payload,
    not_found_payload,
    unavailable_payload,
)
from .._metrics import UNKNOWN_COMMAND, Metrics, prometheus_text
from ..protocol import (
    CloseCode,
    ConnectionLost,
    Event,
    HandshakeReceived,
    PongReceived,
    Reject,
    RequestReceived,
    ServerConnection,
    State,
    UpgradeRequest,
    encode_json,
    encode_push,
    text_frame,
)
from ..runtime import Runtime, TaskGroup, TLSContext, run_inline
from ..storage import _ops as ops
from ..storage._base import Storage
from ..storage._memory import MemoryStore
from ._api import Connection, ConnectionRef, ConnectionsAPI, RoomsAPI, id_set
from ._app import Context, Handler, MeshApp
from ._builtins import BUILTINS, BuiltinCommand, CheckClientWrite, Steps
from ._channels import ChannelsAPI, ChannelServerOp
from ._collections import CollectionsAPI
from ._logging import OutageLog, listening_line, peer_label
from ._monitor import REQUEST_TIMEOUT, HttpExchange, MonitorStream
from ._presence import PresenceAPI, PresenceHub, PresenceStep
from ._pubsub import PubSub
from ._records import RecordsAPI
from ._tls import load_server_tls

__all__ = ["ServerCore", "ServerSockets"]

log = logging.getLogger("mesh_core.server")

#: how often the shutdown sequence looks whether what it waits for is done
_POLL = 0.01
#: how long ``/healthz`` waits for the store to answer before saying 503
HEALTH_TIMEOUT = 1.0


class ServerSockets(Protocol):
    """What :meth:`ServerCore.shutdown` asks of the adapter: the only
    socket-specific steps of the graceful shutdown."""

    async def stop_accepting(self) -> None:
        """Close the listeners; return once no connection is accepted any more."""
        ...

    def protocols(self) -> Collection[ServerConnection]:
        """The state machines of the sockets still open (empty when all are gone)."""
        ...

    def abort(self) -> None:
        """Abort every socket still open: the stragglers of the shutdown."""
        ...


@dataclasses.dataclass(frozen=True, slots=True)
class _Admitted:
    metadata: Any


@dataclasses.dataclass(frozen=True, slots=True)
class _Refusal:
    status: int
    reason: str


class _NoTasks:
    """The task group while the server is not serving. Before
    :meth:`ServerCore.serving` starting a task is a bug in the adapter; after
    it, what still arrives (a socket's last events) is dropped: the store
    forgets this instance's connections when it stops."""

    __slots__ = ("_served",)

    def __init__(self, served: bool) -> None:
        self._served = served

    def start_soon(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        if not self._served:
            raise RuntimeError("the server is not serving: enter ServerCore.serving() first")
        log.debug("the server has stopped: %s not run", getattr(fn, "__name__", fn))

    def cancel(self) -> None:
        pass

    def __len__(self) -> int:
        return 0


class ServerCore:
    """Runtime-neutral server: subclassed by ``mesh_asyncio.MeshServer`` and
    ``mesh_trio.MeshServer``, which add the sockets and pass their runtime."""

    def __init__(
        self,
        app: MeshApp,
        *,
        runtime: Runtime,
        storage: Storage | None = None,
        options: ServerOptions | None = None,
        instance_id: str | None = None,
        ssl: TLSContext | None = None,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        metrics_sock: Any = None,
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
        kind = self.tls_context_type
        if ssl is not None and kind is not None and not isinstance(ssl, kind):
            name = f"{kind.__module__}.{kind.__qualname__}"
            raise TypeError(f"ssl= takes an {name}, got {type(ssl).__name__}")
        #: an ``ssl.SSLContext``: the adapter serves ``wss://`` with it
        self.ssl = ssl
        self.runtime = runtime
        self.storage: Storage = storage if storage is not None else MemoryStore()
        self._store_inline = self.storage.answers_inline  # read once: per request below
        self.instance_id = instance_id or f"inst-{secrets.token_hex(8)}"
        self._storage_started = False  # stop_storage leaves only a store it joined
        #: rate-limits outage warnings; ``outage_log.interval`` is in seconds
        self.outage_log = OutageLog(log)
        self._local: dict[str, Connection] = {}
        self._inflight = 0  # requests being handled, for graceful shutdown
        self._metrics = Metrics()
        #: where the adapter listens for ``/metrics`` and ``/healthz`` (see
        #: :meth:`serve_monitor`): ``metrics_port`` on ``metrics_host``, or
        #: a listening socket the ``--workers`` supervisor made
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host
        self.metrics_sock = metrics_sock
        self._closing = False  # shutdown() began: /healthz answers 503
        # where the core's tasks start: the group of serving() while it runs
        self._group: TaskGroup = _NoTasks(served=False)
        # -- the server-side API (a new capability adds its object here) --
        self.connections = ConnectionsAPI(self)
        self.rooms = RoomsAPI(self)
        #: the store's named channels, one store subscription per channel
        self.pubsub = PubSub(self.execute, self.instance_id, lambda: self.runtime.event())
        self.channels = ChannelsAPI(self)
        self.write_channel = self.channels.write
        self.records = RecordsAPI(self)
        self.collections = CollectionsAPI(self)
        self.presence = PresenceAPI(self)
        self._presence = PresenceHub(self)
        # the reference's names, on the server itself
        self.add_to_room = self.rooms.add_to_room
        self.remove_from_room = self.rooms.remove_from_room
        self.is_in_room = self.rooms.is_in_room
        self.get_room_members = self.rooms.get_room_members
        self.get_all_rooms = self.rooms.get_all_rooms
        self.clear_room = self.rooms.clear_room
        self.delete_room = self.rooms.delete_room

    # -- the adapter API (see the module docstring) -----------------------------

    def new_protocol(
        self, peer: tuple[str, int] | None, now: float, *, framed: bool = True
    ) -> ServerConnection:
        """The state machine for a socket the adapter just accepted
        (``framed=False``: for a server that frames messages itself, as an
        ASGI server does; see ``ServerConnection``'s message level)."""
        proto = ServerConnection(
            self.options, peer=peer, now=now, metrics=self._metrics, framed=framed
        )
        proto.report_pongs = bool(self.app.presence.tracks)  # pongs refresh presence
        if self._closing:
            # accepted before the listener closed, handed over only now (its
            # TLS handshake ended after shutdown closed the upgrades in
            # progress): closed at once, or it would outlive the server
            proto.close()
        return proto

    def handle_events(self, proto: ServerConnection, events: list[Event]) -> None:
        """Act on the events ``proto`` produced: start a handshake, answer a
        request (right here when nothing on its path can wait, else in a
        task of :meth:`serving`), clean up a connection that is gone."""
        for event in events:
            if isinstance(event, RequestReceived):
                connection = self._local.get(proto.id or "")
                if connection is None:
                    proto.request_done()
                elif self._runs_inline(event.command):
                    run_inline(self._handle_request(connection, event))
                else:
                    self._group.start_soon(self._handle_request, connection, event)
            elif isinstance(event, PongReceived):
                connection = self._local.get(proto.id or "")
                if connection is not None and self._presence.holds(connection.id):
                    self._group.start_soon(self._presence.pong, connection.id)
            elif isinstance(event, ConnectionLost):
                connection = self._local.get(proto.id or "")
                if connection is not None:
                    if log.isEnabledFor(logging.DEBUG):
                        self._log_closed(connection, event)
                    self._connection_lost(connection)
            elif isinstance(event, HandshakeReceived):
                self._group.start_soon(self._handshake, proto, event.request)

    def listening_line(self, addresses: Iterable[Sequence[Any]], runtime: str) -> str:
        """The startup line an adapter logs once it listens (``runtime``:
        ``asyncio``, ``uvloop`` or ``trio``): the addresses as clients type
        them (``ws://[::1]:8765``, ``wss://`` with TLS), the store, the
        instance id, pid, worker."""
        scheme = "ws" if self.ssl is None else "wss"
        return listening_line(addresses, runtime, self.storage, self.instance_id, scheme)

    #: an empty server-side TLS context: the adapter's
    #: ``ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)`` (the core imports no ssl)
    new_tls_context: Callable[[], TLSContext] | None = None
    #: what ``ssl=`` must be an instance of, else ``TypeError`` at construction:
    #: the adapter's ``ssl.SSLContext``
    tls_context_type: type | None = None

    @classmethod
    def tls_context(
        cls,
        certfile: str,
        keyfile: str | None = None,
        *,
        password: str | None = None,
        ca_certs: str | None = None,
    ) -> TLSContext:
        """The ``ssl=`` context for certificate files, as ``mesh serve
        --ssl-certfile/--ssl-keyfile/--ssl-keyfile-password/--ssl-ca-certs``
        builds it; ``ca_certs`` makes a client certificate signed by one of
        those CAs required. Raises :class:`ServerStartupError` (one line,
        naming the file) when a file is missing, unreadable or does not fit."""
        if cls.new_tls_context is None:
            raise TypeError(f"{cls.__name__} cannot make TLS contexts: pass ssl= yourself")
        return load_server_tls(cls.new_tls_context, certfile, keyfile, password, ca_certs)

    def _log_closed(self, connection: Connection, event: ConnectionLost) -> None:
        log.debug(
            "connection %s from %s closed: %s %r after %.3f s",
            connection.id,
            peer_label(connection.proto.peer),
            event.code,
            event.reason,
            self.runtime.now() - connection.opened_at,
        )

    async def start_storage(self) -> None:
        """Register this instance with the store (before :meth:`serving`).

        A start that fails half way (registered, then the subscription
        failed) is undone at once: the store is told to stop, so the instance
        leaves no registration and live heartbeat behind for another
        instance's sweep to find."""
        try:
            await self.storage.start(self.instance_id, self._deliver_from_elsewhere)
        except Exception:
            try:
                await self.storage.stop()
            except Exception as exc:  # the start's own error is the one to report
                log.debug("undoing the failed start of the store: %s", exc)
            raise
        self._storage_started = True

    async def stop_storage(self) -> None:
        """Leave the store (after :meth:`serving`): no more deliveries to this
        instance, then the driver releases what it holds. A no-op if
        :meth:`start_storage` failed: a server that never started has no
        shutdown to report."""
        if not self._storage_started:
            return
        self._storage_started = False
        self.pubsub.clear()  # the store drops its subscriptions as it stops
        self.storage.detach(self.instance_id)
        self.channels.clear()
        await self.storage.stop()

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """``async with server.serving():`` the adapter accepts connections
        inside the block. It holds the core's tasks (handshakes, requests that
        wait, cleanups) and the store's background duties; leaving it cancels
        whatever of them still runs (after :meth:`shutdown`, only the duties)."""
        runtime = self.runtime
        async with runtime.open_task_group() as duties:
            duties.start_soon(self.storage.run)  # heartbeats, sweeps (Redis)
            try:
                async with runtime.open_task_group() as group:
                    self._group = group
                    try:
                        yield
                    finally:
                        self._group = _NoTasks(served=True)
                        group.cancel()
            finally:
                duties.cancel()

    async def shutdown(self, sockets: ServerSockets) -> None:
        """The graceful shutdown, inside :meth:`serving`: stop accepting; let
        requests in flight finish (up to ``shutdown_timeout``); send every
        client close 1001 and close sockets still in their handshake; wait
        for the sockets, the connections' cleanup out of the store and the
        core's tasks (up to ``close_timeout``); abort the sockets left, give
        the tasks a last second, cancel the rest."""
        options = self.options
        now = self.runtime.now
        group = self._group
        self._closing = True
        await sockets.stop_accepting()
        deadline = now() + options.shutdown_timeout
        await self._wait_until(lambda: self._inflight == 0, deadline)
        self.close_all()
        for proto in list(sockets.protocols()):
            if proto.state is State.HANDSHAKE:
                proto.close()  # not upgraded yet: nothing to say goodbye with
        await self._wait_until(
            lambda: not sockets.protocols() and not len(group) and not self._local,
            min(deadline, now() + options.close_timeout) + 0.5,
        )
        sockets.abort()
        await self._wait_until(lambda: not sockets.protocols() and not len(group), now() + 1.0)
        group.cancel()

    def close_all(
        self, code: int = CloseCode.GOING_AWAY, reason: str = "server shutting down"
    ) -> None:
        """Close every connection this server holds (1001 by default)."""
        for connection in list(self._local.values()):
            connection.proto.close(code, reason)

    async def _wait_until(self, done: Callable[[], bool], deadline: float) -> None:
        runtime = self.runtime
        while not done() and runtime.now() < deadline:
            await runtime.sleep(_POLL)

    # -- observability --------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        """The server's counters as a plain dict: connections (current and
        total), requests by command and outcome, their latency, errors by
        code, violations, bytes in and out, slow-consumer closes, closes by
        code, refused upgrades, storage operations and errors, Redis
        reconnects (a store's ``reconnects`` count, if it keeps one)."""
        reconnects = getattr(self.storage, "reconnects", 0)
        return self._metrics.snapshot(len(self._local), self._inflight, reconnects)

    def metrics_prometheus(self, prefix: str = "mesh") -> str:
        """The same counters in the Prometheus text exposition format, ready
        to serve from a ``/metrics`` endpoint (no dependency needed)."""
        return prometheus_text(self.metrics(), prefix)

    async def health(self) -> tuple[bool, str]:
        """Whether this server should get traffic, and why not: serving and
        the store reachable. The store is asked (its ``check()``, if it has
        one: the Redis store PINGs) rather than judged by past failures, so
        the answer turns 200 the moment Redis is back, without waiting for a
        request to find out; the wait is bounded by :data:`HEALTH_TIMEOUT`."""
        if self._closing:
            return False, "shutting down"
        if isinstance(self._group, _NoTasks):
            return False, "not serving"
        check = getattr(self.storage, "check", None)
        if check is not None:
            try:
                async with self.runtime.timeout(HEALTH_TIMEOUT):
                    await check()
            except (StorageUnavailable, TimeoutError):
                return False, "store unreachable"
            except Exception as exc:  # e.g. Redis still -LOADING after a restart
                return False, f"store error: {exc}"
        return True, "serving"

    async def serve_monitor(self, stream: MonitorStream) -> None:
        """Answer one connection of the metrics port (the adapter accepts it
        and runs this in a task): ``GET /metrics`` (Prometheus text),
        ``/metrics.json`` (:meth:`metrics`, what the ``--workers``
        supervisor sums), ``/healthz`` (:meth:`health`: 200 or 503). The
        whole exchange is bounded by ``REQUEST_TIMEOUT``; the stream is
        closed in any case."""
        exchange = HttpExchange()
        try:
            async with self.runtime.timeout(REQUEST_TIMEOUT):
                while not exchange.done:
                    exchange.receive_data(await stream.receive_some(4096))
                health = await self.health() if exchange.wants_health else None
                response = exchange.answer(health, self.metrics, self.metrics_prometheus)
                if response:
                    await stream.send_all(response)
        except Exception as exc:  # a peer that left or stalled: never the server's problem
            log.debug("metrics port: request dropped: %r", exc)
        finally:
            try:
                await stream.aclose()
            except Exception as exc:
                log.debug("metrics port: close failed: %r", exc)

    def monitor_bind_failed(self, exc: OSError) -> ServerStartupError:
        """The one-line startup error for a metrics port that cannot be
        bound (raise it from the adapter's attempt)."""
        where = peer_label((self.metrics_host, self.metrics_port))
        why = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or exc
        return ServerStartupError(f"cannot serve metrics on {where}: {why} (check --metrics-port)")

    def monitor_listening(self, address: Sequence[Any]) -> None:
        """The adapter's metrics listener is up: remember where (``port`` of
        :attr:`metrics_port` after asking for port 0) and say so."""
        self.metrics_port = int(address[1])
        log.info("Metrics on http://%s/metrics and /healthz", peer_label(address))

    # -- storage --------------------------------------------------------------

    async def execute(self, op: ops.Op) -> Any:
        """Run one storage operation with the app's limits applied (metadata
        size) and the server's own operations answered here (the client-write
        policy): what every server-side API object calls. Operations that
        reach the store are counted by type (a fixed set: no cap needed),
        and so are those that fail for another reason than the caller's
        (an unknown connection, a limit)."""
        if isinstance(op, CheckClientWrite):
            return await self._check_client_write(op)
        if isinstance(op, PresenceStep):
            return await self._presence.execute(op)
        if isinstance(op, ChannelServerOp):
            return await self.channels.execute(op)
        if isinstance(op, ops.UpdateMetadata) and self.options.max_metadata_size:
            op = self._bounded(op)
        kind = type(op)
        self._metrics.store_operations[kind] += 1  # named at snapshot time
        try:  # zero-cost until something is raised (Python 3.11+)
            if self.app.presence.tracks and isinstance(op, _MEMBERSHIP):
                # every change of membership passes here (built-ins and the
                # rooms API alike): presence follows it
                return await self._presence.follow(op, self.storage.execute)
            return await self.storage.execute(op)
        except (MeshError, ops.UnknownConnection):
            raise
        except Exception:
            self._metrics.store_errors[kind] += 1
            raise

    async def _drive(self, steps: Steps, reader: Connection | None = None) -> Any:
        """Run a built-in: execute each operation it yields, resume it with
        the result, return what it returns. With a ``reader`` (the client the
        built-in runs for), what it reads about other connections passes the
        app's read policy first."""
        guarded = reader is not None and self.app.client_metadata_reads != "allow"
        try:
            op = next(steps)
            while True:
                result = await self.execute(op)
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

    # -- the connection lifecycle ----------------------------------------------

    def _runs_inline(self, command: str) -> bool:
        """Whether a request can be answered without a task of its own: a
        built-in on a store that never suspends (or one that touches no
        store), with no application code (middleware, policy functions) on
        its path, never waits, so it runs right here. That is most traffic,
        and a task per request is most of its cost."""
        if command not in BUILTINS:
            return False
        builtin = BUILTINS[command]
        app = self.app
        return (
            (self._store_inline or builtin.storeless)
            and not builtin.waits
            and command not in app.commands
            and not app.global_middleware
            and command not in app.command_middleware
            and not (builtin.writes_policed and callable(app.client_metadata_writes))
            and not (builtin.reads_policed and callable(app.client_metadata_reads))
        )

    def _full(self) -> bool:
        limit = self.options.max_connections
        return bool(limit) and len(self._local) >= limit

    async def _handshake(self, proto: ServerConnection, request: UpgradeRequest) -> None:
        verdict = await self._admit(request)
        if proto.state is not State.HANDSHAKE:  # the peer left during authentication
            return
        if isinstance(verdict, _Refusal):
            proto.reject(verdict.status, verdict.reason)
            return
        proto.accept(f"conn-{secrets.token_hex(12)}")
        if proto.id is None:
            return
        self._metrics.connections_total += 1
        connection = Connection(self, proto, request)
        self._local[connection.id] = connection
        if log.isEnabledFor(logging.DEBUG):
            log.debug("connection %s opened from %s", connection.id, peer_label(proto.peer))
        await self._open(connection, verdict.metadata)

    async def _admit(self, request: UpgradeRequest) -> _Admitted | _Refusal:
        """Whether to accept an upgrade: the origin, the connection limit,
        the app's authenticator and what it returned."""
        if self._closing:
            # a socket whose TLS handshake ended after shutdown closed the
            # upgrades in progress: it would become a connection nobody closes
            return _Refusal(503, "Service Unavailable: shutting down")
        if not self.options.origin_allowed(request.header("origin")):
            log.debug("refused an upgrade from origin %r", request.header("origin"))
            return _Refusal(403, "Forbidden: origin not allowed")
        if self._full():
            return _Refusal(503, "Service Unavailable: too many connections")
        authenticate = self.app.authenticator
        if authenticate is None:
            return _Admitted(None)
        try:
            metadata = await authenticate(request)
        except Reject as exc:
            return _Refusal(exc.status, str(exc))
        except Exception:
            log.exception("authenticate_connection failed; refusing the upgrade")
            return _Refusal(500, "Internal Server Error")
        if not metadata:
            return _Refusal(401, "Unauthorized")
        limit = self.options.max_metadata_size
        if limit:
            try:
                _check_size("connection", "(new)", metadata, limit)
            except MeshError as exc:  # the app's doing: not stored, not admitted
                log.error("authenticate_connection returned metadata too large: %s", exc)
                return _Refusal(500, "Internal Server Error")
            except Exception:
                log.exception("authenticate_connection returned metadata that is not JSON")
                return _Refusal(500, "Internal Server Error")
        if self._closing:  # shutdown began while this one authenticated
            return _Refusal(503, "Service Unavailable: shutting down")
        if self._full():  # others got in while this one authenticated
            return _Refusal(503, "Service Unavailable: too many connections")
        return _Admitted(metadata)

    async def _open(self, connection: Connection, metadata: Any) -> None:
        try:
            await self.execute(ops.RegisterConnection(connection.id, self.instance_id, metadata))
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
            connection.proto.opened(self.runtime.now())

    def _connection_lost(self, connection: Connection) -> None:
        connection._lost = True
        if connection._phase == "open":
            connection._phase = "done"
            self._group.start_soon(self._cleanup, connection)
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
            try:
                await self._presence.connection_gone(connection.id)
            except Exception:  # never in the way of the store's own cleanup
                log.exception("presence cleanup of %s failed", connection.id)
            await self.channels.connection_closed(connection)
            await self.records.connection_gone(connection.id)
            await self.collections.connection_gone(connection.id)
            await self.execute(ops.UnregisterConnection(connection.id, self.instance_id))
        except StorageUnavailable as exc:  # an outage, not a bug: retried by the store
            log.warning("cleaning up connection %s: %s; will be retried", connection.id, exc)
        except Exception:
            log.exception("cleaning up connection %s failed", connection.id)
        finally:
            self._local.pop(connection.id, None)

    # -- requests -------------------------------------------------------------

    async def _handle_request(self, connection: Connection, request: RequestReceived) -> None:
        name = request.command
        handler = self.app.commands.get(name)
        builtin = BUILTINS.get(name) if handler is None else None
        proto = connection.proto
        self._inflight += 1
        try:
            if handler is None and builtin is None:
                label, outcome = UNKNOWN_COMMAND, "ENOTFOUND"  # not a client-chosen label
                result: Any = not_found_payload(name)
            else:
                label, outcome = name, "ok"
                ctx = Context(name, request.payload, connection, self, request.id)
                try:
                    result = await self._run_command(ctx, handler, builtin)
                except (MeshError, ops.UnknownConnection) as exc:  # expected: the client's doing
                    result = error_payload(exc)
                    outcome = result["code"]
                except StorageUnavailable as exc:  # an outage: no traceback per request
                    self.outage_log.failed(self.runtime.now(), name, exc)  # log only
                    result = unavailable_payload()
                    outcome = result["code"]
                except Exception as exc:
                    log.exception("command %r failed", name)
                    result = error_payload(exc)
                    outcome = result["code"]
            try:
                proto.respond(request.id, name, result)
            except Exception as exc:  # not JSON: unsupported type, cycle, bad str
                log.error("command %r returned a value that is not JSON: %s", name, exc)
                outcome = "ESERVER"
                proto.respond(
                    request.id,
                    name,
                    {
                        "error": f"response is not JSON-serialisable: {exc}",
                        "code": "ESERVER",
                        "name": "EncodeError",
                    },
                )
            # the one clock read of a request: from the read that brought it in
            self._metrics.answered(label, outcome, self.runtime.now() - request.received_at)
        finally:
            # also when cancelled: the slot frees, the next queued request runs
            self._inflight -= 1
            proto.request_done()

    async def _run_command(
        self, ctx: Context, handler: Handler | None, builtin: BuiltinCommand | None
    ) -> Any:
        """Middleware, then the app's handler or the built-in (one of the two
        is given: :meth:`_handle_request` resolved the name)."""
        name = ctx.command
        for middleware in self.app.global_middleware:
            await middleware(ctx)
        for middleware in self.app.command_middleware.get(name, ()):
            await middleware(ctx)
        if builtin is not None:
            if builtin.handler is not None:
                return await builtin.handler(ctx)
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
            await self.execute(ops.Publish(tuple(remote), command, payload))

    async def broadcast(self, command: str, payload: Any = None) -> None:
        """Push to every connection on every instance."""
        await self.broadcast_exclude(command, payload, ())

    async def broadcast_exclude(
        self, command: str, payload: Any, exclude: ConnectionRef | Iterable[ConnectionRef]
    ) -> None:
        skip = id_set(exclude)
        everyone = await self.execute(ops.GetAllConnectionIds())
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
        skip = id_set(exclude)
        members = await self.execute(ops.GetRoomMembers(room))
        await self._deliver((cid for cid in members if cid not in skip), command, payload)


#: the operations that change who is in a room
_MEMBERSHIP = (ops.AddToRoom, ops.RemoveFromRoom, ops.ClearRoom, ops.DeleteRoom)


def _check_size(scope: str, key: str, value: Any, limit: int) -> None:
    size = len(encode_json(value))
    if size > limit:
        raise MeshError(
            f"{scope} metadata for {key!r} is {size} bytes, over the limit of {limit}",
            code="ETOOLARGE",
            name="MetadataTooLarge",
        )
