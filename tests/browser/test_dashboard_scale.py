"""The dashboard with 10,000 jobs and a busy workload (make test-heavy): every write still reaches its row, and
the time it took is printed (a figure, not a pass mark: this machine's load decides it)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from playwright.sync_api import expect

from jobstate.client import AsyncClient, Client

JOBS = 10_000


async def _fill(target: str, n: int) -> None:
    async with AsyncClient(target) as c:
        gate = asyncio.Semaphore(64)

        async def one(i: int) -> None:
            async with gate:
                await c.create_job(f"bulk-{i:05d}")
                await c.create_execution(f"bulk-{i:05d}", f"node-{i % 20}")

        await asyncio.gather(*(one(i) for i in range(n)))


@pytest.mark.slow
def test_ten_thousand_jobs_under_a_busy_workload(make_web_server: Any, page: Any) -> None:
    server = make_web_server()
    # In a thread of its own: Playwright's sync API keeps an event loop running in this one.
    filler = threading.Thread(target=asyncio.run, args=(_fill(server.target, JOBS),))
    filler.start()
    filler.join(300)
    assert not filler.is_alive()
    workload = ["demo", "--rate", "20", "--speed", "4", "--seed", "11", "--duration", "120"]
    demo = subprocess.Popen(
        [sys.executable, "-m", "jobstate", "--target", server.target, *workload],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        t0 = time.monotonic()
        page.goto(server.url)
        expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=60_000)
        to_live = time.monotonic() - t0
        expect(page.locator("#jobs-foot")).to_contain_text("Showing the 200 most relevant")
        latencies = []
        with Client(server.target) as c:
            for i in range(20):
                c.create_job(f"probe-{i}")
                t0 = time.monotonic()
                expect(page.locator(f'#jobs-body tr[data-job="probe-{i}"]')).to_have_count(1, timeout=10_000)
                latencies.append((time.monotonic() - t0) * 1000)
        assert page.evaluate("window.jobstate.sync.gaps") == 0
        latencies.sort()
        print(
            f"\n{JOBS:,} jobs: live {to_live:.2f} s after opening; write to row over a busy stream: "
            f"median {latencies[len(latencies) // 2]:.0f} ms, max {latencies[-1]:.0f} ms"
        )
    finally:
        demo.terminate()
        demo.wait(10)
