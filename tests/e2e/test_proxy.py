"""Behind a reverse proxy: ``X-Forwarded-For`` names the client, but only
when the socket's peer is a proxy the operator said to trust."""

from __future__ import annotations

from typing import Any

import pytest

from mesh_core import Context, MeshApp, ServerOptions, UpgradeRequest
from tests.helpers.wsclient import WSClient

FAST = {"ping_interval": 0, "latency_interval": 0}


def peer_app(seen: list[UpgradeRequest]) -> MeshApp:
    app = MeshApp()

    @app.authenticate_connection
    async def auth(request: UpgradeRequest) -> Any:
        seen.append(request)
        return {"via": "proxy-test"}

    @app.command("whoami")
    async def whoami(ctx: Context) -> Any:
        address = ctx.connection.remote_address
        return None if address is None else list(address)

    return app


@pytest.mark.parametrize(
    ("trusted", "header", "expected"),
    [
        # no trusted proxy: the header is the client's own claim, ignored
        ((), b"203.0.113.7", "127.0.0.1"),
        # the proxy is trusted: the address it appended is the client's
        (("127.0.0.1",), b"203.0.113.7", "203.0.113.7"),
        # a chain: read right to left, skipping trusted proxies (a network here)
        (("127.0.0.0/8", "10.0.0.0/8"), b"198.51.100.1, 203.0.113.7, 10.2.3.4", "203.0.113.7"),
        # what the client itself wrote first cannot override what the proxy appended
        (("127.0.0.1",), b"10.9.9.9, 203.0.113.7", "203.0.113.7"),
        # a trusted peer that is not this one: ignored
        (("192.0.2.1",), b"203.0.113.7", "127.0.0.1"),
        (("*",), b"2001:db8::1", "2001:db8::1"),
    ],
)
async def test_forwarded_for(
    server_cls: Any, trusted: tuple[str, ...], header: bytes, expected: str
) -> None:
    seen: list[UpgradeRequest] = []
    server = server_cls(peer_app(seen), forwarded_allow_ips=trusted, **FAST)
    async with server.listen():
        client = await WSClient.connect(server.port, "/", headers=[(b"X-Forwarded-For", header)])
        address = await client.request("whoami")
        assert address[0] == expected
        assert seen[-1].peer is not None and seen[-1].peer[0] == expected
        plain = await WSClient.connect(server.port, "/")
        assert (await plain.request("whoami"))[0] == "127.0.0.1"
        await client.close()
        await plain.close()


def test_forwarded_allow_ips_is_validated_when_made() -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        ServerOptions(forwarded_allow_ips=("proxy.example.com",))
    assert ServerOptions(forwarded_allow_ips="10.0.0.1, 10.1.0.0/16").forwarded_allow_ips == (
        "10.0.0.1",
        "10.1.0.0/16",
    )


def test_cli_flag_reaches_the_options_and_a_bad_value_is_one_line() -> None:
    from mesh_core.cli import _parser, options_from_args

    args = _parser().parse_args(["serve", "x:app", "--forwarded-allow-ips", "127.0.0.1,10.0.0.0/8"])
    assert options_from_args(args).forwarded_allow_ips == ("127.0.0.1", "10.0.0.0/8")
    bad = _parser().parse_args(["serve", "x:app", "--forwarded-allow-ips", "proxy"])
    with pytest.raises(SystemExit) as exit_:
        options_from_args(bad)
    assert str(exit_.value.code).startswith("error: forwarded_allow_ips: 'proxy'")
