"""The etcd engine: jobs live in etcd, so several jobstate servers can serve the same jobs.

Layout under the prefix ``P`` (``/jobstate`` by default):

- ``P/jobs/<job_id>`` holds the serialized ``JobState``;
- ``P/history/<job_id>/<version:020d>`` holds the job's ``JobHistoryEntry`` of that version. An entry is written
  in the same transaction as the job, before its revision is known, so its ``revision`` field is not stored:
  it is the history key's ``create_revision``, which is the revision of that transaction. Entries older than
  the last ``max_history_per_job`` are deleted by the transaction that writes a new one.
- ``P/jobs/`` itself (no job id; job ids are never empty) says why the job deleted in the same transaction was
  deleted: each deletion puts it (``1``: a client, ``2``: retention), so every server's watch of ``P/jobs/``
  sees the cause at the deletion's revision. Reads of the jobs start after it.

Retention: each server learns from its watch when each job became final (a final job never changes again, so
its last ``update_time`` is that moment) and removes it once it has been final for ``--retain-finished``, in a
transaction guarded by the job's ``mod_revision``. With several servers on one etcd each job is removed once:
the others' guards fail (or their watch already saw the deletion and they skip it).

Every change is one etcd transaction guarded by the job key's ``mod_revision`` and computed by the same pure
functions as every engine (``changes``). When the guard fails, another server changed the job first: the
request is evaluated again against the job as it is now, so a client's conditions (expected version, states)
decide the outcome, never a spurious conflict. The store revision is etcd's revision; on an etcd shared with
other writers (other prefixes, other programs) revisions strictly increase but are not one apart.

Watch is served from etcd's own watch of ``P/jobs/``. Each server keeps one such watch (the follower) and
publishes what it reads into a local ``WatchHub``, the same fan-out the other engines use: a watcher starting
at a revision the hub still holds (the last ``_HUB_RING`` revisions since this server started following) costs
etcd nothing, and a change is turned into a watch event once per server however many watchers receive it.
Revisions of other keys (other prefixes, other programs) are gaps in the hub's ring. A watcher starting
further back gets an etcd watch of its own from that revision, filtered here; each event's bytes are built from
the job bytes etcd returns (no re-serialization) and cached per revision. A slow reader of such a stream stops
reading it and gRPC flow control lets etcd keep it as an unsynced watcher: it catches up from etcd's history
and never slows writers. etcd's compaction is ``RevisionCompacted`` when a watch starts and ``WatcherLagged``
when a running watcher falls behind it. When the follower loses etcd, the streams the hub serves end with
``StoreUnavailable`` and clients resume by revision; a follower that comes back after a compaction starts the
hub afresh, so no stream skips a change it missed.

The timeout sweeper is safe on every server: expiring is the same guarded transaction, so exactly one server
wins and the others find the job final and skip it. Each server learns about timeouts from a range read at
start and a background watch of the jobs prefix (which also keeps the numbers ``stats`` reports).

etcd errors (down, no quorum, deadline) become ``StoreUnavailable`` (gRPC UNAVAILABLE). As with etcd's own
clients, a write that failed that way may or may not have been committed.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import ipaddress
import logging
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from aetcd import rpc  # the etcd v3 API stubs (etcd 3.4+)
from google.protobuf import field_mask_pb2

from jobstate.server import changes, rules
from jobstate.server.errors import (
    InvalidArgument,
    JobAlreadyExists,
    JobNotFound,
    JobStateError,
    ResourceLimit,
    RevisionCompacted,
    ShuttingDown,
    StoreUnavailable,
    WatcherLagged,
)
from jobstate.server.hub import (
    BOOKMARK,
    CREATED,
    DEFAULT_HISTORY_BYTES,
    DELETED,
    INITIAL,
    UPDATED,
    Change,
    WatchHub,
    WatchSpec,
    encode_event,
    encode_response,
    node_tuple,
)
from jobstate.server.store import (
    HistoryPage,
    JobPage,
    PageBytes,
    ReadResult,
    Store,
    StoreStats,
    WriteResult,
    decode_token,
    encode_token,
    validate_create_execution,
    validate_create_job,
    validate_list_jobs,
    validate_update_execution,
    validate_update_job_state,
)
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb

if TYPE_CHECKING:
    from jobstate.server.main import ServerConfig

log = logging.getLogger("jobstate.server.etcd")

DEFAULT_PREFIX = "/jobstate"
# A guarded transaction lost this many times in a row means a hot job under heavy contention: the client is
# told to retry rather than this server spinning.
_MAX_ATTEMPTS = 64
# Watch responses waiting for one slow watcher before its etcd stream stops being read (flow control then
# leaves the backlog with etcd).
_WATCH_QUEUE = 64
# ... and at most this many bytes of them (beyond the first): 64 responses of 2 MiB jobs would be 128 MiB a watcher.
_WATCH_QUEUE_BYTES = 8 * 1024 * 1024
_MAX_BATCH_BYTES = 1 << 20
_EVENT_CACHE = 4096
# ... and at most this many bytes of them: 4,096 jobs of 2 MiB would otherwise be 8 GiB.
_EVENT_CACHE_BYTES = 32 * 1024 * 1024
# Revisions the follower's hub holds: watchers resuming within them are served by this server alone.
_HUB_RING = 10_000
_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # the stubs lack it
# etcd's WithRequireLeader: a member cut off from its leader ends the watch ("no leader") instead of keeping
# it open and silent, so watchers resume elsewhere rather than wait for changes that never come.
_REQUIRE_LEADER = (("hasleader", "true"),)
_PUT = 0  # mvccpb.Event.EventType
_DELETE = 1


def _prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that makes a range cover every key starting with ``prefix``."""
    end = bytearray(prefix)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\x00"


def channel_target(endpoints: Sequence[str]) -> str:
    """A gRPC target for etcd endpoints (``http://host:port`` or ``host:port``), several as one channel."""
    hosts: list[tuple[str, int]] = []
    for raw in (part for item in endpoints for part in item.split(",")):
        ep = raw.strip().rstrip("/")
        if not ep:
            continue
        if ep.startswith("https://"):
            raise ValueError(f"etcd endpoint {raw!r}: TLS is not supported; use http:// on a trusted network")
        ep = ep.removeprefix("http://")
        name, sep, digits = ep.rpartition(":")
        if not sep or not digits.isdigit():
            raise ValueError(f"etcd endpoint {raw!r} is not host:port")
        hosts.append((name.strip("[]"), int(digits)))
    if not hosts:
        raise ValueError("no etcd endpoint given")
    if len(hosts) == 1:
        host, port = hosts[0]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    # Several endpoints: one channel over all their addresses, so gRPC moves to another member when one fails.
    addrs: list[str] = []
    for host, port in hosts:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = ipaddress.ip_address(socket.gethostbyname(host))
        addrs.append(f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}")
    scheme = "ipv6" if all(a.startswith("[") for a in addrs) else "ipv4"
    if scheme == "ipv4" and any(a.startswith("[") for a in addrs):
        raise ValueError("etcd endpoints mix IPv4 and IPv6 addresses")
    return f"{scheme}:" + ",".join(addrs)


# Jobs parsed from one range read before ListJobs lets other calls run.
_PARSE_CHUNK = 1024


class _Clock:
    """Wall-clock nanoseconds that never go backwards, on this server and for each job it changes."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = 0

    def now(self, after: pb.JobState | None = None) -> int:
        t = time.time_ns()
        floor = self.last
        if after is not None:
            # Another server's clock may be ahead: a job's update_time must not go back.
            floor = max(floor, after.update_time.ToNanoseconds())
        if t <= floor:
            t = floor + 1
        self.last = t
        return t


def _follow_lost() -> StoreUnavailable:
    return StoreUnavailable("this server lost its watch of etcd; resume from the last revision received")


class _Event:
    """One etcd event of a job key, as a watcher needs it: filter keys and the framed ``WatchEvent``."""

    __slots__ = ("frame", "job_id", "nodes", "state")

    def __init__(self, job_id: str, nodes: tuple[str, ...], frame: bytes, state: int) -> None:
        self.job_id = job_id
        self.nodes = nodes
        self.frame = frame
        self.state = state  # the job's state after the change (for a deletion, before it)


class _Watcher:
    __slots__ = ("delivered", "ended", "queue", "queued_bytes", "reader", "ready", "room")

    def __init__(self) -> None:
        # Every change up to this revision has been delivered (or passed the filter by).
        self.delivered = 0
        self.queue: asyncio.Queue[Any] = asyncio.Queue(_WATCH_QUEUE)
        # The bytes of the etcd responses in ``queue``; the reader waits for ``room`` when they pass the bound.
        self.queued_bytes = 0
        self.room = asyncio.Event()
        self.reader: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()  # etcd accepted the watch
        self.ended = asyncio.Event()  # the stream has finished (close() waits for it)


def _matches(spec: WatchSpec, job_id: str, nodes: tuple[str, ...]) -> bool:
    return (spec.job_ids is None or job_id in spec.job_ids) and (not spec.node_id or spec.node_id in nodes)


class EtcdStore(Store):
    """The etcd engine; see the module docstring for the layout and the guarantees."""

    def __init__(
        self,
        endpoints: Sequence[str],
        prefix: str = DEFAULT_PREFIX,
        limits: rules.Limits = rules.DEFAULT_LIMITS,
        *,
        max_watchers: int = 0,
        history_size: int = 0,
        history_bytes: int = DEFAULT_HISTORY_BYTES,
        request_timeout: float = 5.0,
        connect_timeout: float = 10.0,
        retention: bool = True,
    ) -> None:
        self.limits = limits
        # Whether final jobs are indexed for ``remove_finished`` (not with retention off: nothing would pop them).
        self.retention = retention
        self.target = channel_target(endpoints)
        base = "/" + prefix.strip("/") if prefix.strip("/") else ""
        self._jobs_prefix = f"{base}/jobs/".encode()
        # The deletion-cause key is the prefix itself; ranges of jobs start just after it.
        self._cause_key = self._jobs_prefix
        self._jobs_start = self._jobs_prefix + b"\x00"
        self._history_prefix = f"{base}/history/"
        self._max_watchers = max_watchers
        # How many recent revisions a watch may start from (like the hub's ring); 0: as far as etcd holds.
        self._history_size = history_size
        self._timeout = request_timeout
        self._connect_timeout = connect_timeout
        self._clock = _Clock()
        self._channel: grpc.aio.Channel | None = None
        self._kv: Any = None
        self._watch_stub: Any = None
        self._started: asyncio.Task[None] | None = None
        self._follower: asyncio.Task[None] | None = None
        self._closed = False
        # Watchers with an etcd watch of their own (starting before what the hub holds).
        self._watchers: set[_Watcher] = set()
        self._hub = WatchHub(min(history_size or _HUB_RING, _HUB_RING), history_bytes=history_bytes)
        # True while the follower's etcd watch is established: only then may the hub serve new watchers.
        self._following = False
        # Set once the follower's first etcd watch is established (see ``_start``).
        self._followed = asyncio.Event()
        self._events: OrderedDict[tuple[int, bytes], _Event] = OrderedDict()
        self._events_bytes = 0
        # What this server knows from its follow watch: for stats and the sweeper.
        self._head = 0
        self._states: dict[str, int] = {}
        # (timeout_ns, job_id, create_revision) of the jobs not final with a timeout, sorted: an entry leaves
        # when its job is seen becoming final or deleted, so a job removed long before its timeout does not
        # keep one (timeouts run up to a year).
        self._timeouts: list[tuple[int, str, int]] = []
        self._timeout_keys: set[tuple[str, int]] = set()
        # Final jobs for retention: heap of (final_ns, job_id, mod_revision of the change that made it final);
        # entries of jobs deleted meanwhile (by a client, or by another server's retention) are skipped when
        # they come up.
        self._finished: list[tuple[int, str, int]] = []
        self._finished_keys: set[tuple[str, int]] = set()

    # -- keys ----------------------------------------------------------------------------------------------

    def _job_key(self, job_id: str) -> bytes:
        return self._jobs_prefix + job_id.encode()

    def _history_dir(self, job_id: str) -> bytes:
        return f"{self._history_prefix}{job_id}/".encode()

    def _history_key(self, job_id: str, version: int) -> bytes:
        return f"{self._history_prefix}{job_id}/{version:020d}".encode()

    # -- connection ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connects, reads the jobs (for timeouts and stats) and starts following changes."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._start())
        await asyncio.shield(self._started)

    async def _ready(self) -> None:
        if self._closed:
            raise ShuttingDown("the server is shutting down")
        if self._started is None or not self._started.done():
            await self.start()
        elif (exc := self._started.exception()) is not None:
            self._started = None  # let a later call try again
            raise exc

    async def _start(self) -> None:
        self._channel = grpc.aio.insecure_channel(
            self.target,
            options=[
                ("grpc.max_receive_message_length", 256 * 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                # etcd back after a restart should be found in about a second, not after gRPC's long backoff.
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 1000),
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        self._kv = rpc.KVStub(self._channel)
        self._watch_stub = rpc.WatchStub(self._channel)
        deadline = time.monotonic() + self._connect_timeout
        while True:
            try:
                revision = await self._load()
                break
            except StoreUnavailable:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.2)
        self._hub.restart_at(revision, _follow_lost)
        self._follower = asyncio.create_task(self._follow(revision + 1), name="etcd-follow")
        # Watchers that arrive before the follower's watch is established get an etcd watch of their own; a
        # server that has just started should serve them from the hub, so it waits a moment for it (etcd answers
        # a watch at once when it is up; if it does not, the server starts anyway and those watchers fall back).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, min(5.0, deadline - time.monotonic()))):
                await self._followed.wait()
        log.info("etcd store ready", extra={"etcd": self.target, "revision": revision, "jobs": len(self._states)})

    async def _load(self) -> int:
        """Reads every job: the state counts and the timeouts. Returns the revision read at."""
        resp = await self._range(self._jobs_start, _prefix_end(self._jobs_prefix))
        self._states = {}
        self._timeouts = []
        self._timeout_keys = set()
        for kv in resp.kvs:
            job = pb.JobState.FromString(kv.value)
            self._states[job.job_id] = job.state
            self._track_timeout(job, kv.create_revision)
            self._track_finished(job, kv.mod_revision)
        self._head = max(self._head, resp.header.revision)
        # etcd's cluster id changes when its data is lost; the prefix separates stores sharing one cluster.
        self.store_id = f"etcd-{resp.header.cluster_id:016x}{self._jobs_prefix.decode().removesuffix('/jobs/')}"
        return int(resp.header.revision)

    def _track_timeout(self, job: pb.JobState, create_revision: int) -> None:
        if not job.HasField("timeout_at") or rules.is_terminal_job(job.state):
            return
        key = (job.job_id, create_revision)
        if key in self._timeout_keys:
            return
        self._timeout_keys.add(key)
        bisect.insort(self._timeouts, (job.timeout_at.ToNanoseconds(), job.job_id, create_revision))

    def _untrack_timeout(self, job: pb.JobState, create_revision: int) -> None:
        if not job.HasField("timeout_at") or (job.job_id, create_revision) not in self._timeout_keys:
            return
        self._timeout_keys.discard((job.job_id, create_revision))
        item = (job.timeout_at.ToNanoseconds(), job.job_id, create_revision)
        i = bisect.bisect_left(self._timeouts, item)
        if i < len(self._timeouts) and self._timeouts[i] == item:
            del self._timeouts[i]

    def _track_finished(self, job: pb.JobState, mod_revision: int) -> None:
        if not self.retention or not rules.is_terminal_job(job.state):
            return
        key = (job.job_id, int(mod_revision))
        if key in self._finished_keys:
            return
        self._finished_keys.add(key)
        heapq.heappush(self._finished, (job.update_time.ToNanoseconds(), job.job_id, int(mod_revision)))

    def _causes(self, events: Any) -> dict[int, int]:
        """The deletion causes put in these events' transactions, by revision."""
        out: dict[int, int] = {}
        for ev in events:
            if ev.type == _PUT and ev.kv.key == self._cause_key:
                with contextlib.suppress(ValueError):
                    out[int(ev.kv.mod_revision)] = int(ev.kv.value)
        return out

    async def _follow(self, start: int) -> None:
        """Publishes every change of the jobs to the hub, whoever writes, and keeps the state counts, the head
        revision and the timeout heap current."""
        hub = self._hub
        while not self._closed:
            call = self._watch_stub.Watch(metadata=_REQUIRE_LEADER)
            try:
                await call.write(self._watch_request(start, prev_kv=True))
                while True:
                    resp = await call.read()
                    if resp is _EOF:
                        break
                    if resp.compact_revision:
                        # Fell behind a compaction while away: read everything again, and end the streams the
                        # hub serves, which would otherwise skip what was missed (they resume through etcd).
                        self._following = False
                        revision = await self._load()
                        hub.restart_at(revision, _follow_lost)
                        start = revision + 1
                        break
                    if resp.canceled:
                        break
                    if resp.created:
                        self._following = True
                        self._followed.set()
                    causes = self._causes(resp.events)
                    for ev in resp.events:
                        if ev.kv.key == self._cause_key:
                            continue  # not a job: the cause of the deletion at its revision
                        revision = int(ev.kv.mod_revision)
                        event = self._event(ev, causes.get(revision, 0))
                        if ev.type == _DELETE:
                            self._states.pop(event.job_id, None)
                            if ev.HasField("prev_kv"):
                                gone = pb.JobState.FromString(ev.prev_kv.value)
                                self._untrack_timeout(gone, int(ev.prev_kv.create_revision))
                        else:
                            self._states[event.job_id] = event.state
                            new = ev.kv.create_revision == revision  # only a new job can bring a new timeout
                            final = rules.is_terminal_job(event.state)
                            if new or final:
                                job = pb.JobState.FromString(ev.kv.value)
                                if new:
                                    self._track_timeout(job, revision)
                                if final:
                                    self._untrack_timeout(job, int(ev.kv.create_revision))
                                    self._track_finished(job, revision)
                        if revision > hub.head_revision:
                            hub.skip_to(revision - 1)  # other keys' revisions
                            hub.publish_change(Change.restored(revision, event.job_id, event.nodes, event.frame))
                        else:
                            # Two job keys in one transaction (not jobstate's own writes): the hub holds one
                            # change a revision, so it starts afresh after it; its streams resume through etcd.
                            hub.restart_at(revision, _follow_lost)
                        self._head = max(self._head, revision)
                        start = revision + 1
            except (grpc.aio.AioRpcError, StoreUnavailable) as exc:
                log.debug("etcd follow watch ended: %s", exc)
            finally:
                call.cancel()
                if self._following:
                    self._following = False
                    hub.fail_all(_follow_lost)
            if not self._closed:
                await asyncio.sleep(0.5)

    def _unavailable(self, exc: grpc.aio.AioRpcError) -> JobStateError:
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.INVALID_ARGUMENT and "too large" in details:
            return ResourceLimit(f"etcd refused the change: {details}", limit="etcd_max_request_bytes")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "space" in details:
            return ResourceLimit(f"etcd refused the change: {details}", limit="etcd_quota_backend_bytes")
        return StoreUnavailable(f"etcd is not available ({code.name}: {details})", etcd_code=code.name)

    async def _unary(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._unavailable(exc) from exc

    async def _range(self, key: bytes, range_end: bytes = b"", **fields: Any) -> Any:
        return await self._unary(self._kv.Range, rpc.RangeRequest(key=key, range_end=range_end, **fields))

    async def _etcd_holds(self, revision: int) -> bool:
        """Whether etcd still holds ``revision`` (not compacted); the revision must not be in the future."""
        try:
            await self._kv.Range(
                rpc.RangeRequest(key=self._jobs_prefix, revision=revision, limit=1, keys_only=True),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.OUT_OF_RANGE:
                return False  # compacted: the watch through etcd names the oldest revision it holds
            raise self._unavailable(exc) from exc
        return True

    async def _txn(self, request: Any) -> Any:
        return await self._unary(self._kv.Txn, request)

    async def _get_kv(self, job_id: str) -> Any:
        rules.validate_id(job_id, "job_id")
        await self._ready()
        resp = await self._range(self._job_key(job_id))
        if not resp.kvs:
            raise JobNotFound(f"job {job_id!r} does not exist", job_id=job_id)
        return resp.kvs[0]

    # -- writes --------------------------------------------------------------------------------------------

    def _puts(self, change: changes.Change) -> list[Any]:
        job = change.job
        ops = [
            rpc.RequestOp(request_put=rpc.PutRequest(key=self._job_key(job.job_id), value=job.SerializeToString())),
            rpc.RequestOp(
                request_put=rpc.PutRequest(
                    key=self._history_key(job.job_id, job.version), value=change.entry.SerializeToString()
                )
            ),
        ]
        cap = self.limits.max_history_per_job
        if cap and job.version > cap:
            # Versions are one per change: everything before the last ``cap`` goes (one key, or more after the
            # limit was lowered).
            ops.append(
                rpc.RequestOp(
                    request_delete_range=rpc.DeleteRangeRequest(
                        key=self._history_dir(job.job_id),
                        range_end=self._history_key(job.job_id, job.version - cap + 1),
                    )
                )
            )
        return ops

    def _deletion_ops(self, job_id: str, cause: int) -> list[Any]:
        history = self._history_dir(job_id)
        return [
            rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=self._job_key(job_id))),
            rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=history, range_end=_prefix_end(history))),
            rpc.RequestOp(request_put=rpc.PutRequest(key=self._cause_key, value=str(cause).encode())),
        ]

    async def _mutate(
        self, job_id: str, compute: Callable[[pb.JobState, int], changes.Change | None], kv: Any = None
    ) -> WriteResult | None:
        """Applies ``compute`` to the job in one guarded transaction, evaluating it again whenever it lost."""
        if kv is None:
            kv = await self._get_kv(job_id)
        key = self._job_key(job_id)
        for _ in range(_MAX_ATTEMPTS):
            current = pb.JobState.FromString(kv.value)
            change = compute(current, self._clock.now(current))
            if change is None:
                return None
            resp = await self._txn(
                rpc.TxnRequest(
                    compare=[
                        rpc.Compare(
                            key=key,
                            target=rpc.Compare.MOD,
                            result=rpc.Compare.EQUAL,
                            mod_revision=kv.mod_revision,
                        )
                    ],
                    success=self._puts(change),
                    failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key))],
                )
            )
            if resp.succeeded:
                change.entry.revision = resp.header.revision
                return WriteResult(change.job, int(resp.header.revision), change.execution)
            kvs = resp.responses[0].response_range.kvs
            if not kvs:
                raise JobNotFound(f"job {job_id!r} does not exist", job_id=job_id)
            kv = kvs[0]
        raise StoreUnavailable(f"job {job_id!r} changed {_MAX_ATTEMPTS} times during this call; retry", job_id=job_id)

    async def _write(self, job_id: str, compute: Callable[[pb.JobState, int], changes.Change]) -> WriteResult:
        result = await self._mutate(job_id, compute)
        assert result is not None  # compute always returns a change (or raises)
        return result

    async def create_job(self, job_id: str, timeout_ns: int = 0, comment: str = "", owner: str = "") -> WriteResult:
        # ``owner`` is not kept: jobs per client would have to be counted across servers (SECURITY.md).
        validate_create_job(job_id, timeout_ns, comment, self.limits)
        await self._ready()
        job_id = job_id or str(uuid.uuid4())
        if self.limits.max_jobs:
            # Checked before the transaction, not in it: servers creating at once can pass the limit slightly.
            count = await self._range(self._jobs_start, _prefix_end(self._jobs_prefix), count_only=True)
            if count.count >= self.limits.max_jobs:
                raise ResourceLimit(f"the store holds {count.count} jobs, its limit", limit="max_jobs")
        change = changes.new_job(job_id, self._clock.now(), timeout_ns, comment)
        key = self._job_key(job_id)
        resp = await self._txn(
            rpc.TxnRequest(
                compare=[rpc.Compare(key=key, target=rpc.Compare.CREATE, result=rpc.Compare.EQUAL, create_revision=0)],
                success=self._puts(change),
            )
        )
        if not resp.succeeded:
            raise JobAlreadyExists(f"job {job_id!r} already exists", job_id=job_id)
        revision = int(resp.header.revision)
        change.entry.revision = revision
        self._track_timeout(change.job, revision)
        return WriteResult(change.job, revision)

    async def update_job_state(
        self, job_id: str, new_state: int, condition: spb.JobCondition | None = None, comment: str = ""
    ) -> WriteResult:
        validate_update_job_state(new_state, condition, comment, self.limits)
        return await self._write(
            job_id, lambda cur, now: changes.change_job_state(cur, new_state, condition, comment, now, self.limits)
        )

    async def create_execution(self, job_id: str, execution: pb.ExecutionState, comment: str = "") -> WriteResult:
        validate_create_execution(execution, comment, self.limits)
        if not execution.compute_reference:
            # Chosen once, so that evaluating again after a lost guard does not invent a second id.
            chosen = pb.ExecutionState()
            chosen.CopyFrom(execution)
            chosen.compute_reference = f"exec-{uuid.uuid4()}"
            execution = chosen
        limits = self.limits
        return await self._write(job_id, lambda cur, now: changes.add_execution(cur, execution, comment, now, limits))

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
        limits = self.limits
        return await self._write(
            job_id,
            lambda cur, now: changes.change_execution(
                cur, compute_reference, execution, paths, condition, comment, now, limits
            ),
        )

    async def delete_job(self, job_id: str, expected_version: int = 0) -> WriteResult:
        if expected_version < 0:
            raise InvalidArgument("expected_version must not be negative", field="expected_version")
        kv = await self._get_kv(job_id)
        key = self._job_key(job_id)
        for _ in range(_MAX_ATTEMPTS):
            current = pb.JobState.FromString(kv.value)
            changes.check_delete(current, expected_version)
            resp = await self._txn(
                rpc.TxnRequest(
                    compare=[
                        rpc.Compare(
                            key=key, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL, mod_revision=kv.mod_revision
                        )
                    ],
                    success=self._deletion_ops(job_id, spb.DELETE_CAUSE_CLIENT),
                    failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key))],
                )
            )
            if resp.succeeded:
                return WriteResult(current, int(resp.header.revision))
            kvs = resp.responses[0].response_range.kvs
            if not kvs:
                raise JobNotFound(f"job {job_id!r} does not exist", job_id=job_id)
            kv = kvs[0]
        raise StoreUnavailable(f"job {job_id!r} changed {_MAX_ATTEMPTS} times during this call; retry", job_id=job_id)

    async def expire_due(self, now_ns: int | None = None) -> int:
        if self._started is None or not self._started.done() or self._started.exception() is not None:
            return 0
        now = now_ns if now_ns is not None else time.time_ns()
        expired = 0
        while self._timeouts and self._timeouts[0][0] <= now and not self._closed:
            item = self._timeouts.pop(0)
            _, job_id, create_revision = item
            self._timeout_keys.discard((job_id, create_revision))
            try:
                resp = await self._range(self._job_key(job_id))
                if not resp.kvs or resp.kvs[0].create_revision != create_revision:
                    continue  # deleted, or deleted and created again under the same id
                # The guarded transaction lets one server win; the others then see a final job and skip it.
                if await self._mutate(job_id, lambda cur, at: changes.expire(cur, at), resp.kvs[0]) is not None:
                    expired += 1
            except StoreUnavailable:
                bisect.insort(self._timeouts, item)
                self._timeout_keys.add((job_id, create_revision))
                raise
            except JobNotFound:
                continue
        return expired

    def next_timeout_ns(self) -> int | None:
        return self._timeouts[0][0] if self._timeouts else None

    async def remove_finished(self, before_ns: int, limit: int) -> int:
        if self._started is None or not self._started.done() or self._started.exception() is not None:
            return 0
        removed = 0
        while self._finished and self._finished[0][0] <= before_ns and removed < limit and not self._closed:
            item = heapq.heappop(self._finished)
            _, job_id, mod_revision = item
            self._finished_keys.discard((job_id, mod_revision))
            if job_id not in self._states:
                continue  # its deletion (by a client or another server's retention) has been seen already
            try:
                # Guarded by the final change's revision: the job is deleted only as it was seen final, and by
                # one server only.
                resp = await self._txn(
                    rpc.TxnRequest(
                        compare=[
                            rpc.Compare(
                                key=self._job_key(job_id),
                                target=rpc.Compare.MOD,
                                result=rpc.Compare.EQUAL,
                                mod_revision=mod_revision,
                            )
                        ],
                        success=self._deletion_ops(job_id, spb.DELETE_CAUSE_RETENTION),
                    )
                )
            except StoreUnavailable:
                heapq.heappush(self._finished, item)
                self._finished_keys.add((job_id, mod_revision))
                raise
            if resp.succeeded:
                removed += 1
        return removed

    def next_finished_ns(self) -> int | None:
        return self._finished[0][0] if self._finished else None

    # -- reads ---------------------------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> ReadResult:
        rules.validate_id(job_id, "job_id")
        await self._ready()
        resp = await self._range(self._job_key(job_id))
        if not resp.kvs:
            raise JobNotFound(f"job {job_id!r} does not exist", job_id=job_id)
        return ReadResult(pb.JobState.FromString(resp.kvs[0].value), int(resp.header.revision))

    async def _all_jobs(self) -> tuple[list[tuple[int, str, pb.JobState, int]], int]:
        """Every job's (create_ns, job_id, job, mod_revision) in ListJobs order, and the revision read at.

        One range read and a sort per call: simple and consistent, and fine for the tens of thousands of jobs
        this engine is meant for; an index by create time would be the next step beyond that.
        """
        await self._ready()
        resp = await self._range(self._jobs_start, _prefix_end(self._jobs_prefix))
        rows: list[tuple[int, str, pb.JobState, int]] = []
        for i, kv in enumerate(resp.kvs, 1):
            job = pb.JobState.FromString(kv.value)
            rows.append((job.create_time.ToNanoseconds(), job.job_id, job, int(kv.mod_revision)))
            if i % _PARSE_CHUNK == 0:
                # The rows are etcd's snapshot at one revision: letting other calls run changes none of them.
                await asyncio.sleep(0)
        rows.sort(key=lambda r: (r[0], r[1]))
        return rows, int(resp.header.revision)

    async def list_jobs(
        self, states: Sequence[int] = (), node_id: str = "", page_size: int = 0, page_token: str = ""
    ) -> JobPage:
        size = validate_list_jobs(states, node_id, page_size, self.limits)
        after: tuple[int, str] | None = None
        if page_token:
            create_ns, last_id = decode_token(page_token, (int, str))
            after = (create_ns, last_id)  # type: ignore[assignment]
        rows, revision = await self._all_jobs()
        start = 0 if after is None else bisect.bisect_right([(r[0], r[1]) for r in rows], after)
        wanted = frozenset(states)
        jobs: list[pb.JobState] = []
        i = start
        page_bytes = PageBytes(self.limits)
        while i < len(rows) and len(jobs) < size:
            job = rows[i][2]
            if (wanted and job.state not in wanted) or (
                node_id and not any(e.node_id == node_id for e in job.executions)
            ):
                i += 1
                continue
            if not page_bytes.fits(job.ByteSize()):
                break
            jobs.append(job)
            i += 1
        token = encode_token(rows[i - 1][0], rows[i - 1][1]) if i < len(rows) else ""
        return JobPage(jobs, token, revision)

    async def get_history(self, job_id: str, page_size: int = 0, page_token: str = "") -> HistoryPage:
        size = rules.validate_page(page_size, self.limits)
        rules.validate_id(job_id, "job_id")
        after = 0
        if page_token:
            (after,) = decode_token(page_token, (int,))  # type: ignore[assignment]
            if after < 0:
                raise InvalidArgument("page_token is not a token this server issued", field="page_token")
        await self._ready()
        history = self._history_dir(job_id)
        # One read-only transaction: the job's existence and its entries at the same revision.
        resp = await self._txn(
            rpc.TxnRequest(
                success=[
                    rpc.RequestOp(request_range=rpc.RangeRequest(key=self._job_key(job_id), keys_only=True)),
                    rpc.RequestOp(
                        request_range=rpc.RangeRequest(
                            key=self._history_key(job_id, after + 1), range_end=_prefix_end(history), limit=size + 1
                        )
                    ),
                    # The first entry held: the entries before it were dropped (--max-history-per-job).
                    rpc.RequestOp(
                        request_range=rpc.RangeRequest(
                            key=history, range_end=_prefix_end(history), limit=1, keys_only=True
                        )
                    ),
                ]
            )
        )
        if not resp.responses[0].response_range.kvs:
            raise JobNotFound(f"job {job_id!r} does not exist", job_id=job_id)
        kvs = resp.responses[1].response_range.kvs
        entries: list[pb.JobHistoryEntry] = []
        page_bytes = PageBytes(self.limits)
        for kv in kvs[:size]:
            if not page_bytes.fits(len(kv.value)):
                break
            entry = pb.JobHistoryEntry.FromString(kv.value)
            entry.revision = kv.create_revision
            entries.append(entry)
        token = encode_token(entries[-1].version) if len(kvs) > len(entries) else ""
        first = resp.responses[2].response_range.kvs
        dropped = int(first[0].key[-20:]) - 1 if first else 0
        return HistoryPage(entries, token, dropped)

    # -- watch ---------------------------------------------------------------------------------------------

    def _watch_request(self, start_revision: int, *, prev_kv: bool) -> Any:
        return rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(
                key=self._jobs_prefix,
                range_end=_prefix_end(self._jobs_prefix),
                start_revision=start_revision,
                prev_kv=prev_kv,
            )
        )

    def _event(self, ev: Any, cause: int = 0) -> _Event:
        """The watcher's view of one etcd event, built once per server (cached by revision and key); ``cause``:
        why a deleted job was deleted."""
        kv = ev.kv
        cache_key = (int(kv.mod_revision), bytes(kv.key))
        cached = self._events.get(cache_key)
        if cached is not None:
            return cached
        revision = int(kv.mod_revision)
        if ev.type == _PUT:
            job_bytes = bytes(kv.value)
            event_type = CREATED if kv.create_revision == revision else UPDATED
        else:
            event_type = DELETED
            job_bytes = bytes(ev.prev_kv.value) if ev.HasField("prev_kv") else b""
        job = pb.JobState.FromString(job_bytes)
        if not job.job_id:
            job.job_id = kv.key[len(self._jobs_prefix) :].decode()
            job_bytes = job.SerializeToString()
        # A deletion has no time of its own in etcd: its event carries the job's last update_time.
        frame = encode_event(
            event_type, revision, job_bytes, job.update_time.ToNanoseconds(), cause if event_type == DELETED else 0
        )
        event = _Event(job.job_id, node_tuple(job), frame, job.state)
        self._events[cache_key] = event
        self._events_bytes += len(frame)
        while len(self._events) > 1 and (len(self._events) > _EVENT_CACHE or self._events_bytes > _EVENT_CACHE_BYTES):
            _, dropped = self._events.popitem(last=False)
            self._events_bytes -= len(dropped.frame)
        return event

    async def _current_revision(self) -> int:
        resp = await self._range(self._jobs_prefix, limit=1, keys_only=True)
        return int(resp.header.revision)

    def watch(self, spec: WatchSpec) -> AsyncGenerator[bytes, None]:
        return self._watch(spec)

    async def _watch(self, spec: WatchSpec) -> AsyncGenerator[bytes, None]:
        if self._closed:
            raise ShuttingDown("the server is shutting down")
        watchers = len(self._watchers) + self._hub.watcher_count
        if self._max_watchers and watchers >= self._max_watchers:
            raise ResourceLimit(f"the server already has {watchers} watchers, its limit", limit="max_watchers")
        await self._ready()
        w = _Watcher()
        self._watchers.add(w)
        try:
            if spec.send_initial_state:
                rows, revision = await self._all_jobs()
                async for message in self._initial(spec, rows, revision):
                    yield message
                del rows  # sent: a long-lived stream must not pin the snapshot
                start = revision + 1
            elif spec.start_revision:
                start = spec.start_revision
                if self._history_size:
                    # --history-size means the same on every engine; etcd's own compaction may hold less.
                    oldest = max(1, await self._current_revision() - self._history_size + 1)
                    if start < oldest:
                        raise RevisionCompacted(
                            f"revision {start} is no longer held; the oldest held is {oldest}", oldest_revision=oldest
                        )
            else:
                start = await self._current_revision() + 1
            # etcd decides what is compacted, on every server alike: the hub may still hold revisions etcd has
            # compacted, and serves a start in the past only when etcd holds it too.
            held = start > self._hub.head_revision or await self._etcd_holds(start)
            if held and self._following and start >= self._hub.oldest_revision:
                self._watchers.discard(w)  # the hub counts it from here (it registers it in this same step)
                live = WatchSpec(spec.job_ids, spec.node_id, start, False, spec.progress_interval)
                async for message in self._hub.watch(live):
                    yield message
                return
            w.delivered = start - 1
            async for message in self._stream(w, spec, start):
                yield message
        finally:
            self._watchers.discard(w)
            w.ended.set()

    async def _initial(
        self, spec: WatchSpec, rows: list[tuple[int, str, pb.JobState, int]], revision: int
    ) -> AsyncIterator[bytes]:
        if spec.job_ids is not None:
            rows = sorted((r for r in rows if r[1] in spec.job_ids), key=lambda r: r[1])
        frames: list[bytes] = []
        size = 0
        for _, _, job, mod_revision in rows:
            if spec.node_id and not any(e.node_id == spec.node_id for e in job.executions):
                continue
            frame = encode_event(INITIAL, mod_revision, job.SerializeToString(), job.update_time.ToNanoseconds())
            frames.append(frame)
            size += len(frame)
            if size >= _MAX_BATCH_BYTES:
                yield encode_response(frames, 0)
                frames, size = [], 0
        frames.append(encode_event(BOOKMARK, revision, None, 0))
        yield encode_response(frames, revision)

    async def _read_watch(self, call: Any, start: int, w: _Watcher) -> None:
        """Moves the etcd stream's responses (and how it ended) into the watcher's queue, bounded by count and by
        bytes: past either, this stops reading and flow control leaves the rest with etcd."""
        queue = w.queue
        try:
            await call.write(self._watch_request(start, prev_kv=True))
            while True:
                resp = await call.read()
                if resp is _EOF:
                    await queue.put(StoreUnavailable("etcd ended the watch stream"))
                    return
                size = resp.ByteSize()
                while w.queued_bytes and w.queued_bytes + size > _WATCH_QUEUE_BYTES:
                    w.room.clear()
                    await w.room.wait()
                w.queued_bytes += size
                await queue.put(resp)
        except grpc.aio.AioRpcError as exc:
            await queue.put(self._unavailable(exc))

    @staticmethod
    def _taken(w: _Watcher, item: Any) -> Any:
        """``item``, just taken from ``w``'s queue: its bytes leave the queue's count."""
        if not isinstance(item, JobStateError):
            w.queued_bytes -= item.ByteSize()
            w.room.set()
        return item

    async def _stream(self, w: _Watcher, spec: WatchSpec, start: int) -> AsyncIterator[bytes]:
        call = self._watch_stub.Watch(metadata=_REQUIRE_LEADER)
        # Everything this stream waits for arrives through the queue, so close() can end it at any point.
        w.reader = asyncio.create_task(self._read_watch(call, start, w), name="etcd-watch-reader")
        try:
            try:
                async with asyncio.timeout(self._timeout):
                    created = self._taken(w, await w.queue.get())
            except TimeoutError as exc:
                raise StoreUnavailable("etcd did not answer the watch request in time") from exc
            if isinstance(created, JobStateError):
                raise created
            if created.compact_revision:
                raise RevisionCompacted(
                    f"revision {start} is no longer held; the oldest held is {created.compact_revision}",
                    oldest_revision=created.compact_revision,
                )
            if created.canceled:
                raise StoreUnavailable(f"etcd refused the watch: {created.cancel_reason}")
            w.ready.set()
            if created.events:
                w.queued_bytes += created.ByteSize()
                w.queue.put_nowait(created)
            while True:
                if spec.progress_interval is None:
                    item = self._taken(w, await w.queue.get())
                else:
                    try:
                        async with asyncio.timeout(spec.progress_interval):
                            item = self._taken(w, await w.queue.get())
                    except TimeoutError:
                        # Every change up to the last revision etcd sent on this stream has been delivered.
                        yield encode_response((encode_event(BOOKMARK, w.delivered, None, 0),), w.delivered)
                        continue
                frames: list[bytes] = []
                size = 0
                failure: JobStateError | None = None
                while True:
                    if isinstance(item, JobStateError):
                        failure = item
                        break
                    if self._closed:
                        failure = ShuttingDown("the server is shutting down")
                        break
                    if item.compact_revision and w.delivered < start:
                        # etcd accepts a watch below its compaction and then cancels it: nothing was sent yet.
                        failure = RevisionCompacted(
                            f"revision {start} is no longer held; the oldest held is {item.compact_revision}",
                            oldest_revision=item.compact_revision,
                        )
                        break
                    if item.compact_revision:
                        failure = WatcherLagged(
                            f"watcher fell behind etcd's compaction at {item.compact_revision}; resume from it "
                            "(or relist if it is compacted)",
                            resume_revision=w.delivered + 1,
                        )
                        break
                    if item.canceled:
                        failure = StoreUnavailable(f"etcd cancelled the watch: {item.cancel_reason}")
                        break
                    causes = self._causes(item.events)
                    for ev in item.events:
                        revision = ev.kv.mod_revision
                        if revision <= w.delivered or ev.kv.key == self._cause_key:
                            continue
                        event = self._event(ev, causes.get(revision, 0))
                        if _matches(spec, event.job_id, event.nodes):
                            frames.append(event.frame)
                            size += len(event.frame)
                        w.delivered = revision
                    if size >= _MAX_BATCH_BYTES or w.queue.empty():
                        break
                    item = self._taken(w, w.queue.get_nowait())
                if frames:
                    yield encode_response(frames, w.delivered)
                if failure is not None:
                    raise failure
        finally:
            if w.reader is not None:
                w.reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await w.reader
            call.cancel()

    # -- the rest ------------------------------------------------------------------------------------------

    def stats(self) -> StoreStats:
        by_state: dict[int, int] = {}
        for state in self._states.values():
            by_state[state] = by_state.get(state, 0) + 1
        return StoreStats(
            jobs=len(self._states),
            jobs_by_state=by_state,
            revision=self._head,
            history_held=0,  # etcd holds the history, up to its compaction
            history_size=0,
            watchers=len(self._watchers) + self._hub.watcher_count,
            watcher_lags=[max(0, self._head - w.delivered) for w in self._watchers] + self._hub.lags(),
            history_bytes_held=self._hub.bytes_held,
            history_bytes=self._hub.history_bytes,
            job_history_entries=-1,  # in etcd; counting them would be a range read per scrape
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._hub.close()
        watchers = list(self._watchers)
        for w in watchers:
            if w.reader is not None:
                w.reader.cancel()
            while not w.queue.empty():
                w.queue.get_nowait()
            w.queue.put_nowait(ShuttingDown("the server is shutting down"))
        if watchers:
            # Each stream ends with SHUTTING_DOWN before the channel under it goes; one stuck writing to a
            # client that does not read is not waited for long.
            waits = [asyncio.ensure_future(w.ended.wait()) for w in watchers]
            _, pending = await asyncio.wait(waits, timeout=2.0)
            for task in pending:
                task.cancel()
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        if self._started is not None and not self._started.done():
            self._started.cancel()
            with contextlib.suppress(asyncio.CancelledError, JobStateError):
                await self._started
        if self._channel is not None:
            await self._channel.close(None)


def open_store(config: ServerConfig) -> EtcdStore:
    """The etcd engine for a server's configuration (it connects in ``start``)."""
    return EtcdStore(
        config.etcd_endpoints,
        config.etcd_prefix or DEFAULT_PREFIX,
        config.limits,
        max_watchers=config.max_watchers,
        history_size=config.history_size,
        history_bytes=config.history_bytes,
        retention=config.retain_finished > 0,
    )
