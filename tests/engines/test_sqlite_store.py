"""SqliteStore below the service: write-through, reopening, failed writes change nothing, the data dir lock."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from jobstate.server import errors
from jobstate.server.hub import WatchHub, WatchSpec
from jobstate.server.sqlite_store import DB_FILE, DataDirInUse, SqliteStore
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb

JS = pb.JobStateType
ES = pb.ExecutionStateType
SECOND = 1_000_000_000


def open_store(path: Path, history_size: int = 1000) -> SqliteStore:
    return SqliteStore(path, WatchHub(history_size))


async def scripted(store: SqliteStore) -> None:
    """Jobs in every shape: with executions, cancelled by the cascade, deleted, recreated under the same id."""
    await store.create_job("a", 60 * SECOND, "made")
    await store.create_execution("a", pb.ExecutionState(node_id="n1", compute_reference="e1"))
    await store.create_execution("a", pb.ExecutionState(node_id="n2", compute_reference="e2"))
    await store.update_execution("a", "e2", pb.ExecutionState(state=ES.EXECUTION_STATE_TYPE_ASK_FOR_BID))
    await store.create_job("b")
    await store.update_job_state("b", JS.JOB_STATE_TYPE_CANCELLED, None, "stop")
    await store.create_job("gone")
    await store.delete_job("gone")
    await store.create_job("c")
    await store.create_job("gone")  # a new job under a deleted one's id: version 1, fresh history


async def everything(store: SqliteStore) -> tuple[list[pb.JobState], dict[str, list[pb.JobHistoryEntry]], int]:
    page = await store.list_jobs(page_size=1000)
    history = {j.job_id: (await store.get_history(j.job_id, page_size=1000)).entries for j in page.jobs}
    return page.jobs, history, page.revision


async def frames(store: SqliteStore, start: int, upto: int) -> list[spb.WatchEvent]:
    """Every event from ``start`` through ``upto`` as a watcher receives it."""
    events: list[spb.WatchEvent] = []
    stream = store.watch(WatchSpec(start_revision=start))
    async with asyncio.timeout(10):
        async for data in stream:
            events.extend(spb.WatchResponse.FromString(data).events)
            if events and events[-1].revision >= upto:
                break
    await stream.aclose()  # type: ignore[attr-defined]
    return events


async def test_reopened_store_has_everything(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    await scripted(store)
    jobs, history, revision = await everything(store)
    before = await frames(store, 1, revision)
    await store.close()

    again = open_store(tmp_path)
    assert await everything(again) == (jobs, history, revision)
    assert [j.job_id for j in jobs] == ["a", "b", "c", "gone"]  # ListJobs order survives
    assert (await again.get_job("gone")).job.version == 1
    assert [e.revision for e in history["gone"]] == [revision]
    assert await frames(again, 1, revision) == before  # the event history, byte for byte
    assert again.next_timeout_ns() == jobs[0].timeout_at.ToNanoseconds()

    # Revisions and versions continue where they stopped; create_time order still follows commits.
    r = await again.update_job_state("a", JS.JOB_STATE_TYPE_QUEUED)
    assert (r.revision, r.job.version) == (revision + 1, jobs[0].version + 1)
    late = await again.create_job("d")
    assert late.job.create_time.ToNanoseconds() > max(j.create_time.ToNanoseconds() for j in jobs)
    await again.close()


async def test_event_history_is_pruned_to_history_size(tmp_path: Path) -> None:
    store = open_store(tmp_path, history_size=5)
    for i in range(12):
        await store.create_job(f"j{i}")
    await store.close()
    with sqlite3.connect(tmp_path / DB_FILE) as db:
        assert [r for (r,) in db.execute("SELECT revision FROM events ORDER BY revision")] == [8, 9, 10, 11, 12]
    db.close()

    again = open_store(tmp_path, history_size=3)  # a smaller ring after a restart keeps the newest
    assert (again.hub.oldest_revision, again.hub.head_revision) == (10, 12)
    with pytest.raises(errors.RevisionCompacted):
        await frames(again, 9, 12)
    assert [e.revision for e in await frames(again, 10, 12)] == [10, 11, 12]
    await again.close()


async def test_event_history_is_pruned_to_history_bytes_and_restored_within_them(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path, WatchHub(1000, history_bytes=256 * 1024))
    await store.create_job("big")
    await store.create_execution("big", pb.ExecutionState(node_id="n", compute_reference="e"))
    for i in range(30):  # new output each time: 50 KB a change, nothing shared
        run = pb.ExecutionState(run_output=pb.RunCommandResult(stdout=f"{i:05d}" * 10_000))
        await store.update_execution("big", "e", run)
    oldest, head = store.hub.oldest_revision, store.hub.head_revision
    assert oldest > 2
    await store.close()
    with sqlite3.connect(tmp_path / DB_FILE) as db:
        kept = [r for (r,) in db.execute("SELECT revision FROM events ORDER BY revision")]
    db.close()
    # The change that let the oldest go was written before it went: at most one row more than the hub held.
    assert kept[-1] == head
    assert oldest - 1 <= kept[0] <= oldest

    again = SqliteStore(tmp_path, WatchHub(1000, history_bytes=256 * 1024))
    assert (again.hub.oldest_revision, again.hub.head_revision) == (oldest, head)
    assert again.hub.bytes_held <= 256 * 1024
    with pytest.raises(errors.RevisionCompacted):
        await frames(again, oldest - 1, head)
    assert [e.revision for e in await frames(again, oldest, head)] == list(range(oldest, head + 1))
    await again.close()


async def test_event_rows_on_disk_stay_within_history_bytes(tmp_path: Path) -> None:
    # In memory, status updates of a large job share its output; on disk each row is a whole frame, so the
    # table is held to the same budget by its own count (the hub then holds more than a restart restores).
    budget = 1024 * 1024
    store = SqliteStore(tmp_path, WatchHub(1000, history_bytes=budget))
    await store.create_job("big")
    run = pb.RunCommandResult(stdout="o" * 100_000, stderr="e" * 100_000)
    await store.create_execution("big", pb.ExecutionState(node_id="n", compute_reference="e", run_output=run))
    for i in range(40):
        await store.update_execution("big", "e", pb.ExecutionState(status=f"s{i}"))
        with sqlite3.connect(tmp_path / DB_FILE) as db:
            (on_disk,) = db.execute("SELECT sum(length(frame)) FROM events").fetchone()
        db.close()
        assert on_disk <= budget
    assert store.hub.oldest_revision == 1  # memory holds every change: they share the output
    with sqlite3.connect(tmp_path / DB_FILE) as db:
        first = db.execute("SELECT min(revision) FROM events").fetchone()[0]
    db.close()
    assert first > 30
    await store.close()

    again = SqliteStore(tmp_path, WatchHub(1000, history_bytes=budget))
    assert again.hub.oldest_revision == first
    with pytest.raises(errors.RevisionCompacted):
        await frames(again, first - 1, 42)
    assert [e.revision for e in await frames(again, first, 42)] == list(range(first, 43))
    await again.close()


async def test_a_failed_write_changes_nothing(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    await store.create_job("a")
    await store.create_execution("a", pb.ExecutionState(node_id="n1", compute_reference="e1"))
    before = await everything(store)
    stream = store.watch(WatchSpec(start_revision=before[2] + 1))
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)  # let the watcher reach its wait, so a wrongly published change would wake it
    # A real SQLite failure in the middle of the transaction (after the jobs row, at the events row).
    store._db.execute("CREATE TEMP TRIGGER fail BEFORE INSERT ON events BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
    writes = [
        store.update_job_state("a", JS.JOB_STATE_TYPE_COMPLETED, None, "done"),  # with the cascade
        store.update_execution("a", "e1", pb.ExecutionState(status="x")),
        store.create_execution("a", pb.ExecutionState(node_id="n2")),
        store.create_job("b", 1),
        store.delete_job("a"),
    ]
    for write in writes:
        with pytest.raises(errors.StoreUnavailable, match="disk says no"):
            await write
    assert await everything(store) == before
    assert store.stats().revision == before[2]
    assert store.next_timeout_ns() is None
    assert not waiting.done()
    store._db.execute("DROP TRIGGER fail")
    r = await store.update_job_state("a", JS.JOB_STATE_TYPE_QUEUED)
    assert r.revision == before[2] + 1
    async with asyncio.timeout(10):
        first = spb.WatchResponse.FromString(await waiting)
    assert [e.revision for e in first.events] == [r.revision]
    await stream.aclose()
    await store.close()
    again = open_store(tmp_path)
    assert (await again.get_job("a")).job == r.job
    await again.close()


async def test_a_timeout_that_cannot_be_committed_fires_later(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    job = (await store.create_job("t", SECOND)).job
    due = job.timeout_at.ToNanoseconds()
    store._db.execute("CREATE TEMP TRIGGER fail BEFORE INSERT ON history BEGIN SELECT RAISE(ABORT, 'full'); END")
    with pytest.raises(errors.StoreUnavailable):
        await store.expire_due(due)
    assert (await store.get_job("t")).job.state == JS.JOB_STATE_TYPE_NEW
    assert store.next_timeout_ns() == due
    store._db.execute("DROP TRIGGER fail")
    assert await store.expire_due(due) == 1
    await store.close()
    again = open_store(tmp_path)
    got = (await again.get_job("t")).job
    assert (got.state, got.version) == (JS.JOB_STATE_TYPE_ERROR, 2)
    assert again.next_timeout_ns() is None  # a final job has no pending timeout to index
    assert await again.expire_due(due) == 0
    await again.close()


async def test_timeouts_are_reloaded(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    await store.create_job("t", 30 * SECOND)
    await store.create_job("u", 10 * SECOND)
    await store.close()
    again = open_store(tmp_path)
    due = again.next_timeout_ns()
    assert due == (await again.get_job("u")).job.timeout_at.ToNanoseconds()
    assert await again.expire_due(due) == 1
    got = (await again.get_job("u")).job
    assert (got.state, got.version) == (JS.JOB_STATE_TYPE_ERROR, 2)
    assert (await again.get_history("u")).entries[-1].comment == "timed out"
    await again.close()


async def test_one_server_per_data_dir(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    with pytest.raises(DataDirInUse):
        open_store(tmp_path)
    await store.close()
    open_store(tmp_path)._release()


async def test_writes_after_close_are_refused(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    await store.create_job("a")
    await store.close()
    with pytest.raises(errors.ShuttingDown):
        await store.create_job("b")
    assert "b" not in store._jobs
