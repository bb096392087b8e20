"""Mesh inside a Starlette app: a live-chat page at ``/`` and Mesh (the demo
app, ``examples.demo:app``) at ``/ws``, on one port.

    uvicorn examples.asgi_app:app
    hypercorn examples.asgi_app:app --worker-class trio

``MESH_PING_INTERVAL`` (seconds) sets the ping interval when set
(``MESH_LATENCY_INTERVAL`` the latency probes'). The page
speaks the Mesh wire format with the browser's own ``WebSocket``: join a
room (``mesh/join-room``), send with the demo's ``broadcast-room``, show the
``chat`` pushes, answer pings.
"""

from __future__ import annotations

import os
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
