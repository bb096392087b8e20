"""Operating a server on a real Redis: what clients and the log see when the
store fails (issue 14). Each test runs on both runtimes."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import anyio
import pytest

from examples.demo import app as demo_app
from tests.helpers.redis_server import RedisServer
from tests.helpers.server_thread import ServerThread
from tests.helpers.wsclient import WSClient
from tests.redis.test_instances import QUIET, redis_store


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
