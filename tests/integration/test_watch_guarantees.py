"""The watch guarantees on a real server under concurrent writers, checked by tests/watchcheck.py.

Writers race on a shared pool of jobs with compare-and-set retries and record every committed change from
their write responses; watchers of every kind (all jobs, one job, one node, resumed, with initial state,
randomly disconnecting, slow) record their streams. Each stream must be ordered, unique, atomic, reliable and
resumable against the list of committed changes.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from watchcheck import Commit, WatchChecker

from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb
from jobstate.v1 import job_state_service_pb2_grpc as spb_grpc

JS = pb.JobStateType
ES = pb.ExecutionStateType
TERMINAL_JOB = {JS.JOB_STATE_TYPE_COMPLETED, JS.JOB_STATE_TYPE_ERROR, JS.JOB_STATE_TYPE_CANCELLED}
TERMINAL_EXEC = {
    ES.EXECUTION_STATE_TYPE_ASK_FOR_BID_REJECTED,
    ES.EXECUTION_STATE_TYPE_BID_REJECTED,
    ES.EXECUTION_STATE_TYPE_COMPLETED,
    ES.EXECUTION_STATE_TYPE_FAILED,
    ES.EXECUTION_STATE_TYPE_CANCELLED,
}
NODES = ["n0", "n1", "n2", "n3"]
READ_TIMEOUT = 10.0  # a bound against hanging, never a timing assertion
PROGRESS = duration_pb2.Duration(nanos=50_000_000)


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, err
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.domain == "jobstate"
    return info


@dataclass
class Run:
    """What the writers committed, shared with the watchers."""

    commits: list[Commit] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    warmed_up: asyncio.Event = field(default_factory=asyncio.Event)  # some history exists
    final_revision: int = 0
    refused: dict[str, int] = field(default_factory=dict)

    def record(self, response: Any, deleted: bool = False) -> None:
        self.commits.append(Commit.of(response, deleted=deleted))
        if len(self.commits) >= 50:
            self.warmed_up.set()

    def finished(self, checker: WatchChecker) -> bool:
        return self.done.is_set() and checker.next_revision > self.final_revision


# --- writers --------------------------------------------------------------------------------------------------


async def one_op(stub: spb_grpc.JobStateServiceStub, run: Run, rng: random.Random, job_id: str, big: int = 0) -> None:
    """One logical operation with compare-and-set retries on version conflicts."""
    for _ in range(20):
        try:
            try:
                job = (await stub.GetJob(spb.GetJobRequest(job_id=job_id))).job
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                run.record(await stub.CreateJob(spb.CreateJobRequest(job_id=job_id)))
                return
            v = job.version
            if job.state in TERMINAL_JOB:
                run.record(await stub.DeleteJob(spb.DeleteJobRequest(job_id=job_id, expected_version=v)), True)
                return
            open_execs = [e for e in job.executions if e.state not in TERMINAL_EXEC]
            r = rng.random()
            if r < 0.3 or (r < 0.7 and not open_execs):
                e = pb.ExecutionState(node_id=rng.choice(NODES))
                if big:
                    e.run_output.stdout = "x" * big
                run.record(await stub.CreateExecution(spb.CreateExecutionRequest(job_id=job_id, execution=e)))
            elif r < 0.7:
                target = rng.choice(open_execs)
                new = rng.choice(
                    [
                        ES.EXECUTION_STATE_TYPE_ASK_FOR_BID,
                        ES.EXECUTION_STATE_TYPE_BID_ACCEPTED,
                        ES.EXECUTION_STATE_TYPE_COMPLETED,
                        ES.EXECUTION_STATE_TYPE_FAILED,
                    ]
                )
                req = spb.UpdateExecutionRequest(
                    job_id=job_id,
                    compute_reference=target.compute_reference,
                    execution=pb.ExecutionState(state=new, status=f"by {rng.random():.3f}"),
                    condition=spb.ExecutionCondition(expected_version=target.version),
                )
                run.record(await stub.UpdateExecution(req))
            else:
                final = r > 0.93
                state = rng.choice(sorted(TERMINAL_JOB)) if final else rng.choice([JS.JOB_STATE_TYPE_QUEUED, 2])
                req2 = spb.UpdateJobStateRequest(
                    job_id=job_id, new_state=state, condition=spb.JobCondition(expected_version=v), comment="w"
                )
                run.record(await stub.UpdateJobState(req2))
            return
        except grpc.aio.AioRpcError as exc:
            reason = error_info(exc).reason
            run.refused[reason] = run.refused.get(reason, 0) + 1
            if exc.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.NOT_FOUND):
                continue  # lost a race: read again and retry
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                return  # the job or node moved on; the operation no longer makes sense
            raise


async def writer(target: str, run: Run, seed: int, ops: int, jobs: list[str], big: int = 0) -> None:
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(target) as ch:
        stub = spb_grpc.JobStateServiceStub(ch)
        for _ in range(ops):
            await one_op(stub, run, rng, rng.choice(jobs), big)


# --- watchers -------------------------------------------------------------------------------------------------


@dataclass
class Watcher:
    checker: WatchChecker
    request: spb.WatchRequest
    disconnect_every: int = 0  # >0: drop the stream after 1..n responses and resume
    slow: float = 0.0
    pause: bool = False  # stop reading after the first response until the writers are done
    lagged: int = 0
    compacted: int = 0
    streams: int = 0


async def watch(target: str, run: Run, w: Watcher, seed: int) -> None:
    rng = random.Random(seed)
    checker = w.checker
    request = spb.WatchRequest()
    request.CopyFrom(w.request)
    options = [("grpc.max_receive_message_length", 64 << 20)]
    if w.slow or w.pause:
        # A small window: the server's writes block early, so the reader truly falls behind.
        options += [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    async with grpc.aio.insecure_channel(target, options=options) as ch:
        stub = spb_grpc.JobStateServiceStub(ch)
        deadline = time.monotonic() + 25
        while not run.finished(checker):
            assert time.monotonic() < deadline, f"{checker.name}: did not catch up"
            checker.begin(request.start_revision, initial_state=request.send_initial_state)
            w.streams += 1
            call = stub.Watch(request)
            budget = rng.randint(1, w.disconnect_every) if w.disconnect_every else -1
            try:
                while not run.finished(checker) and budget != 0:
                    response = await asyncio.wait_for(call.read(), READ_TIMEOUT)
                    assert response is not grpc.aio.EOF, f"{checker.name}: stream ended without a status"
                    checker.observe(response)
                    budget -= 1
                    if w.slow:
                        await asyncio.sleep(w.slow)
                    if w.pause and w.streams == 1:
                        await run.done.wait()
            except grpc.aio.AioRpcError as exc:
                info = error_info(exc)
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    assert info.reason == "WATCHER_LAGGED"
                    checker.lagged(int(info.metadata["resume_revision"]))
                    w.lagged += 1
                elif exc.code() == grpc.StatusCode.OUT_OF_RANGE:
                    assert info.reason == "REVISION_COMPACTED"
                    assert int(info.metadata["oldest_revision"]) > request.start_revision
                    w.compacted += 1
                    request = spb.WatchRequest(
                        job_ids=request.job_ids, node_id=request.node_id, send_initial_state=True
                    )
                    request.progress_interval.CopyFrom(PROGRESS)
                    continue
                else:
                    raise
            finally:
                call.cancel()
            request = spb.WatchRequest(
                job_ids=request.job_ids, node_id=request.node_id, start_revision=checker.next_revision
            )
            request.progress_interval.CopyFrom(PROGRESS)


def req(**fields: Any) -> spb.WatchRequest:
    r = spb.WatchRequest(**fields)
    r.progress_interval.CopyFrom(PROGRESS)
    return r


async def final_state(target: str) -> list[pb.JobState]:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = spb_grpc.JobStateServiceStub(ch)
        jobs: list[pb.JobState] = []
        token = ""
        for _ in range(100):
            page = await stub.ListJobs(spb.ListJobsRequest(page_size=50, page_token=token))
            jobs += page.jobs
            token = page.next_page_token
            if not token:
                return jobs
    raise AssertionError("ListJobs did not end")


async def drive(target: str, run: Run, writers: list[Any], watchers: list[Any], late: list[Any]) -> None:
    watch_tasks = [asyncio.ensure_future(w) for w in watchers]
    write_tasks = [asyncio.ensure_future(w) for w in writers]
    # Late watchers start once some history exists (start_revision 0 and initial state mean "from now").
    writing = asyncio.ensure_future(asyncio.gather(*write_tasks))
    warm = asyncio.ensure_future(run.warmed_up.wait())
    await asyncio.wait([writing, warm], timeout=25, return_when=asyncio.FIRST_COMPLETED)
    warm.cancel()
    watch_tasks += [asyncio.ensure_future(w) for w in late]
    try:
        await asyncio.wait_for(writing, 25)
        run.final_revision = max(c.revision for c in run.commits)
        run.done.set()
        await asyncio.wait_for(asyncio.gather(*watch_tasks), 25)
    finally:
        for t in write_tasks + watch_tasks:
            t.cancel()
        await asyncio.gather(*write_tasks, *watch_tasks, return_exceptions=True)


async def test_concurrent_writers_and_every_kind_of_watcher(server: Any) -> None:
    run = Run()
    jobs = [f"job-{i}" for i in range(16)]
    async with grpc.aio.insecure_channel(server.target) as ch:
        run.record(await spb_grpc.JobStateServiceStub(ch).CreateJob(spb.CreateJobRequest(job_id="seed")))
    watchers = {
        "all": Watcher(WatchChecker("all"), req(start_revision=1)),
        "all-flaky": Watcher(WatchChecker("all-flaky"), req(start_revision=1), disconnect_every=8),
        "one-job": Watcher(
            WatchChecker("one-job", job_ids=frozenset({"job-3"})), req(job_ids=["job-3"], start_revision=1)
        ),
        "two-jobs-flaky": Watcher(
            WatchChecker("two-jobs-flaky", job_ids=frozenset({"job-1", "job-2"})),
            req(job_ids=["job-1", "job-2"], start_revision=1),
            disconnect_every=4,
        ),
        "node": Watcher(WatchChecker("node", node_id="n1"), req(node_id="n1", start_revision=1)),
        "node-flaky": Watcher(WatchChecker("node-flaky", node_id="n2"), req(node_id="n2", start_revision=1), 5),
        "job-on-node": Watcher(
            WatchChecker("job-on-node", job_ids=frozenset({"job-5"}), node_id="n0"),
            req(job_ids=["job-5"], node_id="n0", start_revision=1),
        ),
    }
    late = {
        "live": Watcher(WatchChecker("live"), req()),
        "initial": Watcher(WatchChecker("initial"), req(send_initial_state=True)),
        "initial-node": Watcher(WatchChecker("initial-node", node_id="n3"), req(node_id="n3", send_initial_state=True)),
        "initial-flaky": Watcher(WatchChecker("initial-flaky"), req(send_initial_state=True), disconnect_every=6),
    }
    writers = [writer(server.target, run, seed, 150, jobs) for seed in range(8)]
    await drive(
        server.target,
        run,
        writers,
        [watch(server.target, run, w, i) for i, w in enumerate(watchers.values())],
        [watch(server.target, run, w, 100 + i) for i, w in enumerate(late.values())],
    )
    revisions = sorted(c.revision for c in run.commits)
    assert revisions == list(range(1, len(revisions) + 1)), "a committed revision is missing or repeated"
    assert len(run.commits) > 600
    assert run.refused.get("VERSION_MISMATCH", 0) > 0, "writers never raced: the test would not test CAS"
    jobs_now = await final_state(server.target)
    for name, w in {**watchers, **late}.items():
        checked = w.checker.check_complete(run.commits)
        assert checked > 0 or name == "job-on-node", f"{name} checked nothing"
        w.checker.check_snapshot(jobs_now, partial=name == "live")
        if w.disconnect_every:
            assert w.streams > 1, f"{name} never resumed"
    assert len(watchers["all"].checker.live_events()) == len(run.commits)


async def test_slow_readers_lag_resume_and_relist(make_server: Any) -> None:
    server = make_server(history_size=64)
    run = Run()
    jobs = [f"job-{i}" for i in range(8)]
    async with grpc.aio.insecure_channel(server.target) as ch:
        run.record(await spb_grpc.JobStateServiceStub(ch).CreateJob(spb.CreateJobRequest(job_id="seed")))
    slow = [
        Watcher(WatchChecker("paused-all"), req(start_revision=1), pause=True),
        Watcher(WatchChecker("paused-node", node_id="n1"), req(node_id="n1", start_revision=1), pause=True),
        Watcher(WatchChecker("paused-initial"), req(send_initial_state=True), pause=True),
        Watcher(WatchChecker("slow-all"), req(start_revision=1), slow=0.05),
    ]
    fast = Watcher(WatchChecker("fast"), req(start_revision=1))
    # Big executions (~30 KB each) so that unread responses fill the transport and the server stops writing.
    writers = [writer(server.target, run, seed, 80, jobs, big=30_000) for seed in range(4)]
    await drive(
        server.target,
        run,
        writers,
        [watch(server.target, run, w, i) for i, w in enumerate([*slow, fast])],
        [],
    )
    for w in [*slow, fast]:
        w.checker.check_complete(run.commits)
        w.checker.check_snapshot(await final_state(server.target))
    assert fast.lagged == 0
    assert sum(w.lagged for w in slow) > 0, "no slow reader lagged: the test did not test lagging"
    assert sum(w.compacted for w in slow) > 0, "no reader had to relist: the test did not test compaction"
    print({w.checker.name: (w.lagged, w.compacted, w.streams) for w in [*slow, fast]})


@pytest.mark.parametrize("resume_at", ["each-response", "random"])
async def test_resume_from_next_revision_continues_exactly(server: Any, resume_at: str) -> None:
    run = Run()
    jobs = [f"job-{i}" for i in range(6)]
    async with grpc.aio.insecure_channel(server.target) as ch:
        run.record(await spb_grpc.JobStateServiceStub(ch).CreateJob(spb.CreateJobRequest(job_id="seed")))
    w = Watcher(
        WatchChecker(f"resume-{resume_at}"),
        req(start_revision=1),
        disconnect_every=1 if resume_at == "each-response" else 3,
    )
    await drive(
        server.target,
        run,
        [writer(server.target, run, s, 60, jobs) for s in range(3)],
        [watch(server.target, run, w, 7)],
        [],
    )
    assert w.checker.check_complete(run.commits) == len(run.commits)
    assert w.streams > 5
