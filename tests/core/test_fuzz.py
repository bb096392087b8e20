"""Property tests of the whole core (connection state machine + ServerCore
dispatch + built-ins + memory store), without sockets or an event loop.

The server's tasks are plain coroutines that a test scheduler steps in an
order hypothesis picks, so handlers overlap, finish out of order and meet the
in-flight limit. What must hold for any input: nothing raises; every request
gets exactly one response, or the connection closes with a protocol code.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Generator
from typing import Any, cast

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Request, TextMessage

from mesh_core import Context, MeshApp, ServerCore
from mesh_core.app import BUILTINS
from mesh_core.protocol import State
from mesh_core.runtime import CollectingTaskGroup, Runtime

MAX_DEPTH = 6
BUDGET = 4
LIMIT = 2
INT64 = range(-(2**63), 2**63)
PROTOCOL_CODES = {1002, 1007, 1008, 1009}


class _Yield:
    """Suspend a coroutine once, like a real await on I/O would."""

    def __await__(self) -> Generator[None, None, None]:
        yield


class _ZeroClock:
    """The one runtime service the core uses outside serving(): a clock."""

    name = "fake"

    def now(self) -> float:
        return 0.0


class SteppedServer(ServerCore):
    """A ServerCore whose tasks are stepped by the test."""

    def __init__(self, app: MeshApp, **options: Any) -> None:
        super().__init__(app, runtime=cast(Runtime, _ZeroClock()), **options)
        self._group = group = CollectingTaskGroup()
        self.tasks = group.started

    def discard(self) -> None:
        """Close tasks left when hypothesis abandons an example midway."""
        for task in self.tasks:
            task.close()
        self.tasks.clear()

    def step(self, index: int) -> None:
        task = self.tasks[index]
        try:
            task.send(None)
        except StopIteration:
            del self.tasks[index]


def make_app(running: list[int]) -> MeshApp:
    app = MeshApp()

    @app.command("echo")
    async def echo(ctx: Context) -> Any:
        return ctx.payload

    @app.command("later")
    async def later(ctx: Context) -> Any:
        running[0] += 1
        running[1] = max(running[1], running[0])
        try:
            for _ in range(3):
                await _Yield()
        finally:
            running[0] -= 1
        return ctx.id

    @app.command("boom")
    async def boom(ctx: Context) -> Any:
        raise ValueError("app bug")

    return app


class Harness:
    def __init__(self, pick: Callable[[int], int]) -> None:
        self.running = [0, 0]  # handlers running now, most ever at once
        self.server = SteppedServer(
            make_app(self.running),
            ping_interval=0,
            latency_interval=0,
            max_json_depth=MAX_DEPTH,
            max_violations=BUDGET,
            max_requests_in_flight=LIMIT,
            max_message_size=16 * 1024,
        )
        self.pick = pick
        self.proto = self.server.new_protocol(("10.0.0.1", 5), 0.0)
        self.client = WSConnection(ConnectionType.CLIENT)
        self.responses: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.feed(self.client.send(Request(host="x", target="/")))
        while self.server.tasks:  # the handshake, in order (draws nothing)
            self.server.step(0)
            self.drain()
        assert self.proto.state is State.OPEN

    def feed(self, data: bytes) -> None:
        self.proto.receive_data(data, 0.0)
        self.drain()

    def drain(self) -> None:
        events = self.proto.events()
        if events:
            self.server.handle_events(self.proto, events)
        data = self.proto.data_to_send()
        if data:
            self.client.receive_data(data)
        for event in self.client.events():
            if isinstance(event, TextMessage):
                frame = json.loads(event.data)
                if "id" in frame:
                    self.responses.append(frame)
            elif isinstance(event, CloseConnection):
                self.close_code = event.code
            else:
                assert isinstance(event, AcceptConnection)

    def run(self, steps: int | None = None) -> None:
        """Step tasks (all of them, or ``steps``) in the order ``pick`` says."""
        done = 0
        while True:
            self.drain()
            assert self.proto.requests_in_flight <= LIMIT
            if not self.server.tasks or (steps is not None and done >= steps):
                return
            self.server.step(self.pick(len(self.server.tasks)))
            done += 1


TEXT = st.text(max_size=8)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
)
JSON = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(TEXT, children, max_size=3),
    max_leaves=10,
)


@st.composite
def deep(draw: st.DrawFn) -> Any:
    """Payloads around the depth limit."""
    value: Any = draw(SCALARS)
    for _ in range(draw(st.integers(MAX_DEPTH - 3, MAX_DEPTH + 1))):
        value = [value] if draw(st.booleans()) else {"k": value}
    return value


IDS = st.one_of(
    st.integers(min_value=-(2**31), max_value=2**31),
    st.integers(),  # sometimes beyond 64 bits
    st.sampled_from([2**63 - 1, -(2**63), 2**63, 99_999_999]),
    JSON,
)
COMMANDS = st.one_of(
    st.sampled_from(
        [
            "echo",
            "later",
            "boom",
            "nope",
            "pong",
            "latency:response",
            *sorted(BUILTINS),
        ]
    ),
    TEXT,
    JSON,
)


@st.composite
def frames(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)  # often not an object
    frame: dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        frame["command"] = draw(COMMANDS)
    if draw(st.integers(0, 5)):
        frame["id"] = draw(IDS)
    if draw(st.booleans()):
        frame["payload"] = draw(st.one_of(JSON, deep()))
    return frame


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


def classify(frame: Any) -> str:
    """What the core must make of a frame: "violation", "request" or "other"."""
    if not isinstance(frame, dict) or not isinstance(frame.get("command"), str):
        return "violation"
    fid = frame.get("id")
    if fid is not None and (not isinstance(fid, int) or isinstance(fid, bool) or fid not in INT64):
        return "violation"
    if 1 + depth(frame.get("payload")) > MAX_DEPTH:
        return "violation"
    if fid is None or frame["command"] in ("pong", "latency:response"):
        return "other"
    return "request"


@settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    batch=st.lists(st.tuples(frames(), st.booleans(), st.integers(0, 3)), max_size=14),
    data=st.data(),
)
def test_every_request_is_answered_once_or_the_connection_closes(
    batch: list[tuple[Any, bool, int]], data: st.DataObject
) -> None:
    h = Harness(lambda n: data.draw(st.integers(0, n - 1)))
    try:
        check_requests(h, batch)
    finally:
        h.server.discard()


def check_requests(h: Harness, batch: list[tuple[Any, bool, int]]) -> None:
    expected: Counter[int] = Counter()
    violations = 0
    for frame, binary, steps in batch:
        text = json.dumps(frame)
        event = BytesMessage(data=text.encode()) if binary else TextMessage(data=text)
        if h.proto.state is State.OPEN:
            h.feed(h.client.send(event))
        kind = classify(frame)
        if violations <= BUDGET:
            if kind == "violation":
                violations += 1
            elif kind == "request":
                expected[frame["id"]] += 1
        h.run(steps)
    h.run()
    answered = Counter(r["id"] for r in h.responses)
    assert h.running[1] <= LIMIT  # never more handlers at once than the limit
    assert h.server.metrics()["violations"] == h.proto.violations
    if violations > BUDGET:
        assert h.proto.state is State.CLOSING
        assert h.close_code == 1008
        assert not answered - expected  # nothing answered that was not asked
    else:
        assert h.proto.state is State.OPEN
        assert h.close_code is None
        assert answered == expected
        assert h.proto.violations == violations
        assert h.proto.requests_in_flight == 0 and h.proto.requests_queued == 0
    for response in h.responses:
        assert set(response) == {"id", "command", "payload"}


@settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    chunks=st.lists(
        st.one_of(
            # junk, never a clean close frame (0x88: FIN + close), which would
            # close with the client's own code (1005), not a protocol error
            st.binary(max_size=200).filter(lambda b: not b.startswith(b"\x88")),
            st.builds(lambda f: json.dumps(f).encode(), frames()),
        ),
        max_size=8,
    ),
    data=st.data(),
)
def test_arbitrary_bytes_never_raise_and_close_with_a_protocol_code(
    chunks: list[bytes], data: st.DataObject
) -> None:
    h = Harness(lambda n: data.draw(st.integers(0, n - 1)))
    try:
        check_bytes(h, chunks, data)
    finally:
        h.server.discard()


def check_bytes(h: Harness, chunks: list[bytes], data: st.DataObject) -> None:
    for chunk in chunks:
        # raw bytes on the socket: usually not even a WebSocket frame
        h.feed(chunk)
        h.run(data.draw(st.integers(0, 3)))
    h.run()
    if h.proto.state is not State.OPEN:
        assert h.proto.close_code in PROTOCOL_CODES
    h.proto.receive_data(None, 1.0)
    h.drain()
    h.run()
    assert h.proto.state is State.CLOSED
    assert h.server.connections.local_connections() == []
    assert h.server.metrics()["connections_current"] == 0
