"""The server's local listeners over the store's channels (``server.pubsub``):
one store subscription per channel however many listeners, made for the first,
ended after the last; concurrent changes of one channel never reorder."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from mesh_core import MemoryStore
from mesh_core.app import PubSub
from mesh_core.redis import RedisUnavailable
from mesh_core.storage import _ops as ops

pytestmark = pytest.mark.anyio


class CountingStore:
    """A memory store that records the pub/sub operations it runs and can
    make a Subscribe wait (``gate``) or fail (``fail``)."""

    def __init__(self) -> None:
        self.store = MemoryStore()
        self.log: list[tuple[str, str]] = []
        self.gate: anyio.Event | None = None
        self.fail = False

    async def execute(self, op: ops.Op) -> Any:
        if isinstance(op, ops.Subscribe | ops.Unsubscribe):
            self.log.append((type(op).__name__, op.channel))
        if isinstance(op, ops.Subscribe):
            if self.gate is not None:
                await self.gate.wait()
            if self.fail:
                raise RedisUnavailable("no Redis")
        return await self.store.execute(op)


def hub(store: CountingStore, instance: str = "i1") -> PubSub:
    return PubSub(store.execute, instance, anyio.Event)


async def test_one_store_subscription_however_many_listeners() -> None:
    store = CountingStore()
    pubsub = hub(store)
    got: list[tuple[str, str, bytes]] = []

    def listener(name: str) -> Any:
        return lambda channel, data: got.append((name, channel, data))

    a, b = listener("a"), listener("b")
    await pubsub.subscribe("ch", a)
    await pubsub.subscribe("ch", b)
    await pubsub.subscribe("ch", a)  # already there: nothing changes
    assert store.log == [("Subscribe", "ch")]
    assert pubsub.channels() == ["ch"] and pubsub.is_subscribed("ch")
    await pubsub.publish("ch", "m1")
    assert got == [("a", "ch", b"m1"), ("b", "ch", b"m1")]
    assert await pubsub.unsubscribe("ch", a) is True
    assert await pubsub.unsubscribe("ch", a) is False
    assert store.log == [("Subscribe", "ch")]  # b still listens
    await pubsub.publish("ch", "m2")
    assert got[-1] == ("b", "ch", b"m2") and len(got) == 3
    assert await pubsub.unsubscribe("ch", b) is True
    assert store.log == [("Subscribe", "ch"), ("Unsubscribe", "ch")]
    assert pubsub.channels() == [] and not pubsub.is_subscribed("ch")
    await pubsub.publish("ch", "m3")
    assert len(got) == 3
    assert await pubsub.unsubscribe("never", a) is False


async def test_instances_on_one_store_each_get_a_message_once() -> None:
    store = CountingStore()
    one, two = hub(store, "i1"), hub(store, "i2")
    got1: list[bytes] = []
    got2: list[bytes] = []
    await one.subscribe("ch", lambda c, d: got1.append(d))
    await two.subscribe("ch", lambda c, d: got2.append(d))
    await two.publish("ch", b"x")
    assert got1 == [b"x"] and got2 == [b"x"]


async def test_concurrent_subscribers_wait_for_the_one_subscription() -> None:
    store = CountingStore()
    store.gate = anyio.Event()
    pubsub = hub(store)
    done: list[str] = []

    async def join(name: str) -> None:
        await pubsub.subscribe("ch", lambda c, d: None)
        done.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(join, "first")
        tg.start_soon(join, "second")
        await anyio.sleep(0.05)
        assert done == []  # neither returns before the subscription exists
        store.gate.set()
    assert sorted(done) == ["first", "second"]
    assert store.log == [("Subscribe", "ch")]


async def test_leaving_while_the_subscription_is_made_ends_it_afterwards() -> None:
    store = CountingStore()
    store.gate = anyio.Event()
    pubsub = hub(store)

    def listener(c: str, d: bytes) -> None:
        return None

    async with anyio.create_task_group() as tg:
        tg.start_soon(pubsub.subscribe, "ch", listener)
        await anyio.sleep(0.02)
        tg.start_soon(pubsub.unsubscribe, "ch", listener)
        await anyio.sleep(0.02)
        store.gate.set()
    assert store.log == [("Subscribe", "ch"), ("Unsubscribe", "ch")]
    assert pubsub.channels() == [] and not pubsub.is_subscribed("ch")


async def test_a_failed_subscription_leaves_no_listener() -> None:
    store = CountingStore()
    store.fail = True
    pubsub = hub(store)
    with pytest.raises(RedisUnavailable):
        await pubsub.subscribe("ch", lambda c, d: None)
    assert pubsub.channels() == [] and not pubsub.is_subscribed("ch")
    store.fail = False
    await pubsub.subscribe("ch", lambda c, d: None)
    assert pubsub.is_subscribed("ch")


async def test_a_failing_listener_does_not_stop_the_others() -> None:
    store = CountingStore()
    pubsub = hub(store)
    got: list[bytes] = []

    def bad(c: str, d: bytes) -> None:
        raise RuntimeError("boom")

    await pubsub.subscribe("ch", bad)
    await pubsub.subscribe("ch", lambda c, d: got.append(d))
    await pubsub.publish("ch", "x")
    assert got == [b"x"]


async def test_a_detached_memory_instance_drops_its_subscriptions() -> None:
    store = MemoryStore()
    got: list[bytes] = []
    await store.execute(ops.Subscribe("ch", "i1", lambda c, d: got.append(d)))
    store.detach("i1")
    await store.execute(ops.PublishMessage("ch", "x"))
    assert got == []
