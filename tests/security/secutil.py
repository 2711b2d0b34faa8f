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


def wait_for(predicate: Callable[[], bool], timeout: float = 10, what: str = "condition") -> None:
    """Polls ``predicate`` until it holds; ``timeout`` only bounds a test that would otherwise hang."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


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

    def __init__(
        self,
        config: dict[str, Any],
        log_path: Path,
        credentials: grpc.ChannelCredentials | None = None,
        port: int | None = None,
    ):
        self.port = port or free_port()
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


def client_env() -> dict[str, str]:
    paths = [str(ROOT / p) for p in ("server", "client", "gen", "tests")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


class LoadGen:
    """tests/security/loadgen.py as a subprocess: ``wait_ready()`` once its watchers are registered, then
    ``result()`` for its figures (it fails the test if the load generator found a violation)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "loadgen.py"), json.dumps(config)],
            cwd=ROOT,
            env=client_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_ready(self, timeout: float = 90) -> None:
        assert self.proc.stdout is not None
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stdout is not None
            if self.proc.stdout.readline().strip() == "ready":
                ready.set()

        t = threading.Thread(target=read, daemon=True)
        t.start()
        if not ready.wait(timeout):
            self.kill()
            raise AssertionError(f"load generator not ready: {self.proc.stderr.read() if self.proc.stderr else ''}")

    def result(self, timeout: float = 300) -> dict[str, Any]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        finally:
            self.kill()
        lines = [line for line in out.splitlines() if line.startswith("{")]
        assert lines, f"load generator printed no figures (exit {self.proc.returncode}): {err[-3000:]}"
        figures: dict[str, Any] = json.loads(lines[-1])
        assert not figures["violations"], figures["violations"][:10]
        assert not figures["unexpected"], figures["unexpected"][:10]
        assert self.proc.returncode == 0, err[-3000:]
        return figures

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)


def rss_bytes(pid: int | None = None) -> int:
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
