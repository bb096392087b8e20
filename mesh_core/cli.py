"""``mesh serve MODULE:ATTR``: run an app, in the conventions of uvicorn.

The command line itself is runtime-neutral; it imports ``mesh_asyncio`` or
``mesh_trio`` by name to serve, so the core never imports a runtime.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from ._app import MeshApp
from ._config import ServerOptions

__all__ = ["load_app", "main"]


def load_app(spec: str) -> MeshApp:
    """Import ``module.path:attribute`` (the current directory is importable,
    as with uvicorn) and check that it is a :class:`MeshApp`."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"error: expected MODULE:ATTR (e.g. examples.demo:app), got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"error: could not import {module_name!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise SystemExit(f"error: {module_name!r} has no attribute {attr!r}") from None
    if callable(obj) and not isinstance(obj, MeshApp):
        obj = obj()  # an app factory
    if not isinstance(obj, MeshApp):
        raise SystemExit(f"error: {spec} is a {type(obj).__name__}, not a MeshApp")
    return obj


def _parser() -> argparse.ArgumentParser:
    defaults = ServerOptions()
    parser = argparse.ArgumentParser(prog="mesh", description="Mesh for Python")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run a Mesh server for an app")
    serve.add_argument(
        "app", metavar="MODULE:ATTR", help="the MeshApp to serve, e.g. examples.demo:app"
    )
    serve.add_argument("--runtime", choices=("asyncio", "trio"), default="asyncio")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument(
        "--ping-interval",
        type=float,
        default=defaults.ping_interval,
        metavar="SECONDS",
        help="0 disables pings (default %(default)s)",
    )
    serve.add_argument("--max-missed-pongs", type=int, default=defaults.max_missed_pongs)
    serve.add_argument(
        "--latency-interval",
        type=float,
        default=defaults.latency_interval,
        metavar="SECONDS",
        help="0 disables latency probes (default %(default)s)",
    )
    serve.add_argument(
        "--max-message-size", type=int, default=defaults.max_message_size, metavar="BYTES"
    )
    serve.add_argument("--uvloop", action="store_true", help="asyncio only: run on uvloop")
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = load_app(args.app)
    options = ServerOptions(
        ping_interval=args.ping_interval,
        max_missed_pongs=args.max_missed_pongs,
        latency_interval=args.latency_interval,
        max_message_size=args.max_message_size,
        max_send_buffer=max(ServerOptions().max_send_buffer, args.max_message_size),
    )
    runtime = importlib.import_module(f"mesh_{args.runtime}")
    kwargs: dict[str, Any] = {"host": args.host, "port": args.port, "options": options}
    if args.uvloop:
        if args.runtime != "asyncio":
            raise SystemExit("error: --uvloop needs --runtime asyncio")
        kwargs["use_uvloop"] = True
    runtime.run(app, **kwargs)


if __name__ == "__main__":
    main()
