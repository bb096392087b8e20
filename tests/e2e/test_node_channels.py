"""Channels with a JavaScript Mesh client (tests/node: the reference client
when installable, else the stand-in written from its source) against
examples/demo.py, both runtimes: subscribe with and without history, order,
history reads, guards, refusals, unsubscribe, bad input, trimming."""

from __future__ import annotations

import pytest

from examples.demo import app
from tests.e2e.test_node_client import pytestmark as node_needed
from tests.e2e.test_node_client import run_harness
from tests.helpers.server_thread import ServerThread

pytestmark = node_needed


@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_js_client_channels_against_demo(runtime: str) -> None:
    with ServerThread(runtime, app) as server:
        result = run_harness(f"ws://127.0.0.1:{server.port}", "channels")
        assert result["ok"] is True and not result["failed_checks"], result["failures"]
        steps = result["steps"]
        assert steps["subscribe_with_history"] == {"success": True, "history": ["old4", "old5"]}
        assert steps["subscribe_admin_denied"] == {"success": False, "history": []}
        assert steps["negative_history_limit"]["code"] == "EINVAL"
        live = [f"live{i}" for i in range(10)]
        assert result["got"] == ["old4", "old5", *live]
        pushes = [
            w["frame"]["payload"]
            for w in result["wire"]
            if w["dir"] == "in" and w["frame"].get("command") == "mesh/subscription-message"
        ]
        assert {"channel": "chat:general", "message": "live0", "offset": 6} in [
            {k: v for k, v in p.items() if k != "epoch"} for p in pushes
        ]
