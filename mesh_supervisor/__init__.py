"""``mesh serve --workers N``: the supervisor process and its metrics port.

Plain blocking Python (processes, a thread, sockets, a clock), so it lives
outside the sans-IO core; ``mesh_core.cli`` imports it by name only when
``--workers`` is above 1, as it imports a runtime. See :mod:`._supervisor`.
"""

from ._supervisor import supervise

__all__ = ["supervise"]
