"""The gRPC layer: parse, call the store, map domain errors to status codes, build responses.

This is the only module that knows status codes. Each domain error becomes one status through
``STATUS_OF`` and carries a ``google.rpc.ErrorInfo`` (domain ``jobstate``) with the error's reason and
metadata, so a client in any language can switch on the reason.

Requests are parsed here rather than by grpc, so that garbage bytes get INVALID_ARGUMENT (grpc's own
deserializer failure would be INTERNAL). Watch responses arrive from the store already serialized (each
change is encoded once for all watchers), so Watch's response serializer is the identity.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, Protocol, TypeVar

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

# One table from domain error to status code; tests/integration/test_errors_raw.py checks it covers every error.
STATUS_OF: dict[type[errors.JobStateError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.JobNotFound: grpc.StatusCode.NOT_FOUND,
    errors.ExecutionNotFound: grpc.StatusCode.NOT_FOUND,
    errors.JobAlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.ExecutionAlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.VersionMismatch: grpc.StatusCode.ABORTED,
    errors.StateMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    errors.JobTerminal: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ExecutionTerminal: grpc.StatusCode.FAILED_PRECONDITION,
    errors.NodeHasActiveExecution: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceLimit: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.RevisionCompacted: grpc.StatusCode.OUT_OF_RANGE,
    errors.WatcherLagged: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    errors.StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
}


def to_status(exc: errors.JobStateError) -> grpc.Status:
    """The rich status of a domain error: code, message, and an ErrorInfo detail."""
    code = STATUS_OF.get(type(exc), grpc.StatusCode.INTERNAL)
    info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=ERROR_DOMAIN, metadata=exc.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    details = [detail]
    if isinstance(exc, errors.RateLimited):
        # The standard retry hint, so generic gRPC clients back off without knowing our reasons.
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(max(1_000_000, int(exc.retry_after * 1e9)))
        hint = any_pb2.Any()
        hint.Pack(retry)
        details.append(hint)
    status = status_pb2.Status(code=code.value[0], message=exc.message, details=details)
    return rpc_status.to_status(status)


class Observer(Protocol):
    """Receives one call per finished RPC (the metrics module implements it)."""

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None: ...


M = TypeVar("M", bound=message.Message)


def _parse(kind: type[M], data: bytes) -> M:
    try:
        return kind.FromString(data)
    except message.DecodeError as exc:
        raise errors.InvalidArgument(f"request is not a valid {kind.DESCRIPTOR.name}: {exc}") from exc


def _metadata(context: grpc.aio.ServicerContext[Any, Any], key: str) -> str:
    for k, v in context.invocation_metadata() or ():
        if k == key and isinstance(v, str):
            return v
    return ""


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: errors.JobStateError) -> NoReturn:
    status = to_status(exc)
    await context.abort(status.code, status.details, status.trailing_metadata)


class JobStateService:
    """The servicer of ``jobstate.v1.JobStateService`` over a ``Store``."""

    def __init__(self, store: Store, observer: Observer | None = None) -> None:
        self.store = store
        self.observer = observer
        # Set by ``begin_shutdown``: new calls get UNAVAILABLE / SHUTTING_DOWN while running ones finish.
        self.shutting_down = False
        # Unary calls running now, and when the last call of any kind arrived (time.monotonic): shutdown
        # waits for both to settle before it stops the gRPC server.
        self.in_flight = 0
        self.last_call = 0.0

    def begin_shutdown(self) -> None:
        """From now on every new call is refused with ``ShuttingDown``; calls already running go on."""
        self.shutting_down = True

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

    async def watch(self, data: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            self.last_call = time.monotonic()
            if self.shutting_down:
                raise errors.ShuttingDown("the server is shutting down")
            spec = self.watch_spec(_parse(spb.WatchRequest, data))
            if spec.start_revision:
                self.store.check_store_id(_metadata(context, STORE_ID_KEY))
            if self.store.store_id:
                # Sent before any event, so a client knows which store its revisions belong to from the start.
                await context.send_initial_metadata(((STORE_ID_KEY, self.store.store_id),))
            # aclosing: a cancelled call releases its watcher now, not whenever the generator is collected.
            async with contextlib.aclosing(self.store.watch(spec)) as stream:
                async for response in stream:
                    yield response
        except errors.JobStateError as exc:
            code = STATUS_OF.get(type(exc), grpc.StatusCode.INTERNAL)
            if isinstance(exc, errors.WatcherLagged):
                log.warning("watcher lagged, stream ended", extra={"peer": context.peer(), **exc.metadata})
            await _abort(context, exc)
        except BaseException:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            if self.observer is not None:
                self.observer.observe("Watch", code, time.perf_counter() - start)

    # -- wiring --------------------------------------------------------------------------------------------

    def _unary(
        self, name: str, kind: type[M], fn: Callable[[M], Awaitable[message.Message]]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        observer = self.observer

        async def handler(data: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> message.Message:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            self.in_flight += 1
            self.last_call = time.monotonic()
            try:
                if self.shutting_down:
                    raise errors.ShuttingDown("the server is shutting down")
                return await fn(_parse(kind, data))
            except errors.JobStateError as exc:
                code = STATUS_OF.get(type(exc), grpc.StatusCode.INTERNAL)
                await _abort(context, exc)
            except BaseException:
                code = grpc.StatusCode.UNKNOWN
                raise
            finally:
                self.in_flight -= 1
                if observer is not None:
                    observer.observe(name, code, time.perf_counter() - start)

        return grpc.unary_unary_rpc_method_handler(handler, request_deserializer=None, response_serializer=_serialize)

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        unary = {
            "CreateJob": (spb.CreateJobRequest, self.create_job),
            "GetJob": (spb.GetJobRequest, self.get_job),
            "ListJobs": (spb.ListJobsRequest, self.list_jobs),
            "UpdateJobState": (spb.UpdateJobStateRequest, self.update_job_state),
            "CreateExecution": (spb.CreateExecutionRequest, self.create_execution),
            "UpdateExecution": (spb.UpdateExecutionRequest, self.update_execution),
            "DeleteJob": (spb.DeleteJobRequest, self.delete_job),
            "GetJobHistory": (spb.GetJobHistoryRequest, self.get_job_history),
        }
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            name: self._unary(name, kind, fn)  # type: ignore[arg-type]
            for name, (kind, fn) in unary.items()
        }
        handlers["Watch"] = grpc.unary_stream_rpc_method_handler(
            self.watch, request_deserializer=None, response_serializer=None
        )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def _serialize(m: message.Message) -> bytes:
    return m.SerializeToString()
