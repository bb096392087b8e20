"""Client ergonomics (issue 14): ``client.on`` as a decorator, close code and
reason on ``disconnect``/``close``, an oversized request refused before it is
sent, one spelling of each strategy name. Real sockets, both runtimes."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import mesh_asyncio
import mesh_trio
from mesh_core import Context, MeshApp, MessageTooLarge, ValidationError
from mesh_core.client import ClientCore
from mesh_core.storage import apply_strategy

pytestmark = pytest.mark.anyio


def _client_class(backend: str) -> Any:
    return mesh_asyncio.MeshClient if backend == "asyncio" else mesh_trio.MeshClient


def _app() -> MeshApp:
    app = MeshApp()

    @app.command("echo")
    async def echo(ctx: Context) -> Any:
        return ctx.payload

    @app.command("shout")
    async def shout(ctx: Context) -> Any:
        return ctx.connection.send("chat", "hi")

    return app


async def _until(condition: Any) -> None:
    with anyio.fail_after(5):
        while not condition():
            await anyio.sleep(0.01)


async def test_on_as_a_decorator(server_cls: Any, anyio_backend: str) -> None:
    server = server_cls(_app(), ping_interval=0, latency_interval=0)
    async with server.listen(), _client_class(anyio_backend)(f"ws://127.0.0.1:{server.port}") as c:
        client: ClientCore = c
        seen: list[Any] = []

        @client.on("chat")
        def on_chat(payload: Any) -> None:
            seen.append(payload)

        assert callable(on_chat)  # the decorator hands the function back
        assert await client.command("shout") is True
        await _until(lambda: seen == ["hi"])


async def test_disconnect_and_close_carry_code_and_reason(
    server_cls: Any, anyio_backend: str
) -> None:
    """A server shutting down (1001) reads differently from a client closing
    itself (1000); callbacks without an argument keep working."""
    server = server_cls(_app(), ping_interval=0, latency_interval=0)
    events: list[tuple[str, int, str]] = []
    bare: list[str] = []
    async with server.listen():
        url = f"ws://127.0.0.1:{server.port}"
        async with _client_class(anyio_backend)(url, reconnect=False) as client:
            client.on("disconnect", lambda closed: events.append(("disconnect", closed.code, "")))
            client.on("close", lambda closed: events.append(("close", closed.code, closed.reason)))
            client.on("close", lambda: bare.append("close"))
            await server.close()
            await _until(lambda: len(events) == 2)
    assert events[0] == ("disconnect", 1001, "")
    assert events[1][:2] == ("close", 1001)
    assert bare == ["close"]

    server = server_cls(_app(), ping_interval=0, latency_interval=0)
    async with server.listen():
        async with _client_class(anyio_backend)(f"ws://127.0.0.1:{server.port}") as client:
            closes: list[int] = []
            client.on("close", lambda closed: closes.append(closed.code))
        assert closes == [1000]


async def test_an_oversized_request_fails_before_sending(
    server_cls: Any, anyio_backend: str
) -> None:
    server = server_cls(_app(), ping_interval=0, latency_interval=0)
    async with server.listen():
        url = f"ws://127.0.0.1:{server.port}"
        async with _client_class(anyio_backend)(url, max_message_size=4096) as client:
            with pytest.raises(MessageTooLarge) as info:
                await client.command("echo", "x" * 5000)
            assert "over the client's max_message_size of 4096 bytes" in str(info.value)
            assert info.value.code == "ETOOLARGE"
            assert await client.command("echo", "still connected") == "still connected"


def test_deep_merge_is_refused_like_any_unknown_name() -> None:
    assert apply_strategy("deepMerge", {"a": {"b": 1}}, {"a": {"c": 2}}) == {"a": {"b": 1, "c": 2}}
    for name in ("deep_merge", "nope"):
        with pytest.raises(ValidationError) as info:
            apply_strategy(name, {}, {})
        assert str(info.value) == (
            f"Unknown metadata strategy {name!r}: expected one of replace, merge, deepMerge"
        )
