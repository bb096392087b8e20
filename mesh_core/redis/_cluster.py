"""Redis Cluster routing, runtime-neutral: written once, used by both runtimes.

The pure parts (key slots, which argument of a command is its key, the
``CLUSTER SLOTS`` table, ``MOVED``/``ASK`` replies, splitting a pipeline by
node) are plain functions, unit-tested without a server. :class:`ClusterTransportCore`
puts them together into a ``RedisTransport`` over one single-node transport
per node (a :class:`~mesh_core.redis.RedisClient`); the runtime supplies the
node client class and its :class:`~mesh_core.runtime.Runtime` (running
coroutines side by side, sleeps, the clock, the pub/sub watchdog's
background task), see :func:`~mesh_core.redis.open_transport`. Pooling,
auto-pipelining, timeouts and the mapping of failures to
``RedisUnavailable`` stay in the node transports.

The key layout is a contract shared with other implementations (PROTOCOL.md
section 8), so there are no hash tags: keys of one operation may live on
different nodes, and :mod:`mesh_core.redis._store` orders its writes accordingly.
"""

from __future__ import annotations

import binascii
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from .._errors import RedisReplyError, RedisUnavailable
from ..runtime import Event, Runtime, TaskGroup
from ._connection import ReconnectHook
from ._resp import scan_keys
from ._url import ClusterEndpoint, is_cluster_url, parse_cluster_url

__all__ = [
    "NodeTransport",
    "Thunk",
    "SLOTS",
    "ClusterTransportCore",
    "ClusterEndpoint",
    "Redirect",
    "SlotTable",
    "command_slot",
    "is_cluster_url",
    "key_slot",
    "parse_cluster_slots",
    "parse_cluster_url",
    "parse_redirect",
    "split_by_node",
]

log = logging.getLogger("mesh_core.redis.cluster")

Arg = bytes | str | int | float
Address = tuple[str, int]
T = TypeVar("T")

SLOTS = 16384


# -- slots -----------------------------------------------------------------------


def key_slot(key: bytes | str | int | float) -> int:
    """CRC16/XMODEM of the key (or of its first non-empty ``{hash tag}``) mod 16384."""
    data = key if isinstance(key, bytes) else str(key).encode()
    start = data.find(b"{")
    if start != -1:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return binascii.crc_hqx(data, 0) % SLOTS


# Commands whose first key is their first argument; the storage logic's
# multi-key commands (DEL/EXISTS with several keys) must keep to one slot,
# which Redis itself enforces (CROSSSLOT).
_FIRST_ARG_KEY = frozenset(
    b"""APPEND DECR DECRBY DEL DUMP EXISTS EXPIRE EXPIREAT GET GETDEL GETEX GETSET
    HDEL HEXISTS HGET HGETALL HINCRBY HINCRBYFLOAT HKEYS HLEN HMGET HMSET HRANDFIELD
    HSCAN HSET HSETNX HSTRLEN HVALS INCR INCRBY INCRBYFLOAT LINDEX LLEN LPOP LPUSH
    LRANGE LREM LSET LTRIM MGET MSET PERSIST PEXPIRE PEXPIREAT PSETEX PTTL RPOP
    RPUSH SADD SCARD SDIFF SET SETEX SETNX SINTER SISMEMBER SMEMBERS SMISMEMBER
    SPOP SRANDMEMBER SREM SSCAN STRLEN SUNION TOUCH TTL TYPE UNLINK WATCH ZADD
    ZCARD ZINCRBY ZRANGE ZRANK ZREM ZSCORE""".split()
)
# Commands every node answers the same way (or that name no key).
_ANY_NODE = frozenset(b"ECHO PING SCRIPT INFO TIME CLUSTER COMMAND READONLY READWRITE".split())


def _name(arg: Arg) -> bytes:
    return (arg if isinstance(arg, bytes) else str(arg).encode()).upper()


def command_slot(args: Sequence[Arg]) -> int | None:
    """The slot a command must run on, or ``None`` if any node will do.

    ``PUBLISH`` is cluster-wide (every node forwards it on the cluster bus),
    so any node would do: the channel's slot picks one, which spreads the
    load. ``SCAN`` only sees one node's keys, so it is refused here: use
    :meth:`ClusterTransportCore.scan_all`.
    """
    if not args:
        raise ValueError("empty Redis command")
    name = _name(args[0])
    if name in _FIRST_ARG_KEY:
        if len(args) < 2:
            raise ValueError(f"{name.decode()} without a key")
        return key_slot(args[1])
    if name in (b"EVAL", b"EVALSHA", b"EVAL_RO", b"EVALSHA_RO", b"FCALL", b"FCALL_RO"):
        numkeys = int(args[2]) if len(args) > 2 else 0
        return key_slot(args[3]) if numkeys > 0 and len(args) > 3 else None
    if name == b"PUBLISH" and len(args) > 1:
        return key_slot(args[1])
    if name in _ANY_NODE:
        return None
    if name == b"SCAN" or name == b"KEYS":
        raise ValueError(f"{name.decode()} sees one node only in a cluster: use scan_all()")
    raise ValueError(f"the cluster router does not know where to send {name.decode()}")


class SlotTable:
    """Which primary serves each slot (a flat list: one lookup per command)."""

    def __init__(self, ranges: Iterable[tuple[int, int, Address]] = ()) -> None:
        self._owner: list[Address | None] = [None] * SLOTS
        for start, end, address in ranges:
            self._owner[start : end + 1] = [address] * (end - start + 1)

    def owner(self, slot: int) -> Address | None:
        return self._owner[slot]

    def assign(self, slot: int, address: Address) -> None:
        self._owner[slot] = address

    @property
    def primaries(self) -> list[Address]:
        """Every primary serving a slot, in slot order (stable across calls)."""
        return list(dict.fromkeys(a for a in self._owner if a is not None))

    @property
    def complete(self) -> bool:
        return all(a is not None for a in self._owner)


def _host(raw: Any, default: str) -> str:
    host = raw.decode() if isinstance(raw, bytes) else str(raw)
    # "" means "the address you reached me on", "?" an unknown endpoint
    return default if host in ("", "?") else host


def parse_cluster_slots(reply: Any, default_host: str) -> SlotTable:
    """A ``CLUSTER SLOTS`` reply: ``[[start, end, [host, port, id, ...], replicas...], ...]``."""
    if not isinstance(reply, list):
        raise ValueError(f"unexpected CLUSTER SLOTS reply: {reply!r}")
    ranges: list[tuple[int, int, Address]] = []
    for entry in reply:
        start, end, primary = int(entry[0]), int(entry[1]), entry[2]
        ranges.append((start, end, (_host(primary[0], default_host), int(primary[1]))))
    return SlotTable(ranges)


@dataclass(frozen=True)
class Redirect:
    """A ``MOVED``/``ASK`` error reply: where the slot lives now (or for this one command)."""

    ask: bool
    slot: int
    address: Address


def parse_redirect(error: RedisReplyError | str, default_host: str = "") -> Redirect | None:
    """``MOVED 3999 127.0.0.1:6381`` / ``ASK 3999 [::1]:6381``; ``None`` for other errors."""
    text = error.message if isinstance(error, RedisReplyError) else error
    parts = text.split()
    if len(parts) != 3 or parts[0] not in ("MOVED", "ASK"):
        return None
    host, _, port = parts[2].rpartition(":")
    host = host.strip("[]")
    try:
        return Redirect(parts[0] == "ASK", int(parts[1]), (host or default_host, int(port)))
    except ValueError:
        return None


def split_by_node(
    commands: Sequence[Sequence[Arg]], table: SlotTable, fallback: Address
) -> dict[Address, list[int]]:
    """Indices of ``commands`` grouped by the node that serves each, in order.

    Keyless commands go with ``fallback``; each group keeps the order of the
    commands, so the replies of a node's sub-pipeline map back by index.
    """
    groups: dict[Address, list[int]] = {}
    for i, command in enumerate(commands):
        slot = command_slot(command)
        address = fallback if slot is None else (table.owner(slot) or fallback)
        groups.setdefault(address, []).append(i)
    return groups


# -- the transport ---------------------------------------------------------------


class NodeTransport(Protocol):
    """What a runtime's single-node transport offers (``RedisTransport``)."""

    async def connect(self) -> None: ...

    async def execute(self, *args: Arg) -> Any: ...

    async def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Any]: ...

    async def subscribe(self, channel: str, callback: Callable[[bytes], None]) -> None: ...

    async def unsubscribe(self, channel: str) -> None: ...

    def on_reconnect(self, hook: ReconnectHook | None, *, first: bool = False) -> None: ...

    async def aclose(self) -> None: ...


Thunk = Callable[[], Awaitable[Any]]


@dataclass
class _Pending:
    """Commands of a pipeline still waiting for a final reply."""

    index: int
    address: Address
    ask: bool = False
    tries: int = 0


@dataclass
class _PubSub:
    address: Address
    transport: NodeTransport
    channels: dict[str, Callable[[bytes], None]] = field(default_factory=dict)
    # only the session in use delivers: a session being replaced is muted
    # before its successor subscribes, so no message arrives twice
    live: bool = True

    def gate(self, callback: Callable[[bytes], None]) -> Callable[[bytes], None]:
        def deliver(data: bytes) -> None:
            if self.live:
                callback(data)

        return deliver


class ClusterTransportCore:
    """A ``RedisTransport`` over a Redis Cluster; see the module docstring.

    ``make_node(url)`` returns a runtime's single-node transport for a node
    URL; ``runtime.gather`` runs the per-node sub-pipelines side by side
    (each thunk here already turns its exceptions into return values). The
    slot table is loaded on :meth:`connect`, patched on ``MOVED`` and
    reloaded (at most every ``refresh_interval`` seconds) after a ``MOVED``
    or a node failure. A command is redirected at most
    ``max_redirects`` times. Node failures surface as ``RedisUnavailable``.
    """

    cluster = True  # tells the storage logic to keep each script to one slot

    def __init__(
        self,
        url: str,
        *,
        make_node: Callable[[str], NodeTransport],
        runtime: Runtime,
        max_redirects: int = 5,
        refresh_interval: float = 0.5,
        pubsub_check_interval: float = 2.0,
    ) -> None:
        self.url: ClusterEndpoint = parse_cluster_url(url)
        self._make_node = make_node
        self._rt = runtime
        self._sleep = runtime.sleep
        self._watching = False
        self._watch_group: TaskGroup | None = None
        self._watch_done: Event | None = None
        self.max_redirects = max_redirects
        self.refresh_interval = refresh_interval
        self.pubsub_check_interval = pubsub_check_interval
        self.table = SlotTable()
        self._nodes: dict[Address, NodeTransport] = {}
        self._stale = True
        self._refreshed_at: float | None = None
        self._last_good: Address | None = None
        self._pubsub: _PubSub | None = None
        self._subs: dict[str, Callable[[bytes], None]] = {}
        self._moving = False
        self._closed = False
        # redirects followed so far, by kind: a resharding shows up here
        self.redirects = {"MOVED": 0, "ASK": 0}
        self._on_reconnect: ReconnectHook | None = None

    # -- nodes and the slot table

    def node(self, address: Address) -> NodeTransport:
        transport = self._nodes.get(address)
        if transport is None:
            if self._closed:
                raise RedisUnavailable("Redis transport is closed")
            transport = self._nodes[address] = self._make_node(self.url.node_url(address))
            if self._on_reconnect is not None:
                # a node met later may be a replica promoted by a failover,
                # without the latest writes: its first connection replays too
                transport.on_reconnect(self._node_replay(address), first=True)
        return transport

    def on_reconnect(self, hook: ReconnectHook | None, *, first: bool = False) -> None:
        """Each node replays, when it reconnects, the hook's commands whose
        slot it serves (by the slot table then); a command that lands on
        the wrong node gets ``MOVED``, logged and left to the owner's
        periodic duties."""
        self._on_reconnect = hook
        for address, transport in self._nodes.items():
            replay = None if hook is None else self._node_replay(address)
            transport.on_reconnect(replay, first=first)

    def _node_replay(self, address: Address) -> ReconnectHook:
        def replay() -> list[Sequence[Arg]]:
            hook = self._on_reconnect
            if hook is None:
                return []
            owner = self.table.owner
            return [c for c in hook() if owner(command_slot(c) or 0) == address]

        return replay

    def _known(self) -> list[Address]:
        """Every node we know of; the last one that answered first."""
        first = [self._last_good] if self._last_good is not None else []
        return list(dict.fromkeys([*first, *self.table.primaries, *self.url.seeds, *self._nodes]))

    async def connect(self) -> None:
        """Load the slot table from the first seed that answers."""
        await self.refresh(force=True)

    async def refresh(self, *, force: bool = False) -> None:
        """Reload the slot table from any node that answers (one at a time)."""
        now = self._rt.now()
        if (
            not force
            and self._refreshed_at is not None
            and now - self._refreshed_at < self.refresh_interval
        ):
            return
        self._refreshed_at = now
        errors: list[str] = []
        candidates = self._known()
        for address in candidates:
            try:
                reply = await self.node(address).execute("CLUSTER", "SLOTS")
            except RedisUnavailable as exc:
                errors.append(f"{address[0]}:{address[1]}: {exc}")
                continue
            except RedisReplyError as exc:
                # LOADING, a node not in cluster mode, a misconfigured seed:
                # that node's problem, not the cluster's; another may answer
                errors.append(f"{address[0]}:{address[1]}: {exc}")
                continue
            table = parse_cluster_slots(reply, address[0])
            if not table.primaries:
                errors.append(f"{address[0]}:{address[1]}: no slots assigned")
                continue
            self.table = table
            self._stale = False
            self._last_good = address
            return
        raise RedisUnavailable("no Redis Cluster node answered: " + "; ".join(errors))

    async def _ready(self) -> None:
        if self._closed:
            raise RedisUnavailable("Redis transport is closed")
        if self._stale:
            try:
                await self.refresh(force=not self.table.primaries)
            except RedisUnavailable:
                if not self.table.primaries:
                    raise
                # keep routing by the old table; its nodes report their own failures

    def _address(self, slot: int | None) -> Address:
        if slot is not None:
            owner = self.table.owner(slot)
            if owner is not None:
                return owner
            self._stale = True  # an unserved slot: the cluster is changing
        primaries = self.table.primaries
        if primaries:
            return primaries[0] if slot is None else random.choice(primaries)
        return self.url.seeds[0]

    @property
    def reconnects(self) -> int:
        """Connections re-opened after a loss, over every node's client."""
        return sum(int(getattr(node, "reconnects", 0)) for node in self._nodes.values())

    def _redirected(self, redirect: Redirect) -> None:
        self.redirects["ASK" if redirect.ask else "MOVED"] += 1
        if not redirect.ask:
            self.table.assign(redirect.slot, redirect.address)
            self._stale = True  # a slot moved: others probably did too

    # -- commands

    async def execute(self, *args: Arg) -> Any:
        """Run one command on the node serving its key, following redirects."""
        await self._ready()
        address = self._address(command_slot(args))
        ask = False
        for tries in range(self.max_redirects + 1):
            try:
                if ask:
                    replies = await self.node(address).pipeline([("ASKING",), args])
                    if isinstance(replies[1], RedisReplyError):
                        raise replies[1]
                    return replies[1]
                return await self.node(address).execute(*args)
            except RedisReplyError as exc:
                redirect = parse_redirect(exc, address[0])
                if redirect is None:
                    await self._transient(exc, tries)
                    continue
                self._redirected(redirect)
                address, ask = redirect.address, redirect.ask
            except RedisUnavailable:
                self._stale = True
                raise
        raise RedisUnavailable(f"gave up after {self.max_redirects} cluster redirects")

    async def _transient(self, exc: RedisReplyError, tries: int) -> None:
        """``TRYAGAIN`` (a slot half-migrated) is retried after a pause;
        ``CLUSTERDOWN`` means the cluster cannot serve now; anything else is
        the command's own error."""
        if exc.prefix == "TRYAGAIN" and tries < self.max_redirects:
            await self._sleep(0.01 * 2**tries)
            return
        if exc.prefix in ("CLUSTERDOWN", "TRYAGAIN"):
            self._stale = True
            raise RedisUnavailable(f"Redis Cluster unavailable: {exc}") from exc
        raise exc

    async def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """One sub-pipeline per node, sent side by side; replies in command order.

        Commands answered with ``MOVED``/``ASK`` (or ``TRYAGAIN``) are sent
        again where the reply says, so across nodes (and after a redirect)
        the commands of one pipeline are not ordered: callers that need an
        order between two writes issue them one after the other.
        """
        if not commands:
            await self._sleep(0)
            return []
        await self._ready()
        results: list[Any] = [None] * len(commands)
        fallback = self._address(None)
        pending = [
            _Pending(i, address)
            for address, indices in split_by_node(commands, self.table, fallback).items()
            for i in indices
        ]
        while pending:
            groups: dict[tuple[Address, bool], list[_Pending]] = {}
            for p in pending:
                groups.setdefault((p.address, p.ask), []).append(p)
            thunks = [
                self._sub_pipeline(address, ask, [commands[p.index] for p in group])
                for (address, ask), group in groups.items()
            ]
            outcomes = await self._run_all(thunks)
            failure = next((o for o in outcomes if isinstance(o, BaseException)), None)
            if failure is not None:
                if isinstance(failure, RedisUnavailable):
                    self._stale = True
                raise failure
            pending = []
            for group, replies in zip(groups.values(), outcomes, strict=True):
                for p, reply in zip(group, replies, strict=True):
                    again = await self._retry(p, reply)
                    if again is None:
                        results[p.index] = reply
                    else:
                        pending.append(again)
        return results

    async def _retry(self, p: _Pending, reply: Any) -> _Pending | None:
        """Where to send a command again, or ``None`` if ``reply`` is final."""
        if not isinstance(reply, RedisReplyError):
            return None
        redirect = parse_redirect(reply, p.address[0])
        if redirect is None and reply.prefix != "TRYAGAIN":
            if reply.prefix == "CLUSTERDOWN":
                self._stale = True
                raise RedisUnavailable(f"Redis Cluster unavailable: {reply}")
            return None  # the command's own error reply stands
        if p.tries >= self.max_redirects:
            self._stale = True
            raise RedisUnavailable(f"gave up after {self.max_redirects} cluster redirects")
        if redirect is None:
            await self._sleep(0.01 * 2**p.tries)
            return _Pending(p.index, p.address, p.ask, p.tries + 1)
        self._redirected(redirect)
        return _Pending(p.index, redirect.address, redirect.ask, p.tries + 1)

    def _sub_pipeline(
        self, address: Address, ask: bool, commands: list[Sequence[Arg]]
    ) -> Callable[[], Awaitable[Any]]:
        async def run() -> list[Any]:
            node = self.node(address)
            if not ask:
                if len(commands) == 1:
                    # one command: let the node transport auto-pipeline it with others
                    try:
                        return [await node.execute(*commands[0])]
                    except RedisReplyError as exc:
                        return [exc]
                return await node.pipeline(commands)
            sent: list[Sequence[Arg]] = []
            for command in commands:
                sent += [("ASKING",), command]
            return (await node.pipeline(sent))[1::2]

        return run

    async def _run_all(self, thunks: list[Thunk]) -> list[Any]:
        """Run thunks side by side; each outcome is its result or its exception."""

        def caught(thunk: Thunk) -> Thunk:
            async def run() -> Any:
                try:
                    return await thunk()
                except Exception as exc:
                    return exc

            return run

        if len(thunks) == 1:
            return [await caught(thunks[0])()]
        return await self._rt.gather([caught(t) for t in thunks])

    async def scan_all(self, pattern: str, count: int) -> list[bytes]:
        """Every key matching ``pattern`` on every primary (SCAN sees one node only)."""
        await self._ready()

        def scan(address: Address) -> Thunk:
            return lambda: scan_keys(self.node(address).execute, pattern, count)

        outcomes = await self._run_all([scan(a) for a in self.table.primaries])
        names: list[bytes] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                if isinstance(outcome, RedisUnavailable):
                    self._stale = True
                raise outcome
            names += outcome
        return names

    # -- pub/sub

    @property
    def pubsub_node(self) -> Address | None:
        """The node whose connection carries this transport's subscriptions."""
        return None if self._pubsub is None else self._pubsub.address

    async def subscribe(self, channel: str, callback: Callable[[bytes], None]) -> None:
        """SUBSCRIBE on one node (classic pub/sub is cluster-wide); if that
        node does not confirm, every channel moves to another node."""
        await self._ready()
        self._subs[channel] = callback
        self.start_watchdog()
        while self._moving:  # the move under way subscribes this channel too
            await self._sleep(0.01)
        current = self._pubsub
        if current is not None:
            if current.channels.get(channel) is callback:
                return
            try:
                await current.transport.subscribe(channel, current.gate(callback))
                current.channels[channel] = callback
                return
            except RedisUnavailable:
                log.warning("pub/sub node %s:%d failed; moving", *current.address)
        if not await self._move_pubsub():
            del self._subs[channel]
            raise RedisUnavailable(f"could not subscribe to {channel!r} on any cluster node")

    async def unsubscribe(self, channel: str) -> None:
        """Forget ``channel`` at once (no later move subscribes it again) and
        UNSUBSCRIBE it on the node that carries it; a move under way drops
        it when it is done (see :meth:`_move_pubsub_now`)."""
        self._subs.pop(channel, None)
        current = self._pubsub
        if current is not None and current.channels.pop(channel, None) is not None:
            await current.transport.unsubscribe(channel)

    async def check_pubsub(self) -> None:
        """One watchdog round: if the pub/sub node stopped answering, move to
        another one. The node transport reconnects by itself, but only to its
        own node, which after a failover may never come back. With no session
        at all (no node confirmed the last move) the move is tried again:
        an outage of the whole cluster must not end pub/sub for good."""
        current = self._pubsub
        if self._closed or self._moving:
            return
        if current is None:
            if self._subs:
                await self._move_pubsub()
            return
        try:
            await current.transport.execute("PING")
        except RedisUnavailable:
            log.warning("pub/sub node %s:%d does not answer; moving", *current.address)
            self._stale = True
            await self._move_pubsub()

    async def watch_pubsub(self) -> None:
        """Run :meth:`check_pubsub` every ``pubsub_check_interval`` seconds, forever."""
        while not self._closed:
            await self._sleep(self.pubsub_check_interval)
            try:
                await self.check_pubsub()
            except Exception:
                log.exception("pub/sub watchdog failed; will retry")

    def start_watchdog(self) -> None:
        """Have :meth:`watch_pubsub` run in the background (once), until
        :meth:`aclose`. Without it, pub/sub never leaves a node."""
        if not self._watching and not self._closed:
            self._watching = True
            # a system task, like the node transports' own: it must outlive
            # the task that happened to subscribe
            self._rt.spawn_system_task(self._watch)

    async def _watch(self) -> None:
        if self._closed:
            return
        self._watch_done = done = self._rt.event()
        try:
            async with self._rt.open_task_group() as group:
                self._watch_group = group
                if not self._closed:
                    group.start_soon(self.watch_pubsub)
        finally:
            self._watch_group = None
            done.set()

    async def _close_node(self, transport: NodeTransport) -> None:
        """Close a node transport even from a task being cancelled (a
        runtime whose cancellation hits every later await, trio, shields it)."""
        with self._rt.shield():
            await transport.aclose()

    async def _move_pubsub(self) -> bool:
        """Subscribe every channel on another node; True once one confirmed."""
        self._moving = True
        try:
            return await self._move_pubsub_now()
        finally:
            self._moving = False

    async def _move_pubsub_now(self) -> bool:
        old = self._pubsub
        with_table = True
        try:
            await self.refresh()
        except RedisUnavailable:
            with_table = False
        candidates = self._known() if with_table else [*self.url.seeds, *self._nodes]
        candidates = list(dict.fromkeys(candidates))
        random.shuffle(candidates)  # spread the instances' subscriptions over the nodes
        if old is not None and old.address in candidates and len(candidates) > 1:
            candidates.remove(old.address)
            candidates.append(old.address)  # last resort: it may have come back
        # The old session stays open until another confirmed: if none does
        # (the whole cluster unreachable for a while), it is all there is, and
        # its node transport reconnects and subscribes again by itself. It is
        # muted meanwhile: a node that still delivers must not deliver twice
        # once the new one is subscribed.
        if old is not None:
            old.live = False
        try:
            for address in candidates:
                if self._closed:
                    return False
                moved = await self._subscribe_all(address)
                if moved is None:
                    continue
                if self._closed:  # aclose() ran meanwhile: nobody would close it
                    await self._close_node(moved.transport)
                    return False
                self._pubsub = moved
                moved.live = True
                if old is not None:
                    await self._close_node(old.transport)
                # channels unsubscribed while the move subscribed them
                for channel in [c for c in moved.channels if c not in self._subs]:
                    del moved.channels[channel]
                    await moved.transport.unsubscribe(channel)
                return True
            return False
        finally:
            if old is not None and self._pubsub is old:
                old.live = True

    async def _subscribe_all(self, address: Address) -> _PubSub | None:
        """A new session on ``address`` with every channel subscribed, muted
        until installed; ``None`` if the node did not confirm them all."""
        transport = self._make_node(self.url.node_url(address))
        moved = _PubSub(address, transport, live=False)
        try:
            # channels subscribed while this runs are picked up too
            while missing := [
                (channel, callback)
                for channel, callback in self._subs.items()
                if moved.channels.get(channel) is not callback
            ]:
                for channel, callback in missing:
                    await transport.subscribe(channel, moved.gate(callback))
                    moved.channels[channel] = callback
        except RedisUnavailable as exc:
            log.debug("pub/sub on %s:%d failed: %s", *address, exc)
            await self._close_node(transport)
            return None
        except BaseException:
            # cancelled (aclose() ends the watchdog): this transport is ours alone
            await self._close_node(transport)
            raise
        return moved

    # -- lifecycle

    async def aclose(self) -> None:
        self._closed = True
        if self._watch_group is not None:
            self._watch_group.cancel()
        if self._watch_done is not None:
            # a move it was making closes what it opened before it ends
            with self._rt.shield():
                await self._watch_done.wait()
        pubsub, self._pubsub = self._pubsub, None
        transports = [*self._nodes.values()]
        if pubsub is not None:
            transports.append(pubsub.transport)
        self._nodes.clear()
        for transport in transports:
            await transport.aclose()
