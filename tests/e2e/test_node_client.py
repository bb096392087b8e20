"""A JavaScript Mesh client (tests/node) against examples/demo.py, both runtimes,
and against the demo on examples/embedded.py and examples/asgi_app.py (processes).

The harness drives the reference client when it is installable
(``@mesh-kit/client``); otherwise tests/node/mesh_client_shim.mjs, a stand-in
that reproduces the reference client's API and wire behaviour. The test is
skipped when Node.js or the harness's dependencies are missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.server_process import serve_demo

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(
    NODE is None or not (NODE_DIR / "node_modules" / "ws").is_dir(),
    reason="needs node and `npm ci` in tests/node",
)


#: MeshServer on each runtime, the embedded loop, the ASGI app (uvicorn, hypercorn-trio)
SERVERS = ["asyncio", "trio", "embedded", "uvicorn", "hypercorn-trio"]


def run_harness(
    *args: str, timeout: float = 60, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    assert NODE is not None
    proc = subprocess.run(
        [NODE, "reference_client.mjs", *args],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON from harness (exit {proc.returncode}): {proc.stdout}\n{proc.stderr}"
    result: dict[str, Any] = json.loads(lines[-1])
    assert proc.returncode == 0, json.dumps(result.get("failed_checks"), indent=1)
    return result


@pytest.mark.parametrize("runtime", SERVERS)
def test_js_client_scenario_against_demo(runtime: str) -> None:
    with serve_demo(runtime) as server:
        result = run_harness(server.url)
        steps = result["steps"]
        assert result["ok"] is True and not result["failed_checks"]
        assert steps["echo"] == {"hello": "world", "n": [1, 2, 3]}
        assert steps["noop"] is True
        assert steps["unknown_command"] == {
            "error": 'Command "no-such-command" not found',
            "code": "ENOTFOUND",
            "name": "CommandError",
        }
        assert steps["room_metadata_after_join"]["memberCount"] == 1
        assert steps["room_metadata_after_leave"]["memberCount"] == 0
        assert steps["chat_push"] == {"text": "yo"}


@pytest.mark.parametrize("runtime", SERVERS)
def test_js_client_stays_connected_when_idle(runtime: str) -> None:
    # the client requires pings: with a 1 s ping timeout, a server that did not
    # ping every second would make it reconnect within the 4 s idle window
    with serve_demo(runtime, ping_interval=0.5, latency_interval=0.3) as server:
        result = run_harness(server.url, "idle", "4", "1000", "1")
        assert result["ok"] is True
        assert result["counts"]["reconnect"] == 0
        assert result["wire_counts"]["ping_in"] >= 5
        assert result["wire_counts"]["pong_out"] >= 5
        assert result["wire_counts"]["latency_in"] >= 1
