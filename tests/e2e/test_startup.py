"""Every way ``mesh serve`` can fail to start, as an operator meets it: one
line on stderr saying what is wrong and what to do, a non-zero exit, never a
traceback (issue 14). Arguments fail when parsed, before anything starts."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.helpers.redis_server import free_port
from tests.helpers.server_process import run_failing

RUNTIMES = pytest.mark.parametrize("runtime", ["asyncio", "trio"])


@RUNTIMES
def test_port_in_use(runtime: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_failing("--runtime", runtime, "--port", str(port))
    assert f"127.0.0.1:{port}: address already in use" in proc.stderr
    assert "--port" in proc.stderr


def test_port_out_of_range_fails_when_parsed() -> None:
    proc = run_failing("--port", "70000")
    assert proc.returncode == 2
    assert "--port" in proc.stderr and "0-65535" in proc.stderr


def test_bad_redis_url_names_every_scheme() -> None:
    proc = run_failing("--redis", "foo://x")
    assert proc.returncode == 2
    assert "unsupported Redis URL scheme 'foo'" in proc.stderr
    for scheme in ("redis://", "rediss://", "unix://", "redis+sentinel://", "redis+cluster://"):
        assert scheme in proc.stderr


@pytest.mark.parametrize("flag", ["--redis-command-timeout", "--redis-heartbeat-interval"])
def test_zero_redis_timeouts_fail_when_parsed(flag: str) -> None:
    proc = run_failing(flag, "0")
    assert proc.returncode == 2
    assert flag in proc.stderr and "above 0" in proc.stderr


@RUNTIMES
def test_redis_down_at_start(runtime: str) -> None:
    """Nothing listens on the port: the start fails at once, in one line, and
    a server that never started logs no shutdown (trio used to)."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    proc = run_failing("--runtime", runtime, "--port", "0", "--redis", url)
    assert proc.stderr.startswith("error: cannot reach the store:")
    assert "is Redis running" in proc.stderr
    assert "at shutdown" not in proc.stderr


def _shadow(tmp_path: Path, package: str) -> dict[str, str]:
    """An environment in which importing ``package`` fails as if it were not
    installed (a stand-in that raises, ahead of site-packages)."""
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text(
        f"raise ModuleNotFoundError(\"No module named '{package}'\", name={package!r})\n"
    )
    return {"PYTHONPATH": str(tmp_path)}


def test_missing_redis_extra_gives_the_install_hint(tmp_path: Path) -> None:
    env = _shadow(tmp_path, "hiredis")
    proc = run_failing("--redis", "redis://127.0.0.1:6390/0", env=env)
    assert "hiredis is not installed: pip install 'mesh-python[redis]'" in proc.stderr


def test_missing_uvloop_gives_the_install_hint(tmp_path: Path) -> None:
    proc = run_failing("--uvloop", env=_shadow(tmp_path, "uvloop"))
    assert "uvloop is not installed: pip install 'mesh-python[uvloop]'" in proc.stderr


def test_redis_down_at_start_with_workers_is_one_line() -> None:
    """Every worker fails alike: the supervisor prints the message once."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    proc = run_failing("--workers", "2", "--port", "0", "--redis", url, timeout=60)
    assert proc.stderr.startswith("error: cannot reach the store:")
