"""The README's Python snippets run, and do what the README says."""

from __future__ import annotations

import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.wsclient import WSClient

ROOT = Path(__file__).resolve().parents[2]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def namespace_of(marker: str) -> dict[str, Any]:
    (block,) = [b for b in BLOCKS if marker in b]
    namespace: dict[str, Any] = {"__name__": "readme_snippet"}
    exec(compile(block, "README.md", "exec"), namespace)
    return namespace


def test_every_block_compiles() -> None:
    assert len(BLOCKS) >= 8
    for block in BLOCKS:
        compile(block, "README.md", "exec")


@pytest.mark.parametrize(
    "marker", ["# example: quick start on asyncio", "# example: quick start on trio"]
)
def test_quick_starts_run(marker: str) -> None:
    """A quick start serves until Ctrl-C, then exits cleanly (status 0)."""
    (block,) = [b for b in BLOCKS if b.startswith(marker)]
    proc = subprocess.Popen(
        [sys.executable, "-c", block],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        first = proc.stdout.readline() if ready else ""
        time.sleep(0.5)
        assert proc.poll() is None, "the quick start exited instead of serving"
        proc.send_signal(signal.SIGINT)
        rest, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc_stdout = first + rest
    assert proc.returncode == 0, stderr
    assert re.search(r"listening on port \d+", proc_stdout)


def test_client_example_runs() -> None:
    (block,) = [b for b in BLOCKS if b.startswith("# example: client on asyncio")]
    proc = subprocess.run(
        [sys.executable, "-c", block], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("connected as conn-")
    assert lines[1] == "{'hello': 'world'}"
    assert "'name': 'alice'" in lines[2] and "connectedAt" in lines[2]
    assert lines[3] == "None"  # the lobby has no metadata
    assert "chat: hi" in lines
    assert "ESERVER Error Insufficient permissions" in lines


@pytest.mark.anyio
async def test_metadata_snippets_do_what_they_say(server_cls: Any) -> None:
    conn_ns = namespace_of("async def identify")
    server = server_cls(conn_ns["app"], ping_interval=0, latency_interval=0)
    async with server.listen():
        client = await WSClient.connect(server.port)
        assert await server.connections.get_metadata(client.connection_id) == {
            "userId": "user123",
            "role": "admin",
            "status": "online",
            "prefs": {"theme": "dark"},
            "visits": 1,
        }
        await client.close()

    room_ns = namespace_of('@app.command("room-demo")')
    server = server_cls(room_ns["app"], ping_interval=0, latency_interval=0)
    async with server.listen():
        client = await WSClient.connect(server.port)
        assert await client.request("room-demo") is None
        assert await server.rooms.get_all_metadata() == []
        await client.close()

    shout_ns = namespace_of('@app.command("shout")')
    server = server_cls(shout_ns["app"], ping_interval=0, latency_interval=0)
    async with server.listen():
        caller = await WSClient.connect(server.port)
        other = await WSClient.connect(server.port)
        await other.request("mesh/join-room", {"roomName": "lobby"})
        assert await caller.request("shout") is None
        await other.wait_for(lambda: len(other.pushes) >= 5)
        got = [
            (p["command"], p["payload"]["text"])
            for p in other.pushes
            if p["command"] != "mesh/assign-id"
        ]
        assert got == [
            ("announcement", "hi all"),
            ("chat", "hi lobby"),
            ("announcement", "not you"),
            ("chat", "others"),
        ]
        await caller.wait_for(lambda: any(p["command"] == "direct" for p in caller.pushes))
        assert [p["command"] for p in caller.pushes if p["command"] != "mesh/assign-id"] == [
            "announcement",
            "direct",
        ]
        await caller.close()
        await other.close()


@pytest.mark.anyio
async def test_auth_and_policy_snippets(server_cls: Any) -> None:
    from tests.helpers.wsclient import Rejected

    auth_ns = namespace_of("async def authenticate")
    server = server_cls(auth_ns["app"], ping_interval=0, latency_interval=0)
    async with server.listen():
        with pytest.raises(Rejected) as missing:
            await WSClient.connect(server.port)
        assert missing.value.status == 401
        with pytest.raises(Rejected) as banned:
            await WSClient.connect(server.port, "/?token=banned")
        assert banned.value.status == 403
        ok = await WSClient.connect(server.port, "/", headers=[(b"cookie", b"session=abc")])
        assert await ok.request("mesh/get-my-connection-metadata") == {
            "metadata": {"userId": "user123", "role": "moderator"}
        }
        await ok.close()

    policy_ns = namespace_of("client_metadata_writes=")
    for app_name, role_allowed in (("locked", False), ("guarded", False)):
        server = server_cls(policy_ns[app_name], ping_interval=0, latency_interval=0)
        async with server.listen():
            c = await WSClient.connect(server.port)
            assert await c.request(
                "mesh/set-my-connection-metadata", {"metadata": {"role": "x"}}
            ) == {"success": role_allowed}
            expected = app_name == "guarded"
            assert await c.request(
                "mesh/set-my-connection-metadata", {"metadata": {"name": "x"}}
            ) == {"success": expected}
            await c.close()
