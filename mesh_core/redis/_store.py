"""The Redis storage driver's logic, runtime-neutral (PROTOCOL.md section 8).

Which keys hold what, the commands each storage operation becomes, the
atomic metadata update, the cross-instance message format, heartbeats and
the dead-instance sweep are written once, here; the key names, the
message format and the Lua scripts themselves are in
:mod:`mesh_core.redis._layout`. Talking to Redis is left to a
:class:`~mesh_core.redis.RedisTransport` (the project's
:class:`~mesh_core.redis.RedisClient` on each runtime's socket shim), and
time, events and sleeps come from the :class:`~mesh_core.runtime.Runtime`,
so this module does no I/O of its own.

Atomic updates are optimistic: compute the new value in Python from the
stored JSON (so JSON stays exact: ``[]`` stays ``[]``, numbers keep their
value), then write it with a compare-and-set script that succeeds only if
the stored text is still the one the value was computed from; on a conflict
the script answers with the current text and the update is computed again.
Writers on any number of instances never lose each other's keys. The text
this instance last read or wrote is kept in a small cache, so an update
usually costs one round trip (no read first); a stale cache entry only
costs a retry, since the compare-and-set checks it.

On a Redis Cluster (a transport with ``cluster = True``) every script keeps
to the keys of one slot; the key layout is a shared contract, so it cannot
use hash tags. The one check across slots, "metadata of a gone connection is
not revived", is then made by separate commands in an order argued at
:meth:`RedisStoreCore._cas_write`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from .._errors import RedisUnavailable
from ..runtime import Runtime
from ..storage import _ops as ops
from ..storage._base import DeliverCallback
from ._channels import RedisChannels
from ._layout import (
    CAS,
    DELETE_IF,
    UNLOCK,
    Delivery,
    Envelope,
    Script,
    as_bytes,
    decode_envelope,
    encode,
    glob_escape,
    keys,
    load_json,
    text,
)
from ._presence import RedisPresence
from ._pubsub import RedisPubSub
from ._records import RedisRecords
from ._resp import Arg
from ._transport import NodeClient, RedisTransport, open_transport
from ._turns import Turns, Update

__all__ = ["RedisStoreCore"]

log = logging.getLogger("mesh_core.redis")


_MISSING: Any = object()  # not in the cache (None there means "absent in Redis")


class RedisStoreCore(RedisPubSub, RedisChannels, RedisRecords, RedisPresence):
    """A storage driver on a shared Redis; see the module docstring.

    ``transport`` is a :class:`~mesh_core.redis.RedisTransport`, or a URL
    (any form of :mod:`mesh_core.redis._url`) opened by
    :func:`~mesh_core.redis.open_transport` with ``client``, the runtime's
    Redis client class, and ``command_timeout`` (how long a request may wait
    for Redis before it is answered with an ``EUNAVAILABLE`` error payload)
    and ``connect_timeout``. The server runs :meth:`run`, which calls
    :meth:`heartbeat` every ``heartbeat_interval`` and :meth:`sweep` every
    ``sweep_interval``. Each runtime's ``RedisStore`` is this class with its
    client and :class:`~mesh_core.runtime.Runtime` filled in.
    """

    answers_inline = False  # every operation is a round trip (Storage protocol)

    def detach(self, instance_id: str) -> None:
        """Nothing to do: :meth:`stop` unsubscribes (Storage protocol)."""

    def __init__(
        self,
        transport: RedisTransport | str,
        *,
        runtime: Runtime,
        client: NodeClient | None = None,
        command_timeout: float = 2.0,
        connect_timeout: float = 2.0,
        heartbeat_interval: float = 15.0,
        heartbeat_ttl: int = 120,
        sweep_interval: float = 60.0,
        cleanup_lock_ttl: int = 10,
        max_update_attempts: int = 100,
        scan_count: int = 500,
        cache_size: int = 4096,
    ) -> None:
        self.url: str | None = None
        if isinstance(transport, str):
            if client is None:
                raise TypeError("a Redis URL needs the runtime's client class (client=)")
            self.url = transport
            transport = open_transport(
                transport,
                client,
                runtime,
                command_timeout=command_timeout,
                connect_timeout=connect_timeout,
            )
        self.transport = transport
        self.runtime = runtime
        self._turns = Turns(runtime)  # local writers of one key take turns
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_ttl = heartbeat_ttl
        self.sweep_interval = sweep_interval
        self.cleanup_lock_ttl = cleanup_lock_ttl
        self.max_update_attempts = max_update_attempts
        self.scan_count = scan_count
        self.instance_id = ""
        self._deliver: DeliverCallback | None = None
        # connections this instance registered: re-registered if Redis lost
        # them (a restart without persistence), dropped on unregister
        self._registered: dict[str, Any] = {}
        # the rooms each of those is in, put back with them; and how many
        # leaves of each room each has sent, so that a join acknowledged
        # after a leave sent behind it is not remembered
        self._rooms: dict[str, set[str]] = {}
        self._leaves: dict[str, dict[str, int]] = {}
        self._stopping = False  # stop() began: a reconnect registers nothing again
        # unregistrations that could not reach Redis, retried by heartbeat()
        self._pending_unregister: set[str] = set()
        self._started = False  # start() completed: a failed stop is then worth a warning
        # the raw text last read or written per (hash, field): the value an
        # update is computed from before any read (see the module docstring)
        self._cache: OrderedDict[tuple[str, str], bytes | None] = OrderedDict()
        self.cache_size = cache_size
        self._cluster = transport.cluster
        self._cas = Script(CAS)
        self._delete_if = Script(DELETE_IF)
        self._unlock = Script(UNLOCK)
        self._init_records()
        self._handlers = ops.handlers(self)

    # -- the Storage contract -------------------------------------------------

    async def start(self, instance_id: str, deliver: DeliverCallback) -> None:
        self.instance_id = instance_id
        self._deliver = deliver
        self.transport.on_reconnect(self._reconnect_commands)
        await self.transport.connect()
        await self.heartbeat()
        await self.transport.subscribe(keys.pubsub(instance_id), self._on_message)
        self._started = True

    async def stop(self) -> None:
        """Leave the shared state as if this instance had never been: its
        remaining connections are unregistered, then the instance itself."""
        self._stopping = True
        try:
            if self.instance_id:
                for cid in list(self._registered):
                    await self._unregister(ops.UnregisterConnection(cid, self.instance_id))
                await self.transport.pipeline(
                    [
                        ("SREM", keys.INSTANCES, self.instance_id),
                        ("DEL", keys.heartbeat(self.instance_id)),
                        ("DEL", keys.instance_connections(self.instance_id)),
                    ]
                )
        except RedisUnavailable:
            # after a failed start the start's error is what the operator reads
            log.log(
                logging.WARNING if self._started else logging.DEBUG,
                "Redis unavailable at shutdown: the sweep of another instance will clean up",
            )
        finally:
            await self.transport.aclose()

    async def execute(self, op: ops.Op) -> Any:
        return await self._handlers[type(op)](op)

    async def check(self) -> None:
        """Raise ``RedisUnavailable`` unless Redis answers a PING now: what
        ``/healthz`` asks (an optional member of the Storage contract)."""
        await self.transport.execute("PING")

    @property
    def reconnects(self) -> int:
        """The transport's count of connections re-opened after a loss
        (``mesh_redis_reconnects_total``), if it keeps one."""
        return int(getattr(self.transport, "reconnects", 0))

    # -- instance liveness ----------------------------------------------------

    async def run(self) -> None:
        """Heartbeats, and a sweep every ``sweep_interval``, for as long as
        the server runs (the server runs this beside its listener)."""
        beats_per_sweep = max(1, round(self.sweep_interval / self.heartbeat_interval))
        beats = 0
        while True:
            await self.runtime.sleep(self.heartbeat_interval)
            await self._duty(self.heartbeat)
            beats += 1
            if beats % beats_per_sweep == 0:
                await self._duty(self.sweep)

    async def _duty(self, duty: Callable[[], Any]) -> None:
        """Run a periodic duty; a Redis outage is logged, not raised, so the
        loop goes on and the next round retries."""
        try:
            await duty()
        except RedisUnavailable as exc:
            log.warning("Redis unavailable (%s); will retry", exc)
        except Exception:
            log.exception("periodic Redis duty failed")

    async def heartbeat(self) -> None:
        """Refresh this instance's heartbeat; if Redis lost our state (it
        restarted empty), register the instance and its connections again;
        retry unregistrations that failed while Redis was away."""
        instance = self.instance_id
        replies = await self.transport.pipeline(
            [
                (
                    "SET",
                    keys.heartbeat(instance),
                    str(self.runtime.wall_ms()),
                    "EX",
                    self.heartbeat_ttl,
                    "GET",
                ),
                ("SADD", keys.INSTANCES, instance),
            ]
        )
        if replies[0] is None and self._registered:
            log.info("re-registering %d connection(s) with Redis", len(self._registered))
            await self._reregister(list(self._registered))
        for cid in list(self._pending_unregister):
            # its presence cleanup failed with it (Redis was away): swept
            # first, while its rooms are known; one leave per room it was in
            await self._sweep_presence(cid)
            await self._unregister(ops.UnregisterConnection(cid, instance))
            self._pending_unregister.discard(cid)

    def _reconnect_commands(self) -> list[Sequence[Arg]]:
        """What the transport sends first when it reconnects, before any
        command waiting for Redis (so before any read): this instance, its
        connections with their metadata, and their rooms, in case Redis lost
        them (a restart without persistence, a failover to a replica that
        had not received them), instead of at the next heartbeat.

        This instance's own records are the source of truth for its
        connections' registry entries and rooms; metadata is put back only
        if missing (``HSETNX``, as :meth:`_reregister`): a value another
        instance wrote, and that the promoted replica has, is newer than the
        last value this instance wrote or read. A write that raced the
        restart either was answered before it (then ``_remember`` holds its
        value) or was answered with an error (its client retries); either way
        nothing written while Redis was away was acknowledged."""
        if self._stopping or not self.instance_id:
            return []
        instance = self.instance_id
        self._cache.clear()  # texts of a Redis that may be gone
        commands: list[Sequence[Arg]] = [
            (
                "SET",
                keys.heartbeat(instance),
                str(self.runtime.wall_ms()),
                "EX",
                self.heartbeat_ttl,
            ),
            ("SADD", keys.INSTANCES, instance),
        ]
        rooms = self._rooms
        for cid, metadata in self._registered.items():
            commands += self._register_commands(cid, instance, metadata, only_if_missing=True)
            for room in rooms.get(cid, ()):
                commands.append(("SADD", keys.room(room), cid))
                commands.append(("SADD", keys.connection_rooms(cid), room))
        log.debug("reconnect: putting back %d connection(s)", len(self._registered))
        return commands

    async def sweep(self) -> list[str]:
        """Under the cleanup lock, remove instances whose heartbeat expired
        (and everything they held). Returns the instances removed."""
        instance = self.instance_id
        got = await self.transport.execute(
            "SET", keys.CLEANUP_LOCK, instance, "NX", "EX", self.cleanup_lock_ttl
        )
        if got is None:
            return []
        try:
            members, owners = await self.transport.pipeline(
                [("SMEMBERS", keys.INSTANCES), ("HVALS", keys.CONNECTIONS)]
            )
            candidates = sorted({text(i) for i in [*members, *owners]} - {instance})
            if not candidates:
                return []
            alive = await self.transport.pipeline(
                [("EXISTS", keys.heartbeat(i)) for i in candidates]
            )
            dead = [i for i, exists in zip(candidates, alive, strict=True) if not exists]
            for gone in dead:
                await self._remove_instance(gone)
            if dead:
                log.info("swept dead instance(s): %s", ", ".join(dead))
            return dead
        finally:
            await self._unlock(self.transport, [keys.CLEANUP_LOCK], [instance])

    async def _remove_instance(self, instance: str) -> None:
        listed, everyone = await self.transport.pipeline(
            [("SMEMBERS", keys.instance_connections(instance)), ("HGETALL", keys.CONNECTIONS)]
        )
        held = {text(c) for c in listed}
        for cid, owner in zip(everyone[::2], everyone[1::2], strict=True):
            if text(owner) == instance:
                held.add(text(cid))
        for cid in sorted(held):
            await self._sweep_presence(cid)  # before the rooms it reads are gone
            await self._unregister(ops.UnregisterConnection(cid, instance), owned=False)
        await self.transport.pipeline(
            [
                ("DEL", keys.instance_connections(instance)),
                ("SREM", keys.INSTANCES, instance),
            ]
        )

    # -- delivery -------------------------------------------------------------

    def _on_message(self, data: bytes) -> None:
        try:
            envelope = decode_envelope(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("ignoring a malformed message on %s", keys.pubsub(self.instance_id))
            return
        if self._deliver is not None:
            self._deliver(
                envelope.targetConnectionIds, envelope.command.command, envelope.command.payload
            )

    async def _publish(self, op: ops.Publish) -> None:
        ids = list(op.connection_ids)
        if not ids:
            return
        owners = await self.transport.execute("HMGET", keys.CONNECTIONS, *ids)
        by_owner: defaultdict[str, list[str]] = defaultdict(list)
        for cid, owner in zip(ids, owners, strict=True):
            if owner is not None:
                by_owner[text(owner)].append(cid)
        local = by_owner.pop(self.instance_id, None)
        if local and self._deliver is not None:
            self._deliver(local, op.command, op.payload)
        if by_owner:
            await self.transport.pipeline(
                [
                    (
                        "PUBLISH",
                        keys.pubsub(owner),
                        encode(Envelope(targets, Delivery(op.command, op.payload))),
                    )
                    for owner, targets in by_owner.items()
                ]
            )

    # -- connections ----------------------------------------------------------

    def _register_commands(
        self, cid: str, instance: str, metadata: Any, *, only_if_missing: bool = False
    ) -> list[Sequence[Arg]]:
        commands: list[Sequence[Arg]] = [
            ("HSET", keys.CONNECTIONS, cid, instance),
            ("SADD", keys.instance_connections(instance), cid),
        ]
        if metadata is not None:
            verb = "HSETNX" if only_if_missing else "HSET"
            commands.append((verb, keys.CONNECTION_META, cid, encode(metadata)))
        return commands

    async def _register(self, op: ops.RegisterConnection) -> None:
        commands = self._register_commands(op.connection_id, op.instance_id, op.metadata)
        await self.transport.pipeline(commands)
        if op.metadata is not None:  # the HSET of the metadata is the last command
            self._cache_put((keys.CONNECTION_META, op.connection_id), commands[-1][-1])
        if op.instance_id == self.instance_id:
            self._registered[op.connection_id] = op.metadata

    async def _unregister(self, op: ops.UnregisterConnection, *, owned: bool = True) -> list[str]:
        cid = op.connection_id
        if owned:
            # before the first await: a concurrent write must not _revive() it,
            # nor a reconnect register it again
            self._registered.pop(cid, None)
            self._rooms.pop(cid, None)
            self._leaves.pop(cid, None)
        try:
            rooms = [
                text(r)
                for r in await self.transport.execute("SMEMBERS", keys.connection_rooms(cid))
            ]
            commands: list[Sequence[Arg]] = [("SREM", keys.room(room), cid) for room in rooms]
            # The registry entry goes before the metadata (see _cas_write): one
            # pipeline keeps that order on one node; across cluster nodes only
            # waiting for the first reply does.
            commands += [
                ("DEL", keys.connection_rooms(cid)),
                ("HDEL", keys.CONNECTIONS, cid),
                ("SREM", keys.instance_connections(op.instance_id), cid),
            ]
            drop_meta = ("HDEL", keys.CONNECTION_META, cid)
            if self._cluster:
                await self.transport.pipeline(commands)
                await self.transport.execute(*drop_meta)
            else:
                await self.transport.pipeline([*commands, drop_meta])
        except BaseException as exc:
            # Redis away, or cancelled half-way (a cluster's registry entry
            # may be gone with the metadata still there, and no sweep looks
            # for it): retried by heartbeat()
            if owned and (isinstance(exc, RedisUnavailable) or not isinstance(exc, Exception)):
                self._pending_unregister.add(cid)
            raise
        finally:
            self._cache.pop((keys.CONNECTION_META, cid), None)
        return rooms

    async def _get_all_connection_ids(self, op: ops.GetAllConnectionIds) -> list[tuple[str, str]]:
        flat = await self.transport.execute("HGETALL", keys.CONNECTIONS)
        return [(text(c), text(i)) for c, i in zip(flat[::2], flat[1::2], strict=True)]

    # -- metadata -------------------------------------------------------------

    def _location(self, scope: ops.Scope, key: str) -> tuple[str, str]:
        """(hash, field) that holds a metadata value."""
        if scope == "connection":
            return keys.CONNECTION_META, key
        return keys.roommeta(key), "data"

    async def _get_metadata(self, op: ops.GetMetadata) -> list[Any]:
        if not op.keys:
            return []
        if op.scope == "connection":
            raw = await self.transport.execute("HMGET", keys.CONNECTION_META, *op.keys)
        else:
            raw = await self.transport.pipeline(
                [("HGET", keys.roommeta(room), "data") for room in op.keys]
            )
        for key, value in zip(op.keys, raw, strict=True):
            self._cache_put(self._location(op.scope, key), value)
        return [load_json(value) for value in raw]

    async def _get_all_metadata(self, op: ops.GetAllMetadata) -> list[tuple[str, Any]]:
        if op.scope == "connection":
            registered, stored = await self.transport.pipeline(
                [("HKEYS", keys.CONNECTIONS), ("HGETALL", keys.CONNECTION_META)]
            )
            meta = {text(k): v for k, v in zip(stored[::2], stored[1::2], strict=True)}
            return [(text(c), load_json(meta.get(text(c)))) for c in registered]
        names = await self._scan(keys.ROOMMETA_PREFIX)
        if not names:
            return []
        raw = await self.transport.pipeline([("HGET", keys.roommeta(n), "data") for n in names])
        return [(n, load_json(v)) for n, v in zip(names, raw, strict=True) if v is not None]

    async def _update_metadata(self, op: ops.UpdateMetadata) -> Any:
        hash_key, field = self._location(op.scope, op.key)
        guard = keys.CONNECTIONS if op.scope == "connection" else ""
        if op.strategy == "replace":
            new = op.update(None)
            result, _ = await self._cas_write(hash_key, field, guard, None, new, blind=True)
            if result == -1 and await self._revive(op):
                result, _ = await self._cas_write(hash_key, field, guard, None, new, blind=True)
            if result == -1:
                raise ops.UnknownConnection(f"Connection {op.key!r} is not connected")
            self._remember(op, new)
            return new
        # Writers of one key on this instance take turns: the one at the head
        # applies every update queued behind it in one compare-and-set, so
        # local contention costs one round trip per batch, not a retry storm;
        # only writers on other instances can make a compare-and-set fail.
        return await self._turns.take(
            (hash_key, field),
            op.update,
            lambda batch: self._apply_batch(op, hash_key, field, guard, batch),
        )

    async def _apply_batch(
        self, op: ops.UpdateMetadata, hash_key: str, field: str, guard: str, batch: list[Update]
    ) -> None:
        location = (hash_key, field)
        raw = self._cache.get(location, _MISSING)
        # A value from the cache is only a guess until a compare-and-set
        # confirms it; a value read from Redis (or handed back by a failed
        # compare-and-set) is known to have been current.
        verified = raw is _MISSING
        revived = False
        if verified:
            raw = await self.transport.execute("HGET", hash_key, field)
            self._cache_put(location, raw)
        for _ in range(self.max_update_attempts):
            value = load_json(raw)
            changed = False
            for update in batch:
                update.error = None
                try:
                    new = update.fn(value)
                except Exception as exc:  # one writer's bad function fails only that writer
                    update.error = exc
                    continue
                if new is not ops.UNCHANGED:
                    value, changed = new, True
                update.result = value
            if not changed:
                if not verified:
                    # "nothing to write" would be answered without any
                    # compare-and-set confirming the guess: read, decide again
                    raw = await self.transport.execute("HGET", hash_key, field)
                    self._cache_put(location, raw)
                    verified = True
                    continue
                if guard and not await self.transport.execute("HEXISTS", guard, field):
                    if revived or not await self._revive(op):
                        raise ops.UnknownConnection(f"Connection {op.key!r} is not connected")
                    revived = True
                return
            result, current = await self._cas_write(hash_key, field, guard, raw, value)
            if result == 1:
                self._remember(op, value)
                return
            if result == -1:
                if revived or not await self._revive(op):
                    raise ops.UnknownConnection(f"Connection {op.key!r} is not connected")
                revived = True
                raw = await self.transport.execute("HGET", hash_key, field)
                self._cache_put(location, raw)
                verified = True
                continue
            raw, verified = current, True
        raise RedisUnavailable(
            f"metadata of {op.key!r} kept changing: "
            f"gave up after {self.max_update_attempts} attempts"
        )

    async def _revive(self, op: ops.UpdateMetadata) -> bool:
        """Register again a connection this instance holds that Redis does
        not know (it lost it: a failover to a replica that had not received
        it yet, a restart without persistence before the next heartbeat), so
        a write for a live client is not refused as "not connected"."""
        cid = op.key
        if op.scope != "connection" or cid not in self._registered:
            return False
        log.info("connection %s was missing from Redis; registering it again", cid)
        return cid in await self._reregister([cid])

    async def _reregister(self, cids: list[str]) -> list[str]:
        """Register again connections this instance holds; returns those
        still held once Redis answered.

        An unregistration may run meanwhile, and its deletes may reach Redis
        before these writes (trio spreads concurrent commands over several
        connections; a cluster pipeline sends redirected commands again
        later): that would leave the registry entry of a gone connection,
        which no sweep removes, its owner being alive. ``_unregister`` forgets
        the connection before its first await, so a connection no longer held
        once these writes were answered is unregistered once more here, by
        commands that reach each node after them.
        """
        sent = [cid for cid in cids if cid in self._registered]
        commands: list[Sequence[Arg]] = []
        for cid in sent:
            commands += self._register_commands(
                cid, self.instance_id, self._registered[cid], only_if_missing=True
            )
        if commands:
            await self.transport.pipeline(commands)
        for cid in sent:
            if cid not in self._registered:
                # already forgotten by _unregister: a failure here is retried by heartbeat()
                await self._unregister(ops.UnregisterConnection(cid, self.instance_id))
        return [cid for cid in cids if cid in self._registered]

    def _cache_put(self, location: tuple[str, str], raw: Any) -> None:
        cache = self._cache
        if isinstance(raw, str):
            raw = raw.encode()
        elif raw is not None and not isinstance(raw, bytes):  # an error reply
            cache.pop(location, None)
            return
        cache[location] = raw
        cache.move_to_end(location)
        if len(cache) > self.cache_size:
            cache.popitem(last=False)

    def _remember(self, op: ops.UpdateMetadata, value: Any) -> None:
        # the last value this instance wrote for its own connection, restored
        # by heartbeat() if Redis comes back empty
        if op.scope == "connection" and op.key in self._registered:
            self._registered[op.key] = value

    async def _cas_write(
        self,
        hash_key: str,
        field: str,
        guard: str,
        old: bytes | None,
        new: Any,
        *,
        blind: bool = False,
    ) -> tuple[int, bytes | None]:
        """Write ``new`` if the field still holds ``old`` (anything, if
        ``blind``) and, with a ``guard``, if the connection is registered.

        Returns ``(1, None)`` on success, ``(-1, None)`` for an unknown
        connection, ``(0, current)`` on a conflict. The cache follows.

        On a cluster the guard lives in another slot, so the script cannot
        check it: the write comes first (C), then a check that the
        connection is still registered (G). Unregistering deletes the
        registry entry (U1) and only then, after U1 was answered, the
        metadata (U2); re-registering (``_reregister``) and its undo only add
        writes ordered the same way. C and U2 touch one key, so one node
        orders them. If C comes before U2, U2 deletes what C wrote. If C comes
        after U2, then G (after C) comes after U1 and sees the connection
        gone: the writer then deletes the field (D) only if it still holds
        what C wrote, never blindly, so a value another writer put there
        since is left to that writer's own D. Hence the last write of a gone
        connection's metadata, made after U2 (or U2 deletes it), is removed
        by its own writer's D: nothing survives; a reader may see it for that
        moment. Two exceptions keep live metadata from being deleted when
        Redis lost a registry entry (a failover): for a connection this
        instance holds, a failed G registers it again and the write stands
        (a concurrent ``_unregister`` forgets it first, and then D runs);
        for any other connection G is also asked before C, so nothing is
        written, and D has nothing to undo, unless the connection went
        between the two.
        """
        location = (hash_key, field)
        encoded = encode(new)
        script_guard = [guard] if guard and not self._cluster else []
        late_guard = bool(guard) and self._cluster
        if (
            late_guard
            and field not in self._registered
            and not await self.transport.execute("HEXISTS", guard, field)
        ):
            return -1, None
        if blind and not guard:
            await self.transport.execute("HSET", hash_key, field, encoded)
            result: Any = 1
        elif blind:
            # a replace needs no read, only the registry check
            result = await self._cas(
                self.transport, [hash_key, *script_guard], [field, "blind", b"", encoded]
            )
        else:
            absent = "1" if old is None else "0"
            result = await self._cas(
                self.transport,
                [hash_key, *script_guard],
                [field, absent, old if old is not None else b"", encoded],
            )
        if isinstance(result, list):
            current = as_bytes(result[1]) if len(result) > 1 else None
            self._cache_put(location, current)
            return 0, current
        if (
            int(result) == 1
            and late_guard
            and not await self.transport.execute("HEXISTS", guard, field)
            and not (field in self._registered and await self._reregister([field]))
        ):
            await self._delete_if(self.transport, [hash_key], [field, encoded])
            result = -1
        if int(result) == 1:
            self._cache_put(location, encoded)
        else:
            self._cache.pop(location, None)
        return int(result), None

    async def _delete_room_metadata(self, op: ops.DeleteRoomMetadata) -> bool:
        deleted = await self.transport.execute("DEL", keys.roommeta(op.room))
        self._cache_put((keys.roommeta(op.room), "data"), None)
        return bool(deleted)

    # -- rooms ----------------------------------------------------------------

    def _add_to_room_commands(self, op: ops.AddToRoom) -> list[Sequence[Arg]]:
        return [
            ("SADD", keys.room(op.room), op.connection_id),
            ("SADD", keys.connection_rooms(op.connection_id), op.room),
        ]

    def _joining(self, room: str, cid: str) -> int:
        """Before a join is sent: the token :meth:`_joined` takes with its
        answer (the leaves of ``room`` sent so far)."""
        return self._leaves.get(cid, {}).get(room, 0)

    def _joined(self, room: str, cid: str, token: int) -> None:
        """A join Redis acknowledged: remembered for a reconnect to put back
        (for this instance's own connections: the source of truth), unless a
        leave was sent since the join (Redis ran it after: not in the room)."""
        if cid in self._registered and self._joining(room, cid) == token:
            self._rooms.setdefault(cid, set()).add(room)

    def _left(self, room: str, cid: str) -> None:
        # before the leave is sent: a reconnect meanwhile must not re-add it,
        # nor a join still in flight remember it
        if cid not in self._registered:
            return
        joined = self._rooms.get(cid)
        if joined is not None:
            joined.discard(room)
        leaves = self._leaves.setdefault(cid, {})
        leaves[room] = leaves.get(room, 0) + 1

    async def _add_to_room(self, op: ops.AddToRoom) -> bool:
        token = self._joining(op.room, op.connection_id)
        added, _ = await self.transport.pipeline(self._add_to_room_commands(op))
        self._joined(op.room, op.connection_id, token)
        return bool(added)

    async def _remove_from_room(self, op: ops.RemoveFromRoom) -> bool:
        self._left(op.room, op.connection_id)
        removed, _ = await self.transport.pipeline(
            [
                ("SREM", keys.room(op.room), op.connection_id),
                ("SREM", keys.connection_rooms(op.connection_id), op.room),
            ]
        )
        return bool(removed)

    async def _is_in_room(self, op: ops.IsInRoom) -> bool:
        return bool(await self.transport.execute("SISMEMBER", keys.room(op.room), op.connection_id))

    async def _get_room_members(self, op: ops.GetRoomMembers) -> list[str]:
        return [text(m) for m in await self.transport.execute("SMEMBERS", keys.room(op.room))]

    async def _get_room_members_metadata(
        self, op: ops.GetRoomMembersMetadata
    ) -> list[tuple[str, Any]]:
        members = await self._get_room_members(ops.GetRoomMembers(op.room))
        if not members:
            return []
        raw = await self.transport.execute("HMGET", keys.CONNECTION_META, *members)
        return [(m, load_json(v)) for m, v in zip(members, raw, strict=True)]

    async def _get_connection_rooms(self, op: ops.GetConnectionRooms) -> list[str]:
        rooms = await self.transport.execute("SMEMBERS", keys.connection_rooms(op.connection_id))
        return [text(r) for r in rooms]

    async def _get_all_rooms(self, op: ops.GetAllRooms) -> list[str]:
        return await self._scan(keys.ROOM_PREFIX)

    async def _clear_room(self, op: ops.ClearRoom) -> list[str]:
        members = await self._get_room_members(ops.GetRoomMembers(op.room))
        for member in members:
            self._left(op.room, member)
        commands: list[Sequence[Arg]] = [("DEL", keys.room(op.room))]
        commands += [("SREM", keys.connection_rooms(m), op.room) for m in members]
        await self.transport.pipeline(commands)
        return members

    async def _delete_room(self, op: ops.DeleteRoom) -> list[str]:
        members = await self._clear_room(ops.ClearRoom(op.room))
        await self.transport.execute("DEL", keys.roommeta(op.room))
        self._cache_put((keys.roommeta(op.room), "data"), None)
        return members

    async def _scan(self, prefix: str) -> list[str]:
        """Names after ``prefix`` of every key matching it: SCAN, never KEYS."""
        pattern = glob_escape(prefix) + "*"
        found = await self.transport.scan_all(pattern, self.scan_count)
        return sorted({text(k)[len(prefix) :] for k in found})
