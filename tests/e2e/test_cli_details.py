"""The details an operator and a new user meet first (issue 14): ``mesh
--version``, a help text with its default for every flag, wording, the
package metadata, the README's links."""

from __future__ import annotations

import argparse
import gc
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

from mesh_core import cli
from tests.helpers.server_process import ROOT


def _mesh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh_core.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_version() -> None:
    proc = _mesh("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"mesh {version('mesh-python')}"


def test_every_serve_flag_has_help_with_its_default() -> None:
    parser = cli._parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    serve = commands.choices["serve"]
    flags = [a for a in serve._actions if a.option_strings and a.help != argparse.SUPPRESS]
    flags = [a for a in flags if not isinstance(a, argparse._HelpAction)]
    assert len(flags) >= 25
    for action in flags:
        assert action.help, action.option_strings
        assert "default" in action.help, action.option_strings
    help_text = " ".join(_mesh("serve", "--help").stdout.split())
    for default in ("(default asyncio)", "(default 127.0.0.1)", "(default 8765)", "(default info)"):
        assert default in help_text


def test_an_app_spec_that_is_not_an_app() -> None:
    """A factory that returned an int reads "is an int", in one line."""
    proc = _mesh("serve", "os:getpid")
    assert proc.returncode != 0
    assert proc.stderr.strip() == "error: os:getpid is an int, not a MeshApp"


def test_serve_raises_the_collector_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    """``mesh serve`` collects less often than Python's default (measured:
    a sixth less CPU per Redis-backed command), and an embedding
    application's policy is left alone: only the command line sets it."""
    seen: list[tuple[int, ...]] = []
    monkeypatch.setattr(cli, "_serve", lambda *args, **kwargs: seen.append(gc.get_threshold()))
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        cli.main(["serve", "benchmarks.app:app"])
    finally:
        gc.set_threshold(*before)
    assert seen == [cli.GC_THRESHOLDS]
    assert cli.GC_THRESHOLDS[0] > 700


def test_license_is_an_spdx_string() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"


def test_readme_links_resolve_in_a_clone() -> None:
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link and not link.startswith("mailto:")]
    assert local
    for link in local:
        assert not link.startswith(".."), link  # outside the clone: a user has none
        assert (ROOT / link).exists(), link


def test_a_built_wheel_holds_every_subpackage(tmp_path: Path) -> None:
    """``pip install .`` (not editable) gets the whole core, not its top level.
    Built from a copy of the sources: a ``build/`` left in the clone by an
    earlier build would hide what the configuration leaves out."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("mesh_core", "mesh_asyncio", "mesh_trio"):
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    out = tmp_path / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = out.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in (
        "mesh_core/protocol/__init__.py",
        "mesh_core/app/_server.py",
        "mesh_core/storage/__init__.py",
        "mesh_core/redis/__init__.py",
        "mesh_core/client/__init__.py",
        "mesh_asyncio/_server.py",
        "mesh_trio/_server.py",
        "mesh_core/py.typed",
    ):
        assert module in names, module
    assert not any(name.startswith(("tests/", "examples/", "benchmarks/")) for name in names)
