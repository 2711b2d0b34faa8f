"""docs/CONTRACT.md through the real gRPC server, once per storage engine (the ``conformance_engine`` fixture).

Rules the store enforces, every row of the error table, and the watch guarantees (checked by
``tests/watchcheck.py``) are written once here and run against every engine in ``conftest.ENGINES``.
Where an engine keeps a promise only in a weaker form, ``EXACT_REVISIONS`` says so and the tests check the
weaker promise (revisions strictly increasing instead of exactly one apart).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from grpcerrors import error_of
from watchcheck import Commit, WatchChecker

from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb
from jobstate.v1 import job_state_service_pb2_grpc as spb_grpc

JS = pb.JobStateType
ES = pb.ExecutionStateType
ET = spb.WatchEventType
# Engines whose revisions are exactly one apart (the contract's "on the embedded store" promise).
EXACT_REVISIONS = frozenset({"memory", "sqlite"})
DEADLINE = 30.0


@pytest.fixture
def stub(conformance_server: Any) -> Iterator[spb_grpc.JobStateServiceStub]:
    with grpc.insecure_channel(conformance_server.target) as channel:
        yield spb_grpc.JobStateServiceStub(channel)


def fails(fn: Callable[[], object]) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return error_of(info.value)


def follows(engine: str, before: int, after: int) -> bool:
    return after == before + 1 if engine in EXACT_REVISIONS else after > before


def execution(node_id: str = "", ref: str = "", state: int = 0, **fields: Any) -> pb.ExecutionState:
    return pb.ExecutionState(node_id=node_id, compute_reference=ref, state=state, **fields)


def head(stub: spb_grpc.JobStateServiceStub) -> int:
    return int(stub.ListJobs(spb.ListJobsRequest(page_size=1)).revision)


# --- rules ----------------------------------------------------------------------------------------------------


def test_counters_cascade_and_history(stub: spb_grpc.JobStateServiceStub, conformance_engine: str) -> None:
    created = stub.CreateJob(spb.CreateJobRequest(job_id="j", timeout=duration_pb2.Duration(seconds=3600)))
    job = created.job
    assert (job.state, job.version, job.create_time) == (JS.JOB_STATE_TYPE_NEW, 1, job.update_time)
    assert job.timeout_at.ToNanoseconds() == job.create_time.ToNanoseconds() + 3600 * 10**9
    revisions = [created.revision]
    writes: list[Callable[[], Any]] = [
        lambda: stub.CreateExecution(spb.CreateExecutionRequest(job_id="j", execution=execution("n1", "e1"))),
        lambda: stub.CreateExecution(spb.CreateExecutionRequest(job_id="j", execution=execution("n2", "e2"))),
        lambda: stub.UpdateExecution(
            spb.UpdateExecutionRequest(
                job_id="j",
                compute_reference="e2",
                execution=execution(state=ES.EXECUTION_STATE_TYPE_FAILED, status="boom"),
                update_mask=field_mask_pb2.FieldMask(paths=["state"]),
            )
        ),
        lambda: stub.UpdateJobState(
            spb.UpdateJobStateRequest(
                job_id="j",
                new_state=JS.JOB_STATE_TYPE_IN_PROGRESS,
                condition=spb.JobCondition(expected_state=JS.JOB_STATE_TYPE_NEW, expected_version=4),
            )
        ),
        lambda: stub.UpdateJobState(
            spb.UpdateJobStateRequest(job_id="j", new_state=JS.JOB_STATE_TYPE_COMPLETED, comment="all done")
        ),
    ]
    for version, write in enumerate(writes, start=2):
        r = write()
        assert r.job.version == version
        assert follows(conformance_engine, revisions[-1], r.revision), (revisions, r.revision)
        assert r.job.create_time == job.create_time
        assert r.job.update_time.ToNanoseconds() > job.update_time.ToNanoseconds()
        revisions.append(r.revision)
        job = r.job
    # e2's mask kept its status; the cascade cancelled e1 (not the failed e2) in the same change.
    e1, e2 = job.executions
    assert (e2.state, e2.status, e2.version) == (ES.EXECUTION_STATE_TYPE_FAILED, "", 2)
    assert (e1.state, e1.status, e1.version) == (ES.EXECUTION_STATE_TYPE_CANCELLED, "all done", 2)
    got = stub.GetJob(spb.GetJobRequest(job_id="j"))
    assert (got.job, got.revision) == (job, revisions[-1])

    entries = stub.GetJobHistory(spb.GetJobHistoryRequest(job_id="j")).entries
    assert [(e.revision, e.version) for e in entries] == list(zip(revisions, range(1, 7), strict=True))
    assert entries[-1].comment == "all done"
    assert (entries[-1].job_state.previous_state, entries[-1].job_state.new_state) == (
        JS.JOB_STATE_TYPE_IN_PROGRESS,
        JS.JOB_STATE_TYPE_COMPLETED,
    )
    assert [(c.compute_reference, c.new_state) for c in entries[-1].cancelled_executions] == [
        ("e1", ES.EXECUTION_STATE_TYPE_CANCELLED)
    ]
    assert entries[3].execution_state.compute_reference == "e2"
    first = stub.GetJobHistory(spb.GetJobHistoryRequest(job_id="j", page_size=4))
    rest = stub.GetJobHistory(spb.GetJobHistoryRequest(job_id="j", page_token=first.next_page_token))
    assert [*first.entries, *rest.entries] == list(entries)
    assert not rest.next_page_token


def test_list_order_filters_and_delete(stub: spb_grpc.JobStateServiceStub, conformance_engine: str) -> None:
    for job_id in ("c", "a", "b"):
        stub.CreateJob(spb.CreateJobRequest(job_id=job_id))
    stub.CreateExecution(spb.CreateExecutionRequest(job_id="a", execution=execution("n9")))
    stub.UpdateJobState(spb.UpdateJobStateRequest(job_id="b", new_state=JS.JOB_STATE_TYPE_QUEUED))
    page = stub.ListJobs(spb.ListJobsRequest(page_size=2))
    rest = stub.ListJobs(spb.ListJobsRequest(page_size=2, page_token=page.next_page_token))
    assert [j.job_id for j in [*page.jobs, *rest.jobs]] == ["c", "a", "b"]  # by create_time, not by id
    assert [j.job_id for j in stub.ListJobs(spb.ListJobsRequest(node_id="n9")).jobs] == ["a"]
    assert [j.job_id for j in stub.ListJobs(spb.ListJobsRequest(states=[JS.JOB_STATE_TYPE_QUEUED])).jobs] == ["b"]

    before = stub.GetJob(spb.GetJobRequest(job_id="a"))
    deleted = stub.DeleteJob(spb.DeleteJobRequest(job_id="a", expected_version=2))
    assert deleted.job == before.job
    assert follows(conformance_engine, before.revision, deleted.revision)
    assert fails(lambda: stub.GetJobHistory(spb.GetJobHistoryRequest(job_id="a")))[1] == "JOB_NOT_FOUND"
    again = stub.CreateJob(spb.CreateJobRequest(job_id="a"))
    assert again.job.version == 1
    assert [e.revision for e in stub.GetJobHistory(spb.GetJobHistoryRequest(job_id="a")).entries] == [again.revision]
    assert [j.job_id for j in stub.ListJobs(spb.ListJobsRequest()).jobs] == ["c", "b", "a"]


def test_compare_and_set_has_one_winner(stub: spb_grpc.JobStateServiceStub) -> None:
    stub.CreateJob(spb.CreateJobRequest(job_id="race"))
    condition = spb.JobCondition(expected_version=1)
    barrier = threading.Barrier(8, timeout=DEADLINE)

    def attempt(i: int) -> str:
        barrier.wait()
        try:
            stub.UpdateJobState(
                spb.UpdateJobStateRequest(
                    job_id="race", new_state=JS.JOB_STATE_TYPE_QUEUED, condition=condition, comment=str(i)
                )
            )
            return "won"
        except grpc.RpcError as exc:
            code, reason, metadata = error_of(exc)
            assert (code, reason, metadata["current_version"]) == (grpc.StatusCode.ABORTED, "VERSION_MISMATCH", "2")
            return "lost"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(attempt, range(8)))
    assert sorted(outcomes) == ["lost"] * 7 + ["won"]
    assert stub.GetJob(spb.GetJobRequest(job_id="race")).job.version == 2


# --- the error table ------------------------------------------------------------------------------------------

Row = tuple[str, Callable[[spb_grpc.JobStateServiceStub], object], grpc.StatusCode, str, dict[str, str]]
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
ERROR_ROWS: list[Row] = [
    ("missing id", lambda s: s.GetJob(spb.GetJobRequest(job_id="")), INVALID, "INVALID_ARGUMENT", {}),
    ("overlong id", lambda s: s.CreateJob(spb.CreateJobRequest(job_id="x" * 129)), INVALID, "INVALID_ARGUMENT", {}),
    (
        "unknown enum",
        lambda s: s.UpdateJobState(spb.UpdateJobStateRequest(job_id="j", new_state=99)),  # type: ignore[arg-type]
        INVALID,
        "INVALID_ARGUMENT",
        {},
    ),
    (
        "new_state unset",
        lambda s: s.UpdateJobState(spb.UpdateJobStateRequest(job_id="j")),
        INVALID,
        "INVALID_ARGUMENT",
        {},
    ),
    ("negative page", lambda s: s.ListJobs(spb.ListJobsRequest(page_size=-1)), INVALID, "INVALID_ARGUMENT", {}),
    (
        "no such job",
        lambda s: s.GetJob(spb.GetJobRequest(job_id="nope")),
        grpc.StatusCode.NOT_FOUND,
        "JOB_NOT_FOUND",
        {},
    ),
    (
        "no such execution",
        lambda s: s.UpdateExecution(
            spb.UpdateExecutionRequest(job_id="j", compute_reference="nope", execution=execution(status="x"))
        ),
        grpc.StatusCode.NOT_FOUND,
        "EXECUTION_NOT_FOUND",
        {},
    ),
    (
        "job id taken",
        lambda s: s.CreateJob(spb.CreateJobRequest(job_id="j")),
        grpc.StatusCode.ALREADY_EXISTS,
        "JOB_ALREADY_EXISTS",
        {},
    ),
    (
        "execution id taken",
        lambda s: s.CreateExecution(spb.CreateExecutionRequest(job_id="j", execution=execution("n5", "e1"))),
        grpc.StatusCode.ALREADY_EXISTS,
        "EXECUTION_ALREADY_EXISTS",
        {},
    ),
    (
        "job version",
        lambda s: s.UpdateJobState(
            spb.UpdateJobStateRequest(
                job_id="j", new_state=JS.JOB_STATE_TYPE_QUEUED, condition=spb.JobCondition(expected_version=1)
            )
        ),
        grpc.StatusCode.ABORTED,
        "VERSION_MISMATCH",
        {"current_version": "4"},
    ),
    (
        "delete version",
        lambda s: s.DeleteJob(spb.DeleteJobRequest(job_id="j", expected_version=3)),
        grpc.StatusCode.ABORTED,
        "VERSION_MISMATCH",
        {"current_version": "4"},
    ),
    (
        "execution version",
        lambda s: s.UpdateExecution(
            spb.UpdateExecutionRequest(
                job_id="j",
                compute_reference="e1",
                execution=execution(status="x"),
                condition=spb.ExecutionCondition(expected_version=7),
            )
        ),
        grpc.StatusCode.ABORTED,
        "VERSION_MISMATCH",
        {"current_version": "1"},
    ),
    (
        "expected state",
        lambda s: s.UpdateJobState(
            spb.UpdateJobStateRequest(
                job_id="j",
                new_state=JS.JOB_STATE_TYPE_QUEUED,
                condition=spb.JobCondition(expected_state=JS.JOB_STATE_TYPE_IN_PROGRESS),
            )
        ),
        PRECONDITION,
        "STATE_MISMATCH",
        {},
    ),
    (
        "unexpected execution state",
        lambda s: s.UpdateExecution(
            spb.UpdateExecutionRequest(
                job_id="j",
                compute_reference="e1",
                execution=execution(status="x"),
                condition=spb.ExecutionCondition(unexpected_states=[ES.EXECUTION_STATE_TYPE_NEW]),
            )
        ),
        PRECONDITION,
        "STATE_MISMATCH",
        {},
    ),
    (
        "terminal job",
        lambda s: s.UpdateJobState(spb.UpdateJobStateRequest(job_id="done", new_state=JS.JOB_STATE_TYPE_QUEUED)),
        PRECONDITION,
        "JOB_TERMINAL",
        {},
    ),
    (
        "execution on a terminal job",
        lambda s: s.CreateExecution(spb.CreateExecutionRequest(job_id="done", execution=execution("n1"))),
        PRECONDITION,
        "JOB_TERMINAL",
        {},
    ),
    (
        "terminal execution",
        lambda s: s.UpdateExecution(
            spb.UpdateExecutionRequest(job_id="j", compute_reference="e2", execution=execution(status="x"))
        ),
        PRECONDITION,
        "EXECUTION_TERMINAL",
        {},
    ),
    (
        "active execution on the node",
        lambda s: s.CreateExecution(spb.CreateExecutionRequest(job_id="j", execution=execution("n1"))),
        PRECONDITION,
        "NODE_HAS_ACTIVE_EXECUTION",
        {},
    ),
]


def test_error_rows_change_nothing(stub: spb_grpc.JobStateServiceStub) -> None:
    stub.CreateJob(spb.CreateJobRequest(job_id="j"))
    stub.CreateExecution(spb.CreateExecutionRequest(job_id="j", execution=execution("n1", "e1")))
    stub.CreateExecution(
        spb.CreateExecutionRequest(job_id="j", execution=execution("n2", "e2", ES.EXECUTION_STATE_TYPE_BID_REJECTED))
    )
    stub.UpdateJobState(spb.UpdateJobStateRequest(job_id="j", new_state=JS.JOB_STATE_TYPE_QUEUED))
    stub.CreateJob(spb.CreateJobRequest(job_id="done"))
    stub.UpdateJobState(spb.UpdateJobStateRequest(job_id="done", new_state=JS.JOB_STATE_TYPE_CANCELLED))
    before = stub.ListJobs(spb.ListJobsRequest())
    for name, call, code, reason, metadata in ERROR_ROWS:
        got_code, got_reason, got_metadata = fails(lambda call=call: call(stub))  # type: ignore[misc]
        assert (got_code, got_reason) == (code, reason), name
        assert metadata.items() <= got_metadata.items(), (name, got_metadata)
    assert stub.ListJobs(spb.ListJobsRequest()) == before  # same jobs, same revision


def test_watch_from_a_compacted_revision(make_server: Callable[..., Any], conformance_engine: str) -> None:
    server = make_server(engine=conformance_engine, history_size=4)
    with grpc.insecure_channel(server.target) as channel:
        stub = spb_grpc.JobStateServiceStub(channel)
        revisions = [stub.CreateJob(spb.CreateJobRequest(job_id=f"j{i}")).revision for i in range(8)]
        stream = stub.Watch(spb.WatchRequest(start_revision=revisions[0]), timeout=DEADLINE)
        code, reason, metadata = fails(lambda: next(stream))
        assert (code, reason) == (grpc.StatusCode.OUT_OF_RANGE, "REVISION_COMPACTED")
        oldest = int(metadata["oldest_revision"])
        assert revisions[0] < oldest <= revisions[-1]
        stream = stub.Watch(spb.WatchRequest(start_revision=oldest), timeout=DEADLINE)
        got = [e.revision for e in next(stream).events]
        stream.cancel()
        assert got[0] == oldest
        assert set(got) <= set(revisions)


def test_timeout_moves_the_job_to_error_and_watchers_see_it(stub: spb_grpc.JobStateServiceStub) -> None:
    start = head(stub) + 1
    stream = stub.Watch(spb.WatchRequest(job_ids=["t"], start_revision=start), timeout=DEADLINE)
    created = stub.CreateJob(spb.CreateJobRequest(job_id="t", timeout=duration_pb2.Duration(nanos=100_000_000)))
    seen: list[spb.WatchEvent] = []
    for response in stream:
        seen.extend(response.events)
        if seen and seen[-1].job.state == JS.JOB_STATE_TYPE_ERROR:
            break
    stream.cancel()
    assert [(e.type, e.job.version) for e in seen] == [
        (ET.WATCH_EVENT_TYPE_CREATED, 1),
        (ET.WATCH_EVENT_TYPE_UPDATED, 2),
    ]
    assert seen[0].revision == created.revision
    assert seen[1].job == stub.GetJob(spb.GetJobRequest(job_id="t")).job
    history = stub.GetJobHistory(spb.GetJobHistoryRequest(job_id="t")).entries
    assert (history[-1].comment, history[-1].job_state.new_state) == ("timed out", JS.JOB_STATE_TYPE_ERROR)


def test_watch_ends_with_shutting_down(conformance_server: Any) -> None:
    with grpc.insecure_channel(conformance_server.target) as channel:
        stub = spb_grpc.JobStateServiceStub(channel)
        stream = stub.Watch(spb.WatchRequest(send_initial_state=True), timeout=DEADLINE)
        assert next(stream).events[-1].type == ET.WATCH_EVENT_TYPE_BOOKMARK
        conformance_server.stop()
        code, reason, _ = fails(lambda: list(stream))
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")


# --- the watch guarantees -------------------------------------------------------------------------------------


class Watcher(threading.Thread):
    """Reads one watch (and its resumes) on its own thread, into a WatchChecker, until ``until`` is covered."""

    def __init__(
        self, stub: spb_grpc.JobStateServiceStub, checker: WatchChecker, request: spb.WatchRequest, stop_after: int = 0
    ) -> None:
        super().__init__(name=checker.name, daemon=True)
        self.stub, self.checker, self.request = stub, checker, request
        self.stop_after = stop_after  # events after which the first stream is dropped and resumed
        self.until: int | None = None
        self.ready = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        request.progress_interval.FromMilliseconds(20)  # bookmarks carry filtered watchers up to the head

    def covered(self) -> int:
        return self.checker.next_revision - 1

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.error = exc
        finally:
            self.ready.set()
            self.done.set()

    def _run(self) -> None:
        request = self.request
        self.checker.begin(request.start_revision, initial_state=request.send_initial_state)
        resumed = False
        while True:
            stream = self.stub.Watch(request, timeout=DEADLINE)
            for response in stream:
                self.checker.observe(response)
                self.ready.set()  # the first response: the watch is registered at the server
                if self.until is not None and self.covered() >= self.until:
                    stream.cancel()
                    return
                if self.stop_after and not resumed and len(self.checker.live_events()) >= self.stop_after:
                    stream.cancel()
                    break
            resumed = True
            request = spb.WatchRequest(
                job_ids=request.job_ids, node_id=request.node_id, start_revision=self.checker.next_revision
            )
            request.progress_interval.FromMilliseconds(20)
            self.checker.begin(request.start_revision)


def workload(stub: spb_grpc.JobStateServiceStub, writer: int, jobs: int) -> list[Commit]:
    """One writer's changes: jobs with executions on three nodes, retries, cascades and deletes."""
    commits: list[Commit] = []
    for i in range(jobs):
        job_id = f"w{writer}-{i}"
        node = f"n{i % 3}"
        commits.append(Commit.of(stub.CreateJob(spb.CreateJobRequest(job_id=job_id))))
        r = stub.CreateExecution(spb.CreateExecutionRequest(job_id=job_id, execution=execution(node)))
        commits.append(Commit.of(r))
        ref = r.execution.compute_reference
        for state in (ES.EXECUTION_STATE_TYPE_ASK_FOR_BID, ES.EXECUTION_STATE_TYPE_FAILED):
            commits.append(
                Commit.of(
                    stub.UpdateExecution(
                        spb.UpdateExecutionRequest(
                            job_id=job_id, compute_reference=ref, execution=execution(state=state)
                        )
                    )
                )
            )
        retry = spb.CreateExecutionRequest(job_id=job_id, execution=execution(node))
        commits.append(Commit.of(stub.CreateExecution(retry)))
        final = JS.JOB_STATE_TYPE_COMPLETED if i % 2 else JS.JOB_STATE_TYPE_CANCELLED
        commits.append(Commit.of(stub.UpdateJobState(spb.UpdateJobStateRequest(job_id=job_id, new_state=final))))
        if i % 3 == 0:
            commits.append(Commit.of(stub.DeleteJob(spb.DeleteJobRequest(job_id=job_id)), deleted=True))
    return commits


def test_watch_guarantees_under_concurrent_writers(stub: spb_grpc.JobStateServiceStub, conformance_engine: str) -> None:
    # Something for the initial snapshots, made before the "all" watcher starts (so it never sees it).
    pre = Commit.of(stub.CreateJob(spb.CreateJobRequest(job_id="before")))
    watchers = [
        Watcher(stub, WatchChecker("all"), spb.WatchRequest(start_revision=head(stub) + 1)),
        Watcher(stub, WatchChecker("from-1-resumed"), spb.WatchRequest(start_revision=1), stop_after=40),
        Watcher(stub, WatchChecker("initial"), spb.WatchRequest(send_initial_state=True)),
        Watcher(
            stub,
            WatchChecker("node-n1", node_id="n1"),
            spb.WatchRequest(node_id="n1", send_initial_state=True),
        ),
        Watcher(
            stub,
            WatchChecker("jobs", job_ids=frozenset({"w0-1", "w1-2", "w2-3"})),
            spb.WatchRequest(job_ids=["w0-1", "w1-2", "w2-3"], start_revision=head(stub) + 1),
            stop_after=4,
        ),
    ]
    for w in watchers:
        w.start()
    for w in watchers:
        assert w.ready.wait(DEADLINE), w.name
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda n: workload(stub, n, 12), range(3)))
    commits = [c for r in results for c in r]
    final = stub.ListJobs(spb.ListJobsRequest(page_size=1000))
    assert final.revision == max(c.revision for c in commits)
    if conformance_engine in EXACT_REVISIONS:
        assert sorted(c.revision for c in commits) == list(range(pre.revision + 1, final.revision + 1))
    for w in watchers:
        w.until = final.revision
    for w in watchers:
        assert w.done.wait(DEADLINE), f"{w.name} did not reach revision {final.revision}"
        assert w.error is None, f"{w.name}: {w.error!r}"
    for w in watchers:
        checked = w.checker.check_complete([pre, *commits])
        assert checked > 0, w.name
        w.checker.check_snapshot(j for j in final.jobs if w.name != "all" or j.job_id != "before")
    assert len(watchers[0].checker.live_events()) == len(commits)
    # The first change of a fresh server (revision 1, except on an etcd shared with earlier writes).
    assert watchers[1].checker.live_events()[0].revision == pre.revision
