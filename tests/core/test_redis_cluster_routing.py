"""The runtime-neutral Redis Cluster router (mesh_core.redis._cluster), without
a server: slots, command routing, CLUSTER SLOTS and MOVED/ASK parsing, URLs,
and the transport logic over in-memory fake nodes."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import anyio
import pytest

from mesh_core._errors import RedisReplyError, RedisUnavailable
from mesh_core.redis._cluster import (
    ClusterTransportCore,
    Redirect,
    SlotTable,
    Thunk,
    command_slot,
    key_slot,
    parse_cluster_slots,
    parse_redirect,
    split_by_node,
)
from mesh_core.redis._url import is_cluster_url, parse_cluster_url

# -- slots ------------------------------------------------------------------------


def test_known_slots() -> None:
    assert key_slot("foo") == 12182
    assert key_slot(b"foo") == 12182
    assert key_slot("123456789") == 0x31C3  # the CRC16/XMODEM check value
    assert key_slot("") == 0
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers")
    assert key_slot("{user1000}.following") == key_slot("user1000")


def test_hash_tag_rules() -> None:
    assert key_slot("foo{}{bar}") == key_slot("foo{}{bar}")  # empty tag: the whole key
    assert key_slot("foo{}{bar}") != key_slot("bar")
    assert key_slot("foo{{bar}}zap") == key_slot("{bar")  # the first { and the next }
    assert key_slot("foo{bar}{zap}") == key_slot("bar")
    assert key_slot("no-close{tag") != key_slot("tag")


def test_slots_match_redis_py() -> None:
    from redis.crc import key_slot as redis_py_slot

    rng = random.Random(7)
    for _ in range(500):
        key = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 20)))
        assert key_slot(key) == redis_py_slot(key)
    for name in ["mesh:connections", "mesh:connection-meta", "mesh:room:lobby", "ключ"]:
        assert key_slot(name) == redis_py_slot(name.encode())


def test_command_slots() -> None:
    assert command_slot(("HSET", "mesh:connections", "c", "i")) == key_slot("mesh:connections")
    assert command_slot((b"hget", b"h", b"f")) == key_slot("h")
    assert command_slot(("EVALSHA", "abc", 2, "k1", "k2", "arg")) == key_slot("k1")
    assert command_slot(("EVAL", "return 1", "1", "k", "arg")) == key_slot("k")
    assert command_slot(("EVAL", "return 1", 0)) is None
    assert command_slot(("PUBLISH", "mesh:pubsub:i", "x")) == key_slot("mesh:pubsub:i")
    assert command_slot(("PING",)) is None
    assert command_slot(("CLUSTER", "SLOTS")) is None
    for name in ["SADD", "SREM", "SMEMBERS", "SISMEMBER", "DEL", "SET", "GET", "EXPIRE"]:
        assert command_slot((name, "k", "v")) == key_slot("k")
    for name in ["HMGET", "HDEL", "HEXISTS", "HKEYS", "HGETALL", "HSETNX", "EXISTS", "HVALS"]:
        assert command_slot((name, "k", "v")) == key_slot("k")
    with pytest.raises(ValueError, match="scan_all"):
        command_slot(("SCAN", 0))
    with pytest.raises(ValueError, match="does not know"):
        command_slot(("BLMOVE", "a", "b"))


CLUSTER_SLOTS_REPLY = [
    [0, 5460, [b"10.0.0.1", 7000, b"id1"], [b"10.0.0.4", 7003, b"id4"]],
    [5461, 10922, [b"", 7001, b"id2"]],
    [10923, 16383, [b"10.0.0.3", 7002, b"id3", [b"hostname", b"n3"]]],
]


def test_parse_cluster_slots() -> None:
    table = parse_cluster_slots(CLUSTER_SLOTS_REPLY, "seed.example")
    assert table.owner(0) == ("10.0.0.1", 7000)
    assert table.owner(5460) == ("10.0.0.1", 7000)
    assert table.owner(5461) == ("seed.example", 7001)  # "" is the address we asked
    assert table.owner(16383) == ("10.0.0.3", 7002)
    assert table.primaries == [("10.0.0.1", 7000), ("seed.example", 7001), ("10.0.0.3", 7002)]
    assert table.complete
    partial = parse_cluster_slots([[0, 99, [b"h", 1, b"x"]]], "s")
    assert partial.owner(100) is None and not partial.complete
    with pytest.raises(ValueError):
        parse_cluster_slots(b"nonsense", "s")


def test_parse_redirect() -> None:
    assert parse_redirect("MOVED 3999 127.0.0.1:6381") == Redirect(False, 3999, ("127.0.0.1", 6381))
    assert parse_redirect(RedisReplyError("ASK 3999 10.0.0.2:7000")) == Redirect(
        True, 3999, ("10.0.0.2", 7000)
    )
    assert parse_redirect("MOVED 1 [::1]:7000") == Redirect(False, 1, ("::1", 7000))
    assert parse_redirect("MOVED 1 ::1:7000") == Redirect(False, 1, ("::1", 7000))
    assert parse_redirect("MOVED 5 :7001", "seed") == Redirect(False, 5, ("seed", 7001))
    assert parse_redirect("ERR unknown command") is None
    assert parse_redirect("MOVED x y") is None
    assert parse_redirect(RedisReplyError("TRYAGAIN Multiple keys request")) is None


def test_split_by_node_keeps_the_order() -> None:
    a, b = ("a", 1), ("b", 2)
    table = SlotTable([(0, 8191, a), (8192, 16383, b)])
    commands: list[Sequence[str]] = [("GET", f"k{i}") for i in range(20)]
    commands.append(("PING",))
    groups = split_by_node(commands, table, fallback=b)
    assert sorted(i for g in groups.values() for i in g) == list(range(21))
    for address, indices in groups.items():
        assert indices == sorted(indices)
        for i in indices[:-1] if address == b else indices:
            assert table.owner(key_slot(commands[i][1])) == address
    assert groups[b][-1] == 20  # the keyless command went to the fallback


# -- URLs -------------------------------------------------------------------------


def test_cluster_urls() -> None:
    assert is_cluster_url("redis+cluster://h:1") and is_cluster_url("REDISS+CLUSTER://h")
    assert not is_cluster_url("redis://h:1") and not is_cluster_url("redis+sentinel://h/s")
    ep = parse_cluster_url("redis+cluster://h1:7000,h2,[::1]:7002")
    assert ep.seeds == (("h1", 7000), ("h2", 6379), ("::1", 7002))
    assert ep.username is None and ep.password is None and not ep.tls
    assert ep.node_url(("10.0.0.1", 7000)) == "redis://10.0.0.1:7000/0"
    assert ep.node_url(("::1", 7000)) == "redis://[::1]:7000/0"
    ep = parse_cluster_url("rediss+cluster://u%40x:p%2Cw@h1:7000/0?ssl_cert_reqs=none")
    assert (ep.username, ep.password, ep.tls) == ("u@x", "p,w", True)
    assert ep.node_url(("h", 1)) == "rediss://u%40x:p%2Cw@h:1/0?ssl_cert_reqs=none"
    assert parse_cluster_url("redis+cluster://:secret@h").node_url(("h", 1)) == (
        "redis://:secret@h:1/0"
    )
    for bad in [
        "redis+cluster://h/1",  # only database 0
        "redis+cluster://h?sentinel_password=x",  # unknown option
        "redis+cluster://h?ssl_cert_reqs=none",  # TLS options without TLS
        "redis+cluster://h:notaport",
        "redis+cluster://h1,,h2",
        "redis://h",
    ]:
        with pytest.raises(ValueError):
            parse_cluster_url(bad)


# -- the transport over fake nodes --------------------------------------------------


class FakeCluster:
    """Nodes sharing one view of who owns which slot; keys live per node."""

    def __init__(self, count: int = 3) -> None:
        self.addresses = [("127.0.0.1", 7000 + i) for i in range(count)]
        self.owner: list[tuple[str, int]] = [
            self.addresses[slot * count // 16384] for slot in range(16384)
        ]
        self.data: dict[tuple[str, int], dict[bytes, bytes]] = {a: {} for a in self.addresses}
        self.migrating: dict[int, tuple[str, int]] = {}  # slot -> importing node
        self.down: set[tuple[str, int]] = set()
        self.calls: list[tuple[tuple[str, int], str, int]] = []  # node, kind, commands
        self.subscribed: dict[tuple[str, int], list[str]] = {}
        self.closed: list[tuple[str, int]] = []
        self.moved_loop = False
        self.clusterdown = False
        self.release: Any = None  # an event HangingNode.subscribe waits for

    def slots_reply(self) -> list[Any]:
        ranges: list[Any] = []
        for slot, owner in enumerate(self.owner):
            if ranges and ranges[-1][2][1] == owner[1] and ranges[-1][1] == slot - 1:
                ranges[-1][1] = slot
            else:
                ranges.append([slot, slot, [owner[0].encode(), owner[1], b"id"]])
        return ranges

    def node(self, url: str) -> FakeNode:
        host_port = url.split("://", 1)[1].split("/", 1)[0]
        host, _, port = host_port.rpartition(":")
        return FakeNode(self, (host, int(port)))


def _b(x: Any) -> bytes:
    return x if isinstance(x, bytes) else str(x).encode()


class FakeNode:
    def __init__(self, cluster: FakeCluster, address: tuple[str, int]) -> None:
        self.cluster = cluster
        self.address = address

    def _check(self) -> None:
        if self.address in self.cluster.down:
            raise RedisUnavailable(f"{self.address} down")

    def _run(self, args: Sequence[Any], asking: bool = False) -> Any:
        c = self.cluster
        name = _b(args[0]).upper()
        if name == b"CLUSTER":
            return c.slots_reply()
        if name == b"PING":
            return b"PONG"
        if c.clusterdown:
            return RedisReplyError("CLUSTERDOWN The cluster is down")
        key = _b(args[1])
        slot = key_slot(key)
        store = c.data[self.address]
        if c.moved_loop:
            other = next(a for a in c.addresses if a != self.address)
            return RedisReplyError(f"MOVED {slot} {other[0]}:{other[1]}")
        if c.owner[slot] != self.address and not (asking and c.migrating.get(slot) == self.address):
            owner = c.owner[slot]
            return RedisReplyError(f"MOVED {slot} {owner[0]}:{owner[1]}")
        if slot in c.migrating and c.owner[slot] == self.address and key not in store:
            target = c.migrating[slot]
            return RedisReplyError(f"ASK {slot} {target[0]}:{target[1]}")
        if name == b"SET":
            store[key] = _b(args[2])
            return b"OK"
        if name == b"GET":
            return store.get(key)
        if name == b"SCAN":
            raise AssertionError("SCAN is sent with scan_all")
        raise AssertionError(name)

    async def connect(self) -> None:
        self._check()

    async def execute(self, *args: Any) -> Any:
        self._check()
        if _b(args[0]).upper() == b"SCAN":
            return [b"0", [k for k in self.cluster.data[self.address] if k.startswith(b"k")]]
        self.cluster.calls.append((self.address, "execute", 1))
        reply = self._run(args)
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    async def pipeline(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        self._check()
        self.cluster.calls.append((self.address, "pipeline", len(commands)))
        replies: list[Any] = []
        asking = False
        for command in commands:
            if _b(command[0]).upper() == b"ASKING":
                asking = True
                replies.append(b"OK")
                continue
            replies.append(self._run(command, asking))
            asking = False
        return replies

    async def subscribe(self, channel: str, callback: Callable[[bytes], None]) -> None:
        self._check()
        self.cluster.subscribed.setdefault(self.address, []).append(channel)

    async def unsubscribe(self, channel: str) -> None:
        subscribed = self.cluster.subscribed.get(self.address, [])
        if channel in subscribed:
            subscribed.remove(channel)

    def on_reconnect(self, hook: Any, *, first: bool = False) -> None:
        self.replay = hook
        self.replay_first = first

    async def aclose(self) -> None:
        self.cluster.closed.append(self.address)


class _TestRuntime:
    """A ``Runtime`` for the router alone: thunks run one after the other,
    sleeps return at once, the clock stands still, no background tasks."""

    name = "test"

    def now(self) -> float:
        return 0.0

    def wall_ms(self) -> int:
        return 0

    async def sleep(self, seconds: float) -> None:
        return None

    def event(self) -> Any:
        return anyio.Event()

    def timeout(self, seconds: float) -> Any:
        return anyio.fail_after(seconds)

    async def gather(self, thunks: list[Thunk]) -> list[Any]:
        return [await t() for t in thunks]

    def open_task_group(self) -> Any:
        raise NotImplementedError

    def shield(self) -> Any:
        return anyio.CancelScope(shield=True)

    def spawn_system_task(self, fn: Callable[[], Any]) -> None:
        return None  # the tests run the watchdog's rounds themselves


_RUNTIME = _TestRuntime()


def make_transport(cluster: FakeCluster, **options: Any) -> ClusterTransportCore:
    url = "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in cluster.addresses[:1])
    return ClusterTransportCore(
        url,
        make_node=cluster.node,
        runtime=_RUNTIME,
        refresh_interval=0.0,
        **options,
    )


@pytest.mark.anyio
async def test_pipeline_is_split_per_node_and_reassembled_in_order() -> None:
    fake = FakeCluster()
    t = make_transport(fake)
    await t.connect()
    assert t.table.primaries == fake.addresses
    commands = [("SET", f"k{i}", i) for i in range(30)] + [("GET", f"k{i}") for i in range(30)]
    fake.calls.clear()
    replies = await t.pipeline(commands)
    assert replies == [b"OK"] * 30 + [str(i).encode() for i in range(30)]
    assert sorted(a for a, _, _ in fake.calls) == fake.addresses  # one sub-pipeline per node
    for address, store in fake.data.items():
        assert all(fake.owner[key_slot(k)] == address for k in store)
    assert sorted(await t.scan_all("k*", 10)) == sorted(f"k{i}".encode() for i in range(30))


@pytest.mark.anyio
async def test_each_node_replays_on_reconnect_only_the_commands_of_its_slots() -> None:
    """The store's state goes back after a node restart (or failover) on the
    node that lost it: each node's hook keeps the commands whose slot it
    serves; nodes met after the hook was set replay on their first
    connection too (a promoted replica is a node never met before)."""
    fake = FakeCluster()
    t = make_transport(fake)
    await t.connect()
    early = t.node(fake.addresses[0])
    commands = [("SADD", f"k{i}", "x") for i in range(40)]
    t.on_reconnect(lambda: commands)
    later = [t.node(a) for a in fake.addresses[1:]]
    nodes = [early, *later]
    assert [n.replay_first for n in nodes] == [False, True, True]  # type: ignore[attr-defined]
    replayed = [n.replay() for n in nodes]  # type: ignore[attr-defined]
    assert sorted(c for part in replayed for c in part) == sorted(commands)
    for address, part in zip(fake.addresses, replayed, strict=True):
        assert part and all(fake.owner[key_slot(c[1])] == address for c in part)
    t.on_reconnect(None)
    assert [n.replay for n in nodes] == [None] * 3  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_moved_patches_the_table_and_retries() -> None:
    fake = FakeCluster()
    t = make_transport(fake)
    await t.connect()
    # the slot of "foo" moves to another node behind the transport's back
    slot = key_slot("foo")
    new_owner = next(a for a in fake.addresses if a != fake.owner[slot])
    fake.owner[slot] = new_owner
    assert await t.execute("SET", "foo", "1") == b"OK"
    assert fake.data[new_owner][b"foo"] == b"1"
    assert t.table.owner(slot) == new_owner and t.redirects["MOVED"] == 1
    # a whole pipeline against a table that is wrong everywhere
    t.table = SlotTable([(0, 16383, fake.addresses[0])])
    replies = await t.pipeline([("GET", "foo"), *[("SET", f"k{i}", i) for i in range(10)]])
    assert replies == [b"1"] + [b"OK"] * 10
    assert t.table.complete and all(t.table.owner(s) == fake.owner[s] for s in range(16384))


@pytest.mark.anyio
async def test_ask_is_followed_once_without_changing_the_table() -> None:
    fake = FakeCluster()
    t = make_transport(fake)
    await t.connect()
    slot = key_slot("foo")
    source = fake.owner[slot]
    target = next(a for a in fake.addresses if a != source)
    fake.migrating[slot] = target
    fake.data[target][b"foo"] = b"moved"
    assert await t.execute("GET", "foo") == b"moved"
    assert (await t.pipeline([("GET", "foo"), ("SET", "bar", 1)]))[0] == b"moved"
    assert t.table.owner(slot) == source and t.redirects["ASK"] == 2
    assert (target, "pipeline", 2) in fake.calls  # ASKING + GET


@pytest.mark.anyio
async def test_redirects_are_bounded() -> None:
    fake = FakeCluster()
    t = make_transport(fake, max_redirects=3)
    await t.connect()
    fake.moved_loop = True
    with pytest.raises(RedisUnavailable, match="redirects"):
        await t.execute("GET", "foo")
    with pytest.raises(RedisUnavailable, match="redirects"):
        await t.pipeline([("GET", "foo"), ("GET", "bar")])


@pytest.mark.anyio
async def test_node_failures_are_unavailable_and_refresh_the_table() -> None:
    fake = FakeCluster()
    t = make_transport(fake)
    await t.connect()
    slot = key_slot("foo")
    dead = fake.owner[slot]
    fake.down.add(dead)
    with pytest.raises(RedisUnavailable):
        await t.execute("GET", "foo")
    with pytest.raises(RedisUnavailable):
        await t.pipeline([("GET", "foo"), ("SET", "x", 1)])
    # a replica took over: the next command reloads the table first
    survivor = next(a for a in fake.addresses if a != dead)
    fake.owner = [survivor if a == dead else a for a in fake.owner]
    assert await t.execute("SET", "foo", "1") == b"OK"
    assert t.redirects["MOVED"] == 0 and t.table.owner(slot) == survivor
    fake.clusterdown = True
    with pytest.raises(RedisUnavailable, match="CLUSTERDOWN"):
        await t.execute("GET", "foo")
    with pytest.raises(RedisUnavailable, match="CLUSTERDOWN"):
        await t.pipeline([("GET", "foo")])


@pytest.mark.anyio
async def test_connect_fails_when_no_seed_answers() -> None:
    fake = FakeCluster()
    fake.down.update(fake.addresses)
    with pytest.raises(RedisUnavailable, match="no Redis Cluster node answered"):
        await make_transport(fake).connect()


@pytest.mark.anyio
async def test_pubsub_moves_to_another_node() -> None:
    fake = FakeCluster()
    t = make_transport(fake)
    await t.connect()
    await t.subscribe("a", lambda data: None)
    await t.subscribe("b", lambda data: None)
    first = t.pubsub_node
    assert first is not None and fake.subscribed[first] == ["a", "b"]
    await t.check_pubsub()
    assert t.pubsub_node == first  # healthy: stays
    fake.down.add(first)
    await t.check_pubsub()
    second = t.pubsub_node
    assert second is not None and second != first
    assert fake.subscribed[second] == ["a", "b"] and first in fake.closed
    await t.aclose()
    with pytest.raises(RedisUnavailable):
        await t.execute("GET", "foo")


@pytest.mark.anyio
async def test_an_unsubscribed_channel_is_not_taken_along_by_a_move() -> None:
    fake = FakeCluster()
    t = make_transport(fake)
    await t.connect()
    for channel in ("a", "b", "c"):
        await t.subscribe(channel, lambda data: None)
    for channel in ("a", "never-subscribed"):
        await t.unsubscribe(channel)
    nodes = [t.pubsub_node]
    assert nodes[0] is not None and fake.subscribed[nodes[0]] == ["b", "c"]
    fake.down.add(nodes[0])
    await t.check_pubsub()  # moves: only what is still wanted goes along
    nodes.append(t.pubsub_node)
    assert nodes[1] not in (None, nodes[0]) and fake.subscribed[nodes[1]] == ["b", "c"]
    await t.aclose()


@pytest.mark.anyio
async def test_refresh_asks_every_node_before_giving_up() -> None:
    """One node answers CLUSTER SLOTS with an error (LOADING after a restart):
    the others are asked; only if none answers does refresh() fail."""
    fake = FakeCluster()
    loading = {fake.addresses[0]}

    class LoadingNode(FakeNode):
        async def execute(self, *args: Any) -> Any:
            if self.address in loading and _b(args[0]).upper() == b"CLUSTER":
                raise RedisReplyError("LOADING Redis is loading the dataset in memory")
            return await super().execute(*args)

    url = "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in fake.addresses)
    t = ClusterTransportCore(
        url,
        make_node=lambda u: LoadingNode(fake, fake.node(u).address),
        runtime=_RUNTIME,
        refresh_interval=0.0,
    )
    await t.connect()
    assert t.table.primaries == fake.addresses
    loading.update(fake.addresses)
    with pytest.raises(RedisUnavailable, match="LOADING"):
        await t.refresh(force=True)


@pytest.mark.anyio
async def test_pubsub_is_moved_again_after_a_move_that_found_no_node() -> None:
    fake = FakeCluster()
    t = make_transport(fake)
    await t.connect()
    await t.subscribe("a", lambda data: None)
    first = t.pubsub_node
    assert first is not None
    fake.down.update(fake.addresses)  # every node unreachable for a watchdog round
    await t.check_pubsub()
    assert t.pubsub_node == first  # nothing better: the old session stays
    fake.down.clear()
    fake.down.add(first)  # the others are back, the old node for good gone
    await t.check_pubsub()
    assert t.pubsub_node not in (None, first)
    assert fake.subscribed[t.pubsub_node] == ["a"]


class HangingNode(FakeNode):
    """SUBSCRIBE waits until the test releases it (``release`` set)."""

    made: ClassVar[list[HangingNode]] = []

    def __init__(self, cluster: FakeCluster, address: tuple[str, int]) -> None:
        super().__init__(cluster, address)
        self.closed = False
        HangingNode.made.append(self)

    async def subscribe(self, channel: str, callback: Callable[[bytes], None]) -> None:
        if self.cluster.release is not None:
            await self.cluster.release.wait()
        await super().subscribe(channel, callback)

    async def aclose(self) -> None:
        self.closed = True
        await super().aclose()


def hanging_transport(fake: FakeCluster) -> ClusterTransportCore:
    HangingNode.made = []
    url = "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in fake.addresses[:1])
    return ClusterTransportCore(
        url,
        make_node=lambda u: HangingNode(fake, fake.node(u).address),
        runtime=_RUNTIME,
        refresh_interval=0.0,
    )


@pytest.mark.anyio
async def test_a_cancelled_pubsub_move_closes_what_it_opened() -> None:
    import anyio

    fake = FakeCluster()
    t = hanging_transport(fake)
    await t.connect()
    await t.subscribe("ch", lambda data: None)
    fake.down.add(t.pubsub_node)  # type: ignore[arg-type]
    fake.release = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(t.check_pubsub)  # the PING fails, the move starts and hangs
        await anyio.sleep(0.05)
        tg.cancel_scope.cancel()  # what aclose() does to the watchdog
    await t.aclose()
    assert HangingNode.made and all(node.closed for node in HangingNode.made)


@pytest.mark.anyio
async def test_a_pubsub_move_that_ends_after_aclose_installs_nothing() -> None:
    import anyio

    fake = FakeCluster()
    t = hanging_transport(fake)
    await t.connect()
    await t.subscribe("ch", lambda data: None)
    fake.down.add(t.pubsub_node)  # type: ignore[arg-type]
    release = fake.release = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(t.check_pubsub)
        await anyio.sleep(0.05)
        await t.aclose()
        release.set()  # the new node confirms only now
    assert t.pubsub_node is None
    assert all(node.closed for node in HangingNode.made)
