"""Mesh mounted inside an ASGI application (uvicorn, hypercorn, Starlette,
FastAPI): ``MeshASGI``. Install with ``pip install 'mesh-python[asgi]'``;
see docs/EMBEDDING.md."""

from ._app import MeshASGI

__all__ = ["MeshASGI"]
