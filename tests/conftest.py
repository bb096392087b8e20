"""Shared fixtures: every behavioural test body runs on asyncio and on trio.

``anyio_backend`` is parametrized over both runtimes; ``server_cls`` is the
``MeshServer`` of the runtime the test body runs on, so the same test drives
``mesh_asyncio`` on asyncio and ``mesh_trio`` on trio. In the modules of
``ALL_SERVERS_MODULES`` it is also each other server (the embedded selectors
loop, the ASGI app under uvicorn and hypercorn-trio), each a real server process
(``tests.helpers.remote``); for the tests of ``ALL_SERVERS_TESTS``, the same
servers in the test's process (``tests.helpers.servers``).
"""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def server_cls(anyio_backend: str, server_kind: str, request: pytest.FixtureRequest) -> Any:
    import mesh_asyncio
    import mesh_trio

    if server_kind not in ("native", anyio_backend):
        from tests.helpers.remote import PROCESS_SERVERS
        from tests.helpers.servers import SERVERS

        if server_kind == "embedded" and request.node.get_closest_marker("handlers_wait"):
            pytest.skip("the app's handlers wait on an event loop: the embedded loop has none")
        framing = request.node.get_closest_marker("own_framing")
        if framing is not None and server_kind in (framing.args or ASGI_SERVERS):
            pytest.skip("checks Mesh's own HTTP and WebSocket layer: under ASGI, the server's")
        in_process = request.module.__name__ not in ALL_SERVERS_MODULES
        servers = SERVERS if in_process else PROCESS_SERVERS
        return next(cls for _, kind, cls in servers if kind == server_kind)
    return mesh_trio.MeshServer if anyio_backend == "trio" else mesh_asyncio.MeshServer


#: the e2e modules whose ``server_cls`` tests also run against the embedded
#: loop and the ASGI app (uvicorn, hypercorn's trio worker), each a real server
#: process (``tests.helpers.remote``); their apps come from module-level factories
ALL_SERVERS_MODULES = {"tests.e2e.test_protocol", "tests.e2e.test_demo", "tests.e2e.test_limits"}
ASGI_SERVERS = {"uvicorn", "hypercorn-trio"}
#: single tests elsewhere that do the same, for the servers named, in the test's
#: own process (``tests.helpers.servers``): the slow consumer's test bounds the
#: memory of the process that serves it
ALL_SERVERS_TESTS = {
    "test_slow_consumer_is_dropped_and_the_room_gets_everything": {"embedded", *ASGI_SERVERS},
}


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    name = metafunc.function.__name__
    if "server_cls" not in metafunc.fixturenames:
        return
    if metafunc.module.__name__ in ALL_SERVERS_MODULES or name in ALL_SERVERS_TESTS:
        from tests.helpers.servers import SERVERS

        others = ALL_SERVERS_TESTS.get(name)
        servers = [s for s in SERVERS if s[2] is None or others is None or s[1] in others]
        metafunc.parametrize(
            ("anyio_backend", "server_kind"),
            [(backend, kind) for backend, kind, _ in servers],
            ids=[kind for _, kind, _ in servers],
        )


@pytest.fixture
def server_kind() -> str:
    """The server ``server_cls`` makes where only ``MeshServer`` runs: the native one."""
    return "native"


def pytest_sessionfinish(session: pytest.Session) -> None:
    import sys

    remote = sys.modules.get("tests.helpers.remote")
    if remote is not None:
        remote.stop_all()
