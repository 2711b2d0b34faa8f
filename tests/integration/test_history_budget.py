"""Issue 13, items 1 and 2, end to end: a real server with a small ``history_bytes`` holds its watch history
within it, tells a watcher that fell behind it where to resume (WATCHER_LAGGED) and a watcher starting before it
what is held (REVISION_COMPACTED), and a status update of a 2 MiB job costs the history its small fields only."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpcerrors import error_of

from jobstate.server import rules
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb
from jobstate.v1 import job_state_service_pb2_grpc as spb_grpc

KiB = 1024
MiB = 1024 * KiB
BUDGET = 8 * MiB


def build_big_job(stub: spb_grpc.JobStateServiceStub, job_id: str = "big") -> int:
    """Four executions with run output: a job just under the 2 MiB limit. Returns its size."""
    stub.CreateJob(spb.CreateJobRequest(job_id=job_id))
    half = (rules.DEFAULT_LIMITS.max_job_bytes - 32 * KiB) // 8
    for i in range(4):
        ex = pb.ExecutionState(node_id=f"n{i}", compute_reference=f"e{i}")
        stub.CreateExecution(spb.CreateExecutionRequest(job_id=job_id, execution=ex))
        out = pb.RunCommandResult(stdout=chr(65 + i) * half, stderr="e" * half)
        stub.UpdateExecution(
            spb.UpdateExecutionRequest(
                job_id=job_id, compute_reference=f"e{i}", execution=pb.ExecutionState(run_output=out)
            )
        )
    return int(stub.GetJob(spb.GetJobRequest(job_id=job_id)).job.ByteSize())


@pytest.fixture(params=["memory", "sqlite"])
def budget_server(request: pytest.FixtureRequest, make_server: Any) -> Any:
    return make_server(engine=request.param, history_bytes=BUDGET)


def test_history_stays_within_history_bytes_and_laggards_learn_where_to_resume(budget_server: Any) -> None:
    server = budget_server
    hub = server.store.hub
    with grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", 64 * MiB)]) as ch:
        stub = spb_grpc.JobStateServiceStub(ch)
        size = build_big_job(stub)
        assert 1.9 * MiB < size < rules.DEFAULT_LIMITS.max_job_bytes
        # A watcher of every job and a watcher of the big job, each reading one response and then nothing.
        stalled = stub.Watch(spb.WatchRequest(start_revision=1))
        filtered = stub.Watch(spb.WatchRequest(job_ids=["big"], start_revision=1))
        streams = [(stalled, next(stalled).revision), (filtered, next(filtered).revision)]

        # Status updates share the 2 MiB of output: a hundred of them hold a few hundred KB, not 200 MB.
        before = server.run(lambda: hub.bytes_held)
        for i in range(100):
            stub.UpdateExecution(
                spb.UpdateExecutionRequest(
                    job_id="big", compute_reference="e0", execution=pb.ExecutionState(status=f"s{i}")
                )
            )
        assert server.run(lambda: hub.bytes_held) - before < 100 * 4 * KiB

        # New output each time: nothing to share, so the budget lets go of the oldest changes.
        for i in range(80):
            out = pb.RunCommandResult(stdout=f"{i:04d}" * (64 * KiB), stderr="e")
            stub.UpdateExecution(
                spb.UpdateExecutionRequest(
                    job_id="big", compute_reference="e1", execution=pb.ExecutionState(run_output=out)
                )
            )
            assert server.run(lambda: hub.bytes_held) <= BUDGET
        head, oldest = server.run(lambda: (hub.head_revision, hub.oldest_revision))
        assert oldest > 100, "the budget let go of nothing"

        # Item 2: the filtered watcher's queue pins no bytes of changes the history let go of.
        def pinned() -> int:
            in_ring = {id(c) for c in hub._ring if c is not None}
            return sum(c.size for w in hub._watchers for c in w.pending if id(c) not in in_ring)

        assert server.run(pinned) == 0

        # A watch from before what is held: REVISION_COMPACTED, naming the oldest held.
        with pytest.raises(grpc.RpcError) as compacted:
            next(stub.Watch(spb.WatchRequest(start_revision=2)))
        assert error_of(compacted.value) == (
            grpc.StatusCode.OUT_OF_RANGE,
            "REVISION_COMPACTED",
            {"oldest_revision": str(oldest)},
        )
        # The stalled watchers read on: every change in order up to where they fell behind, then WATCHER_LAGGED.
        for stream, delivered in streams:
            err: grpc.RpcError | None = None
            try:
                for response in stream:
                    assert response.events[0].revision == delivered + 1
                    delivered = response.revision
            except grpc.RpcError as exc:
                err = exc
            assert err is not None, "the stream ended without an error"
            code, why, metadata = error_of(err)
            assert (code, why) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "WATCHER_LAGGED")
            resume = int(metadata["resume_revision"])
            assert resume == delivered + 1
            assert resume < oldest
        # From the oldest held, a new watcher gets everything held.
        fresh = stub.Watch(spb.WatchRequest(start_revision=oldest))
        got: list[int] = []
        for response in fresh:
            got += [e.revision for e in response.events]
            if response.revision >= head:
                break
        fresh.cancel()
        assert got == list(range(oldest, head + 1))
