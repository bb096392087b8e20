"""``mesh serve MODULE:ATTR``: run an app, in the conventions of uvicorn.

The command line itself is runtime-neutral; it imports ``mesh_asyncio`` or
``mesh_trio`` by name to serve, so the core never imports a runtime.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from ._config import ServerOptions
from ._errors import ServerStartupError
from .app._app import MeshApp
from .app._logging import LOG_FORMAT

__all__ = ["load_app", "main", "options_from_args", "serve_worker"]

#: the extra that provides each optional package, for the install hint
_EXTRAS = {"hiredis": "redis", "redis": "redis", "uvloop": "uvloop"}


class _Parser(argparse.ArgumentParser):
    """An argument error is one line on stderr (exit 2), not the usage block:
    an operator reads what is wrong and where to look."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: use 0-65535")
    return port


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _missing_extra(exc: ModuleNotFoundError) -> str:
    """The one-line hint for an optional package that is not installed."""
    package = (exc.name or "").split(".")[0]
    extra = _EXTRAS.get(package)
    if extra is None:
        return f"{exc}"
    return f"{package} is not installed: pip install 'mesh-python[{extra}]'"


def _redis_url(text: str) -> str:
    """Check a ``--redis`` URL when the flags are parsed, with the message
    the store would give (which names every supported scheme)."""
    try:
        from .redis import _url
    except ModuleNotFoundError as exc:
        raise argparse.ArgumentTypeError(_missing_extra(exc)) from None
    try:
        if _url.is_cluster_url(text):
            _url.parse_cluster_url(text)
        else:
            _url.parse_redis_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


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
        kind = type(obj).__name__
        article = "an" if kind[:1].lower() in "aeiou" else "a"
        raise SystemExit(f"error: {spec} is {article} {kind}, not a MeshApp")
    return obj


def _parser() -> argparse.ArgumentParser:
    defaults = ServerOptions()
    parser = _Parser(prog="mesh", description="Mesh for Python")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run a Mesh server for an app")
    serve.add_argument(
        "app", metavar="MODULE:ATTR", help="the MeshApp to serve, e.g. examples.demo:app"
    )
    serve.add_argument(
        "--runtime",
        choices=("asyncio", "trio"),
        default="asyncio",
        help="the event loop to serve on; the same app runs on either (default %(default)s)",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default %(default)s)"
    )
    serve.add_argument(
        "--port", type=_port, default=8765, help="port to listen on (default %(default)s)"
    )
    serve.add_argument(
        "--ping-interval",
        type=float,
        default=defaults.ping_interval,
        metavar="SECONDS",
        help="0 disables pings (default %(default)s)",
    )
    serve.add_argument(
        "--max-missed-pongs",
        type=int,
        default=defaults.max_missed_pongs,
        metavar="N",
        help="ping intervals without a pong before the connection is closed (default %(default)s)",
    )
    serve.add_argument(
        "--latency-interval",
        type=float,
        default=defaults.latency_interval,
        metavar="SECONDS",
        help="0 disables latency probes (default %(default)s)",
    )
    limits = serve.add_argument_group("limits (see docs/HARDENING.md)")
    limits.add_argument(
        "--max-message-size",
        type=int,
        default=defaults.max_message_size,
        metavar="BYTES",
        help="larger messages close the connection with 1009 (default %(default)s)",
    )
    limits.add_argument(
        "--max-json-depth",
        type=int,
        default=defaults.max_json_depth,
        metavar="N",
        help="deeper JSON nesting is a violation; 0: no limit (default %(default)s)",
    )
    limits.add_argument(
        "--max-metadata-size",
        type=int,
        default=defaults.max_metadata_size,
        metavar="BYTES",
        help="larger connection/room metadata is refused; 0: no limit (default %(default)s)",
    )
    limits.add_argument(
        "--max-requests-in-flight",
        type=int,
        default=defaults.max_requests_in_flight,
        metavar="N",
        help="requests of one connection run at once; more wait (default %(default)s)",
    )
    limits.add_argument(
        "--max-queued-requests",
        type=int,
        default=defaults.max_queued_requests,
        metavar="N",
        help="waiting requests before reading pauses (default %(default)s)",
    )
    limits.add_argument(
        "--max-connections",
        type=int,
        default=defaults.max_connections,
        metavar="N",
        help="more are refused with HTTP 503; 0: no limit (default %(default)s)",
    )
    limits.add_argument(
        "--max-channel-history",
        type=int,
        default=defaults.max_channel_history,
        metavar="N",
        help="messages a channel keeps and one history read returns, at most (default %(default)s)",
    )
    limits.add_argument(
        "--max-violations",
        type=int,
        default=defaults.max_violations,
        metavar="N",
        help="invalid frames a connection may send before 1008 (default %(default)s)",
    )
    limits.add_argument(
        "--max-send-buffer",
        type=int,
        default=None,
        metavar="BYTES",
        help=f"bytes queued for a client that does not read before it is dropped "
        f"(default {defaults.max_send_buffer}, at least --max-message-size)",
    )
    limits.add_argument(
        "--handshake-timeout",
        type=float,
        default=defaults.handshake_timeout,
        metavar="SECONDS",
        help="drop sockets that do not complete the upgrade in time (default %(default)s)",
    )
    limits.add_argument(
        "--shutdown-timeout",
        type=float,
        default=defaults.shutdown_timeout,
        metavar="SECONDS",
        help="how long shutdown lets requests in flight finish (default %(default)s)",
    )
    limits.add_argument(
        "--allowed-origin",
        action="append",
        dest="allowed_origins",
        metavar="ORIGIN",
        help="repeat for each Origin allowed to connect, e.g. https://app.example.com; "
        "'none' admits clients that send no Origin (non-browser) (default: any)",
    )
    proxy = serve.add_argument_group("behind a reverse proxy (see docs/OPERATIONS.md)")
    proxy.add_argument(
        "--forwarded-allow-ips",
        default=os.environ.get("FORWARDED_ALLOW_IPS", ""),
        metavar="IPS",
        help="comma-separated proxy addresses or networks (or '*') whose X-Forwarded-For "
        "names the client's address; also $FORWARDED_ALLOW_IPS (default: trust none)",
    )
    shared = serve.add_argument_group("many instances (Redis)")
    shared.add_argument(
        "--redis",
        metavar="URL",
        type=_redis_url,
        help="share state through Redis (redis://host:port/db, rediss://, unix:///path, "
        "redis+sentinel://host[,host...]/service/db, redis+cluster://host[,host...]); "
        "default: the in-memory store of this process",
    )
    shared.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="run N server processes on one port, supervised (a dead worker is logged "
        "and replaced); needs --redis (default %(default)s)",
    )
    shared.add_argument(
        "--redis-command-timeout",
        type=_positive(float),
        default=2.0,
        metavar="SECONDS",
        help="a request waits this long for Redis before EUNAVAILABLE (default %(default)s)",
    )
    shared.add_argument(
        "--redis-heartbeat-interval",
        type=_positive(float),
        default=15.0,
        metavar="SECONDS",
        help="seconds between heartbeats of this instance (default %(default)s)",
    )
    shared.add_argument(
        "--redis-heartbeat-ttl",
        type=_positive(int),
        default=120,
        metavar="SECONDS",
        help="an instance silent this long is dead and swept (default %(default)s)",
    )
    shared.add_argument(
        "--redis-sweep-interval",
        type=_positive(float),
        default=60.0,
        metavar="SECONDS",
        help="seconds between sweeps for dead instances (default %(default)s)",
    )
    tls = serve.add_argument_group("TLS: serve wss:// (see docs/OPERATIONS.md)")
    tls.add_argument(
        "--ssl-certfile",
        metavar="PEM",
        help="the server's certificate (chain), PEM; turns TLS on (default: off, ws://)",
    )
    tls.add_argument(
        "--ssl-keyfile",
        metavar="PEM",
        help="its private key, PEM (default: the key in --ssl-certfile)",
    )
    tls.add_argument(
        "--ssl-keyfile-password",
        metavar="PASSWORD",
        help="the password of an encrypted --ssl-keyfile (default: none)",
    )
    tls.add_argument(
        "--ssl-ca-certs",
        metavar="PEM",
        help="require client certificates signed by these CAs; others fail the "
        "TLS handshake (default: no client certificates)",
    )
    _add_metrics_flags(serve)
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument(
        "--uvloop",
        action="store_true",
        help="asyncio only: run on uvloop, pip install 'mesh-python[uvloop]' (default: off)",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="debug adds a line per connection opened and closed (default %(default)s)",
    )
    return parser


def _add_metrics_flags(serve: argparse.ArgumentParser) -> None:
    """``--metrics-port`` / ``--metrics-host``: docs/OPERATIONS.md, "Logs and metrics"."""
    group = serve.add_argument_group("metrics and health (HTTP, separate from the WebSocket port)")
    group.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        metavar="PORT",
        help="serve GET /metrics (Prometheus text) and GET /healthz (200 or 503) on this "
        "port; with --workers, one summed view for all of them (default: off)",
    )
    group.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address of the metrics port (default %(default)s)",
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mesh-python")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "(not installed)"


def options_from_args(args: argparse.Namespace) -> ServerOptions:
    """The :class:`ServerOptions` that parsed ``mesh serve`` flags ask for."""
    send_buffer = args.max_send_buffer
    if send_buffer is None:
        send_buffer = max(ServerOptions().max_send_buffer, args.max_message_size)
    try:
        return ServerOptions(
            ping_interval=args.ping_interval,
            max_missed_pongs=args.max_missed_pongs,
            latency_interval=args.latency_interval,
            max_message_size=args.max_message_size,
            max_json_depth=args.max_json_depth,
            max_metadata_size=args.max_metadata_size,
            max_requests_in_flight=args.max_requests_in_flight,
            max_queued_requests=args.max_queued_requests,
            max_connections=args.max_connections,
            max_violations=args.max_violations,
            max_channel_history=args.max_channel_history,
            max_send_buffer=send_buffer,
            handshake_timeout=args.handshake_timeout,
            shutdown_timeout=args.shutdown_timeout,
            allowed_origins=(
                tuple(None if o.lower() == "none" else o for o in args.allowed_origins)
                if args.allowed_origins
                else None
            ),
            forwarded_allow_ips=args.forwarded_allow_ips,
        )
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    options = options_from_args(args)
    if args.uvloop and args.runtime != "asyncio":
        raise SystemExit("error: --uvloop needs --runtime asyncio")
    if args.uvloop:
        try:
            importlib.import_module("uvloop")
        except ModuleNotFoundError as exc:
            raise SystemExit(f"error: {_missing_extra(exc)}") from None
    if args.workers < 1:
        raise SystemExit("error: --workers must be at least 1")
    if args.workers > 1:
        if not args.redis:
            raise SystemExit(
                "error: --workers above 1 needs --redis: the in-memory store lives in one "
                "process, so workers would not see each other's connections and rooms"
            )
        load_app(args.app)  # fail here, once, rather than in every worker
        _tls_context(args)  # the workers get the --ssl-* flags with the rest
        # sockets, processes, threads, clocks: not the core's business
        supervisor = importlib.import_module("mesh_supervisor")
        raise SystemExit(supervisor.supervise(argv, args))
    _start(args, options)


def serve_worker(
    argv: Sequence[str], sock: Any, metrics_sock: Any, on_listening: Callable[[], None]
) -> None:
    """One ``--workers`` process (``mesh_supervisor`` starts it): ``mesh serve``
    with the same flags, on the listening sockets the supervisor made."""
    args = _parser().parse_args(list(argv))
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    options = options_from_args(args)
    _start(args, options, sock=sock, metrics_sock=metrics_sock, on_listening=on_listening)


#: The cyclic collector's thresholds in a ``mesh serve`` process (Python's
#: default: 700, 10, 10). A server under load allocates a few hundred
#: short-lived objects per request (frames, tasks, futures, replies) and keeps
#: thousands alive across loop iterations (requests in flight), so the default
#: collects the young generation every couple of requests and promotes the
#: in-flight objects into ever-older generations that then get traversed too.
#: Measured with ``benchmarks`` (meta 50x4 on Redis, alternating, 3 s rounds):
#: server CPU per command 47 -> 38 us on asyncio, 70 -> 55 us on trio (4,000
#: and 7,000 measured alike); noop and echo on the memory store did not move.
#: Above ~10,000 asyncio got slower again (47 us at 10,000 and at 15,000).
#: Only the command line sets it: an application embedding ``MeshServer``
#: keeps its own process's policy.
GC_THRESHOLDS = (4000, 20, 20)


def _start(args: argparse.Namespace, options: ServerOptions, **worker: Any) -> None:
    app = load_app(args.app)
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        _serve(app, args, options, **worker)
    except ServerStartupError as exc:
        raise SystemExit(f"error: {exc}") from None
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in _EXTRAS:
            raise
        raise SystemExit(f"error: {_missing_extra(exc)}") from None


def _tls_context(args: argparse.Namespace) -> Any:
    """The ``ssl.SSLContext`` the ``--ssl-*`` flags ask for (``None``:
    none given); a file that does not load ends the start in one line."""
    others = (args.ssl_keyfile, args.ssl_keyfile_password, args.ssl_ca_certs)
    if args.ssl_certfile is None:
        if any(flag is not None for flag in others):
            raise SystemExit(
                "error: the --ssl-* flags need --ssl-certfile (the server's certificate)"
            )
        return None
    server_class = importlib.import_module(f"mesh_{args.runtime}").MeshServer
    try:
        return server_class.tls_context(
            args.ssl_certfile,
            args.ssl_keyfile,
            password=args.ssl_keyfile_password,
            ca_certs=args.ssl_ca_certs,
        )
    except ServerStartupError as exc:
        raise SystemExit(f"error: {exc}") from None


def _serve(
    app: MeshApp,
    args: argparse.Namespace,
    options: ServerOptions,
    sock: Any = None,
    metrics_sock: Any = None,
    on_listening: Callable[[], None] | None = None,
) -> None:
    runtime = importlib.import_module(f"mesh_{args.runtime}")
    kwargs: dict[str, Any] = {"host": args.host, "port": args.port, "options": options}
    if sock is not None:  # a worker: on the supervisor's sockets (mesh_supervisor)
        kwargs["sock"] = sock
        kwargs["metrics_sock"] = metrics_sock
        kwargs["on_listening"] = on_listening
    elif args.metrics_port is not None:
        kwargs["metrics_port"] = args.metrics_port
        kwargs["metrics_host"] = args.metrics_host
    tls = _tls_context(args)
    if tls is not None:
        kwargs["ssl"] = tls
    if args.redis:
        store_class = runtime.RedisStore
        url = args.redis
        store_options = {
            "command_timeout": args.redis_command_timeout,
            "heartbeat_interval": args.redis_heartbeat_interval,
            "heartbeat_ttl": args.redis_heartbeat_ttl,
            "sweep_interval": args.redis_sweep_interval,
        }
        kwargs["storage"] = lambda: store_class(url, **store_options)
    if args.reuse_port:
        kwargs["reuse_port"] = True
    if args.uvloop:
        kwargs["use_uvloop"] = True
    runtime.run(app, **kwargs)


if __name__ == "__main__":
    main()
