"""Faults under load: connections cut at random by a TCP proxy, clients SIGKILLed mid-stream, watchers that
never read, and SIGTERM of the server (then a restart on the same data). Every watcher that survives resumes
by itself with nothing lost, duplicated or reordered (the watch checker), every acknowledged write is visible
afterwards, and the server releases everything the dead clients held."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from faultproxy import FaultProxy
from secutil import LoadGen, ThreadServer, client_env, wait_for

from jobstate.server.main import ServerConfig

WATCHER_SCRIPT = """
import sys
import grpc
from jobstate.v1 import job_state_service_pb2 as spb, job_state_service_pb2_grpc as g
channel = grpc.insecure_channel(sys.argv[1])
for response in g.JobStateServiceStub(channel).Watch(spb.WatchRequest(send_initial_state=True)):
    print("ready", flush=True)
"""


def chaos(scale: dict[str, Any], cut_every: float, kills: int) -> None:
    server = ThreadServer(ServerConfig(history_size=50_000))
    victims: list[subprocess.Popen[str]] = []
    stop = threading.Event()
    try:
        with FaultProxy(server.port, seed=7) as proxy:
            gen = LoadGen({"target": server.target, "watch_target": proxy.target, **scale, "settle": 120})
            gen.wait_ready()
            for _ in range(kills):
                p = subprocess.Popen(
                    [sys.executable, "-c", WATCHER_SCRIPT, server.target],
                    env=client_env(),
                    stdout=subprocess.PIPE,
                    text=True,
                )
                victims.append(p)
            for p in victims:
                assert p.stdout is not None
                assert p.stdout.readline().strip() == "ready"

            def cutter() -> None:
                # Cuts until the writers stop: a bounded number of rounds, each dropping ~30% of connections.
                for _ in range(int(scale["duration"] / cut_every)):
                    if stop.wait(cut_every):
                        return
                    proxy.cut(0.3)

            t = threading.Thread(target=cutter, daemon=True)
            t.start()
            for p in victims:  # killed mid-stream, while the writers write
                time.sleep(scale["duration"] / (2 * max(1, kills)))
                p.send_signal(signal.SIGKILL)
            t.join(scale["duration"] + 10)
            figures = gen.result(timeout=scale["duration"] + 300)
            stop.set()
            print(
                f"\nfaults: {proxy.cuts} connections cut (of {proxy.connections}), {kills} clients SIGKILLed, "
                f"{figures['stalled']} watchers never reading; {figures['writes']} writes, {figures['watchers']} "
                f"watchers resumed {figures['resumes']} times, {figures['events']} events, {figures['checked']} "
                "changes checked complete"
            )
            assert proxy.cuts > 0
            assert figures["resumes"] > 0
            assert figures["checked"] > figures["writes"]
        # Dead and departed clients hold nothing on the server.
        wait_for(lambda: server.run(lambda: server.store.stats().watchers) == 0, 30, "watchers released")
    finally:
        stop.set()
        for p in victims:
            p.kill()
            p.wait(10)
        server.stop()


@pytest.mark.timeout(400)
def test_cut_connections_killed_clients_and_stalled_watchers() -> None:
    chaos({"writers": 6, "watchers": 60, "duration": 6.0, "stalled": 5}, cut_every=0.5, kills=3)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_cut_connections_killed_clients_and_stalled_watchers_heavy() -> None:
    chaos({"writers": 12, "watchers": 300, "duration": 30.0, "stalled": 20}, cut_every=0.3, kills=10)


def sigterm_restart(server_process: Any, tmp_path: Path, scale: dict[str, Any], restarts: int) -> None:
    config = {"store": "sqlite", "data_dir": str(tmp_path / "data"), "history_size": 50_000}
    server = server_process(**config)
    gen = LoadGen({"target": server.target, **scale, "settle": 120})
    try:
        gen.wait_ready()
        for _ in range(restarts):
            time.sleep(scale["duration"] / (restarts + 1))  # a fault at a point in the load, not a wait
            server.signal(signal.SIGTERM)
            assert server.wait(30) == 0, server.log()[-2000:]
            server = server_process(port=server.port, **config)
        figures = gen.result(timeout=scale["duration"] + 300)
    finally:
        gen.kill()
    print(
        f"\nSIGTERM: {restarts} server restarts under load; {figures['writes']} writes acknowledged, "
        f"{figures['unknown']} attempts failed while it was down (outcome unknown), {figures['watchers']} "
        f"watchers resumed {figures['resumes']} "
        f"times, {figures['events']} events, {figures['checked']} changes checked complete"
    )
    assert figures["resumes"] >= figures["watchers"] * restarts
    assert figures["checked"] > 0


@pytest.mark.timeout(400)
def test_sigterm_during_load_then_restart(server_process: Any, tmp_path: Path) -> None:
    sigterm_restart(server_process, tmp_path, {"writers": 4, "watchers": 40, "duration": 6.0}, restarts=1)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sigterm_during_load_then_restart_heavy(server_process: Any, tmp_path: Path) -> None:
    sigterm_restart(server_process, tmp_path, {"writers": 8, "watchers": 200, "duration": 30.0}, restarts=4)
