"""What the security tests share: test tokens, servers run in a thread or as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jobstate.server.main import App, ServerConfig, build_server

T = TypeVar("T")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

# Distinctive so that a log search for them cannot match anything else.
TOKENS = {
    "reader": "rdr-TOKEN-5e1f0c9a7d3b4e21",
    "writer": "wrt-TOKEN-8a6c2f4e1b9d7035",
    "admin": "adm-TOKEN-3c7e9a1f5d2b8064",
    "writer2": "wr2-TOKEN-1d4f7a0c3e6b9852",
}
BAD_TOKEN = "bad-TOKEN-0000ffff1111eeee"


def tokens_text(**extra: str) -> str:
    lines = [
        "# role tokens for the tests",
        f"{TOKENS['reader']} reader alice",
        f"{TOKENS['writer']} writer bob   # a comment after the name",
        f"{TOKENS['admin']} admin",
        f"{TOKENS['writer2']} writer carol",
        "",
        "cert:client-a reader cert-a",
    ]
    lines += [f"{token} {role}" for role, token in extra.items()]
    return "\n".join(lines) + "\n"


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(target: str, credentials: grpc.ChannelCredentials | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1, wait_for_ready=True)
            return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
        finally:
            channel.close()


class ServerProcess:
    """``jobstate.server.main.serve`` in a subprocess (for signals: SIGHUP, SIGTERM, SIGKILL)."""

    def __init__(self, config: dict[str, Any], log_path: Path, credentials: grpc.ChannelCredentials | None = None):
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        config = {"host": "127.0.0.1", "port": self.port, "grace": 2.0, **config}
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("server", "client", "gen"))}
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "serverproc.py"), json.dumps(config)],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_healthy(self.target, credentials)
        except BaseException:
            self.kill()
            raise

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 15) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self._log.close()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")


class ThreadServer:
    """A server in a thread of its own (like tests/conftest.py's ``server``), for module-scoped fixtures."""

    def __init__(self, config: ServerConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="jobstate-server", daemon=True)
        self._thread.start()
        self.app: App = self.call(self._start(replace(config, host="127.0.0.1", port=0)))
        self.port = self.app.port
        self.target = f"127.0.0.1:{self.port}"

    async def _start(self, config: ServerConfig) -> App:
        app = build_server(config)
        await app.start()
        return app

    @property
    def store(self) -> Any:
        return self.app.store

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn: Callable[[], T], timeout: float = 30) -> T:
        async def wrapper() -> T:
            return fn()

        return self.call(wrapper(), timeout)

    def stop(self, grace: float = 1.0) -> None:
        with contextlib.suppress(Exception):
            self.call(self.app.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
