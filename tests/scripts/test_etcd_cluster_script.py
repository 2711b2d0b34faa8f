"""``scripts/etcd-cluster.sh`` stopped the way a person stops it: Ctrl-C in its terminal.

A terminal's Ctrl-C sends SIGINT to the whole foreground process group (the script, etcd and the jobstate
servers), so the test starts the script in a process group of its own and signals the group. The header
promises that this stops everything and removes the data.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from etcd.etcd_server import etcd_binary
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "etcd-cluster.sh"


def _free(ports: list[int]) -> bool:
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _ports() -> tuple[int, int]:
    """A BASE and a JOBSTATE_PORT whose ports (BASE+1..3, BASE+11..13, JOBSTATE_PORT+1..3) are free now."""
    rng = random.Random()
    while True:
        base, js = rng.randrange(30000, 40000, 20), rng.randrange(40000, 50000, 10)
        if _free([base + i for i in (1, 2, 3, 11, 12, 13)] + [js + i for i in (1, 2, 3)]):
            return base, js


def _serving(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=60, wait_for_ready=True
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_ctrl_c_stops_everything_and_removes_the_data() -> None:
    etcd = etcd_binary()  # make test installs etcd (etcd-deps): missing, this test fails rather than skips
    base, js = _ports()
    env = {**os.environ, "BASE": str(base), "JOBSTATE_PORT": str(js), "PY": sys.executable, "ETCD": etcd}
    env.pop("KEEP", None)
    proc = subprocess.Popen(
        ["bash", str(SCRIPT)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        out: list[str] = []
        for line in proc.stdout:
            out.append(line)
            if line.startswith("Ctrl-C stops everything"):
                break
        text = "".join(out)
        assert "Ctrl-C stops everything" in text, (text, proc.stderr.read() if proc.stderr else "")
        logs = next(line for line in out if line.startswith("logs:")).split()[1]
        data = Path(logs).parent
        assert data.is_dir()
        for i in (1, 2, 3):
            _serving(f"127.0.0.1:{js + i}")

        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    assert "exited" not in err, err
    assert "stopping" in err
    assert proc.returncode == 130, err
    assert not data.exists(), f"{data} was left behind"
    with pytest.raises(ProcessLookupError):  # etcd and the servers are gone too
        os.killpg(proc.pid, 0)
