"""Run the benchmarks: ``python -m benchmarks [--quick] [--parts ...]``.

Parts (all by default): ``core`` (frame handling in the sans-IO core, with
the msgspec and wsproto floors), ``e2e`` (servers over loopback, with the
bare wsproto + msgspec floors), ``scale`` (idle memory, accepting, room
broadcast), ``profile`` (py-spy on the noop path). Prints tables, writes
``benchmarks/results/results.json`` and ``results.md``, and ``chart.png``
when matplotlib is installed, and refreshes the committed summary
``benchmarks/RESULTS.md`` (not on a ``--quick`` run). Every comparison is
measured in the same run; figures are medians of several rounds, and e2e
rounds alternate between servers so that drift on a shared machine hits all
of them alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import core, prof, scale
from ._util import RESULTS, ROOT, median, private_redis, raise_fd_limit
from .driver import WORKER_LOG, run_load, wait_idle
from .servers import FLOOR_OF, KINDS, ServerFailed, ServerSpec, Unavailable, running

PARTS = ("core", "e2e", "scale", "profile")
#: load name -> (mix, clients, in flight per client)
LOADS: dict[str, tuple[str, int, int]] = {
    "noop 50x4": ("noop", 50, 4),
    "echo 50x4": ("echo", 50, 4),
    "meta 50x4": ("meta", 50, 4),
    "noop 1000x1": ("noop", 1000, 1),
}
BARE_LOADS = ("noop 50x4", "noop 1000x1")  # the bare servers answer `true` to anything
MESH_KINDS = ("mesh-asyncio", "mesh-uvloop", "mesh-trio")

#: the committed summary of the latest full run, which the README links to
REPORT = ROOT / "benchmarks" / "RESULTS.md"
#: where the hand-written part of the summary starts: a refresh keeps it
KEPT_HEADING = "## How the figures are measured"

# the issue's reference figures (measured outside this run; see benchmarks/RESULTS.md)
SOCKETIO_CPU_US = 91.0  # python-socketio's best plain setup, server CPU per call
SOCKETIO_KIB_PER_CONN = 78.0  # its smallest idle connection
REFERENCE_META_REDIS_CPU_US = 20.0  # the TypeScript server, meta on Redis


def _log(text: str) -> None:
    print(text, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Mesh for Python benchmarks (core, end to end, scale, profile).",
    )
    p.add_argument("--quick", action="store_true", help="a smoke test in under a minute")
    p.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}"
    )
    p.add_argument(
        "--servers",
        default=",".join(KINDS),
        help=f"comma-separated subset of {','.join(KINDS)} (e2e, scale, profile)",
    )
    p.add_argument(
        "--loads", default=",".join(LOADS), help=f"comma-separated subset of {','.join(LOADS)}"
    )
    p.add_argument(
        "--store",
        default="memory",
        help="memory, redis or memory,redis (redis needs `mesh serve --redis URL`)",
    )
    p.add_argument(
        "--redis-url",
        default=None,
        help="the Redis for --store redis (default: a private redis-server on a free port)",
    )
    p.add_argument(
        "--rounds", type=int, default=None, help="rounds per e2e figure (default 5; quick 2)"
    )
    p.add_argument("--duration", type=float, default=None, help="seconds measured per e2e run")
    p.add_argument("--warmup", type=float, default=None, help="seconds of load before measuring")
    p.add_argument("--procs", type=int, default=2, help="load generator processes")
    p.add_argument("--out", type=Path, default=RESULTS, help="where to write results")
    p.add_argument(
        "--report",
        type=Path,
        default=None,
        help="the Markdown summary to refresh (default benchmarks/RESULTS.md; "
        "a --quick run writes none unless this is given)",
    )
    return p


def _split(value: str, allowed: Any) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise SystemExit(f"error: unknown {', '.join(bad)} (choose from {', '.join(allowed)})")
    return items


# -- end to end ------------------------------------------------------------------


def run_e2e(
    kinds: list[str],
    loads: list[str],
    stores: list[str],
    *,
    rounds: int,
    warmup: float,
    duration: float,
    procs: int,
    redis_url: str,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    samples: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    unavailable: dict[tuple[str, str], str] = {}
    for r in range(rounds):
        log(f"  round {r + 1}/{rounds}")
        for store in stores:
            for kind in kinds:
                if KINDS[kind][2] and store != "memory":
                    continue  # the bare servers keep no state
                spec = ServerSpec(kind, store=store, redis_url=redis_url)
                try:
                    spec.argv(0)
                except Unavailable as exc:
                    unavailable[(kind, store)] = str(exc)
                    continue
                if (kind, store) in unavailable:
                    continue  # it failed in an earlier round
                mine = [ld for ld in loads if not KINDS[kind][2] or ld in BARE_LOADS]
                try:
                    with running(spec) as server:
                        for load in mine:
                            mix, clients, inflight = LOADS[load]
                            wait_idle(server.pid)
                            figures = run_load(
                                server.pid,
                                server.port,
                                mix=mix,
                                conns=clients,
                                inflight=inflight,
                                procs=procs,
                                warmup=warmup,
                                duration=duration,
                            )
                            samples.setdefault((kind, store, load), []).append(figures)
                            log(
                                f"    {kind:13s} {store:6s} {load:12s} {figures['rps']:8.0f}/s "
                                f"server {figures['server_cpu_us']:6.1f} µs/cmd "
                                f"(load gen {figures['gen_cpu_us']:5.1f})"
                            )
                except ServerFailed as exc:
                    unavailable[(kind, store)] = f"FAILED: {exc}"
                    log(f"    {kind:13s} {store:6s} FAILED: {exc}")
    rows = []
    for (kind, store, load), runs in samples.items():
        row: dict[str, Any] = {"server": kind, "store": store, "load": load, "rounds": len(runs)}
        for key in runs[0]:
            row[key] = median([x[key] for x in runs])
        row["rps_rounds"] = [x["rps"] for x in runs]
        row["server_cpu_us_rounds"] = [x["server_cpu_us"] for x in runs]
        rows.append(row)
    for (kind, store), reason in unavailable.items():
        rows.append({"server": kind, "store": store, "load": "*", "unavailable": reason})
    return rows


# -- tables ----------------------------------------------------------------------


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def _markdown(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def notes(results: dict[str, Any]) -> list[str]:
    """What could not be measured, and why."""
    out = [
        f"{r['server']} ({r['store']}): {r['unavailable']}"
        for r in results.get("e2e", ())
        if "unavailable" in r
    ]
    out += [
        f"{f['server']} ({f['part']}): {f['error']}"
        for f in results.get("scale", {}).get("failed", ())
    ]
    profile = results.get("profile")
    if isinstance(profile, dict):
        out += [
            f"{k} (profile): {v['failed']}"
            for k, v in profile.items()
            if isinstance(v, dict) and "failed" in v
        ]
    return out


def tables(results: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    out = []
    if "core" in results:
        rows = [
            [
                r["case"],
                f"{r['frames_per_s']:,.0f}",
                f"{r['core_us']:.1f}",
                f"{r['msgspec_us']:.2f}",
                f"{r['wsproto_us']:.1f}",
                f"{r['framing_us']:.1f}",
                f"{r['ratio_msgspec']:.0f}x",
                f"{r['overhead_us']:.1f}",
                f"{r['overhead_ratio']:.1f}x",
            ]
            for r in results["core"]
        ]
        out.append(
            (
                "Core frame handling, no sockets (one frame in, one response out)",
                [
                    "command",
                    "frames/s",
                    "µs/frame",
                    "msgspec floor µs",
                    "wsproto floor µs",
                    "least framing µs",
                    "core / msgspec",
                    "core - framing µs",
                    "(core - framing) / msgspec",
                ],
                rows,
            )
        )
    if "e2e" in results:
        rows = []
        for r in results["e2e"]:
            if "unavailable" in r:
                continue  # listed under the notes
            rows.append(
                [
                    r["server"],
                    r["store"],
                    r["load"],
                    f"{r['rps']:,.0f}",
                    f"{r['p50_ms']:.1f}",
                    f"{r['p99_ms']:.1f}",
                    f"{r['server_cpu_us']:.1f}",
                    f"{r['server_util'] * 100:.0f}%",
                    f"{r['gen_cpu_us']:.1f}",
                    f"{r['gen_util'] * 100:.0f}%",
                ]
            )
        out.append(
            (
                "End to end over loopback (clients x in flight)",
                [
                    "server",
                    "store",
                    "load",
                    "round trips/s",
                    "p50 ms",
                    "p99 ms",
                    "server CPU µs/cmd",
                    "server CPU",
                    "load gen CPU µs/cmd",
                    "load gen CPU",
                ],
                rows,
            )
        )
    if "scale" in results:
        small, large = results["scale"]["counts"]
        rows = [
            [
                r["server"],
                f"{r['rss_base_mb']:.1f}",
                f"{r[f'rss_{small}_mb']:.1f}",
                f"{r[f'rss_{large}_mb']:.1f}",
                f"{r[f'bytes_per_conn_{small}'] / 1024:.1f}",
                f"{r[f'bytes_per_conn_{large}'] / 1024:.1f}",
                f"{r[f'accept_{small}_ms']:.0f}",
            ]
            for r in results["scale"]["idle"]
        ]
        out.append(
            (
                "Idle connections and accepting",
                [
                    "server",
                    "RSS fresh MB",
                    f"RSS {small:,} MB",
                    f"RSS {large:,} MB",
                    f"KiB/conn at {small:,}",
                    f"KiB/conn at {large:,}",
                    f"accept {small:,} ms",
                ],
                rows,
            )
        )
        rows = [
            [
                r["server"],
                str(r["members"]),
                str(r["rounds"]),
                f"{r['p50_ms']:.1f}",
                f"{r['p99_ms']:.1f}",
            ]
            for r in results["scale"]["broadcast"]
        ]
        out.append(
            (
                "Room broadcast: until the last member has it",
                ["server", "members", "rounds", "p50 ms", "p99 ms"],
                rows,
            )
        )
    if isinstance(results.get("profile"), dict):
        for kind, summary in results["profile"].items():
            if not isinstance(summary, dict) or "self" not in summary:
                continue
            rows = [[name, f"{pct:.1f}%"] for name, pct in summary["self"][:12]]
            modules = ", ".join(f"{m} {p:.0f}%" for m, p in summary["self_by_module"][:6])
            out.append(
                (
                    f"Profile of {kind}, noop 50x4 (self time; {modules})",
                    ["function", "samples"],
                    rows,
                )
            )
    return out


# -- goals -----------------------------------------------------------------------


def _e2e(results: dict[str, Any], kind: str, load: str, store: str = "memory") -> Any:
    for r in results.get("e2e", ()):
        if (r["server"], r["load"], r["store"]) == (kind, load, store) and "rps" in r:
            return r
    return None


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def goal(number: int, text: str, met: bool | None, figures: str) -> None:
        status = "not measured" if met is None else "met" if met else "not met"
        out.append({"goal": number, "text": text, "status": status, "figures": figures})

    # 1. noop CPU/command <= 1.25x the bare server on the same runtime
    pairs = []
    for kind, floor in FLOOR_OF.items():
        mesh, bare = _e2e(results, kind, "noop 50x4"), _e2e(results, floor, "noop 50x4")
        if mesh and bare:
            ratio = mesh["server_cpu_us"] / bare["server_cpu_us"]
            pairs.append(
                (
                    ratio,
                    f"{kind} {mesh['server_cpu_us']:.1f} vs {floor} "
                    f"{bare['server_cpu_us']:.1f} µs = {ratio:.2f}x",
                )
            )
    goal(
        1,
        "noop: server CPU per command ≤ 1.25x the bare wsproto + msgspec server's, per runtime",
        all(p[0] <= 1.25 for p in pairs) if pairs else None,
        "; ".join(p[1] for p in pairs) or "e2e not run",
    )
    # 2. meta on Redis
    metas = [(k, _e2e(results, k, "meta 50x4", "redis")) for k in MESH_KINDS]
    measured = [(k, r) for k, r in metas if r]
    limit = 2 * REFERENCE_META_REDIS_CPU_US
    goal(
        2,
        f"meta on Redis: server CPU per command ≤ 2x the reference's (≤ {limit:.0f} µs)",
        all(r["server_cpu_us"] <= limit for _, r in measured) if measured else None,
        "; ".join(f"{k} {r['server_cpu_us']:.1f} µs" for k, r in measured)
        or next(
            (
                r["unavailable"]
                for r in results.get("e2e", ())
                if r.get("store") == "redis" and "unavailable" in r
            ),
            "run with --store redis (needs `mesh serve --redis URL`)",
        ),
    )
    # 3. >= 3x python-socketio's calls per CPU-second, <= 1/5 of its memory
    cpu_limit = SOCKETIO_CPU_US / 3
    mem_limit = SOCKETIO_KIB_PER_CONN / 5
    worst = []
    for kind in MESH_KINDS:
        rows = [_e2e(results, kind, ld) for ld in ("noop 50x4", "echo 50x4", "meta 50x4")]
        if any(rows):
            w = max(r["server_cpu_us"] for r in rows if r)
            worst.append((kind, w))
    mem = []
    if "scale" in results:
        large = results["scale"]["counts"][1]
        mem = [
            (r["server"], r[f"bytes_per_conn_{large}"] / 1024)
            for r in results["scale"]["idle"]
            if r["server"] in MESH_KINDS
        ]
    met3: bool | None = None
    if worst and mem:
        met3 = all(w <= cpu_limit for _, w in worst) and all(m <= mem_limit for _, m in mem)
    elif any(w > cpu_limit for _, w in worst) or any(m > mem_limit for _, m in mem):
        met3 = False
    goal(
        3,
        f"≥ 3x python-socketio's calls per CPU-second on every mix (≤ {cpu_limit:.1f} µs/cmd) "
        f"and ≤ 1/5 of its memory per idle connection (≤ {mem_limit:.1f} KiB)",
        met3,
        "; ".join(
            [f"{k} worst mix {w:.1f} µs/cmd ({1e6 / w:,.0f} cmds/CPU-s)" for k, w in worst]
            + [f"{k} {m:.1f} KiB/conn" for k, m in mem]
        )
        or "needs the noop, echo and meta loads and the scale part",
    )
    # 4. core overhead <= 3x the msgspec floor
    if "core" in results:
        noop = next(r for r in results["core"] if r["case"] == "noop")
        worst_overhead = max(r["overhead_ratio"] for r in results["core"])
        goal(
            4,
            "core overhead ≤ 3x the msgspec floor",
            worst_overhead <= 3,
            f"noop: core {noop['core_us']:.1f} µs = {noop['ratio_msgspec']:.0f}x msgspec "
            f"({noop['msgspec_us']:.2f} µs); beyond the least WebSocket framing "
            f"({noop['framing_us']:.1f} µs) {noop['overhead_us']:.1f} µs = "
            f"{noop['overhead_ratio']:.1f}x; worst case {worst_overhead:.1f}x",
        )
    else:
        goal(4, "core overhead ≤ 3x the msgspec floor", None, "core not run")
    # 5. <= 16 KiB per idle connection at 10,000
    if "scale" in results:
        large = results["scale"]["counts"][1]
        per = [
            (r["server"], r[f"bytes_per_conn_{large}"] / 1024)
            for r in results["scale"]["idle"]
            if r["server"] in MESH_KINDS
        ]
        goal(
            5,
            f"idle connections ≤ 16 KiB each at {large:,} connections",
            all(v <= 16 for _, v in per) if per else None,
            "; ".join(f"{k} {v:.1f} KiB" for k, v in per),
        )
        casts = results["scale"]["broadcast"]
        goal(
            6,
            "1,000-member room broadcast delivered within 50 ms p99 (in-memory store)",
            all(r["p99_ms"] <= 50 for r in casts) if casts else None,
            "; ".join(
                f"{r['server']} p50 {r['p50_ms']:.1f} / p99 {r['p99_ms']:.1f} ms" for r in casts
            ),
        )
    else:
        goal(5, "idle connections ≤ 16 KiB each at 10,000 connections", None, "scale not run")
        goal(6, "1,000-member room broadcast within 50 ms p99", None, "scale not run")
    return out


# -- the committed summary -------------------------------------------------------


def write_report(
    path: Path, body: Sequence[str], results: dict[str, Any], argv: Sequence[str]
) -> None:
    """Refresh ``RESULTS.md``: this run's tables under its date and command,
    then the hand-written part of the old file (from :data:`KEPT_HEADING` on),
    so that a run replaces the figures without losing how they are taken."""
    old = path.read_text() if path.exists() else ""
    at = old.find(KEPT_HEADING)
    kept = old[at:] if at >= 0 else ""
    machine = results["machine"]
    command = shlex.join(["benchmarks/run", *argv])
    head = [
        "# Benchmark results",
        "",
        "Written by `benchmarks/run` at the end of its latest run that was not `--quick`.",
        "The raw figures (`results.json`, profiles, server logs) are in `benchmarks/results/`,",
        "which is not committed. Compare rows of one run with each other, not with another",
        "run's or another machine's.",
        "",
        "## Latest run",
        "",
        f"- when: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{results['elapsed_s']:.0f} s",
        f"- command: `{command}`",
        f"- machine: {machine['cpus']} CPUs, Python {machine['python']}, "
        f"{machine['platform']} ({machine['note']})",
    ]
    path.write_text("\n".join([*head, *body, "", kept]).rstrip() + "\n")


# -- chart -----------------------------------------------------------------------


def chart(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return False
    e2e = [r for r in results.get("e2e", ()) if "rps" in r]
    panels = (1 if e2e else 0) * 2 + (1 if "core" in results else 0)
    if not panels:
        return False
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 5), squeeze=False)
    i = 0
    if "core" in results:
        ax = axes[0][i]
        i += 1
        names = [
            r["case"].replace(" (merge)", "").replace("-connection", "") for r in results["core"]
        ]
        xs = range(len(names))
        for offset, key, label in (
            (-0.25, "core_us", "core"),
            (0.0, "wsproto_us", "wsproto floor"),
            (0.25, "msgspec_us", "msgspec floor"),
        ):
            ax.bar([x + offset for x in xs], [r[key] for r in results["core"]], 0.25, label=label)
        ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("µs per frame")
        ax.set_title("core frame handling")
        ax.legend()
    if e2e:
        labels = [f"{r['server']}\n{r['load']}" for r in e2e]
        for key, title in (("rps", "round trips/s"), ("server_cpu_us", "server CPU µs/command")):
            ax = axes[0][i]
            i += 1
            ax.barh(range(len(e2e)), [r[key] for r in e2e])
            ax.set_yticks(range(len(e2e)), labels, fontsize=6)
            ax.invert_yaxis()
            ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# -- main ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    parts = _split(args.parts, PARTS)
    kinds = _split(args.servers, KINDS)
    loads = _split(args.loads, LOADS)
    stores = _split(args.store, ("memory", "redis"))
    quick = args.quick
    rounds = args.rounds or (2 if quick else 5)
    warmup = args.warmup if args.warmup is not None else (0.3 if quick else 0.5)
    duration = args.duration if args.duration is not None else (1.0 if quick else 2.0)
    if quick and args.loads == ",".join(LOADS):
        loads = ["noop 50x4", "meta 50x4"]
    fds = raise_fd_limit()
    WORKER_LOG.unlink(missing_ok=True)
    started = time.monotonic()
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "note": "server and load generator share these cores",
        },
        "settings": {
            "quick": quick,
            "rounds": rounds,
            "warmup_s": warmup,
            "duration_s": duration,
            "load_generator_processes": args.procs,
            "fd_limit": fds,
        },
    }
    if "core" in parts:
        _log("core: frame handling without sockets")
        results["core"] = core.run(quick, 3 if quick else 7, _log)
    if "e2e" in parts:
        _log(f"e2e: {', '.join(kinds)} x {', '.join(loads)}")
        with contextlib.ExitStack() as stack:
            redis_url = args.redis_url
            if redis_url is None and "redis" in stores:
                redis_url = stack.enter_context(private_redis())
            results["e2e"] = run_e2e(
                kinds,
                loads,
                stores,
                rounds=rounds,
                warmup=warmup,
                duration=duration,
                procs=args.procs,
                redis_url=redis_url or "",
                log=_log,
            )
    mesh_kinds = [k for k in kinds if not KINDS[k][2]]
    if "scale" in parts:
        scale_kinds = mesh_kinds[:1] if quick else kinds
        _log(f"scale: {', '.join(scale_kinds)}")
        results["scale"] = scale.run(
            [k for k in scale_kinds if not k.startswith("bare-uvloop")],
            quick=quick,
            rounds=3,
            procs=args.procs,
            store="memory",
            log=_log,
        )
    if "profile" in parts:
        prof_kinds: list[str] = [k for k in ("mesh-asyncio", "mesh-trio") if k in kinds]
        _log(f"profile: {', '.join(prof_kinds)}")
        results["profile"] = prof.run(
            prof_kinds[:1] if quick else prof_kinds,
            quick=quick,
            procs=args.procs,
            store="memory",
            log=_log,
        )
    results["goals"] = goals(results)
    results["elapsed_s"] = time.monotonic() - started

    args.out.mkdir(parents=True, exist_ok=True)
    text, md = [], []
    for title, headers, rows in tables(results):
        text += ["", title, _table(headers, rows)]
        md += ["", f"### {title}", "", _markdown(headers, rows)]
    goal_rows = [[str(g["goal"]), g["text"], g["status"], g["figures"]] for g in results["goals"]]
    md += ["", "### Goals", "", _markdown(["#", "goal", "status", "figures"], goal_rows)]
    issues = notes(results)
    if issues:
        text += ["", "Not measured:", *(f"  - {n}" for n in issues)]
        md += ["", "Not measured:", "", *(f"- {n}" for n in issues)]
    print("\n".join(text))
    print("\nGoals")
    for g in results["goals"]:
        print(f"  {g['goal']}. [{g['status']}] {g['text']}\n       {g['figures']}")
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (args.out / "results.md").write_text("\n".join(md).lstrip() + "\n")
    wrote = ["results.json", "results.md"]
    if chart(results, args.out / "chart.png"):
        wrote.append("chart.png")
    written = [str(args.out / w) for w in wrote]
    report = args.report or (None if quick else REPORT)
    if report is not None:
        write_report(report, md, results, sys.argv[1:] if argv is None else argv)
        written.append(str(report))
    print(f"\nwrote {', '.join(written)} in {results['elapsed_s']:.0f} s")
