"""Many instances, one shared state: asyncio and trio servers on one real
redis-server (started here, on a free port), each with its own clients."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import anyio
import pytest

from examples.demo import app as demo_app
from tests.helpers.redis_server import RedisServer
from tests.helpers.server_process import ROOT, free_port, start_server
from tests.helpers.server_thread import ServerThread
from tests.helpers.wsclient import WSClient

QUIET = {"ping_interval": 0, "latency_interval": 0}


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def redis_store(runtime: str, url: str, **options: Any) -> Callable[[], Any]:
    def make() -> Any:
        if runtime == "trio":
            from mesh_trio import RedisStore
        else:
            from mesh_asyncio import RedisStore  # type: ignore[assignment]
        return RedisStore(url, **options)

    return make


def raw(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url)


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def two_instances(
    redis_server: RedisServer, **store_options: Any
) -> tuple[ServerThread, ServerThread]:
    a = ServerThread(
        "asyncio",
        demo_app,
        storage=redis_store("asyncio", redis_server.url, **store_options),
        **QUIET,
    )
    b = ServerThread(
        "trio", demo_app, storage=redis_store("trio", redis_server.url, **store_options), **QUIET
    )
    return a, b


def test_two_runtimes_share_rooms_metadata_and_broadcasts(redis_server: RedisServer) -> None:
    a, b = two_instances(redis_server)
    with a, b:

        async def scenario() -> None:
            ca = await WSClient.connect(a.port)
            cb = await WSClient.connect(b.port)
            # metadata written on one instance, read on the other (by id)
            await ca.request(
                "mesh/set-my-connection-metadata",
                {"metadata": {"name": "A"}, "options": {"strategy": "merge"}},
            )
            seen = await cb.request(
                "mesh/get-connection-metadata", {"connectionId": ca.connection_id}
            )
            assert seen["metadata"]["name"] == "A" and "connectedAt" in seen["metadata"]
            assert (
                b.call(lambda: b.server.connections.get_metadata(ca.connection_id))
                == seen["metadata"]
            )
            # a room's present list spans both instances
            await cb.request("create-room", {"roomName": "lobby", "type": "public", "maxUsers": 9})
            await ca.request("mesh/join-room", {"roomName": "lobby"})
            joined = await cb.request("mesh/join-room", {"roomName": "lobby"})
            assert sorted(p["id"] for p in joined["present"]) == sorted(
                [ca.connection_id, cb.connection_id]
            )
            assert (await ca.request("mesh/get-room-metadata", {"roomName": "lobby"}))["metadata"][
                "memberCount"
            ] == 2
            # room broadcasts reach members on both instances, from either side
            await ca.request(
                "broadcast-room", {"roomName": "lobby", "event": "chat", "data": {"from": "a"}}
            )
            assert (await ca.wait_push("chat"))["payload"] == {"from": "a"}
            assert (await cb.wait_push("chat"))["payload"] == {"from": "a"}
            b.call(lambda: b.server.broadcast("hello", 1))
            assert (await ca.wait_push("hello"))["payload"] == 1
            a.call(lambda: a.server.broadcast_room_exclude("lobby", "ex", 2, [ca.connection_id]))
            assert (await cb.wait_push("ex"))["payload"] == 2
            # listings are complete from either side
            for server in (a, b):
                api = server.server
                rows = server.call(api.connections.get_all_metadata)
                assert sorted(r["id"] for r in rows) == sorted([ca.connection_id, cb.connection_id])
                assert server.call(api.rooms.get_all_rooms) == ["lobby"]
                in_room = server.call(partial(api.connections.get_all_metadata_for_room, "lobby"))
                assert len(in_room) == 2
            # a disconnect on one instance is cleaned up for the other
            await cb.close()

            def cleaned() -> bool:
                members = a.call(lambda: a.server.rooms.get_room_members("lobby"))
                meta = a.call(lambda: a.server.connections.get_metadata(cb.connection_id))
                return members == [ca.connection_id] and meta is None

            await anyio.to_thread.run_sync(wait_until, cleaned)
            lobby = a.call(lambda: a.server.rooms.get_metadata("lobby"))
            assert lobby["memberCount"] == 1
            await ca.close()

        anyio.run(scenario)


@pytest.mark.parametrize("strategy", ["merge", "deepMerge"])
def test_concurrent_merges_from_two_instances_lose_nothing(
    redis_server: RedisServer, strategy: str
) -> None:
    a, b = two_instances(redis_server)
    with a, b:

        async def scenario() -> None:
            client = await WSClient.connect(a.port)
            cid = client.connection_id

            def value(prefix: str, i: int) -> Any:
                entry = {f"{prefix}{i}": i}
                return {"nested": entry} if strategy == "deepMerge" else entry

            def burst(server: ServerThread, prefix: str) -> None:
                async def many() -> None:
                    rooms, connections = server.server.rooms, server.server.connections
                    async with anyio.create_task_group() as tg:
                        for i in range(50):
                            update = value(prefix, i)
                            tg.start_soon(
                                partial(rooms.set_metadata, "shared", update, strategy=strategy)
                            )
                            tg.start_soon(
                                partial(connections.set_metadata, cid, update, strategy=strategy)
                            )

                server.call(many)

            def both() -> None:
                with ThreadPoolExecutor(2) as pool:
                    list(pool.map(lambda args: burst(*args), [(a, "a"), (b, "b")]))

            await anyio.to_thread.run_sync(both)
            expected = {f"{p}{i}": i for p in "ab" for i in range(50)}
            room = a.call(lambda: a.server.rooms.get_metadata("shared"))
            conn = b.call(lambda: b.server.connections.get_metadata(cid))
            if strategy == "deepMerge":
                assert room == {"nested": expected}
                assert conn["nested"] == expected and "connectedAt" in conn
            else:
                assert room == expected
                assert {k: v for k, v in conn.items() if k != "connectedAt"} == expected
            await client.close()

        anyio.run(scenario)


def test_raw_keys_match_the_shared_layout(redis_server: RedisServer) -> None:
    a = ServerThread("trio", demo_app, storage=redis_store("trio", redis_server.url), **QUIET)
    with a:
        r = raw(redis_server.url)
        instance = a.server.instance_id.encode()

        async def scenario() -> None:
            c = await WSClient.connect(a.port)
            await c.request(
                "mesh/set-my-connection-metadata", {"metadata": {"x": [], "y": {}, "z": 1.5}}
            )
            await c.request("mesh/join-room", {"roomName": "lobby"})
            await c.request("create-room", {"roomName": "lobby", "type": "public", "maxUsers": 3})
            cid = c.connection_id.encode()
            assert r.hget("mesh:connections", cid) == instance
            assert r.smembers(b"mesh:connections:" + instance) == {cid}
            assert r.hget("mesh:connection-meta", cid) == b'{"x":[],"y":{},"z":1.5}'
            assert r.smembers("mesh:room:lobby") == {cid}
            assert r.smembers(b"mesh:connection:" + cid + b":rooms") == {b"lobby"}
            assert r.type("mesh:roommeta:lobby") == b"hash"
            stored = r.hget("mesh:roommeta:lobby", "data")
            assert stored.startswith(b'{"name":"lobby","type":"public","maxUsers":3,')
            assert instance in r.smembers("mesh:instances")
            beat = r.get(b"mesh:instance:" + instance + b":heartbeat")
            assert beat is not None and abs(int(beat) - time.time() * 1000) < 60_000
            assert 0 < r.ttl(b"mesh:instance:" + instance + b":heartbeat") <= 120
            await c.close()
            await anyio.to_thread.run_sync(wait_until, lambda: r.hlen("mesh:connections") == 0)

        anyio.run(scenario)
    # a clean shutdown leaves nothing of the instance behind
    assert r.smembers("mesh:instances") == set()
    assert r.exists(b"mesh:instance:" + instance + b":heartbeat") == 0


@pytest.mark.parametrize("survivor_runtime", ["asyncio", "trio"])
def test_killed_instance_is_swept_by_the_survivor(
    redis_server: RedisServer, survivor_runtime: str
) -> None:
    port = free_port()
    doomed = start_server(
        "asyncio", port, "--redis", redis_server.url, "--ping-interval", "0",
        "--latency-interval", "0", "--redis-heartbeat-interval", "0.3",
        "--redis-heartbeat-ttl", "1",
    )  # fmt: skip
    store = redis_store(
        survivor_runtime,
        redis_server.url,
        heartbeat_interval=0.2,
        heartbeat_ttl=1,
        sweep_interval=0.3,
    )
    survivor = ServerThread(survivor_runtime, demo_app, storage=store, **QUIET)
    try:
        with survivor:

            async def scenario() -> None:
                victim = await WSClient.connect(port)
                stays = await WSClient.connect(survivor.port)
                await victim.request("mesh/join-room", {"roomName": "lobby"})
                await stays.request("mesh/join-room", {"roomName": "lobby"})
                await anyio.to_thread.run_sync(
                    after_kill, victim.connection_id, stays.connection_id
                )
                await stays.close()
                await victim.abort()

            def after_kill(victim_id: str, stays_id: str) -> None:
                members = survivor.call(lambda: survivor.server.rooms.get_room_members("lobby"))
                assert sorted(members) == sorted([victim_id, stays_id])
                os.kill(doomed.pid, signal.SIGKILL)  # no clean shutdown
                doomed.wait(10)

                def swept() -> bool:
                    members = survivor.call(lambda: survivor.server.rooms.get_room_members("lobby"))
                    meta = survivor.call(
                        lambda: survivor.server.connections.get_metadata(victim_id)
                    )
                    return members == [stays_id] and meta is None

                wait_until(swept, timeout=15)
                r = raw(redis_server.url)
                assert r.hkeys("mesh:connections") == [stays_id.encode()]
                assert r.smembers("mesh:instances") == {survivor.server.instance_id.encode()}

            anyio.run(scenario)
    finally:
        if doomed.poll() is None:
            doomed.kill()


@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_redis_outage_every_request_answered_then_recovery(
    redis_server: RedisServer, runtime: str
) -> None:
    store = redis_store(
        runtime, redis_server.url, command_timeout=0.5, connect_timeout=0.5, heartbeat_interval=0.2
    )
    server = ServerThread(runtime, demo_app, storage=store, **QUIET)
    with server:

        async def scenario() -> None:
            c = await WSClient.connect(server.port)
            gone = await WSClient.connect(server.port)
            await c.request("mesh/join-room", {"roomName": "lobby"})
            assert (await c.request("mesh/get-my-connection-metadata"))["metadata"] is not None
            await anyio.to_thread.run_sync(redis_server.stop)
            started = time.monotonic()
            answers = []
            for command, payload in [
                ("mesh/get-my-connection-metadata", {}),
                ("mesh/join-room", {"roomName": "other"}),
                ("update-user-status", {"status": "away"}),
                ("mesh/noop", {}),
            ] * 3:
                answers.append(await c.request(command, payload, timeout=10))
            assert time.monotonic() - started < 10
            errors = [a for a in answers if isinstance(a, dict) and "error" in a]
            assert errors and all(e["code"] == "EUNAVAILABLE" for e in errors)
            assert answers[3] is True  # what needs no Redis still works
            await gone.close()  # its cleanup cannot reach Redis now: retried later
            assert c.closed is None  # the server kept its sockets
            await anyio.to_thread.run_sync(redis_server.start)

            async def healthy() -> bool:
                answer = await c.request("mesh/get-my-connection-metadata", timeout=10)
                return isinstance(answer, dict) and answer.get("metadata") is not None

            with anyio.fail_after(15):
                while not await healthy():
                    await anyio.sleep(0.1)
            assert (await c.request("update-user-status", {"status": "back"})) == {"success": True}
            joined = await c.request("mesh/join-room", {"roomName": "lobby"})
            assert [p["id"] for p in joined["present"]] == [c.connection_id]
            r = raw(redis_server.url)
            assert r.hkeys("mesh:connections") == [
                c.connection_id.encode()
            ]  # no stale registration
            assert r.smembers("mesh:instances") == {server.server.instance_id.encode()}
            await c.close()

        anyio.run(scenario)


def test_workers_need_redis() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mesh_core.cli", "serve", "examples.demo:app", "--workers", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0 and "--workers above 1 needs --redis" in proc.stderr


@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_workers_share_one_port_and_one_state(redis_server: RedisServer, runtime: str) -> None:
    port = free_port()
    cmd = [
        sys.executable, "-m", "mesh_core.cli", "serve", "examples.demo:app", "--port", str(port),
        "--runtime", runtime, "--redis", redis_server.url, "--workers", "2",
        "--ping-interval", "0", "--latency-interval", "0",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        r = raw(redis_server.url)
        wait_until(lambda: r.scard("mesh:instances") == 2, timeout=30)

        async def scenario() -> None:
            clients = [await WSClient.connect(port) for _ in range(16)]
            for c in clients:
                await c.request("mesh/join-room", {"roomName": "lobby"})
            present = (await clients[0].request("mesh/join-room", {"roomName": "lobby"}))["present"]
            assert sorted(p["id"] for p in present) == sorted(c.connection_id for c in clients)
            # the kernel spread the connections over both workers
            owners = {r.hget("mesh:connections", c.connection_id) for c in clients}
            assert len(owners) == 2
            await clients[-1].request(
                "broadcast-room", {"roomName": "lobby", "event": "hi", "data": 1}
            )
            for c in clients:
                assert (await c.wait_push("hi"))["payload"] == 1
            for c in clients:
                await c.close()

        anyio.run(scenario)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert r.scard("mesh:instances") == 0 and r.hlen("mesh:connections") == 0
    finally:
        if proc.poll() is None:
            proc.kill()
