"""jobstate servers on real etcd servers: restarts, several servers on one etcd, races, etcd going away.

Every etcd here is a real one on free loopback ports (tests/etcd/etcd_server.py); every jobstate server a real
gRPC server (tests/conftest.py ``make_server``); every call a real gRPC call with a deadline.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from grpcerrors import error_of
from watchcheck import Commit, WatchChecker

from etcd.etcd_server import EtcdServer, unique_prefix
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb
from jobstate.v1 import job_state_service_pb2_grpc as spb_grpc

JS = pb.JobStateType
ES = pb.ExecutionStateType
ET = spb.WatchEventType
DEADLINE = 30.0
Stub = spb_grpc.JobStateServiceStub


@contextmanager
def connect(server: Any) -> Iterator[Stub]:
    with grpc.insecure_channel(server.target) as channel:
        yield spb_grpc.JobStateServiceStub(channel)


def on_etcd(make_server: Callable[..., Any], etcd: EtcdServer, prefix: str) -> Any:
    return make_server(store="etcd", etcd_endpoints=(etcd.endpoint,), etcd_prefix=prefix)


def fails(fn: Callable[[], object]) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return error_of(info.value)


def execution(node_id: str = "", ref: str = "", state: int = 0) -> pb.ExecutionState:
    return pb.ExecutionState(node_id=node_id, compute_reference=ref, state=state)  # type: ignore[arg-type]


def head(stub: Stub) -> int:
    return stub.ListJobs(spb.ListJobsRequest(page_size=1), timeout=DEADLINE).revision


def changes_of(stub: Stub, job_id: str, node: str = "n1") -> list[Commit]:
    """A job's life: created, an execution that fails, a retry, completed."""
    commits = [Commit.of(stub.CreateJob(spb.CreateJobRequest(job_id=job_id), timeout=DEADLINE))]
    r = stub.CreateExecution(spb.CreateExecutionRequest(job_id=job_id, execution=execution(node)), timeout=DEADLINE)
    commits.append(Commit.of(r))
    update = spb.UpdateExecutionRequest(
        job_id=job_id,
        compute_reference=r.execution.compute_reference,
        execution=execution(state=ES.EXECUTION_STATE_TYPE_FAILED),
    )
    commits.append(Commit.of(stub.UpdateExecution(update, timeout=DEADLINE)))
    retry = spb.CreateExecutionRequest(job_id=job_id, execution=execution(node))
    commits.append(Commit.of(stub.CreateExecution(retry, timeout=DEADLINE)))
    done = spb.UpdateJobStateRequest(job_id=job_id, new_state=JS.JOB_STATE_TYPE_COMPLETED)
    commits.append(Commit.of(stub.UpdateJobState(done, timeout=DEADLINE)))
    return commits


def read_until(stream: Any, checker: WatchChecker, until: int, *, cancel: bool = True) -> None:
    """Feeds ``stream`` to ``checker`` until everything up to ``until`` is covered (the stream's deadline bounds it)."""
    for response in stream:
        checker.observe(response)
        if checker.next_revision > until:
            if cancel:
                stream.cancel()
            return
    raise AssertionError(f"[{checker.name}] stream ended before revision {until}")


def watch(stub: Stub, checker: WatchChecker, **fields: Any) -> Any:
    request = spb.WatchRequest(**fields)
    request.progress_interval.FromMilliseconds(50)
    checker.begin(request.start_revision, initial_state=request.send_initial_state)
    return stub.Watch(request, timeout=DEADLINE)


def wait_until_serving(stub: Stub, job_id: str, limit: float = DEADLINE) -> spb.GetJobResponse:
    """GetJob until it stops failing with UNAVAILABLE (etcd coming back); bounded by ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while True:
        try:
            return stub.GetJob(spb.GetJobRequest(job_id=job_id), timeout=5)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:  # type: ignore[attr-defined]
                raise
        time.sleep(0.1)  # a retry interval for a call, not a wait for an event


def test_restart_on_etcd_loses_nothing(make_server: Callable[..., Any], etcd_server: EtcdServer) -> None:
    prefix = unique_prefix()
    first = on_etcd(make_server, etcd_server, prefix)
    checker = WatchChecker("resumed-across-restart")
    with connect(first) as stub:
        start = head(stub) + 1
        stream = watch(stub, checker, start_revision=start)
        before = changes_of(stub, "a") + changes_of(stub, "b", "n2")
        read_until(stream, checker, before[-1].revision)
        history = stub.GetJobHistory(spb.GetJobHistoryRequest(job_id="a"), timeout=DEADLINE).entries
        listed = stub.ListJobs(spb.ListJobsRequest(), timeout=DEADLINE).jobs
        # Changes the watcher has not read when the server goes away.
        unread = [Commit.of(stub.CreateJob(spb.CreateJobRequest(job_id="c"), timeout=DEADLINE))]
    first.stop()

    second = on_etcd(make_server, etcd_server, prefix)
    with connect(second) as stub:
        assert stub.GetJobHistory(spb.GetJobHistoryRequest(job_id="a"), timeout=DEADLINE).entries == history
        assert [h.revision for h in history] == [c.revision for c in before[:5]]
        jobs = stub.ListJobs(spb.ListJobsRequest(), timeout=DEADLINE).jobs
        assert [j.job_id for j in jobs] == ["a", "b", "c"]
        assert list(jobs[:2]) == list(listed)
        after = changes_of(stub, "d")
        stream = watch(stub, checker, start_revision=checker.next_revision)
        read_until(stream, checker, after[-1].revision)
        # Revisions continue where they stopped.
        assert after[0].revision > unread[0].revision > before[-1].revision
    assert checker.check_complete([*before, *unread, *after]) == len(before) + len(unread) + len(after)


def test_two_servers_one_etcd_watchers_on_both(make_server: Callable[..., Any], etcd_server: EtcdServer) -> None:
    prefix = unique_prefix()
    one, two = on_etcd(make_server, etcd_server, prefix), on_etcd(make_server, etcd_server, prefix)
    with connect(one) as s1, connect(two) as s2:
        pre = Commit.of(s1.CreateJob(spb.CreateJobRequest(job_id="before"), timeout=DEADLINE))
        start = head(s2) + 1
        watchers = [
            (WatchChecker("one-all"), s1, {"start_revision": start}),
            (WatchChecker("two-all"), s2, {"start_revision": start}),
            (WatchChecker("two-initial"), s2, {"send_initial_state": True}),
            (WatchChecker("two-node-n2", node_id="n2"), s2, {"node_id": "n2", "start_revision": start}),
            (WatchChecker("one-jobs", job_ids=frozenset({"w1", "w4"})), s1, {"job_ids": ["w1", "w4"]}),
        ]
        streams = [watch(stub, checker, **fields) for checker, stub, fields in watchers]
        # Writes go through server one only, from three threads at once.
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda i: changes_of(s1, f"w{i}", f"n{i % 3}"), range(6)))
        commits = [c for r in results for c in r]
        last = max(c.revision for c in commits)
        for (checker, _, _), stream in zip(watchers, streams, strict=True):
            read_until(stream, checker, last)
        for checker, _, _ in watchers:
            assert checker.check_complete([pre, *commits]) > 0, checker.name
        # Both servers delivered the same changes with the same revisions.
        seen_one = [(e.revision, e.job_id, e.version) for e in watchers[0][0].live_events()]
        seen_two = [(e.revision, e.job_id, e.version) for e in watchers[1][0].live_events()]
        assert seen_one == seen_two == sorted((c.revision, c.job_id, c.version) for c in commits)
        assert s2.GetJob(spb.GetJobRequest(job_id="w5"), timeout=DEADLINE).job == (
            s1.GetJob(spb.GetJobRequest(job_id="w5"), timeout=DEADLINE).job
        )


def test_compare_and_set_across_two_servers_has_one_winner(
    make_server: Callable[..., Any], etcd_server: EtcdServer
) -> None:
    prefix = unique_prefix()
    one, two = on_etcd(make_server, etcd_server, prefix), on_etcd(make_server, etcd_server, prefix)
    with connect(one) as s1, connect(two) as s2:
        stubs = [s1, s2]
        for round_ in range(5):
            job_id = f"race{round_}"
            version = s1.CreateJob(spb.CreateJobRequest(job_id=job_id), timeout=DEADLINE).job.version
            barrier = threading.Barrier(8)

            def cas(i: int, job_id: str = job_id, version: int = version, barrier: threading.Barrier = barrier) -> Any:
                request = spb.UpdateJobStateRequest(
                    job_id=job_id,
                    new_state=JS.JOB_STATE_TYPE_IN_PROGRESS,
                    condition=spb.JobCondition(expected_version=version),
                    comment=f"writer {i}",
                )
                barrier.wait(DEADLINE)
                try:
                    return stubs[i % 2].UpdateJobState(request, timeout=DEADLINE)
                except grpc.RpcError as exc:
                    return error_of(exc)

            with ThreadPoolExecutor(8) as pool:
                outcomes = list(pool.map(cas, range(8)))
            winners = [o for o in outcomes if isinstance(o, spb.UpdateJobStateResponse)]
            losers = [o for o in outcomes if not isinstance(o, spb.UpdateJobStateResponse)]
            assert len(winners) == 1, outcomes
            assert {(code, reason) for code, reason, _ in losers} == {(grpc.StatusCode.ABORTED, "VERSION_MISMATCH")}
            assert {meta["current_version"] for _, _, meta in losers} == {str(version + 1)}
            history = s2.GetJobHistory(spb.GetJobHistoryRequest(job_id=job_id), timeout=DEADLINE).entries
            assert history[1].comment.startswith("writer ")
            assert len(history) == 2
            assert history[1].revision == winners[0].revision

        # One active execution per node holds across servers too.
        barrier = threading.Barrier(6)

        def add(i: int) -> Any:
            request = spb.CreateExecutionRequest(job_id="node-race", execution=execution("n1"))
            barrier.wait(DEADLINE)
            try:
                return stubs[i % 2].CreateExecution(request, timeout=DEADLINE)
            except grpc.RpcError as exc:
                return error_of(exc)

        s2.CreateJob(spb.CreateJobRequest(job_id="node-race"), timeout=DEADLINE)
        with ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(add, range(6)))
        assert sum(isinstance(o, spb.CreateExecutionResponse) for o in outcomes) == 1, outcomes
        assert {o[1] for o in outcomes if isinstance(o, tuple)} == {"NODE_HAS_ACTIVE_EXECUTION"}
        assert len(s1.GetJob(spb.GetJobRequest(job_id="node-race"), timeout=DEADLINE).job.executions) == 1


def test_timeouts_expire_once_with_a_sweeper_on_every_server(
    make_server: Callable[..., Any], etcd_server: EtcdServer
) -> None:
    prefix = unique_prefix()
    one, two = on_etcd(make_server, etcd_server, prefix), on_etcd(make_server, etcd_server, prefix)
    with connect(one) as s1, connect(two) as s2:
        checker = WatchChecker("timeouts")
        stream = watch(s2, checker, start_revision=head(s2) + 1)
        short = duration_pb2.Duration(nanos=200_000_000)
        created = [
            Commit.of(s1.CreateJob(spb.CreateJobRequest(job_id=f"t{i}", timeout=short), timeout=DEADLINE))
            for i in range(4)
        ]
        # Server one goes away: server two learned the timeouts from its own watch of etcd and expires them.
        one.stop()
        expired: dict[str, spb.WatchEvent] = {}
        for response in stream:
            checker.observe(response)
            for e in response.events:
                if e.job.state == JS.JOB_STATE_TYPE_ERROR:
                    expired[e.job.job_id] = e
            if len(expired) == 4:
                stream.cancel()
                break
        for i in range(4):
            history = s2.GetJobHistory(spb.GetJobHistoryRequest(job_id=f"t{i}"), timeout=DEADLINE).entries
            assert [(h.version, h.comment) for h in history][1:] == [(2, "timed out")]
        assert checker.check_complete(created, exhaustive=False) >= 4

    # Both servers sweeping: each job still times out exactly once.
    three, four = on_etcd(make_server, etcd_server, prefix), on_etcd(make_server, etcd_server, prefix)
    with connect(three) as s3, connect(four) as s4:
        stream = s4.Watch(spb.WatchRequest(job_ids=[f"u{i}" for i in range(6)]), timeout=DEADLINE)
        for i in range(6):
            (s3 if i % 2 else s4).CreateJob(spb.CreateJobRequest(job_id=f"u{i}", timeout=short), timeout=DEADLINE)
        errors: list[str] = []
        for response in stream:
            errors += [e.job.job_id for e in response.events if e.job.state == JS.JOB_STATE_TYPE_ERROR]
            if len(errors) == 6:
                stream.cancel()
                break
        assert sorted(errors) == [f"u{i}" for i in range(6)]
        for i in range(6):
            history = s3.GetJobHistory(spb.GetJobHistoryRequest(job_id=f"u{i}"), timeout=DEADLINE).entries
            assert [(h.version, h.comment) for h in history][1:] == [(2, "timed out")]


def test_etcd_restarted_under_a_server(make_server: Callable[..., Any], make_etcd: Callable[..., EtcdServer]) -> None:
    etcd = make_etcd()
    server = on_etcd(make_server, etcd, "/jobstate")
    checker = WatchChecker("across-etcd-restart")
    with connect(server) as stub:
        stream = watch(stub, checker, start_revision=head(stub) + 1)
        before = changes_of(stub, "a")
        read_until(stream, checker, before[-1].revision, cancel=False)
        history = stub.GetJobHistory(spb.GetJobHistoryRequest(job_id="a"), timeout=DEADLINE).entries

        etcd.stop()
        # Meanwhile every call fails with UNAVAILABLE, and so does the open watch stream.
        for call in (
            lambda: stub.GetJob(spb.GetJobRequest(job_id="a"), timeout=DEADLINE),
            lambda: stub.CreateJob(spb.CreateJobRequest(job_id="b"), timeout=DEADLINE),
            lambda: stub.ListJobs(spb.ListJobsRequest(), timeout=DEADLINE),
            lambda: next(stub.Watch(spb.WatchRequest(), timeout=DEADLINE)),
        ):
            code, reason, _ = fails(call)
            assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")
        code, reason, _ = fails(lambda: read_until(stream, checker, before[-1].revision + 1))  # the open stream
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")

        etcd.start()
        assert wait_until_serving(stub, "a").job.version == before[-1].version
        assert stub.GetJobHistory(spb.GetJobHistoryRequest(job_id="a"), timeout=DEADLINE).entries == history
        after = changes_of(stub, "b")
        stream = watch(stub, checker, start_revision=checker.next_revision)
        read_until(stream, checker, after[-1].revision)
    assert checker.check_complete([*before, *after]) == len(before) + len(after)


def test_watch_from_a_revision_etcd_compacted(
    make_server: Callable[..., Any], make_etcd: Callable[..., EtcdServer]
) -> None:
    etcd = make_etcd()
    server = on_etcd(make_server, etcd, "/jobstate")
    with connect(server) as stub:
        revisions = [stub.CreateJob(spb.CreateJobRequest(job_id=f"j{i}"), timeout=DEADLINE).revision for i in range(5)]
        etcd.compact(revisions[3])
        code, reason, meta = fails(lambda: next(stub.Watch(spb.WatchRequest(start_revision=revisions[1]))))
        assert (code, reason, meta) == (
            grpc.StatusCode.OUT_OF_RANGE,
            "REVISION_COMPACTED",
            {"oldest_revision": str(revisions[3])},
        )
        response = next(stub.Watch(spb.WatchRequest(start_revision=revisions[3]), timeout=DEADLINE))
        assert next(e.revision for e in response.events) == revisions[3]


def test_revisions_on_a_shared_etcd_increase_with_gaps(
    make_server: Callable[..., Any], etcd_server: EtcdServer
) -> None:
    """The weaker promise on a shared etcd: strictly increasing, not one apart; watchers see only jobs."""
    server = on_etcd(make_server, etcd_server, unique_prefix())
    with connect(server) as stub:
        checker = WatchChecker("gaps")
        stream = watch(stub, checker, start_revision=head(stub) + 1)
        commits = []
        for i in range(4):
            commits.append(Commit.of(stub.CreateJob(spb.CreateJobRequest(job_id=f"g{i}"), timeout=DEADLINE)))
            etcd_server.put(b"/some-other-program/key", str(i).encode())  # another user of the same etcd
        revisions = [c.revision for c in commits]
        assert revisions == sorted(set(revisions))
        assert all(b - a == 2 for a, b in itertools.pairwise(revisions))
        read_until(stream, checker, revisions[-1])
        assert checker.check_complete(commits) == 4
        assert [e.revision for e in checker.live_events()] == revisions


def test_a_watcher_that_does_not_read_misses_nothing(make_server: Callable[..., Any], etcd_server: EtcdServer) -> None:
    server = on_etcd(make_server, etcd_server, unique_prefix())
    with connect(server) as stub:
        checker = WatchChecker("slow")
        stream = watch(stub, checker, start_revision=head(stub) + 1)
        # Megabytes of events nobody reads: every buffer on the way fills and flow control holds etcd back.
        status = "x" * 4000
        commits = []
        for i in range(200):
            commits.append(Commit.of(stub.CreateJob(spb.CreateJobRequest(job_id=f"s{i}"), timeout=DEADLINE)))
            request = spb.CreateExecutionRequest(
                job_id=f"s{i}", execution=pb.ExecutionState(node_id="n1", status=status)
            )
            commits.append(Commit.of(stub.CreateExecution(request, timeout=DEADLINE)))
        # The writes completed while nobody read the stream; now it catches up with nothing lost.
        read_until(stream, checker, commits[-1].revision)
    assert checker.check_complete(commits) == 400


def test_watchers_on_one_server_share_its_etcd_watch(
    make_server: Callable[..., Any], make_etcd: Callable[..., EtcdServer]
) -> None:
    """A server keeps one etcd watch and fans it out; only a watcher starting before what it holds costs etcd one."""
    etcd = make_etcd()
    with connect(on_etcd(make_server, etcd, "/jobstate")) as stub:
        early = changes_of(stub, "early")  # before the second server starts following
    server = on_etcd(make_server, etcd, "/jobstate")
    with connect(server) as stub:
        baseline = etcd.watchers()
        start = head(stub) + 1
        specs: list[tuple[WatchChecker, dict[str, Any]]] = [
            (WatchChecker(f"all-{i}"), {"start_revision": start}) for i in range(10)
        ]
        specs += [(WatchChecker(f"job-{i}", job_ids=frozenset({"x"})), {"job_ids": ["x"]}) for i in range(10)]
        specs += [
            (WatchChecker(f"node-{i}", node_id="n1"), {"node_id": "n1", "start_revision": start}) for i in range(10)
        ]
        specs.append((WatchChecker("initial"), {"send_initial_state": True}))
        streams = [watch(stub, checker, **fields) for checker, fields in specs]
        for stream, (checker, _) in zip(streams, specs, strict=True):
            checker.observe(next(stream))  # a bookmark: the stream is established
        assert etcd.watchers() == baseline
        # Resuming before the server started following: served by an etcd watch of its own.
        old = WatchChecker("from-the-start")
        old_stream = watch(stub, old, start_revision=early[0].revision)
        read_until(old_stream, old, early[-1].revision, cancel=False)
        assert etcd.watchers() == baseline + 1

        commits = changes_of(stub, "x")
        for stream, (checker, _) in zip(streams, specs, strict=True):
            read_until(stream, checker, commits[-1].revision)
        read_until(old_stream, old, commits[-1].revision)
    for checker, _ in specs:
        assert checker.check_complete(commits) > 0
    assert old.check_complete([*early, *commits]) == len(early) + len(commits)


def test_a_member_cut_off_from_its_leader_ends_the_watch(
    make_server: Callable[..., Any], etcd_cluster: list[EtcdServer]
) -> None:
    """Without etcd's require-leader, a member that lost its quorum keeps watches open and silent: a watcher
    would wait for ever for changes committed elsewhere. With it, the stream ends and the client resumes."""
    near, *others = etcd_cluster
    server = on_etcd(make_server, near, "/jobstate")
    checker = WatchChecker("partitioned")
    with connect(server) as stub:
        stream = watch(stub, checker, start_revision=head(stub) + 1)
        commits = changes_of(stub, "a")
        read_until(stream, checker, commits[-1].revision, cancel=False)
        for member in others:
            member.stop()  # the member left has no quorum, so no leader
        code, reason, _ = fails(lambda: read_until(stream, checker, commits[-1].revision + 1))
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")
    assert checker.check_complete(commits) == len(commits)
