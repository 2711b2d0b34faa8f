"""Every row of docs/CONTRACT.md's error table through both clients: exception class, code, reason, metadata.

Each failing call is also checked to change nothing (the store's revision stays put). Plus: every status code
maps to exactly one exception class, and the package's public names stay what they are.
"""

from __future__ import annotations

import asyncio
import importlib.resources
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

import jobstate.client
from jobstate.client import (
    Aborted,
    AlreadyExists,
    AsyncClient,
    Client,
    FailedPrecondition,
    InvalidArgument,
    JobStateError,
    NotFound,
    OutOfRange,
    Reason,
    ResourceExhausted,
    Unavailable,
)
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb

from .apis import Api, opened

Setup = Callable[[Api], Awaitable[Callable[[], Awaitable[Any]]]]


@dataclass(frozen=True)
class Row:
    name: str
    setup: Setup  # prepares the store, returns the failing call
    error: type[JobStateError]
    code: grpc.StatusCode
    reason: str
    metadata: tuple[tuple[str, str], ...] = ()


async def with_job(api: Api, job_id: str = "j1", state: str = "") -> None:
    await api.call("create_job", job_id)
    if state:
        await api.call("update_job_state", job_id, state)


async def with_execution(api: Api, state: str = "", job_id: str = "j1", ref: str = "e1", node: str = "n1") -> None:
    await with_job(api, job_id)
    await api.call("create_execution", job_id, node, compute_reference=ref)
    if state:
        await api.call("update_execution", job_id, ref, state=state)


def call(method: str, *args: Any, **kwargs: Any) -> Callable[[Api], Callable[[], Awaitable[Any]]]:
    return lambda api: lambda: api.call(method, *args, **kwargs)


def row(name: str, prepare: Callable[[Api], Awaitable[None]] | None, failing: Any, *expect: Any, **meta: str) -> Row:
    async def setup(api: Api) -> Callable[[], Awaitable[Any]]:
        if prepare is not None:
            await prepare(api)
        return failing(api)  # type: ignore[no-any-return]

    error, reason = expect
    return Row(name, setup, error, error.code, reason, tuple(meta.items()))


IA = Reason.INVALID_ARGUMENT
ROWS = [
    # malformed requests
    row("missing-id", None, call("get_job", ""), InvalidArgument, IA),
    row("overlong-id", None, call("create_job", "x" * 500), InvalidArgument, IA),
    row("bad-id-characters", None, call("create_job", "a b/c"), InvalidArgument, IA),
    row("unknown-job-state-number", with_job, call("update_job_state", "j1", 99), InvalidArgument, IA),
    row("new-state-unset", with_job, call("update_job_state", "j1", 0), InvalidArgument, IA),
    row("unknown-execution-state", with_execution, call("update_execution", "j1", "e1", state=77), InvalidArgument, IA),
    row("negative-page-size", None, call("list_jobs", page_size=-1), InvalidArgument, IA),
    row("negative-history-page-size", with_job, call("get_job_history", "j1", page_size=-1), InvalidArgument, IA),
    row("foreign-page-token", None, call("list_jobs", page_token="not-a-token"), InvalidArgument, IA),
    row("execution-without-node", with_job, call("create_execution", "j1", ""), InvalidArgument, IA),
    row("non-positive-timeout", None, call("create_job", "t", timeout=-1), InvalidArgument, IA),
    row(
        "mask-names-identity-field",
        with_execution,
        call("update_execution", "j1", "e1", pb.ExecutionState(node_id="n2"), update_mask=["node_id"]),
        InvalidArgument,
        IA,
    ),
    # not found
    row("no-such-job", None, call("get_job", "nope"), NotFound, Reason.JOB_NOT_FOUND),
    row("update-no-such-job", None, call("update_job_state", "nope", "queued"), NotFound, Reason.JOB_NOT_FOUND),
    row("delete-no-such-job", None, call("delete_job", "nope"), NotFound, Reason.JOB_NOT_FOUND),
    row("history-no-such-job", None, call("get_job_history", "nope"), NotFound, Reason.JOB_NOT_FOUND),
    row("execution-on-no-such-job", None, call("create_execution", "nope", "n1"), NotFound, Reason.JOB_NOT_FOUND),
    row(
        "no-such-execution",
        with_job,
        call("update_execution", "j1", "e9", state="completed"),
        NotFound,
        Reason.EXECUTION_NOT_FOUND,
    ),
    # already exists
    row("job-id-taken", with_job, call("create_job", "j1"), AlreadyExists, Reason.JOB_ALREADY_EXISTS),
    row(
        "execution-id-taken",
        with_execution,
        call("create_execution", "j1", "n2", compute_reference="e1"),
        AlreadyExists,
        Reason.EXECUTION_ALREADY_EXISTS,
    ),
    # expected_version differs
    row(
        "job-version-mismatch",
        with_job,
        call("update_job_state", "j1", "queued", expected_version=7),
        Aborted,
        Reason.VERSION_MISMATCH,
        current_version="1",
    ),
    row(
        "execution-version-mismatch",
        lambda api: with_execution(api, "ask_for_bid"),
        call("update_execution", "j1", "e1", status="s", expected_version=1),
        Aborted,
        Reason.VERSION_MISMATCH,
        current_version="2",
    ),
    row(
        "delete-version-mismatch",
        lambda api: with_job(api, "j1", "queued"),
        call("delete_job", "j1", expected_version=1),
        Aborted,
        Reason.VERSION_MISMATCH,
        current_version="2",
    ),
    # state conditions
    row(
        "expected-state",
        with_job,
        call("update_job_state", "j1", "in_progress", expected_state="queued"),
        FailedPrecondition,
        Reason.STATE_MISMATCH,
    ),
    row(
        "unexpected-state",
        with_job,
        call("update_job_state", "j1", "queued", unexpected_states=["new"]),
        FailedPrecondition,
        Reason.STATE_MISMATCH,
    ),
    row(
        "execution-expected-states",
        with_execution,
        call("update_execution", "j1", "e1", state="bid_accepted", expected_states=["ask_for_bid"]),
        FailedPrecondition,
        Reason.STATE_MISMATCH,
    ),
    row(
        "execution-unexpected-states",
        with_execution,
        call("update_execution", "j1", "e1", state="bid_accepted", unexpected_states=["new"]),
        FailedPrecondition,
        Reason.STATE_MISMATCH,
    ),
    # terminal
    row(
        "job-terminal",
        lambda api: with_job(api, "j1", "completed"),
        call("update_job_state", "j1", "in_progress"),
        FailedPrecondition,
        Reason.JOB_TERMINAL,
    ),
    row(
        "execution-on-terminal-job",
        lambda api: with_job(api, "j1", "error"),
        call("create_execution", "j1", "n1"),
        FailedPrecondition,
        Reason.JOB_TERMINAL,
    ),
    row(
        "execution-terminal",
        lambda api: with_execution(api, "failed"),
        call("update_execution", "j1", "e1", state="bid_accepted"),
        FailedPrecondition,
        Reason.EXECUTION_TERMINAL,
    ),
    row(
        "node-has-active-execution",
        with_execution,
        call("create_execution", "j1", "n1", compute_reference="e2"),
        FailedPrecondition,
        Reason.NODE_HAS_ACTIVE_EXECUTION,
    ),
]


@pytest.mark.parametrize("case", ROWS, ids=[r.name for r in ROWS])
async def test_error_row(api: Api, case: Row) -> None:
    failing = await case.setup(api)
    before = await api.call("head_revision")
    with pytest.raises(case.error) as info:
        await failing()
    err = info.value
    assert type(err) is case.error
    assert err.code == case.code
    assert err.reason == case.reason
    for key, value in case.metadata:
        assert err.metadata.get(key) == value
    if case.reason == Reason.VERSION_MISMATCH:
        assert err.current_version == int(dict(case.metadata)["current_version"])
    assert err.message  # the server says what was wrong
    assert case.code.name in str(err)
    assert case.reason in str(err)
    assert await api.call("head_revision") == before, "a failed call changed the store"
    assert isinstance(err.__cause__, grpc.RpcError)


async def test_reads_are_not_retried_on_errors_other_than_unavailable(api: Api) -> None:
    # NotFound comes back at once (a retried read would still fail, but slower: this only checks the class)
    with pytest.raises(NotFound):
        await api.call("get_job", "missing")


async def test_revision_compacted(kind: str, make_server: Any) -> None:
    srv = make_server(history_size=4)
    async with opened(kind, srv.target) as api:
        for i in range(10):
            await api.call("create_job", f"j{i}")
        head = await api.call("head_revision")
        rec = await api.watch(start_revision=1)
        err = await rec.end()
        await rec.close()
        assert isinstance(err, OutOfRange)
        assert err.code == grpc.StatusCode.OUT_OF_RANGE
        assert err.reason == Reason.REVISION_COMPACTED
        assert err.oldest_revision == head - 4 + 1
        # the oldest held revision is still good to watch from
        rec = await api.watch(start_revision=err.oldest_revision)
        events = await rec.events(4)
        await rec.close()
        assert [e.revision for e in events] == list(range(head - 3, head + 1))


async def test_shutting_down(kind: str, make_server: Any) -> None:
    srv = make_server()
    async with opened(kind, srv.target) as api:
        w = await api.call("create_job", "a")
        # resume=False: a resuming stream would (rightly) try again after UNAVAILABLE
        rec = await api.watch(start_revision=w.revision, resume=False)
        assert (await rec.next_event()).revision == w.revision
        await asyncio.to_thread(srv.stop)
        err = await rec.end()
        await rec.close()
        assert isinstance(err, Unavailable)
        assert err.code == grpc.StatusCode.UNAVAILABLE
        assert err.reason == Reason.SHUTTING_DOWN


async def test_watcher_lagged(kind: str, make_server: Any) -> None:
    """A watcher that stops reading while writers go on ends with WATCHER_LAGGED naming where to resume."""
    srv = make_server(history_size=16)
    # No BDP probing: the flow-control window stays small, so an unread stream backs up into the server.
    options = [("grpc.http2.bdp_probe", 0)]
    async with opened(kind, srv.target) as writer:
        await writer.call("create_job", "big")
        await writer.call("create_execution", "big", "n1", compute_reference="e1")
        start = await writer.call("head_revision")
        reader = PausedReader(kind, srv.target, options, start + 1)
        first = await writer.call("update_execution", "big", "e1", status="first")
        assert [e.revision for e in (await reader.read_one()).events] == [first.revision]
        status = "x" * 4000
        # Each change carries ~4KB (the job with its execution): ~1.2MB written while the reader reads nothing.
        for i in range(300):
            await writer.call("update_execution", "big", "e1", status=f"{i}{status}")
        responses, err = await reader.read_to_end()
    assert isinstance(err, ResourceExhausted), f"stream ended with {err!r}"
    assert err.reason == Reason.WATCHER_LAGGED
    assert err.resume_revision is not None
    assert start + 1 < err.resume_revision <= start + 301
    # every change before the resume revision was delivered, in order, and nothing after it
    delivered = [e.revision for r in responses for e in r.events]
    assert delivered == list(range(start + 2, err.resume_revision))


class PausedReader:
    """A watch (resume=False) read only when asked: the stream backs up while it is not."""

    def __init__(self, kind: str, target: str, options: list[tuple[str, int]], start_revision: int) -> None:
        self.kind = kind
        if kind == "sync":
            self.client: Any = Client(target, channel=grpc.insecure_channel(target, options))
        else:
            self.client = AsyncClient(target, channel=grpc.aio.insecure_channel(target, options))
        self.stream = self.client.watch(start_revision=start_revision, resume=False)
        self.it: Any = self.stream.responses()

    async def read_one(self) -> spb.WatchResponse:
        if self.kind == "sync":
            return await asyncio.wait_for(asyncio.to_thread(next, self.it), 10)  # type: ignore[no-any-return]
        return await asyncio.wait_for(anext(self.it), 10)  # type: ignore[no-any-return]

    async def read_to_end(self) -> tuple[list[spb.WatchResponse], BaseException | None]:
        responses: list[spb.WatchResponse] = []
        err: BaseException | None = None
        try:
            while True:
                responses.append(await self.read_one())
        except (StopIteration, StopAsyncIteration):
            pass
        except JobStateError as exc:
            err = exc
        finally:
            self.stream.close()
            if self.kind == "sync":
                self.client.close()
            else:
                await self.client.close()
        return responses, err


# --- the exception classes ---------------------------------------------------------------------------------


def test_every_status_code_maps_to_exactly_one_class() -> None:
    classes = set()
    for code in grpc.StatusCode:
        if code == grpc.StatusCode.OK:
            continue
        cls = JobStateError.for_code(code)
        assert cls.code == code, f"{code} maps to {cls.__name__}, which declares {cls.code}"
        assert issubclass(cls, JobStateError)
        classes.add(cls)
    assert len(classes) == len(grpc.StatusCode) - 1


def test_each_class_declares_a_distinct_code() -> None:
    subclasses = JobStateError.__subclasses__()
    codes = [cls.code for cls in subclasses]
    assert len(codes) == len(set(codes)) == len(grpc.StatusCode) - 1
    assert grpc.StatusCode.OK not in codes
    with pytest.raises(TypeError, match="already maps"):
        type("Duplicate", (JobStateError,), {"code": grpc.StatusCode.NOT_FOUND})


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound, grpc.StatusCode.NOT_FOUND),
        (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
        (Aborted, grpc.StatusCode.ABORTED),
        (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
        (OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
        (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (Unavailable, grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_contract_classes(cls: type[JobStateError], code: grpc.StatusCode) -> None:
    assert cls.code == code
    assert JobStateError.for_code(code) is cls


class FakeCall(grpc.RpcError):
    """What from_rpc_error reads from a failed call; a stand-in for the transport, not for the client."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, Any], ...]) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._trailing


def status_details(reason: str, **metadata: str) -> bytes:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="jobstate", metadata=metadata))
    return status_pb2.Status(code=8, message="m", details=[detail]).SerializeToString()


def test_from_rpc_error_reads_error_info() -> None:
    raw = status_details(Reason.WATCHER_LAGGED, resume_revision="41")
    err = JobStateError.from_rpc_error(
        FakeCall(grpc.StatusCode.RESOURCE_EXHAUSTED, "lagged", (("x", "y"), ("grpc-status-details-bin", raw)))
    )
    assert type(err) is ResourceExhausted
    assert (err.reason, err.resume_revision, err.message) == (Reason.WATCHER_LAGGED, 41, "lagged")
    assert err.current_version is None
    assert err.oldest_revision is None


def test_from_rpc_error_reads_retry_info() -> None:
    info, retry = any_pb2.Any(), any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=Reason.RATE_LIMITED, domain="jobstate"))
    retry.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1, nanos=250_000_000)))
    raw = status_pb2.Status(code=8, message="slow down", details=[retry, info]).SerializeToString()
    err = JobStateError.from_rpc_error(
        FakeCall(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", (("grpc-status-details-bin", raw),))
    )
    assert (err.reason, err.retry_delay) == (Reason.RATE_LIMITED, 1.25)
    assert JobStateError.from_rpc_error(FakeCall(grpc.StatusCode.UNAVAILABLE, "", ())).retry_delay is None


def test_from_rpc_error_without_details() -> None:
    err = JobStateError.from_rpc_error(FakeCall(grpc.StatusCode.UNAVAILABLE, "", ()))
    assert type(err) is Unavailable
    assert (err.reason, err.metadata, err.message) == ("", {}, "")
    assert str(err) == "UNAVAILABLE: "


def test_from_rpc_error_with_garbage_details_keeps_the_code() -> None:
    err = JobStateError.from_rpc_error(
        FakeCall(grpc.StatusCode.ABORTED, "x", (("grpc-status-details-bin", b"\xff\xfe garbage"),))
    )
    assert type(err) is Aborted
    assert err.reason == ""


# --- the public API ----------------------------------------------------------------------------------------

PUBLIC = [
    "Aborted",
    "AlreadyExists",
    "AsyncClient",
    "AsyncInformer",
    "AsyncWatchStream",
    "Backoff",
    "Cancelled",
    "Client",
    "DataLoss",
    "DeadlineExceeded",
    "ExecutionDesiredState",
    "ExecutionState",
    "ExecutionStateType",
    "FailedPrecondition",
    "Informer",
    "Internal",
    "InvalidArgument",
    "JobCache",
    "JobHistoryEntry",
    "JobState",
    "JobStateError",
    "JobStateType",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "Reason",
    "ResourceExhausted",
    "RunCommandResult",
    "StorageSpec",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "WatchEvent",
    "WatchEventType",
    "WatchResponse",
    "WatchStream",
    "describe",
    "event_type_name",
    "execution_state",
    "execution_state_name",
    "job_state",
    "job_state_name",
]


def test_public_api() -> None:
    assert sorted(jobstate.client.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(jobstate.client, name) is not None
    namespace: dict[str, Any] = {}
    exec("from jobstate.client import *", namespace)
    assert set(PUBLIC) <= set(namespace)


def test_reasons_cover_the_contract_table() -> None:
    table = {
        "INVALID_ARGUMENT",
        "JOB_NOT_FOUND",
        "EXECUTION_NOT_FOUND",
        "JOB_ALREADY_EXISTS",
        "EXECUTION_ALREADY_EXISTS",
        "VERSION_MISMATCH",
        "STATE_MISMATCH",
        "JOB_TERMINAL",
        "EXECUTION_TERMINAL",
        "NODE_HAS_ACTIVE_EXECUTION",
        "REVISION_COMPACTED",
        "WATCHER_LAGGED",
        "SHUTTING_DOWN",
    }
    declared = {v for k, v in vars(Reason).items() if not k.startswith("_")}
    assert table <= declared
    assert all(getattr(Reason, name) == name for name in declared)


def test_py_typed_ships() -> None:
    marker = importlib.resources.files("jobstate.client").joinpath("py.typed")
    assert marker.is_file()
