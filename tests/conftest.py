"""Shared fixtures: a real jobstate server on a free loopback port, in its own thread and event loop.

The server runs in a thread of its own so that sync clients (which block) and async clients (in the test's
loop) talk to it the same way: over a real socket. ``ServerThread.call`` runs a coroutine on the server's
loop, for tests that must look inside the store (it is not thread-safe to touch it otherwise).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import replace
from typing import Any, TypeVar

import pytest
from etcd.etcd_server import engine_config as etcd_engine_config
from etcd.etcd_server import etcd_cluster, etcd_server, make_etcd  # noqa: F401  (fixtures for every test)

from jobstate.server.main import App, ServerConfig, build_server

T = TypeVar("T")


class ServerThread:
    def __init__(self, config: ServerConfig) -> None:
        self.config = replace(config, host="127.0.0.1", port=0)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="jobstate-server", daemon=True)
        self._thread.start()
        self.app: App = self.call(self._start())
        self.target = f"127.0.0.1:{self.app.port}"
        self.port = self.app.port

    async def _start(self) -> App:
        app = build_server(self.config)
        await app.start()
        return app

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn: Callable[[], T], timeout: float = 30) -> T:
        """Runs a plain function on the server's loop (to read the store without racing it)."""

        async def wrapper() -> T:
            return fn()

        return self.call(wrapper(), timeout)

    @property
    def store(self) -> Any:
        return self.app.store

    def stop(self, grace: float = 1.0) -> None:
        if not self.loop.is_running():
            return
        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            self.call(self.app.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


# --- storage engines -----------------------------------------------------------------------------------------
# How a test server is configured for each engine: name -> function(request, tmp dir) -> ServerConfig fields.
# ``conformance_engine`` (and every test using it) runs once per entry: adding an engine is one line here.
EngineSetup = Callable[[pytest.FixtureRequest, Any], dict[str, Any]]
ENGINES: dict[str, EngineSetup] = {
    "memory": lambda request, tmp: {"store": "memory"},
    "sqlite": lambda request, tmp: {"store": "sqlite", "data_dir": str(tmp)},
    "etcd": lambda request, tmp: etcd_engine_config(request),
}
# JOBSTATE_TEST_ENGINE=sqlite runs every test that uses ``server``/``make_server`` on that engine.
DEFAULT_ENGINE = os.environ.get("JOBSTATE_TEST_ENGINE", "memory")


@pytest.fixture(params=list(ENGINES))
def conformance_engine(request: pytest.FixtureRequest) -> str:
    """The name of each engine in turn: tests taking it run against every engine."""
    return str(request.param)


@pytest.fixture
def make_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., ServerThread]]:
    """Starts servers with custom configuration: ``make_server(history_size=10)``; all stop after the test.

    ``engine="sqlite"`` (or any name in ``ENGINES``) picks the storage engine, with a fresh temp dir for its
    data; fields given explicitly (``data_dir=...``, to restart on the same data) win.
    """
    started: list[ServerThread] = []

    def make(engine: str | None = None, **overrides: Any) -> ServerThread:
        name = engine or DEFAULT_ENGINE
        if name != "memory":
            overrides = {**ENGINES[name](request, tmp_path_factory.mktemp(f"engine-{name}")), **overrides}
        s = ServerThread(ServerConfig(**overrides))
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


@pytest.fixture
def server(make_server: Callable[..., ServerThread]) -> ServerThread:
    """A fresh server with default configuration."""
    return make_server()


@pytest.fixture
def conformance_server(make_server: Callable[..., ServerThread], conformance_engine: str) -> ServerThread:
    """A fresh server with default configuration, on each engine in turn."""
    return make_server(engine=conformance_engine)
