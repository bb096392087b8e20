"""Presence on a real redis-server: two instances (asyncio + trio) on one
Redis, a reference-layout writer beside ours, the shared key layout, expiry
on the holder's timers, a SIGKILLed instance's leaves from the sweep, and a
member whose entry vanished coming back at its next pong."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from examples.demo import app as demo_app
from mesh_core import MeshApp
from tests.helpers.redis_server import RedisServer
from tests.helpers.server_process import free_port, start_server
from tests.helpers.server_thread import ServerThread
from tests.helpers.wsclient import WSClient
from tests.redis.test_instances import raw, redis_store

QUIET: dict[str, Any] = {"ping_interval": 0, "latency_interval": 0}
UPDATE = "mesh/presence-update"


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def presence_app() -> MeshApp:
    app = MeshApp()
    app.track_presence(re.compile(r"^p:"))
    app.track_presence(re.compile(r"^pt:"), ttl=2000)
    return app


def instance(runtime: str, url: str, app: MeshApp | None = None, **options: Any) -> ServerThread:
    return ServerThread(
        runtime, app or presence_app(), storage=redis_store(runtime, url), **{**QUIET, **options}
    )


def updates(client: WSClient) -> list[dict[str, Any]]:
    found = [p["payload"] for p in client.pushes if p.get("command") == UPDATE]
    client.pushes[:] = [p for p in client.pushes if p.get("command") != UPDATE]
    return found


async def settle(*clients: WSClient, seconds: float = 0.4) -> None:
    """Read on every client for a while: late duplicates arrive by then."""
    async with anyio.create_task_group() as tg:
        for c in clients:

            async def read(c: WSClient = c) -> None:
                with anyio.move_on_after(seconds):
                    while True:
                        await c._read_once()

            tg.start_soon(read)


async def collect(client: WSClient, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    await client.wait_for(
        lambda: sum(p.get("command") == UPDATE for p in client.pushes) >= count, timeout
    )
    return updates(client)


@asynccontextmanager
async def reading(*clients: WSClient) -> AsyncIterator[None]:
    """Keep these clients reading (and so answering pings) in the background."""
    async with anyio.create_task_group() as tg:
        for c in clients:

            async def read(c: WSClient = c) -> None:
                while c.closed is None:
                    await c._read_once()

            tg.start_soon(read)
        yield
        tg.cancel_scope.cancel()


def test_two_runtimes_each_change_reaches_each_subscriber_once(
    redis_server: RedisServer,
) -> None:
    a, b = instance("asyncio", redis_server.url), instance("trio", redis_server.url)
    with a, b:
        r = raw(redis_server.url)

        async def scenario() -> None:
            wa = await WSClient.connect(a.port)
            wb = await WSClient.connect(b.port)
            member = await WSClient.connect(b.port)
            for w in (wa, wb):
                sub = await w.request("mesh/subscribe-presence", {"roomName": "p:1"})
                assert sub == {"success": True, "present": [], "states": {}}
            await member.request("mesh/join-room", {"roomName": "p:1"})
            await member.request("mesh/join-room", {"roomName": "p:1"})
            cid = member.connection_id
            # the reference's layout, byte for byte
            assert r.smembers("mesh:presence:room:p:1") == {cid.encode()}
            assert r.get(f"mesh:presence:room:p:1:conn:{cid}") == b""
            assert r.ttl(f"mesh:presence:room:p:1:conn:{cid}") == -1  # no TTL
            await member.request(
                "mesh/publish-presence-state",
                {"roomName": "p:1", "state": {"typing": True}, "expireAfter": 60_000},
            )
            assert r.get(f"mesh:presence:state:p:1:conn:{cid}") == b'{"typing":true}'
            assert 0 < r.pttl(f"mesh:presence:state:p:1:conn:{cid}") <= 60_000
            seen = await wa.request("mesh/subscribe-presence", {"roomName": "p:1"})
            assert seen["present"][0]["id"] == cid
            assert seen["states"] == {cid: {"typing": True}}
            await member.request("mesh/clear-presence-state", {"roomName": "p:1"})
            assert r.exists(f"mesh:presence:state:p:1:conn:{cid}") == 0
            await member.request("mesh/leave-room", {"roomName": "p:1"})
            for w in (wa, wb):
                got = await collect(w, 4)
                assert [(u["type"], u.get("state")) for u in got] == [
                    ("join", None),
                    ("state", {"typing": True}),
                    ("state", None),
                    ("leave", None),
                ]
            await settle(wa, wb)
            assert updates(wa) == [] and updates(wb) == []
            assert r.exists("mesh:presence:room:p:1", f"mesh:presence:room:p:1:conn:{cid}") == 0
            # an abrupt disconnect on one instance: one leave on both
            await member.request("mesh/join-room", {"roomName": "p:1"})
            await member.abort()
            for w in (wa, wb):
                got = await collect(w, 2)
                assert [u["type"] for u in got] == ["join", "leave"]
            await settle(wa, wb)
            assert updates(wa) == [] and updates(wb) == []
            await wa.close()
            await wb.close()

        anyio.run(scenario)


def test_a_ttl_room_keeps_the_reference_expiry_on_its_keys(redis_server: RedisServer) -> None:
    a = instance("trio", redis_server.url, ping_interval=0.3, max_missed_pongs=50)
    with a:
        r = raw(redis_server.url)

        async def scenario() -> None:
            member = await WSClient.connect(a.port)
            await member.request("mesh/join-room", {"roomName": "pt:1"})
            key = f"mesh:presence:room:pt:1:conn:{member.connection_id}"
            assert r.get(key) == b"" and 0 < r.ttl(key) <= 2
            async with reading(member):
                await anyio.sleep(2.5)  # pongs refresh it past the TTL
                assert r.exists(key) == 1 and 0 < r.ttl(key) <= 2
                assert r.smembers("mesh:presence:room:pt:1") == {member.connection_id.encode()}
            await member.close()

        anyio.run(scenario)


def test_a_reference_layout_writer_beside_ours(redis_server: RedisServer) -> None:
    """Raw commands the way the reference's presence manager writes: our
    subscribers on both runtimes see each of its events once, and our reads
    see its members and states."""
    a, b = instance("asyncio", redis_server.url), instance("trio", redis_server.url)
    with a, b:
        r = raw(redis_server.url)

        def reference_publish(kind: str, cid: str, **extra: Any) -> None:
            message = {"type": kind, "connectionId": cid, "roomName": "p:ref", **extra}
            message["timestamp"] = int(time.time() * 1000)
            r.publish("mesh:presence:updates:p:ref", json.dumps(message))

        async def scenario() -> None:
            wa = await WSClient.connect(a.port)
            wb = await WSClient.connect(b.port)
            for w in (wa, wb):
                await w.request("mesh/subscribe-presence", {"roomName": "p:ref"})
            # markOnline: SADD + SET "" (no TTL), then PUBLISH the join
            pipe = r.pipeline()
            pipe.sadd("mesh:presence:room:p:ref", "ref-conn-1")
            pipe.set("mesh:presence:room:p:ref:conn:ref-conn-1", "")
            pipe.execute()
            reference_publish("join", "ref-conn-1")
            # publishPresenceState: SET JSON, then PUBLISH the state
            r.set("mesh:presence:state:p:ref:conn:ref-conn-1", json.dumps({"cursor": [1, 2]}))
            reference_publish("state", "ref-conn-1", state={"cursor": [1, 2]})
            for w in (wa, wb):
                got = await collect(w, 2)
                assert [(u["type"], u["connectionId"]) for u in got] == [
                    ("join", "ref-conn-1"),
                    ("state", "ref-conn-1"),
                ]
                assert got[1]["state"] == {"cursor": [1, 2]}
            got = await wa.request("mesh/get-presence-state", {"roomName": "p:ref"})
            assert got == {
                "success": True,
                "present": ["ref-conn-1"],
                "states": {"ref-conn-1": {"cursor": [1, 2]}},
            }
            assert b.call(lambda: b.server.presence.get_states("p:ref")) == {
                "ref-conn-1": {"cursor": [1, 2]}
            }
            # our member's join reaches a reference subscriber as the reference
            # would publish it (same channel, same JSON)
            pubsub = r.pubsub()
            pubsub.subscribe("mesh:presence:updates:p:ref")
            pubsub.get_message(timeout=1)  # the subscribe confirmation
            ours = await WSClient.connect(a.port)
            await ours.request("mesh/join-room", {"roomName": "p:ref"})
            message = pubsub.get_message(timeout=5)
            assert message is not None and message["type"] == "message"
            payload = json.loads(message["data"])
            assert list(payload) == ["type", "connectionId", "roomName", "timestamp"]
            assert payload["type"] == "join" and payload["connectionId"] == ours.connection_id
            assert sorted(r.smembers("mesh:presence:room:p:ref")) == sorted(
                [b"ref-conn-1", ours.connection_id.encode()]
            )
            pubsub.close()
            for w in (wa, wb):
                assert [u["type"] for u in await collect(w, 1)] == ["join"]
            await settle(wa, wb)
            assert updates(wa) == [] and updates(wb) == []
            for c in (wa, wb, ours):
                await c.close()

        anyio.run(scenario)


def test_expiry_and_ttl_send_one_event_with_two_instances(redis_server: RedisServer) -> None:
    opts: dict[str, Any] = {"ping_interval": 0.5, "max_missed_pongs": 8, "latency_interval": 0}
    a = instance("asyncio", redis_server.url, **opts)
    b = instance("trio", redis_server.url, **opts)
    with a, b:

        async def scenario() -> None:
            wa = await WSClient.connect(a.port)
            wb = await WSClient.connect(b.port)
            member = await WSClient.connect(a.port)
            await member.request("mesh/join-room", {"roomName": "pt:1"})
            for w in (wa, wb):
                await w.request("mesh/subscribe-presence", {"roomName": "pt:1"})
            started = time.monotonic()
            await member.request(
                "mesh/publish-presence-state",
                {"roomName": "pt:1", "state": {"t": 1}, "expireAfter": 500},
            )
            async with reading(member):
                for w in (wa, wb):
                    got = await collect(w, 2, timeout=3)
                    assert [u["state"] for u in got] == [{"t": 1}, None]
                assert time.monotonic() - started < 3
                await settle(wa, wb, seconds=0.6)
                assert updates(wa) == [] and updates(wb) == []
            # the member stops answering pings: one leave on each subscriber,
            # from the TTL (2 s) and none more when the server drops it (~4 s)
            member.auto_pong = False
            async with reading(member):
                for w in (wa, wb):
                    got = await collect(w, 1, timeout=6)
                    assert [u["type"] for u in got] == ["leave"]
                await settle(wa, wb, seconds=3.0)
                assert updates(wa) == [] and updates(wb) == []
            assert member.closed is not None
            await wa.close()
            await wb.close()

        anyio.run(scenario)


def test_a_vanished_entry_comes_back_at_the_next_pong(redis_server: RedisServer) -> None:
    a = instance("asyncio", redis_server.url, ping_interval=0.3, max_missed_pongs=50)
    with a:
        r = raw(redis_server.url)

        async def scenario() -> None:
            member = await WSClient.connect(a.port)
            watcher = await WSClient.connect(a.port)
            await member.request("mesh/join-room", {"roomName": "p:v"})
            await watcher.request("mesh/subscribe-presence", {"roomName": "p:v"})
            r.flushall()  # Redis restarted empty, as far as presence can tell
            async with reading(member):
                got = await collect(watcher, 1, timeout=3)
                assert got[0]["type"] == "join" and got[0]["connectionId"] == member.connection_id
                assert r.smembers("mesh:presence:room:p:v") == {member.connection_id.encode()}
                await settle(watcher, seconds=1.0)  # later pongs: present, no event
                assert updates(watcher) == []
            await member.close()
            await watcher.close()

        anyio.run(scenario)


def test_a_killed_instances_members_leave_when_the_sweep_runs(redis_server: RedisServer) -> None:
    doomed_port, survivor_port = free_port(), free_port()
    common = ["--redis", redis_server.url, "--ping-interval", "0", "--latency-interval", "0",
              "--redis-heartbeat-interval", "0.3", "--redis-heartbeat-ttl", "1"]  # fmt: skip
    doomed = start_server("asyncio", doomed_port, *common)
    survivor = start_server("trio", survivor_port, *common, "--redis-sweep-interval", "0.3")
    try:

        async def scenario() -> None:
            victim = await WSClient.connect(doomed_port)
            stays = await WSClient.connect(doomed_port)
            watcher = await WSClient.connect(survivor_port)
            await watcher.request("mesh/subscribe-presence", {"roomName": "p:crash"})
            for c in (victim, stays):
                await c.request("mesh/join-room", {"roomName": "p:crash"})
                await c.request("mesh/join-room", {"roomName": "p:other"})
            assert [u["type"] for u in await collect(watcher, 2)] == ["join", "join"]
            os.kill(doomed.pid, signal.SIGKILL)  # no clean shutdown
            doomed.wait(10)
            started = time.monotonic()
            got = await collect(watcher, 2, timeout=10)
            assert {(u["type"], u["connectionId"]) for u in got} == {
                ("leave", victim.connection_id),
                ("leave", stays.connection_id),
            }
            assert time.monotonic() - started < 8
            await settle(watcher, seconds=1.0)  # the sweep runs again: nothing more
            assert updates(watcher) == []
            r = raw(redis_server.url)
            assert r.exists("mesh:presence:room:p:crash", "mesh:presence:room:p:other") == 0
            assert (await watcher.request("mesh/get-presence-state", {"roomName": "p:crash"}))[
                "present"
            ] == []
            await watcher.close()
            await victim.abort()
            await stays.abort()

        anyio.run(scenario)
    finally:
        for proc in (doomed, survivor):
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_demo_presence_on_redis(redis_server: RedisServer, runtime: str) -> None:
    a = ServerThread(runtime, demo_app, storage=redis_store(runtime, redis_server.url), **QUIET)
    with a:

        async def scenario() -> None:
            member = await WSClient.connect(a.port)
            watcher = await WSClient.connect(a.port)
            await watcher.request("mesh/subscribe-presence", {"roomName": "p:demo"})
            await member.request("mesh/join-room", {"roomName": "p:demo"})
            ok = await member.request(
                "mesh/publish-presence-state", {"roomName": "p:demo", "state": {"x": 1}}
            )
            assert ok is True
            assert [u["type"] for u in await collect(watcher, 2)] == ["join", "state"]
            assert a.call(lambda: a.server.presence.get_present("p:demo")) == [member.connection_id]
            await member.close()
            assert [u["type"] for u in await collect(watcher, 1)] == ["leave"]
            await watcher.close()

        anyio.run(scenario)


def test_on_a_redis_cluster_each_change_reaches_each_subscriber_once() -> None:
    """The presence keys of a room, its channel and the room registry land on
    different nodes: every command routes on its own key, and the updates
    still reach each subscriber once (asyncio + trio instances)."""
    from tests.helpers.redis_cluster import RedisCluster

    with RedisCluster() as cluster:
        a, b = instance("asyncio", cluster.url), instance("trio", cluster.url)
        with a, b:

            async def scenario() -> None:
                wa = await WSClient.connect(a.port)
                wb = await WSClient.connect(b.port)
                member = await WSClient.connect(a.port)
                for w in (wa, wb):
                    await w.request("mesh/subscribe-presence", {"roomName": "p:c"})
                await member.request("mesh/join-room", {"roomName": "p:c"})
                await member.request(
                    "mesh/publish-presence-state",
                    {"roomName": "p:c", "state": {"on": "cluster"}, "expireAfter": 400},
                )
                got = await wb.request("mesh/get-presence-state", {"roomName": "p:c"})
                assert got["present"] == [member.connection_id]
                assert got["states"] == {member.connection_id: {"on": "cluster"}}
                async with reading(member):
                    for w in (wa, wb):
                        updates_ = await collect(w, 3, timeout=5)
                        assert [(u["type"], u.get("state")) for u in updates_] == [
                            ("join", None),
                            ("state", {"on": "cluster"}),
                            ("state", None),
                        ]
                await member.abort()
                for w in (wa, wb):
                    assert [u["type"] for u in await collect(w, 1)] == ["leave"]
                await settle(wa, wb)
                assert updates(wa) == [] and updates(wb) == []
                await wa.close()
                await wb.close()

            anyio.run(scenario)


@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_a_member_gone_during_an_outage_leaves_once_redis_answers(
    redis_server: RedisServer, runtime: str
) -> None:
    """Redis stops answering (SIGSTOP: its data stays), a member goes; its
    cleanup cannot reach Redis. When Redis answers again, the retried
    cleanup takes the member out of the room's present set and sends the
    leave once, instead of leaving it present for good."""
    store = redis_store(
        runtime, redis_server.url, command_timeout=0.3, connect_timeout=0.3, heartbeat_interval=0.3
    )
    a = ServerThread(runtime, presence_app(), storage=store, **QUIET)
    with a:
        r = raw(redis_server.url)
        assert redis_server.proc is not None
        pid = redis_server.proc.pid

        async def scenario() -> None:
            member = await WSClient.connect(a.port)
            watcher = await WSClient.connect(a.port)
            await watcher.request("mesh/subscribe-presence", {"roomName": "p:out"})
            await member.request("mesh/join-room", {"roomName": "p:out"})
            assert [u["type"] for u in await collect(watcher, 1)] == ["join"]
            os.kill(pid, signal.SIGSTOP)
            try:
                await member.abort()
                await anyio.sleep(1.0)  # its cleanup runs and times out meanwhile
            finally:
                os.kill(pid, signal.SIGCONT)
            got = await collect(watcher, 1, timeout=10)
            assert [(u["type"], u["connectionId"]) for u in got] == [
                ("leave", member.connection_id)
            ]
            await settle(watcher, seconds=1.0)  # later heartbeats: nothing more
            assert updates(watcher) == []
            assert r.smembers("mesh:presence:room:p:out") == set()
            await watcher.close()

        anyio.run(scenario)
