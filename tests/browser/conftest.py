"""Fixtures of the dashboard's browser tests: the real ``jobstate serve --http-port`` as a subprocess (so that it
can be stopped and started again on the same ports), and Debian's chromium driven by Playwright.

Playwright cannot download its own browsers here; ``make test`` installs Debian's ``chromium`` when it is missing
(``make chromium-deps``). Screenshots go to the test's temporary folder, and into ``docs/`` when
``JOBSTATE_SCREENSHOTS=docs`` is set (``make screenshots``), so that a test run never dirties the tree.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WebServer:
    """``jobstate serve`` with its HTTP listener, at fixed ports so that a restart comes back where it was."""

    def __init__(self, log: Path, *args: str) -> None:
        self.port = free_port()
        self.http_port = free_port()
        self.args = args
        self.log = log
        self.target = f"127.0.0.1:{self.port}"
        self.url = f"http://127.0.0.1:{self.http_port}/"
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
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

        def read() -> None:
            assert proc.stdout is not None
            with self.log.open("a") as log:
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    if " serving " in line:
                        serving.set()
            serving.set()  # the process ended: wake the waiter, which then sees it

        threading.Thread(target=read, daemon=True).start()
        if not serving.wait(START_TIMEOUT) or proc.poll() is not None:
            raise AssertionError(f"jobstate serve did not start: {self.log.read_text()[-2000:]}")

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
