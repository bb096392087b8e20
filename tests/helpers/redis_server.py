"""Test helper: a private, throw-away ``redis-server`` process on a free port.

Never touches any other Redis (in particular not the one on 127.0.0.1:6379):
the server binds 127.0.0.1 on a port picked free by the OS, keeps no data on
disk (``--save '' --appendonly no``, working dir in a temp dir) and is stopped
by its own PID. ``stop()`` / ``start()`` (or ``restart()``) bring it down and
back on the *same* port, for outage tests.

Usage in tests::

    @pytest.fixture
    def redis_server():
        with RedisServer() as server:  # skips the test if redis-server is missing
            yield server

    server.url        # redis://127.0.0.1:<port>/0
    server.unix_url   # unix:///tmp/.../redis.sock?db=0  (unix_socket=True)
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import pytest

__all__ = ["RedisServer", "free_port", "redis_server_binary"]


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server child process; ``start()`` skips the test if the binary is missing."""

    def __init__(
        self,
        *,
        port: int | None = None,
        password: str | None = None,
        unix_socket: bool = False,
        tls: bool = False,
        startup_timeout: float = 10.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        if port == 6379:
            raise ValueError("refusing to run a test Redis on the default port 6379")
        self.port = port or free_port()
        self.password = password
        self.startup_timeout = startup_timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="mesh-redis-")
        self.dir = Path(self._tmp.name)
        self.socket_path = str(self.dir / "redis.sock") if unix_socket else None
        self.tls = tls
        self.ca_file = str(self.dir / "cert.pem")  # self-signed: also the CA, with tls=True
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra_args = list(extra_args)  # appended to the command line (e.g. --replicaof)

    # -- URLs

    @property
    def url(self) -> str:
        return self.url_for_db(0)

    def url_for_db(self, db: int) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/{db}?ssl_ca_certs={self.ca_file}"
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    @property
    def unix_url(self) -> str:
        if self.socket_path is None:
            raise RuntimeError("RedisServer(unix_socket=True) needed for unix_url")
        pw = f"&password={self.password}" if self.password else ""
        return f"unix://{self.socket_path}?db=0{pw}"

    # -- lifecycle

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> RedisServer:
        binary = redis_server_binary()
        if binary is None:
            pytest.skip("redis-server binary not installed")
        if self.running:
            return self
        port_args = ["--port", str(self.port)]
        if self.tls:
            port_args = ["--port", "0", "--tls-port", str(self.port), *self._tls_args()]
        cmd = [
            binary,
            *port_args,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ]
        if self.password:
            cmd += ["--requirepass", self.password]
        if self.socket_path:
            cmd += ["--unixsocket", self.socket_path, "--unixsocketperm", "700"]
        cmd += self.extra_args
        self.proc = subprocess.Popen(
            cmd, cwd=self.dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + self.startup_timeout
        while not self._answers_ping():
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode} on start")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING")
            time.sleep(0.01)
        return self

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGTERM, or SIGKILL with ``kill=True``) and wait for it."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- helpers

    def _tls_args(self) -> list[str]:
        key = self.dir / "key.pem"
        if not key.exists():
            openssl = shutil.which("openssl")
            if openssl is None:
                pytest.skip("openssl not installed (needed for a TLS test certificate)")
            subprocess.run(
                [
                    openssl,
                    *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
                    *("-keyout", str(key), "-out", self.ca_file, "-subj", "/CN=localhost"),
                    *("-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        return [
            *("--tls-cert-file", self.ca_file, "--tls-key-file", str(key)),
            *("--tls-auth-clients", "no"),
        ]

    def _answers_ping(self) -> bool:
        try:
            with contextlib.ExitStack() as stack:
                raw = stack.enter_context(
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
                )
                s: socket.socket = raw
                if self.tls:
                    ctx = ssl.create_default_context(cafile=self.ca_file)
                    s = stack.enter_context(ctx.wrap_socket(raw, server_hostname="127.0.0.1"))
                if self.password:
                    pw = self.password.encode()
                    s.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw))
                    if not s.recv(64).startswith(b"+OK"):
                        return False
                s.sendall(b"*1\r\n$4\r\nPING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False
