"""Real etcd servers for tests: one member on free loopback ports with a temp data dir, stopped after.

``EtcdServer(data_dir).start()`` runs Debian's ``etcd`` (package ``etcd-server``, installed by ``make etcd-deps``)
in its own process group, waits until it answers, and ``stop()`` kills the group, so no etcd outlives a test.
``restart()`` keeps the data dir and the ports (a jobstate server pointed at it finds it again).

Fixtures: ``etcd_server`` (one per test session; tests isolate themselves with a key prefix) and
``make_etcd`` (a private etcd per test, for tests that stop it). ``engine_config(request)`` is the
conformance fixture's entry for the etcd engine (see tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from aetcd import rpc

START_TIMEOUT = 20.0
INSTALL_HINT = "etcd is not installed: run `make etcd-deps` (apt-get install -y etcd-server) and try again"


def etcd_binary() -> str:
    path = (
        os.environ.get("ETCD_BIN")
        or shutil.which("etcd")
        or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else "")
    )
    if not path:
        pytest.fail(INSTALL_HINT, pytrace=False)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdServer:
    """One etcd member on 127.0.0.1."""

    def __init__(self, data_dir: str | Path, name: str = "test") -> None:
        self.data_dir = Path(data_dir)
        self.name = name
        # ``name=peer-url,...`` of every member, for a member of a cluster; None: a cluster of this one.
        self.initial_cluster: str | None = None
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self) -> EtcdServer:
        self.launch()
        self.wait_ready()
        return self

    def launch(self) -> None:
        """Starts the process without waiting: the members of a cluster answer only once a quorum runs."""
        peer = self.peer_url
        args = [
            etcd_binary(),
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", self.initial_cluster or f"{self.name}={peer}",
            "--initial-cluster-state", "new",
            # A job may be up to 2 MiB (rules.Limits.max_job_bytes) and its history entry rides in the same txn.
            "--max-request-bytes", str(8 * 1024 * 1024),
            "--logger", "zap",
            "--log-outputs", "stderr",
            "--log-level", "warn",
        ]  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes to it for its whole life
        try:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        finally:
            log.close()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        with grpc.insecure_channel(self.target) as channel:
            kv = rpc.KVStub(channel)
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"etcd exited with {self.proc.returncode}: {self.log_tail()}")
                try:
                    kv.Range(rpc.RangeRequest(key=b"/"), timeout=1.0)
                    return
                except grpc.RpcError as exc:
                    last = exc
                    time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"etcd did not answer within {timeout}s ({last}): {self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Kills etcd (its whole process group) and waits for it: nothing is left running."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def compact(self, revision: int) -> None:
        with grpc.insecure_channel(self.target) as channel:
            rpc.KVStub(channel).Compact(rpc.CompactionRequest(revision=revision, physical=True), timeout=5)

    def revision(self) -> int:
        with grpc.insecure_channel(self.target) as channel:
            return int(rpc.KVStub(channel).Range(rpc.RangeRequest(key=b"/"), timeout=5).header.revision)

    def watchers(self) -> int:
        """How many watches etcd serves now (its own gauge, from its metrics endpoint)."""
        with urllib.request.urlopen(f"{self.endpoint}/metrics", timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith("etcd_debugging_mvcc_watcher_total "):
                    return int(float(line.split()[1]))
        raise AssertionError("etcd's metrics have no etcd_debugging_mvcc_watcher_total")

    def put(self, key: bytes, value: bytes) -> int:
        """A write of some other program sharing this etcd; returns its revision."""
        with grpc.insecure_channel(self.target) as channel:
            resp = rpc.KVStub(channel).Put(rpc.PutRequest(key=key, value=value), timeout=5)
            return int(resp.header.revision)


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """One etcd for the whole session; each test uses a prefix of its own."""
    tmp = tempfile.mkdtemp(prefix="jobstate-etcd-")
    server = EtcdServer(Path(tmp) / "data").start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def make_etcd(tmp_path: Path) -> Iterator[Callable[..., EtcdServer]]:
    """Private etcd servers for tests that stop or compact them; all are killed after the test."""
    started: list[EtcdServer] = []

    def make(name: str = "test") -> EtcdServer:
        server = EtcdServer(tmp_path / f"etcd-{len(started)}", name)
        started.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[list[EtcdServer]]:
    """Three etcd members on loopback forming one cluster; all are killed after the test."""
    members = [EtcdServer(tmp_path / f"member-{i}", f"member-{i}") for i in range(3)]
    cluster = ",".join(f"{m.name}={m.peer_url}" for m in members)
    try:
        for m in members:
            m.initial_cluster = cluster
            m.launch()
        for m in members:
            m.wait_ready()
        yield members
    finally:
        for m in members:
            m.stop()


def unique_prefix() -> str:
    return f"/test-{uuid.uuid4().hex[:12]}"


def engine_config(request: pytest.FixtureRequest) -> dict[str, Any]:
    """ServerConfig fields of a jobstate server on the session's etcd, under a prefix of its own."""
    server: EtcdServer = request.getfixturevalue("etcd_server")
    return {"store": "etcd", "etcd_endpoints": (server.endpoint,), "etcd_prefix": unique_prefix()}
