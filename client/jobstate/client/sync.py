"""The blocking client."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
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


class Client:
    """A blocking client of ``jobstate.v1.JobStateService``.

    Every method returns the RPC's response message (``.job``, ``.revision``, ...) and raises a
    ``JobStateError`` subclass on failure. Reads are retried (``read_attempts`` in all) on UNAVAILABLE and on
    CANCELLED by a server stopping; a failed write never is (a write whose answer was lost may have been
    committed: read, then decide), except one refused with RATE_LIMITED, which was not applied: it is sent
    again after the server's RetryInfo delay, up to ``rate_limited_retries`` times (0: raise at once; the
    exception's ``retry_delay`` carries the hint).
    """

    def __init__(
        self,
        target: str = core.DEFAULT_TARGET,
        *,
        timeout: float | None = 10.0,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        channel: grpc.Channel | None = None,
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
                grpc.secure_channel(target, credentials, options=core.CHANNEL_OPTIONS)
                if credentials is not None
                else grpc.insecure_channel(target, options=core.CHANNEL_OPTIONS)
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

    def close(self) -> None:
        self.closed = True
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------------------------

    def _call(self, method: Callable[..., R], request: Any, *, read: bool = False) -> R:
        attempt = 0
        while True:
            attempt += 1
            try:
                return method(request, timeout=self.timeout, metadata=self.metadata)
            except grpc.RpcError as exc:
                err = JobStateError.from_rpc_error(exc)
                delay = core.retry_delay(self, err, attempt, read=read)
                if delay is None:
                    raise err from exc
            time.sleep(delay)

    # -- RPCs ----------------------------------------------------------------------------------------------

    def create_job(
        self, job_id: str = "", *, timeout: Seconds | None = None, comment: str = ""
    ) -> spb.CreateJobResponse:
        return self._call(self._stub.CreateJob, core.create_job_request(job_id, timeout, comment))

    def get_job(self, job_id: str) -> spb.GetJobResponse:
        return self._call(self._stub.GetJob, spb.GetJobRequest(job_id=job_id), read=True)

    def list_jobs(
        self, states: Iterable[JobStateLike] = (), node_id: str = "", page_size: int = 0, page_token: str = ""
    ) -> spb.ListJobsResponse:
        req = core.list_jobs_request(states, node_id, page_size, page_token)
        return self._call(self._stub.ListJobs, req, read=True)

    def iter_jobs(
        self, states: Iterable[JobStateLike] = (), node_id: str = "", page_size: int = 0
    ) -> Iterator[pb.JobState]:
        """Every matching job, page after page."""
        states = list(states)
        token = ""
        while True:
            page = self.list_jobs(states, node_id, page_size, token)
            yield from page.jobs
            token = page.next_page_token
            if not token:
                return

    def update_job_state(
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
        return self._call(self._stub.UpdateJobState, req)

    def create_execution(
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
        return self._call(self._stub.CreateExecution, req)

    def update_execution(
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
        return self._call(self._stub.UpdateExecution, req)

    def delete_job(self, job_id: str, *, expected_version: int = 0) -> spb.DeleteJobResponse:
        req = spb.DeleteJobRequest(job_id=job_id, expected_version=expected_version)
        return self._call(self._stub.DeleteJob, req)

    def get_job_history(self, job_id: str, page_size: int = 0, page_token: str = "") -> spb.GetJobHistoryResponse:
        req = spb.GetJobHistoryRequest(job_id=job_id, page_size=page_size, page_token=page_token)
        return self._call(self._stub.GetJobHistory, req, read=True)

    def iter_history(self, job_id: str, page_size: int = 0) -> Iterator[pb.JobHistoryEntry]:
        token = ""
        while True:
            page = self.get_job_history(job_id, page_size, token)
            yield from page.entries
            token = page.next_page_token
            if not token:
                return

    def head_revision(self) -> int:
        """The store's current revision."""
        return self.list_jobs(page_size=1).revision

    # -- Watch ---------------------------------------------------------------------------------------------

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
    ) -> WatchStream:
        """A stream of ``WatchEvent``s that resumes by itself (see ``WatchStream``)."""
        req = core.watch_request(job_ids, node_id, start_revision, send_initial_state, progress_interval)
        return WatchStream(self, req, resume=resume, on_resume=on_resume)


class WatchStream:
    """Iterates the events of a watch, one by one, across as many streams as it takes.

    After a dropped connection or WATCHER_LAGGED it opens a new stream at the last delivered revision + 1 (after
    a jittered backoff), so no change is repeated or missed. ``REVISION_COMPACTED`` (an ``OutOfRange``) is
    raised: the revisions needed are gone, and the caller must list again. ``close()`` (or leaving a ``with``)
    ends it from any thread. Bookmarks are yielded too; skip them when you only want changes.
    """

    def __init__(
        self, client: Client, request: spb.WatchRequest, *, resume: bool = True, on_resume: OnResume | None = None
    ) -> None:
        self._client = client
        if resume and not (request.start_revision or request.send_initial_state):
            request = core.first_watch_request(request, client.head_revision())
        self.cursor = WatchCursor(request)
        self._resume = resume
        self._on_resume = on_resume
        self._call: Any = None
        self._closed = threading.Event()

    @property
    def position(self) -> int:
        """Everything matching up to this revision has been delivered."""
        return self.cursor.position

    def close(self) -> None:
        self._closed.set()
        if self._call is not None:
            self._call.cancel()

    def __enter__(self) -> WatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def responses(self) -> Iterator[spb.WatchResponse]:
        """The raw responses (batches), resuming like the event iterator."""
        attempt = 0
        while not self._closed.is_set():
            self._call = self._client._stub.Watch(
                self.cursor.next_request(), metadata=self.cursor.call_metadata(self._client.metadata)
            )
            if self._closed.is_set():  # close() ran between the loop's check and the call: it missed this call
                self._call.cancel()
            try:
                for response in self._call:
                    attempt = 0
                    self.cursor.observe(response)
                    yield response
                return
            except grpc.RpcError as exc:
                if self._closed.is_set():
                    return
                # Read once the call has ended, when it cannot block: the header came first, if at all.
                self.cursor.remember_store(exc.initial_metadata())  # type: ignore[attr-defined]
                err = JobStateError.from_rpc_error(exc)
                if not (self._resume and not self._client.closed and self.cursor.can_resume(err)):
                    raise err from exc
                attempt += 1
                delay = self._client.backoff.delay(attempt)
                self.cursor.resumes += 1
                if self._on_resume is not None:
                    self._on_resume(err, attempt, delay)
                if self._closed.wait(delay):
                    return

    def __iter__(self) -> Iterator[spb.WatchEvent]:
        for response in self.responses():
            yield from response.events
