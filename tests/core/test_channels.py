"""Channels through ``ServerCore`` and the client's channel logic, no sockets:
the built-ins' shapes, exposure and guards, bad input, one frame per publish,
subscriptions ending on unsubscribe and disconnect, and the client's
history-before-live, duplicate-free delivery and resume requests."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import anyio
import pytest

import mesh_asyncio
from mesh_core import Connection, MemoryStore, MeshApp, ValidationError
from mesh_core.client._core import ClientCore
from mesh_core.storage import _ops as ops
from tests.core.test_dispatch import Client, FakeServer, connect

pytestmark = pytest.mark.anyio


class Server(FakeServer):
    def __init__(self, app: MeshApp, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        # what PubSub waits on when two tasks change one channel at once
        self.fake_runtime.event = anyio.Event  # type: ignore[attr-defined]


def make(app: MeshApp, **options: Any) -> Server:
    return Server(app, storage=MemoryStore(), instance_id="inst-test", **options)


def chat_app() -> MeshApp:
    app = MeshApp()
    app.expose_channel("news")
    app.expose_channel(re.compile(r"^chat:"), guard=lambda conn, channel: channel != "chat:admin")

    async def vip(conn: Connection, channel: str) -> bool:
        meta = await conn.get_metadata()
        return isinstance(meta, dict) and meta.get("vip") is True

    app.expose_channel("vip", vip)

    def broken(conn: Connection, channel: str) -> bool:
        raise RuntimeError("guard bug")

    app.expose_channel("broken", broken)
    app.expose_channel(re.compile(".*"))  # everything else, but never mesh:
    return app


def pushes(client: Client) -> list[Any]:
    return [
        f["payload"] for f in client.frames() if f.get("command") == "mesh/subscription-message"
    ]


async def test_exposure_guards_and_the_reserved_prefix() -> None:
    server = make(chat_app())
    alice = await connect(server, "alice", {"vip": True})
    bob = await connect(server, "bob", {"vip": False})
    refused = {"success": False, "history": []}
    for channel, alice_ok, bob_ok in [
        ("news", True, True),
        ("chat:general", True, True),
        ("chat:admin", False, False),
        ("vip", True, False),
        ("broken", False, False),
        ("anything", True, True),
        ("mesh:pubsub:inst-test", False, False),
        ("mesh:channel:news", False, False),
    ]:
        for client, ok in ((alice, alice_ok), (bob, bob_ok)):
            for command in ("mesh/subscribe-channel", "mesh/get-channel-history"):
                reply = await client.request(command, {"channel": channel})
                if ok:
                    assert reply["success"] is True, (command, channel, client.conn.id)
                else:
                    assert reply == refused, (command, channel, client.conn.id)
    assert sorted(server.channels.channels_of("alice")) == [
        "anything",
        "chat:general",
        "news",
        "vip",
    ]
    with pytest.raises(ValueError, match="mesh:"):
        MeshApp().expose_channel("mesh:presence:updates:lobby")


async def test_not_exposed_at_all() -> None:
    server = make(MeshApp())
    alice = await connect(server, "alice")
    reply = await alice.request("mesh/subscribe-channel", {"channel": "news", "historyLimit": 5})
    assert reply == {"success": False, "history": []}
    assert await alice.request("mesh/unsubscribe-channel", {"channel": "news"}) is False
    assert server.channels.subscribers("news") == []


async def test_subscribe_history_live_and_unsubscribe() -> None:
    server = make(chat_app(), max_channel_history=20)
    for i in range(1, 8):
        assert await server.write_channel("news", f"m{i}", history=5) == i
    alice = await connect(server, "alice")
    bob = await connect(server, "bob")
    reply = await alice.request("mesh/subscribe-channel", {"channel": "news", "historyLimit": 3})
    assert reply["history"] == ["m5", "m6", "m7"]  # the latest three, oldest first
    assert (reply["success"], reply["offset"]) == (True, 7)
    assert isinstance(reply["epoch"], str) and "recovered" not in reply
    reply = await bob.request("mesh/subscribe-channel", {"channel": "news"})
    assert (reply["history"], reply["offset"]) == ([], 7)
    assert await server.write_channel("news", '{"json": "text"}', history=5) == 8
    await server.write_channel("news", "no history")
    for client in (alice, bob):
        assert pushes(client) == [
            {
                "channel": "news",
                "message": '{"json": "text"}',
                "offset": 8,
                "epoch": reply["epoch"],
            },
            {"channel": "news", "message": "no history"},
        ]
    assert [c.id for c in server.channels.subscribers("news")] == ["alice", "bob"]
    assert await alice.request("mesh/unsubscribe-channel", {"channel": "news"}) is True
    assert await alice.request("mesh/unsubscribe-channel", {"channel": "news"}) is False
    await server.write_channel("news", "after", history=5)
    assert pushes(alice) == [] and [p["message"] for p in pushes(bob)] == ["after"]
    history = await bob.request("mesh/get-channel-history", {"channel": "news", "limit": 2})
    assert history == {
        "success": True,
        "history": ['{"json": "text"}', "after"],
        "offset": 9,
        "epoch": reply["epoch"],
    }


async def test_get_history_since_and_recovered() -> None:
    server = make(chat_app())
    for i in range(1, 11):
        await server.write_channel("news", f"m{i}", history=4)
    alice = await connect(server, "alice")
    got = await alice.request("mesh/get-channel-history", {"channel": "news", "since": 8})
    assert (got["history"], got["offset"], got["recovered"]) == (["m9", "m10"], 10, True)
    got = await alice.request("mesh/get-channel-history", {"channel": "news", "since": 2})
    assert (got["history"], got["recovered"]) == (["m7", "m8", "m9", "m10"], False)
    got = await alice.request("mesh/get-channel-history", {"channel": "news"})
    assert got["history"] == ["m7", "m8", "m9", "m10"] and "recovered" not in got
    got = await alice.request(
        "mesh/subscribe-channel", {"channel": "news", "since": 9, "epoch": got["epoch"]}
    )
    assert (got["history"], got["offset"], got["recovered"]) == (["m10"], 10, True)


@pytest.mark.parametrize(
    ("command", "payload", "field"),
    [
        ("mesh/subscribe-channel", {}, "channel"),
        ("mesh/subscribe-channel", {"channel": 5}, "channel"),
        ("mesh/subscribe-channel", {"channel": ""}, "channel"),
        ("mesh/subscribe-channel", None, "channel"),
        ("mesh/unsubscribe-channel", {}, "channel"),
        ("mesh/get-channel-history", {"channel": None}, "channel"),
        ("mesh/subscribe-channel", {"channel": "news", "historyLimit": -1}, "historyLimit"),
        ("mesh/subscribe-channel", {"channel": "news", "historyLimit": 10**9}, "historyLimit"),
        ("mesh/subscribe-channel", {"channel": "news", "historyLimit": "5"}, "historyLimit"),
        ("mesh/subscribe-channel", {"channel": "news", "historyLimit": True}, "historyLimit"),
        ("mesh/subscribe-channel", {"channel": "news", "historyLimit": 2.5}, "historyLimit"),
        ("mesh/get-channel-history", {"channel": "news", "limit": 1001}, "limit"),
        ("mesh/get-channel-history", {"channel": "news", "since": -1}, "since"),
        ("mesh/subscribe-channel", {"channel": "news", "since": "yesterday"}, "since"),
        ("mesh/subscribe-channel", {"channel": "news", "since": 1, "epoch": 7}, "epoch"),
    ],
)
async def test_bad_input_is_a_clear_error(command: str, payload: Any, field: str) -> None:
    server = make(chat_app())
    alice = await connect(server, "alice")
    reply = await alice.request(command, payload)
    assert reply["code"] == "EINVAL" and field in reply["error"]
    assert server.channels.channels_of("alice") == []


async def test_write_channel_checks_its_input() -> None:
    server = make(chat_app(), max_channel_history=10)
    for channel, message, history in [
        ("news", {"not": "a string"}, 0),
        ("news", b"bytes", 0),
        ("", "x", 0),
        ("mesh:presence:updates:x", "x", 0),
        ("news", "x", -1),
        ("news", "x", 11),
        ("news", "x", True),
    ]:
        with pytest.raises(ValidationError):
            await server.write_channel(channel, message, history)  # type: ignore[arg-type]
    assert await server.write_channel("news", "ok", 10) == 1


async def test_one_publish_is_framed_once_for_every_subscriber() -> None:
    server = make(chat_app())
    clients = [await connect(server, f"c{i}") for i in range(5)]
    sent: list[bytes] = []
    for client in clients:
        await client.request("mesh/subscribe-channel", {"channel": "news"})
        proto = client.proto
        original = proto.send_frame

        def spy(frame: bytes, original: Any = original) -> bool:
            sent.append(frame)
            return bool(original(frame))

        proto.send_frame = spy  # type: ignore[method-assign]
    await server.write_channel("news", "hello", history=3)
    assert len(sent) == 5 and all(frame is sent[0] for frame in sent)


async def test_a_subscription_ends_with_its_connection() -> None:
    server = make(chat_app())
    alice = await connect(server, "alice")
    bob = await connect(server, "bob")
    for client in (alice, bob):
        await client.request("mesh/subscribe-channel", {"channel": "news"})
        await client.request("mesh/subscribe-channel", {"channel": "chat:x"})
    assert server.pubsub.is_subscribed("news") and server.pubsub.is_subscribed("chat:x")
    alice.conn._lost = True
    await server._cleanup(alice.conn)
    assert [c.id for c in server.channels.subscribers("news")] == ["bob"]
    assert server.pubsub.is_subscribed("news")
    bob.conn._lost = True
    await server._cleanup(bob.conn)
    assert server.channels.channels() == [] and server.pubsub.channels() == []
    assert not server.pubsub.is_subscribed("news")
    assert not server.pubsub.is_subscribed(ops.offsets_channel("news"))


async def test_server_side_subscribe_and_a_reference_writer() -> None:
    server = make(MeshApp())  # nothing exposed: the server still decides
    alice = await connect(server, "alice")
    assert await server.channels.subscribe("alice", "internal") is True
    assert await server.channels.subscribe(alice.conn, "internal") is False
    assert await server.channels.subscribe("ghost", "internal") is False
    # a reference instance publishes the bare message on the channel name
    await server.storage.execute(ops.PublishMessage("internal", "from the reference"))
    assert pushes(alice) == [{"channel": "internal", "message": "from the reference"}]
    assert await server.channels.unsubscribe("alice", "internal") is True
    assert server.pubsub.channels() == []


# -- the client's channel logic ---------------------------------------------------


class ScriptedClient(ClientCore):
    """A client whose commands are answered by the test (it never opens a
    socket: the binding only lends its runtime's events)."""

    binding = mesh_asyncio.MeshClient.binding

    def __init__(self, replies: list[Any]) -> None:
        super().__init__("ws://example.test")
        self.replies = replies
        self.sent: list[tuple[str, Any]] = []
        self.before_reply: Any = None

    async def command(self, command: str, payload: Any = None, timeout: float | None = 30.0) -> Any:
        self.sent.append((command, payload))
        if self.before_reply is not None:
            self.before_reply()
            self.before_reply = None
        return self.replies.pop(0)

    def _spawn_awaitable(self, awaitable: Any) -> None:
        raise AssertionError("no async callbacks here")

    def push(self, message: str, offset: int | None = None, epoch: str = "e") -> None:
        payload: dict[str, Any] = {"channel": "news", "message": message}
        if offset is not None:
            payload.update(offset=offset, epoch=epoch)
        self._emit("mesh/subscription-message", payload)


async def test_client_history_first_then_live_without_duplicates() -> None:
    client = ScriptedClient([{"success": True, "history": ["h4", "h5"], "offset": 5, "epoch": "e"}])
    got: list[str] = []

    # live messages arrive before the reply: 5 is in the history, 6 is not
    def early() -> None:
        client.push("m5", 5)
        client.push("m6", 6)
        client.push("raw")

    client.before_reply = early
    history = await client.subscribe_channel("news", got.append, history_limit=2)
    assert history == ["h4", "h5"] and history.offset == 5
    assert got == ["h4", "h5", "m6", "raw"]
    client.push("m6", 6)  # a duplicate
    client.push("m7", 7)
    assert got[-1] == "m7" and len(got) == 5
    sub = client.channel_subscriptions["news"]
    assert (sub.offset, sub.epoch) == (7, "e")


async def test_client_resumes_from_the_last_offset() -> None:
    client = ScriptedClient([{"success": True, "history": [], "offset": 3, "epoch": "e"}])
    got: list[str] = []
    await client.subscribe_channel("news", got.append)
    client.push("m4", 4)
    client.replies.append(
        {"success": True, "history": ["m5", "m6"], "offset": 6, "epoch": "e", "recovered": True}
    )
    client.before_reply = lambda: client.push("m6", 6)  # live, while resuming
    await client._resubscribe_channels()
    assert client.sent[-1] == (
        "mesh/subscribe-channel",
        {"channel": "news", "since": 4, "epoch": "e"},
    )
    assert got == ["m4", "m5", "m6"]
    assert client.channel_subscriptions["news"].recovered is True
    client.replies.append(
        {"success": True, "history": ["m40"], "offset": 40, "epoch": "e", "recovered": False}
    )
    await client._resubscribe_channels()
    assert client.channel_subscriptions["news"].recovered is False and got[-1] == "m40"


async def test_client_refused_and_unsubscribed() -> None:
    client = ScriptedClient([{"success": False, "history": []}, True])
    from mesh_core import MeshCommandError

    with pytest.raises(MeshCommandError):
        await client.subscribe_channel("news", lambda m: None)
    assert client.channel_subscriptions == {}
    assert await client.unsubscribe_channel("news") is True


async def test_client_resubscribe_waits_out_an_unavailable_store(anyio_backend: str) -> None:
    import mesh_trio

    unavailable = {"error": "Redis unavailable", "code": "EUNAVAILABLE", "name": "RedisUnavailable"}
    client = ScriptedClient([{"success": True, "history": [], "offset": 2, "epoch": "e"}])
    client.binding = (
        mesh_trio.MeshClient if anyio_backend == "trio" else mesh_asyncio.MeshClient
    ).binding
    client.options = dataclasses.replace(client.options, reconnect_interval=0.01)
    got: list[str] = []
    await client.subscribe_channel("news", got.append)
    client.replies += [
        unavailable,
        unavailable,
        {"success": True, "history": ["m3"], "offset": 3, "epoch": "e", "recovered": True},
    ]
    await client._resubscribe_channels()
    assert [c for c, _ in client.sent] == ["mesh/subscribe-channel"] * 4
    assert got == ["m3"] and client.channel_subscriptions["news"].recovered is True
