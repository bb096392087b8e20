"""Test helper: a throw-away Redis Cluster of three primaries (and optional
replicas), each a private ``redis-server`` on a free port (see
``tests/helpers/redis_server.py``: never the Redis on 127.0.0.1:6379), stopped by
PID.

Slots are split into three ranges assigned with ``CLUSTER ADDSLOTSRANGE``,
the nodes meet with ``CLUSTER MEET``, and :meth:`RedisCluster.start`
returns once every node reports ``cluster_state:ok`` and sees the whole
slot table (a client connecting early would otherwise learn a partial one).
Usage::

    with RedisCluster() as cluster:
        cluster.url            # redis+cluster://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3
        cluster.flushall()
        cluster.migrate_slot(slot, to_port)   # a live resharding of one slot
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from .redis_server import RedisServer, free_port

__all__ = ["RedisCluster"]

SLOTS = 16384


def _client(port: int) -> Any:
    import redis

    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)


class RedisCluster:
    def __init__(
        self,
        primaries: int = 3,
        *,
        replicas: int = 0,
        timeout: float = 20.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.timeout = timeout
        self.servers: list[RedisServer] = []
        self.replicas: list[RedisServer] = []
        self.bus_ports: dict[int, int] = {}
        for i in range(primaries + replicas):
            bus_port = free_port()
            server = RedisServer(
                extra_args=[
                    *("--cluster-enabled", "yes"),
                    *("--cluster-config-file", "nodes.conf"),  # in the server's temp dir
                    *("--cluster-node-timeout", "1000"),
                    # the default bus port (port + 10000) may be taken or above 65535
                    *("--cluster-port", str(bus_port)),
                    *("--cluster-replica-validity-factor", "0"),  # any replica may fail over
                    *extra_args,
                ]
            )
            self.bus_ports[server.port] = bus_port
            (self.servers if i < primaries else self.replicas).append(server)

    @property
    def nodes(self) -> list[RedisServer]:
        return [*self.servers, *self.replicas]

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def client(self, port: int) -> Any:
        return _client(port)

    # -- lifecycle

    def start(self) -> RedisCluster:
        try:
            for server in self.nodes:
                server.start()
            count = len(self.servers)
            bounds = [SLOTS * i // count for i in range(count + 1)]
            for i, server in enumerate(self.servers):
                _client(server.port).execute_command(
                    "CLUSTER", "ADDSLOTSRANGE", bounds[i], bounds[i + 1] - 1
                )
            first = _client(self.servers[0].port)
            for server in self.nodes[1:]:
                first.execute_command(
                    "CLUSTER", "MEET", "127.0.0.1", server.port, self.bus_ports[server.port]
                )
            self._wait(
                lambda: all(self._known_nodes(s.port) == len(self.nodes) for s in self.nodes)
            )
            for replica, primary in zip(self.replicas, self.servers, strict=False):
                node_id = self.node_id(primary.port)
                _client(replica.port).execute_command("CLUSTER", "REPLICATE", node_id)
            self.wait_ok()
        except BaseException:
            self.close()
            raise
        return self

    def wait_ok(self) -> None:
        """Until every running node says ``cluster_state:ok`` and sees all 16384 slots."""

        def ok(server: RedisServer) -> bool:
            info = _client(server.port).execute_command("CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            return "cluster_state:ok" in text and "cluster_slots_assigned:16384" in text

        self._wait(lambda: all(ok(s) for s in self.nodes if s.running))

    def _wait(self, check: Any) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            with contextlib.suppress(Exception):
                if check():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("the test Redis Cluster did not come up in time")
            time.sleep(0.05)

    def _known_nodes(self, port: int) -> int:
        raw = _client(port).execute_command("CLUSTER", "NODES")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return sum(1 for line in text.splitlines() if line and "handshake" not in line)

    def close(self) -> None:
        for server in self.nodes:
            server.close()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- helpers for tests

    def node_id(self, port: int) -> str:
        raw = _client(port).execute_command("CLUSTER", "MYID")
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def owner(self, slot: int) -> int:
        """The port of the primary serving ``slot`` (as the first running node sees it)."""
        node = next(s for s in self.servers if s.running)
        for start, end, primary, *_ in _client(node.port).execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(primary[1])
        raise LookupError(slot)

    def flushall(self) -> None:
        for server in self.servers:
            if server.running:
                with contextlib.suppress(Exception):  # a replica refuses: READONLY
                    _client(server.port).flushall()

    def begin_migration(self, slot: int, to_port: int) -> int:
        """Mark ``slot`` MIGRATING on its owner and IMPORTING on ``to_port``;
        returns the owner's port. Keys then move with :meth:`move_keys`."""
        source = self.owner(slot)
        _client(to_port).execute_command(
            "CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source)
        )
        _client(source).execute_command(
            "CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(to_port)
        )
        return source

    def move_keys(self, slot: int, source: int, to_port: int) -> None:
        src = _client(source)
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "KEYS", *keys)

    def end_migration(self, slot: int, to_port: int) -> None:
        """Give ``slot`` to ``to_port`` on every node (the migration's last step)."""
        target = self.node_id(to_port)
        # the new owner first, so no node ever points the slot nowhere
        ports = [to_port, *(s.port for s in self.servers if s.running and s.port != to_port)]
        for port in ports:
            _client(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", target)

    def migrate_slot(self, slot: int, to_port: int) -> None:
        source = self.begin_migration(slot, to_port)
        self.move_keys(slot, source, to_port)
        self.end_migration(slot, to_port)
