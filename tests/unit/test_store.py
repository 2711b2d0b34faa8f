"""MemoryStore: the two counters, the cascade, one active execution per node, history, delete, list, timeouts."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from storeutil import ES, JS, execution, job_cond, job_with_execution, new_store

from jobstate.server import errors, rules
from jobstate.server.hub import WatchSpec
from jobstate.server.rules import Limits
from jobstate.server.store import MemoryStore
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb

SECOND = 1_000_000_000
AFB = ES.EXECUTION_STATE_TYPE_ASK_FOR_BID

# --- the two counters -----------------------------------------------------------------------------------------

Step = Callable[[MemoryStore], Awaitable[Any]]

STEPS: list[tuple[str, Step]] = [
    ("set-queued", lambda s: s.update_job_state("j1", JS.JOB_STATE_TYPE_QUEUED, None, "q")),
    ("set-same-state", lambda s: s.update_job_state("j1", JS.JOB_STATE_TYPE_QUEUED, None, "again")),
    ("add-execution", lambda s: s.create_execution("j1", execution("n2", "e2"))),
    ("update-execution", lambda s: s.update_execution("j1", "e1", execution(state=AFB))),
    ("update-status-only", lambda s: s.update_execution("j1", "e2", execution(status="hello"))),
    ("fail-execution", lambda s: s.update_execution("j1", "e2", execution(state=ES.EXECUTION_STATE_TYPE_FAILED))),
    ("retry-on-node", lambda s: s.create_execution("j1", execution("n2", "e3"))),
    ("in-progress", lambda s: s.update_job_state("j1", JS.JOB_STATE_TYPE_IN_PROGRESS)),
    ("complete", lambda s: s.update_job_state("j1", JS.JOB_STATE_TYPE_COMPLETED, None, "done")),
]


async def test_every_change_raises_version_and_revision_by_one() -> None:
    store = new_store()
    await store.create_job("other")  # revision 1: revisions are store-wide, versions per job
    r = await store.create_job("j1")
    assert (r.job.version, r.revision) == (1, 2)
    await store.create_execution("j1", execution("n1", "e1"))
    version, revision = 2, 3
    exec_versions = {"e1": 1}
    for name, step in STEPS:
        before = (await store.get_job("j1")).job
        r = await step(store)
        version += 1
        revision += 1
        assert (r.job.version, r.revision, store.stats().revision) == (version, revision, revision), name
        assert r.job.update_time.ToNanoseconds() > before.update_time.ToNanoseconds(), name
        assert r.job.create_time == before.create_time, name
        after = {e.compute_reference: e.version for e in r.job.executions}
        for ref, v in after.items():
            if r.execution is not None and ref == r.execution.compute_reference:
                assert v == exec_versions.get(ref, 0) + 1, name
            elif name != "complete":
                assert v == exec_versions[ref], f"{name}: {ref} changed although not touched"
        exec_versions = after
    other = (await store.get_job("other")).job
    assert other.version == 1
    assert (await store.get_job("j1")).revision == revision


async def test_create_job_defaults() -> None:
    store = new_store()
    r = await store.create_job("", 5 * SECOND, "hello")
    job = r.job
    assert job.job_id  # a UUID made by the server
    assert (job.state, job.version, len(job.executions)) == (JS.JOB_STATE_TYPE_NEW, 1, 0)
    assert job.create_time == job.update_time
    assert job.timeout_at.ToNanoseconds() == job.create_time.ToNanoseconds() + 5 * SECOND
    no_timeout = (await store.create_job("")).job
    assert not no_timeout.HasField("timeout_at")
    assert no_timeout.job_id != job.job_id


async def test_create_execution_defaults() -> None:
    store = new_store()
    await store.create_job("j")
    r = await store.create_execution("j", pb.ExecutionState(node_id="n", status="s"), "c")
    e = r.execution
    assert e is not None
    assert e.compute_reference  # made by the server
    assert (e.job_id, e.node_id, e.state, e.version, e.status) == ("j", "n", ES.EXECUTION_STATE_TYPE_NEW, 1, "s")
    assert e.create_time == e.update_time == r.job.update_time
    assert r.job.executions[-1] == e


# --- the cascade ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("final", sorted(rules.TERMINAL_JOB_STATES))
async def test_final_job_cancels_open_executions_in_one_change(final: int) -> None:
    store = new_store()
    await store.create_job("j")
    await store.create_execution("j", execution("n1", "open-1", ES.EXECUTION_STATE_TYPE_BID_ACCEPTED))
    await store.create_execution("j", execution("n2", "open-2", ES.EXECUTION_STATE_TYPE_ASK_FOR_BID))
    await store.create_execution("j", execution("n3", "done", ES.EXECUTION_STATE_TYPE_COMPLETED, status="ok"))
    await store.create_execution("j", execution("n4", "failed", ES.EXECUTION_STATE_TYPE_FAILED, status="bad"))
    before = (await store.get_job("j")).job
    events: list[bytes] = []
    watch = store.watch(WatchSpec(start_revision=6))
    r = await store.update_job_state("j", final, None, "stop now")
    events.append(await anext(watch))
    await watch.aclose()  # type: ignore[attr-defined]
    assert (r.job.version, r.revision) == (before.version + 1, 6)
    got = {e.compute_reference: e for e in r.job.executions}
    for ref in ("open-1", "open-2"):
        assert got[ref].state == ES.EXECUTION_STATE_TYPE_CANCELLED
        assert got[ref].status == "stop now"
        assert got[ref].version == 2
        assert got[ref].update_time == r.job.update_time
    old = {e.compute_reference: e for e in before.executions}
    assert got["done"] == old["done"]
    assert got["failed"] == old["failed"]
    history = (await store.get_history("j")).entries
    assert len(history) == r.job.version
    last = history[-1]
    assert (last.revision, last.version, last.comment) == (6, r.job.version, "stop now")
    assert (last.job_state.previous_state, last.job_state.new_state) == (JS.JOB_STATE_TYPE_NEW, final)
    assert sorted((c.compute_reference, c.previous_state, c.new_state) for c in last.cancelled_executions) == [
        ("open-1", ES.EXECUTION_STATE_TYPE_BID_ACCEPTED, ES.EXECUTION_STATE_TYPE_CANCELLED),
        ("open-2", ES.EXECUTION_STATE_TYPE_ASK_FOR_BID, ES.EXECUTION_STATE_TYPE_CANCELLED),
    ]
    (response,) = [spb.WatchResponse.FromString(m) for m in events]
    assert [e.revision for e in response.events] == [6]
    assert response.events[0].job == r.job


@pytest.mark.parametrize("state", sorted(rules.JOB_STATES - rules.TERMINAL_JOB_STATES))
async def test_non_final_job_state_leaves_executions_alone(state: int) -> None:
    store = new_store()
    await job_with_execution(store, "j", "n1", "e")
    r = await store.update_job_state("j", state)
    assert r.job.executions[0].state == ES.EXECUTION_STATE_TYPE_NEW
    assert r.job.executions[0].version == 1


# --- one active execution per node per job ---------------------------------------------------------------------


@pytest.mark.parametrize("first", sorted(rules.EXECUTION_STATES))
@pytest.mark.parametrize("second", sorted(rules.EXECUTION_STATES))
async def test_one_active_execution_per_node(first: int, second: int) -> None:
    store = new_store()
    await store.create_job("j")
    await store.create_execution("j", execution("n1", "a", first))
    busy = not rules.is_terminal_execution(first) and not rules.is_terminal_execution(second)
    call = store.create_execution("j", execution("n1", "b", second))
    if busy:
        revision = store.stats().revision
        with pytest.raises(errors.NodeHasActiveExecution) as info:
            await call
        assert info.value.metadata["compute_reference"] == "a"
        assert store.stats().revision == revision
    else:
        r = await call
        assert len(r.job.executions) == 2
    # Another node, or another job on the same node, is always free.
    assert (await store.create_execution("j", execution("n2", "c"))).job.version >= 3
    await store.create_job("k")
    assert (await store.create_execution("k", execution("n1", "a"))).job.version == 2


async def test_node_is_free_again_after_its_execution_ends() -> None:
    store = new_store()
    await job_with_execution(store, "j", "n1", "e1")
    with pytest.raises(errors.NodeHasActiveExecution):
        await store.create_execution("j", execution("n1", "e2"))
    await store.update_execution("j", "e1", execution(state=ES.EXECUTION_STATE_TYPE_BID_REJECTED))
    r = await store.create_execution("j", execution("n1", "e2"))
    assert [e.compute_reference for e in r.job.executions] == ["e1", "e2"]


# --- history --------------------------------------------------------------------------------------------------


async def test_history_has_one_entry_per_change_oldest_first() -> None:
    store = new_store()
    await store.create_job("j", 0, "created")
    await store.create_job("noise")
    await store.create_execution("j", execution("n1", "e1"), "picked n1")
    await store.update_job_state("noise", JS.JOB_STATE_TYPE_QUEUED)
    await store.update_execution("j", "e1", execution(state=ES.EXECUTION_STATE_TYPE_BID_ACCEPTED), comment="bid ok")
    await store.update_job_state("j", JS.JOB_STATE_TYPE_IN_PROGRESS, job_cond(version=3), "running")
    entries = (await store.get_history("j")).entries
    assert [(e.version, e.revision, e.comment) for e in entries] == [
        (1, 1, "created"),
        (2, 3, "picked n1"),
        (3, 5, "bid ok"),
        (4, 6, "running"),
    ]
    assert entries[0].WhichOneof("change") == "job_state"
    assert entries[0].job_state.new_state == JS.JOB_STATE_TYPE_NEW
    assert entries[1].execution_state.compute_reference == "e1"
    assert entries[1].execution_state.node_id == "n1"
    assert entries[1].execution_state.new_state == ES.EXECUTION_STATE_TYPE_NEW
    assert (entries[2].execution_state.previous_state, entries[2].execution_state.new_state) == (
        ES.EXECUTION_STATE_TYPE_NEW,
        ES.EXECUTION_STATE_TYPE_BID_ACCEPTED,
    )
    assert (entries[3].job_state.previous_state, entries[3].job_state.new_state) == (
        JS.JOB_STATE_TYPE_NEW,
        JS.JOB_STATE_TYPE_IN_PROGRESS,
    )
    times = [e.time.ToNanoseconds() for e in entries]
    assert times == sorted(times)
    assert times[-1] == (await store.get_job("j")).job.update_time.ToNanoseconds()


@pytest.mark.parametrize("page_size", [1, 2, 3, 7, 13, 0])
async def test_history_paging(page_size: int) -> None:
    store = new_store()
    await store.create_job("j")
    for i in range(12):
        await store.update_job_state("j", JS.JOB_STATE_TYPE_QUEUED, None, f"c{i}")
    got: list[int] = []
    token = ""
    for _ in range(20):
        page = await store.get_history("j", page_size, token)
        assert len(page.entries) <= (page_size or 100)
        got += [e.version for e in page.entries]
        token = page.next_page_token
        if not token:
            break
    assert got == list(range(1, 14))


# --- delete ---------------------------------------------------------------------------------------------------


async def test_delete_with_expected_version() -> None:
    store = new_store()
    await job_with_execution(store, "j")
    with pytest.raises(errors.VersionMismatch) as info:
        await store.delete_job("j", 1)
    assert info.value.metadata["current_version"] == "2"
    assert store.stats().revision == 2
    r = await store.delete_job("j", 2)
    assert (r.job.version, r.revision) == (2, 3)  # the last state, and a revision of its own
    assert store.stats().jobs == 0
    for call in (store.get_job("j"), store.get_history("j"), store.delete_job("j")):
        with pytest.raises(errors.JobNotFound):
            await call
    # The id is free again; the new job starts over, history included.
    r = await store.create_job("j")
    assert (r.job.version, r.revision) == (1, 4)
    assert [e.version for e in (await store.get_history("j")).entries] == [1]


# --- list -----------------------------------------------------------------------------------------------------


async def _listing_store() -> MemoryStore:
    store = new_store()
    for i in range(10):
        await store.create_job(f"job-{i:02d}")
    for i in (1, 4, 7):
        await store.create_execution(f"job-{i:02d}", execution("node-a"))
    for i in (4, 5):
        await store.create_execution(f"job-{i:02d}", execution("node-b"))
    for i in (2, 3):
        await store.update_job_state(f"job-{i:02d}", JS.JOB_STATE_TYPE_IN_PROGRESS)
    await store.update_job_state("job-07", JS.JOB_STATE_TYPE_COMPLETED)
    await store.delete_job("job-09")
    return store


@pytest.mark.parametrize(
    ("states", "node_id", "expect"),
    [
        pytest.param((), "", [0, 1, 2, 3, 4, 5, 6, 7, 8], id="all"),
        pytest.param((JS.JOB_STATE_TYPE_NEW,), "", [0, 1, 4, 5, 6, 8], id="new"),
        pytest.param((JS.JOB_STATE_TYPE_IN_PROGRESS, JS.JOB_STATE_TYPE_COMPLETED), "", [2, 3, 7], id="two-states"),
        pytest.param((JS.JOB_STATE_TYPE_ERROR,), "", [], id="none"),
        pytest.param((), "node-a", [1, 4, 7], id="node"),
        pytest.param((JS.JOB_STATE_TYPE_NEW,), "node-a", [1, 4], id="node-and-state"),
        pytest.param((), "node-b", [4, 5], id="node-b"),
        pytest.param((), "node-z", [], id="unknown-node"),
    ],
)
@pytest.mark.parametrize("page_size", [1, 2, 4, 100])
async def test_list_order_filters_and_paging(
    states: tuple[int, ...], node_id: str, expect: list[int], page_size: int
) -> None:
    store = await _listing_store()
    got: list[str] = []
    token = ""
    revisions = set()
    for _ in range(30):
        page = await store.list_jobs(states, node_id, page_size, token)
        assert len(page.jobs) <= page_size
        got += [j.job_id for j in page.jobs]
        revisions.add(page.revision)
        token = page.next_page_token
        if not token:
            break
    assert got == [f"job-{i:02d}" for i in expect]
    assert revisions == {store.stats().revision}


async def test_list_page_token_survives_a_deleted_job() -> None:
    store = await _listing_store()
    page = await store.list_jobs(page_size=3)
    assert [j.job_id for j in page.jobs] == ["job-00", "job-01", "job-02"]
    await store.delete_job("job-02")
    await store.delete_job("job-03")
    rest = await store.list_jobs(page_size=100, page_token=page.next_page_token)
    assert [j.job_id for j in rest.jobs] == ["job-04", "job-05", "job-06", "job-07", "job-08"]
    assert rest.next_page_token == ""


async def test_list_caps_page_size() -> None:
    store = new_store()
    for i in range(5):
        await store.create_job(f"j{i}")
    store.limits = Limits(max_page_size=2, default_page_size=3)
    assert len((await store.list_jobs(page_size=1000)).jobs) == 2
    assert len((await store.list_jobs()).jobs) == 3


# --- timeouts -------------------------------------------------------------------------------------------------


async def test_expire_moves_due_jobs_to_error_timed_out() -> None:
    store = new_store()
    r = await store.create_job("short", 10 * SECOND)
    await store.create_execution("short", execution("n1", "e1", ES.EXECUTION_STATE_TYPE_BID_ACCEPTED))
    await store.create_job("long", 100 * SECOND)
    await store.create_job("never")
    await store.create_job("done", 10 * SECOND)
    await store.update_job_state("done", JS.JOB_STATE_TYPE_COMPLETED)
    await store.create_job("gone", 10 * SECOND)
    await store.delete_job("gone")
    created = r.job.create_time.ToNanoseconds()
    assert store.next_timeout_ns() == created + 10 * SECOND

    assert await store.expire_due(now_ns=created + 10 * SECOND - 1) == 0
    revision = store.stats().revision
    assert await store.expire_due(now_ns=created + 10 * SECOND + 1) == 1
    assert store.stats().revision == revision + 1
    job = (await store.get_job("short")).job
    assert job.state == JS.JOB_STATE_TYPE_ERROR  # never CANCELLED: a timeout is not a user's cancel
    assert job.executions[0].state == ES.EXECUTION_STATE_TYPE_CANCELLED
    assert job.executions[0].status == rules.TIMEOUT_COMMENT
    last = (await store.get_history("short")).entries[-1]
    assert (last.comment, last.job_state.new_state) == ("timed out", JS.JOB_STATE_TYPE_ERROR)
    assert (await store.get_job("done")).job.state == JS.JOB_STATE_TYPE_COMPLETED
    assert (await store.get_job("long")).job.state == JS.JOB_STATE_TYPE_NEW
    assert (await store.get_job("never")).job.state == JS.JOB_STATE_TYPE_NEW
    assert store.stats().jobs == 4

    assert await store.expire_due(now_ns=created + 200 * SECOND) == 1
    assert (await store.get_job("long")).job.state == JS.JOB_STATE_TYPE_ERROR
    assert store.next_timeout_ns() is None
    assert await store.expire_due(now_ns=created + 300 * SECOND) == 0


async def test_expire_skips_a_job_deleted_and_created_again() -> None:
    store = new_store()
    first = (await store.create_job("j", 10 * SECOND)).job
    await store.delete_job("j")
    await store.create_job("j")  # no timeout this time
    revision = store.stats().revision
    assert await store.expire_due(now_ns=first.create_time.ToNanoseconds() + 20 * SECOND) == 0
    assert store.stats().revision == revision
    assert (await store.get_job("j")).job.state == JS.JOB_STATE_TYPE_NEW


async def test_expired_job_is_final() -> None:
    store = new_store()
    created = (await store.create_job("j", SECOND)).job.create_time.ToNanoseconds()
    await store.expire_due(now_ns=created + 2 * SECOND)
    with pytest.raises(errors.JobTerminal):
        await store.update_job_state("j", JS.JOB_STATE_TYPE_IN_PROGRESS)
    with pytest.raises(errors.JobTerminal):
        await store.create_execution("j", execution())


async def test_stats() -> None:
    store = await _listing_store()
    stats = store.stats()
    assert stats.jobs == 9
    assert stats.jobs_by_state == {
        JS.JOB_STATE_TYPE_NEW: 6,
        JS.JOB_STATE_TYPE_IN_PROGRESS: 2,
        JS.JOB_STATE_TYPE_COMPLETED: 1,
    }
    assert stats.revision == stats.history_held == 10 + 5 + 2 + 1 + 1
    assert stats.watchers == 0
