"""Issue 13, items 6 and 7, on every engine: the per-job size limit holds on every path that changes a job (the
cancellation cascade copies its comment into each active execution), and ListJobs / GetJobHistory pages end
by bytes, so every page reaches a stock gRPC client (4 MiB receive limit) however large the jobs are."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpcerrors import error_of

from jobstate.client import Client
from jobstate.client.cli import main
from jobstate.server import changes, rules
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb
from jobstate.v1 import job_state_service_pb2_grpc as spb_grpc

JS = pb.JobStateType
ES = pb.ExecutionStateType
KiB = 1024
MiB = 1024 * KiB
LIMIT = rules.DEFAULT_LIMITS.max_job_bytes


@pytest.fixture
def stub(conformance_server: Any) -> Iterator[spb_grpc.JobStateServiceStub]:
    # grpc's defaults: a 4 MiB receive limit, as any client in any language starts with.
    with grpc.insecure_channel(conformance_server.target) as channel:
        yield spb_grpc.JobStateServiceStub(channel)


def add_execution(stub: spb_grpc.JobStateServiceStub, job_id: str, i: int, output: int) -> None:
    ex = pb.ExecutionState(
        node_id=f"node-{i}",
        compute_reference=f"e{i}",
        state=ES.EXECUTION_STATE_TYPE_BID_ACCEPTED,
        run_output=pb.RunCommandResult(stdout="o" * (output // 2), stderr="e" * (output - output // 2)),
    )
    stub.CreateExecution(spb.CreateExecutionRequest(job_id=job_id, execution=ex))


def test_a_cancellation_whose_comment_would_pass_the_size_limit_is_refused(
    stub: spb_grpc.JobStateServiceStub,
) -> None:
    # 60 active executions of 32 KB: a 1.9 MB job. A 4 KiB comment copied into each would make it 2.2 MB.
    stub.CreateJob(spb.CreateJobRequest(job_id="wide"))
    for i in range(60):
        add_execution(stub, "wide", i, 32_000)
    before = stub.GetJob(spb.GetJobRequest(job_id="wide")).job
    assert 1.9e6 < before.ByteSize() < LIMIT
    history = len(stub.GetJobHistory(spb.GetJobHistoryRequest(job_id="wide", page_size=1000)).entries)
    cancel = spb.UpdateJobStateRequest(job_id="wide", new_state=JS.JOB_STATE_TYPE_CANCELLED, comment="c" * 4096)
    with pytest.raises(grpc.RpcError) as refused:
        stub.UpdateJobState(cancel)
    code, reason, metadata = error_of(refused.value)
    assert (code, reason, metadata) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "LIMIT_EXCEEDED",
        {"limit": "max_job_bytes"},
    )
    assert "copied into each of the 60 executions" in refused.value.details()  # type: ignore[attr-defined]
    # Nothing changed: the job, its executions and its history are as they were.
    assert stub.GetJob(spb.GetJobRequest(job_id="wide")).job == before
    assert len(stub.GetJobHistory(spb.GetJobHistoryRequest(job_id="wide", page_size=1000)).entries) == history
    # Without the comment the job can still be cancelled: what it adds is bookkeeping (versions, times).
    done = stub.UpdateJobState(spb.UpdateJobStateRequest(job_id="wide", new_state=JS.JOB_STATE_TYPE_CANCELLED)).job
    assert done.state == JS.JOB_STATE_TYPE_CANCELLED
    assert {e.state for e in done.executions} == {ES.EXECUTION_STATE_TYPE_CANCELLED}
    assert done.ByteSize() <= LIMIT + changes.BOOKKEEPING_BYTES * (1 + len(done.executions))


def big_jobs(stub: spb_grpc.JobStateServiceStub, n: int) -> list[str]:
    """``n`` jobs of about 2 MiB each (four executions of run output)."""
    ids = []
    for j in range(n):
        job_id = f"big-{j}"
        stub.CreateJob(spb.CreateJobRequest(job_id=job_id))
        for i in range(4):
            add_execution(stub, job_id, i, (LIMIT - 16 * KiB) // 4)
        ids.append(job_id)
    return ids


def test_list_pages_end_by_bytes_so_six_2_mib_jobs_list_everywhere(
    stub: spb_grpc.JobStateServiceStub, conformance_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = big_jobs(stub, 6)
    stub.CreateJob(spb.CreateJobRequest(job_id="small"))
    ids.append("small")
    for page_size in (0, 1000):
        seen: list[str] = []
        token = ""
        pages = 0
        while True:
            page = stub.ListJobs(spb.ListJobsRequest(page_size=page_size, page_token=token))
            assert page.ByteSize() < 4 * MiB
            assert page.jobs, "an empty page that is not the last"
            seen += [j.job_id for j in page.jobs]
            pages += 1
            token = page.next_page_token
            if not token:
                break
        assert seen == ids
        assert 3 <= pages <= 6
    with Client(conformance_server.target) as c:
        assert [j.job_id for j in c.iter_jobs()] == ids
    assert main(["--target", conformance_server.target, "list", "--all"]) == 0
    out = capsys.readouterr().out
    assert "7 jobs at revision" in out
    assert all(job_id in out for job_id in ids)


def test_history_pages_end_by_bytes(stub: spb_grpc.JobStateServiceStub) -> None:
    # A thousand entries (the default cap per job), each with a 4 KiB comment and two ids of 128 characters,
    # pass 4 MiB together.
    stub.CreateJob(spb.CreateJobRequest(job_id="h"))
    for i in range(999):
        node, ref = f"node-{i:0123d}", f"exec-{i:0123d}"
        ex = pb.ExecutionState(node_id=node, compute_reference=ref, state=ES.EXECUTION_STATE_TYPE_FAILED)
        stub.CreateExecution(spb.CreateExecutionRequest(job_id="h", execution=ex, comment="x" * 4096))
    entries: list[pb.JobHistoryEntry] = []
    token = ""
    pages = 0
    while True:
        page = stub.GetJobHistory(spb.GetJobHistoryRequest(job_id="h", page_size=1000, page_token=token))
        assert page.ByteSize() < 4 * MiB
        entries += page.entries
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert [e.version for e in entries] == list(range(1, 1001))
    assert pages >= 2
