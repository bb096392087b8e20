"""Counters a server keeps about itself, and their Prometheus text form.

Counting happens on the hot path (every message, every request), so it is
plain integer increments and dict bumps on one shared object; nothing is
computed until someone asks for a snapshot. Label values that a client could
choose (command names, error codes, close codes) are capped so that an
attacker cannot grow the tables without bound.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OTHER", "UNKNOWN_COMMAND", "Metrics", "prometheus_text"]

#: the label used once a table has reached :data:`MAX_LABELS` distinct keys
OTHER = "(other)"
#: requests for commands the app does not have are counted under this name
UNKNOWN_COMMAND = "(unknown)"
MAX_LABELS = 256


def bump(table: dict[Any, int], key: Any) -> None:
    """``table[key] += 1``, folding new keys into ``OTHER`` past the cap."""
    if key in table:
        table[key] += 1
    elif len(table) < MAX_LABELS:
        table[key] = 1
    else:
        table[OTHER] = table.get(OTHER, 0) + 1


class Metrics:
    """The counters of one server; :class:`~mesh_core.ServerConnection`
    and :class:`~mesh_core.ServerCore` increment them directly."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "closes",
        "connections_total",
        "errors",
        "handshake_rejections",
        "requests",
        "slow_consumer_closes",
        "violations",
    )

    def __init__(self) -> None:
        self.connections_total = 0
        #: requests dispatched, by command (unknown commands count as OTHER)
        self.requests: dict[str, int] = {}
        #: error payloads sent, by their ``code``
        self.errors: dict[str, int] = {}
        self.violations = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.slow_consumer_closes = 0
        #: connections that ended, by close code
        self.closes: dict[int | str, int] = {}
        #: upgrades refused, by HTTP status
        self.handshake_rejections: dict[int | str, int] = {}

    def snapshot(self, connections_current: int, requests_in_flight: int) -> dict[str, Any]:
        """A plain, JSON-friendly copy of every counter."""
        return {
            "connections_current": connections_current,
            "requests_in_flight": requests_in_flight,
            "connections_total": self.connections_total,
            "requests_total": sum(self.requests.values()),
            "requests_by_command": dict(self.requests),
            "errors_by_code": dict(self.errors),
            "violations": self.violations,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "slow_consumer_closes": self.slow_consumer_closes,
            "closes_by_code": {str(k): v for k, v in self.closes.items()},
            "handshake_rejections_by_status": {
                str(k): v for k, v in self.handshake_rejections.items()
            },
        }


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def prometheus_text(snapshot: dict[str, Any], prefix: str = "mesh") -> str:
    """Render a :meth:`Metrics.snapshot` in the Prometheus text exposition
    format (version 0.0.4), without depending on ``prometheus_client``."""
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[str, Any]]) -> None:
        full = f"{prefix}_{name}"
        lines.append(f"# HELP {full} {help_text}")
        lines.append(f"# TYPE {full} {kind}")
        for labels, value in samples:
            lines.append(f"{full}{labels} {value}")

    def labelled(label: str, table: dict[str, int]) -> list[tuple[str, Any]]:
        return [(f'{{{label}="{_escape(key)}"}}', value) for key, value in sorted(table.items())]

    family(
        "connections",
        "gauge",
        "WebSocket connections open now.",
        [("", snapshot["connections_current"])],
    )
    family(
        "connections_total",
        "counter",
        "WebSocket connections accepted.",
        [("", snapshot["connections_total"])],
    )
    family(
        "requests_in_flight",
        "gauge",
        "Requests being handled now.",
        [("", snapshot["requests_in_flight"])],
    )
    family(
        "requests_total",
        "counter",
        "Requests dispatched, by command.",
        labelled("command", snapshot["requests_by_command"]),
    )
    family(
        "errors_total",
        "counter",
        "Error payloads answered, by code.",
        labelled("code", snapshot["errors_by_code"]),
    )
    family(
        "violations_total",
        "counter",
        "Protocol violations (frames that are not valid Mesh frames).",
        [("", snapshot["violations"])],
    )
    family(
        "received_bytes_total", "counter", "Bytes read from clients.", [("", snapshot["bytes_in"])]
    )
    family(
        "sent_bytes_total", "counter", "Bytes written to clients.", [("", snapshot["bytes_out"])]
    )
    family(
        "slow_consumer_closes_total",
        "counter",
        "Connections dropped because their send buffer overflowed.",
        [("", snapshot["slow_consumer_closes"])],
    )
    family(
        "closes_total",
        "counter",
        "Connections ended, by close code.",
        labelled("code", snapshot["closes_by_code"]),
    )
    family(
        "handshake_rejections_total",
        "counter",
        "Upgrades refused, by HTTP status.",
        labelled("status", snapshot["handshake_rejections_by_status"]),
    )
    return "\n".join(lines) + "\n"
