"""The service's core: one set of methods behind two doors, and the one table of errors.

``JobStateService`` holds what every protocol shares: the methods (each takes a parsed request and returns the
response message), the Watch checks, shutdown (new calls refused with ``ShuttingDown``), the count of running
calls, and the observer (metrics) told of every finished call with its protocol. Two thin adapters call it:
``jobstate.server.grpc_door`` (gRPC over HTTP/2, grpc.aio) and ``jobstate.server.http_door`` (Connect and
gRPC-Web over HTTP/1.1). Neither holds a rule of its own.

``ERRORS`` is the only place that maps a domain error to how it goes on the wire: its gRPC status code, its
Connect code and the HTTP status a Connect unary error is answered with. Whatever the protocol, the error
carries the same ``google.rpc.ErrorInfo`` (domain ``jobstate``, the error's reason and metadata) packed as an
``Any``, plus a ``google.rpc.RetryInfo`` when the server knows when to retry (``error_details``).
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import any_pb2, message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from jobstate.server import errors, rules
from jobstate.server.hub import WatchSpec
from jobstate.server.store import Store
from jobstate.v1 import job_state_service_pb2 as spb

log = logging.getLogger("jobstate.server")

SERVICE_NAME = spb.DESCRIPTOR.services_by_name["JobStateService"].full_name
ERROR_DOMAIN = "jobstate"
MIN_PROGRESS_INTERVAL = 0.01
# Watch sends the store's id in this header; a client resuming by revision sends it back, so a server whose
# store was reset refuses the resume (REVISION_COMPACTED) instead of serving another history's revisions.
STORE_ID_KEY = "jobstate-store-id"

# Who is calling, as the security interceptor named the caller ("" when there is none): the store counts the
# jobs each caller created against its share of max_jobs. Set in the call's own task, so it never leaks.
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("jobstate_caller", default="")


@dataclass(frozen=True, slots=True)
class Wire:
    """How one domain error is said on the wire, in each protocol."""

    grpc: grpc.StatusCode
    connect: str  # the Connect code (https://connectrpc.com/docs/protocol#error-codes)
    http: int  # the HTTP status of a Connect unary error with that code


_INVALID = Wire(grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument", 400)
_NOT_FOUND = Wire(grpc.StatusCode.NOT_FOUND, "not_found", 404)
_EXISTS = Wire(grpc.StatusCode.ALREADY_EXISTS, "already_exists", 409)
_PRECONDITION = Wire(grpc.StatusCode.FAILED_PRECONDITION, "failed_precondition", 400)
_EXHAUSTED = Wire(grpc.StatusCode.RESOURCE_EXHAUSTED, "resource_exhausted", 429)
_UNAVAILABLE = Wire(grpc.StatusCode.UNAVAILABLE, "unavailable", 503)
# Anything that is not a domain error (a bug) is INTERNAL in every protocol.
INTERNAL = Wire(grpc.StatusCode.INTERNAL, "internal", 500)

# One table from domain error to status; tests/integration/test_errors_raw.py checks it covers every error, and
# tests/http/test_http_errors.py that each row comes out of both doors as written here.
ERRORS: dict[type[errors.JobStateError], Wire] = {
    errors.InvalidArgument: _INVALID,
    errors.JobNotFound: _NOT_FOUND,
    errors.ExecutionNotFound: _NOT_FOUND,
    errors.JobAlreadyExists: _EXISTS,
    errors.ExecutionAlreadyExists: _EXISTS,
    errors.VersionMismatch: Wire(grpc.StatusCode.ABORTED, "aborted", 409),
    errors.StateMismatch: _PRECONDITION,
    errors.JobTerminal: _PRECONDITION,
    errors.ExecutionTerminal: _PRECONDITION,
    errors.NodeHasActiveExecution: _PRECONDITION,
    errors.ResourceLimit: _EXHAUSTED,
    errors.RateLimited: _EXHAUSTED,
    errors.Unauthenticated: Wire(grpc.StatusCode.UNAUTHENTICATED, "unauthenticated", 401),
    errors.PermissionDenied: Wire(grpc.StatusCode.PERMISSION_DENIED, "permission_denied", 403),
    errors.RevisionCompacted: Wire(grpc.StatusCode.OUT_OF_RANGE, "out_of_range", 400),
    errors.WatcherLagged: _EXHAUSTED,
    errors.ShuttingDown: _UNAVAILABLE,
    errors.StoreUnavailable: _UNAVAILABLE,
}
# The gRPC column alone, as older code and tests know it.
STATUS_OF: dict[type[errors.JobStateError], grpc.StatusCode] = {k: w.grpc for k, w in ERRORS.items()}


def wire_of(exc: errors.JobStateError) -> Wire:
    return ERRORS.get(type(exc), INTERNAL)


def error_details(exc: errors.JobStateError) -> list[any_pb2.Any]:
    """The error's details, each packed as an ``Any``: the ErrorInfo, and a RetryInfo when rate limited."""
    info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=ERROR_DOMAIN, metadata=exc.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    details = [detail]
    if isinstance(exc, errors.RateLimited):
        # The standard retry hint, so generic clients back off without knowing our reasons.
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(max(1_000_000, int(exc.retry_after * 1e9)))
        hint = any_pb2.Any()
        hint.Pack(retry)
        details.append(hint)
    return details


def to_status(exc: errors.JobStateError) -> grpc.Status:
    """The rich gRPC status of a domain error: code, message, and the details."""
    status = status_pb2.Status(code=wire_of(exc).grpc.value[0], message=exc.message, details=error_details(exc))
    return rpc_status.to_status(status)


class Observer(Protocol):
    """Receives one call per finished RPC (the metrics module implements it). ``protocol`` is the door it came
    through: ``grpc``, ``connect`` or ``grpc-web``."""

    def observe(self, method: str, code: grpc.StatusCode, seconds: float, protocol: str = "grpc") -> None: ...


M = TypeVar("M", bound=message.Message)
R = TypeVar("R", bound=message.Message)


def parse(kind: type[M], data: bytes) -> M:
    """A request from its bytes; garbage is INVALID_ARGUMENT (never INTERNAL)."""
    try:
        return kind.FromString(data)
    except message.DecodeError as exc:
        raise errors.InvalidArgument(f"request is not a valid {kind.DESCRIPTOR.name}: {exc}") from exc


class JobStateService:
    """``jobstate.v1.JobStateService`` over a ``Store``: the methods both doors call."""

    def __init__(self, store: Store, observer: Observer | None = None) -> None:
        self.store = store
        self.observer = observer
        # Set by ``begin_shutdown``: new calls get UNAVAILABLE / SHUTTING_DOWN while running ones finish.
        self.shutting_down = False
        # Unary calls running now, and when the last call of any kind arrived (time.monotonic): shutdown
        # waits for both to settle before it stops the servers.
        self.in_flight = 0
        self.last_call = 0.0
        # Each unary method by name: its request type and the method.
        self.unary: dict[str, tuple[type[message.Message], Callable[[Any], Awaitable[message.Message]]]] = {
            "CreateJob": (spb.CreateJobRequest, self.create_job),
            "GetJob": (spb.GetJobRequest, self.get_job),
            "ListJobs": (spb.ListJobsRequest, self.list_jobs),
            "UpdateJobState": (spb.UpdateJobStateRequest, self.update_job_state),
            "CreateExecution": (spb.CreateExecutionRequest, self.create_execution),
            "UpdateExecution": (spb.UpdateExecutionRequest, self.update_execution),
            "DeleteJob": (spb.DeleteJobRequest, self.delete_job),
            "GetJobHistory": (spb.GetJobHistoryRequest, self.get_job_history),
        }

    def begin_shutdown(self) -> None:
        """From now on every new call is refused with ``ShuttingDown``; calls already running go on."""
        self.shutting_down = True

    def observe(self, method: str, code: grpc.StatusCode, start: float, protocol: str) -> None:
        if self.observer is not None:
            self.observer.observe(method, code, time.perf_counter() - start, protocol)

    async def call(self, name: str, protocol: str, run: Callable[[], Awaitable[R]]) -> R:
        """Runs one unary call (``run`` parses the request and calls the method): refused while shutting down,
        counted while it runs, observed when it ends. Domain errors go up to the door, which says them in its
        protocol."""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        self.in_flight += 1
        self.last_call = time.monotonic()
        try:
            if self.shutting_down:
                raise errors.ShuttingDown("the server is shutting down")
            return await run()
        except errors.JobStateError as exc:
            code = wire_of(exc).grpc
            raise
        except BaseException:
            code = grpc.StatusCode.UNKNOWN
            raise
        finally:
            self.in_flight -= 1
            self.observe(name, code, start, protocol)

    # -- unary RPCs: each takes the parsed request and returns the response message ------------------------

    async def create_job(self, req: spb.CreateJobRequest) -> spb.CreateJobResponse:
        timeout_ns = req.timeout.ToNanoseconds() if req.HasField("timeout") else 0
        if req.HasField("timeout") and timeout_ns <= 0:
            raise errors.InvalidArgument("timeout must be positive when set", field="timeout")
        r = await self.store.create_job(req.job_id, timeout_ns, req.comment, owner=CALLER.get())
        return spb.CreateJobResponse(job=r.job, revision=r.revision)

    async def get_job(self, req: spb.GetJobRequest) -> spb.GetJobResponse:
        r = await self.store.get_job(req.job_id)
        return spb.GetJobResponse(job=r.job, revision=r.revision)

    async def list_jobs(self, req: spb.ListJobsRequest) -> spb.ListJobsResponse:
        page = await self.store.list_jobs(list(req.states), req.node_id, req.page_size, req.page_token)
        return spb.ListJobsResponse(jobs=page.jobs, next_page_token=page.next_page_token, revision=page.revision)

    async def update_job_state(self, req: spb.UpdateJobStateRequest) -> spb.UpdateJobStateResponse:
        cond = req.condition if req.HasField("condition") else None
        r = await self.store.update_job_state(req.job_id, req.new_state, cond, req.comment)
        return spb.UpdateJobStateResponse(job=r.job, revision=r.revision)

    async def create_execution(self, req: spb.CreateExecutionRequest) -> spb.CreateExecutionResponse:
        r = await self.store.create_execution(req.job_id, req.execution, req.comment)
        return spb.CreateExecutionResponse(job=r.job, revision=r.revision, execution=r.execution)

    async def update_execution(self, req: spb.UpdateExecutionRequest) -> spb.UpdateExecutionResponse:
        cond = req.condition if req.HasField("condition") else None
        r = await self.store.update_execution(
            req.job_id, req.compute_reference, req.execution, req.update_mask, cond, req.comment
        )
        return spb.UpdateExecutionResponse(job=r.job, revision=r.revision, execution=r.execution)

    async def delete_job(self, req: spb.DeleteJobRequest) -> spb.DeleteJobResponse:
        r = await self.store.delete_job(req.job_id, req.expected_version)
        return spb.DeleteJobResponse(job=r.job, revision=r.revision)

    async def get_job_history(self, req: spb.GetJobHistoryRequest) -> spb.GetJobHistoryResponse:
        page = await self.store.get_history(req.job_id, req.page_size, req.page_token)
        return spb.GetJobHistoryResponse(
            entries=page.entries, next_page_token=page.next_page_token, dropped_entries=page.dropped
        )

    # -- Watch ---------------------------------------------------------------------------------------------

    def watch_spec(self, req: spb.WatchRequest) -> WatchSpec:
        limits = self.store.limits
        if len(req.job_ids) > limits.max_watch_job_ids:
            raise errors.InvalidArgument(f"job_ids names more than {limits.max_watch_job_ids} jobs", field="job_ids")
        for job_id in req.job_ids:
            rules.validate_id(job_id, "job_ids")
        rules.validate_id(req.node_id, "node_id", required=False)
        if req.start_revision < 0:
            raise errors.InvalidArgument("start_revision must not be negative", field="start_revision")
        if req.send_initial_state and req.start_revision:
            raise errors.InvalidArgument(
                "send_initial_state starts from the current state; it cannot be combined with start_revision",
                field="start_revision",
            )
        interval: float | None = None
        if req.HasField("progress_interval"):
            interval = req.progress_interval.ToNanoseconds() / 1e9
            if interval < MIN_PROGRESS_INTERVAL:
                raise errors.InvalidArgument(
                    f"progress_interval must be at least {MIN_PROGRESS_INTERVAL * 1000:.0f}ms",
                    field="progress_interval",
                )
        return WatchSpec(
            job_ids=frozenset(req.job_ids) if req.job_ids else None,
            node_id=req.node_id,
            start_revision=req.start_revision,
            send_initial_state=req.send_initial_state,
            progress_interval=interval,
        )

    def open_watch(self, req: spb.WatchRequest, presented_store_id: str) -> AsyncGenerator[bytes, None]:
        """The store's stream of serialized ``WatchResponse`` for one Watch call, after its checks: refused while
        shutting down, the request's fields, and a resume (``start_revision``) only from the same store
        (``presented_store_id``, the client's ``jobstate-store-id``). The door iterates it and sends the store id
        (``self.store.store_id``) before any event."""
        self.last_call = time.monotonic()
        if self.shutting_down:
            raise errors.ShuttingDown("the server is shutting down")
        spec = self.watch_spec(req)
        if spec.start_revision:
            self.store.check_store_id(presented_store_id)
        return self.store.watch(spec)

    def watch_ended(self, exc: errors.JobStateError, peer: str) -> grpc.StatusCode:
        """The status code of a Watch that ended with ``exc``; a lagged watcher is logged (the operator's hint
        that history is too short for the slowest reader)."""
        if isinstance(exc, errors.WatcherLagged):
            log.warning("watcher lagged, stream ended", extra={"peer": peer, **exc.metadata})
        return wire_of(exc).grpc
