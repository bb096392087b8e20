"""Channels over real sockets, both runtimes, against examples/demo.py: the
Python client (subscribe with and without history, order, history reads,
unsubscribe, guards, refusals, trimming, bad input), resume after a lost
socket, and subscriptions ending with their connection or a slow consumer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

import mesh_asyncio
import mesh_trio
from examples.demo import app as demo_app
from mesh_core import CloseCode, MeshCommandError
from tests.helpers.wsclient import WSClient

pytestmark = pytest.mark.anyio


def client_class(backend: str) -> Any:
    return mesh_trio.MeshClient if backend == "trio" else mesh_asyncio.MeshClient


@asynccontextmanager
async def serve(server_cls: Any, **options: Any) -> AsyncIterator[Any]:
    server = server_cls(demo_app, **options)
    async with server.listen("127.0.0.1", 0):
        yield server


async def wait_for(condition: Any, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)


async def test_subscribe_post_history_and_unsubscribe(server_cls: Any, anyio_backend: str) -> None:
    Client = client_class(anyio_backend)
    async with serve(server_cls) as server:
        url = f"ws://127.0.0.1:{server.port}"
        async with Client(url) as writer, Client(url) as reader:
            for i in range(1, 6):
                assert await writer.command(
                    "post", {"channel": "chat:general", "message": f"old{i}", "history": 3}
                ) == {"success": True}
            got: list[str] = []
            history = await reader.subscribe_channel("chat:general", got.append, history_limit=2)
            assert history == ["old4", "old5"] and got == ["old4", "old5"]
            plain: list[str] = []
            assert await writer.subscribe_channel("chat:general", plain.append) == []
            for i in range(20):
                await writer.command("post", {"channel": "chat:general", "message": f"m{i}"})
            await wait_for(lambda: len(got) == 22 and len(plain) == 20)
            assert got[2:] == plain == [f"m{i}" for i in range(20)]
            kept = await reader.get_channel_history("chat:general", limit=100)
            # the last post kept 50; the first five kept 3 of theirs
            assert kept == ["old3", "old4", "old5", *[f"m{i}" for i in range(20)]]
            assert kept.offset == 25
            since = await reader.get_channel_history("chat:general", since=23)
            assert (list(since), since.recovered) == (["m18", "m19"], True)
            assert await reader.unsubscribe_channel("chat:general") is True
            assert await reader.unsubscribe_channel("chat:general") is False
            await writer.command("post", {"channel": "chat:general", "message": "after"})
            await wait_for(lambda: plain[-1:] == ["after"])
            await anyio.sleep(0.1)
            assert len(got) == 22
            # trimmed to N
            for i in range(10):
                await writer.command(
                    "post", {"channel": "chat:short", "message": str(i), "history": 4}
                )
            assert await reader.get_channel_history("chat:short") == ["6", "7", "8", "9"]


async def test_guards_and_refusals(server_cls: Any, anyio_backend: str) -> None:
    Client = client_class(anyio_backend)
    async with serve(server_cls) as server:
        url = f"ws://127.0.0.1:{server.port}"
        async with Client(url) as client:
            for channel in ("chat:admin", "news", "mesh:channel:chat:general"):
                with pytest.raises(MeshCommandError) as info:
                    await client.subscribe_channel(channel, lambda m: None)
                assert info.value.code == "EREFUSED"
                assert await client.command("mesh/get-channel-history", {"channel": channel}) == {
                    "success": False,
                    "history": [],
                }
            assert client.channel_subscriptions == {}
            assert await client.set_connection_metadata({"role": "admin"}, "merge")
            got: list[str] = []
            await client.subscribe_channel("chat:admin", got.append)
            await client.command("post", {"channel": "chat:admin", "message": "for admins"})
            await wait_for(lambda: got == ["for admins"])
            assert await client.get_channel_history("chat:admin") == ["for admins"]


async def test_bad_input(server_cls: Any, anyio_backend: str) -> None:
    Client = client_class(anyio_backend)
    async with serve(server_cls) as server:
        url = f"ws://127.0.0.1:{server.port}"
        async with Client(url, raise_errors=False) as client:
            for command, payload in [
                ("post", {"channel": "chat:x", "message": {"not": "a string"}}),
                ("post", {"channel": "chat:x", "message": "x", "history": -1}),
                ("post", {"channel": "chat:x", "message": "x", "history": 10**6}),
                ("post", {"channel": "mesh:presence:updates:x", "message": "x"}),
                ("post", {"message": "x"}),
                ("mesh/subscribe-channel", {}),
                ("mesh/subscribe-channel", {"channel": "chat:x", "historyLimit": -1}),
                ("mesh/subscribe-channel", {"channel": "chat:x", "historyLimit": 10**9}),
                ("mesh/get-channel-history", {"channel": "chat:x", "limit": "all"}),
                ("mesh/unsubscribe-channel", None),
            ]:
                reply = await client.command(command, payload)
                assert reply["code"] == "EINVAL", (command, payload, reply)
            assert server.channels.channels() == []


async def test_resume_after_a_lost_socket_loses_and_repeats_nothing(
    server_cls: Any, anyio_backend: str
) -> None:
    Client = client_class(anyio_backend)
    async with serve(server_cls) as server:
        url = f"ws://127.0.0.1:{server.port}"
        client = Client(url, reconnect_interval=0.3, max_reconnect_interval=0.3)
        async with client:
            got: list[str] = []
            await client.command("post", {"channel": "chat:r", "message": "m0", "history": 500})
            await client.subscribe_channel("chat:r", got.append, history_limit=1)
            for i in range(1, 11):
                await server.write_channel("chat:r", f"m{i}", 500)
            await wait_for(lambda: len(got) == 11)
            dropped = client.connection_id
            lost = anyio.Event()
            client.on("disconnect", lost.set)
            server.connections.get_local_connection(dropped).close(CloseCode.GOING_AWAY)
            await lost.wait()
            for i in range(11, 111):  # 100 while it is away
                await server.write_channel("chat:r", f"m{i}", 500)
            back = anyio.Event()
            client.on("reconnect", back.set)
            await back.wait()
            for i in range(111, 121):  # and more as it comes back
                await server.write_channel("chat:r", f"m{i}", 500)
            await wait_for(lambda: len(got) >= 121)
            await anyio.sleep(0.1)
            assert got == [f"m{i}" for i in range(121)]
            sub = client.channel_subscriptions["chat:r"]
            assert sub.recovered is True and sub.offset == 121
            assert client.connection_id != dropped

            # more written than the channel keeps: told so
            lost, back = anyio.Event(), anyio.Event()
            client.on("disconnect", lost.set)
            client.on("reconnect", back.set)
            server.connections.get_local_connection(client.connection_id).close(
                CloseCode.GOING_AWAY
            )
            await lost.wait()
            for i in range(121, 221):
                await server.write_channel("chat:r", f"m{i}", 30)
            await back.wait()
            await wait_for(lambda: got[-1:] == ["m220"])
            assert client.channel_subscriptions["chat:r"].recovered is False
            assert got[121:] == [f"m{i}" for i in range(191, 221)]  # what was kept, once


async def test_a_subscription_ends_when_its_client_goes(
    server_cls: Any, anyio_backend: str
) -> None:
    Client = client_class(anyio_backend)
    async with serve(server_cls) as server:
        url = f"ws://127.0.0.1:{server.port}"
        async with Client(url) as client:
            await client.subscribe_channel("chat:bye", lambda m: None)
            assert len(server.channels.subscribers("chat:bye")) == 1
            assert server.pubsub.is_subscribed("chat:bye")
        await wait_for(lambda: server.channels.subscribers("chat:bye") == [])
        await wait_for(lambda: server.pubsub.channels() == [])


async def test_a_subscriber_that_stops_reading_is_dropped(server_cls: Any) -> None:
    async with serve(server_cls, max_message_size=64 * 1024, max_send_buffer=64 * 1024) as server:
        slow = await WSClient.connect(server.port)
        reply = await slow.request("mesh/subscribe-channel", {"channel": "chat:flood"})
        assert reply["success"] is True
        big = "x" * 60_000
        with anyio.fail_after(20):
            while server.channels.subscribers("chat:flood"):
                await server.write_channel("chat:flood", big)
                await anyio.sleep(0)
        assert server.metrics()["slow_consumer_closes"] >= 1
        await wait_for(lambda: server.pubsub.channels() == [])
        await slow.abort()
