"""Presence in the core, no sockets: the rules, the built-ins as generators,
and the hub on a simulated clock (two servers sharing one MemoryStore)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import pytest

from mesh_core import MemoryStore, MeshApp, ValidationError
from mesh_core.app import BUILTINS, PresenceRules
from mesh_core.app._presence import (
    PresenceAllowed,
    PresenceStep,
    SetState,
    SubscribeUpdates,
    _falsy,
)
from mesh_core.runtime import Runtime
from mesh_core.storage import _ops as ops
from tests.core.test_builtins import drive
from tests.core.test_dispatch import Client, FakeServer, connect

pytestmark = pytest.mark.anyio

UPDATE = "mesh/presence-update"


# -- rules ------------------------------------------------------------------------


def test_rules_match_names_exactly_and_patterns_with_search() -> None:
    rules = PresenceRules()
    assert not rules and rules.match("x") is None
    rules.track("lobby")
    rules.track(re.compile(r"^p:"), ttl=1500.2)
    rules.track(re.compile(r"chat"), ttl=10)
    assert rules
    assert rules.match("lobby") is not None and rules.match("lobby2") is None
    assert rules.match("p:1") is not None and rules.match("xp:1") is None
    track = rules.match("p:chat")  # first match wins
    assert track is not None and track.ttl_ms == 1501
    other = rules.match("a-chat-b")  # search, not match
    assert other is not None and other.ttl_ms == 10
    assert not rules.guarded
    rules.track("g", guard=lambda connection, room: True)
    assert rules.guarded


@pytest.mark.parametrize(
    "args",
    [
        {"pattern": 5},
        {"pattern": ""},
        {"pattern": "r", "ttl": 0},
        {"pattern": "r", "ttl": -1},
        {"pattern": "r", "ttl": True},
        {"pattern": "r", "ttl": "3000"},
        {"pattern": "r", "guard": "yes"},
    ],
)
def test_track_presence_refuses_bad_arguments(args: dict[str, Any]) -> None:
    app = MeshApp()
    pattern = args.pop("pattern")
    with pytest.raises((TypeError, ValueError)):
        app.track_presence(pattern, **args)
    assert not app.presence


def test_javascript_falsiness_of_a_state() -> None:
    falsy: list[Any] = [None, False, 0, 0.0, "", float("nan")]
    truthy: list[Any] = [{}, [], "0", 1, True, {"a": 1}, -1]
    assert all(_falsy(value) for value in falsy)
    assert not any(_falsy(value) for value in truthy)


# -- built-ins as generators -----------------------------------------------------------


def run(command: str, payload: Any, store: MemoryStore, allowed: bool = True) -> Any:
    """Drive a presence built-in for ``c1``: the guard answers ``allowed``,
    the server's other steps ``None``; returns (result, the ops it yielded)."""
    log: list[ops.Op] = []
    steps = BUILTINS[command]("c1", payload)
    try:
        op = next(steps)
        while True:
            log.append(op)
            if isinstance(op, PresenceAllowed):
                result: Any = allowed
            elif isinstance(op, PresenceStep):
                result = None
            else:
                result = store.apply(op)
            op = steps.send(result)
    except StopIteration as stop:
        return stop.value, log


@pytest.fixture
def store() -> MemoryStore:
    s = MemoryStore()
    s.apply(ops.RegisterConnection("c1", "i1", {"name": "alice"}))
    s.apply(ops.AddToRoom("p:r", "c1"))
    s.apply(ops.MarkPresent("p:r", "c1"))
    s.apply(ops.StorePresenceState("p:r", "c1", b'{"typing":true}'))
    return s


def test_subscribe_is_made_before_the_snapshot_is_read(store: MemoryStore) -> None:
    result, log = run("mesh/subscribe-presence", {"roomName": "p:r"}, store)
    assert result == {
        "success": True,
        "present": [{"id": "c1", "metadata": {"name": "alice"}}],
        "states": {"c1": {"typing": True}},
    }
    kinds = [type(op) for op in log]
    assert kinds.index(SubscribeUpdates) < kinds.index(ops.GetPresent)


def test_refused_subscribe_and_get_touch_nothing(store: MemoryStore) -> None:
    for command in ("mesh/subscribe-presence", "mesh/get-presence-state"):
        result, log = run(command, {"roomName": "p:r"}, store, allowed=False)
        assert result == {"success": False, "present": []}
        assert [type(op) for op in log] == [PresenceAllowed]


def test_publish_checks_state_then_guard_then_membership(store: MemoryStore) -> None:
    result, log = run("mesh/publish-presence-state", {"roomName": "p:r", "state": 0}, store)
    assert result is False and log == []
    result, log = run(
        "mesh/publish-presence-state",
        {"roomName": "p:r", "state": {"a": 1}, "expireAfter": 250.5, "silent": 1},
        store,
    )
    assert result is True
    assert log[-1] == SetState("p:r", "c1", {"a": 1}, 251, True)
    result, log = run("mesh/publish-presence-state", {"roomName": "p:x", "state": {"a": 1}}, store)
    assert result is False and isinstance(log[-1], ops.IsInRoom)
    with pytest.raises(ValidationError):
        run("mesh/clear-presence-state", {"roomName": 1}, store)


def test_get_presence_state_lists_ids(store: MemoryStore) -> None:
    result, _ = run("mesh/get-presence-state", {"roomName": "p:r"}, store)
    assert result == {"success": True, "present": ["c1"], "states": {"c1": {"typing": True}}}
    # the test helper of the other built-ins still drives these generators
    assert drive(BUILTINS["mesh/noop"]("c1", {}), store) is True


# -- the hub, on a simulated clock ------------------------------------------------------


class _Event:
    def __init__(self) -> None:
        self.flag = False

    def set(self) -> None:
        self.flag = True

    def is_set(self) -> bool:
        return self.flag

    async def wait(self) -> None:
        raise AssertionError("the simulated clock never waits")


class SimRuntime:
    """Time jumps to each deadline the timers ask for."""

    name = "sim"

    def __init__(self) -> None:
        self.clock = 1000.0

    def now(self) -> float:
        return self.clock

    def wall_ms(self) -> int:
        return int(self.clock * 1000)

    def event(self) -> _Event:
        return _Event()

    @asynccontextmanager
    async def timeout(self, seconds: float) -> AsyncIterator[None]:
        self.clock += seconds
        raise TimeoutError
        yield  # pragma: no cover


class SimServer(FakeServer):
    def __init__(self, app: MeshApp, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.sim = SimRuntime()
        self.runtime = cast(Runtime, self.sim)

    @property
    def clock(self) -> float:
        return self.sim.clock

    @clock.setter
    def clock(self, value: float) -> None:
        self.sim.clock = value


def updates(client: Client) -> list[dict[str, Any]]:
    return [f["payload"] for f in client.frames() if f.get("command") == UPDATE]


async def two_servers(app: MeshApp) -> tuple[SimServer, SimServer]:
    store = MemoryStore()
    a = SimServer(app, storage=store, instance_id="inst-a")
    b = SimServer(app, storage=store, instance_id="inst-b")
    for server in (a, b):
        await server.start_storage()
    return a, b


def tracked(**track: Any) -> MeshApp:
    app = MeshApp()
    app.track_presence(re.compile(r"^p:"), **track)
    return app


async def test_each_change_reaches_each_subscriber_once_across_instances() -> None:
    a, b = await two_servers(tracked())
    member = await connect(a, "m1")
    watchers = [await connect(a, "wa1"), await connect(a, "wa2"), await connect(b, "wb1")]
    for w in watchers:
        await w.request("mesh/subscribe-presence", {"roomName": "p:1"})
    await member.request("mesh/join-room", {"roomName": "p:1"})
    await member.request("mesh/join-room", {"roomName": "p:1"})  # no second join
    await member.request("mesh/publish-presence-state", {"roomName": "p:1", "state": {"s": 1}})
    await member.request("mesh/leave-room", {"roomName": "p:1"})
    for w in watchers:
        got = updates(w)
        assert [(u["type"], u.get("state")) for u in got] == [
            ("join", None),
            ("state", {"s": 1}),
            ("leave", None),
        ], w.conn.id
        assert all(u["connectionId"] == "m1" and u["roomName"] == "p:1" for u in got)
    # one store subscription per instance, gone with the last subscriber
    for w in watchers:
        await w.request("mesh/unsubscribe-presence", {"roomName": "p:1"})
    assert not a.pubsub.channels() and not b.pubsub.channels()


async def test_ttl_runs_out_on_the_holders_clock_then_a_pong_brings_it_back() -> None:
    a, b = await two_servers(tracked(ttl=3000))
    member = await connect(a, "m1")
    watcher = await connect(b, "w1")
    await watcher.request("mesh/subscribe-presence", {"roomName": "p:1"})
    await member.request("mesh/join-room", {"roomName": "p:1"})
    assert [u["type"] for u in updates(watcher)] == ["join"]
    joined_at = a.clock
    # a pong one second later pushes the deadline back
    a.clock += 1.0
    await a._presence.pong("m1")
    await a.run_spawned()  # the timers' task: simulated time runs to the end
    assert a.clock == pytest.approx(joined_at + 4.0)
    (leave,) = updates(watcher)
    assert leave["type"] == "leave" and leave["timestamp"] == int((joined_at + 4.0) * 1000)
    assert await b.presence.get_present("p:1") == []
    # still in the room: its next pong makes it present again, with a join
    assert await a.rooms.is_in_room("p:1", "m1")
    await a._presence.pong("m1")
    assert [u["type"] for u in updates(watcher)] == ["join"]
    # gone for good: one leave
    a._connection_lost(member.conn)
    await a.run_spawned()
    assert [u["type"] for u in updates(watcher)] == ["leave"]
    assert len(a._presence._timers) == 0


async def test_expire_after_clears_once_and_a_replaced_state_survives() -> None:
    a, b = await two_servers(tracked())
    member = await connect(a, "m1")
    watcher = await connect(b, "w1")
    await member.request("mesh/join-room", {"roomName": "p:1"})
    await watcher.request("mesh/subscribe-presence", {"roomName": "p:1"})
    await member.request(
        "mesh/publish-presence-state", {"roomName": "p:1", "state": {"v": 1}, "expireAfter": 500}
    )
    await a.run_spawned()
    assert [u["state"] for u in updates(watcher)] == [{"v": 1}, None]
    assert await b.presence.get_state("p:1", "m1") is None
    await member.request(
        "mesh/publish-presence-state", {"roomName": "p:1", "state": {"v": 2}, "expireAfter": 500}
    )
    await member.request("mesh/publish-presence-state", {"roomName": "p:1", "state": {"v": 3}})
    await a.run_spawned()
    assert [u["state"] for u in updates(watcher)] == [{"v": 2}, {"v": 3}]
    assert await b.presence.get_states("p:1") == {"m1": {"v": 3}}


async def test_a_vanished_entry_is_present_again_at_the_next_pong() -> None:
    a, b = await two_servers(tracked())
    member = await connect(a, "m1")
    watcher = await connect(b, "w1")
    await member.request("mesh/join-room", {"roomName": "p:1"})
    await watcher.request("mesh/subscribe-presence", {"roomName": "p:1"})
    a.storage.apply(ops.MarkAbsent("p:1", "m1"))  # type: ignore[attr-defined]
    await a._presence.pong("m1")
    assert [u["type"] for u in updates(watcher)] == ["join"]
    await a._presence.pong("m1")  # present: a pong is no event
    assert updates(watcher) == []


async def test_the_guard_sees_the_connection_and_failing_guards_refuse() -> None:
    app = MeshApp()
    seen: list[tuple[str, str]] = []

    def guard(connection: Any, room: str) -> bool:
        seen.append((connection.id, room))
        if room == "boom":
            raise RuntimeError("guard bug")
        return bool(connection.id == "ok")

    app.track_presence("room", guard=guard)
    app.track_presence("boom", guard=guard)
    server = SimServer(app, storage=MemoryStore(), instance_id="inst")
    await server.start_storage()
    ok, no = await connect(server, "ok"), await connect(server, "no")
    assert (await ok.request("mesh/subscribe-presence", {"roomName": "room"}))["success"]
    assert not (await no.request("mesh/subscribe-presence", {"roomName": "room"}))["success"]
    assert not (await ok.request("mesh/subscribe-presence", {"roomName": "boom"}))["success"]
    assert seen == [("ok", "room"), ("no", "room"), ("ok", "boom")]
    # a guarded presence command never runs inline (the guard may await)
    assert not server._runs_inline("mesh/subscribe-presence")
    assert server._runs_inline("mesh/unsubscribe-presence")
