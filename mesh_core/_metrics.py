"""Counters a server keeps about itself, and their Prometheus text form.

Counting happens on the hot path (every message, every request), so it is
plain integer increments and dict bumps on one shared object; nothing is
computed until someone asks for a snapshot. Label values that a client could
choose (command names, error codes, close codes) are capped so that an
attacker cannot grow the tables without bound.

A snapshot is plain JSON data whose numbers all add up across processes
(the latency histogram is kept as per-bucket counts, not cumulative ones),
so the ``--workers`` supervisor sums its workers' snapshots with
:func:`combine` and renders the sum with the same :func:`prometheus_text`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

__all__ = [
    "LATENCY_BUCKETS",
    "OTHER",
    "UNKNOWN_COMMAND",
    "Metrics",
    "combine",
    "prometheus_text",
]

#: the label used once a table has reached :data:`MAX_LABELS` distinct keys
OTHER = "(other)"
#: requests for commands the app does not have are counted under this name
UNKNOWN_COMMAND = "(unknown)"
MAX_LABELS = 256
#: upper bounds (seconds) of the command latency histogram's buckets; a
#: last, unbounded bucket (``+Inf``) follows
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_FIRST_BOUND = LATENCY_BUCKETS[0]


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
    and :class:`~mesh_core.ServerCore` increment them directly.

    A request is counted once, as it is answered: in :attr:`ok` by command,
    or in :attr:`failed` by (command, error code). The requests by command,
    the outcomes by command and the errors by code are their sums, taken at
    :meth:`snapshot`. Storage operations are counted by their type, named at
    :meth:`snapshot` too. So the hot path pays one table bump and the
    histogram's bucket per request, one bump per storage operation."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "closes",
        "connections_total",
        "failed",
        "handshake_rejections",
        "latency_counts",
        "latency_sum",
        "ok",
        "slow_consumer_closes",
        "store_errors",
        "store_operations",
        "violations",
    )

    def __init__(self) -> None:
        self.connections_total = 0
        self.violations = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.slow_consumer_closes = 0
        #: connections that ended, by close code
        self.closes: dict[int | str, int] = {}
        #: upgrades refused, by HTTP status
        self.handshake_rejections: dict[int | str, int] = {}
        #: requests answered ``ok``, by command; and those answered with an
        #: error, by (command, error code). Commands the app does not have
        #: count as :data:`UNKNOWN_COMMAND`
        self.ok: dict[str, int] = {}
        self.failed: dict[tuple[str, str], int] = {}
        #: how long requests took, per bucket of :data:`LATENCY_BUCKETS`
        #: (the last one: longer), and their total in seconds
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        #: storage operations run, and those that failed, by operation type
        #: (a fixed set of classes: no cap needed)
        self.store_operations: defaultdict[type, int] = defaultdict(int)
        self.store_errors: defaultdict[type, int] = defaultdict(int)

    def answered(self, command: str, outcome: str, seconds: float) -> None:
        """One request answered: its outcome (``ok`` or the error code) and
        its latency. Past :data:`MAX_LABELS` keys a table counts new ones as
        ``OTHER`` (an error stays an error: ``(OTHER, OTHER)``)."""
        if outcome == "ok":
            ok = self.ok
            try:
                ok[command] += 1
            except KeyError:
                key = command if len(ok) < MAX_LABELS else OTHER
                ok[key] = ok.get(key, 0) + 1
        else:
            pair = (command, outcome)
            failed = self.failed
            try:
                failed[pair] += 1
            except KeyError:
                if len(failed) >= MAX_LABELS:
                    pair = (OTHER, OTHER)
                failed[pair] = failed.get(pair, 0) + 1
        if seconds <= _FIRST_BOUND:  # most answers: no search
            self.latency_counts[0] += 1
        else:
            self.latency_counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def snapshot(
        self, connections_current: int, requests_in_flight: int, redis_reconnects: int = 0
    ) -> dict[str, Any]:
        """A plain, JSON-friendly copy of every counter."""
        commands: dict[str, dict[str, int]] = {}
        requests: dict[str, int] = {}
        errors: dict[str, int] = {}
        for command, count in self.ok.items():
            commands[command] = {"ok": count}
            requests[command] = count
        for (command, outcome), count in self.failed.items():
            commands.setdefault(command, {})[outcome] = count
            requests[command] = requests.get(command, 0) + count
            errors[outcome] = errors.get(outcome, 0) + count
        return {
            "connections_current": connections_current,
            "requests_in_flight": requests_in_flight,
            "connections_total": self.connections_total,
            "requests_total": sum(requests.values()),
            "requests_by_command": requests,
            "errors_by_code": errors,
            "violations": self.violations,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "slow_consumer_closes": self.slow_consumer_closes,
            "closes_by_code": {str(k): v for k, v in self.closes.items()},
            "handshake_rejections_by_status": {
                str(k): v for k, v in self.handshake_rejections.items()
            },
            "commands": commands,
            "latency_counts": list(self.latency_counts),
            "latency_sum": self.latency_sum,
            "store_operations_by_op": _by_name(self.store_operations),
            "store_errors_by_op": _by_name(self.store_errors),
            "redis_reconnects": redis_reconnects,
        }


def _by_name(table: Mapping[type, int]) -> dict[str, int]:
    named: dict[str, int] = {}
    for kind, count in table.items():
        named[kind.__name__] = named.get(kind.__name__, 0) + count
    return named


def combine(snapshots: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The sum of several processes' snapshots: numbers add, tables add key
    by key, the histogram's bucket counts add bucket by bucket. Of none: a
    snapshot of zeros, which renders like a server that saw nothing."""
    total: dict[str, Any] = Metrics().snapshot(0, 0)
    for snapshot in snapshots:
        _add_into(total, snapshot)
    return total


def _add_into(total: dict[str, Any], part: Mapping[str, Any]) -> None:
    for key, value in part.items():
        if isinstance(value, Mapping):
            _add_into(total.setdefault(key, {}), value)
        elif isinstance(value, list):
            have = total.setdefault(key, [0] * len(value))
            have.extend([0] * (len(value) - len(have)))
            for i, item in enumerate(value):
                have[i] += item
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            total[key] = total.get(key, 0) + value


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def prometheus_text(
    snapshot: Mapping[str, Any],
    prefix: str = "mesh",
    workers: Mapping[str, Mapping[str, Any] | None] | None = None,
) -> str:
    """Render a :meth:`Metrics.snapshot` in the Prometheus text exposition
    format (version 0.0.4), without depending on ``prometheus_client``.

    With ``workers`` (worker name to its own snapshot, ``None`` for a worker
    that did not answer), ``snapshot`` is their :func:`combine`: counters are
    the sums, and the gauges that only mean something per process
    (connections open, requests in flight) carry a ``worker`` label, beside
    ``worker_up``."""
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[str, Any]]) -> None:
        full = f"{prefix}_{name}"
        lines.append(f"# HELP {full} {help_text}")
        lines.append(f"# TYPE {full} {kind}")
        for labels, value in samples:
            lines.append(f"{full}{labels} {value}")

    def labelled(label: str, table: dict[str, int]) -> list[tuple[str, Any]]:
        return [(f'{{{label}="{_escape(key)}"}}', value) for key, value in sorted(table.items())]

    def gauge(key: str) -> list[tuple[str, Any]]:
        if workers is None:
            return [("", snapshot[key])]
        return [
            (f'{{worker="{_escape(name)}"}}', part[key])
            for name, part in workers.items()
            if part is not None
        ]

    if workers is not None:
        family(
            "worker_up",
            "gauge",
            "1 if the worker process is running and answered this scrape, else 0.",
            [(f'{{worker="{_escape(n)}"}}', int(p is not None)) for n, p in workers.items()],
        )
    family(
        "connections",
        "gauge",
        "WebSocket connections open now.",
        gauge("connections_current"),
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
        gauge("requests_in_flight"),
    )
    family(
        "requests_total",
        "counter",
        "Requests answered, by command.",
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
    family(
        "commands_total",
        "counter",
        "Requests answered, by command and outcome (ok, or the error code).",
        [
            (f'{{command="{_escape(command)}",outcome="{_escape(outcome)}"}}', count)
            for command, outcomes in sorted(snapshot["commands"].items())
            for outcome, count in sorted(outcomes.items())
        ],
    )
    histogram = f"{prefix}_command_duration_seconds"
    lines.append(
        f"# HELP {histogram} Time from the read that brought a request in to its answer"
        " (its wait for a request slot included)."
    )
    lines.append(f"# TYPE {histogram} histogram")
    cumulative = 0
    counts = snapshot["latency_counts"]
    for bound, count in zip((*LATENCY_BUCKETS, "+Inf"), counts, strict=True):
        cumulative += count
        lines.append(f'{histogram}_bucket{{le="{bound}"}} {cumulative}')
    lines.append(f"{histogram}_sum {float(snapshot['latency_sum']):.6f}")
    lines.append(f"{histogram}_count {cumulative}")
    family(
        "store_operations_total",
        "counter",
        "Storage operations run, by operation.",
        labelled("op", snapshot["store_operations_by_op"]),
    )
    family(
        "store_errors_total",
        "counter",
        "Storage operations that failed (the store unreachable, or an error), by operation.",
        labelled("op", snapshot["store_errors_by_op"]),
    )
    family(
        "redis_reconnects_total",
        "counter",
        "Connections to Redis opened again after one was lost or could not be opened.",
        [("", snapshot["redis_reconnects"])],
    )
    return "\n".join(lines) + "\n"
