"""Shared fixtures: a real jobstate server on a free loopback port, in its own thread and event loop.

The server runs in a thread of its own so that sync clients (which block) and async clients (in the test's
loop) talk to it the same way: over a real socket. ``ServerThread.call`` runs a coroutine on the server's
loop, for tests that must look inside the store (it is not thread-safe to touch it otherwise).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import replace
from typing import Any, TypeVar

import pytest

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
        try:
            self.call(self.app.stop(grace))
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture
def make_server() -> Iterator[Callable[..., ServerThread]]:
    """Starts servers with custom configuration: ``make_server(history_size=10)``; all stop after the test."""
    started: list[ServerThread] = []

    def make(**overrides: Any) -> ServerThread:
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
