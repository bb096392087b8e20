"""The demo app as a bare ``mesh_asgi`` application, for ``mesh-uvicorn``: Mesh
at every path (the load generator upgrades ``/``), no framework around it,
pings off as in the other benchmarked servers."""

from __future__ import annotations

from examples.demo import app as demo_app
from mesh_asgi import MeshASGI

app = MeshASGI(demo_app, ping_interval=0, latency_interval=0)
