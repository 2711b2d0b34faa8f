"""What runs in the client processes: each function is one process's share of a scenario.

Every function here runs in a fresh process (multiprocessing "spawn"), on its own event loop, and returns a
plain dict sent back to the coordinator. Waits on the coordinator go through ``Sync`` (multiprocessing
events and counters) and are bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from bench.backends import IN_PROGRESS, QUEUED, Conflict, Jobstate, Token, get_token, make, sent_ns

# --- latency histogram: log-spaced buckets of microseconds, 32 a doubling (about 2% wide), mergeable -------

_PER_DOUBLING = 32
_BUCKETS = 40 * _PER_DOUBLING


class Hist:
    __slots__ = ("b", "n")

    def __init__(self, b: list[int] | None = None) -> None:
        self.b = b if b is not None else [0] * _BUCKETS
        self.n = sum(self.b)

    def add_ns(self, ns: int) -> None:
        us = ns / 1000.0
        i = int(math.log2(us + 1.0) * _PER_DOUBLING) if us > 0 else 0
        self.b[min(i, _BUCKETS - 1)] += 1
        self.n += 1

    def merge(self, other: Hist) -> None:
        self.b = [a + b for a, b in zip(self.b, other.b, strict=True)]
        self.n += other.n

    def percentile_ms(self, p: float) -> float | None:
        if not self.n:
            return None
        rank = p / 100.0 * self.n
        seen = 0
        for i, c in enumerate(self.b):
            seen += c
            if seen >= rank and c:
                return (2.0 ** ((i + 0.5) / _PER_DOUBLING) - 1.0) / 1000.0
        return None


@dataclass
class Sync:
    """Shared between the coordinator and the client processes of one scenario run."""

    go: Any  # Event: the measured phase may start
    stop: Any  # Event: stop now and report
    jobs_ready: Any  # Event: the jobs exist and ``head`` is set
    head: Any  # Value q: the revision before the run's first write
    started: Any  # Value q: watch streams opened
    ready: Any  # Value q: watch streams proven live (received their warm-up event)
    t_start: Any  # Value q: wall-clock ns at which the measured phase began (0: warming up)
    received: Any  # Array q: events counted so far, one slot per watcher process


async def _wait_event(event: Any, timeout: float) -> None:
    if not await asyncio.to_thread(event.wait, timeout):
        raise TimeoutError(f"coordinator did not signal within {timeout}s")


async def _wait_count(value: Any, want: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while value.value < want:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {value.value} of {want} after {timeout}s")
        await asyncio.sleep(0.01)


def _incr(value: Any, by: int = 1) -> None:
    with value.get_lock():
        value.value += by


async def bounded(n: int, items: list[Any], fn: Callable[[Any], Awaitable[Any]]) -> list[Any]:
    """``fn`` over ``items`` with at most ``n`` in flight, results in order."""
    out: list[Any] = [None] * len(items)
    it = iter(enumerate(items))

    async def lane() -> None:
        for i, item in it:
            out[i] = await fn(item)

    await asyncio.gather(*(lane() for _ in range(min(n, len(items)))))
    return out


# --- conditional writes --------------------------------------------------------------------------------------


async def cas(system: str, target: str, p: dict[str, Any], sync: Sync, index: int) -> dict[str, Any]:
    b = make(system, target)
    jobs: list[str] = p["jobs"]
    hist = Hist()
    ok = conflicts = 0
    tokens = await bounded(32, jobs, lambda j: get_token(b, j))
    await _wait_event(sync.go, 60)
    deadline = time.monotonic() + p["duration"]

    async def writer(job_id: str, token: Token) -> None:
        nonlocal ok, conflicts
        state = IN_PROGRESS
        while time.monotonic() < deadline:
            state = QUEUED if state == IN_PROGRESS else IN_PROGRESS
            t0 = time.perf_counter_ns()
            try:
                token = await b.cas(job_id, token, state)
            except Conflict as c:
                token = c.token
                conflicts += 1
                continue
            hist.add_ns(time.perf_counter_ns() - t0)
            ok += 1

    t0 = time.monotonic()
    await asyncio.gather(*(writer(j, t) for j, t in zip(jobs, tokens, strict=True)))
    elapsed = time.monotonic() - t0
    await b.close()
    return {"ok": ok, "conflicts": conflicts, "elapsed": elapsed, "hist": hist.b}


# --- fan-out -------------------------------------------------------------------------------------------------


async def fanout_writer(system: str, target: str, p: dict[str, Any], sync: Sync, index: int) -> dict[str, Any]:
    b = make(system, target)
    jobs: list[str] = p["jobs"]
    tokens: dict[str, Token] = dict(zip(jobs, await bounded(64, jobs, b.create_watched), strict=True))  # type: ignore[attr-defined]
    sync.head.value = await b.head()
    sync.jobs_ready.set()
    await _wait_count(sync.started, p["watchers"], 120)
    # Warm-up: one write to each watched job; a watcher counts as live once it receives one.
    warm = jobs[: p["watchers"]] if p["single"] else jobs[:1]
    for j, t in zip(warm, await bounded(64, warm, lambda j: b.touch(j, tokens[j])), strict=True):
        tokens[j] = t
    await _wait_count(sync.ready, p["watchers"], 120)
    sync.t_start.value = time.time_ns()
    rate: float = p["rate"]
    duration: float = p["duration"]
    hist = Hist()
    writes = 0
    t0 = time.monotonic()
    deadline = t0 + duration

    failed = 0

    async def one(job_id: str) -> None:
        nonlocal writes, failed
        s = time.perf_counter_ns()
        try:
            tokens[job_id] = await b.touch(job_id, tokens[job_id])
        except Exception:  # cancelled at the deadline, or refused: counted, never a stray task error
            failed += 1
            return
        hist.add_ns(time.perf_counter_ns() - s)
        writes += 1

    if rate:
        # Open loop at a fixed rate: each write is sent at its time whether or not the last has returned
        # (one job at a time has at most one write in flight: the jobs are many and visited in turn).
        inflight: set[asyncio.Task[None]] = set()
        i = 0
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            due = int((now - t0) * rate) + 1
            while i < due:
                task = asyncio.create_task(one(jobs[i % len(jobs)]))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
                i += 1
            await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
        if inflight:
            # Writes the server has not answered within the bound are abandoned (and not counted).
            await asyncio.wait(inflight, timeout=30)
            for task in list(inflight):
                task.cancel()
            await asyncio.gather(*inflight, return_exceptions=True)
    else:
        # Full speed: closed loops, each on its own share of the jobs.
        lanes = max(1, min(p["concurrency"], len(jobs)))

        async def lane(k: int) -> None:
            mine = jobs[k::lanes]
            n = 0
            while time.monotonic() < deadline:
                await one(mine[n % len(mine)])
                n += 1

        await asyncio.gather(*(lane(k) for k in range(lanes)))
    elapsed = time.monotonic() - t0
    await b.close()
    return {"writes": writes, "failed": failed, "elapsed": elapsed, "hist": hist.b}


async def fanout_watchers(system: str, target: str, p: dict[str, Any], sync: Sync, index: int) -> dict[str, Any]:
    b = make(system, target)
    jobs: list[str] = p["jobs"]
    mine: list[int] = p["mine"]
    await _wait_event(sync.jobs_ready, 120)
    start = sync.head.value + 1
    hist = Hist()
    received = 0
    responses = 0
    last_receipt = 0
    t_start_box = sync.t_start

    async def watcher(k: int) -> None:
        _incr(sync.started)
        for attempt in range(1, 6):
            try:
                await watch_once(k)
                return
            except Exception as exc:
                if k in live:
                    raise
                # Refused before its first event (a server busy accepting a thousand streams at once can refuse
                # some): said, and opened again from the same revision, so nothing is missed or counted twice.
                print(f"watcher {k}: {exc!r} (attempt {attempt}); opening it again", file=sys.stderr, flush=True)
                await asyncio.sleep(0.1 * attempt)
        raise RuntimeError(f"watcher {k} could not open its stream")

    live: set[int] = set()

    async def watch_once(k: int) -> None:
        nonlocal received, responses, last_receipt
        async for batch in b.watch(jobs[k % len(jobs)] if p["single"] else None, start):
            if not batch:
                continue
            if k not in live:
                live.add(k)
                _incr(sync.ready)
            now = time.time_ns()
            t_start = t_start_box.value
            if not t_start:
                continue
            responses += 1
            for job in batch:
                s = sent_ns(job)
                if s >= t_start:
                    hist.add_ns(now - s)
                    received += 1
            last_receipt = now

    async def report() -> None:
        while True:
            sync.received[index] = received
            await asyncio.sleep(0.05)

    tasks = [asyncio.create_task(watcher(k)) for k in mine]
    reporter = asyncio.create_task(report())
    await _wait_event(sync.stop, 600)
    for t in [*tasks, reporter]:
        t.cancel()
    errors = []
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            try:
                await t
            except Exception as exc:
                errors.append(repr(exc))
    await b.close()
    return {
        "received": received,
        "responses": responses,
        "last_receipt": last_receipt,
        "hist": hist.b,
        "errors": errors[:3],
    }


# --- memory, initial sync, catch-up ----------------------------------------------------------------------------


async def populate(system: str, target: str, p: dict[str, Any], sync: Sync, index: int) -> dict[str, Any]:
    b = make(system, target)
    jobs = [f"{p['prefix']}-{i}" for i in range(p["first"], p["last"])]
    t0 = time.monotonic()
    await bounded(p["concurrency"], jobs, lambda j: b.create(j, executions=p["executions"]))
    elapsed = time.monotonic() - t0
    await b.close()
    return {"jobs": len(jobs), "elapsed": elapsed}


async def idle_watchers(system: str, target: str, p: dict[str, Any], sync: Sync, index: int) -> dict[str, Any]:
    """Opens one watch per job in ``p['jobs']``, each proven live, then holds them until told to stop."""
    b = make(system, target)

    async def hold(job_id: str) -> None:
        stream = b.watch_initial(job_id) if isinstance(b, Jobstate) else b.watch(job_id, 0)
        first = True
        async for _ in stream:
            if first:
                first = False
                _incr(sync.ready)

    tasks = [asyncio.create_task(hold(j)) for j in p["jobs"]]
    await _wait_event(sync.stop, 600)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await b.close()
    return {"watchers": len(tasks)}


async def reads(system: str, target: str, p: dict[str, Any], sync: Sync, index: int) -> dict[str, Any]:
    """Initial sync (list then watch every job), then catch-up from ``p['behind']`` revisions back."""
    b = make(system, target)
    t0 = time.perf_counter()
    listed, _ = await b.list_then_watch()
    sync_s = time.perf_counter() - t0
    head = await b.head()
    behind = min(p["behind"], head)
    t0 = time.perf_counter()
    events = await b.catch_up(head - behind + 1, head)
    catch_s = time.perf_counter() - t0
    await b.close()
    return {"listed": listed, "sync_s": sync_s, "behind": behind, "events": events, "catch_s": catch_s}


# --- process entry -------------------------------------------------------------------------------------------

WORK: dict[str, Callable[..., Coroutine[Any, Any, dict[str, Any]]]] = {
    "cas": cas,
    "fanout_writer": fanout_writer,
    "fanout_watchers": fanout_watchers,
    "populate": populate,
    "idle_watchers": idle_watchers,
    "reads": reads,
}


def entry(
    name: str, system: str, target: str, p: dict[str, Any], sync: Sync, index: int, conn: Connection, uv: bool
) -> None:
    try:
        coro = WORK[name](system, target, p, sync, index)
        if uv:
            import uvloop

            result = uvloop.run(coro)
        else:
            result = asyncio.run(coro)
    except BaseException:
        result = {"error": traceback.format_exc()}
    conn.send(result)
    conn.close()
