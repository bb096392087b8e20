"""Mesh's other servers as real processes, behind ``MeshServer``'s test-facing
surface (``Server(app, **options)``, ``async with server.listen()``, ``port``,
``close()``, and the core's API: ``rooms``, ``connections``, ``broadcast``...),
so one e2e test body runs against each over real sockets:

- ``embedded``: ``examples/embedded.py``'s ``EmbeddedServer`` in its own
  process (``python -m tests.helpers.remote``);
- ``uvicorn``: ``uvicorn --factory tests.helpers.remote:asgi_app``;
- ``hypercorn-trio``: ``hypercorn 'tests.helpers.remote:asgi_app()' --worker-class trio``.

Starting a process per test would cost ~1 s each, hundreds of times, so one
process per kind lives for the session and each ``listen()`` has it serve a
fresh ``ServerCore`` (a new app, store and counters) for the test, built there
from the app's factory: the app is passed by reference, so it must come from a
module-level factory marked :func:`importable` (or be a module-level object,
as ``examples.demo:app``), and its arguments and the options must pickle.

What the test reads on the server goes over a control socket (a Unix socket,
``MESH_TEST_CONTROL``): attribute reads, writes and calls on the core, run on
the server's loop; plain data comes back by value, anything else as a
:class:`Remote` reference that forwards the same operations. Coroutine methods
are awaited there while the test's loop keeps running (a worker thread waits).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import io
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[2]

__all__ = ["PROCESS_SERVERS", "Remote", "asgi_app", "importable", "stop_all"]

F = TypeVar("F", bound=Callable[..., Any])
_SPEC = "_mesh_test_spec"
_PLAIN = (type(None), bool, int, float, str, bytes, list, tuple, dict, set, frozenset)


def importable(factory: F) -> F:
    """Mark a module-level app factory: the app it builds records how to build
    it again, so a server process can."""

    @functools.wraps(factory)
    def build(*args: Any, **kwargs: Any) -> Any:
        app = factory(*args, **kwargs)
        setattr(app, _SPEC, (f"{factory.__module__}:{factory.__qualname__}", args, kwargs))
        return app

    return build  # type: ignore[return-value]


def spec_of(app: Any) -> tuple[str, tuple[Any, ...] | None, dict[str, Any]]:
    """How a server process builds ``app``: its factory and arguments, or
    where it lives as a module attribute (args ``None``)."""
    spec = getattr(app, _SPEC, None)
    if spec is not None:
        return spec  # type: ignore[no-any-return]
    for name, module in list(sys.modules.items()):
        if name.startswith(("examples.", "tests.")):
            for attr, value in vars(module).items():
                if value is app:
                    return f"{name}:{attr}", None, {}
    raise TypeError("a process server needs an app from an @importable factory or a module")


def load_app(spec: str, args: tuple[Any, ...] | None, kwargs: dict[str, Any]) -> Any:
    module, _, attr = spec.partition(":")
    target: Any = importlib.import_module(module)
    for part in attr.split("."):
        target = getattr(target, part)
    return target if args is None else target(*args, **kwargs)


# -- the wire: length-prefixed pickles; references for what is not plain data --------------


def _send(sock: socket.socket, data: bytes) -> None:
    sock.sendall(struct.pack("!I", len(data)) + data)


def _recv(sock: socket.socket) -> bytes | None:
    head = _recv_exact(sock, 4)
    if head is None:
        return None
    data = _recv_exact(sock, struct.unpack("!I", head)[0])
    if data is None:
        raise ConnectionError("control connection cut mid-message")
    return data


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class _Handles:
    """The server side's objects the test holds references to."""

    def __init__(self) -> None:
        self.objects: dict[int, Any] = {}
        self.lock = threading.Lock()

    def ref(self, obj: Any) -> tuple[str, int, str]:
        with self.lock:
            self.objects[id(obj)] = obj
        if inspect.iscoroutinefunction(obj):
            kind = "async"
        elif callable(obj) and not isinstance(obj, type):
            kind = "sync"
        else:
            kind = "object"
        return ("ref", id(obj), kind)

    def dumps(self, value: Any) -> bytes:
        handles = self

        class Pickler(pickle.Pickler):
            def persistent_id(self, obj: Any) -> Any:
                if isinstance(obj, (*_PLAIN, BaseException, type)):
                    return None  # by value (classes by name)
                return handles.ref(obj)

        out = io.BytesIO()
        try:
            Pickler(out).dump(value)
        except Exception as exc:  # an exception that will not pickle: its text
            out = io.BytesIO()
            Pickler(out).dump(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
        return out.getvalue()

    def loads(self, data: bytes) -> Any:
        objects = self.objects

        class Unpickler(pickle.Unpickler):
            def persistent_load(self, pid: Any) -> Any:
                return objects[pid[1]]

        return Unpickler(io.BytesIO(data)).load()


class _Ready:
    """A value already there, for code that awaits it (a sync method that
    returned an awaitable, awaited on the server)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self) -> Generator[Any, None, Any]:
        yield from ()
        return self.value


class Remote:
    """An object in the server process: attribute reads and writes and calls
    go there; coroutine methods return a coroutine that waits in a thread."""

    def __init__(self, client: _Client, handle: Any, kind: str = "object") -> None:
        object.__setattr__(self, "_client", client)
        object.__setattr__(self, "_handle", handle)
        object.__setattr__(self, "_kind", kind)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self._client.op("getattr", self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        self._client.op("setattr", self, name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._kind == "async":
            return self._client.call_async(self, args, kwargs)
        awaited, value = self._client.op("call", self, args, kwargs)
        return _Ready(value) if awaited else value

    def __getitem__(self, key: Any) -> Any:
        return self._client.op("getitem", self, key)

    def __len__(self) -> int:
        return int(self._client.op("len", self))

    def __iter__(self) -> Iterator[Any]:
        return iter(self._client.op("list", self))

    def __repr__(self) -> str:
        return f"<remote {self._client.op('repr', self)}>"


class _Client:
    """Control connections to one server process (a pool: calls may overlap)."""

    def __init__(self, path: str, process: _Process) -> None:
        self.path, self.process = path, process
        self.idle: list[socket.socket] = []
        self.lock = threading.Lock()

    def _connect(self) -> socket.socket:
        with self.lock:
            if self.idle:
                return self.idle.pop()
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(60)
        sock.connect(self.path)
        return sock

    def dumps(self, value: Any) -> bytes:
        class Pickler(pickle.Pickler):
            def persistent_id(self, obj: Any) -> Any:
                return ("ref", obj._handle) if isinstance(obj, Remote) else None

        out = io.BytesIO()
        Pickler(out).dump(value)
        return out.getvalue()

    def loads(self, data: bytes) -> Any:
        client = self

        class Unpickler(pickle.Unpickler):
            def persistent_load(self, pid: Any) -> Any:
                return Remote(client, pid[1], pid[2])

        return Unpickler(io.BytesIO(data)).load()

    def op(self, *request: Any) -> Any:
        sock = self._connect()
        try:
            _send(sock, self.dumps(request))
            data = _recv(sock)
        except OSError as exc:
            sock.close()
            raise AssertionError(f"server process lost: {exc}\n{self.process.output()}") from None
        if data is None:
            sock.close()
            raise AssertionError(f"server process lost\n{self.process.output()}")
        with self.lock:
            self.idle.append(sock)
        status, value = self.loads(data)
        if status == "error":
            raise value
        return value

    async def call_async(self, target: Remote, args: Any, kwargs: Any) -> Any:
        import anyio

        run = functools.partial(self.op, "call", target, args, kwargs)
        return (await anyio.to_thread.run_sync(run))[1]


# -- the server side ---------------------------------------------------------------------


class _Host:
    """What a server process serves the control socket with: ``serve``,
    ``close`` and ``stop`` Mesh, and run a function on the server's loop."""

    def serve(self, app: Any, options: dict[str, Any]) -> int:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def core(self) -> Any:
        raise NotImplementedError

    def run(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on the loop; an awaitable result awaited there:
        ``(awaited, value)``."""
        raise NotImplementedError


def _control_server(path: str, host: _Host) -> None:
    """Accept control connections on ``path``, one thread each, for ever."""
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(64)
    handles = _Handles()

    def serve_one(sock: socket.socket) -> None:
        with sock:
            while (data := _recv(sock)) is not None:
                try:
                    reply: Any = ("ok", _dispatch(host, handles, handles.loads(data)))
                except BaseException as exc:  # back to the test, which raises it
                    reply = ("error", exc)
                _send(sock, handles.dumps(reply))

    def accept_forever() -> None:
        while True:
            sock, _ = listener.accept()
            threading.Thread(target=serve_one, args=(sock,), daemon=True).start()

    threading.Thread(target=accept_forever, daemon=True).start()


def _dispatch(host: _Host, handles: _Handles, request: tuple[Any, ...]) -> Any:
    op, *args = request
    if op == "serve":
        spec, options = args
        handles.objects.clear()
        return host.serve(spec, options)
    if op == "close":
        host.close()
        return None
    if op == "stop":
        host.stop()
        handles.objects.clear()
        return None
    target = host.core() if args[0] == "core" else args[0]
    if op == "getattr":
        return host.run(lambda: getattr(target, args[1]))[1]
    if op == "setattr":
        return host.run(lambda: setattr(target, args[1], args[2]))[1]
    if op == "call":
        return host.run(lambda: target(*args[1], **args[2]))
    if op == "getitem":
        return host.run(lambda: target[args[1]])[1]
    if op == "len":
        return host.run(lambda: len(target))[1]
    if op == "list":
        return host.run(lambda: list(target))[1]
    if op == "repr":
        return repr(target)
    raise ValueError(f"unknown control op {op!r}")


class _EmbeddedHost(_Host):
    """``examples.embedded.EmbeddedServer`` on a thread of this process, a new
    one per test (bound to a port of its own); calls run between its turns."""

    def __init__(self) -> None:
        self.loop: Any = None
        self.thread: threading.Thread | None = None

    def serve(self, app: Any, options: dict[str, Any]) -> int:
        from tests.helpers.servers import EmbeddedLoop

        self.stop()
        self.loop = EmbeddedLoop(load_app(*app), "127.0.0.1", 0, **options)
        self.thread = threading.Thread(target=self.loop.serve_forever, daemon=True)
        self.thread.start()
        return int(self.loop.port)

    def close(self) -> None:
        thread, self.thread = self.thread, None
        if thread is not None:
            self.loop.stop()
            thread.join(30)

    def stop(self) -> None:
        self.close()
        self.loop = None

    def core(self) -> Any:
        return self.loop.core

    def run(self, fn: Callable[[], Any]) -> Any:
        from mesh_core.runtime import run_inline

        def inline() -> tuple[bool, Any]:
            value = fn()
            return (True, run_inline(value)) if inspect.iscoroutine(value) else (False, value)

        return self.loop.call(inline)


class _ASGIHost(_Host):
    """``mesh_asgi.MeshASGI`` behind :class:`_Switch`, in the ASGI server's
    loop (asyncio or trio, through anyio); a new one per test, its lifespan
    run by us (the server's own lifespan is the switch's)."""

    def __init__(self, switch: _Switch) -> None:
        self.switch = switch
        self.token: Any = None
        self.group: Any = None
        self.port = int(os.environ["MESH_TEST_PORT"])
        self.stopping: Any = None  # an anyio.Event: leave the current lifespan
        self.stopped: Any = None

    def _on_loop(self, fn: Callable[[], Any]) -> Any:
        import anyio.from_thread

        async def call() -> Any:
            value = fn()
            return await value if inspect.isawaitable(value) else value

        return anyio.from_thread.run(call, token=self.token)

    def serve(self, app: Any, options: dict[str, Any]) -> int:
        self.stop()

        async def start() -> None:
            import anyio

            from mesh_asgi import MeshASGI

            mesh = MeshASGI(load_app(*app), **options)
            self.stopping, self.stopped = anyio.Event(), anyio.Event()
            started = anyio.Event()
            failure: list[BaseException] = []

            async def run() -> None:
                try:
                    async with mesh.lifespan():
                        started.set()
                        await self.stopping.wait()
                except Exception as exc:
                    failure.append(exc)
                finally:
                    self.stopped.set()
                    started.set()

            self.group.start_soon(run)
            await started.wait()
            if failure:
                raise failure[0]
            self.switch.mesh = mesh

        self._on_loop(start)
        return self.port

    def close(self) -> None:
        mesh = self.switch.mesh
        if mesh is not None:
            self._on_loop(mesh.close)

    def stop(self) -> None:
        if self.stopping is None:
            return

        async def stop() -> None:
            self.stopping.set()
            await self.stopped.wait()
            self.switch.mesh = None

        self._on_loop(stop)
        self.stopping = None

    def core(self) -> Any:
        mesh = self.switch.mesh
        assert mesh is not None, "not serving"
        return mesh.server

    def run(self, fn: Callable[[], Any]) -> Any:
        def tagged() -> Any:
            value = fn()
            if not inspect.isawaitable(value):
                return (False, value)

            async def wait() -> Any:
                return (True, await value)

            return wait()

        return self._on_loop(tagged)


class _Switch:
    """The ASGI app the server process runs: the current test's ``MeshASGI``
    at every path; its lifespan starts the control socket."""

    def __init__(self) -> None:
        self.mesh: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        mesh = self.mesh
        if mesh is None:  # between two tests
            if scope["type"] == "websocket":
                await receive()
                await send({"type": "websocket.close", "code": 1013})
            else:
                await send({"type": "http.response.start", "status": 503, "headers": []})
                await send({"type": "http.response.body", "body": b""})
            return
        await mesh(scope, receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        import anyio
        import anyio.lowlevel

        await receive()  # lifespan.startup
        host = _ASGIHost(self)
        async with anyio.create_task_group() as group:
            host.token, host.group = anyio.lowlevel.current_token(), group
            _control_server(os.environ["MESH_TEST_CONTROL"], host)
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            with anyio.CancelScope(shield=True):
                if host.stopping is not None:
                    host.stopping.set()
                    await host.stopped.wait()
            group.cancel_scope.cancel()
        await send({"type": "lifespan.shutdown.complete"})


def asgi_app() -> Any:
    """The factory the ASGI servers load (``uvicorn --factory``, hypercorn's ``asgi_app()``)."""
    return _Switch()


def main() -> None:
    """The embedded server process: the control socket in the main thread's place."""
    host = _EmbeddedHost()
    _control_server(os.environ["MESH_TEST_CONTROL"], host)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("embedded server process ready", flush=True)
    while True:
        time.sleep(3600)


# -- the test side ------------------------------------------------------------------------


def _commands(port: int) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "embedded": [py, "-m", "tests.helpers.remote"],
        "uvicorn": [py, "-m", "uvicorn", "--factory", "tests.helpers.remote:asgi_app",
                    "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        "hypercorn-trio": [py, "-m", "hypercorn", "tests.helpers.remote:asgi_app()",
                           "--worker-class", "trio", "--bind", f"127.0.0.1:{port}",
                           "--workers", "0", "--graceful-timeout", "2"],
    }  # fmt: skip


class _Process:
    """One server process: started on a free port, waited for until it
    accepts, stopped by pid (SIGTERM, then SIGKILL), its output kept."""

    def __init__(self, kind: str) -> None:
        from tests.helpers.redis_server import free_port

        self.kind = kind
        self.dir = tempfile.mkdtemp(prefix=f"mesh-{kind}-")
        self.control = os.path.join(self.dir, "control.sock")
        self.log = open(os.path.join(self.dir, "output.log"), "w+b")  # noqa: SIM115
        self.port = free_port()
        env = {**os.environ, "MESH_TEST_CONTROL": self.control, "MESH_TEST_PORT": str(self.port)}
        self.proc = subprocess.Popen(
            _commands(self.port)[kind], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.client = _Client(self.control, self)
        self._wait_ready()

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        text = self.log.read().decode(errors="replace")
        return f"--- {self.kind} server output (exit {self.proc.poll()}) ---\n{text[-4000:]}"

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        targets: list[Any] = [self.control]
        if self.kind != "embedded":
            targets.append(("127.0.0.1", self.port))
        while targets:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited at startup\n{self.output()}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"server did not start\n{self.output()}")
            family = socket.AF_UNIX if isinstance(targets[0], str) else socket.AF_INET
            with socket.socket(family) as probe:
                try:
                    probe.connect(targets[0])
                    targets.pop(0)
                except OSError:
                    time.sleep(0.05)

    def stop(self, timeout: float = 10) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


_PROCESSES: dict[str, _Process] = {}


def _process(kind: str) -> _Process:
    proc = _PROCESSES.get(kind)
    if proc is None or proc.proc.poll() is not None:
        proc = _PROCESSES[kind] = _Process(kind)
    return proc


def stop_all() -> None:
    """End every server process (the session's end)."""
    while _PROCESSES:
        _PROCESSES.popitem()[1].stop()


class ProcessServer:
    """A test's server in the shared process of its kind (``KIND``)."""

    KIND = ""

    def __init__(self, app: Any, **options: Any) -> None:
        self._spec = spec_of(app)
        self._options = options
        self._client: _Client | None = None
        self.port = 0

    def __getattr__(self, name: str) -> Any:
        client = self.__dict__.get("_client")
        if client is None or name.startswith("__"):
            raise AttributeError(name)
        return client.op("getattr", "core", name)

    @asynccontextmanager
    async def listen(self) -> AsyncIterator[Any]:
        import anyio

        proc = await anyio.to_thread.run_sync(_process, self.KIND)
        self._client = proc.client
        self.port = await anyio.to_thread.run_sync(
            proc.client.op, "serve", self._spec, self._options
        )
        try:
            yield self
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(proc.client.op, "stop")

    async def close(self) -> None:
        """As ``MeshServer.close``: Mesh's graceful shutdown (1001 to every
        client, the store cleaned); the core stays readable until ``listen`` ends."""
        import anyio

        assert self._client is not None
        await anyio.to_thread.run_sync(self._client.op, "close")


def _server_class(kind: str) -> type[ProcessServer]:
    return type(f"ProcessServer[{kind}]", (ProcessServer,), {"KIND": kind})


#: (the anyio backend the test body runs on, the server's id, its class)
PROCESS_SERVERS: list[tuple[str, str, Any]] = [
    ("asyncio", kind, _server_class(kind)) for kind in ("embedded", "uvicorn")
] + [("trio", "hypercorn-trio", _server_class("hypercorn-trio"))]


if __name__ == "__main__":
    main()
