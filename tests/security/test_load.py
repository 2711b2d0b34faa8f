"""Load: many writers and hundreds of watchers for a fixed time; the watch checker confirms every watcher got
every change once, in order; afterwards the server's asyncio tasks and memory are back where they were.

The server runs in this process (so its tasks can be counted and its memory read); the load comes from
tests/security/loadgen.py in another process. Two rounds of the same load: the second must not leave the
server bigger than the first did (a leak per client or per stream would show there)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from secutil import LoadGen, ThreadServer, rss_bytes

from jobstate.server.main import ServerConfig

SCALE = {
    "make test": {"writers": 8, "watchers": 200, "duration": 5.0, "stalled": 5},
    "slow": {"writers": 16, "watchers": 500, "duration": 30.0, "stalled": 20},
}
RSS_SLACK = 40 * 1024 * 1024


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def server_numbers(server: ThreadServer) -> tuple[int, int]:
    async def read() -> tuple[int, int]:
        return len(asyncio.all_tasks()), server.store.stats().watchers

    return server.call(read())


def run_load(scale: dict[str, Any]) -> None:
    server = ThreadServer(ServerConfig(history_size=50_000))
    try:
        tasks0, watchers0 = server_numbers(server)
        assert watchers0 == 0
        rss = [rss_bytes()]
        for round_ in (1, 2):
            gen = LoadGen({"target": server.target, **scale, "settle": 90})
            gen.wait_ready()
            figures = gen.result(timeout=scale["duration"] + 240)
            # Everyone left: the watchers go, and with them every task they had on the server.
            wait_for(lambda: server_numbers(server)[1] == 0, 30, "watchers to be released")
            wait_for(lambda: server_numbers(server)[0] <= tasks0, 30, "server tasks back to baseline")
            rss.append(rss_bytes())
            print(
                f"\nload round {round_}: {figures['writes']} writes in {figures['seconds']}s by {scale['writers']} "
                f"writers, {figures['watchers']} watchers (+{figures['stalled']} never reading), "
                f"{figures['responses']} responses, {figures['events']} events, {figures['checked']} changes checked "
                f"complete, final revision {figures['final_revision']}; server tasks {server_numbers(server)[0]} "
                f"(baseline {tasks0}), RSS {rss[-1] / 2**20:.0f} MiB (start {rss[0] / 2**20:.0f} MiB)"
            )
            assert figures["writes"] > 0
            assert figures["checked"] > figures["writes"]
        # Round 2 ran the same load again: whatever round 1 grew (ring, allocator arenas) it reuses.
        assert rss[2] <= rss[1] + RSS_SLACK, f"RSS grew from {rss[1]} to {rss[2]} bytes over a second round"
    finally:
        server.stop()


@pytest.mark.timeout(600)
def test_writers_and_hundreds_of_watchers() -> None:
    run_load(SCALE["make test"])


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_writers_and_hundreds_of_watchers_heavy() -> None:
    run_load(SCALE["slow"])
