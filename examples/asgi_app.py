"""Mesh inside a Starlette app: a live-chat page at ``/`` and Mesh (the demo
app, ``examples.demo:app``) at ``/ws``, on one port.

    uvicorn examples.asgi_app:app
    hypercorn examples.asgi_app:app --worker-class trio
    python -m examples.asgi_app [--server uvicorn|hypercorn-trio] [--port 8000]

The servers' own shutdown closes WebSockets before the lifespan's shutdown
reaches Mesh (uvicorn with 1012, hypercorn's trio worker by cancelling them:
1006). Run as ``python -m examples.asgi_app``, the same servers are started
from code with Mesh's graceful shutdown first on SIGINT/SIGTERM (requests in
flight answered, every client closed 1001, the store cleaned), as ``mesh serve``.

``MESH_PING_INTERVAL`` (seconds) sets the ping interval when set
(``MESH_LATENCY_INTERVAL`` the latency probes'). The page
speaks the Mesh wire format with the browser's own ``WebSocket``: join a
room (``mesh/join-room``), send with the demo's ``broadcast-room``, show the
``chat`` pushes, answer pings.
"""

from __future__ import annotations

import argparse
import os
import signal
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route, WebSocketRoute

from examples.demo import app as demo_app
from mesh_asgi import MeshASGI

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Mesh chat</title>
<style>
 body { font: 15px system-ui, sans-serif; max-width: 40em; margin: 2em auto; }
 #log { border: 1px solid #ccc; height: 20em; overflow: auto; padding: 0 .5em; }
 #log p { margin: .3em 0; }
</style></head>
<body>
<h1>Mesh chat</h1>
<p id="status">connecting&hellip;</p>
<form id="join">
 <input id="name" placeholder="your name" required>
 <input id="room" value="lobby" required> <button>Join</button>
</form>
<form id="say" hidden><input id="text" autocomplete="off" required> <button>Send</button></form>
<div id="log"></div>
<script>
const $ = (id) => document.getElementById(id);
const scheme = location.protocol === "https:" ? "wss://" : "ws://";
const ws = new WebSocket(scheme + location.host + "/ws");
const waiting = new Map();
let nextId = 1, room = null;
const frame = (command, payload, id) => ws.send(JSON.stringify({ id, command, payload }));
function command(name, payload) {
  const id = nextId++;
  frame(name, payload, id);
  return new Promise((resolve) => waiting.set(id, resolve));
}
function line(text) {
  const p = document.createElement("p");
  p.textContent = text;
  $("log").append(p);
  $("log").scrollTop = $("log").scrollHeight;
}
ws.onmessage = (event) => {
  const f = JSON.parse(event.data);
  if (f.id !== undefined && waiting.has(f.id)) {
    waiting.get(f.id)(f.payload);
    waiting.delete(f.id);
  } else if (f.command === "ping") {
    frame("pong", {});
  } else if (f.command === "latency:request") {
    frame("latency:response", {});
  } else if (f.command === "mesh/assign-id") {
    $("status").textContent = "connected as " + f.payload;
    document.body.dataset.connected = "1";
  } else if (f.command === "chat") {
    line(f.payload.from + ": " + f.payload.text);
  }
};
ws.onclose = () => { $("status").textContent = "disconnected"; };
$("join").onsubmit = async (event) => {
  event.preventDefault();
  room = $("room").value;
  await command("mesh/join-room", { roomName: room });
  $("join").hidden = true;
  $("say").hidden = false;
  line("joined " + room);
  document.body.dataset.joined = "1";
};
$("say").onsubmit = async (event) => {
  event.preventDefault();
  const text = $("text").value;
  $("text").value = "";
  await command("broadcast-room",
    { roomName: room, event: "chat", data: { from: $("name").value, text } });
};
</script>
</body></html>
"""


async def page(request: Request) -> HTMLResponse:
    return HTMLResponse(PAGE)


_options: dict[str, Any] = {
    option: float(os.environ[variable])
    for option, variable in (("ping_interval", "MESH_PING_INTERVAL"),
                             ("latency_interval", "MESH_LATENCY_INTERVAL"))
    if os.environ.get(variable)
}  # fmt: skip
mesh = MeshASGI(demo_app, **_options)
# Starlette does not pass lifespan events to the routes' apps: hand Mesh's over
app = Starlette(routes=[Route("/", page), WebSocketRoute("/ws", mesh)], lifespan=mesh.lifespan)


def serve_uvicorn(host: str, port: int) -> None:
    """uvicorn, with ``mesh.close()`` before its own shutdown sends 1012."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            await mesh.close()
            await super().shutdown(sockets)

    Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run()


def serve_hypercorn_trio(host: str, port: int) -> None:
    """hypercorn's trio worker; its shutdown trigger is a signal, then ``mesh.close()``."""
    import trio
    from hypercorn.config import Config
    from hypercorn.trio import serve

    async def signalled_then_mesh_closed() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break
        await mesh.close()

    config = Config()
    config.bind = [f"{host}:{port}"]
    asgi: Any = app  # an ASGI app; hypercorn's types name its own
    trio.run(lambda: serve(asgi, config, shutdown_trigger=signalled_then_mesh_closed))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Mesh in Starlette, with a graceful shutdown")
    parser.add_argument("--server", choices=("uvicorn", "hypercorn-trio"), default="uvicorn")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    serve = serve_uvicorn if args.server == "uvicorn" else serve_hypercorn_trio
    serve(args.host, args.port)


if __name__ == "__main__":
    main()
