"""Operating a server on a real Redis: what clients and the log see when the
store fails (issue 14). Each test runs on both runtimes."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

import anyio
import pytest

from examples.demo import app as demo_app
from tests.helpers.redis_server import RedisServer
from tests.helpers.server_thread import ServerThread
from tests.helpers.wsclient import WSClient
from tests.redis.test_instances import QUIET, raw, redis_store


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_outage_answers_a_generic_error_and_logs_the_driver_text(
    redis_server: RedisServer, runtime: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The client reads a stable code and a generic message; where Redis was
    and why it failed is the operator's business and goes to the log only."""
    caplog.set_level(logging.WARNING, logger="mesh_core")
    store = redis_store(runtime, redis_server.url, command_timeout=0.5, connect_timeout=0.5)
    server = ServerThread(runtime, demo_app, storage=store, **QUIET)
    with server:

        async def scenario() -> None:
            c = await WSClient.connect(server.port)
            await anyio.to_thread.run_sync(redis_server.stop)
            answer = await c.request("mesh/join-room", {"roomName": "lobby"}, timeout=10)
            assert answer == {
                "error": "storage unavailable, safe to retry",
                "code": "EUNAVAILABLE",
                "name": "StorageUnavailable",
            }
            await c.close()

        anyio.run(scenario)
    logged = [r.getMessage() for r in caplog.records if "mesh/join-room" in r.getMessage()]
    assert logged and all("Redis" in line for line in logged)


@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_a_failed_start_leaves_no_registration(redis_server: RedisServer, runtime: str) -> None:
    """The start registers the instance and its heartbeat, then fails (its
    user may not subscribe, and separately its port is taken): nothing of
    the instance is left in Redis for another instance's sweep to find."""
    admin = raw(redis_server.url)
    admin.execute_command("ACL", "SETUSER", "nosub", "on", ">pw", "~*", "&*", "+@all", "-subscribe")
    limited = redis_server.url.replace("redis://", "redis://nosub:pw@")
    store = redis_store(runtime, limited, command_timeout=0.3, connect_timeout=0.3)
    with pytest.raises(BaseException):  # noqa: B017 (either runtime's own error)
        ServerThread(runtime, demo_app, storage=store, **QUIET).__enter__()
    assert admin.smembers("mesh:instances") == set()
    assert admin.keys("mesh:instance:*") == []

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        store = redis_store(runtime, redis_server.url)
        with pytest.raises(BaseException):  # noqa: B017
            ServerThread(runtime, demo_app, storage=store, port=port, **QUIET).__enter__()
    assert admin.smembers("mesh:instances") == set()
    assert admin.keys("mesh:instance:*") == []


@pytest.mark.parametrize("runtime", ["asyncio", "trio"])
def test_outage_warnings_are_rate_limited(
    redis_server: RedisServer, runtime: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Under an outage the first failure is logged, the next ones are counted
    and summarised once per interval, not one warning per command."""
    caplog.set_level(logging.WARNING, logger="mesh_core.server")
    store = redis_store(runtime, redis_server.url, command_timeout=0.2, connect_timeout=0.2)
    server = ServerThread(runtime, demo_app, storage=store, **QUIET)
    with server:
        server.server.outage_log.interval = 1.0

        async def scenario() -> None:
            c = await WSClient.connect(server.port)
            await anyio.to_thread.run_sync(redis_server.stop)
            started = time.monotonic()
            for _ in range(20):
                await c.request("mesh/join-room", {"roomName": "lobby"}, timeout=10)
            assert time.monotonic() - started < 1.0  # (the summary below needs it)
            await anyio.sleep(1.0 - (time.monotonic() - started) + 0.1)
            await c.request("mesh/join-room", {"roomName": "lobby"}, timeout=10)
            await c.close()

        anyio.run(scenario)
    lines = [r.getMessage() for r in caplog.records if r.name == "mesh_core.server"]
    lines = [line for line in lines if "mesh/join-room" in line or "commands failed" in line]
    assert len(lines) == 3, lines  # the first, the summary, the first of the next interval
    assert lines[1].startswith("20 commands failed in the last 1 s: Redis unavailable")
