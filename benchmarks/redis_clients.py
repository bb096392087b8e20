"""Redis clients under one runtime's server, compared in one run.

``python -m benchmarks.redis_clients [--runtime asyncio|trio] [--rounds 5]
[--duration 3] [--client NAME=module:Class ...]`` starts a private
redis-server, then, round after round and in alternating order, a ``mesh
serve --runtime R --redis`` process per client (the class replaces the
client of that runtime's ``RedisStore`` in that process only) under the
``meta`` 50x4 load of ``benchmarks/run``, and prints the server's CPU per
command: each round's figure, the median and the spread (min-max). The
machine is shared, so only figures of one run, taken in alternation, are
compared.

By default it measures the runtime's client of this checkout; name any
other importable class (an older transport kept in a branch, say) with
``--client``. This is how the project's own client was chosen over redis-py
on asyncio (see ``mesh_core.redis._client``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from ._util import (
    RESULTS,
    free_port,
    median,
    private_redis,
    start_process,
    stop_process,
    wait_for_port,
)
from .driver import run_load, wait_idle
from .servers import ServerSpec

#: runtime -> the client class its ``RedisStore`` uses (module, name)
STORE_CLIENT = {
    "asyncio": ("mesh_asyncio._redis", "AsyncioRedisTransport"),
    "trio": ("mesh_trio._redis", "TrioRedisTransport"),
}


def _serve(runtime: str, spec: str, argv: list[str]) -> None:
    """In the server process: install the client class, then run ``mesh serve``."""
    module, _, name = spec.partition(":")
    cls = getattr(importlib.import_module(module), name)
    store_module, attribute = STORE_CLIENT[runtime]
    setattr(importlib.import_module(store_module), attribute, cls)
    from mesh_core.cli import main

    main(argv)


def _server_argv(runtime: str, spec: str, port: int, redis_url: str) -> list[str]:
    """``benchmarks/run``'s server on Redis, started through ``--serve``."""
    argv = ServerSpec(f"mesh-{runtime}", store="redis", redis_url=redis_url).argv(port)
    assert argv[1:3] == ["-m", "mesh_core.cli"]
    return [argv[0], "-m", "benchmarks.redis_clients", "--serve", runtime, spec, *argv[3:]]


def measure(
    clients: dict[str, str],
    *,
    runtime: str,
    rounds: int,
    warmup: float,
    duration: float,
    procs: int,
) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {name: [] for name in clients}
    with private_redis() as url:
        for r in range(rounds):
            order = list(clients) if r % 2 == 0 else list(reversed(clients))
            for name in order:
                port = free_port()
                log = RESULTS / f"server-redis-client-{name}.log"
                proc = start_process(_server_argv(runtime, clients[name], port, url), log=log)
                try:
                    wait_for_port(port, proc)
                    wait_idle(proc.pid)
                    got: dict[str, Any] = run_load(
                        proc.pid,
                        port,
                        mix="meta",
                        conns=50,
                        inflight=4,
                        procs=procs,
                        warmup=warmup,
                        duration=duration,
                    )
                finally:
                    stop_process(proc)
                figures[name].append(got["server_cpu_us"])
                print(
                    f"round {r + 1}/{rounds} {name:10s} {got['rps']:8.0f}/s "
                    f"server {got['server_cpu_us']:6.1f} µs/cmd",
                    flush=True,
                )
    return figures


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve"]:
        _serve(argv[1], argv[2], argv[3:])
        return
    p = argparse.ArgumentParser(prog="python -m benchmarks.redis_clients")
    p.add_argument("--client", action="append", default=[], metavar="NAME=module:Class")
    p.add_argument("--runtime", choices=sorted(STORE_CLIENT), default="asyncio")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--procs", type=int, default=2)
    args = p.parse_args(argv)
    module, name = STORE_CLIENT[args.runtime]
    default = {"mesh": f"{module}_transport:{name}"}
    clients = dict(c.split("=", 1) for c in args.client) if args.client else default
    RESULTS.mkdir(parents=True, exist_ok=True)
    figures = measure(
        clients,
        runtime=args.runtime,
        rounds=args.rounds,
        warmup=args.warmup,
        duration=args.duration,
        procs=args.procs,
    )
    print(f"\nserver CPU per command, meta 50x4 on Redis ({args.runtime}): median [min-max]")
    for name, values in figures.items():
        print(f"  {name:10s} {median(values):6.1f} µs  [{min(values):.1f}-{max(values):.1f}]")


if __name__ == "__main__":
    main()
