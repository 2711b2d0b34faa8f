"""ListJobs on the memory engine reads indexes by state and node (issue 13 item 3): a filtered page visits the
jobs that match, not every job, and a long walk that gives the loop back still answers exactly what matched at
the revision it returns."""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path

from storeutil import JS, execution, new_store

from jobstate.server.errors import NodeHasActiveExecution
from jobstate.server.sqlite_store import SqliteStore
from jobstate.server.store import MemoryStore, decode_token


async def all_pages(store: MemoryStore, states: list[int], node_id: str = "", page_size: int = 1) -> list[str]:
    ids: list[str] = []
    token = ""
    while True:
        page = await store.list_jobs(states, node_id, page_size, token)
        ids += [j.job_id for j in page.jobs]
        token = page.next_page_token
        if not token:
            return ids


async def test_a_filtered_page_visits_only_matching_jobs() -> None:
    store = new_store()
    for i in range(2000):
        await store.create_job(f"j{i:04d}")
    done = ["j0100", "j1200", "j1999"]
    for job_id in done:
        await store.update_job_state(job_id, JS.JOB_STATE_TYPE_COMPLETED)
    for job_id in ("j0007", "j1500"):
        await store.create_execution(job_id, execution("rare-node"))

    before = store.scan_visits
    page = await store.list_jobs([JS.JOB_STATE_TYPE_COMPLETED], page_size=1)
    assert [j.job_id for j in page.jobs] == ["j0100"]
    # One job on the page, one key looked at: not the 100 jobs created before it, nor the 2,000 in all.
    assert store.scan_visits - before == 1

    before = store.scan_visits
    assert await all_pages(store, [JS.JOB_STATE_TYPE_COMPLETED]) == done
    assert store.scan_visits - before == len(done)

    before = store.scan_visits
    assert await all_pages(store, [], "rare-node") == ["j0007", "j1500"]
    assert store.scan_visits - before == 2

    # Several states: a merge of their indexes, still only matching keys.
    await store.update_job_state("j0500", JS.JOB_STATE_TYPE_QUEUED)
    before = store.scan_visits
    got = await all_pages(store, [JS.JOB_STATE_TYPE_COMPLETED, JS.JOB_STATE_TYPE_QUEUED], page_size=2)
    assert got == ["j0100", "j0500", "j1200", "j1999"]
    assert store.scan_visits - before == 4

    # Deleting a job takes it out of every index.
    await store.delete_job("j1200")
    await store.delete_job("j0007")
    assert await all_pages(store, [JS.JOB_STATE_TYPE_COMPLETED]) == ["j0100", "j1999"]
    assert await all_pages(store, [], "rare-node") == ["j1500"]
    assert store.stats().jobs_by_state == {
        JS.JOB_STATE_TYPE_NEW: 1995,
        JS.JOB_STATE_TYPE_COMPLETED: 2,
        JS.JOB_STATE_TYPE_QUEUED: 1,
    }


async def test_a_long_walk_gives_the_loop_back_and_stays_exact() -> None:
    """State and node together: the walk takes the smaller index, checks the other, and lets other calls run
    every ``scan_chunk`` keys. Writes land meanwhile; the page must still be what matches at its revision."""
    rng = random.Random(13)
    store = new_store()
    store.scan_chunk = 4
    n = 300
    for i in range(n):
        await store.create_job(f"j{i:03d}")
        if i % 2:
            await store.create_execution(f"j{i:03d}", execution("node-a"))
        if i % 3 == 0:
            await store.update_job_state(f"j{i:03d}", JS.JOB_STATE_TYPE_QUEUED)
    flips = [JS.JOB_STATE_TYPE_NEW, JS.JOB_STATE_TYPE_QUEUED, JS.JOB_STATE_TYPE_IN_PROGRESS]
    wanted = [JS.JOB_STATE_TYPE_QUEUED, JS.JOB_STATE_TYPE_IN_PROGRESS]

    for trial in range(20):
        page_size = rng.choice([1, 5, 40, 1000])
        listing = asyncio.ensure_future(store.list_jobs(wanted, "node-a", page_size))
        yields = 0
        while not listing.done():
            # Only between the walk's chunks: each step here is one other call the loop let in.
            job_id = f"j{rng.randrange(n):03d}"
            await store.update_job_state(job_id, rng.choice(flips))
            if rng.random() < 0.2:
                # A job that gains node-a comes to match behind the walk's cursor, or ahead of it.
                with contextlib.suppress(NodeHasActiveExecution):
                    await store.create_execution(job_id, execution(f"node-{rng.choice('ab')}"))
            yields += 1
            await asyncio.sleep(0)
        page = listing.result()
        assert yields > 0 or page_size == 1, "the walk never gave the loop back"
        assert page.revision == store.stats().revision
        # Every job that matches now, asked with nothing changing meanwhile (one chunk for everything).
        store.scan_chunk = 10**9
        every = (await store.list_jobs(wanted, "node-a", 1000)).jobs
        store.scan_chunk = 4
        # The page is exactly the matching jobs up to where it ends: it may end early (a job stopped matching
        # during the walk), but never skips one, never holds one that no longer matches, and holds each as it
        # is at the page's revision.
        expected = list(every)
        if page.next_page_token:
            end = tuple(decode_token(page.next_page_token, (int, str)))
            expected = [j for j in every if (j.create_time.ToNanoseconds(), j.job_id) <= end]
        assert [(j.job_id, j.version) for j in page.jobs] == [(j.job_id, j.version) for j in expected], trial
        assert len(page.jobs) <= page_size


async def test_sqlite_rebuilds_the_indexes_when_it_opens(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    for i in range(50):
        await store.create_job(f"j{i:02d}")
    await store.update_job_state("j30", JS.JOB_STATE_TYPE_QUEUED)
    await store.create_execution("j40", execution("node-z"))
    await store.delete_job("j10")
    await store.close()

    store = SqliteStore(tmp_path)
    try:
        before = store.scan_visits
        assert await all_pages(store, [JS.JOB_STATE_TYPE_QUEUED]) == ["j30"]
        assert await all_pages(store, [], "node-z") == ["j40"]
        assert store.scan_visits - before == 2
        assert len(await all_pages(store, [JS.JOB_STATE_TYPE_NEW], page_size=100)) == 48
    finally:
        await store.close()
