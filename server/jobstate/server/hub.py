"""The watch hub: fans every committed change out to every matching watcher.

Design (after Nomad's event buffer and etcd's watchable store):

- One bounded ring holds the last ``history_size`` changes, each already serialized once into the bytes of a
  ``WatchResponse.events`` entry. A response is those byte strings joined, so a change that reaches a thousand
  watchers is encoded once, and a batch of waiting changes costs one message.
- The ring is bounded by bytes too (``history_bytes``): each change is charged what it holds, and the oldest go
  first. A large change is kept in pieces cut at the job's large fields, sharing every piece it did not change
  with the job's previous change (a status update of a 2 MiB job holds about a kilobyte), and a shared piece is
  charged once, to the newest change holding it, so the count is exact.
- A watcher of every job is only a cursor into the ring. Publishing wakes all of them at once by setting one
  ``asyncio.Event`` and swapping in a fresh one: the writer never waits for a reader and does no per-watcher
  work for them.
- A watcher with a filter (job ids or a node) is indexed by job id or node id, so a change costs work only
  for the watchers it matches: it is appended to their bounded pending queue. A watcher whose queue overflows
  falls back to reading the ring from its cursor, like an etcd "victim", and returns to its queue once it has
  caught up. The queue refers to changes in the ring: a change the ring lets go of drops its bytes at once,
  so a stalled watcher's queue pins nothing beyond the ring's budget, and that watcher lags when it reads on.
- A watcher whose cursor falls out of the ring (it read too slowly for too long) ends with ``WatcherLagged``,
  which names the revision to resume from. Nothing is ever skipped silently.

Invariant: ``publish`` is called in revision order with revisions one apart, from the event loop's thread,
and never awaits, so a watcher sees either all of a change or none of it. An engine whose revisions have gaps
(etcd, shared with other programs) marks the revisions between its changes with ``skip_to``: they hold no
change and match no watcher. The hub imports nothing of gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field

from jobstate.server.errors import ResourceLimit, RevisionCompacted, ShuttingDown, WatcherLagged
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb

ET = spb.WatchEventType
CREATED = ET.WATCH_EVENT_TYPE_CREATED
UPDATED = ET.WATCH_EVENT_TYPE_UPDATED
DELETED = ET.WATCH_EVENT_TYPE_DELETED
INITIAL = ET.WATCH_EVENT_TYPE_INITIAL
BOOKMARK = ET.WATCH_EVENT_TYPE_BOOKMARK

# A ring scan that matches nothing gives the loop back after this many changes, so one filtered watcher
# catching up through a long history cannot stall every other client.
_SCAN_SLICE = 4096
# What the change history may take in memory by default (``--history-bytes``).
DEFAULT_HISTORY_BYTES = 256 * 1024 * 1024


# --- wire encoding -----------------------------------------------------------------------------------------
# WatchResponse is built from pre-serialized events, so its wire form is written here directly: field 1
# (events, length-delimited) once per event, then field 2 (revision, varint). tests/unit/test_hub.py checks the
# result against protobuf's own parser.


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _timestamp(ns: int) -> bytes:
    seconds, nanos = divmod(ns, 1_000_000_000)
    out = b""
    if seconds:
        out += b"\x08" + _varint(seconds)
    if nanos:
        out += b"\x10" + _varint(nanos)
    return out


def encode_event(event_type: int, revision: int, job_bytes: bytes | None, time_ns: int, cause: int = 0) -> bytes:
    """The serialized ``WatchEvent``, framed as one entry of ``WatchResponse.events`` (``cause``: the
    ``DeleteCause`` of a DELETED event)."""
    head = [b"\x08", _varint(event_type)]
    if revision:
        head += (b"\x10", _varint(revision))
    if job_bytes is not None:
        head += (b"\x1a", _varint(len(job_bytes)))
    tail = b""
    if time_ns:
        ts = _timestamp(time_ns)
        tail = b"\x22" + _varint(len(ts)) + ts
    if cause:
        tail += b"\x28" + _varint(cause)
    length = sum(map(len, head)) + (len(job_bytes) if job_bytes is not None else 0) + len(tail)
    # One join: the job's bytes (up to the size limit) are copied once, not once per field added.
    return b"".join((b"\x0a", _varint(length), *head, job_bytes or b"", tail))


def encode_response(frames: Iterable[bytes], revision: int) -> bytes:
    """The serialized ``WatchResponse`` of already framed events."""
    tail = b"\x10" + _varint(revision) if revision else b""
    return b"".join(frames) + tail


# --- published changes -------------------------------------------------------------------------------------


def node_tuple(job: pb.JobState) -> tuple[str, ...]:
    """The distinct nodes the job has executions on, interned."""
    nodes = {e.node_id for e in job.executions}
    return tuple(sys.intern(n) for n in nodes)


# What the hub charges a change beyond its bytes (the Change, its slot in the ring, the bytes objects' headers),
# and each further part of a split one (its bytes header, and its slots in the parts and keys tuples), measured
# with tracemalloc on CPython 3.11 and rounded up.
CHANGE_OVERHEAD = 200
PART_OVERHEAD = 80


class Change:
    """One committed change as the hub keeps it: serialized once, plus what filters need.

    ``data`` is the serialized ``WatchEvent`` entry, or, for a large one, its ``_Parts`` (see ``split_frame``),
    some of them shared with the job's change before it. A change the hub has evicted holds no bytes at all, so a
    watcher's queue that still names it pins nothing.
    """

    # As few slots as before the byte budget (a held change costs 8 bytes a slot, 100,000 of them by default).
    __slots__ = ("data", "job_id", "nodes", "revision")

    def __init__(
        self,
        revision: int,
        event_type: int,
        job: pb.JobState,
        time_ns: int,
        job_bytes: bytes | None = None,
        job_id: str | None = None,
        cause: int = 0,
    ) -> None:
        # The ring holds history_size of these, so each is kept small: the job id is the store's own string,
        # node ids are interned (a cluster has few nodes, reused by every change), and the job is kept only
        # as the bytes of its event.
        self.revision = revision
        self.job_id = job_id if job_id is not None else job.job_id
        self.nodes = node_tuple(job)
        data = job_bytes if job_bytes is not None else job.SerializeToString()
        self.data: bytes | _Parts = encode_event(event_type, revision, data, time_ns, cause)

    @classmethod
    def restored(cls, revision: int, job_id: str, nodes: tuple[str, ...], frame: bytes) -> Change:
        """A change read back from disk, already serialized (a persistent engine stores ``frame``)."""
        c = cls.__new__(cls)
        c.revision, c.job_id, c.nodes, c.data = revision, job_id, nodes, frame
        return c

    @property
    def frame(self) -> bytes:
        """The serialized event (joined from its parts when split; empty once evicted)."""
        d = self.data
        return d if isinstance(d, bytes) else b"".join(d.parts)

    @property
    def parts(self) -> _Parts | None:
        d = self.data
        return None if isinstance(d, bytes) else d

    @property
    def size(self) -> int:
        """The event's length on the wire."""
        d = self.data
        return len(d) if isinstance(d, bytes) else d.size

    @property
    def cost(self) -> int:
        """What the hub's byte budget charges for it: the bytes it alone holds, plus overhead."""
        d = self.data
        return CHANGE_OVERHEAD + len(d) if isinstance(d, bytes) else d.cost


class _Parts:
    """A large event in pieces: ``keys[i]`` names where ``parts[i]`` sits in the job (None: the small fields
    between the large ones), so the next change of the job can reuse each piece it did not change. ``cost`` is
    what the change is charged: a piece shared with the job's next change is charged to that one."""

    __slots__ = ("cost", "keys", "parts", "size")

    def __init__(self, parts: tuple[bytes, ...], keys: tuple[int | None, ...]) -> None:
        self.parts = parts
        self.keys = keys
        self.size = sum(map(len, parts))
        self.cost = CHANGE_OVERHEAD + self.size + PART_OVERHEAD * len(parts)


# The mark of a revision that holds no change (see ``WatchHub.skip_to``): it matches no watcher.
GAP = Change.restored(0, "", (), b"")


# --- sharing what a change did not change ----------------------------------------------------------------
# A job may be up to 2 MiB, mostly run output; a status update changes a few bytes of it. Kept whole, each
# change would hold a full copy of the job, and 1,000 status updates would hold 2 GB. A large event is
# therefore cut at the job's large fields (each execution's, or within a large execution its run output,
# results and status), and a piece equal to the one at the same place in the job's previous change is that
# same bytes object: the history holds what changed, plus what each change's small fields take. The wire bytes
# are unchanged: the pieces, joined, are exactly the event.

# Events shorter than this are kept whole (most are: a job with a few plain executions is about 300 bytes).
SPLIT_MIN = 16 * 1024
# A field at least this long is a piece of its own; an execution at least NEST_MIN long is cut at its fields.
_PIECE_MIN = 1024
_NEST_MIN = 8 * 1024
_LEN = 2  # the length-delimited wire type
_EVENT_JOB = 3  # WatchEvent.job
_JOB_EXECUTIONS = 4  # JobState.executions


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, start of the field, start of its value, end) of each field in ``buf[start:end]``; the
    value bounds are meaningful for length-delimited fields only."""
    i = start
    while i < end:
        key, j = _read_varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == _LEN:
            length, v = _read_varint(buf, j)
            yield number, i, v, v + length
            i = v + length
        else:
            if wire == 0:
                _, j = _read_varint(buf, j)
            elif wire == 1:
                j += 8
            elif wire == 5:
                j += 4
            else:
                raise ValueError(f"wire type {wire} in a job: not written by this server")
            yield number, i, j, j
            i = j


def split_frame(frame: bytes, previous: _Parts | None = None) -> tuple[_Parts, int]:
    """``frame`` cut at the job's large fields (see above), reusing ``previous``'s pieces where equal; and how
    many bytes were reused."""
    reuse: dict[int, bytes] = {}
    if previous is not None:
        reuse = {k: p for k, p in zip(previous.keys, previous.parts, strict=True) if k is not None}
    cuts: list[tuple[int, int, int]] = []  # (start, end, key) of each large piece, in order
    _, body = _read_varint(frame, 1)
    for number, _, v, end in _fields(frame, body, len(frame)):
        if number != _EVENT_JOB:
            continue
        ordinal = 0
        for num, s, fv, fe in _fields(frame, v, end):
            if num != _JOB_EXECUTIONS:
                if fe - fv >= _PIECE_MIN:
                    cuts.append((s, fe, -num))
                continue
            ordinal += 1
            if fe - fv >= _NEST_MIN:
                for inner, es, ev, ee in _fields(frame, fv, fe):
                    if ee - ev >= _PIECE_MIN:
                        cuts.append((es, ee, ordinal * 64 + inner))
            elif fe - fv >= _PIECE_MIN:
                cuts.append((s, fe, ordinal * 64))
    parts: list[bytes] = []
    keys: list[int | None] = []
    reused = 0
    at = 0
    for s, e, key in cuts:
        if s > at:
            parts.append(frame[at:s])
            keys.append(None)
        old = reuse.get(key)
        # startswith compares in place: an unchanged piece is never copied.
        if old is not None and len(old) == e - s and frame.startswith(old, s):
            parts.append(old)
            reused += len(old)
        else:
            parts.append(frame[s:e])
        keys.append(key)
        at = e
    if at < len(frame):
        parts.append(frame[at:])
        keys.append(None)
    return _Parts(tuple(parts), tuple(keys)), reused


@dataclass(frozen=True, slots=True)
class WatchSpec:
    """What a watcher asks for (WatchRequest, validated)."""

    job_ids: frozenset[str] | None = None
    node_id: str = ""
    start_revision: int = 0
    send_initial_state: bool = False
    progress_interval: float | None = None


@dataclass(slots=True)
class Snapshot:
    """Every matching job at ``revision``: (serialized JobState, revision of its last change, time of it)."""

    revision: int
    jobs: list[tuple[bytes, int, int]] = field(default_factory=list)


@dataclass(slots=True)
class HubStats:
    published: int = 0
    responses: int = 0
    events_delivered: int = 0
    lagged: int = 0
    watchers_started: int = 0


class _Wake:
    """A filtered watcher's wake-up: ``asyncio.Event``'s behaviour for one waiter, without the Event's deque
    of waiters (about 600 bytes a watcher); a future exists only while the watcher waits."""

    __slots__ = ("flag", "waiter")

    def __init__(self) -> None:
        self.flag = False
        self.waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self.flag = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        self.flag = False

    async def wait(self) -> None:
        if self.flag:
            return
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None


# Unfiltered watchers read the ring only: they share these, never pushed to (a list is 56 bytes; a deque ~600).
_NO_PENDING: list[Change] = []
_UNUSED_WAKE = _Wake()


class _Watcher:
    __slots__ = ("cursor", "failure", "job_ids", "node_id", "overflow", "pending", "unfiltered", "wake")

    def __init__(self, spec: WatchSpec, cursor: int) -> None:
        # Set by ``fail_all``: the stream ends with this error at its next step.
        self.failure: Exception | None = None
        self.job_ids = spec.job_ids
        self.node_id = spec.node_id
        self.unfiltered = spec.job_ids is None and not spec.node_id
        # The next revision this watcher has not yet considered.
        self.cursor = cursor
        # True while the watcher reads the ring instead of its pending queue.
        self.overflow = True
        if self.unfiltered:
            # Read only from the ring and woken by the hub's shared event: an idle watcher of every job keeps
            # no queue and no wake-up of its own.
            self.pending: list[Change] = _NO_PENDING
            self.wake = _UNUSED_WAKE
        else:
            self.pending = []
            self.wake = _Wake()

    def matches(self, c: Change) -> bool:
        return (self.job_ids is None or c.job_id in self.job_ids) and (not self.node_id or self.node_id in c.nodes)


class WatchHub:
    """Fan-out of committed changes; see the module docstring for the design."""

    def __init__(
        self,
        history_size: int = 100_000,
        *,
        history_bytes: int = DEFAULT_HISTORY_BYTES,
        max_batch_bytes: int = 1 << 20,
        max_pending: int = 1024,
        max_watchers: int = 0,
        linger_per_watcher: float = 1e-3,
        max_linger: float = 0.25,
    ) -> None:
        if history_size < 1:
            raise ValueError("history_size must be at least 1")
        if history_bytes < 0:
            raise ValueError("history_bytes must not be negative")
        self._cap = history_size
        self._ring: list[Change | None] = [None] * history_size
        self._head = 0
        self._oldest = 1
        # The bytes the held changes take (their ``cost``), and the most they may take (0: no bound but the count).
        self._bytes = 0
        self._budget = history_bytes
        # Each job's latest held change that was split, whose pieces the job's next change may share.
        self._last: dict[str, Change] = {}
        self._max_batch_bytes = max_batch_bytes
        self._max_pending = max_pending
        self._max_watchers = max_watchers
        self._wake = asyncio.Event()
        self._wake_handle: asyncio.Handle | None = None
        self._last_wake = 0.0
        # Unfiltered watchers waiting for the next wake-up, and how long the last wake-up kept them busy.
        self._idle_unfiltered = 0
        self._round = 0.0
        self._linger_per_watcher = linger_per_watcher
        self._max_linger = max_linger
        self._unfiltered = 0
        self._watchers: set[_Watcher] = set()
        self._by_job: dict[str, set[_Watcher]] = {}
        self._by_node: dict[str, set[_Watcher]] = {}
        self._closed = False
        self.stats = HubStats()

    # -- state ---------------------------------------------------------------------------------------------

    @property
    def head_revision(self) -> int:
        """The revision of the last published change."""
        return self._head

    @property
    def oldest_revision(self) -> int:
        """The oldest revision a watcher can still start from."""
        return self._oldest

    @property
    def history_size(self) -> int:
        return self._cap

    @property
    def held(self) -> int:
        """How many changes the ring holds now."""
        return self._head - self._oldest + 1

    @property
    def bytes_held(self) -> int:
        """What the held changes take, by the hub's account (their bytes plus a fixed overhead each)."""
        return self._bytes

    @property
    def history_bytes(self) -> int:
        """The most the held changes may take (0: bounded by count only)."""
        return self._budget

    @property
    def watcher_count(self) -> int:
        return len(self._watchers)

    def lags(self) -> list[int]:
        """How many revisions each watcher is behind the head."""
        head = self._head
        return [max(0, head + 1 - w.cursor) if (w.overflow or w.unfiltered) else len(w.pending) for w in self._watchers]

    def reset(self, head_revision: int) -> None:
        """Starts the hub at ``head_revision`` with nothing held (an engine reopened after a restart)."""
        self._forget()
        self._head = head_revision
        self._oldest = head_revision + 1

    def _forget(self) -> None:
        """Lets go of everything held (the head stays where it is: the caller sets it)."""
        self._evict_through(self._head)
        self._ring = [None] * self._cap
        self._bytes = 0
        self._last.clear()

    def restore(self, head_revision: int, changes: Iterable[Change]) -> None:
        """Starts the hub at ``head_revision`` holding ``changes``, read back from disk by an engine reopened
        after a restart, so watchers resume by revision across it.

        The changes must be consecutive and end at ``head_revision`` (the ring's invariant); the last
        ``history_size`` are kept, within ``history_bytes``. Only before the hub is in use: no watcher, nothing
        published.
        """
        if self._watchers or self.stats.published:
            raise ValueError("restore is only for a hub not yet in use")
        self._forget()
        expected = 0
        for c in changes:
            revision = c.revision
            if expected and revision != expected:
                raise ValueError(f"revision {revision} restored after {expected - 1}: revisions must be consecutive")
            if not expected:
                self._head, self._oldest = revision - 1, revision
            self._append(c)
            expected = revision + 1
        if expected and expected != head_revision + 1:
            raise ValueError(f"restored events end at {expected - 1}, not at the head revision {head_revision}")
        if not expected:
            self._head, self._oldest = head_revision, head_revision + 1

    def fail_all(self, error: Callable[[], Exception]) -> None:
        """Ends every watch stream open now with ``error()`` (an engine that lost its source of changes: its
        watchers resume once it is back, or learn why not). Streams opened later are not affected."""
        for w in self._watchers:
            w.failure = error()
            w.wake.set()
        if self._wake_handle is not None:
            self._wake_handle.cancel()
        self._wake_now()

    def restart_at(self, head_revision: int, error: Callable[[], Exception]) -> None:
        """Forgets everything held and continues from ``head_revision``: for an engine that missed changes
        (its source was compacted while it was away). Every open stream ends with ``error()`` first, so none
        skips a change silently."""
        self.fail_all(error)
        self._forget()
        self._head = head_revision
        self._oldest = head_revision + 1

    def close(self) -> None:
        """Ends every watch stream with ``ShuttingDown`` and refuses new ones."""
        self._closed = True
        self._wake.set()
        for w in self._watchers:
            w.wake.set()

    # -- publishing ----------------------------------------------------------------------------------------

    def publish(self, revision: int, event_type: int, job: pb.JobState, time_ns: int) -> None:
        self.publish_change(Change(revision, event_type, job, time_ns))

    def skip_to(self, revision: int) -> None:
        """Marks the revisions after the head up to ``revision`` as holding no change of this store."""
        head = self._head
        if revision <= head:
            return
        cap = self._cap
        oldest = self._oldest
        self._evict_through(revision - cap)
        first = max(head + 1, revision - cap + 1)
        ring = self._ring
        for r in range(first, revision + 1):
            ring[r % cap] = GAP
        self._head = revision
        if self._oldest != oldest:
            # Watchers that had read everything up to the old head missed nothing in the gap: move them past it
            # rather than report them lagged when the ring moves on.
            for w in self._watchers:
                if w.cursor > head:
                    w.cursor = max(w.cursor, revision + 1)

    def publish_change(self, c: Change) -> None:
        """Publishes a change serialized beforehand (by an engine that also wrote ``c.frame`` to disk)."""
        revision = c.revision
        if revision != self._head + 1:
            raise ValueError(f"revision {revision} published after {self._head}: revisions must be consecutive")
        self._append(c)
        self.stats.published += 1
        targets = self._by_job.get(c.job_id)
        if targets:
            for w in targets:
                if w.matches(c):
                    self._push(w, c)
        if self._by_node:
            for node in c.nodes:
                for w in self._by_node.get(node, ()):
                    self._push(w, c)
        if self._unfiltered and self._wake_handle is None:
            self._schedule_wake()

    def _append(self, c: Change) -> None:
        """Holds ``c`` as the newest change, then lets go of the oldest until both bounds hold again: at most
        ``history_size`` changes, taking at most ``history_bytes`` (the newest change is always held)."""
        revision = c.revision
        self._evict_through(revision - self._cap)
        data = c.data
        if isinstance(data, bytes) and len(data) >= SPLIT_MIN:
            previous = self._last.get(c.job_id)
            try:
                data, reused = split_frame(data, previous.parts if previous is not None else None)
            except (ValueError, IndexError):  # not a job as this server writes them: kept whole
                pass
            else:
                c.data = data
                if previous is not None and reused:
                    # The pieces both hold are charged to the newer: the older goes first and leaves them alive.
                    previous_parts = previous.data
                    assert not isinstance(previous_parts, bytes)
                    previous_parts.cost -= reused
                    self._bytes -= reused
                self._last[c.job_id] = c
        if isinstance(data, bytes):
            self._last.pop(c.job_id, None)
        cost = c.cost
        self._ring[revision % self._cap] = c
        self._head = revision
        self._bytes += cost
        if self._budget:
            while self._bytes > self._budget and self._oldest < revision:
                self._evict_through(self._oldest)

    def _evict_through(self, revision: int) -> None:
        """Lets go of every held change up to ``revision``; the oldest held is then the one after it."""
        if revision < self._oldest:
            return
        ring, cap = self._ring, self._cap
        for r in range(self._oldest, min(revision, self._head) + 1):
            c = ring[r % cap]
            ring[r % cap] = None
            if c is None or c is GAP:
                continue
            self._bytes -= c.cost
            if self._last.get(c.job_id) is c:
                del self._last[c.job_id]
            # A filtered watcher's queue may still name it: its bytes go now all the same, and that watcher is
            # told it lagged when it reads on (``_collect``), as a ring reader would be.
            c.data = b""
        self._oldest = revision + 1

    def _schedule_wake(self) -> None:
        """Wakes every unfiltered watcher at once, at most once per linger interval.

        A change after a quiet spell goes out at the end of this loop iteration. Under a stream of changes the
        watchers wake once per interval and each sends everything waiting as one response: one message per
        watcher per interval, not per change, so fan-out cost stops growing with the write rate. The interval
        grows with the number of watchers (1 ms each, several times what one response costs, so fan-out keeps to a
        share of the loop and writers are not starved), bounded by ``max_linger``. Measured with 1,000 watchers of
        every job: a 50 ms cap starved the writer (one event per response, 10k events/s); 250 ms gave 245k events/s.
        With 100 watchers at full speed, 300 us a watcher gave 56-59k events/s (18 events a response), 1 ms 80-91k
        (63-80), 2 ms 85-89k with twice the p99; with 10 watchers offered 1,000 writes/s, 300 us saturated the
        machine (610-660 writes/s, p99 about 1 s) where 1 ms kept up (930-1,000 writes/s, p99 44-220 ms).
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # published outside a loop (tests): no one can be waiting on a timer
            self._wake_now()
            return
        now = loop.time()
        # A wake-up's round (every watcher sending its batch) can take longer than the linger when watchers are
        # many or the machine is busy; spacing wake-ups at least twice the last round apart keeps fan-out to at
        # most half of the loop, so writers are never starved into one change per round.
        linger = max(min(self._max_linger, self._linger_per_watcher * self._unfiltered), min(1.0, 2 * self._round))
        due = self._last_wake + linger
        if now >= due:
            self._wake_handle = loop.call_soon(self._wake_now)
        else:
            self._wake_handle = loop.call_at(due, self._wake_now)

    def _wake_now(self) -> None:
        self._wake_handle = None
        with contextlib.suppress(RuntimeError):
            self._last_wake = asyncio.get_running_loop().time()
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()

    def _push(self, w: _Watcher, c: Change) -> None:
        if w.overflow:
            return
        if len(w.pending) >= self._max_pending:
            # Too far behind to queue: read the ring from the cursor instead (it holds these changes too).
            w.overflow = True
            w.pending.clear()
        else:
            w.pending.append(c)
        w.wake.set()

    # -- watching ------------------------------------------------------------------------------------------

    def _register(self, w: _Watcher) -> None:
        self._watchers.add(w)
        self.stats.watchers_started += 1
        if w.unfiltered:
            self._unfiltered += 1
        elif w.job_ids is not None:
            for job_id in w.job_ids:
                self._by_job.setdefault(job_id, set()).add(w)
        else:
            self._by_node.setdefault(w.node_id, set()).add(w)

    def _unregister(self, w: _Watcher) -> None:
        if w not in self._watchers:
            return
        self._watchers.discard(w)
        if w.unfiltered:
            self._unfiltered -= 1
            return
        index, keys = (self._by_job, w.job_ids) if w.job_ids is not None else (self._by_node, frozenset((w.node_id,)))
        for key in keys:
            ws = index.get(key)
            if ws is not None:
                ws.discard(w)
                if not ws:
                    del index[key]

    async def watch(
        self, spec: WatchSpec, snapshot: Callable[[], Snapshot] | None = None
    ) -> AsyncGenerator[bytes, None]:
        """Serialized ``WatchResponse`` messages for ``spec``, until the caller stops iterating.

        Raises ``RevisionCompacted`` (first iteration), ``WatcherLagged``, ``ShuttingDown`` or ``ResourceLimit``.
        ``snapshot`` is required for ``send_initial_state`` and must not await: it runs in the same step that
        places the watcher's cursor, so snapshot and stream meet with no gap and no repeat.
        """
        if self._closed:
            raise ShuttingDown("the server is shutting down")
        if self._max_watchers and len(self._watchers) >= self._max_watchers:
            raise ResourceLimit(
                f"the server already has {len(self._watchers)} watchers, its limit", limit="max_watchers"
            )
        snap: Snapshot | None = None
        if spec.send_initial_state:
            if snapshot is None:
                raise ValueError("send_initial_state needs a snapshot function")
            snap = snapshot()
            cursor = snap.revision + 1
        elif spec.start_revision:
            if spec.start_revision < self._oldest and spec.start_revision <= self._head:
                raise RevisionCompacted(
                    f"revision {spec.start_revision} is no longer held; the oldest held is {self._oldest}",
                    oldest_revision=self._oldest,
                )
            cursor = spec.start_revision
        else:
            cursor = self._head + 1
        w = _Watcher(spec, cursor)
        self._register(w)
        try:
            if snap is not None:
                async for message in self._initial(snap):
                    yield message
                # Sent: let go of it, or a long-lived stream would pin every job's bytes as they were then.
                snap = None
            while True:
                if w.failure is not None:
                    raise w.failure
                if self._closed:
                    raise ShuttingDown("the server is shutting down")
                frames, upto, more = self._collect(w)
                if frames:
                    self.stats.responses += 1
                    self.stats.events_delivered += len(frames)
                    yield encode_response(frames, upto)
                    continue
                if more:
                    await asyncio.sleep(0)
                    continue
                wake: asyncio.Event | _Wake = self._wake if w.unfiltered else w.wake
                if w.unfiltered:
                    self._idle_unfiltered += 1
                    if self._idle_unfiltered == self._unfiltered and self._last_wake:
                        self._round = asyncio.get_running_loop().time() - self._last_wake
                else:
                    wake.clear()
                try:
                    try:
                        if spec.progress_interval is None:
                            await wake.wait()
                            continue
                        async with asyncio.timeout(spec.progress_interval):
                            await wake.wait()
                    finally:
                        if w.unfiltered:
                            self._idle_unfiltered -= 1
                except TimeoutError:
                    if not (w.unfiltered or w.overflow or w.pending):
                        # Nothing was pushed while idle: every change up to the head passed this filter by.
                        w.cursor = max(w.cursor, self._head + 1)
                    upto = min(w.cursor - 1, self._head)
                    yield encode_response((encode_event(BOOKMARK, upto, None, 0),), upto)
        finally:
            self._unregister(w)

    async def _initial(self, snap: Snapshot) -> AsyncIterator[bytes]:
        frames: list[bytes] = []
        size = 0
        for data, revision, time_ns in snap.jobs:
            frame = encode_event(INITIAL, revision, data, time_ns)
            frames.append(frame)
            size += len(frame)
            if size >= self._max_batch_bytes:
                yield encode_response(frames, 0)
                frames, size = [], 0
        frames.append(encode_event(BOOKMARK, snap.revision, None, 0))
        yield encode_response(frames, snap.revision)

    def _collect(self, w: _Watcher) -> tuple[list[bytes], int, bool]:
        """The frames waiting for ``w`` (within the batch bound), the revision they cover, and whether more wait."""
        if w.unfiltered or w.overflow:
            return self._collect_ring(w)
        pending = w.pending
        if pending and pending[0].revision < self._oldest:
            # Its queue names changes the ring no longer holds (and whose bytes are gone): read the ring from the
            # cursor, which reports the lag, or resumes if everything missed was before the cursor anyway.
            w.overflow = True
            pending.clear()
            return self._collect_ring(w)
        frames: list[bytes] = []
        size = 0
        last = 0
        taken = 0
        waiting = len(pending)
        while taken < waiting and size < self._max_batch_bytes:
            c = pending[taken]
            taken += 1
            if c.revision < w.cursor:
                continue
            data = c.data
            if isinstance(data, bytes):
                frames.append(data)
                size += len(data)
            else:
                frames.extend(data.parts)
                size += data.size
            last = c.revision
        del pending[:taken]
        if pending:
            w.cursor = last + 1
        else:
            w.cursor = max(w.cursor, self._head + 1)
        return frames, w.cursor - 1, bool(pending)

    def _collect_ring(self, w: _Watcher) -> tuple[list[bytes], int, bool]:
        head = self._head
        rev = w.cursor
        if rev > head:
            w.overflow = False
            return [], head, False
        if rev < self._oldest:
            self.stats.lagged += 1
            raise WatcherLagged(
                f"watcher fell behind: revision {rev} is no longer held (oldest {self._oldest}); resume from it "
                "(or relist if it is compacted)",
                resume_revision=rev,
            )
        ring, cap, limit = self._ring, self._cap, self._max_batch_bytes
        frames: list[bytes] = []
        size = 0
        stop = min(head, rev + _SCAN_SLICE)
        unfiltered = w.unfiltered
        while rev <= stop and size < limit:
            c = ring[rev % cap]
            assert c is not None
            if c is not GAP and (unfiltered or w.matches(c)):
                # Inline rather than a method call: this loop runs once per change per watcher.
                data = c.data
                if isinstance(data, bytes):
                    frames.append(data)
                    size += len(data)
                else:
                    frames.extend(data.parts)
                    size += data.size
            rev += 1
        w.cursor = rev
        if rev > head:
            w.overflow = False
            w.pending.clear()
        return frames, rev - 1, rev <= head
