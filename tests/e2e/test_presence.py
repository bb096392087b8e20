"""Presence end to end over real sockets, each test on asyncio and on trio.

The wire contract against raw clients (the shapes the reference client sends
and expects), the timers (an abrupt leave, ``expireAfter``, a TTL that runs
out), bad input, guards, the server-side read API, the Python client (with
its reconnect), and the reference client's stand-in (tests/node).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

import mesh_asyncio
import mesh_trio
from examples.demo import app as demo_app
from mesh_core import Connection, MeshApp
from mesh_core.app import BUILTINS
from tests.helpers.server_thread import ServerThread
from tests.helpers.wsclient import WSClient

pytestmark = pytest.mark.anyio

QUIET: dict[str, Any] = {"ping_interval": 0, "latency_interval": 0}
UPDATE = "mesh/presence-update"


def presence_app(**track: Any) -> MeshApp:
    app = MeshApp()
    app.track_presence(re.compile(r"^p:"), **track)
    return app


def updates(client: WSClient) -> list[dict[str, Any]]:
    """The presence updates a raw client has received so far (and forget them)."""
    found = [p["payload"] for p in client.pushes if p.get("command") == UPDATE]
    client.pushes[:] = [p for p in client.pushes if p.get("command") != UPDATE]
    return found


async def next_update(client: WSClient, timeout: float = 5.0) -> dict[str, Any]:
    payload: dict[str, Any] = (await client.wait_push(UPDATE, timeout))["payload"]
    return payload


async def settle(client: WSClient, seconds: float = 0.3) -> None:
    """Read whatever arrives for a while (duplicates, if any, come by then)."""
    with anyio.move_on_after(seconds):
        while True:
            await client._read_once()


async def test_the_wire_contract(server_cls: Any) -> None:
    server = server_cls(presence_app(), **QUIET)
    async with server.listen():
        member = await WSClient.connect(server.port)
        watcher = await WSClient.connect(server.port)
        await member.request("mesh/set-my-connection-metadata", {"metadata": {"name": "ann"}})
        sub = await watcher.request("mesh/subscribe-presence", {"roomName": "p:1"})
        assert sub == {"success": True, "present": [], "states": {}}

        assert (await member.request("mesh/join-room", {"roomName": "p:1"}))["success"] is True
        join = await next_update(watcher)
        assert list(join) == ["type", "connectionId", "roomName", "timestamp"]
        assert join["type"] == "join" and join["connectionId"] == member.connection_id
        assert join["roomName"] == "p:1" and join["timestamp"] > 1_600_000_000_000
        # a second join of the same connection is no new member
        await member.request("mesh/join-room", {"roomName": "p:1"})

        ok = await member.request(
            "mesh/publish-presence-state", {"roomName": "p:1", "state": {"typing": True}}
        )
        assert ok is True
        state = await next_update(watcher)
        assert list(state) == ["type", "connectionId", "roomName", "state", "timestamp"]
        assert state["type"] == "state" and state["state"] == {"typing": True}
        # silent: stored, nobody told
        assert (
            await member.request(
                "mesh/publish-presence-state",
                {"roomName": "p:1", "state": {"typing": False}, "silent": True},
            )
            is True
        )
        got = await watcher.request("mesh/get-presence-state", {"roomName": "p:1"})
        assert got == {
            "success": True,
            "present": [member.connection_id],
            "states": {member.connection_id: {"typing": False}},
        }
        again = await watcher.request("mesh/subscribe-presence", {"roomName": "p:1"})
        assert again == {
            "success": True,
            "present": [{"id": member.connection_id, "metadata": {"name": "ann"}}],
            "states": {member.connection_id: {"typing": False}},
        }
        assert server.presence.is_tracked("p:1") and not server.presence.is_tracked("lobby")

        assert await member.request("mesh/clear-presence-state", {"roomName": "p:1"}) is True
        cleared = await next_update(watcher)
        assert cleared["type"] == "state" and cleared["state"] is None
        # clearing nothing changes nothing: no event
        assert await member.request("mesh/clear-presence-state", {"roomName": "p:1"}) is True

        assert (await member.request("mesh/leave-room", {"roomName": "p:1"}))["success"] is True
        leave = await next_update(watcher)
        assert leave["type"] == "leave" and leave["connectionId"] == member.connection_id
        await settle(watcher)
        assert updates(watcher) == []  # exactly one event per change

        # not in the room any more: no state
        assert (
            await member.request(
                "mesh/publish-presence-state", {"roomName": "p:1", "state": {"a": 1}}
            )
            is False
        )
        assert await member.request("mesh/clear-presence-state", {"roomName": "p:1"}) is False
        # untracked rooms
        await member.request("mesh/join-room", {"roomName": "lobby"})
        assert await member.request("mesh/subscribe-presence", {"roomName": "lobby"}) == {
            "success": False,
            "present": [],
        }
        assert await member.request("mesh/get-presence-state", {"roomName": "lobby"}) == {
            "success": False,
            "present": [],
        }
        assert (
            await member.request(
                "mesh/publish-presence-state", {"roomName": "lobby", "state": {"a": 1}}
            )
            is False
        )
        assert await watcher.request("mesh/unsubscribe-presence", {"roomName": "p:1"}) is True
        assert await watcher.request("mesh/unsubscribe-presence", {"roomName": "p:1"}) is False
        await member.request("mesh/join-room", {"roomName": "p:1"})
        await settle(watcher)
        assert updates(watcher) == []  # unsubscribed
        await member.close()
        await watcher.close()


async def test_bad_input_gets_false_or_an_error_never_a_crash(server_cls: Any) -> None:
    server = server_cls(presence_app(), max_metadata_size=1024, **QUIET)
    async with server.listen():
        c = await WSClient.connect(server.port)
        await c.request("mesh/join-room", {"roomName": "p:1"})
        for command in (
            "mesh/subscribe-presence",
            "mesh/unsubscribe-presence",
            "mesh/publish-presence-state",
            "mesh/clear-presence-state",
            "mesh/get-presence-state",
        ):
            bad: list[Any] = [{}, {"roomName": 5}, {"roomName": ""}, [], None, {"roomName": None}]
            for payload in bad:
                answer = await c.request(command, payload)
                assert answer["code"] == "EINVAL" and "roomName" in answer["error"], answer
        publish = "mesh/publish-presence-state"
        for state in (None, False, 0, ""):
            assert await c.request(publish, {"roomName": "p:1", "state": state}) is False
        assert await c.request(publish, {"roomName": "p:1"}) is False
        big = await c.request(publish, {"roomName": "p:1", "state": {"x": "y" * 5000}})
        assert big["code"] == "ETOOLARGE"
        bad_ttl = await c.request(
            publish, {"roomName": "p:1", "state": {"a": 1}, "expireAfter": "x"}
        )
        assert bad_ttl["code"] == "EINVAL"
        huge_ttl = await c.request(
            publish, {"roomName": "p:1", "state": {"a": 1}, "expireAfter": 1e300}
        )
        assert huge_ttl["code"] == "EINVAL"
        # a state on an untracked room is refused like the reference does
        await c.request("mesh/join-room", {"roomName": "lobby"})
        assert await c.request(publish, {"roomName": "lobby", "state": {"a": 1}}) is False
        # zero or negative expireAfter: no expiry (the reference's reading)
        assert (
            await c.request(publish, {"roomName": "p:1", "state": {"a": 1}, "expireAfter": 0})
            is True
        )
        assert await c.request("mesh/noop") is True
        assert await server.presence.get_state("p:1", c.connection_id) == {"a": 1}
        await c.close()


async def test_guard_decides_every_presence_command(server_cls: Any) -> None:
    app = MeshApp()

    async def only_staff(connection: Connection, room: str) -> bool:
        metadata = await connection.get_metadata()
        return isinstance(metadata, dict) and metadata.get("staff") is True

    app.track_presence("p:staff", guard=only_staff)
    server = server_cls(app, **QUIET)
    async with server.listen():
        staff = await WSClient.connect(server.port)
        guest = await WSClient.connect(server.port)
        await staff.request("mesh/set-my-connection-metadata", {"metadata": {"staff": True}})
        for c in (staff, guest):
            await c.request("mesh/join-room", {"roomName": "p:staff"})
        assert (await staff.request("mesh/subscribe-presence", {"roomName": "p:staff"}))["success"]
        denied = {"success": False, "present": []}
        assert await guest.request("mesh/subscribe-presence", {"roomName": "p:staff"}) == denied
        assert await guest.request("mesh/get-presence-state", {"roomName": "p:staff"}) == denied
        assert (
            await guest.request(
                "mesh/publish-presence-state", {"roomName": "p:staff", "state": {"x": 1}}
            )
            is False
        )
        assert await guest.request("mesh/clear-presence-state", {"roomName": "p:staff"}) is False
        # the guest joined (joining is not what the guard decides), so the
        # staff member saw it; the guest sees nothing
        await guest.request("mesh/leave-room", {"roomName": "p:staff"})
        assert (await next_update(staff))["type"] == "leave"
        await settle(guest)
        assert updates(guest) == []
        await staff.close()
        await guest.close()


@pytest.mark.skipif("mesh/subscribe-channel" not in BUILTINS, reason="needs the channels built-ins")
async def test_presence_channels_are_not_reachable_as_channels(server_cls: Any) -> None:
    app = MeshApp()
    app.track_presence("p:guarded", guard=lambda connection, room: False)
    expose = app.expose_channel  # type: ignore[attr-defined,unused-ignore]
    expose(re.compile(".*"))  # every channel a client may name
    server = server_cls(app, **QUIET)
    async with server.listen():
        member = await WSClient.connect(server.port)
        spy = await WSClient.connect(server.port)
        answer = await spy.request(
            "mesh/subscribe-channel", {"channel": "mesh:presence:updates:p:guarded"}
        )
        assert not (isinstance(answer, dict) and answer.get("success") is True), answer
        await member.request("mesh/join-room", {"roomName": "p:guarded"})
        await member.request(
            "mesh/publish-presence-state", {"roomName": "p:guarded", "state": {"secret": 1}}
        )
        await settle(spy)
        assert [p for p in spy.pushes if p.get("command") != "mesh/assign-id"] == []
        await member.close()
        await spy.close()


async def test_an_abrupt_disconnect_leaves_within_5s(server_cls: Any) -> None:
    server = server_cls(presence_app(), **QUIET)
    async with server.listen():
        member = await WSClient.connect(server.port)
        watcher = await WSClient.connect(server.port)
        await watcher.request("mesh/subscribe-presence", {"roomName": "p:1"})
        await member.request("mesh/join-room", {"roomName": "p:1"})
        assert (await next_update(watcher))["type"] == "join"
        await member.request("mesh/publish-presence-state", {"roomName": "p:1", "state": {"a": 1}})
        assert (await next_update(watcher))["type"] == "state"
        await member.abort()  # no close frame
        leave = await next_update(watcher, timeout=5)
        assert leave["type"] == "leave" and leave["connectionId"] == member.connection_id
        await settle(watcher)
        assert updates(watcher) == []
        assert await server.presence.get_present("p:1") == []
        assert await server.presence.get_states("p:1") == {}
        await watcher.close()


async def test_expire_after_clears_the_state_once(server_cls: Any) -> None:
    server = server_cls(presence_app(), **QUIET)
    async with server.listen():
        member = await WSClient.connect(server.port)
        watcher = await WSClient.connect(server.port)
        await member.request("mesh/join-room", {"roomName": "p:1"})
        await watcher.request("mesh/subscribe-presence", {"roomName": "p:1"})
        started = anyio.current_time()
        await member.request(
            "mesh/publish-presence-state",
            {"roomName": "p:1", "state": {"typing": True}, "expireAfter": 500},
        )
        assert (await next_update(watcher))["state"] == {"typing": True}
        expired = await next_update(watcher, timeout=3)
        assert expired["type"] == "state" and expired["state"] is None
        assert 0.4 <= anyio.current_time() - started < 3
        assert await server.presence.get_state("p:1", member.connection_id) is None
        # a state replaced before it expires is not cleared by the old timer
        await member.request(
            "mesh/publish-presence-state",
            {"roomName": "p:1", "state": {"v": 1}, "expireAfter": 300},
        )
        await member.request("mesh/publish-presence-state", {"roomName": "p:1", "state": {"v": 2}})
        await settle(watcher, 0.8)
        assert [u["state"] for u in updates(watcher)] == [{"v": 1}, {"v": 2}]
        assert await server.presence.get_state("p:1", member.connection_id) == {"v": 2}
        await member.close()
        await watcher.close()


async def test_a_ttl_member_that_stops_answering_pings_leaves_once(server_cls: Any) -> None:
    # the demo's "pt:" rooms: TTL 3000 ms, refreshed by pongs. The server pings
    # every 0.5 s and drops a silent client after 8 missed pongs (~4 s), after
    # its TTL ran out: still one leave.
    server = server_cls(demo_app, ping_interval=0.5, max_missed_pongs=8, latency_interval=0)
    async with server.listen():
        member = await WSClient.connect(server.port)
        watcher = await WSClient.connect(server.port)
        await member.request("mesh/join-room", {"roomName": "pt:1"})
        await watcher.request("mesh/subscribe-presence", {"roomName": "pt:1"})
        # answering pongs, it stays well past its TTL
        with anyio.move_on_after(3.6):
            while True:
                await member._read_once()
        await settle(watcher, 0.1)
        assert updates(watcher) == []
        assert await server.presence.get_present("pt:1") == [member.connection_id]
        member.auto_pong = False
        started = anyio.current_time()
        async with anyio.create_task_group() as tg:

            async def read_member() -> None:
                with anyio.move_on_after(6):
                    while member.closed is None:
                        await member._read_once()

            tg.start_soon(read_member)
            leave = await next_update(watcher, timeout=6)
            assert leave["type"] == "leave" and leave["connectionId"] == member.connection_id
            assert 2.5 <= anyio.current_time() - started < 5
            await settle(watcher, 2.5)  # the server drops it meanwhile
        assert member.closed is not None
        assert updates(watcher) == []  # one leave, not two
        await watcher.close()


async def test_a_timed_out_member_comes_back_at_its_next_pong(server_cls: Any) -> None:
    app = MeshApp()
    app.track_presence("pt:short", ttl=600)
    server = server_cls(app, ping_interval=0.3, max_missed_pongs=50, latency_interval=0)
    async with server.listen():
        member = await WSClient.connect(server.port)
        watcher = await WSClient.connect(server.port)
        await member.request("mesh/join-room", {"roomName": "pt:short"})
        await watcher.request("mesh/subscribe-presence", {"roomName": "pt:short"})
        member.auto_pong = False
        async with anyio.create_task_group() as tg:

            async def read_member() -> None:
                with anyio.move_on_after(4):
                    while True:
                        await member._read_once()

            tg.start_soon(read_member)
            assert (await next_update(watcher, timeout=3))["type"] == "leave"
            member.auto_pong = True
            back = await next_update(watcher, timeout=3)
            assert back["type"] == "join" and back["connectionId"] == member.connection_id
            tg.cancel_scope.cancel()
        assert await server.presence.get_present("pt:short") == [member.connection_id]
        await member.close()
        await watcher.close()


async def test_the_server_api_marks_and_reads_presence(server_cls: Any) -> None:
    server = server_cls(presence_app(), **QUIET)
    async with server.listen():
        a = await WSClient.connect(server.port)
        b = await WSClient.connect(server.port)
        watcher = await WSClient.connect(server.port)
        await a.request("mesh/set-my-connection-metadata", {"metadata": {"n": "a"}})
        await watcher.request("mesh/subscribe-presence", {"roomName": "p:api"})
        assert await server.rooms.add_to_room("p:api", a.connection_id) is True
        await server.add_to_room("p:api", b.connection_id)
        assert [u["type"] for u in [await next_update(watcher), await next_update(watcher)]] == [
            "join",
            "join",
        ]
        present = await server.presence.get_present("p:api")
        assert sorted(present) == sorted([a.connection_id, b.connection_id])
        rows = await server.presence.get_present_with_metadata("p:api")
        assert {r["id"]: r["metadata"] for r in rows}[a.connection_id] == {"n": "a"}
        await a.request("mesh/publish-presence-state", {"roomName": "p:api", "state": {"s": 1}})
        assert (await next_update(watcher))["state"] == {"s": 1}
        assert await server.presence.get_states("p:api") == {a.connection_id: {"s": 1}}
        assert await server.presence.get_state("p:api", a.connection_id) == {"s": 1}
        assert await server.presence.get_state("p:api", b.connection_id) is None
        await server.rooms.remove_from_room("p:api", b.connection_id)
        assert (await next_update(watcher))["connectionId"] == b.connection_id
        await server.rooms.add_to_room("p:api", b.connection_id)
        assert (await next_update(watcher))["type"] == "join"
        removed = await server.rooms.clear_room("p:api")
        assert sorted(removed) == sorted([a.connection_id, b.connection_id])
        left = [await next_update(watcher), await next_update(watcher)]
        assert {u["type"] for u in left} == {"leave"}
        assert {u["connectionId"] for u in left} == {a.connection_id, b.connection_id}
        assert await server.presence.get_present("p:api") == []
        assert await server.presence.get_states("p:api") == {}
        await settle(watcher)
        assert updates(watcher) == []
        for c in (a, b, watcher):
            await c.close()


async def test_demo_tracks_p_and_pt_rooms(server_cls: Any) -> None:
    server = server_cls(demo_app, **QUIET)
    async with server.listen():
        c = await WSClient.connect(server.port)
        for room, tracked in (("p:a", True), ("pt:a", True), ("lobby", False), ("xp:a", False)):
            await c.request("mesh/join-room", {"roomName": room})
            answer = await c.request("mesh/subscribe-presence", {"roomName": room})
            assert answer["success"] is tracked, room
        assert server.app.presence.match("pt:a").ttl_ms == 3000
        assert server.app.presence.match("p:a").ttl_ms is None
        await c.close()


# -- the Python client ------------------------------------------------------------


def _client_class(anyio_backend: str) -> Any:
    return mesh_trio.MeshClient if anyio_backend == "trio" else mesh_asyncio.MeshClient


async def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not check():
            await anyio.sleep(0.01)


@asynccontextmanager
async def serve(
    anyio_backend: str, app: MeshApp, port: int = 0, **options: Any
) -> AsyncIterator[Any]:
    cls = mesh_trio.MeshServer if anyio_backend == "trio" else mesh_asyncio.MeshServer
    server = cls(app, **{**QUIET, **options})
    async with server.listen(port=port):
        yield server


async def test_python_client_presence(anyio_backend: str) -> None:
    Client = _client_class(anyio_backend)
    async with serve(anyio_backend, presence_app()) as server:
        url = f"ws://127.0.0.1:{server.port}"
        async with Client(url) as watcher, Client(url) as member:
            seen: list[dict[str, Any]] = []
            present = await watcher.join_room("p:py", on_presence=seen.append)
            assert [p["id"] for p in present] == [watcher.connection_id]
            assert seen == [
                {
                    "type": "sync",
                    "roomName": "p:py",
                    "present": [{"id": watcher.connection_id, "metadata": None}],
                    "states": {},
                }
            ]
            assert watcher.presence_rooms == {"p:py"}
            await member.join_room("p:py")
            await wait_for(lambda: len(seen) == 2)
            assert seen[1]["type"] == "join" and seen[1]["connectionId"] == member.connection_id
            assert await member.publish_presence_state("p:py", {"mood": "ok"}) is True
            assert await member.publish_presence_state("p:py", {"m": 1}, expire_after=300) is True
            await wait_for(lambda: len(seen) == 5)
            assert [u.get("state") for u in seen[2:]] == [{"mood": "ok"}, {"m": 1}, None]
            assert await member.publish_presence_state("p:py", {"q": 1}, silent=True) is True
            got = await watcher.get_presence_state("p:py")
            assert got["success"] is True
            assert sorted(got["present"]) == sorted([watcher.connection_id, member.connection_id])
            assert got["states"] == {member.connection_id: {"q": 1}}
            assert await member.clear_presence_state("p:py") is True
            await wait_for(lambda: len(seen) == 6)
            assert seen[5]["state"] is None
            assert await member.publish_presence_state("nope", {"q": 1}) is False
            # a separate subscription, with an async callback
            other: list[dict[str, Any]] = []

            async def collect(update: dict[str, Any]) -> None:
                other.append(update)

            result = await member.subscribe_presence("p:py", collect)
            assert result["success"] is True and len(result["present"]) == 2
            assert other[0]["type"] == "sync"
            assert await member.unsubscribe_presence("p:py") is True
            assert (await member.subscribe_presence("lobby", collect))["success"] is False
            # leaving the room also stops following it
            assert await watcher.leave_room("p:py") is True
            assert watcher.presence_rooms == frozenset()
            await member.leave_room("p:py")
            await anyio.sleep(0.2)
            # its own leave still reached it (it unsubscribed after leaving);
            # the member's later leave did not
            assert len(seen) == 7
            assert seen[6]["type"] == "leave" and seen[6]["connectionId"] == watcher.connection_id


async def test_python_client_follows_presence_again_after_a_reconnect(anyio_backend: str) -> None:
    Client = _client_class(anyio_backend)
    app = presence_app()
    async with serve(anyio_backend, app, close_timeout=1.0) as server:
        port = server.port
        url = f"ws://127.0.0.1:{port}"
        client = Client(url, reconnect_interval=0.05, max_reconnect_interval=0.2)
        async with client:
            seen: list[dict[str, Any]] = []
            await client.join_room("p:re", on_presence=seen.append)
            first_id = client.connection_id
            await server.close()
            await wait_for(lambda: client.status.value == "reconnecting")
            async with serve(anyio_backend, app, port=port) as restarted:
                other = await WSClient.connect(restarted.port)
                await other.request("mesh/join-room", {"roomName": "p:re"})
                await other.request(
                    "mesh/publish-presence-state", {"roomName": "p:re", "state": {"here": True}}
                )
                await wait_for(lambda: len([u for u in seen if u["type"] == "sync"]) == 2, 10)
                sync = [u for u in seen if u["type"] == "sync"][-1]
                assert client.connection_id != first_id
                assert sorted(p["id"] for p in sync["present"]) == sorted(
                    [client.connection_id, other.connection_id]
                )
                assert sync["states"] == {other.connection_id: {"here": True}}
                # and it is subscribed again: later events arrive
                await other.request("mesh/leave-room", {"roomName": "p:re"})
                await wait_for(lambda: seen[-1]["type"] == "leave")
                assert seen[-1]["connectionId"] == other.connection_id
                await other.close()


# -- the reference client's stand-in (tests/node) ----------------------------------

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(
    NODE is None or not (NODE_DIR / "node_modules" / "ws").is_dir(),
    reason="needs node and `npm ci` in tests/node",
)


def run_node_presence(port: int) -> dict[str, Any]:
    assert NODE is not None
    proc = subprocess.run(
        [NODE, "reference_client.mjs", f"ws://127.0.0.1:{port}", "presence", "p:lobby"],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON from harness (exit {proc.returncode}): {proc.stdout}\n{proc.stderr}"
    result: dict[str, Any] = json.loads(lines[-1])
    assert proc.returncode == 0, json.dumps(result.get("failures"), indent=1)
    return result


@needs_node
@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_reference_client_presence(runtime: str) -> None:
    with ServerThread(runtime, demo_app, **QUIET) as server:
        result = run_node_presence(server.port)
    steps, ids = result["steps"], result["ids"]
    a, b = ids["a"], ids["b"]
    assert steps["b_join"]["success"] is True
    assert [p["id"] for p in steps["b_join"]["present"]] == [b]
    assert steps["a_publish"] is True and steps["a_publish_silent"] is True
    got = steps["a_get_state"]
    assert got["success"] is True and sorted(got["present"]) == sorted([a, b])
    assert got["states"] == {a: {"quiet": 1}}
    assert steps["publish_untracked"] is False
    assert steps["subscribe_untracked"] == {"success": False, "present": [], "states": {}}
    assert steps["publish_without_state"] is False
    assert steps["a_clear_after_expiry"] is True
    assert steps["c_unsubscribe"] is True and steps["c_unsubscribe_again"] is False
    # b's callback: first the subscribe result (b was present), then each
    # change exactly once
    first, *events = result["b_updates"]
    assert first["success"] is True and [p["id"] for p in first["present"]] == [b]
    assert [(e["type"], e["connectionId"], e.get("state")) for e in events] == [
        ("join", a, None),
        ("state", a, {"typing": True}),
        ("state", a, {"typing": False}),
        ("state", a, None),
        ("leave", a, None),
    ]
    # on the wire too: one frame per change, not two
    assert len(result["presence_frames"]["b"]) == 5
    # c subscribed without joining: told the present members, then the rest
    c_first, *c_events = result["c_updates"]
    assert sorted(p["id"] for p in c_first["present"]) == sorted([a, b])
    assert c_first["states"] == {a: {"quiet": 1}}
    assert [e["type"] for e in c_events] == ["state", "state", "leave"]
