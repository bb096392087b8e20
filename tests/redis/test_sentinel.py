"""Redis Sentinel: URL parsing, the storage suite through sentinels, a demoted
master, and a real failover under load, on both runtimes. Every Redis and
sentinel here is a child process this module starts on free ports."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from examples.demo import app as demo_app
from mesh_core import Storage
from mesh_core._errors import RedisUnavailable
from mesh_core.redis._url import RedisEndpoint, SentinelEndpoint, parse_redis_url
from tests.helpers.redis_sentinel import FakeSentinel, SentinelSetup, SwitchWatcher
from tests.helpers.redis_server import RedisServer
from tests.helpers.server_thread import ServerThread
from tests.helpers.storage_conformance import Deliveries, StorageConformance
from tests.helpers.wsclient import WSClient

QUIET = {"ping_interval": 0, "latency_interval": 0}
FAST_REPLICATION = SentinelSetup.FAST_REPLICATION

# --------------------------------------------------------------------- URLs


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+sentinel://s1/mymaster",
            SentinelEndpoint(sentinels=(("s1", 26379),), service_name="mymaster"),
        ),
        (
            "redis+sentinel://:pw@s1:1,s2,[::1]:3/svc/4?sentinel_password=sp",
            SentinelEndpoint(
                sentinels=(("s1", 1), ("s2", 26379), ("::1", 3)),
                service_name="svc",
                master=RedisEndpoint(db=4, password="pw"),
                sentinel_password="sp",
            ),
        ),
        (
            "REDIS+SENTINEL://us%40r:p%2Cw@h:26380/svc/?sentinel_username=su&sentinel_password=sp",
            SentinelEndpoint(
                sentinels=(("h", 26380),),
                service_name="svc",
                master=RedisEndpoint(username="us@r", password="p,w"),
                sentinel_username="su",
                sentinel_password="sp",
            ),
        ),
        (
            "rediss+sentinel://h/svc?db=2&ssl_cert_reqs=none&ssl_ca_certs=/ca.pem&password=x",
            SentinelEndpoint(
                sentinels=(("h", 26379),),
                service_name="svc",
                master=RedisEndpoint(
                    db=2, password="x", tls=True, ssl_cert_reqs="none", ssl_ca_certs="/ca.pem"
                ),
            ),
        ),
        ("redis://:pw@h:7/3", RedisEndpoint(host="h", port=7, db=3, password="pw")),
        ("rediss://h", RedisEndpoint(host="h", tls=True)),
        ("unix:///tmp/r.sock?db=5", RedisEndpoint(unix_path="/tmp/r.sock", db=5)),
    ],
)
def test_url_forms(url: str, expected: Any) -> None:
    assert parse_redis_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://h", "without a service name"),
        ("redis+sentinel://h/", "without a service name"),
        ("redis+sentinel://h/svc/x", "database number must be an integer"),
        ("redis+sentinel://h/svc/0/extra", "path must be /service_name[/db]"),
        ("redis+sentinel://h:0/svc", "invalid sentinel port"),
        ("redis+sentinel://h:99999/svc", "invalid sentinel port"),
        ("redis+sentinel://h:abc/svc", "invalid sentinel port"),
        ("redis+sentinel://h1,,h2/svc", "empty sentinel address"),
        ("redis+sentinel:///svc", "empty sentinel address"),
        ("redis+sentinel://::1/svc", "needs brackets"),
        ("redis+sentinel://h/svc?sentinel_pasword=x", "unknown option(s) sentinel_pasword"),
        ("redis+sentinel://h/svc?sentinel_username=u", "sentinel_username needs"),
        ("redis+sentinel://h/svc?ssl_cert_reqs=none", "need rediss+sentinel"),
        ("rediss+sentinel://h/svc?ssl_cert_reqs=maybe", "ssl_cert_reqs must be one of"),
        ("mongodb://h/svc", "unsupported Redis URL scheme"),
        ("localhost:6379", "not a Redis URL"),
        ("redis://h:port/0", "invalid port"),
        ("redis://h/-1", "must be >= 0"),
    ],
)
def test_url_errors(url: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_redis_url(url)
    assert message in str(info.value)


def transport_class(anyio_backend: str) -> Any:
    if anyio_backend == "trio":
        from mesh_trio._redis_transport import TrioRedisTransport

        return TrioRedisTransport
    from mesh_asyncio._redis_transport import AsyncioRedisTransport

    return AsyncioRedisTransport


def store_class(runtime: str) -> Any:
    if runtime == "trio":
        from mesh_trio import RedisStore
    else:
        from mesh_asyncio import RedisStore  # type: ignore[assignment]
    return RedisStore


@pytest.mark.anyio
async def test_stores_refuse_bad_sentinel_urls(anyio_backend: str) -> None:
    with pytest.raises(ValueError, match="without a service name"):
        store_class(anyio_backend)("redis+sentinel://127.0.0.1:26379")
    with pytest.raises(ValueError, match="unknown option"):
        transport_class(anyio_backend)("redis+sentinel://127.0.0.1/svc?passwd=x")


# ------------------------------------------------- the storage suite, via sentinels


@pytest.fixture(scope="module")
def sentinel_setup() -> Iterator[SentinelSetup]:
    # passwords on both sides: the master's and the sentinels' must not be mixed up
    with SentinelSetup(sentinels=1, password="m-pw", sentinel_password="s-pw") as setup:
        yield setup


class TestSentinelStore(StorageConformance):
    @pytest.fixture(autouse=True)
    def _bind(self, sentinel_setup: SentinelSetup, anyio_backend: str) -> None:
        self.setup = sentinel_setup
        # a sentinel that is down comes first: the next one must be asked
        self.url = sentinel_setup.url_for(db=1, dead_sentinel_first=True)
        self.store_class = store_class(anyio_backend)

    async def new_storage(self) -> Storage:
        master = self.setup.node(self.setup.master_port())
        master.execute_command("SELECT", 1)
        master.execute_command("FLUSHDB")
        store: Storage = self.store_class(self.url)
        return store

    async def attach_instance(
        self, storage: Storage, instance_id: str, deliver: Deliveries
    ) -> Storage:
        other: Storage = self.store_class(self.url)
        await other.start(instance_id, deliver)
        return other

    async def detach_instance(self, handle: Storage, instance_id: str) -> None:
        await handle.stop()


# ------------------------------------------------------------ a demoted master


@pytest.mark.anyio
async def test_demoted_master_readonly_leads_to_the_new_master(anyio_backend: str) -> None:
    """The master becomes a replica under a live connection: READONLY, then the new master.

    A stand-in sentinel moves at once (real ones take seconds to notice);
    the nodes are real.
    """
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(RedisServer(extra_args=FAST_REPLICATION))
        b = stack.enter_context(
            RedisServer(extra_args=[*FAST_REPLICATION, "--replicaof", "127.0.0.1", str(a.port)])
        )
        sentinel = stack.enter_context(FakeSentinel("svc", a.port))
        transport = transport_class(anyio_backend)(
            f"redis+sentinel://127.0.0.1:{sentinel.port}/svc",
            command_timeout=1.0,
            connect_timeout=1.0,
            reconnect_backoff=(0.01, 0.1),
        )
        try:
            got: list[bytes] = []
            await transport.subscribe("news", got.append)
            assert await transport.execute("SET", "k", "on-a") == b"OK"
            # demote a, promote b; the connection to a stays open
            node_a, node_b = raw(a.port), raw(b.port)
            node_b.execute_command("REPLICAOF", "NO", "ONE")
            node_a.execute_command("REPLICAOF", "127.0.0.1", str(b.port))
            sentinel.master_port = b.port
            with pytest.raises(RedisUnavailable):
                await transport.execute("SET", "k", "lost")  # READONLY: never a lasting error
            assert await transport.execute("SET", "k", "on-b") == b"OK"
            assert node_b.get("k") == b"on-b"
            assert await transport.pipeline([("GET", "k"), ("INCR", "n")]) == [b"on-b", 1]
            # the pub/sub connection, once lost, follows the sentinel too
            node_a.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            with anyio.fail_after(5):
                while node_b.execute_command("PUBSUB", "NUMSUB", "news")[1] != 1:
                    await anyio.sleep(0.02)
            await transport.execute("PUBLISH", "news", "hello")
            with anyio.fail_after(5):
                while not got:
                    await anyio.sleep(0.02)
            assert got == [b"hello"]
        finally:
            await transport.aclose()


def raw(port: int, password: str | None = None) -> Any:
    import redis

    return redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=5)


# ------------------------------------------------------------ a real failover


@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_failover_under_load(runtime: str) -> None:
    """Two instances on one sentinel URL; the master is SIGKILLed mid-traffic.

    Every request gets an answer (a result or an error payload), service
    resumes on the promoted replica, writes made afterwards are on it, and
    room broadcasts cross instances again.
    """
    with SentinelSetup(sentinels=1, password="m-pw", sentinel_password="s-pw") as setup:
        url = setup.url_for(dead_sentinel_first=True)

        def store() -> Any:
            return store_class(runtime)(
                url, command_timeout=0.5, connect_timeout=0.5, heartbeat_interval=0.2
            )

        a = ServerThread(runtime, demo_app, storage=store, **QUIET)
        b = ServerThread(runtime, demo_app, storage=store, **QUIET)
        with a, b:

            async def scenario() -> None:
                ca = await WSClient.connect(a.port)
                cb = await WSClient.connect(b.port)
                for c in (ca, cb):
                    assert (await c.request("mesh/join-room", {"roomName": "lobby"}))["success"]
                assert await broadcast_reaches(ca, cb, "before")
                old = setup.master_port()
                answers: list[Any] = []
                failed_over = anyio.Event()
                promoted: list[int] = []

                async def fail_over() -> None:
                    await anyio.sleep(0.3)
                    # what was written before (room joins) must survive the failover;
                    # the load's latest writes may be lost (replication is asynchronous)
                    await anyio.to_thread.run_sync(setup.wait_until_replicated)
                    await anyio.to_thread.run_sync(setup.kill_master)
                    promoted.append(await anyio.to_thread.run_sync(setup.wait_for_new_master, old))
                    failed_over.set()

                async def load(client: WSClient, name: str) -> None:
                    i = 0
                    while not failed_over.is_set():
                        i += 1
                        answers.append(
                            await client.request(
                                "mesh/set-my-connection-metadata",
                                {"metadata": {name: i}, "options": {"strategy": "merge"}},
                                timeout=10,
                            )
                        )
                        answers.append(
                            await client.request(
                                "broadcast-room",
                                {"roomName": "lobby", "event": "load", "data": i},
                                timeout=10,
                            )
                        )
                        await anyio.sleep(0.02)

                started = time.monotonic()
                with anyio.fail_after(30):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(fail_over)
                        tg.start_soon(load, ca, "a")
                        tg.start_soon(load, cb, "b")
                # every request was answered: a result or an error payload
                assert answers
                errors = [x for x in answers if isinstance(x, dict) and "error" in x]
                odd = [x for x in answers if x not in errors and x != {"success": True}]
                assert not odd, odd
                assert [e for e in errors if e["code"] != "EUNAVAILABLE"] == []
                assert errors, "a master was killed under load and no request noticed"

                # service resumes on the new master within a bounded time
                async def healthy(client: WSClient, value: str) -> bool:
                    answer = await client.request(
                        "mesh/set-my-connection-metadata",
                        {"metadata": {"after": value}, "options": {"strategy": "merge"}},
                        timeout=10,
                    )
                    return bool(answer == {"success": True})

                with anyio.fail_after(15):
                    while not (await healthy(ca, "A") and await healthy(cb, "B")):
                        await anyio.sleep(0.1)
                recovered = time.monotonic() - started
                assert recovered < 20
                new = promoted[0]
                assert new != old
                # writes made after the failover are on the new master, and readable
                seen = await cb.request(
                    "mesh/get-connection-metadata", {"connectionId": ca.connection_id}
                )
                assert seen["metadata"]["after"] == "A"
                stored = raw(new, "m-pw").hget("mesh:connection-meta", ca.connection_id)
                assert stored is not None and b'"after":"A"' in stored
                # cross-instance pub/sub works again, both ways
                with anyio.fail_after(10):
                    while not await broadcast_reaches(ca, cb, "after-a", wait=0.5):
                        pass
                    while not await broadcast_reaches(cb, ca, "after-b", wait=0.5):
                        pass
                await ca.close()
                await cb.close()

            anyio.run(scenario)


async def broadcast_reaches(
    sender: WSClient, receiver: WSClient, event: str, wait: float = 5.0
) -> bool:
    """Room broadcast from ``sender``'s instance; True if ``receiver`` (elsewhere) got it."""
    answer = await sender.request(
        "broadcast-room", {"roomName": "lobby", "event": event, "data": 1}, timeout=10
    )
    if answer != {"success": True}:
        return False
    try:
        await receiver.wait_push(event, timeout=wait)
    except TimeoutError:
        return False
    return True


# ------------------------------------------------- a forced failover, followed at once


class _SwitchLog(logging.Handler):
    """When the transport (by its own log) learnt that the master moved."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.at: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if " is now " in message:
            self.at.append((time.monotonic(), message))


def living_tasks(backend: str) -> int:
    if backend == "trio":
        import trio

        return trio.lowlevel.current_statistics().tasks_living
    import asyncio

    return len(asyncio.all_tasks())


@pytest.mark.anyio
async def test_forced_failover_is_followed_at_once(anyio_backend: str) -> None:
    """``SENTINEL FAILOVER`` under a steady stream of writes.

    Sentinel leaves the old master writable for ~10 s after the switch; a
    transport that waited for it to answer ``READONLY`` would keep writing
    there, and lose those writes. Each write appends a unique number, so the
    new master's list says exactly which acknowledged writes it lost. Writes
    sent between the promotion and the announcement still reach the old
    master (nobody can know yet); none sent after the transport learnt of the
    switch may, and it must learn within moments of the sentinel announcing it.
    The pub/sub subscription must be on the new master as soon.
    """
    logger = logging.getLogger(f"mesh_{anyio_backend}.redis")
    switch_log = _SwitchLog()
    level = logger.level
    logger.addHandler(switch_log)
    logger.setLevel(logging.INFO)
    tasks_before = living_tasks(anyio_backend)
    with contextlib.ExitStack() as stack:
        stack.callback(logger.removeHandler, switch_log)
        stack.callback(logger.setLevel, level)
        setup = stack.enter_context(SentinelSetup(sentinels=1, password="m-pw"))
        watcher = stack.enter_context(SwitchWatcher(setup.sentinels[0]))
        # the listener must move on from a dead sentinel to the live one
        transport = transport_class(anyio_backend)(
            setup.url_for(dead_sentinel_first=True),
            command_timeout=1.0,
            connect_timeout=1.0,
            reconnect_backoff=(0.01, 0.1),
        )
        try:
            got: list[bytes] = []
            await transport.subscribe("news", got.append)
            with anyio.fail_after(5):  # the watcher and the transport
                while setup.sentinels[0].subscribers() < 2:
                    await anyio.sleep(0.02)
            old = setup.master_port()
            writes: list[tuple[int, float, bool]] = []  # (number, sent at, acknowledged)
            numbers = iter(range(1_000_000))
            stop = anyio.Event()

            async def writer() -> None:
                while not stop.is_set():
                    n, sent = next(numbers), time.monotonic()
                    try:
                        await transport.execute("RPUSH", "log", n)
                    except RedisUnavailable:
                        writes.append((n, sent, False))
                    else:
                        writes.append((n, sent, True))
                    await anyio.sleep(0.002)

            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(writer)
                await anyio.sleep(0.3)
                await anyio.to_thread.run_sync(
                    lambda: (
                        setup.sentinels[0]
                        .client()
                        .execute_command("SENTINEL", "FAILOVER", setup.service)
                    )
                )
                announced, message = await anyio.to_thread.run_sync(watcher.wait, 15)
                new = setup.master_port()
                assert new != old and message.split()[-1] == str(new).encode()
                # the subscription moves to the new master at once
                node = raw(new, "m-pw")
                pubsub_moved: float | None = None
                with anyio.move_on_after(3):
                    while not got:
                        node.publish("news", "on the new master")
                        await anyio.sleep(0.05)
                    pubsub_moved = time.monotonic() - announced
                await anyio.sleep(1.0)  # writes go on, on the new master
                stop.set()

            present = {int(x) for x in node.lrange("log", 0, -1)}
            acked = [(n, sent) for n, sent, ok in writes if ok]
            # acknowledged, yet not on the new master: written to the old one
            lost = [(n, round(sent - announced, 3)) for n, sent in acked if n not in present]
            # Only writes sent before the announcement may be lost (the margin
            # covers the announcement's trip to the transport, not the ~10 s
            # Sentinel takes to demote the old master).
            assert [x for x in lost if x[1] > 0.25] == [], lost
            assert pubsub_moved is not None and pubsub_moved < 2.0, pubsub_moved
            assert got[0] == b"on the new master"
            # Exactly: nothing sent after the transport learnt of the switch was lost.
            new_label = f"127.0.0.1:{new} "
            switches = [at for at, msg in switch_log.at if new_label in msg]
            assert switches, switch_log.at
            switched = switches[0]
            assert switched - announced < 0.25, switched - announced  # (or found earlier)
            assert [n for n, sent in acked if n not in present and sent > switched] == []
            assert any(sent > switched + 0.5 for _, sent in acked), "writes did not resume"
            assert present <= {n for n, _, _ in writes}
        finally:
            await transport.aclose()
    assert living_tasks(anyio_backend) == tasks_before


@pytest.mark.anyio
async def test_announced_switch_leaves_the_old_master_at_once(anyio_backend: str) -> None:
    """An announced switch moves everything off a master that still accepts writes.

    Stand-in sentinels: the one the listener subscribes to first dies (it
    must move on to the next), and the other announces the switch but goes on
    naming the old master, as a sentinel that has not heard of the failover
    yet would; the announcement must win. The nodes are real, and the old one
    stays a writable master throughout, as Sentinel leaves it for seconds.
    """
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(RedisServer(extra_args=FAST_REPLICATION))
        b = stack.enter_context(
            RedisServer(extra_args=[*FAST_REPLICATION, "--replicaof", "127.0.0.1", str(a.port)])
        )
        first = stack.enter_context(FakeSentinel("svc", a.port))
        second = stack.enter_context(FakeSentinel("svc", a.port))
        transport = transport_class(anyio_backend)(
            f"redis+sentinel://127.0.0.1:{first.port},127.0.0.1:{second.port}/svc",
            command_timeout=1.0,
            connect_timeout=1.0,
            reconnect_backoff=(0.01, 0.1),
        )
        node_a, node_b = raw(a.port), raw(b.port)
        try:
            got: list[bytes] = []
            await transport.subscribe("news", got.append)
            assert await transport.execute("SET", "k", "on-a") == b"OK"
            with anyio.fail_after(5):
                while first.subscribers != 1:
                    await anyio.sleep(0.01)
            first.close()
            with anyio.fail_after(5):
                while second.subscribers != 1:
                    await anyio.sleep(0.01)
            node_b.execute_command("REPLICAOF", "NO", "ONE")
            second.switch_master(b.port, rename=False)
            # the pub/sub connection moves at once
            with anyio.fail_after(3):
                while node_b.execute_command("PUBSUB", "NUMSUB", "news")[1] != 1:
                    await anyio.sleep(0.01)
            assert node_a.execute_command("PUBSUB", "NUMSUB", "news")[1] == 0
            node_b.publish("news", "on b")
            with anyio.fail_after(3):
                while not got:
                    await anyio.sleep(0.01)
            assert got == [b"on b"]
            # and from now on, nothing reaches a: every command goes to b
            for i in range(20):
                assert await transport.execute("SET", f"after{i}", i) == b"OK"
            assert node_a.keys("after*") == []
            assert len(node_b.keys("after*")) == 20
            assert node_a.get("k") == b"on-a" and node_a.execute_command("ROLE")[0] == b"master"
        finally:
            await transport.aclose()
