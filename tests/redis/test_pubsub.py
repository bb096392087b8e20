"""The store's named channels on a real Redis, both runtimes: raw bytes on the
channel name (what reference instances publish and read), one Redis
subscription per channel per instance, none left behind, and subscriptions
renewed after Redis comes back."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from mesh_core.app import PubSub
from mesh_core.redis import RedisUnavailable
from mesh_core.storage import _ops as ops
from tests.helpers.redis_server import RedisServer

pytestmark = pytest.mark.anyio


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def store_class(anyio_backend: str) -> Any:
    if anyio_backend == "trio":
        from mesh_trio import RedisStore
    else:
        from mesh_asyncio import RedisStore  # type: ignore[assignment]
    return RedisStore


def raw(port: int, *args: str) -> bytes:
    """One command on a connection of its own (a stand-in for a reference
    instance's ioredis client); the raw reply."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"".join(parts))
        return s.recv(4096)


def numsub(port: int, channel: str) -> int:
    reply = raw(port, "PUBSUB", "NUMSUB", channel)
    return int(reply.rsplit(b":", 1)[1].split(b"\r\n")[0])


async def wait_until(pred: Any, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not pred():
            await anyio.sleep(0.01)


async def test_reference_bytes_both_ways_and_one_subscription(
    anyio_backend: str, redis_server: RedisServer
) -> None:
    store = store_class(anyio_backend)(redis_server.url)
    await store.start("inst-a", lambda *a: None)
    try:
        pubsub = PubSub(store.execute, "inst-a", anyio.Event)
        got1: list[bytes] = []
        got2: list[bytes] = []
        await pubsub.subscribe("chat:general", lambda c, d: got1.append(d))
        await pubsub.subscribe("chat:general", lambda c, d: got2.append(d))
        assert numsub(redis_server.port, "chat:general") == 1
        # a reference instance publishes the message itself on the channel name
        assert raw(redis_server.port, "PUBLISH", "chat:general", '{"text":"hi"}') == b":1\r\n"
        await wait_until(lambda: got1 == got2 == [b'{"text":"hi"}'])
        # and what we publish is the bare message too (seen by a raw subscriber)
        with socket.create_connection(("127.0.0.1", redis_server.port), timeout=5) as s:
            s.sendall(b"*2\r\n$9\r\nSUBSCRIBE\r\n$12\r\nchat:general\r\n")
            assert b"subscribe" in s.recv(4096)
            await pubsub.publish("chat:general", "plain text")
            seen = b""
            while b"plain text" not in seen:
                seen += s.recv(4096)
            assert seen.endswith(b"$10\r\nplain text\r\n")
        for listener in list(pubsub.listeners("chat:general")):
            await pubsub.unsubscribe("chat:general", listener)
        await wait_until(lambda: numsub(redis_server.port, "chat:general") == 0)
    finally:
        await store.stop()


async def test_subscriptions_come_back_after_an_outage_and_unsubscribed_ones_do_not(
    anyio_backend: str, redis_server: RedisServer
) -> None:
    store = store_class(anyio_backend)(redis_server.url, command_timeout=0.5, connect_timeout=0.5)
    await store.start("inst-b", lambda *a: None)
    try:
        pubsub = PubSub(store.execute, "inst-b", anyio.Event)
        got: list[bytes] = []

        def keep(c: str, d: bytes) -> None:
            got.append(d)

        def drop(c: str, d: bytes) -> None:
            raise AssertionError("unsubscribed")

        await pubsub.subscribe("kept", keep)
        await pubsub.subscribe("dropped", drop)
        redis_server.stop()
        # Redis away: leaving still works (and is remembered)
        with anyio.fail_after(3):
            assert await pubsub.unsubscribe("dropped", drop) is True
        with pytest.raises(RedisUnavailable):
            await store.execute(ops.PublishMessage("kept", "lost"))
        redis_server.start()
        with anyio.fail_after(10):
            while b"back" not in got:
                raw(redis_server.port, "PUBLISH", "kept", "back")
                await anyio.sleep(0.05)
        assert numsub(redis_server.port, "kept") == 1
        assert numsub(redis_server.port, "dropped") == 0
    finally:
        await store.stop()
