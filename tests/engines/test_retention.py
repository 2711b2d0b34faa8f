"""Retention of finished jobs and the per-job history cap, through the real gRPC server on every engine.

A tiny ``retain_finished`` (0.2 s) makes the sweeper act within the test; every wait is on an event (a watch
stream's next message) or a poll with a deadline, never a sleep. The restart test drives the store's own
``remove_finished`` with an explicit cut-off time, so it checks the retention clock without waiting for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from cli.cliutil import run as run_cli
from google.protobuf import duration_pb2, field_mask_pb2

from jobstate.client import Client, Informer
from jobstate.client.view import LiveModel, render
from jobstate.server.hub import encode_event
from jobstate.server.rules import Limits
from jobstate.server.sqlite_store import SqliteStore
from jobstate.server.store import MemoryStore
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb
from jobstate.v1 import job_state_service_pb2_grpc as spb_grpc

JS = pb.JobStateType
ES = pb.ExecutionStateType
ET = spb.WatchEventType
RETENTION = spb.DeleteCause.DELETE_CAUSE_RETENTION
CLIENT = spb.DeleteCause.DELETE_CAUSE_CLIENT
DEADLINE = 30.0
TINY = 0.2  # seconds a finished job is kept in these tests


def stub_of(server: Any) -> Iterator[spb_grpc.JobStateServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield spb_grpc.JobStateServiceStub(channel)


@pytest.fixture
def tiny(make_server: Callable[..., Any], conformance_engine: str) -> Any:
    """A server on each engine that keeps finished jobs for 0.2 s, with metrics."""
    return make_server(engine=conformance_engine, retain_finished=TINY, metrics_port=0)


@pytest.fixture
def stub(tiny: Any) -> Iterator[spb_grpc.JobStateServiceStub]:
    yield from stub_of(tiny)


def head(stub: spb_grpc.JobStateServiceStub) -> int:
    return int(stub.ListJobs(spb.ListJobsRequest(page_size=1)).revision)


def events_until(stream: Any, done: Callable[[list[spb.WatchEvent]], bool]) -> list[spb.WatchEvent]:
    """Events of ``stream`` until ``done(seen)``; the stream's own deadline bounds the wait."""
    seen: list[spb.WatchEvent] = []
    for response in stream:
        seen.extend(e for e in response.events if e.type != ET.WATCH_EVENT_TYPE_BOOKMARK)
        if done(seen):
            stream.cancel()
            return seen
    raise AssertionError(f"stream ended before the expected events; seen {[(e.type, e.job.job_id) for e in seen]}")


def deleted(seen: list[spb.WatchEvent]) -> list[spb.WatchEvent]:
    return [e for e in seen if e.type == ET.WATCH_EVENT_TYPE_DELETED]


def finish(stub: spb_grpc.JobStateServiceStub, job_id: str, state: int = JS.JOB_STATE_TYPE_COMPLETED) -> int:
    return int(stub.UpdateJobState(spb.UpdateJobStateRequest(job_id=job_id, new_state=state)).revision)


def test_only_final_jobs_are_removed_each_once_with_cause_retention(
    tiny: Any, stub: spb_grpc.JobStateServiceStub
) -> None:
    start = head(stub) + 1
    stream = stub.Watch(spb.WatchRequest(start_revision=start), timeout=DEADLINE)
    # Jobs that are not final, created first: they are the oldest, and must outlive every final job.
    stub.CreateJob(spb.CreateJobRequest(job_id="new"))
    stub.CreateJob(spb.CreateJobRequest(job_id="queued"))
    finish(stub, "queued", JS.JOB_STATE_TYPE_QUEUED)
    stub.CreateJob(spb.CreateJobRequest(job_id="running"))
    stub.CreateExecution(
        spb.CreateExecutionRequest(
            job_id="running", execution=pb.ExecutionState(node_id="n1", state=ES.EXECUTION_STATE_TYPE_BID_ACCEPTED)
        )
    )
    finish(stub, "running", JS.JOB_STATE_TYPE_IN_PROGRESS)
    stub.CreateJob(spb.CreateJobRequest(job_id="by-client"))
    finals = {"done": JS.JOB_STATE_TYPE_COMPLETED, "failed": JS.JOB_STATE_TYPE_ERROR}
    finals["cancelled"] = JS.JOB_STATE_TYPE_CANCELLED
    final_revisions = {}
    for job_id, state in finals.items():
        stub.CreateJob(spb.CreateJobRequest(job_id=job_id))
        final_revisions[job_id] = finish(stub, job_id, state)
    stub.DeleteJob(spb.DeleteJobRequest(job_id="by-client"))

    seen = events_until(stream, lambda s: len(deleted(s)) >= 4)
    gone = deleted(seen)
    assert {e.job.job_id: e.delete_cause for e in gone} == {
        "by-client": CLIENT,
        "done": RETENTION,
        "failed": RETENTION,
        "cancelled": RETENTION,
    }
    gone = [e for e in gone if e.delete_cause == RETENTION]
    assert [e.job.job_id for e in gone] == list(finals)  # oldest final first
    for e in gone:
        assert e.revision > final_revisions[e.job.job_id]
        assert e.job.state == finals[e.job.job_id]  # the DELETED event holds the job's last state
    # Removed with their history; the jobs that are not final stay, though older than any removed one.
    for job_id in finals:
        with pytest.raises(grpc.RpcError) as info:
            stub.GetJobHistory(spb.GetJobHistoryRequest(job_id=job_id))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    listed = stub.ListJobs(spb.ListJobsRequest())
    assert [j.job_id for j in listed.jobs] == ["new", "queued", "running"]
    created = stub.CreateJob(spb.CreateJobRequest(job_id="after"))
    assert created.revision > gone[-1].revision
    assert [j.job_id for j in stub.ListJobs(spb.ListJobsRequest()).jobs] == ["new", "queued", "running", "after"]
    # The sweeper counts a sweep when its last batch is done, which on etcd can follow the events it caused.
    deadline = time.monotonic() + DEADLINE
    while "jobstate_retention_removed_jobs_total 3.0" not in (text := tiny.run(tiny.app.metrics.render).decode()):
        assert time.monotonic() < deadline, text
        time.sleep(0.01)
    assert "jobstate_retention_sweep_seconds_count" in text


def test_a_watcher_resuming_across_a_sweep_sees_every_deletion_in_order(
    stub: spb_grpc.JobStateServiceStub, conformance_engine: str
) -> None:
    resume_at = head(stub) + 1
    ids = [f"r{i}" for i in range(6)]
    for job_id in ids:
        stub.CreateJob(spb.CreateJobRequest(job_id=job_id))
    for job_id in ids[:4]:
        finish(stub, job_id)
    # Wait, by polling with a deadline, until the sweep has removed the four: the watcher was away meanwhile.
    deadline = time.monotonic() + DEADLINE
    while len(stub.ListJobs(spb.ListJobsRequest()).jobs) != 2:
        assert time.monotonic() < deadline, "retention did not remove the finished jobs"
        time.sleep(0.02)
    stream = stub.Watch(spb.WatchRequest(start_revision=resume_at), timeout=DEADLINE)
    seen = events_until(stream, lambda s: len(deleted(s)) >= 4)
    revisions = [e.revision for e in seen]
    assert revisions == sorted(revisions)
    assert len(set(revisions)) == len(revisions)
    kinds = [(e.type, e.job.job_id) for e in seen]
    assert [j for t, j in kinds if t == ET.WATCH_EVENT_TYPE_UPDATED] == ids[:4]
    assert [j for t, j in kinds if t == ET.WATCH_EVENT_TYPE_DELETED] == ids[:4]  # in the order they finished
    for j in ids[:4]:
        assert kinds.index((ET.WATCH_EVENT_TYPE_UPDATED, j)) < kinds.index((ET.WATCH_EVENT_TYPE_DELETED, j))
    assert {e.delete_cause for e in deleted(seen)} == {RETENTION}
    assert [e.job.job_id for e in seen if e.type == ET.WATCH_EVENT_TYPE_CREATED] == ids


def test_the_informer_drops_removed_jobs(tiny: Any, stub: spb_grpc.JobStateServiceStub) -> None:
    stub.CreateJob(spb.CreateJobRequest(job_id="stays"))
    stub.CreateJob(spb.CreateJobRequest(job_id="goes"))
    causes: list[int] = []
    with Client(tiny.target) as client:
        informer = Informer(client, on_change=lambda e: causes.append(e.delete_cause)).start()
        try:
            assert informer.wait_synced(DEADLINE)
            assert informer.get("goes") is not None
            finish(stub, "goes")
            deadline = time.monotonic() + DEADLINE
            while informer.get("goes") is not None:
                assert time.monotonic() < deadline, "the informer kept a removed job"
                time.sleep(0.01)
            assert [j.job_id for j in informer.jobs()] == ["stays"]
            assert "goes" not in informer.cache.seen_at  # nothing of it is kept
            assert causes[-1] == RETENTION
        finally:
            informer.stop()


@pytest.mark.parametrize("engine", ["sqlite", "etcd"])
def test_the_retention_clock_survives_a_restart(make_server: Callable[..., Any], engine: str) -> None:
    first = make_server(engine=engine, retain_finished=0)  # keeps everything while the job is made final
    with grpc.insecure_channel(first.target) as channel:
        stub = spb_grpc.JobStateServiceStub(channel)
        stub.CreateJob(spb.CreateJobRequest(job_id="old"))
        final = stub.UpdateJobState(spb.UpdateJobStateRequest(job_id="old", new_state=JS.JOB_STATE_TYPE_COMPLETED))
        stub.CreateJob(spb.CreateJobRequest(job_id="open"))
        stub.UpdateJobState(spb.UpdateJobStateRequest(job_id="open", new_state=JS.JOB_STATE_TYPE_QUEUED))
    final_ns = final.job.update_time.ToNanoseconds()
    same_data = {"data_dir": first.config.data_dir} if engine == "sqlite" else {}
    if engine == "etcd":
        same_data = {"etcd_endpoints": first.config.etcd_endpoints, "etcd_prefix": first.config.etcd_prefix}
    first.stop()
    # Retention of a day: the sweeper leaves the job alone, the store is driven by hand with explicit cut-offs.
    second = make_server(engine=engine, retain_finished=24 * 3600, **same_data)

    def due() -> int | None:
        return second.store.next_finished_ns()  # type: ignore[no-any-return]

    deadline = time.monotonic() + DEADLINE
    while second.run(due) is None:  # etcd: the store reads its jobs when it starts
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # The clock is the final change's time, kept with the job: not the restart's.
    assert second.run(due) == final_ns
    with grpc.insecure_channel(second.target) as channel:
        stub = spb_grpc.JobStateServiceStub(channel)
        resume_at = head(stub) + 1
        stream = stub.Watch(spb.WatchRequest(start_revision=resume_at), timeout=DEADLINE)
        assert second.call(second.store.remove_finished(final_ns - 1, 32)) == 0  # not yet final for long enough
        assert second.call(second.store.remove_finished(final_ns, 32)) == 1
        seen = events_until(stream, lambda s: bool(deleted(s)))
        assert [(e.type, e.job.job_id, e.delete_cause) for e in seen] == [
            (ET.WATCH_EVENT_TYPE_DELETED, "old", RETENTION)
        ]
        # The open job, older than the cut-off, is never taken, whatever the cut-off.
        assert second.call(second.store.remove_finished(time.time_ns() + 10**15, 32)) == 0
        assert [j.job_id for j in stub.ListJobs(spb.ListJobsRequest()).jobs] == ["open"]


def _history_job(stub: spb_grpc.JobStateServiceStub, job_id: str, changes: int) -> None:
    stub.CreateJob(spb.CreateJobRequest(job_id=job_id))
    stub.CreateExecution(
        spb.CreateExecutionRequest(job_id=job_id, execution=pb.ExecutionState(node_id="n", compute_reference="e"))
    )
    for i in range(changes - 2):  # progress reports: one change each
        stub.UpdateExecution(
            spb.UpdateExecutionRequest(
                job_id=job_id,
                compute_reference="e",
                execution=pb.ExecutionState(status=f"step {i}"),
                update_mask=field_mask_pb2.FieldMask(paths=["status"]),
            )
        )


def test_history_is_capped_per_job_and_says_what_was_dropped(
    make_server: Callable[..., Any], conformance_engine: str
) -> None:
    server = make_server(engine=conformance_engine, limits=Limits(max_history_per_job=5))
    for stub in stub_of(server):
        _history_job(stub, "busy", 12)
        _history_job(stub, "quiet", 3)
        whole = stub.GetJobHistory(spb.GetJobHistoryRequest(job_id="busy"))
        assert [e.version for e in whole.entries] == [8, 9, 10, 11, 12]
        assert whole.dropped_entries == 7
        assert whole.entries[-1].execution_state.version == 11
        first = stub.GetJobHistory(spb.GetJobHistoryRequest(job_id="busy", page_size=2))
        assert first.dropped_entries == 7
        pages = [first]
        while pages[-1].next_page_token:
            pages.append(
                stub.GetJobHistory(
                    spb.GetJobHistoryRequest(job_id="busy", page_size=2, page_token=pages[-1].next_page_token)
                )
            )
        assert [e for p in pages for e in p.entries] == list(whole.entries)
        quiet = stub.GetJobHistory(spb.GetJobHistoryRequest(job_id="quiet"))
        assert ([e.version for e in quiet.entries], quiet.dropped_entries) == ([1, 2, 3], 0)
    out = run_cli("--target", server.target, "history", "busy")
    assert out.code == 0, out.err
    assert out.out.splitlines()[0].startswith("7 earlier changes dropped")
    assert len(out.out.splitlines()) == 1 + 1 + 5  # the note, the header, the five entries held
    assert "dropped" not in run_cli("--target", server.target, "history", "quiet").out


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--retain-finished=-1h", "cannot be negative"),
        ("--retain-finished=soon", "invalid duration"),
        ("--max-history-per-job=-3", "must be 0 or more"),
        ("--max-history-per-job=many", "not a number"),
    ],
)
def test_bad_retention_flags_are_refused_at_start(flag: str, message: str) -> None:
    out = run_cli("serve", "--port", "0", flag)
    assert out.code == 2
    assert message in out.err
    assert flag.split("=")[0] in out.err


def test_sqlite_gives_the_space_of_removed_jobs_back(tmp_path: Any) -> None:
    import asyncio

    async def main() -> tuple[int, int, int]:
        store = SqliteStore(tmp_path, synchronous="OFF")
        try:
            for i in range(1500):
                await store.create_job(f"j{i}", comment="x" * 2000)
                await store.update_job_state(f"j{i}", JS.JOB_STATE_TYPE_COMPLETED, comment="y" * 2000)
            await store.maintain()
            full = store.file_bytes()
            removed = 0
            while n := await store.remove_finished(time.time_ns(), 32):
                removed += n
            await store.maintain()
            return full, store.file_bytes(), removed
        finally:
            await store.close()

    full, after, removed = asyncio.run(main())
    assert removed == 1500
    assert after < full / 4, (full, after)


def test_several_servers_on_one_etcd_remove_each_job_once(make_server: Callable[..., Any]) -> None:
    a = make_server(engine="etcd", retain_finished=TINY, metrics_port=0)
    shared = {"etcd_endpoints": a.config.etcd_endpoints, "etcd_prefix": a.config.etcd_prefix}
    b = make_server(engine="etcd", retain_finished=TINY, metrics_port=0, **shared)
    ids = [f"s{i}" for i in range(20)]
    for stub_a in stub_of(a):
        for stub_b in stub_of(b):
            stream = stub_b.Watch(spb.WatchRequest(start_revision=head(stub_a) + 1), timeout=DEADLINE)
            for i, job_id in enumerate(ids):  # writes through both servers
                stub = stub_a if i % 2 else stub_b
                stub.CreateJob(spb.CreateJobRequest(job_id=job_id))
                finish(stub, job_id)
            seen = events_until(stream, lambda s: len(deleted(s)) >= len(ids))
            assert [(e.job.job_id, e.delete_cause) for e in deleted(seen)] == [(j, RETENTION) for j in ids]
            assert not stub_a.ListJobs(spb.ListJobsRequest()).jobs

    def removed(server: Any) -> float:
        for line in server.run(server.app.metrics.render).decode().splitlines():
            if line.startswith("jobstate_retention_removed_jobs_total "):
                return float(line.split()[1])
        raise AssertionError("no retention counter")

    # Each job was removed by one server (both swept, racing): the counts add up to the jobs, never more.
    deadline = time.monotonic() + DEADLINE
    while removed(a) + removed(b) < len(ids):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert removed(a) + removed(b) == len(ids)


def test_sqlite_trims_history_when_the_cap_is_lowered(make_server: Callable[..., Any]) -> None:
    first = make_server(engine="sqlite")
    for stub in stub_of(first):
        _history_job(stub, "j", 8)
    first.stop()
    second = make_server(engine="sqlite", data_dir=first.config.data_dir, limits=Limits(max_history_per_job=3))
    for stub in stub_of(second):
        got = stub.GetJobHistory(spb.GetJobHistoryRequest(job_id="j"))
        assert ([e.version for e in got.entries], got.dropped_entries) == ([6, 7, 8], 5)
    assert second.run(lambda: second.store.stats().job_history_entries) == 3
    second.stop()
    third = make_server(engine="sqlite", data_dir=first.config.data_dir)  # the cap raised again: nothing back
    for stub in stub_of(third):
        got = stub.GetJobHistory(spb.GetJobHistoryRequest(job_id="j"))
        assert ([e.version for e in got.entries], got.dropped_entries) == ([6, 7, 8], 5)


def test_a_deleted_event_frame_carries_its_cause() -> None:
    job = pb.JobState(job_id="j", state=JS.JOB_STATE_TYPE_COMPLETED, version=3)
    frame = encode_event(ET.WATCH_EVENT_TYPE_DELETED, 7, job.SerializeToString(), 1_500_000_000, RETENTION)
    event = spb.WatchResponse.FromString(frame).events[0]
    assert (event.type, event.revision, event.job, event.delete_cause) == (
        ET.WATCH_EVENT_TYPE_DELETED,
        7,
        job,
        RETENTION,
    )
    plain = spb.WatchResponse.FromString(encode_event(ET.WATCH_EVENT_TYPE_UPDATED, 8, b"", 0)).events[0]
    assert plain.delete_cause == spb.DeleteCause.DELETE_CAUSE_UNSPECIFIED


def test_removed_jobs_leave_no_index_entries_behind() -> None:
    """A job removed long before its timeout keeps no timeout entry (timeouts run up to a year), and with
    retention off nothing indexes the finished jobs that clients delete."""
    import asyncio

    async def main() -> tuple[list[str], int]:
        store = MemoryStore()
        for i in range(300):
            await store.create_job(f"j{i}", timeout_ns=600 * 10**9)
            await store.update_job_state(f"j{i}", JS.JOB_STATE_TYPE_COMPLETED)
        await store.create_job("open", timeout_ns=3600 * 10**9)
        await store.create_job("gone", timeout_ns=3600 * 10**9)
        await store.delete_job("gone")
        while await store.remove_finished(time.time_ns(), 32):
            pass
        pending = [job_id for _, job_id, _ in store._timeouts]
        off = MemoryStore(retention=False)
        for i in range(300):
            await off.create_job(f"k{i}")
            await off.update_job_state(f"k{i}", JS.JOB_STATE_TYPE_COMPLETED)
            await off.delete_job(f"k{i}")
        return pending, len(off._finished)

    pending, finished = asyncio.run(main())
    assert pending == ["open"]
    assert finished == 0


def test_the_live_view_counts_expired_jobs_apart_from_deleted_ones() -> None:
    model = LiveModel("t")
    for revision, job_id in enumerate(("a", "b", "c"), start=1):
        job = pb.JobState(job_id=job_id, state=JS.JOB_STATE_TYPE_COMPLETED, version=1)
        model.apply_event(spb.WatchEvent(type=ET.WATCH_EVENT_TYPE_CREATED, revision=revision, job=job), 0.0)
    gone = [("a", CLIENT), ("b", RETENTION), ("c", RETENTION)]
    for revision, (job_id, cause) in enumerate(gone, start=4):
        job = pb.JobState(job_id=job_id, state=JS.JOB_STATE_TYPE_COMPLETED, version=1)
        event = spb.WatchEvent(type=ET.WATCH_EVENT_TYPE_DELETED, revision=revision, job=job, delete_cause=cause)
        model.apply_event(event, 0.0)
    assert (model.rows, model.deleted, model.expired) == ({}, 1, 2)
    summary = render(model, 120, 10, 0.0, 0.0, colour=False)[1]
    assert "1 deleted" in summary
    assert "2 expired" in summary


def test_finished_and_deleted_jobs_leave_no_pending_timeout(
    make_server: Callable[..., Any], conformance_engine: str
) -> None:
    """A day-long timeout of a job that finished in a second (and was then removed) is not kept for a day."""
    server = make_server(engine=conformance_engine)
    day = duration_pb2.Duration(seconds=24 * 3600)
    for stub in stub_of(server):
        stub.CreateJob(spb.CreateJobRequest(job_id="done", timeout=day))
        stub.CreateJob(spb.CreateJobRequest(job_id="dropped", timeout=day))
        stub.CreateJob(spb.CreateJobRequest(job_id="open", timeout=duration_pb2.Duration(seconds=48 * 3600)))
        finish(stub, "done")
        stub.DeleteJob(spb.DeleteJobRequest(job_id="dropped"))
        open_due = stub.GetJob(spb.GetJobRequest(job_id="open")).job.timeout_at.ToNanoseconds()

    def pending() -> list[str]:
        return [job_id for _, job_id, _ in server.store._timeouts]

    deadline = time.monotonic() + DEADLINE
    while server.run(pending) != ["open"]:  # etcd: once its watch has brought the changes
        assert time.monotonic() < deadline, server.run(pending)
        time.sleep(0.01)
    assert server.run(server.store.next_timeout_ns) == open_due
