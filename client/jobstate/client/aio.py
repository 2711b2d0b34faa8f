"""The asyncio client: the same methods as ``Client``, awaitable."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, TypeVar

import grpc

from jobstate.client import core
from jobstate.client.core import Backoff, ExecutionStateLike, JobStateLike, Seconds, WatchCursor
from jobstate.client.errors import JobStateError
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb
from jobstate.v1 import job_state_service_pb2_grpc as spb_grpc

R = TypeVar("R")
OnResume = Callable[[JobStateError, int, float], None]


class AsyncClient:
    """An asyncio client of ``jobstate.v1.JobStateService``; see ``Client`` for the behaviour."""

    def __init__(
        self,
        target: str = core.DEFAULT_TARGET,
        *,
        timeout: float | None = 10.0,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        channel: grpc.aio.Channel | None = None,
        backoff: Backoff = core.DEFAULT_BACKOFF,
        read_attempts: int = 4,
        rate_limited_retries: int = 3,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        token: str | None = None,
    ) -> None:
        """``tls_ca``/``tls_cert``/``tls_key``: TLS (see ``core.channel_credentials``) unless ``credentials`` or
        ``channel`` is given. ``token``: sent as ``authorization: Bearer``; None reads $JOBSTATE_TOKEN."""
        if credentials is None:
            credentials = core.channel_credentials(tls_ca, tls_cert, tls_key)
        if channel is None:
            channel = (
                grpc.aio.secure_channel(target, credentials, options=core.CHANNEL_OPTIONS)
                if credentials is not None
                else grpc.aio.insecure_channel(target, options=core.CHANNEL_OPTIONS)
            )
        self.target = target
        self.channel = channel
        self.timeout = timeout
        self.metadata = core.call_metadata(metadata, token)
        self.backoff = backoff
        self.read_attempts = read_attempts
        self.rate_limited_retries = rate_limited_retries
        self._stub = spb_grpc.JobStateServiceStub(channel)
        # Set by close(): the calls it cancels end there, never retried or resumed.
        self.closed = False

    async def close(self) -> None:
        self.closed = True
        await self.channel.close(None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Callable[..., Any], request: Any, *, read: bool = False) -> Any:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await method(request, timeout=self.timeout, metadata=self.metadata)
            except grpc.RpcError as exc:
                err = JobStateError.from_rpc_error(exc)
                delay = core.retry_delay(self, err, attempt, read=read)
                if delay is None:
                    raise err from exc
            await asyncio.sleep(delay)

    async def create_job(
        self, job_id: str = "", *, timeout: Seconds | None = None, comment: str = ""
    ) -> spb.CreateJobResponse:
        r: spb.CreateJobResponse = await self._call(
            self._stub.CreateJob, core.create_job_request(job_id, timeout, comment)
        )
        return r

    async def get_job(self, job_id: str) -> spb.GetJobResponse:
        r: spb.GetJobResponse = await self._call(self._stub.GetJob, spb.GetJobRequest(job_id=job_id), read=True)
        return r

    async def list_jobs(
        self, states: Iterable[JobStateLike] = (), node_id: str = "", page_size: int = 0, page_token: str = ""
    ) -> spb.ListJobsResponse:
        req = core.list_jobs_request(states, node_id, page_size, page_token)
        r: spb.ListJobsResponse = await self._call(self._stub.ListJobs, req, read=True)
        return r

    async def iter_jobs(
        self, states: Iterable[JobStateLike] = (), node_id: str = "", page_size: int = 0
    ) -> AsyncIterator[pb.JobState]:
        states = list(states)
        token = ""
        while True:
            page = await self.list_jobs(states, node_id, page_size, token)
            for job in page.jobs:
                yield job
            token = page.next_page_token
            if not token:
                return

    async def update_job_state(
        self,
        job_id: str,
        new_state: JobStateLike,
        *,
        expected_version: int = 0,
        expected_state: JobStateLike | None = None,
        unexpected_states: Iterable[JobStateLike] = (),
        comment: str = "",
    ) -> spb.UpdateJobStateResponse:
        req = core.update_job_state_request(
            job_id,
            new_state,
            expected_version=expected_version,
            expected_state=expected_state,
            unexpected_states=unexpected_states,
            comment=comment,
        )
        r: spb.UpdateJobStateResponse = await self._call(self._stub.UpdateJobState, req)
        return r

    async def create_execution(
        self,
        job_id: str,
        node_id: str,
        *,
        compute_reference: str = "",
        state: ExecutionStateLike | None = None,
        desired_state: int = 0,
        status: str = "",
        comment: str = "",
    ) -> spb.CreateExecutionResponse:
        req = core.create_execution_request(
            job_id,
            node_id,
            compute_reference=compute_reference,
            state=state,
            desired_state=desired_state,
            status=status,
            comment=comment,
        )
        r: spb.CreateExecutionResponse = await self._call(self._stub.CreateExecution, req)
        return r

    async def update_execution(
        self,
        job_id: str,
        compute_reference: str,
        execution: pb.ExecutionState | None = None,
        *,
        state: ExecutionStateLike | None = None,
        status: str | None = None,
        update_mask: Sequence[str] | None = None,
        expected_version: int = 0,
        expected_states: Iterable[ExecutionStateLike] = (),
        unexpected_states: Iterable[ExecutionStateLike] = (),
        comment: str = "",
    ) -> spb.UpdateExecutionResponse:
        req = core.update_execution_request(
            job_id,
            compute_reference,
            execution,
            state=state,
            status=status,
            update_mask=update_mask,
            expected_version=expected_version,
            expected_states=expected_states,
            unexpected_states=unexpected_states,
            comment=comment,
        )
        r: spb.UpdateExecutionResponse = await self._call(self._stub.UpdateExecution, req)
        return r

    async def delete_job(self, job_id: str, *, expected_version: int = 0) -> spb.DeleteJobResponse:
        req = spb.DeleteJobRequest(job_id=job_id, expected_version=expected_version)
        r: spb.DeleteJobResponse = await self._call(self._stub.DeleteJob, req)
        return r

    async def get_job_history(self, job_id: str, page_size: int = 0, page_token: str = "") -> spb.GetJobHistoryResponse:
        req = spb.GetJobHistoryRequest(job_id=job_id, page_size=page_size, page_token=page_token)
        r: spb.GetJobHistoryResponse = await self._call(self._stub.GetJobHistory, req, read=True)
        return r

    async def iter_history(self, job_id: str, page_size: int = 0) -> AsyncIterator[pb.JobHistoryEntry]:
        token = ""
        while True:
            page = await self.get_job_history(job_id, page_size, token)
            for entry in page.entries:
                yield entry
            token = page.next_page_token
            if not token:
                return

    async def head_revision(self) -> int:
        return (await self.list_jobs(page_size=1)).revision

    def watch(
        self,
        job_ids: Iterable[str] = (),
        *,
        node_id: str = "",
        start_revision: int = 0,
        send_initial_state: bool = False,
        progress_interval: Seconds | None = None,
        resume: bool = True,
        on_resume: OnResume | None = None,
    ) -> AsyncWatchStream:
        req = core.watch_request(job_ids, node_id, start_revision, send_initial_state, progress_interval)
        return AsyncWatchStream(self, req, resume=resume, on_resume=on_resume)


class AsyncWatchStream:
    """The asyncio ``WatchStream``: ``async for event in client.watch(...)``."""

    def __init__(
        self,
        client: AsyncClient,
        request: spb.WatchRequest,
        *,
        resume: bool = True,
        on_resume: OnResume | None = None,
    ) -> None:
        self._client = client
        self._request = request
        self._resume = resume
        self._on_resume = on_resume
        self.cursor: WatchCursor | None = None
        self._call: Any = None
        self._closed = False
        self._woken = asyncio.Event()  # set by close(), so that a backoff wait ends at once

    @property
    def position(self) -> int:
        return self.cursor.position if self.cursor is not None else 0

    def close(self) -> None:
        self._closed = True
        self._woken.set()
        if self._call is not None:
            self._call.cancel()

    async def __aenter__(self) -> AsyncWatchStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def responses(self) -> AsyncIterator[spb.WatchResponse]:
        if self.cursor is None:
            req = self._request
            if self._resume and not (req.start_revision or req.send_initial_state):
                req = core.first_watch_request(req, await self._client.head_revision())
            self.cursor = WatchCursor(req)
        cursor = self.cursor
        attempt = 0
        while not self._closed:
            self._call = self._client._stub.Watch(
                cursor.next_request(), metadata=cursor.call_metadata(self._client.metadata)
            )
            try:
                async for response in self._call:
                    attempt = 0
                    if not cursor.store_id:
                        cursor.remember_store(await self._call.initial_metadata())
                    cursor.observe(response)
                    yield response
                return
            except asyncio.CancelledError:
                # grpc.aio raises CancelledError from a call cancelled locally: after close() from another task
                # that is the end of the stream, not a cancellation of the task iterating it.
                task = asyncio.current_task()
                if self._closed and (task is None or task.cancelling() == 0):
                    return
                raise
            except grpc.RpcError as exc:
                if self._closed:
                    return
                if isinstance(exc, grpc.aio.AioRpcError):
                    cursor.remember_store(exc.initial_metadata())
                err = JobStateError.from_rpc_error(exc)
                if not (self._resume and not self._client.closed and cursor.can_resume(err)):
                    raise err from exc
                attempt += 1
                delay = self._client.backoff.delay(attempt)
                cursor.resumes += 1
                if self._on_resume is not None:
                    self._on_resume(err, attempt, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._woken.wait(), delay)
            finally:
                if self._call is not None and not self._call.done():
                    self._call.cancel()

    async def __aiter__(self) -> AsyncIterator[spb.WatchEvent]:
        async for response in self.responses():
            for event in response.events:
                yield event
