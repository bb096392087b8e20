"""The inline runtime: ServerCore driven with no event loop on the memory store
(what examples/embedded.py relies on), over a ServerConnection fed by hand."""

from __future__ import annotations

import json
import time

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from examples.demo import app as demo_app
from mesh_core import ServerCore
from mesh_core.runtime import InlineRuntime, run_inline


def test_run_inline_returns_the_result() -> None:
    async def answer() -> int:
        return 42

    assert run_inline(answer()) == 42


def test_run_inline_refuses_a_coroutine_that_suspends() -> None:
    class Suspend:
        def __await__(self):  # what a real wait does: yield to the loop
            yield

    async def waits() -> None:
        await Suspend()

    with pytest.raises(RuntimeError, match="suspended"):
        run_inline(waits())


def test_inline_runtime_runs_the_demo_app_by_hand() -> None:
    runtime = InlineRuntime(time.monotonic, lambda: int(time.time() * 1000))
    core = ServerCore(demo_app, runtime=runtime, ping_interval=0, latency_interval=0)
    run_inline(core.start_storage())
    serving = core.serving()
    run_inline(serving.__aenter__())
    proto = core.new_protocol(("127.0.0.1", 1), time.monotonic())
    client = WSConnection(ConnectionType.CLIENT)
    proto.receive_data(client.send(Request(host="x", target="/")), time.monotonic())
    core.handle_events(proto, proto.events())  # the handshake and hooks run right here
    client.receive_data(proto.data_to_send())
    got = list(client.events())
    assert isinstance(got[0], AcceptConnection)
    assert [json.loads(e.data)["command"] for e in got[1:] if isinstance(e, TextMessage)] == [
        "mesh/assign-id"
    ]
    frame = {"id": 1, "command": "echo", "payload": {"a": 1}}
    proto.receive_data(client.send(TextMessage(json.dumps(frame))), time.monotonic())
    core.handle_events(proto, proto.events())  # an app handler, run to completion
    client.receive_data(proto.data_to_send())
    (echoed,) = [json.loads(e.data) for e in client.events() if isinstance(e, TextMessage)]
    assert echoed == frame
    assert core.metrics()["connections_current"] == 1
    proto.receive_data(None, time.monotonic())
    core.handle_events(proto, proto.events())  # the cleanup, inline too
    assert core.metrics()["connections_current"] == 0
    run_inline(serving.__aexit__(None, None, None))
    run_inline(core.stop_storage())
