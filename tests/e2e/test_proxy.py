"""Behind a reverse proxy: ``X-Forwarded-For`` names the client, but only
when the socket's peer is a proxy the operator said to trust."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from mesh_core import Context, MeshApp, ServerOptions, UpgradeRequest
from tests.helpers.server_process import ROOT, free_port
from tests.helpers.tls import make_certs
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


@pytest.mark.parametrize(
    ("peer", "header", "expected"),
    [
        # one list across header lines: the proxy's line is the last one
        ("10.0.0.1", "203.0.113.7, 198.51.100.1", "198.51.100.1"),
        # an IPv4 proxy seen as IPv4-mapped on a dual-stack listener
        ("::ffff:10.0.0.1", "203.0.113.7", "203.0.113.7"),
        # what cannot be read as an address leaves the socket's peer
        ("10.0.0.1", "unknown", "10.0.0.1"),
        ("10.0.0.1", "203.0.113.7, _hidden", "10.0.0.1"),
    ],
)
def test_client_peer(peer: str, header: str, expected: str) -> None:
    options = ServerOptions(forwarded_allow_ips=("10.0.0.0/8",))
    assert options.client_peer((peer, 5000), header)[0] == expected  # type: ignore[index]


async def test_every_forwarded_for_line_is_read(server_cls: Any) -> None:
    """A proxy that adds a header line of its own instead of appending
    (HAProxy's ``option forwardfor``): the client's own line comes first and
    is not what decides."""
    server = server_cls(peer_app([]), forwarded_allow_ips=("127.0.0.1",), **FAST)
    async with server.listen():
        lines = [(b"X-Forwarded-For", b"198.51.100.66"), (b"X-Forwarded-For", b"203.0.113.7")]
        client = await WSClient.connect(server.port, "/", headers=lines)
        assert (await client.request("whoami"))[0] == "203.0.113.7"
        await client.close()


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


# -- a real nginx in front (deploy/nginx.conf): TLS terminated there ----------


@contextlib.contextmanager
def nginx(tmp_path: Path, upstream: int, cert: Path, key: Path) -> Iterator[int]:
    """deploy/nginx.conf as written, with this test's ports and certificate,
    in an nginx of its own (its own prefix, pid file and logs)."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(binary):
        pytest.skip("nginx is not installed (scripts/test installs it)")
    port = free_port()
    site = (ROOT / "deploy" / "nginx.conf").read_text()
    for old, new in [
        ("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;"),
        ("server 127.0.0.1:8765;", f"server 127.0.0.1:{upstream};"),
        ("/etc/ssl/mesh/fullchain.pem", str(cert)),
        ("/etc/ssl/mesh/privkey.pem", str(key)),
    ]:
        assert old in site, old
        site = site.replace(old, new)
    (tmp_path / "mesh.conf").write_text(site)
    (tmp_path / "nginx.conf").write_text(
        f"""
        {"user root;" if os.geteuid() == 0 else ""}
        worker_processes 1;
        pid {tmp_path}/nginx.pid;
        error_log {tmp_path}/error.log;
        events {{}}
        http {{
            access_log off;
            client_body_temp_path {tmp_path}/body;
            proxy_temp_path {tmp_path}/proxy;
            fastcgi_temp_path {tmp_path}/fastcgi;
            uwsgi_temp_path {tmp_path}/uwsgi;
            scgi_temp_path {tmp_path}/scgi;
            include {tmp_path}/mesh.conf;
        }}
        """
    )
    proc = subprocess.Popen(
        [binary, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    output = proc.stdout.read() if proc.stdout else b""
                    log = (tmp_path / "error.log").read_text(errors="replace")
                    raise AssertionError(f"nginx did not start: {output!r} {log}") from None
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_behind_nginx_the_client_address_is_the_real_one(
    server_cls: Any, tmp_path: Path
) -> None:
    certs = make_certs(tmp_path / "certs")
    seen: list[UpgradeRequest] = []
    server = server_cls(peer_app(seen), forwarded_allow_ips=("127.0.0.1",), **FAST)
    async with server.listen():
        with nginx(tmp_path, server.port, certs.server_cert, certs.server_key) as port:
            context = certs.client_context()
            # from 127.0.0.2, so the client is not the proxy; it also claims
            # an address of its own, which must not be believed
            stream = await anyio.connect_tcp(
                "127.0.0.1", port, local_host="127.0.0.2", ssl_context=context,
                tls_standard_compatible=False,
            )  # fmt: skip
            client = await WSClient.connect(
                port, "/ws", headers=[(b"X-Forwarded-For", b"198.51.100.66")], stream=stream
            )
            assert (await client.request("whoami"))[0] == "127.0.0.2"
            request = seen[-1]
            assert request.path == "/ws"
            assert request.header("x-forwarded-proto") == "https"
            assert request.header("x-forwarded-for") == "198.51.100.66, 127.0.0.2"
            await client.close()
