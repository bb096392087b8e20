"""Part 4: where the server spends its time on the ``noop`` path.

py-spy samples the server process (``mesh serve``, each runtime) while the
load generator runs 50 clients x 4 in flight of ``mesh/noop``. The raw
stacks go to ``benchmarks/results/profile-KIND.txt`` (collapsed format, for
flamegraph tools); the summary lists the functions with the most samples on
top of the stack (self) and the project's functions with the most samples
anywhere in the stack (inclusive).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._util import RESULTS, ROOT
from .driver import run_load, wait_idle
from .servers import ServerFailed, ServerSpec, running

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")
_PROJECT = ("mesh_core/", "mesh_asyncio/", "mesh_trio/", "examples/")


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def _short(file: str) -> str:
    file = file.replace(str(ROOT) + "/", "")
    marker = "site-packages/"
    if marker in file:
        file = file.split(marker, 1)[1]
    return re.sub(r"^.*/lib/python3\.\d+/", "", file)


def _name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    return f"{m['func']} ({_short(m['file'])})"


def summarize(raw: str, top: int = 15) -> dict[str, Any]:
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_module: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        names = [_name(f) for f in stack.split(";")]
        self_counts[names[-1]] += n
        by_module[_module(names[-1])] += n
        for name in set(names):
            inclusive[name] += n
    share = 100 / max(total, 1)
    return {
        "samples": total,
        "self": [(name, round(n * share, 1)) for name, n in self_counts.most_common(top)],
        "inclusive": [
            (name, round(n * share, 1))
            for name, n in inclusive.most_common()
            if any(p in name for p in _PROJECT) and n < total * 0.99
        ][:top],
        "self_by_module": [(name, round(n * share, 1)) for name, n in by_module.most_common()],
    }


def _module(name: str) -> str:
    """The package a frame belongs to (C code shows as its Python caller)."""
    m = re.search(r"\((.*)\)$", name)
    file = m.group(1) if m else name
    top = file.split("/", 1)[0]
    if top.endswith(".py"):
        top = top[:-3]
    return top if top and not top.startswith("<") else "other"


def run(
    kinds: list[str], *, quick: bool, procs: int, store: str, log: Callable[[str], None]
) -> dict[str, Any]:
    spy = py_spy()
    if spy is None:
        log("  py-spy is not installed (.venv/bin/pip install py-spy): profile skipped")
        return {"skipped": "py-spy is not installed"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    duration = 3.0 if quick else 8.0
    for kind in kinds:
        path = RESULTS / f"profile-{kind}.txt"
        path.unlink(missing_ok=True)
        spies: list[subprocess.Popen[bytes]] = []
        try:
            with running(ServerSpec(kind, store=store)) as server:
                wait_idle(server.pid)

                def start_spy(
                    seconds: float,
                    pid: int = server.pid,
                    path: Path = path,
                    spies: list[subprocess.Popen[bytes]] = spies,
                ) -> None:
                    argv = [spy, "record", "-p", str(pid), "-d", str(max(1, int(seconds)))]
                    argv += ["-r", "200", "-f", "raw", "-o", str(path)]
                    spies.append(
                        subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    )

                figures = run_load(
                    server.pid,
                    server.port,
                    mix="noop",
                    conns=50,
                    inflight=4,
                    procs=procs,
                    warmup=0.5,
                    duration=duration,
                    on_window=start_spy,
                )
                for spy_proc in spies:
                    spy_proc.wait(60)
        except ServerFailed as exc:
            log(f"  {kind}: FAILED: {exc}")
            out[kind] = {"failed": str(exc)}
            continue
        if not path.exists():
            log(f"  {kind}: py-spy wrote nothing (ptrace not permitted?)")
            continue
        summary = summarize(path.read_text())
        summary["rps_while_sampled"] = figures["rps"]
        out[kind] = summary
        log(f"  {kind}: {summary['samples']} samples; top self time:")
        for name, pct in summary["self"][:10]:
            log(f"    {pct:5.1f}%  {name}")
    return out
