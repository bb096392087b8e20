"""Channels across instances on one real redis-server: an asyncio and a trio
instance of examples/demo.py, raw WebSocket subscribers and the Python
client; a reference-layout writer; a Redis outage."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

import mesh_asyncio
from examples.demo import app as demo_app
from mesh_core import CloseCode
from tests.helpers.redis_server import RedisServer
from tests.helpers.server_thread import ServerThread
from tests.helpers.wsclient import WSClient
from tests.redis.test_instances import QUIET, raw, redis_store, two_instances


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def messages(client: WSClient, channel: str) -> list[dict[str, Any]]:
    return [
        p["payload"]
        for p in client.pushes
        if p["command"] == "mesh/subscription-message" and p["payload"]["channel"] == channel
    ]


async def wait_count(client: WSClient, channel: str, count: int, timeout: float = 10.0) -> None:
    await client.wait_for(lambda: len(messages(client, channel)) >= count, timeout)


def numsub(redis_server: RedisServer, channel: str) -> int:
    return int(dict(raw(redis_server.url).pubsub_numsub(channel)).get(channel.encode(), 0))


def test_across_instances_exactly_once_in_order(redis_server: RedisServer) -> None:
    a, b = two_instances(redis_server)
    with a, b:

        async def scenario() -> None:
            on_a = await WSClient.connect(a.port)
            on_b = await WSClient.connect(b.port)
            writer = await WSClient.connect(a.port)
            for client in (on_a, on_b):
                reply = await client.request("mesh/subscribe-channel", {"channel": "chat:x"})
                assert reply["success"] is True
            for i in range(30):
                target = writer if i % 3 else on_b  # from A and from B
                history = 10 if i % 2 else 0
                await target.request(
                    "post", {"channel": "chat:x", "message": f"m{i}", "history": history}
                )
            for client in (on_a, on_b):
                await wait_count(client, "chat:x", 30)
            await anyio.sleep(0.2)
            got_a, got_b = messages(on_a, "chat:x"), messages(on_b, "chat:x")
            assert [m["message"] for m in got_a] == [f"m{i}" for i in range(30)]
            assert got_a == got_b  # the same messages, offsets and all, exactly once
            offsets = [m["offset"] for m in got_a if "offset" in m]
            assert offsets == list(range(1, 16))  # every write with history had one
            # the history is the reference's list, readable from either side
            kept = await on_b.request("mesh/get-channel-history", {"channel": "chat:x"})
            assert kept["history"] == [f"m{i}" for i in range(11, 30, 2)]
            r = raw(redis_server.url)
            assert r.lrange("mesh:history:chat:x", 0, -1) == [
                f"m{i}".encode() for i in range(11, 30, 2)
            ]
            # one Redis subscription per instance for the channel
            assert numsub(redis_server, "chat:x") == 2
            for client in (on_a, on_b):
                assert await client.request("mesh/unsubscribe-channel", {"channel": "chat:x"})
            await anyio.to_thread.run_sync(
                lambda: _wait(lambda: numsub(redis_server, "chat:x") == 0)
            )
            assert numsub(redis_server, "mesh:channel:chat:x") == 0
            for client in (on_a, on_b, writer):
                await client.close()

        anyio.run(scenario)


async def poll(check: Any, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not check():
            await anyio.sleep(0.01)


def _wait(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_a_reference_layout_writer_reaches_ours(redis_server: RedisServer) -> None:
    a, b = two_instances(redis_server)
    with a, b:

        async def scenario() -> None:
            on_a = await WSClient.connect(a.port)
            on_b = await WSClient.connect(b.port)
            await on_a.request("post", {"channel": "chat:ref", "message": "ours", "history": 50})
            for client in (on_a, on_b):
                await client.request("mesh/subscribe-channel", {"channel": "chat:ref"})
            # what a reference instance's writeChannel(channel, msg, 50) does
            r = raw(redis_server.url)
            r.rpush("mesh:history:chat:ref", "theirs")
            r.ltrim("mesh:history:chat:ref", -50, -1)
            r.publish("chat:ref", "theirs")
            for client in (on_a, on_b):
                await wait_count(client, "chat:ref", 1)
                assert messages(client, "chat:ref") == [
                    {"channel": "chat:ref", "message": "theirs"}
                ]
            kept = await on_b.request(
                "mesh/subscribe-channel", {"channel": "chat:ref", "historyLimit": 10}
            )
            assert kept["history"] == ["ours", "theirs"]
            # their append breaks our numbering: a resume from before it says so
            resumed = await on_b.request(
                "mesh/get-channel-history", {"channel": "chat:ref", "since": 0}
            )
            assert resumed["recovered"] is False and resumed["history"] == []
            await on_a.request("post", {"channel": "chat:ref", "message": "ours2", "history": 50})
            await wait_count(on_b, "chat:ref", 2)
            assert messages(on_b, "chat:ref")[1]["offset"] == 2
            since = await on_b.request(
                "mesh/get-channel-history", {"channel": "chat:ref", "since": 1}
            )
            assert (since["history"], since["recovered"]) == (["ours2"], False)
            for client in (on_a, on_b):
                await client.close()

        anyio.run(scenario)


@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_a_redis_outage(redis_server: RedisServer, runtime: str) -> None:
    store = redis_store(
        runtime, redis_server.url, command_timeout=0.5, connect_timeout=0.5, heartbeat_interval=0.2
    )
    server = ServerThread(runtime, demo_app, storage=store, **QUIET)
    with server:

        async def scenario() -> None:
            sub = await WSClient.connect(server.port)
            writer = await WSClient.connect(server.port)
            left = await WSClient.connect(server.port)
            await sub.request("mesh/subscribe-channel", {"channel": "chat:o"})
            assert (await left.request("mesh/subscribe-channel", {"channel": "chat:left"}))[
                "success"
            ]
            await writer.request("post", {"channel": "chat:o", "message": "before"})
            await wait_count(sub, "chat:o", 1)
            await anyio.to_thread.run_sync(redis_server.stop)
            for history in (0, 5):
                reply = await writer.request(
                    "post", {"channel": "chat:o", "message": "lost", "history": history}, timeout=10
                )
                assert reply["code"] == "EUNAVAILABLE"
            # leaving while Redis is away works, and is not undone when it is back
            assert await left.request("mesh/unsubscribe-channel", {"channel": "chat:left"})
            await anyio.to_thread.run_sync(redis_server.start)
            with anyio.fail_after(15):  # the subscription is back once Redis is
                while len(messages(sub, "chat:o")) < 2:
                    await writer.request(
                        "post", {"channel": "chat:o", "message": "after", "history": 5}, timeout=10
                    )
                    with anyio.move_on_after(0.2):
                        await wait_count(sub, "chat:o", 2)
            assert messages(sub, "chat:o")[-1]["message"] == "after"
            assert numsub(redis_server, "chat:o") == 1
            assert numsub(redis_server, "mesh:channel:chat:o") == 1
            assert numsub(redis_server, "chat:left") == 0
            await sub.close()
            await anyio.to_thread.run_sync(
                lambda: _wait(lambda: numsub(redis_server, "chat:o") == 0)
            )
            for client in (writer, left):
                await client.close()

        anyio.run(scenario)


def test_the_python_client_resumes_across_instances(redis_server: RedisServer) -> None:
    a, b = two_instances(redis_server)
    with a, b:

        async def scenario() -> None:
            got: list[str] = []
            client = mesh_asyncio.MeshClient(
                f"ws://127.0.0.1:{a.port}", reconnect_interval=0.3, max_reconnect_interval=0.3
            )
            writer = await WSClient.connect(b.port)
            async with client:
                await client.subscribe_channel("chat:resume", got.append)

                async def post(i: int) -> None:
                    await writer.request(
                        "post", {"channel": "chat:resume", "message": f"m{i}", "history": 500}
                    )

                for i in range(5):
                    await post(i)
                await poll(lambda: len(got) == 5)
                lost, back = anyio.Event(), anyio.Event()
                client.on("disconnect", lost.set)
                client.on("reconnect", back.set)
                cid = client.connection_id

                async def drop() -> None:
                    connection = a.server.connections.get_local_connection(cid)
                    connection.close(CloseCode.GOING_AWAY)

                a.call(drop)
                await lost.wait()
                for i in range(5, 105):  # 100 written through B while it is away
                    await post(i)
                await back.wait()
                for i in range(105, 110):
                    await post(i)
                await poll(lambda: len(got) >= 110)
                await anyio.sleep(0.2)
                assert got == [f"m{i}" for i in range(110)]
                assert client.channel_subscriptions["chat:resume"].recovered is True
            await writer.close()

        anyio.run(scenario)
