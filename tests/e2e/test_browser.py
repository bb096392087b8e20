"""The live-chat page of examples/asgi_app.py in a real browser: headless
Chromium (Debian's ``chromium``), driven over its DevTools protocol, loads
``/`` from the app under uvicorn in two tabs, joins a room in each, sends a
message from one and sees it arrive in the other. Skipped when Chromium is
not installed (``scripts/test`` installs it where it can)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from tests.helpers.server_process import serve_demo

CHROMIUM = next(
    (p for name in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(name))),
    None,
)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs chromium (apt-get install chromium)"
)


class Page:
    """One tab, over a DevTools protocol WebSocket (a blocking socket and wsproto)."""

    def __init__(self, ws_url: str) -> None:
        url = urllib.parse.urlsplit(ws_url)
        assert url.hostname is not None and url.port is not None
        self.sock = socket.create_connection((url.hostname, url.port), timeout=20)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.sock.sendall(self.ws.send(Request(host=f"{url.hostname}:{url.port}", target=url.path)))
        self._ids = itertools.count(1)
        self._text = ""
        while not any(isinstance(e, AcceptConnection) for e in self._events()):
            pass

    def _events(self) -> list[Any]:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("DevTools closed the connection")
        self.ws.receive_data(data)
        return list(self.ws.events())

    def call(self, method: str, **params: Any) -> Any:
        call_id = next(self._ids)
        frame = json.dumps({"id": call_id, "method": method, "params": params})
        self.sock.sendall(self.ws.send(TextMessage(frame)))
        while True:
            for event in self._events():
                if not isinstance(event, TextMessage):
                    continue
                self._text += event.data
                if not event.message_finished:
                    continue
                message, self._text = json.loads(self._text), ""
                if message.get("id") == call_id:
                    if "error" in message:
                        raise RuntimeError(message["error"])
                    return message["result"]

    def evaluate(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def _true(self, expression: str) -> bool:
        try:
            return bool(self.evaluate(expression))
        except RuntimeError:  # the page is still loading (no document.body yet)
            return False

    def wait_for(self, expression: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not self._true(expression):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {expression}")
            time.sleep(0.05)


def _start_chromium(profile: Path) -> tuple[subprocess.Popen[bytes], int]:
    assert CHROMIUM is not None
    proc = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-quic", "--remote-debugging-port=0",
         f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # its renderers in one process group, ended together
    )  # fmt: skip
    active = profile / "DevToolsActivePort"  # Chromium writes the port it chose here
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if active.exists() and active.read_text().strip():
            return proc, int(active.read_text().split()[0])
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    pytest.skip("chromium did not start")


@pytest.fixture
def chromium() -> Iterator[int]:
    # a renderer may still be writing its profile while the directory goes
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc, port = _start_chromium(Path(profile))
        try:
            yield port
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def open_page(devtools_port: int, url: str) -> Page:
    new = f"http://127.0.0.1:{devtools_port}/json/new?{urllib.parse.quote(url, safe='')}"
    with urllib.request.urlopen(urllib.request.Request(new, method="PUT"), timeout=20) as r:
        target = json.load(r)
    return Page(target["webSocketDebuggerUrl"])


def test_chat_page_message_from_one_tab_seen_in_another(chromium: int) -> None:
    with serve_demo("uvicorn") as server:
        url = f"http://127.0.0.1:{server.port}/"
        alice, bob = open_page(chromium, url), open_page(chromium, url)
        for page, name in ((alice, "alice"), (bob, "bob")):
            page.wait_for("document.body.dataset.connected === '1'")
            page.evaluate(
                f"document.getElementById('name').value = {json.dumps(name)};"
                "document.getElementById('join').requestSubmit(); true"
            )
            page.wait_for("document.body.dataset.joined === '1'")
        alice.evaluate(
            "document.getElementById('text').value = 'hello from a browser';"
            "document.getElementById('say').requestSubmit(); true"
        )
        seen = "document.getElementById('log').textContent.includes('alice: hello from a browser')"
        bob.wait_for(seen)
        alice.wait_for(seen)  # the sender is a member too
