"""Fixtures of the security tests: a throwaway PKI, a tokens file, and servers run as subprocesses."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pki import PKI, make_pki

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


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(tokens_text())
    path.chmod(0o600)
    return path


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


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[Any]:
    started: list[ServerProcess] = []

    def start(credentials: grpc.ChannelCredentials | None = None, **config: Any) -> ServerProcess:
        p = ServerProcess(config, tmp_path / f"server-{len(started)}.log", credentials)
        started.append(p)
        return p

    try:
        yield start
    finally:
        for p in started:
            p.kill()
