"""Test helper: a throw-away Sentinel-managed Redis (master, replica, sentinels).

Everything binds 127.0.0.1 on ports picked free by the OS, keeps its files in
temp dirs and is stopped by its own PID; it never touches another Redis (in
particular not the one on 127.0.0.1:6379). Sentinel timers are short
(``down_after_ms``, ``failover_timeout_ms``) so a failover takes seconds.

Usage::

    with SentinelSetup() as s:      # skips the test if redis-server is missing
        s.url                       # redis+sentinel://127.0.0.1:<p>/mymaster/0
        s.failover()                # SENTINEL FAILOVER, returns once the replica is master
        s.kill_master()             # SIGKILL the master (then s.wait_for_new_master(old))
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import hiredis
import pytest

from mesh_core.redis._resp import pack

from .redis_server import RedisServer, free_port, redis_server_binary

__all__ = ["FakeSentinel", "SentinelProcess", "SentinelSetup", "SwitchWatcher"]


def _client(port: int, password: str | None = None) -> Any:
    import redis

    return redis.Redis(
        host="127.0.0.1", port=port, password=password, socket_timeout=2, socket_connect_timeout=2
    )


def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if check():
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class SentinelProcess:
    """One ``redis-server <conf> --sentinel`` child, with a writable config in a temp dir."""

    def __init__(
        self,
        *,
        service: str,
        master_port: int,
        quorum: int,
        down_after_ms: int,
        failover_timeout_ms: int,
        master_password: str | None,
        password: str | None,
    ) -> None:
        self.port = free_port()
        self.password = password
        self._tmp = tempfile.TemporaryDirectory(prefix="mesh-sentinel-")
        self.dir = Path(self._tmp.name)
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            "daemonize no",
            f'dir "{self.dir}"',
            "loglevel warning",
            "sentinel resolve-hostnames no",
            "sentinel announce-ip 127.0.0.1",
            f"sentinel monitor {service} 127.0.0.1 {master_port} {quorum}",
            f"sentinel down-after-milliseconds {service} {down_after_ms}",
            f"sentinel failover-timeout {service} {failover_timeout_ms}",
            f"sentinel parallel-syncs {service} 1",
        ]
        if master_password:
            lines.append(f"sentinel auth-pass {service} {master_password}")
        if password:
            lines += [f"requirepass {password}", f"sentinel sentinel-pass {password}"]
        self.config = self.dir / "sentinel.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = redis_server_binary()
        if binary is None:
            pytest.skip("redis-server binary not installed")
        self.proc = subprocess.Popen(
            [binary, str(self.config), "--sentinel"],
            cwd=self.dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def answers() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"sentinel exited with {self.proc.returncode} on start")
            return bool(self.client().ping())

        wait_for(answers, 10, f"sentinel on port {self.port}")

    def client(self) -> Any:
        return _client(self.port, self.password)

    def subscribers(self) -> int:
        """How many clients are subscribed to something here (``+switch-master`` listeners)."""
        return sum(1 for c in self.client().client_list() if int(c.get("sub", 0)) > 0)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def close(self) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            self._tmp.cleanup()


class SentinelSetup:
    """A master, one replica of it, and ``sentinels`` sentinels watching them."""

    # No 5 s wait before a full sync, and no wait for replicas to catch up on
    # SIGTERM (the defaults): both only slow the tests down.
    FAST_REPLICATION = ("--repl-diskless-sync-delay", "0", "--shutdown-timeout", "0")

    def __init__(
        self,
        *,
        sentinels: int = 1,
        service: str = "mymaster",
        password: str | None = None,
        sentinel_password: str | None = None,
        down_after_ms: int = 800,
        failover_timeout_ms: int = 4000,
    ) -> None:
        self.service = service
        self.password = password
        self.sentinel_password = sentinel_password
        auth = ["--masterauth", password] if password else []
        announce = ["--replica-announce-ip", "127.0.0.1", *self.FAST_REPLICATION]
        self.master = RedisServer(password=password, extra_args=[*auth, *announce])
        self.replica = RedisServer(
            password=password,
            extra_args=[*auth, *announce, "--replicaof", "127.0.0.1", str(self.master.port)],
        )
        self.nodes = {s.port: s for s in (self.master, self.replica)}
        self.sentinels = [
            SentinelProcess(
                service=service,
                master_port=self.master.port,
                quorum=sentinels // 2 + 1,
                down_after_ms=down_after_ms,
                failover_timeout_ms=failover_timeout_ms,
                master_password=password,
                password=sentinel_password,
            )
            for _ in range(sentinels)
        ]

    # -- URLs

    def url_for(
        self, *, db: int = 0, dead_sentinel_first: bool = False, scheme: str = "redis+sentinel"
    ) -> str:
        hosts = [f"127.0.0.1:{s.port}" for s in self.sentinels]
        if dead_sentinel_first:
            hosts.insert(0, f"127.0.0.1:{free_port()}")  # nothing listens there
        auth = f":{self.password}@" if self.password else ""
        query = f"?sentinel_password={self.sentinel_password}" if self.sentinel_password else ""
        return f"{scheme}://{auth}{','.join(hosts)}/{self.service}/{db}{query}"

    @property
    def url(self) -> str:
        return self.url_for()

    # -- lifecycle

    def start(self) -> SentinelSetup:
        self.master.start()
        self.replica.start()
        wait_for(
            lambda: self.node(self.replica.port).info("replication")["master_link_status"] == "up",
            10,
            "the replica to sync",
        )
        # After a full sync the master holds back the write stream until the
        # replica's first ACK (up to a second later): a master killed before
        # that would fail over to an empty replica.
        self.wait_until_replicated(self.master.port)
        for sentinel in self.sentinels:
            sentinel.start()
        self.wait_until_ready(self.master.port)
        return self

    def close(self) -> None:
        for sentinel in self.sentinels:
            sentinel.close()
        self.master.close()
        self.replica.close()

    def __enter__(self) -> SentinelSetup:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- observation and control

    def node(self, port: int) -> Any:
        return _client(port, self.password)

    def master_port(self, sentinel: int = 0) -> int:
        """The master's port, as sentinel number ``sentinel`` sees it."""
        client = self.sentinels[sentinel].client()
        return int(client.sentinel_get_master_addr_by_name(self.service)[1])

    def wait_until_ready(self, master_port: int, timeout: float = 15.0) -> None:
        """Every sentinel names ``master_port`` and knows a healthy replica of it.

        Without a replica it has sent INFO to, a sentinel refuses to fail over
        (``NOGOODSLAVE``).
        """

        def ready(sentinel: SentinelProcess) -> bool:
            client = sentinel.client()
            if self.master_port(self.sentinels.index(sentinel)) != master_port:
                return False
            replicas = client.sentinel_slaves(self.service)
            healthy = any(
                r["flags"] == "slave" and r["master-link-status"] == "ok" for r in replicas
            )
            others = client.sentinel_master(self.service)["num-other-sentinels"]
            return healthy and others == len(self.sentinels) - 1

        for sentinel in self.sentinels:
            wait_for(lambda s=sentinel: ready(s), timeout, "the sentinels to see master+replica")

    def failover(self, timeout: float = 15.0) -> int:
        """``SENTINEL FAILOVER``; return the new master's port once it says ROLE master."""
        old = self.master_port()
        self.sentinels[0].client().execute_command("SENTINEL", "FAILOVER", self.service)
        return self.wait_for_new_master(old, timeout)

    def wait_until_replicated(self, port: int | None = None, timeout: float = 5.0) -> None:
        """Until a replica acknowledged every write the master (on ``port``) has taken."""
        master = self.node(port if port is not None else self.master_port())
        acked = master.execute_command("WAIT", 1, int(timeout * 1000))
        assert acked >= 1, "the replica did not acknowledge the master's writes"

    def kill_master(self) -> int:
        """SIGKILL the current master (no clean shutdown); return its port."""
        port = self.master_port()
        self.nodes[port].stop(kill=True)
        return port

    def wait_for_new_master(self, old_port: int, timeout: float = 20.0) -> int:
        def moved() -> bool:
            port = self.master_port()
            return port != old_port and self.node(port).execute_command("ROLE")[0] == b"master"

        wait_for(moved, timeout, "the sentinels to promote a new master")
        return self.master_port()

    def wait_until_demoted(self, port: int, timeout: float = 20.0) -> None:
        """Until the former master (still running) says ROLE slave."""
        wait_for(
            lambda: self.node(port).execute_command("ROLE")[0] == b"slave",
            timeout,
            f"the former master on {port} to become a replica",
        )


class FakeSentinel:
    """A stand-in sentinel that names whatever master the test sets (``master_port``).

    Real sentinels take seconds to notice a demoted master; this one lets a
    test move the master at once and watch a transport follow. It answers
    what both transports ask: ``SENTINEL get-master-addr-by-name`` (trio) and
    ``SENTINEL MASTERS`` (redis-py), plus ``+OK`` to set-up commands, and
    takes ``SUBSCRIBE`` s: ``switch_master()`` announces a switch on
    ``+switch-master``.
    """

    def __init__(self, service: str, master_port: int) -> None:
        self.service = service
        self.master_port = master_port
        self.queries = 0
        self._subscribers: list[socket.socket] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = int(self._listener.getsockname()[1])
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True, name="fake-sentinel")
        self._thread.start()

    @property
    def subscribers(self) -> int:
        """Connections subscribed to ``+switch-master`` here."""
        return len(self._subscribers)

    def switch_master(self, new_port: int, *, rename: bool = True) -> None:
        """Announce on ``+switch-master`` that the master moved to ``new_port``,
        and name it from now on (unless ``rename=False``: a lagging sentinel)."""
        old = self.master_port
        if rename:
            self.master_port = new_port
        data = f"{self.service} 127.0.0.1 {old} 127.0.0.1 {new_port}"
        message = pack(("message", "+switch-master", data))
        for conn in list(self._subscribers):
            with contextlib.suppress(OSError):
                conn.sendall(message)

    def close(self) -> None:
        """Stop listening and drop every connection (subscribers see the sentinel die)."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for conn in list(self._subscribers):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)

    def __enter__(self) -> FakeSentinel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reader = hiredis.Reader()
        try:
            with conn:
                while True:
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    reader.feed(data)
                    out = b""
                    while (request := reader.gets()) is not False:
                        out += self._answer([bytes(a).decode() for a in request], conn)
                    with contextlib.suppress(OSError):
                        conn.sendall(out)
        finally:
            if conn in self._subscribers:
                self._subscribers.remove(conn)

    def _answer(self, args: list[str], conn: socket.socket) -> bytes:
        command = [a.lower() for a in args[:2]]
        if command[0] == "subscribe":
            self._subscribers.append(conn)
            channel = args[1].encode()
            return b"*3\r\n$9\r\nsubscribe\r\n$%d\r\n%s\r\n:1\r\n" % (len(channel), channel)
        if command[0] == "ping" and conn in self._subscribers:
            return pack(("pong", ""))
        if command[0] == "ping":
            return b"+PONG\r\n"
        if command[0] != "sentinel":
            return b"+OK\r\n"
        self.queries += 1
        port = str(self.master_port)
        if command[1] == "get-master-addr-by-name":
            if args[2] != self.service:
                return b"*-1\r\n"
            return pack(("127.0.0.1", port))  # an array of 2 bulk strings
        if command[1] == "masters":
            state = [
                *("name", self.service, "ip", "127.0.0.1", "port", port),
                *("flags", "master", "num-other-sentinels", "0", "quorum", "1"),
            ]
            return b"*1\r\n" + pack(state)
        return b"-ERR unknown sentinel subcommand\r\n"


class SwitchWatcher:
    """A thread subscribed to ``+switch-master`` on one sentinel: when did it announce a switch?

    Usage::

        with SwitchWatcher(setup.sentinels[0]) as watcher:
            ...
            at, message = watcher.wait(10)   # time.monotonic() of receipt, the message
    """

    def __init__(self, sentinel: SentinelProcess) -> None:
        self._pubsub = sentinel.client().pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe("+switch-master")
        self.switches: list[tuple[float, bytes]] = []
        self._seen = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="switch-watcher")
        self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            with contextlib.suppress(Exception):
                msg = self._pubsub.get_message(timeout=0.05)
                if msg is not None and msg["type"] == "message":
                    self.switches.append((time.monotonic(), bytes(msg["data"])))
                    self._seen.set()

    def wait(self, timeout: float) -> tuple[float, bytes]:
        if not self._seen.wait(timeout):
            raise AssertionError("the sentinel announced no +switch-master")
        return self.switches[0]

    def close(self) -> None:
        self._closed = True
        self._thread.join(5)
        with contextlib.suppress(Exception):
            self._pubsub.close()

    def __enter__(self) -> SwitchWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
