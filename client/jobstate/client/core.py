"""What ``Client`` and ``AsyncClient`` share: request building, retry policy, watch resumption, the informer
cache. Everything here is free of I/O, so both clients behave the same and tests can check the logic alone.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
from google.protobuf import duration_pb2, field_mask_pb2

from jobstate.client import names
from jobstate.client.errors import JobStateError, Reason
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb

DEFAULT_TARGET = "127.0.0.1:50051"
SERVICE = "jobstate.v1.JobStateService"
MAX_MESSAGE_BYTES = 8 * 1024 * 1024

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Watch streams can be idle for long; pings keep NATs open and find dead servers.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]

# --- transport security and the caller's token ------------------------------------------------------------

TOKEN_ENV = "JOBSTATE_TOKEN"


def channel_credentials(
    tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None
) -> grpc.ChannelCredentials | None:
    """TLS credentials when any TLS file is given: ``tls_ca`` the CA to trust (default: the system's roots),
    ``tls_cert``/``tls_key`` this client's certificate and key for a server that requires them (mTLS)."""
    if tls_ca is None and tls_cert is None and tls_key is None:
        return None
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("a client certificate needs both tls_cert and tls_key")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(tls_ca).read_bytes() if tls_ca else None,
        private_key=Path(tls_key).read_bytes() if tls_key else None,
        certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None,
    )


def call_metadata(metadata: Sequence[tuple[str, str]], token: str | None) -> tuple[tuple[str, str], ...]:
    """``metadata`` plus ``authorization: Bearer <token>``; ``token`` None reads $JOBSTATE_TOKEN, "" sends none."""
    md = tuple(metadata)
    if token is None:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if token and not any(k.lower() == "authorization" for k, _ in md):
        md += (("authorization", f"Bearer {token}"),)
    return md


Seconds = float | int | dt.timedelta
JobStateLike = int | str
ExecutionStateLike = int | str


def _duration(value: Seconds) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    if isinstance(value, dt.timedelta):
        d.FromTimedelta(value)
    else:
        d.FromNanoseconds(int(value * 1_000_000_000))
    return d


def job_state(value: JobStateLike) -> int:
    """A ``JobStateType`` from its number, its full name, or its short name ("COMPLETED", "in_progress")."""
    if isinstance(value, int):
        return value
    name = value.strip().upper().replace("-", "_")
    if not name.startswith("JOB_STATE_TYPE_"):
        name = "JOB_STATE_TYPE_" + name
    try:
        return pb.JobStateType.Value(name)
    except ValueError:
        raise ValueError(f"unknown job state {value!r}") from None


def execution_state(value: ExecutionStateLike) -> int:
    """An ``ExecutionStateType`` from its number, its full name, or its short name ("BID_ACCEPTED")."""
    if isinstance(value, int):
        return value
    name = value.strip().upper().replace("-", "_")
    if not name.startswith("EXECUTION_STATE_TYPE_"):
        name = "EXECUTION_STATE_TYPE_" + name
    try:
        return pb.ExecutionStateType.Value(name)
    except ValueError:
        raise ValueError(f"unknown execution state {value!r}") from None


# The names the CLI prints and accepts; one definition, in ``names``.
short_job_state = names.job_state_name
short_execution_state = names.execution_state_name


# --- request building --------------------------------------------------------------------------------------


def create_job_request(job_id: str = "", timeout: Seconds | None = None, comment: str = "") -> spb.CreateJobRequest:
    req = spb.CreateJobRequest(job_id=job_id, comment=comment)
    if timeout is not None:
        req.timeout.CopyFrom(_duration(timeout))
    return req


def list_jobs_request(
    states: Iterable[JobStateLike] = (), node_id: str = "", page_size: int = 0, page_token: str = ""
) -> spb.ListJobsRequest:
    return spb.ListJobsRequest(
        states=[job_state(s) for s in states],  # type: ignore[misc]
        node_id=node_id,
        page_size=page_size,
        page_token=page_token,
    )


def update_job_state_request(
    job_id: str,
    new_state: JobStateLike,
    *,
    expected_version: int = 0,
    expected_state: JobStateLike | None = None,
    unexpected_states: Iterable[JobStateLike] = (),
    comment: str = "",
) -> spb.UpdateJobStateRequest:
    cond = spb.JobCondition(
        expected_version=expected_version,
        expected_state=job_state(expected_state) if expected_state is not None else 0,  # type: ignore[arg-type]
        unexpected_states=[job_state(s) for s in unexpected_states],  # type: ignore[misc]
    )
    return spb.UpdateJobStateRequest(
        job_id=job_id,
        new_state=job_state(new_state),  # type: ignore[arg-type]
        condition=cond,
        comment=comment,
    )


def create_execution_request(
    job_id: str,
    node_id: str,
    *,
    compute_reference: str = "",
    state: ExecutionStateLike | None = None,
    desired_state: int = 0,
    status: str = "",
    comment: str = "",
) -> spb.CreateExecutionRequest:
    e = pb.ExecutionState(
        node_id=node_id,
        compute_reference=compute_reference,
        state=execution_state(state) if state is not None else 0,  # type: ignore[arg-type]
        desired_state=desired_state,  # type: ignore[arg-type]
        status=status,
    )
    return spb.CreateExecutionRequest(job_id=job_id, execution=e, comment=comment)


def update_execution_request(
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
) -> spb.UpdateExecutionRequest:
    """``execution`` plus the ``state``/``status`` shortcuts; the mask is the given one, or the fields the
    shortcuts set (plus every field set in ``execution`` when no mask is given and no shortcut is used)."""
    e = pb.ExecutionState()
    if execution is not None:
        e.CopyFrom(execution)
    paths = list(update_mask) if update_mask is not None else []
    if state is not None:
        e.state = execution_state(state)  # type: ignore[assignment]
        if update_mask is None:
            paths.append("state")
    if status is not None:
        e.status = status
        if update_mask is None:
            paths.append("status")
    if update_mask is None and execution is not None and paths:
        paths = []  # mixed use: let the server take every field set
    cond = spb.ExecutionCondition(
        expected_version=expected_version,
        expected_states=[execution_state(s) for s in expected_states],  # type: ignore[misc]
        unexpected_states=[execution_state(s) for s in unexpected_states],  # type: ignore[misc]
    )
    return spb.UpdateExecutionRequest(
        job_id=job_id,
        compute_reference=compute_reference,
        execution=e,
        update_mask=field_mask_pb2.FieldMask(paths=paths),
        condition=cond,
        comment=comment,
    )


def watch_request(
    job_ids: Iterable[str] = (),
    node_id: str = "",
    start_revision: int = 0,
    send_initial_state: bool = False,
    progress_interval: Seconds | None = None,
) -> spb.WatchRequest:
    req = spb.WatchRequest(
        job_ids=list(job_ids), node_id=node_id, start_revision=start_revision, send_initial_state=send_initial_state
    )
    if progress_interval is not None:
        req.progress_interval.CopyFrom(_duration(progress_interval))
    return req


# --- retries -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter (so that clients cut off together do not return together)."""

    initial: float = 0.05
    maximum: float = 5.0
    multiplier: float = 2.0
    max_attempts: int = 0  # 0: unlimited (watch resumption); reads use ``read_attempts``

    def delay(self, attempt: int) -> float:
        try:
            growth = self.multiplier ** max(0, attempt - 1)
        except OverflowError:  # ~1000 failures in a row (a long outage): far past the maximum anyway
            growth = math.inf
        cap = min(self.maximum, self.initial * growth)
        return random.uniform(cap / 2, cap)


DEFAULT_BACKOFF = Backoff()
# CANCELLED reaches a caller only when the other side cancelled the call: a call the caller cancels itself
# ends before any retry is considered (the clients check for that first). A server cancels the calls still
# queued when it stops (grpc's server.stop), so a read or a watch that raced a restart sees CANCELLED, and
# trying again, elsewhere or after the restart, is what the caller wants.
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


def should_retry_read(exc: JobStateError) -> bool:
    """Reads are idempotent: retry them when the server could not be reached, is restarting, or cancelled
    the call while stopping."""
    return exc.code in RETRYABLE_CODES


# The longest a RetryInfo hint is waited for in one go: a hint past it is the server's configuration gone odd.
MAX_RETRY_HINT = 30.0


class RetryPolicy(Protocol):
    """What ``retry_delay`` reads of a client."""

    closed: bool
    backoff: Backoff
    read_attempts: int
    rate_limited_retries: int


def retry_delay(client: RetryPolicy, exc: JobStateError, attempt: int, *, read: bool) -> float | None:
    """How long to wait before sending a failed call again (its ``attempt``-th failure), or None to raise.

    Reads are retried on UNAVAILABLE and CANCELLED (``read_attempts`` attempts in all). Any call refused with
    RATE_LIMITED was not applied, so writes too are sent again, after the server's RetryInfo delay, up to
    ``rate_limited_retries`` times. A write that failed otherwise is never retried: it may have been committed.
    A closed client retries nothing.
    """
    if client.closed:
        return None
    if read and attempt < client.read_attempts and should_retry_read(exc):
        return client.backoff.delay(attempt)
    if exc.reason == Reason.RATE_LIMITED and attempt <= client.rate_limited_retries:
        hint = exc.retry_delay if exc.retry_delay is not None else client.backoff.delay(attempt)
        return min(hint, MAX_RETRY_HINT)
    return None


# --- watch resumption --------------------------------------------------------------------------------------


STORE_ID_KEY = "jobstate-store-id"


@dataclass
class WatchCursor:
    """Where a watch stands, so that a dropped stream resumes at the next revision, never replaying one.

    ``position`` is the revision up to which everything matching has been delivered (the last response's
    ``revision``). While an initial snapshot is still arriving (before its BOOKMARK) there is no position
    yet: a stream dropped then starts the snapshot again.
    """

    request: spb.WatchRequest
    position: int = 0
    synced: bool = False
    resumes: int = 0
    # Whether ``position`` is known: a live watch (start_revision 0) learns it from its first response, and
    # until then must be sent as it was asked (start_revision 1 would replay the whole history).
    positioned: bool = False
    # The store the revisions belong to (the server's jobstate-store-id header). Sent back on every resume, so
    # a server whose store was reset answers REVISION_COMPACTED instead of serving another history.
    store_id: str = ""

    def remember_store(self, metadata: Any) -> None:
        if self.store_id:
            return
        for key, value in metadata or ():
            if key == STORE_ID_KEY and isinstance(value, str):
                self.store_id = value

    def call_metadata(self, base: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        return (*base, (STORE_ID_KEY, self.store_id)) if self.store_id else base

    def __post_init__(self) -> None:
        if self.request.start_revision:
            self.position = self.request.start_revision - 1
            self.positioned = True
        self.synced = not self.request.send_initial_state

    def observe(self, response: spb.WatchResponse) -> None:
        for event in response.events:
            if event.type == spb.WATCH_EVENT_TYPE_BOOKMARK:
                self.synced = True
        if self.synced:
            last = max((e.revision for e in response.events), default=0)
            self.position = max(self.position, response.revision, last)
            self.positioned = True

    def next_request(self) -> spb.WatchRequest:
        req = spb.WatchRequest()
        req.CopyFrom(self.request)
        if self.synced and self.positioned:
            req.send_initial_state = False
            req.start_revision = self.position + 1
        return req

    def can_resume(self, exc: JobStateError) -> bool:
        """True for a dropped connection, a call the server cancelled or a lagged watcher; False for everything
        the caller must handle (REVISION_COMPACTED means: relist)."""
        if exc.code in RETRYABLE_CODES:
            return True
        if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED and exc.reason == Reason.WATCHER_LAGGED:
            return True
        return exc.code == grpc.StatusCode.INTERNAL and "RST_STREAM" in exc.message


def first_watch_request(req: spb.WatchRequest, head_revision: int) -> spb.WatchRequest:
    """A live watch (start_revision 0) resumes from the revision it started at, so the first position must be
    known: pin it to ``head_revision + 1`` (from a read) when the caller did not give one."""
    if req.start_revision or req.send_initial_state:
        return req
    pinned = spb.WatchRequest()
    pinned.CopyFrom(req)
    pinned.start_revision = head_revision + 1
    return pinned


# --- informer cache ----------------------------------------------------------------------------------------


@dataclass
class JobCache:
    """A local copy of the jobs, kept current by watch events.

    Lists are read page by page at different revisions, so each job remembers the revision it was last seen
    at; an event applies only if it is newer, which makes replaying changes since the first page harmless.
    """

    jobs: dict[str, pb.JobState] = field(default_factory=dict)
    seen_at: dict[str, int] = field(default_factory=dict)
    revision: int = 0

    def load(self, jobs: Iterable[pb.JobState], revision: int) -> None:
        for job in jobs:
            if self.seen_at.get(job.job_id, 0) <= revision:
                self.jobs[job.job_id] = job
                self.seen_at[job.job_id] = revision

    def apply(self, event: spb.WatchEvent) -> bool:
        """Applies one event; returns whether it changed the cache."""
        if event.type == spb.WATCH_EVENT_TYPE_BOOKMARK:
            self.revision = max(self.revision, event.revision)
            return False
        job_id = event.job.job_id
        last = self.seen_at.get(job_id)
        if last is None:
            # A deleted job leaves no trace here (retention removes jobs all day long, so tombstones would pile
            # up): a change of a job not held, at or before the newest revision applied, repeats one from before
            # a resume. INITIAL events come in list order, not revision order, so they are exempt.
            if event.type != spb.WATCH_EVENT_TYPE_INITIAL and event.revision <= self.revision:
                return False
        elif event.revision <= last:
            return False
        self.revision = max(self.revision, event.revision)
        if event.type == spb.WATCH_EVENT_TYPE_DELETED:
            self.seen_at.pop(job_id, None)
            return self.jobs.pop(job_id, None) is not None
        self.seen_at[job_id] = event.revision
        self.jobs[job_id] = event.job
        return True

    def clear(self) -> None:
        self.jobs.clear()
        self.seen_at.clear()
        self.revision = 0
