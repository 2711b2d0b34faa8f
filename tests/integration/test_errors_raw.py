"""Every error row of docs/CONTRACT.md through the raw generated stubs: status code, ErrorInfo reason and metadata.

Also: garbage bytes as the request of every method, oversized requests and unknown enum numbers are refused
without changing the store, and the server keeps serving.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2, message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from jobstate.server import errors, service
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb
from jobstate.v1 import job_state_service_pb2_grpc as spb_grpc

JS = pb.JobStateType
ES = pb.ExecutionStateType
METHODS = spb.DESCRIPTOR.services_by_name["JobStateService"].methods
SERVICE = "/jobstate.v1.JobStateService/"


def error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, f"no rich status in {err}"
    infos = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            infos.append(info)
    assert len(infos) == 1, f"expected one ErrorInfo, got {status.details}"
    assert infos[0].domain == "jobstate"
    assert status.message == err.details()  # type: ignore[attr-defined]
    return infos[0]


def expect(call: Callable[[], Any], code: grpc.StatusCode, reason: str, **metadata: str) -> error_details_pb2.ErrorInfo:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert err.code() == code, err  # type: ignore[attr-defined]
    ei = error_info(err)
    assert ei.reason == reason
    for key, value in metadata.items():
        assert ei.metadata[key] == value, (key, dict(ei.metadata))
    return ei


@pytest.fixture
def channel(server: Any) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(
        server.target,
        options=[("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)],
    ) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.Channel) -> spb_grpc.JobStateServiceStub:
    return spb_grpc.JobStateServiceStub(channel)


def revision_of(server: Any) -> int:
    return int(server.run(lambda: server.store.stats().revision))


# --- the table, row by row ------------------------------------------------------------------------------------

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def _setup(stub: spb_grpc.JobStateServiceStub) -> None:
    """j1 with execution e1 on n1 (version 2), done (COMPLETED) with e1 cancelled, and j2 open with e2 FAILED."""
    stub.CreateJob(spb.CreateJobRequest(job_id="j1"))
    stub.CreateExecution(
        spb.CreateExecutionRequest(job_id="j1", execution=pb.ExecutionState(node_id="n1", compute_reference="e1"))
    )
    stub.CreateJob(spb.CreateJobRequest(job_id="done"))
    stub.UpdateJobState(spb.UpdateJobStateRequest(job_id="done", new_state=JS.JOB_STATE_TYPE_COMPLETED))
    stub.CreateJob(spb.CreateJobRequest(job_id="j2"))
    stub.CreateExecution(
        spb.CreateExecutionRequest(
            job_id="j2",
            execution=pb.ExecutionState(node_id="n1", compute_reference="e2", state=ES.EXECUTION_STATE_TYPE_FAILED),
        )
    )


ROWS: list[tuple[str, Callable[[spb_grpc.JobStateServiceStub], Any], grpc.StatusCode, str, dict[str, str]]] = [
    ("missing-id", lambda s: s.GetJob(spb.GetJobRequest()), INVALID, "INVALID_ARGUMENT", {}),
    ("overlong-id", lambda s: s.CreateJob(spb.CreateJobRequest(job_id="x" * 129)), INVALID, "INVALID_ARGUMENT", {}),
    ("bad-id", lambda s: s.CreateJob(spb.CreateJobRequest(job_id="a b")), INVALID, "INVALID_ARGUMENT", {}),
    (
        "unknown-enum",
        lambda s: s.UpdateJobState(spb.UpdateJobStateRequest(job_id="j1", new_state=99)),  # type: ignore[arg-type]
        INVALID,
        "INVALID_ARGUMENT",
        {},
    ),
    (
        "new-state-unset",
        lambda s: s.UpdateJobState(spb.UpdateJobStateRequest(job_id="j1")),
        INVALID,
        "INVALID_ARGUMENT",
        {},
    ),
    ("negative-page-size", lambda s: s.ListJobs(spb.ListJobsRequest(page_size=-1)), INVALID, "INVALID_ARGUMENT", {}),
    (
        "negative-history-page-size",
        lambda s: s.GetJobHistory(spb.GetJobHistoryRequest(job_id="j1", page_size=-1)),
        INVALID,
        "INVALID_ARGUMENT",
        {},
    ),
    (
        "garbage-page-token",
        lambda s: s.ListJobs(spb.ListJobsRequest(page_token="not-a-token")),
        INVALID,
        "INVALID_ARGUMENT",
        {},
    ),
    (
        "zero-timeout",
        lambda s: s.CreateJob(spb.CreateJobRequest(job_id="t", timeout=duration_pb2.Duration())),
        INVALID,
        "INVALID_ARGUMENT",
        {},
    ),
    (
        "immutable-mask-path",
        lambda s: s.UpdateExecution(
            spb.UpdateExecutionRequest(
                job_id="j1", compute_reference="e1", update_mask=field_mask_pb2.FieldMask(paths=["node_id"])
            )
        ),
        INVALID,
        "INVALID_ARGUMENT",
        {},
    ),
    ("no-job", lambda s: s.GetJob(spb.GetJobRequest(job_id="nope")), grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND", {}),
    (
        "no-job-delete",
        lambda s: s.DeleteJob(spb.DeleteJobRequest(job_id="nope")),
        grpc.StatusCode.NOT_FOUND,
        "JOB_NOT_FOUND",
        {},
    ),
    (
        "no-execution",
        lambda s: s.UpdateExecution(
            spb.UpdateExecutionRequest(job_id="j1", compute_reference="e9", execution=pb.ExecutionState(status="x"))
        ),
        grpc.StatusCode.NOT_FOUND,
        "EXECUTION_NOT_FOUND",
        {},
    ),
    (
        "job-taken",
        lambda s: s.CreateJob(spb.CreateJobRequest(job_id="j1")),
        grpc.StatusCode.ALREADY_EXISTS,
        "JOB_ALREADY_EXISTS",
        {},
    ),
    (
        "execution-taken",
        lambda s: s.CreateExecution(
            spb.CreateExecutionRequest(job_id="j1", execution=pb.ExecutionState(node_id="n2", compute_reference="e1"))
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "EXECUTION_ALREADY_EXISTS",
        {},
    ),
    (
        "job-version",
        lambda s: s.UpdateJobState(
            spb.UpdateJobStateRequest(
                job_id="j1", new_state=JS.JOB_STATE_TYPE_QUEUED, condition=spb.JobCondition(expected_version=1)
            )
        ),
        grpc.StatusCode.ABORTED,
        "VERSION_MISMATCH",
        {"current_version": "2"},
    ),
    (
        "execution-version",
        lambda s: s.UpdateExecution(
            spb.UpdateExecutionRequest(
                job_id="j1",
                compute_reference="e1",
                execution=pb.ExecutionState(status="x"),
                condition=spb.ExecutionCondition(expected_version=5),
            )
        ),
        grpc.StatusCode.ABORTED,
        "VERSION_MISMATCH",
        {"current_version": "1"},
    ),
    (
        "delete-version",
        lambda s: s.DeleteJob(spb.DeleteJobRequest(job_id="j1", expected_version=7)),
        grpc.StatusCode.ABORTED,
        "VERSION_MISMATCH",
        {"current_version": "2"},
    ),
    (
        "expected-state",
        lambda s: s.UpdateJobState(
            spb.UpdateJobStateRequest(
                job_id="j1",
                new_state=JS.JOB_STATE_TYPE_QUEUED,
                condition=spb.JobCondition(expected_state=JS.JOB_STATE_TYPE_IN_PROGRESS),
            )
        ),
        PRECONDITION,
        "STATE_MISMATCH",
        {},
    ),
    (
        "unexpected-state",
        lambda s: s.UpdateJobState(
            spb.UpdateJobStateRequest(
                job_id="j1",
                new_state=JS.JOB_STATE_TYPE_QUEUED,
                condition=spb.JobCondition(unexpected_states=[JS.JOB_STATE_TYPE_NEW]),
            )
        ),
        PRECONDITION,
        "STATE_MISMATCH",
        {},
    ),
    (
        "expected-execution-states",
        lambda s: s.UpdateExecution(
            spb.UpdateExecutionRequest(
                job_id="j1",
                compute_reference="e1",
                execution=pb.ExecutionState(status="x"),
                condition=spb.ExecutionCondition(expected_states=[ES.EXECUTION_STATE_TYPE_BID_ACCEPTED]),
            )
        ),
        PRECONDITION,
        "STATE_MISMATCH",
        {},
    ),
    (
        "terminal-job",
        lambda s: s.UpdateJobState(spb.UpdateJobStateRequest(job_id="done", new_state=JS.JOB_STATE_TYPE_QUEUED)),
        PRECONDITION,
        "JOB_TERMINAL",
        {},
    ),
    (
        "execution-on-terminal-job",
        lambda s: s.CreateExecution(
            spb.CreateExecutionRequest(job_id="done", execution=pb.ExecutionState(node_id="n1"))
        ),
        PRECONDITION,
        "JOB_TERMINAL",
        {},
    ),
    (
        "terminal-execution",
        lambda s: s.UpdateExecution(
            spb.UpdateExecutionRequest(job_id="j2", compute_reference="e2", execution=pb.ExecutionState(status="x"))
        ),
        PRECONDITION,
        "EXECUTION_TERMINAL",
        {},
    ),
    (
        "node-busy",
        lambda s: s.CreateExecution(spb.CreateExecutionRequest(job_id="j1", execution=pb.ExecutionState(node_id="n1"))),
        PRECONDITION,
        "NODE_HAS_ACTIVE_EXECUTION",
        {},
    ),
]


@pytest.mark.parametrize(("call", "code", "reason", "metadata"), [pytest.param(*r[1:], id=r[0]) for r in ROWS])
def test_error_rows(
    server: Any,
    stub: spb_grpc.JobStateServiceStub,
    call: Callable[[spb_grpc.JobStateServiceStub], Any],
    code: grpc.StatusCode,
    reason: str,
    metadata: dict[str, str],
) -> None:
    _setup(stub)
    revision = revision_of(server)
    expect(lambda: call(stub), code, reason, **metadata)
    assert revision_of(server) == revision
    assert stub.GetJob(spb.GetJobRequest(job_id="j1")).job.version == 2  # still serving, nothing changed


def test_revision_compacted_names_the_oldest_revision(make_server: Any) -> None:
    server = make_server(history_size=4)
    with grpc.insecure_channel(server.target) as ch:
        stub = spb_grpc.JobStateServiceStub(ch)
        for i in range(10):
            stub.CreateJob(spb.CreateJobRequest(job_id=f"j{i}"))
        expect(
            lambda: next(iter(stub.Watch(spb.WatchRequest(start_revision=2)))),
            grpc.StatusCode.OUT_OF_RANGE,
            "REVISION_COMPACTED",
            oldest_revision="7",
        )
        first = next(iter(stub.Watch(spb.WatchRequest(start_revision=7))))
        assert [e.revision for e in first.events] == [7, 8, 9, 10]


def test_watcher_lagged_names_the_resume_revision(make_server: Any) -> None:
    """A reader that stops reading while big changes fill the transport and the ring, then reads again."""
    server = make_server(history_size=4)
    with grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        stub = spb_grpc.JobStateServiceStub(ch)
        stub.CreateJob(spb.CreateJobRequest(job_id="big"))
        stub.CreateExecution(
            spb.CreateExecutionRequest(job_id="big", execution=pb.ExecutionState(node_id="n", compute_reference="e"))
        )
        stream = stub.Watch(spb.WatchRequest(start_revision=1))
        delivered = 0
        first = next(stream)
        delivered = first.revision
        # Each change is ~200 KB; dozens of them exceed what HTTP/2 flow control lets the server send unread.
        for i in range(60):
            out = pb.RunCommandResult(stdout=str(i % 10) * 200_000)
            stub.UpdateExecution(
                spb.UpdateExecutionRequest(
                    job_id="big", compute_reference="e", execution=pb.ExecutionState(run_output=out)
                )
            )
        err: Any = None
        try:
            for response in stream:
                assert response.events[0].revision == delivered + 1  # nothing skipped before the error
                delivered = response.revision
        except grpc.RpcError as exc:
            err = exc
        assert err is not None, "the stream ended without an error"
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        ei = error_info(err)
        assert ei.reason == "WATCHER_LAGGED"
        assert ei.metadata["resume_revision"] == str(delivered + 1)
        # Resuming there is compacted (the ring is tiny): OUT_OF_RANGE names what is held.
        expect(
            lambda: next(iter(stub.Watch(spb.WatchRequest(start_revision=delivered + 1)))),
            grpc.StatusCode.OUT_OF_RANGE,
            "REVISION_COMPACTED",
            oldest_revision=str(62 - 4 + 1),
        )
    assert server.run(lambda: server.store.stats().watchers) == 0


# --- bad input ------------------------------------------------------------------------------------------------

MALFORMED = [
    b"\x0a\xff\x01",  # field 1, length 255, no data
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",  # a varint tag that never ends
    b"\x0a\x02\xff\xfe",  # field 1 as a string that is not UTF-8
    b"\x07",  # field 0, wire type 7: invalid
    b"\x0b\x00",  # a group start with no end
]


def _garbage(kind: type[message.Message], rng: random.Random, count: int) -> list[bytes]:
    """Random byte strings that protobuf refuses to parse as ``kind``."""
    out: list[bytes] = []
    for _ in range(2000):
        data = rng.randbytes(rng.randint(1, 64))
        try:
            kind.FromString(data)
        except message.DecodeError:
            out.append(data)
            if len(out) == count:
                break
    return out


@pytest.mark.parametrize("method", [m.name for m in METHODS])
def test_garbage_bytes_are_invalid_argument(server: Any, channel: grpc.Channel, method: str) -> None:
    stub = spb_grpc.JobStateServiceStub(channel)
    _setup(stub)
    revision = revision_of(server)
    desc = METHODS[[m.name for m in METHODS].index(method)]
    kind = spb.DESCRIPTOR.message_types_by_name[desc.input_type.name]
    request_class: type[message.Message] = getattr(spb, kind.name)
    payloads = MALFORMED + _garbage(request_class, random.Random(method), 15)
    path = SERVICE + method
    for data in payloads:
        if desc.server_streaming:
            call: Callable[[], Any] = lambda d=data: list(channel.unary_stream(path)(d, timeout=10))  # noqa: E731
        else:
            call = lambda d=data: channel.unary_unary(path)(d, timeout=10)  # noqa: E731
        expect(call, INVALID, "INVALID_ARGUMENT")
    assert revision_of(server) == revision
    assert stub.GetJob(spb.GetJobRequest(job_id="j1")).job.version == 2


def test_oversized_requests(server: Any, stub: spb_grpc.JobStateServiceStub) -> None:
    _setup(stub)
    revision = revision_of(server)
    # Beyond the transport's limit: grpc itself refuses it.
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateJob(spb.CreateJobRequest(job_id="big", comment="x" * (9 << 20)))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    # Within it, beyond the store's field limits: INVALID_ARGUMENT.
    expect(lambda: stub.CreateJob(spb.CreateJobRequest(job_id="big", comment="x" * 5000)), INVALID, "INVALID_ARGUMENT")
    out = pb.RunCommandResult(stdout="x" * (300 * 1024))
    expect(
        lambda: stub.UpdateExecution(
            spb.UpdateExecutionRequest(job_id="j1", compute_reference="e1", execution=pb.ExecutionState(run_output=out))
        ),
        INVALID,
        "INVALID_ARGUMENT",
    )
    expect(
        lambda: stub.Watch(spb.WatchRequest(job_ids=[f"j{i}" for i in range(1001)])).next(),
        INVALID,
        "INVALID_ARGUMENT",
    )
    assert revision_of(server) == revision
    assert stub.GetJob(spb.GetJobRequest(job_id="j1")).job.version == 2


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda s: s.ListJobs(spb.ListJobsRequest(states=[42])), id="list-states"),
        pytest.param(
            lambda s: s.CreateExecution(
                spb.CreateExecutionRequest(job_id="j1", execution=pb.ExecutionState(node_id="n5", state=12))
            ),
            id="execution-state",
        ),
        pytest.param(
            lambda s: s.CreateExecution(
                spb.CreateExecutionRequest(job_id="j1", execution=pb.ExecutionState(node_id="n5", desired_state=7))
            ),
            id="desired-state",
        ),
        pytest.param(
            lambda s: s.UpdateJobState(
                spb.UpdateJobStateRequest(
                    job_id="j1", new_state=JS.JOB_STATE_TYPE_QUEUED, condition=spb.JobCondition(expected_state=8)
                )
            ),
            id="condition-state",
        ),
        pytest.param(
            lambda s: s.UpdateExecution(
                spb.UpdateExecutionRequest(
                    job_id="j1",
                    compute_reference="e1",
                    execution=pb.ExecutionState(status="x"),
                    condition=spb.ExecutionCondition(unexpected_states=[99]),
                )
            ),
            id="condition-execution-state",
        ),
        pytest.param(
            lambda s: s.UpdateExecution(
                spb.UpdateExecutionRequest(job_id="j1", compute_reference="e1", execution=pb.ExecutionState(state=-3))
            ),
            id="negative-state",
        ),
    ],
)
def test_unknown_enum_numbers(server: Any, stub: spb_grpc.JobStateServiceStub, call: Callable[[Any], Any]) -> None:
    _setup(stub)
    revision = revision_of(server)
    expect(lambda: call(stub), INVALID, "INVALID_ARGUMENT")
    assert revision_of(server) == revision


def _subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub, *_subclasses(sub)}
    return out


def test_status_table_covers_every_domain_error() -> None:
    every = _subclasses(errors.JobStateError)
    assert every, "no domain errors found"
    missing = sorted(c.__name__ for c in every if c not in service.STATUS_OF)
    assert not missing, f"errors without a status code: {missing}"
    reasons = [c.reason for c in every]
    assert len(reasons) == len(set(reasons)), "two errors share a reason"
    assert "INTERNAL" not in reasons
    for cls, code in service.STATUS_OF.items():
        try:
            exc = cls("message", k="v")
        except TypeError:
            continue  # an error whose constructor needs more (RateLimited: retry_after) is tested where it is raised
        status = service.to_status(exc)
        assert status.code == code
