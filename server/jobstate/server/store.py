"""The store: the one source of truth for jobs, behind an interface every engine implements.

``Store`` is the interface the service calls; its methods are ``async`` so that a networked engine (etcd)
can implement it too. ``MemoryStore`` is the embedded engine: a dict of jobs, each job's history, and a
``WatchHub`` that it publishes every change to.

Atomicity of ``MemoryStore``: every write runs from validation to publish without an ``await``, on the event
loop's one thread, so no reader or watcher can observe half a change and revisions are published in order.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import bisect
import heapq
import itertools
import json
import sys
import time
import uuid
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import field_mask_pb2

from jobstate.server import changes, rules
from jobstate.server.errors import InvalidArgument, JobAlreadyExists, JobNotFound, ResourceLimit, RevisionCompacted
from jobstate.server.hub import CREATED, DELETED, UPDATED, Change, Snapshot, WatchHub, WatchSpec, node_tuple
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb


@dataclass(slots=True)
class WriteResult:
    job: pb.JobState
    revision: int
    execution: pb.ExecutionState | None = None


@dataclass(slots=True)
class ReadResult:
    job: pb.JobState
    revision: int


@dataclass(slots=True)
class JobPage:
    jobs: list[pb.JobState]
    next_page_token: str
    revision: int


@dataclass(slots=True)
class HistoryPage:
    entries: list[pb.JobHistoryEntry]
    next_page_token: str
    # The job's earliest changes no longer held (``--max-history-per-job``): the first held is version dropped+1.
    dropped: int = 0


@dataclass(slots=True)
class StoreStats:
    jobs: int
    jobs_by_state: dict[int, int]
    revision: int
    history_held: int
    history_size: int
    watchers: int
    watcher_lags: list[int] = field(default_factory=list)
    # What the held history takes in memory by the hub's account, and its budget (0: none).
    history_bytes_held: int = 0
    history_bytes: int = 0
    # History entries of the jobs held (GetJobHistory's), all jobs together; -1: the engine does not count them.
    job_history_entries: int = -1


class Store(abc.ABC):
    """What every storage engine offers. Each method validates its input and raises ``JobStateError``s."""

    limits: rules.Limits
    # Names the store's revision history: a new in-memory store, a new SQLite database or another etcd cluster
    # gets another id. Revisions only mean something within one id ("" until the engine knows its own).
    store_id: str = ""

    @property
    def oldest_revision(self) -> int:
        """The oldest revision a watch can start from, as far as the engine knows."""
        return 1

    def check_store_id(self, expected: str) -> None:
        """Refuses to resume a watch whose revisions came from another store.

        A client resuming at revision N from a server whose store was reset (an in-memory server restarted at the
        same address) would otherwise be served that store's own revision N onward, silently missing changes.
        """
        if expected and self.store_id and expected != self.store_id:
            raise RevisionCompacted(
                f"the watch's revisions come from store {expected}, this server serves store {self.store_id} "
                "(it was reset or replaced): list again, then watch from the list's revision",
                oldest_revision=self.oldest_revision,
                store_id=self.store_id,
            )

    @abc.abstractmethod
    async def create_job(self, job_id: str, timeout_ns: int = 0, comment: str = "", owner: str = "") -> WriteResult:
        """``owner`` names the caller creating the job, for ``limits.max_jobs_per_client`` ("": nobody's)."""

    @abc.abstractmethod
    async def get_job(self, job_id: str) -> ReadResult: ...

    @abc.abstractmethod
    async def list_jobs(
        self, states: Sequence[int] = (), node_id: str = "", page_size: int = 0, page_token: str = ""
    ) -> JobPage: ...

    @abc.abstractmethod
    async def update_job_state(
        self, job_id: str, new_state: int, condition: spb.JobCondition | None = None, comment: str = ""
    ) -> WriteResult: ...

    @abc.abstractmethod
    async def create_execution(self, job_id: str, execution: pb.ExecutionState, comment: str = "") -> WriteResult: ...

    @abc.abstractmethod
    async def update_execution(
        self,
        job_id: str,
        compute_reference: str,
        execution: pb.ExecutionState,
        update_mask: field_mask_pb2.FieldMask | None = None,
        condition: spb.ExecutionCondition | None = None,
        comment: str = "",
    ) -> WriteResult: ...

    @abc.abstractmethod
    async def delete_job(self, job_id: str, expected_version: int = 0) -> WriteResult: ...

    @abc.abstractmethod
    async def get_history(self, job_id: str, page_size: int = 0, page_token: str = "") -> HistoryPage: ...

    @abc.abstractmethod
    def watch(self, spec: WatchSpec) -> AsyncGenerator[bytes, None]:
        """Serialized ``WatchResponse`` messages; see ``WatchHub.watch``."""

    @abc.abstractmethod
    async def expire_due(self, now_ns: int | None = None) -> int:
        """Moves every job whose timeout has passed to ERROR ("timed out"); returns how many."""

    @abc.abstractmethod
    def next_timeout_ns(self) -> int | None:
        """When the earliest pending timeout falls due (wall clock, ns), or None."""

    async def remove_finished(self, before_ns: int, limit: int) -> int:
        """Removes up to ``limit`` jobs that reached a final state at or before ``before_ns`` (wall clock), each
        as one DELETED change with cause RETENTION, oldest first; returns how many. Non-final jobs are never
        removed. An engine without retention removes nothing."""
        return 0

    def next_finished_ns(self) -> int | None:
        """When the job that has been final longest became final (wall clock, ns), or None."""
        return None

    async def maintain(self) -> None:  # noqa: B027 (optional hook)
        """Gives the space of removed jobs back (an engine on disk); called after a sweep removed jobs."""

    @abc.abstractmethod
    def stats(self) -> StoreStats: ...

    async def start(self) -> None:  # noqa: B027 (optional hook: most engines have nothing to start)
        """Called once before the server takes calls: an engine that connects somewhere does it here."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Ends watch streams with ``ShuttingDown``; the engine's resources are released."""


def _matches(rec: _Record, wanted: frozenset[int], node_id: str) -> bool:
    return (not wanted or rec.state in wanted) and (not node_id or node_id in rec.nodes)


# --- page tokens -------------------------------------------------------------------------------------------
# Opaque to clients (base64 of a small JSON array), checked on the way in: a token that does not parse is
# INVALID_ARGUMENT, never an exception.


def encode_token(*parts: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(parts, separators=(",", ":")).encode()).decode()


def decode_token(token: str, shape: tuple[type, ...]) -> list[object]:
    try:
        parts = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, UnicodeError) as exc:
        raise InvalidArgument("page_token is not a token this server issued", field="page_token") from exc
    if (
        not isinstance(parts, list)
        or len(parts) != len(shape)
        or not all(isinstance(p, t) for p, t in zip(parts, shape, strict=True))
    ):
        raise InvalidArgument("page_token is not a token this server issued", field="page_token")
    return parts


# --- validation shared by engines --------------------------------------------------------------------------


# Each engine calls these first, so a request is judged the same way whatever stores it.


def validate_create_job(job_id: str, timeout_ns: int, comment: str, limits: rules.Limits) -> None:
    rules.validate_id(job_id, "job_id", required=False)
    rules.validate_text(comment, "comment", limits.max_comment_bytes)
    if timeout_ns < 0:
        raise InvalidArgument("timeout must not be negative", field="timeout")
    if timeout_ns > limits.max_timeout_seconds * 1_000_000_000:
        raise InvalidArgument(f"timeout is longer than {limits.max_timeout_seconds} seconds", field="timeout")


def validate_update_job_state(
    new_state: int, condition: spb.JobCondition | None, comment: str, limits: rules.Limits
) -> None:
    rules.validate_job_state(new_state, "new_state")
    if condition is not None:
        rules.validate_job_condition(condition)
    rules.validate_text(comment, "comment", limits.max_comment_bytes)


def validate_create_execution(execution: pb.ExecutionState, comment: str, limits: rules.Limits) -> None:
    rules.validate_id(execution.node_id, "execution.node_id")
    rules.validate_id(execution.compute_reference, "execution.compute_reference", required=False)
    rules.validate_execution_values(execution, limits)
    rules.validate_text(comment, "comment", limits.max_comment_bytes)


def validate_update_execution(
    compute_reference: str,
    execution: pb.ExecutionState,
    update_mask: field_mask_pb2.FieldMask | None,
    condition: spb.ExecutionCondition | None,
    comment: str,
    limits: rules.Limits,
) -> list[str]:
    """Validates an UpdateExecution and returns the field paths it changes."""
    rules.validate_id(compute_reference, "compute_reference")
    paths = rules.execution_update_paths(execution, update_mask or field_mask_pb2.FieldMask())
    rules.validate_execution_values(execution, limits)
    if condition is not None:
        rules.validate_execution_condition(condition)
    rules.validate_text(comment, "comment", limits.max_comment_bytes)
    return paths


class PageBytes:
    """Ends a page before its items pass ``Limits.max_page_bytes``; the first item always fits, so every page
    makes progress (one job is at most ``max_job_bytes``, well under the message limit)."""

    __slots__ = ("budget", "used")

    def __init__(self, limits: rules.Limits) -> None:
        self.budget = limits.max_page_bytes
        self.used = 0

    def fits(self, item_bytes: int) -> bool:
        # Each item is framed in the response by a tag and its length (at most 4 bytes for 2 MiB).
        cost = item_bytes + 5
        if self.used and self.used + cost > self.budget:
            return False
        self.used += cost
        return True


def validate_list_jobs(states: Sequence[int], node_id: str, page_size: int, limits: rules.Limits) -> int:
    """Validates a ListJobs and returns the page size to use."""
    for s in states:
        rules.validate_job_state(s, "states")
    rules.validate_id(node_id, "node_id", required=False)
    return rules.validate_page(page_size, limits)


class _Clock:
    """Wall-clock nanoseconds that never go backwards, so create_time order is commit order."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = 0

    def now(self) -> int:
        t = time.time_ns()
        if t <= self.last:
            t = self.last + 1
        self.last = t
        return t


@dataclass(slots=True)
class Mutation:
    """One change about to be committed, handed to ``MemoryStore._persist`` before memory changes.

    ``job`` is the job after the change (for ``DELETED`` its last state) and ``job_data`` its bytes;
    ``entry_data`` its serialized history entry, with the revision set (None for ``DELETED``: a deletion removes
    the job's history); ``event`` the change as the hub will publish it. Each is serialized once, for memory,
    watchers and disk alike.
    """

    revision: int
    event_type: int
    job: pb.JobState
    job_data: bytes
    time_ns: int
    create_ns: int
    entry_data: bytes | None
    event: Change
    # The job's oldest history entries dropped by this change (--max-history-per-job).
    drop_history: int = 0


@dataclass(slots=True)
class _Record:
    """One job as the memory engine holds it: serialized, because a parsed JobState with two executions
    costs about 1.3 KB of memory and its bytes about 250 B (history entries: 1 KB against 90 B each).
    Reads parse on demand (a couple of microseconds); watchers and snapshots use the bytes as they are."""

    job_id: str
    data: bytes
    mod_revision: int
    mod_time_ns: int
    create_ns: int
    history: list[bytes]
    # What ListJobs filters on, kept beside the bytes so a filtered scan parses only the jobs it returns.
    state: int = 0
    nodes: tuple[str, ...] = ()
    # Who created the job ("": nobody known), for limits.max_jobs_per_client.
    owner: str = ""

    def index(self, job: pb.JobState) -> None:
        self.state = job.state
        self.nodes = node_tuple(job)

    @property
    def job(self) -> pb.JobState:
        return pb.JobState.FromString(self.data)

    def entries(self) -> list[pb.JobHistoryEntry]:
        return [pb.JobHistoryEntry.FromString(e) for e in self.history]


Key = tuple[int, str]  # (create_ns, job_id): the ListJobs order


def _insert(index: dict[Any, list[Key]], name: Any, key: Key) -> None:
    keys = index.get(name)
    if keys is None:
        index[name] = [key]
    elif keys[-1] < key:
        keys.append(key)  # the common case: the newest job
    else:
        bisect.insort(keys, key)


def _remove(index: dict[Any, list[Key]], name: Any, key: Key) -> None:
    keys = index[name]
    i = bisect.bisect_left(keys, key)
    if i < len(keys) and keys[i] == key:
        del keys[i]
    if not keys:
        del index[name]


class MemoryStore(Store):
    """The embedded engine: everything in this process; revisions exactly one apart.

    ListJobs reads indexes kept in its own order: every job's key, and the keys by state and by node, so a
    filtered page visits the jobs that match rather than every job (``scan_visits`` counts what it visited). A
    filter on both state and node walks the smaller of the two and checks the other; such a walk gives the
    loop back every ``scan_chunk`` jobs, and the page is still exactly what matched at the revision it
    returns (``_scans`` notes what changed meanwhile, and the page is checked again before it is answered).
    """

    # Jobs a ListJobs visits before it lets other calls run.
    scan_chunk = 1024

    def __init__(
        self, hub: WatchHub | None = None, limits: rules.Limits = rules.DEFAULT_LIMITS, *, retention: bool = True
    ) -> None:
        self.hub = hub if hub is not None else WatchHub()
        # Whether final jobs are indexed for ``remove_finished`` (a server with retention off never removes
        # them, and would index every job a client deletes for nothing).
        self.retention = retention
        self.limits = limits
        self._jobs: dict[str, _Record] = {}
        # (create_ns, job_id) of every job, sorted: the ListJobs order, and where a page token resumes.
        self._order: list[tuple[int, str]] = []
        # (timeout_ns, job_id, create_ns) of every job that is not final and has a timeout, sorted: an entry
        # leaves when its job becomes final or is deleted, so a job removed long before its timeout (up to a
        # year) does not keep one. Inserting and removing move pointers in C (tens of microseconds at 100,000).
        self._timeouts: list[tuple[int, str, int]] = []
        # Heap of (final_ns, job_id, create_ns) of the jobs in a final state: retention removes from the top;
        # entries of jobs a client deleted meanwhile are skipped when they come up. A final job never changes
        # again, so its update_time is when it became final, on disk and after a restart alike.
        self._finished: list[tuple[int, str, int]] = []
        self._history_entries = 0
        self._revision = self.hub.head_revision
        self.store_id = f"mem-{uuid.uuid4().hex[:16]}"
        self._clock = _Clock()
        # ListJobs' indexes: the keys of the jobs in each state and of the jobs with an execution on each node.
        self._by_state: dict[int, list[Key]] = {}
        self._by_node: dict[str, list[Key]] = {}
        self._owned: dict[str, int] = {}  # jobs held by each creator
        # The ids of the jobs changed while each running ListJobs had given the loop back.
        self._scans: dict[int, set[str]] = {}
        self._scan_ids = itertools.count()
        self.scan_visits = 0

    # -- internals -----------------------------------------------------------------------------------------

    def _record(self, job_id: str) -> _Record:
        rules.validate_id(job_id, "job_id")
        rec = self._jobs.get(job_id)
        if rec is None:
            raise JobNotFound(f"job {job_id!r} does not exist", job_id=job_id)
        return rec

    def _persist(self, m: Mutation) -> None:
        """Write-through hook of persistent engines, called before a change touches memory or watchers.

        If it raises, the change did not happen: nothing in memory has moved and the caller gets the error.
        The in-memory engine keeps nothing elsewhere.
        """

    def _add(self, rec: _Record, job: pb.JobState | None = None) -> None:
        """Indexes a new job (its create time is later than every other job's: the clock is monotonic).

        ``job`` is the record's job when the caller has it parsed already (a commit); a record read back from
        disk is parsed and indexed here."""
        self._jobs[rec.job_id] = rec
        key = (rec.create_ns, rec.job_id)
        self._order.append(key)
        if job is None:
            job = rec.job
            rec.index(job)
            self._history_entries += len(rec.history)
            if rules.is_terminal_job(job.state) and self.retention:
                heapq.heappush(self._finished, (job.update_time.ToNanoseconds(), rec.job_id, rec.create_ns))
        _insert(self._by_state, rec.state, key)
        for node in rec.nodes:
            _insert(self._by_node, node, key)
        if rec.owner:
            self._owned[rec.owner] = self._owned.get(rec.owner, 0) + 1
        if job.HasField("timeout_at") and not rules.is_terminal_job(job.state):
            bisect.insort(self._timeouts, (job.timeout_at.ToNanoseconds(), rec.job_id, rec.create_ns))

    def _unindex_timeout(self, job: pb.JobState, create_ns: int) -> None:
        """Forgets the job's pending timeout (it became final or was deleted), if it has one."""
        if not job.HasField("timeout_at"):
            return
        key = (job.timeout_at.ToNanoseconds(), job.job_id, create_ns)
        i = bisect.bisect_left(self._timeouts, key)
        if i < len(self._timeouts) and self._timeouts[i] == key:
            del self._timeouts[i]

    def _reindex(self, rec: _Record, state: int, nodes: tuple[str, ...]) -> None:
        key = (rec.create_ns, rec.job_id)
        if state != rec.state:
            _remove(self._by_state, rec.state, key)
            _insert(self._by_state, state, key)
            rec.state = state
        if nodes != rec.nodes:
            old, new = set(rec.nodes), set(nodes)
            for node in old - new:
                _remove(self._by_node, node, key)
            for node in new - old:
                _insert(self._by_node, node, key)
            rec.nodes = nodes

    def _forget(self, rec: _Record) -> None:
        """Takes a job out of memory and every index."""
        key = (rec.create_ns, rec.job_id)
        del self._jobs[rec.job_id]
        del self._order[bisect.bisect_left(self._order, key)]
        _remove(self._by_state, rec.state, key)
        for node in rec.nodes:
            _remove(self._by_node, node, key)
        if rec.owner:
            left = self._owned[rec.owner] - 1
            if left:
                self._owned[rec.owner] = left
            else:
                del self._owned[rec.owner]
        for changed in self._scans.values():
            changed.add(rec.job_id)

    def _commit(self, rec: _Record, change: changes.Change, event_type: int, now_ns: int) -> WriteResult:
        revision = self._revision + 1
        change.entry.revision = revision
        data = change.job.SerializeToString()
        entry_data = change.entry.SerializeToString()
        event = Change(revision, event_type, change.job, now_ns, data, rec.job_id)
        cap = self.limits.max_history_per_job
        drop = max(0, len(rec.history) + 1 - cap) if cap else 0
        self._persist(Mutation(revision, event_type, change.job, data, now_ns, rec.create_ns, entry_data, event, drop))
        self._revision = revision
        rec.data = data
        # event.nodes: computed once, for the hub and for ListJobs' node filter
        if event_type == CREATED:
            rec.state, rec.nodes = change.job.state, event.nodes
            self._add(rec, change.job)
        else:
            self._reindex(rec, change.job.state, event.nodes)
        for changed in self._scans.values():
            changed.add(rec.job_id)
        rec.mod_revision = revision
        rec.mod_time_ns = now_ns
        if drop:
            del rec.history[:drop]
        rec.history.append(entry_data)
        self._history_entries += 1 - drop
        if rules.is_terminal_job(rec.state):  # a final job is never changed again: this is when it became final
            self._unindex_timeout(change.job, rec.create_ns)
            if self.retention:
                heapq.heappush(self._finished, (now_ns, rec.job_id, rec.create_ns))
        self.hub.publish_change(event)
        return WriteResult(change.job, revision, change.execution)

    # -- writes --------------------------------------------------------------------------------------------

    async def create_job(self, job_id: str, timeout_ns: int = 0, comment: str = "", owner: str = "") -> WriteResult:
        validate_create_job(job_id, timeout_ns, comment, self.limits)
        job_id = job_id or str(uuid.uuid4())
        if job_id in self._jobs:
            raise JobAlreadyExists(f"job {job_id!r} already exists", job_id=job_id)
        if self.limits.max_jobs and len(self._jobs) >= self.limits.max_jobs:
            raise ResourceLimit(f"the store holds {len(self._jobs)} jobs, its limit", limit="max_jobs")
        share = self.limits.max_jobs_per_client
        if share and owner and (held := self._owned.get(owner, 0)) >= share:
            raise ResourceLimit(f"{owner} holds {held} jobs, its share of the store", limit="max_jobs_per_client")
        now = self._clock.now()
        change = changes.new_job(job_id, now, timeout_ns, comment)
        rec = _Record(job_id, b"", 0, now, now, [], owner=sys.intern(owner))
        return self._commit(rec, change, CREATED, now)

    async def update_job_state(
        self, job_id: str, new_state: int, condition: spb.JobCondition | None = None, comment: str = ""
    ) -> WriteResult:
        validate_update_job_state(new_state, condition, comment, self.limits)
        rec = self._record(job_id)
        now = self._clock.now()
        change = changes.change_job_state(rec.job, new_state, condition, comment, now, self.limits)
        return self._commit(rec, change, UPDATED, now)

    async def create_execution(self, job_id: str, execution: pb.ExecutionState, comment: str = "") -> WriteResult:
        validate_create_execution(execution, comment, self.limits)
        rec = self._record(job_id)
        now = self._clock.now()
        change = changes.add_execution(rec.job, execution, comment, now, self.limits)
        return self._commit(rec, change, UPDATED, now)

    async def update_execution(
        self,
        job_id: str,
        compute_reference: str,
        execution: pb.ExecutionState,
        update_mask: field_mask_pb2.FieldMask | None = None,
        condition: spb.ExecutionCondition | None = None,
        comment: str = "",
    ) -> WriteResult:
        paths = validate_update_execution(compute_reference, execution, update_mask, condition, comment, self.limits)
        rec = self._record(job_id)
        now = self._clock.now()
        change = changes.change_execution(
            rec.job, compute_reference, execution, paths, condition, comment, now, self.limits
        )
        return self._commit(rec, change, UPDATED, now)

    async def delete_job(self, job_id: str, expected_version: int = 0) -> WriteResult:
        if expected_version < 0:
            raise InvalidArgument("expected_version must not be negative", field="expected_version")
        rec = self._record(job_id)
        job = rec.job
        changes.check_delete(job, expected_version)
        m = self._deletion(rec, job, self._revision + 1, self._clock.now(), spb.DELETE_CAUSE_CLIENT)
        self._persist(m)
        self._drop(rec, m)
        return WriteResult(job, m.revision)

    def _deletion(self, rec: _Record, job: pb.JobState, revision: int, now_ns: int, cause: int) -> Mutation:
        event = Change(revision, DELETED, job, now_ns, rec.data, rec.job_id, cause)
        return Mutation(revision, DELETED, job, rec.data, now_ns, rec.create_ns, None, event)

    def _drop(self, rec: _Record, m: Mutation) -> None:
        """Takes a deleted job out of memory and publishes its deletion (after ``_persist`` succeeded)."""
        self._revision = m.revision
        self._forget(rec)
        self._history_entries -= len(rec.history)
        if not rules.is_terminal_job(rec.state):
            self._unindex_timeout(m.job, rec.create_ns)
        self.hub.publish_change(m.event)

    def _persist_many(self, mutations: Sequence[Mutation]) -> None:
        """Write-through of several changes at once (a retention batch): all of them or none."""
        for m in mutations:
            self._persist(m)

    async def remove_finished(self, before_ns: int, limit: int) -> int:
        batch: list[tuple[_Record, Mutation]] = []
        taken: list[tuple[int, str, int]] = []
        revision = self._revision
        now = 0
        while self._finished and self._finished[0][0] <= before_ns and len(batch) < limit:
            item = heapq.heappop(self._finished)
            taken.append(item)
            _, job_id, create_ns = item
            rec = self._jobs.get(job_id)
            if rec is None or rec.create_ns != create_ns or not rules.is_terminal_job(rec.state):
                continue  # deleted by a client (or deleted and created again under the same id)
            now = now or self._clock.now()
            revision += 1
            batch.append((rec, self._deletion(rec, rec.job, revision, now, spb.DELETE_CAUSE_RETENTION)))
        if not batch:
            return 0
        try:
            self._persist_many([m for _, m in batch])
        except BaseException:
            for item in taken:  # not committed: the next sweep tries again
                heapq.heappush(self._finished, item)
            raise
        for rec, m in batch:
            self._drop(rec, m)
        return len(batch)

    def next_finished_ns(self) -> int | None:
        return self._finished[0][0] if self._finished else None

    async def expire_due(self, now_ns: int | None = None) -> int:
        now = now_ns if now_ns is not None else time.time_ns()
        expired = 0
        while self._timeouts and self._timeouts[0][0] <= now:
            due = self._timeouts.pop(0)
            _, job_id, create_ns = due
            rec = self._jobs.get(job_id)
            if rec is None or rec.create_ns != create_ns:
                continue  # deleted, or deleted and created again under the same id
            at = self._clock.now()
            change = changes.expire(rec.job, at)
            if change is not None:
                try:
                    self._commit(rec, change, UPDATED, at)
                except BaseException:
                    bisect.insort(self._timeouts, due)  # not committed: the next sweep tries again
                    raise
                expired += 1
        return expired

    def next_timeout_ns(self) -> int | None:
        return self._timeouts[0][0] if self._timeouts else None

    # -- reads ---------------------------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> ReadResult:
        return ReadResult(self._record(job_id).job, self._revision)

    async def list_jobs(
        self, states: Sequence[int] = (), node_id: str = "", page_size: int = 0, page_token: str = ""
    ) -> JobPage:
        size = validate_list_jobs(states, node_id, page_size, self.limits)
        after: Key | None = None
        if page_token:
            create_ns, last_id = decode_token(page_token, (int, str))
            after = (create_ns, last_id)  # type: ignore[assignment]
        wanted = frozenset(states)
        found: list[Key] = []
        cursor, exhausted = after, False
        scan: int | None = None
        try:
            while True:
                cursor, exhausted = self._scan(wanted, node_id, cursor, size, found)
                if exhausted or len(found) >= size:
                    break
                if scan is None:
                    scan = next(self._scan_ids)
                    self._scans[scan] = set()
                await asyncio.sleep(0)  # a long walk (state and node both given) lets other calls run
            changed = self._scans.pop(scan, set()) if scan is not None else set()
        finally:
            if scan is not None:
                self._scans.pop(scan, None)
        # From here on nothing awaits: the page is what matches now, at the revision it returns. A job changed
        # while the walk had given the loop back may have come to match behind the cursor: look at each again.
        if changed:
            end = None if exhausted else cursor
            for job_id in changed:
                rec = self._jobs.get(job_id)
                if rec is not None:
                    key = (rec.create_ns, job_id)
                    if (after is None or key > after) and (end is None or key <= end):
                        found.append(key)
            found = sorted(set(found))
        jobs: list[pb.JobState] = []
        last: Key | None = None
        full = False
        page_bytes = PageBytes(self.limits)
        for key in found:
            rec = self._jobs.get(key[1])
            if rec is None or rec.create_ns != key[0] or not _matches(rec, wanted, node_id):
                continue
            # A page ends at page_size jobs or when the next would pass the page's byte budget.
            if len(jobs) == size or not page_bytes.fits(len(rec.data)):
                full = True
                break
            jobs.append(rec.job)
            last = key
        # The next page starts after the last job returned when the page is full, else after what was walked.
        ends_at = last if full else (None if exhausted else cursor)
        token = encode_token(*ends_at) if ends_at is not None else ""
        return JobPage(jobs, token, self._revision)

    def _scan(
        self, wanted: frozenset[int], node_id: str, after: Key | None, size: int, found: list[Key]
    ) -> tuple[Key | None, bool]:
        """Walks at most ``scan_chunk`` keys after ``after`` in ListJobs order, from the narrowest index, adding
        those that match to ``found`` until it holds ``size``. Returns the last key walked and whether the walk
        reached the end."""
        sources: list[list[Key]]
        check_state = check_node = False
        by_state = [self._by_state.get(s, []) for s in wanted]
        by_node = self._by_node.get(node_id, []) if node_id else None
        if by_node is not None and wanted:
            if len(by_node) <= sum(len(keys) for keys in by_state):
                sources, check_state = [by_node], True
            else:
                sources, check_node = by_state, True
        elif by_node is not None:
            sources = [by_node]
        elif wanted:
            sources = by_state
        else:
            sources = [self._order]
        starts = [bisect.bisect_right(keys, after) if after is not None else 0 for keys in sources]
        walk: Iterator[Key]
        if len(sources) == 1:
            walk = itertools.islice(sources[0], starts[0], None)
        else:
            walk = heapq.merge(*(itertools.islice(keys, i, None) for keys, i in zip(sources, starts, strict=True)))
        cursor = after
        visited = 0
        jobs = self._jobs
        for key in walk:
            visited += 1
            cursor = key
            if check_state or check_node:
                rec = jobs[key[1]]
                if (check_state and rec.state not in wanted) or (check_node and node_id not in rec.nodes):
                    if visited >= self.scan_chunk:
                        break
                    continue
            found.append(key)
            if len(found) >= size or visited >= self.scan_chunk:
                break
        self.scan_visits += visited
        if cursor is None:
            return None, True
        more = any(bisect.bisect_right(keys, cursor) < len(keys) for keys in sources)
        return cursor, not more

    async def get_history(self, job_id: str, page_size: int = 0, page_token: str = "") -> HistoryPage:
        size = rules.validate_page(page_size, self.limits)
        rec = self._record(job_id)
        # Versions are one per change, so the first entry held says how many came before it. Tokens name the
        # version after the page (as on etcd), so a page stays right when older entries are dropped meanwhile.
        dropped = pb.JobHistoryEntry.FromString(rec.history[0]).version - 1 if rec.history else 0
        start = 0
        if page_token:
            (after,) = decode_token(page_token, (int,))
            if not isinstance(after, int) or after < 0:
                raise InvalidArgument("page_token is not a token this server issued", field="page_token")
            start = max(0, after - dropped)
        page_bytes = PageBytes(self.limits)
        end = start
        while end < min(start + size, len(rec.history)) and page_bytes.fits(len(rec.history[end])):
            end += 1
        entries = [pb.JobHistoryEntry.FromString(e) for e in rec.history[start:end]]
        token = encode_token(entries[-1].version) if end < len(rec.history) and entries else ""
        return HistoryPage(entries, token, dropped)

    def snapshot(self, spec: WatchSpec) -> Snapshot:
        snap = Snapshot(self._revision)
        if spec.job_ids is not None:
            recs = [r for j in sorted(spec.job_ids) if (r := self._jobs.get(j)) is not None]
        elif spec.node_id:
            recs = [self._jobs[job_id] for _, job_id in self._by_node.get(spec.node_id, ())]
        else:
            recs = [self._jobs[job_id] for _, job_id in self._order]
        for r in recs:
            if spec.node_id and spec.node_id not in r.nodes:
                continue
            snap.jobs.append((r.data, r.mod_revision, r.mod_time_ns))
        return snap

    @property
    def oldest_revision(self) -> int:
        return self.hub.oldest_revision

    def watch(self, spec: WatchSpec) -> AsyncGenerator[bytes, None]:
        return self.hub.watch(spec, lambda: self.snapshot(spec))

    def stats(self) -> StoreStats:
        by_state = {state: len(keys) for state, keys in self._by_state.items()}
        return StoreStats(
            jobs=len(self._jobs),
            jobs_by_state=by_state,
            revision=self._revision,
            history_held=self.hub.held,
            history_size=self.hub.history_size,
            watchers=self.hub.watcher_count,
            watcher_lags=self.hub.lags(),
            history_bytes_held=self.hub.bytes_held,
            history_bytes=self.hub.history_bytes,
            job_history_entries=self._history_entries,
        )

    async def close(self) -> None:
        self.hub.close()
