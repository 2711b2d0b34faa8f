"""Fixtures of the dashboard's browser tests: the real ``jobstate serve --http-port`` as a subprocess (so that it
can be stopped and started again on the same ports), and Debian's chromium driven by Playwright.

Playwright cannot download its own browsers here; ``make test`` installs Debian's ``chromium`` when it is missing
(``make chromium-deps``). Screenshots go to the test's temporary folder, and into ``docs/`` when
``JOBSTATE_SCREENSHOTS=docs`` is set (``make screenshots``), so that a test run never dirties the tree.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("JOBSTATE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
START_TIMEOUT = 30.0


class AddressInUse(AssertionError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SERVING = re.compile(r" serving address=\S+:(\d+) .*http_address=http://\S+:(\d+)")


class WebServer:
    """``jobstate serve`` with its HTTP listener. It first binds free ports itself (port 0: a port picked here
    and bound later could be taken in between by any process on the machine) and reads them from its start
    line; a restart comes back on the same ports."""

    def __init__(self, log: Path, *args: str) -> None:
        self.port = 0
        self.http_port = 0
        self.args = args
        self.log = log
        self.proc: subprocess.Popen[str] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/"

    def start(self) -> None:
        # A restart binds the ports it had: one just released may briefly be held by another process's
        # connection, so a refused bind is tried again for a while rather than failing the test.
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                return self._start()
            except AddressInUse:
                if not self.port or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _start(self) -> None:
        logged = len(self.log.read_text()) if self.log.exists() else 0
        command = [sys.executable, "-m", "jobstate", "serve", "--port", str(self.port)]
        command += ["--http-port", str(self.http_port), "--grace", "1", *self.args]
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        serving = threading.Event()
        proc = self.proc
        ports: list[int] = []

        def read() -> None:
            assert proc.stdout is not None
            with self.log.open("a") as log:
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    if (m := SERVING.search(line)) is not None:
                        ports.extend((int(m.group(1)), int(m.group(2))))
                        serving.set()
            serving.set()  # the process ended: wake the waiter, which then sees it

        threading.Thread(target=read, daemon=True).start()
        if not serving.wait(START_TIMEOUT) or not ports:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            text = self.log.read_text()[logged:][-2000:]
            if "Address already in use" in text:
                raise AddressInUse(text)
            raise AssertionError(f"jobstate serve did not start: {text}")
        self.port, self.http_port = ports

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def make_web_server(tmp_path: Path) -> Iterator[Any]:
    servers: list[WebServer] = []

    def make(*args: str) -> WebServer:
        server = WebServer(tmp_path / f"server-{len(servers)}.log", *args)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make chromium-deps` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 800}, device_scale_factor=1)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    # The browser logs every refused connection and every error status (a restart, a 401) on its own: not ours.
    pg.on(
        "console",
        lambda m: errors.append(m.text) if m.type == "error" and not m.text.startswith("Failed to load") else None,
    )
    yield pg
    context.close()
    # A script error or a CSP refusal is a bug even when the test's own assertions held.
    assert not errors, f"the page logged errors: {errors[:5]}"


@pytest.fixture
def screenshot(tmp_path: Path) -> Any:
    def take(pg: Any, name: str, full_page: bool = False) -> Path:
        path = tmp_path / name
        pg.screenshot(path=str(path), full_page=full_page, animations="disabled")
        if os.environ.get("JOBSTATE_SCREENSHOTS") == "docs":
            shutil.copyfile(path, ROOT / "docs" / name)
        return path

    return take
