"""Every RPC through both clients (``api`` runs each test with ``Client`` and with ``AsyncClient``)."""

from __future__ import annotations

import datetime as dt
import itertools
import uuid

import pytest

from jobstate.client import FailedPrecondition, NotFound
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb

from .apis import Api

JS = pb.JobStateType
ES = pb.ExecutionStateType
ET = spb.WatchEventType
NANOS = 1_000_000_000


def ns(ts: object) -> int:
    return ts.ToNanoseconds()  # type: ignore[attr-defined, no-any-return]


# --- CreateJob / GetJob ------------------------------------------------------------------------------------


async def test_create_with_explicit_id(api: Api) -> None:
    r = await api.call("create_job", "job-1", comment="hi")
    j = r.job
    assert (j.job_id, j.state, j.version) == ("job-1", JS.JOB_STATE_TYPE_NEW, 1)
    assert list(j.executions) == []
    assert ns(j.create_time) > 0
    assert j.update_time == j.create_time
    assert not j.HasField("timeout_at")
    assert r.revision >= 1


async def test_create_generates_uuid(api: Api) -> None:
    a = (await api.call("create_job")).job.job_id
    b = (await api.call("create_job")).job.job_id
    assert str(uuid.UUID(a)) == a
    assert str(uuid.UUID(b)) == b
    assert a != b


@pytest.mark.parametrize("timeout", [90, 2.5, dt.timedelta(hours=1, milliseconds=1)])
async def test_create_with_timeout_sets_timeout_at(api: Api, timeout: float | dt.timedelta) -> None:
    j = (await api.call("create_job", "t", timeout=timeout)).job
    want = int(timeout.total_seconds() * NANOS) if isinstance(timeout, dt.timedelta) else int(timeout * NANOS)
    assert ns(j.timeout_at) - ns(j.create_time) == want


async def test_revisions_rise_by_one_per_write(api: Api) -> None:
    revisions = [(await api.call("create_job", f"r{i}")).revision for i in range(5)]
    assert revisions == list(range(revisions[0], revisions[0] + 5))
    assert await api.call("head_revision") == revisions[-1]


async def test_get(api: Api) -> None:
    created = await api.call("create_job", "g1")
    got = await api.call("get_job", "g1")
    assert got.job == created.job
    assert got.revision >= created.revision
    with pytest.raises(NotFound):
        await api.call("get_job", "g2")


# --- ListJobs ----------------------------------------------------------------------------------------------


async def test_list_filters_by_state(api: Api) -> None:
    for name in ("a", "b", "c", "d"):
        await api.call("create_job", name)
    await api.call("update_job_state", "b", "queued")
    await api.call("update_job_state", "c", "in_progress")
    await api.call("update_job_state", "d", JS.JOB_STATE_TYPE_CANCELLED)

    async def ids(**kw: object) -> list[str]:
        return [j.job_id for j in (await api.call("list_jobs", **kw)).jobs]

    assert await ids() == ["a", "b", "c", "d"]
    assert await ids(states=["queued"]) == ["b"]
    assert await ids(states=["QUEUED", JS.JOB_STATE_TYPE_IN_PROGRESS]) == ["b", "c"]
    assert await ids(states=["completed"]) == []
    r = await api.call("list_jobs")
    assert r.revision == await api.call("head_revision")


async def test_list_filters_by_node(api: Api) -> None:
    for name in ("a", "b", "c"):
        await api.call("create_job", name)
    await api.call("create_execution", "a", "n1")
    await api.call("create_execution", "b", "n2")
    await api.call("create_execution", "c", "n1")
    r = await api.call("list_jobs", node_id="n1")
    assert [j.job_id for j in r.jobs] == ["a", "c"]
    assert all(any(e.node_id == "n1" for e in j.executions) for j in r.jobs)
    assert [j.job_id for j in await api.collect("iter_jobs", node_id="n2")] == ["b"]
    assert await api.collect("iter_jobs", node_id="n3") == []


async def test_list_pages(api: Api) -> None:
    names = [f"p{i:02d}" for i in range(7)]
    for name in names:
        await api.call("create_job", name)
    first = await api.call("list_jobs", page_size=3)
    assert [j.job_id for j in first.jobs] == names[:3]
    assert first.next_page_token
    second = await api.call("list_jobs", page_size=3, page_token=first.next_page_token)
    assert [j.job_id for j in second.jobs] == names[3:6]
    jobs = await api.collect("iter_jobs", page_size=3)
    assert [j.job_id for j in jobs] == names  # ordered by create_time, then job_id; nothing twice
    assert [j.job_id for j in await api.collect("iter_jobs", ["new"], page_size=2)] == names


# --- UpdateJobState ----------------------------------------------------------------------------------------


async def test_update_job_state_with_conditions(api: Api) -> None:
    created = await api.call("create_job", "u1")
    r = await api.call("update_job_state", "u1", "queued", expected_version=1, expected_state="new", comment="q")
    assert (r.job.state, r.job.version) == (JS.JOB_STATE_TYPE_QUEUED, 2)
    assert r.revision == created.revision + 1
    assert ns(r.job.update_time) >= ns(r.job.create_time)
    assert r.job.create_time == created.job.create_time
    r = await api.call("update_job_state", "u1", "in_progress", unexpected_states=["cancelled", "error"])
    assert (r.job.state, r.job.version) == (JS.JOB_STATE_TYPE_IN_PROGRESS, 3)
    with pytest.raises(FailedPrecondition):
        await api.call("update_job_state", "u1", "completed", unexpected_states=["in_progress"])
    assert (await api.call("get_job", "u1")).job.version == 3


async def test_terminal_job_cancels_its_executions(api: Api) -> None:
    await api.call("create_job", "c1")
    await api.call("create_execution", "c1", "n1", compute_reference="e1", state="bid_accepted")
    await api.call("create_execution", "c1", "n2", compute_reference="e2", state="bid_rejected")
    r = await api.call("update_job_state", "c1", "cancelled", comment="user stop")
    by_ref = {e.compute_reference: e for e in r.job.executions}
    assert by_ref["e1"].state == ES.EXECUTION_STATE_TYPE_CANCELLED
    assert by_ref["e1"].status == "user stop"
    assert by_ref["e2"].state == ES.EXECUTION_STATE_TYPE_BID_REJECTED  # already final: untouched
    assert r.job.version == 4  # one change, one version


# --- CreateExecution / UpdateExecution ---------------------------------------------------------------------


async def test_create_execution(api: Api) -> None:
    await api.call("create_job", "x1")
    r = await api.call("create_execution", "x1", "n1", status="hello", desired_state=2, comment="go")
    e = r.execution
    assert e.compute_reference  # generated
    assert (e.job_id, e.node_id, e.state, e.status, e.version) == ("x1", "n1", ES.EXECUTION_STATE_TYPE_NEW, "hello", 1)
    assert e.desired_state == pb.ExecutionDesiredState.EXECUTION_DESIRED_STATE_RUNNING
    assert list(r.job.executions) == [e]
    assert r.job.version == 2
    r2 = await api.call("create_execution", "x1", "n2", compute_reference="mine", state="ask_for_bid")
    assert r2.execution.compute_reference == "mine"
    assert r2.execution.state == ES.EXECUTION_STATE_TYPE_ASK_FOR_BID
    assert [x.compute_reference for x in r2.job.executions] == [e.compute_reference, "mine"]
    assert r2.revision == r.revision + 1


async def test_update_execution_shortcuts(api: Api) -> None:
    await api.call("create_job", "x2")
    await api.call("create_execution", "x2", "n1", compute_reference="e1", status="start")
    r = await api.call("update_execution", "x2", "e1", state="ask_for_bid")
    assert (r.execution.state, r.execution.status, r.execution.version) == (
        ES.EXECUTION_STATE_TYPE_ASK_FOR_BID,
        "start",
        2,
    )
    r = await api.call("update_execution", "x2", "e1", status="bidding", expected_version=2)
    assert (r.execution.state, r.execution.status, r.execution.version) == (
        ES.EXECUTION_STATE_TYPE_ASK_FOR_BID,
        "bidding",
        3,
    )
    r = await api.call("update_execution", "x2", "e1", state="bid_accepted", status="", expected_states=["ask_for_bid"])
    assert (r.execution.state, r.execution.status) == (ES.EXECUTION_STATE_TYPE_BID_ACCEPTED, "")
    assert r.job.version == 5
    assert r.job.executions[0] == r.execution


async def test_update_execution_mask_clears_field(api: Api) -> None:
    await api.call("create_job", "x3")
    await api.call("create_execution", "x3", "n1", compute_reference="e1", status="keep me?", desired_state=2)
    # a mask naming a field the message leaves unset clears it
    r = await api.call("update_execution", "x3", "e1", pb.ExecutionState(), update_mask=["status", "desired_state"])
    assert r.execution.status == ""
    assert r.execution.desired_state == 0
    assert r.execution.state == ES.EXECUTION_STATE_TYPE_NEW


async def test_update_execution_message_without_mask_sets_every_field_set(api: Api) -> None:
    await api.call("create_job", "x4")
    await api.call("create_execution", "x4", "n1", compute_reference="e1", status="s0")
    results = pb.StorageSpec(storage_source="ipfs", cid="Qm1", metadata={"k": "v"})
    r = await api.call("update_execution", "x4", "e1", pb.ExecutionState(published_results=results, desired_state=3))
    assert r.execution.published_results == results
    assert r.execution.desired_state == pb.ExecutionDesiredState.EXECUTION_DESIRED_STATE_STOPPED
    assert r.execution.status == "s0"  # not set in the message: left alone


async def test_update_execution_run_output_sub_path(api: Api) -> None:
    await api.call("create_job", "x5")
    await api.call("create_execution", "x5", "n1", compute_reference="e1")
    full = pb.RunCommandResult(stdout="a", stderr="b", exit_code=1, runner_error="r")
    r = await api.call("update_execution", "x5", "e1", pb.ExecutionState(run_output=full))
    assert r.execution.run_output == full
    partial = pb.RunCommandResult(stdout="new", stderr="ignored", exit_code=9)
    r = await api.call(
        "update_execution", "x5", "e1", pb.ExecutionState(run_output=partial), update_mask=["run_output.stdout"]
    )
    o = r.execution.run_output
    assert (o.stdout, o.stderr, o.exit_code, o.runner_error) == ("new", "b", 1, "r")
    assert r.execution.version == 3


# --- GetJobHistory -----------------------------------------------------------------------------------------


async def test_history(api: Api) -> None:
    writes = [await api.call("create_job", "h1", comment="made")]
    writes.append(await api.call("update_job_state", "h1", "queued", comment="queued it"))
    writes.append(await api.call("create_execution", "h1", "n1", compute_reference="e1", comment="placed"))
    writes.append(await api.call("update_execution", "h1", "e1", state="bid_accepted", comment="accepted"))
    writes.append(await api.call("update_job_state", "h1", "cancelled", comment="stop"))
    await api.call("create_job", "other")  # not in h1's history

    entries = await api.collect("iter_history", "h1", page_size=2)
    assert len(entries) == 5 == writes[-1].job.version
    assert [e.revision for e in entries] == [w.revision for w in writes]
    assert [e.version for e in entries] == [1, 2, 3, 4, 5]
    assert [e.comment for e in entries] == ["made", "queued it", "placed", "accepted", "stop"]
    assert all(ns(a.time) <= ns(b.time) for a, b in itertools.pairwise(entries))

    created, queued, placed, accepted, stopped = entries
    assert created.WhichOneof("change") == "job_state"
    assert (created.job_state.previous_state, created.job_state.new_state) == (0, JS.JOB_STATE_TYPE_NEW)
    assert (queued.job_state.previous_state, queued.job_state.new_state) == (
        JS.JOB_STATE_TYPE_NEW,
        JS.JOB_STATE_TYPE_QUEUED,
    )
    assert placed.WhichOneof("change") == "execution_state"
    c = placed.execution_state
    assert (c.compute_reference, c.node_id, c.previous_state, c.new_state, c.version) == (
        "e1",
        "n1",
        0,
        ES.EXECUTION_STATE_TYPE_NEW,
        1,
    )
    c = accepted.execution_state
    assert (c.previous_state, c.new_state, c.version) == (
        ES.EXECUTION_STATE_TYPE_NEW,
        ES.EXECUTION_STATE_TYPE_BID_ACCEPTED,
        2,
    )
    assert stopped.job_state.new_state == JS.JOB_STATE_TYPE_CANCELLED
    assert [(x.compute_reference, x.new_state) for x in stopped.cancelled_executions] == [
        ("e1", ES.EXECUTION_STATE_TYPE_CANCELLED)
    ]

    page = await api.call("get_job_history", "h1", page_size=2)
    assert len(page.entries) == 2
    assert page.next_page_token


# --- DeleteJob ---------------------------------------------------------------------------------------------


async def test_delete(api: Api) -> None:
    await api.call("create_job", "d1")
    await api.call("update_job_state", "d1", "queued")
    r = await api.call("delete_job", "d1", expected_version=2)
    assert (r.job.job_id, r.job.version, r.job.state) == ("d1", 2, JS.JOB_STATE_TYPE_QUEUED)  # the last state
    assert r.revision == await api.call("head_revision")
    with pytest.raises(NotFound):
        await api.call("get_job", "d1")
    with pytest.raises(NotFound):
        await api.call("get_job_history", "d1")
    assert await api.collect("iter_jobs") == []
    recreated = await api.call("create_job", "d1")  # the id is free again, its history gone
    assert recreated.job.version == 1
    assert len(await api.collect("iter_history", "d1")) == 1


# --- Watch -------------------------------------------------------------------------------------------------


async def test_watch_initial_state_then_live(api: Api) -> None:
    await api.call("create_job", "w1")
    await api.call("create_job", "w2")
    head = await api.call("head_revision")
    rec = await api.watch(send_initial_state=True)
    try:
        initial = await rec.events(3, bookmarks=True)
        assert [(e.type, e.job.job_id) for e in initial[:2]] == [
            (ET.WATCH_EVENT_TYPE_INITIAL, "w1"),
            (ET.WATCH_EVENT_TYPE_INITIAL, "w2"),
        ]
        assert (initial[2].type, initial[2].revision) == (ET.WATCH_EVENT_TYPE_BOOKMARK, head)
        w = await api.call("update_job_state", "w1", "queued")
        e = await rec.next_event()
        assert (e.type, e.revision, e.job) == (ET.WATCH_EVENT_TYPE_UPDATED, w.revision, w.job)
        assert rec.position == w.revision
    finally:
        await rec.close()


async def test_watch_filters_and_event_types(api: Api) -> None:
    await api.call("create_job", "a")
    rec = await api.watch(["a"])
    try:
        await api.call("create_job", "b")  # filtered out
        u = await api.call("create_execution", "a", "n1")
        d = await api.call("delete_job", "a")
        c = await api.call("create_job", "a")
        got = await rec.events(3)
        assert [(e.type, e.revision) for e in got] == [
            (ET.WATCH_EVENT_TYPE_UPDATED, u.revision),
            (ET.WATCH_EVENT_TYPE_DELETED, d.revision),
            (ET.WATCH_EVENT_TYPE_CREATED, c.revision),
        ]
        assert got[1].job == d.job
    finally:
        await rec.close()


async def test_watch_by_node(api: Api) -> None:
    await api.call("create_job", "a")
    await api.call("create_job", "b")
    rec = await api.watch(node_id="n7")
    try:
        await api.call("create_execution", "a", "n1")
        placed = await api.call("create_execution", "b", "n7")
        e = await rec.next_event()
        assert (e.job.job_id, e.revision) == ("b", placed.revision)
    finally:
        await rec.close()


async def test_watch_from_revision_replays(api: Api) -> None:
    writes = [await api.call("create_job", f"j{i}") for i in range(4)]
    rec = await api.watch(start_revision=writes[1].revision)
    try:
        got = await rec.events(3)
        assert [e.revision for e in got] == [w.revision for w in writes[1:]]
    finally:
        await rec.close()


@pytest.mark.parametrize("resume", [True, False])
async def test_live_watch_starts_now(api: Api, resume: bool) -> None:
    # Regression: without resume the first request asked for start_revision 1 and replayed the whole history.
    for i in range(3):
        await api.call("create_job", f"old{i}")
    head = await api.call("head_revision")
    rec = await api.watch(resume=resume, progress_interval=0.05)
    try:
        # The first bookmark shows the stream is open (and must not be preceded by old changes).
        first = await rec.next_event(bookmarks=True)
        assert (first.type, first.revision) == (ET.WATCH_EVENT_TYPE_BOOKMARK, head)
        new = await api.call("create_job", "new")
        e = await rec.next_event()
        assert (e.job.job_id, e.revision) == ("new", new.revision)
    finally:
        await rec.close()


async def test_watch_progress_bookmarks(api: Api) -> None:
    w = await api.call("create_job", "a")
    rec = await api.watch(start_revision=w.revision + 1, progress_interval=0.05)
    try:
        e = await rec.next_event(bookmarks=True)
        assert (e.type, e.revision) == (ET.WATCH_EVENT_TYPE_BOOKMARK, w.revision)
    finally:
        await rec.close()
