"""A checker of the watch guarantees, after etcd's robustness validator (tests/robustness/validate/watch.go).

Feed it every ``WatchResponse`` of a watch (``observe``), across resumes (``begin`` again with the revision
the stream was resumed from), and the changes the writers saw committed (``Commit.of(response)`` of every
write response). It checks, as responses arrive and at the end (``check_complete``):

- ordered: event revisions strictly increase; a response's ``revision`` never goes back and no later event
  is at or below it (a bookmark is a promise that everything up to it was delivered);
- unique: no revision is delivered twice;
- atomic: one change is one event: between two events of a job exactly one thing changed (the job's state,
  with every then non-terminal execution cancelled in the same event, or at most one execution), and nothing of a job
  changes after it reached a terminal state except its deletion;
- reliable: per job, each event's version is one more than the last one seen (``CREATED`` is version 1,
  ``DELETED`` carries the last version); given the committed changes, every change matching the filter in
  the covered range appears, with the job and version that was committed;
- resumable: a stream resumed at ``next_revision`` continues exactly where the last one stopped.

Usable from any test: ``checker = WatchChecker(job_ids=..., node_id=...)``; ``checker.begin(start_revision)``;
``checker.observe(resp)`` for each response; ``checker.check_complete(commits)`` at the end.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb

ET = spb.WatchEventType
CREATED = ET.WATCH_EVENT_TYPE_CREATED
UPDATED = ET.WATCH_EVENT_TYPE_UPDATED
DELETED = ET.WATCH_EVENT_TYPE_DELETED
INITIAL = ET.WATCH_EVENT_TYPE_INITIAL
BOOKMARK = ET.WATCH_EVENT_TYPE_BOOKMARK

TERMINAL_JOB = frozenset({pb.JOB_STATE_TYPE_COMPLETED, pb.JOB_STATE_TYPE_ERROR, pb.JOB_STATE_TYPE_CANCELLED})
TERMINAL_EXECUTION = frozenset(
    {
        pb.EXECUTION_STATE_TYPE_ASK_FOR_BID_REJECTED,
        pb.EXECUTION_STATE_TYPE_BID_REJECTED,
        pb.EXECUTION_STATE_TYPE_COMPLETED,
        pb.EXECUTION_STATE_TYPE_FAILED,
        pb.EXECUTION_STATE_TYPE_CANCELLED,
    }
)


class WatchViolation(AssertionError):
    """A watch guarantee did not hold; the message names the stream, the guarantee and the revisions."""


@dataclass(frozen=True, slots=True)
class Commit:
    """One change a writer saw committed: its revision, the job and the version after it."""

    revision: int
    job_id: str
    version: int
    nodes: frozenset[str] = frozenset()
    deleted: bool = False

    @classmethod
    def of(cls, response: object, *, deleted: bool = False) -> Commit:
        """From any write response (``job`` and ``revision``); ``deleted`` for a DeleteJobResponse."""
        job: pb.JobState = response.job  # type: ignore[attr-defined]
        return cls(
            revision=response.revision,  # type: ignore[attr-defined]
            job_id=job.job_id,
            version=job.version,
            nodes=frozenset(e.node_id for e in job.executions),
            deleted=deleted,
        )


@dataclass(frozen=True, slots=True)
class Seen:
    """One delivered event, as recorded."""

    type: int
    revision: int
    job_id: str
    version: int
    segment: int


@dataclass(slots=True)
class _Segment:
    start_revision: int
    initial_state: bool
    # The first revision from which this segment promises every matching change (None: not known yet).
    covered_from: int | None
    covered_to: int = 0
    bookmarked: bool = False


@dataclass
class WatchChecker:
    """Records one logical watch (one or more streams, each resuming the last) and checks its guarantees."""

    name: str = "watch"
    job_ids: frozenset[str] | None = None
    node_id: str = ""
    events: list[Seen] = field(default_factory=list)
    responses: int = 0
    _segments: list[_Segment] = field(default_factory=list)
    _jobs: dict[str, pb.JobState] = field(default_factory=dict)
    _deleted: set[str] = field(default_factory=set)
    _last_revision: int = 0  # highest live event revision delivered
    _covered: int = 0  # highest revision promised delivered (response.revision / bookmark)
    _revisions: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.job_ids is not None:
            self.job_ids = frozenset(self.job_ids)

    # -- recording -----------------------------------------------------------------------------------------

    def fail(self, guarantee: str, message: str) -> None:
        raise WatchViolation(f"[{self.name}] {guarantee}: {message}")

    @property
    def next_revision(self) -> int:
        """Where a resumed stream must start so that it misses nothing and repeats nothing."""
        return max(self._covered, self._last_revision) + 1

    def begin(self, start_revision: int = 0, *, initial_state: bool = False) -> None:
        """Starts a stream: the first, or a resume with ``start_revision`` (a relist with ``initial_state``)."""
        if self._segments and start_revision and not initial_state and start_revision != self.next_revision:
            self.fail(
                "resumable",
                f"stream {len(self._segments)} resumes at {start_revision}, but the last one delivered up to "
                f"{self.next_revision - 1}",
            )
        if initial_state:
            # A relist: what happened between the last stream and the snapshot is legitimately not seen.
            self._jobs.clear()
            self._deleted.clear()
        covered_from = start_revision or None
        self._segments.append(_Segment(start_revision, initial_state, covered_from, covered_to=start_revision - 1))

    def match(self, job_id: str, nodes: Iterable[str]) -> bool:
        return (self.job_ids is None or job_id in self.job_ids) and (not self.node_id or self.node_id in nodes)

    def observe(self, response: spb.WatchResponse | bytes) -> None:
        """Records one response and checks what can be checked as it arrives."""
        if isinstance(response, bytes):
            response = spb.WatchResponse.FromString(response)
        if not self._segments:
            self.begin()
        seg = self._segments[-1]
        self.responses += 1
        if not response.events and not response.revision:
            self.fail("ordered", "an empty response without a revision")
        for event in response.events:
            self._event(seg, event)
        if response.revision:
            top = max((e.revision for e in response.events if e.type != INITIAL), default=0)
            if response.revision < top:
                self.fail("ordered", f"response revision {response.revision} below its own event at {top}")
            if response.revision < self._covered:
                self.fail("ordered", f"response revision went back from {self._covered} to {response.revision}")
            self._covered = response.revision
            seg.covered_to = max(seg.covered_to, response.revision)
            if seg.covered_from is None and seg.bookmarked:
                seg.covered_from = response.revision + 1

    def _event(self, seg: _Segment, event: spb.WatchEvent) -> None:
        rev = event.revision
        if event.type == BOOKMARK:
            if event.HasField("job"):
                self.fail("ordered", f"bookmark at {rev} carries a job")
            if rev < self._covered or rev < self._last_revision:
                self.fail("ordered", f"bookmark at {rev} behind what was delivered ({self.next_revision - 1})")
            if seg.initial_state and not seg.bookmarked:
                seg.bookmarked = True
                seg.covered_from = rev + 1
                seg.covered_to = rev
            if seg.covered_from is None:
                seg.covered_from = rev + 1
            self._covered = max(self._covered, rev)
            return
        job = event.job
        if not job.job_id:
            self.fail("atomic", f"{ET.Name(event.type)} event at {rev} without a job")
        if not self.match(job.job_id, (e.node_id for e in job.executions)):
            self.fail("filter", f"event at {rev} for job {job.job_id} does not match the watch's filter")
        if event.type == INITIAL:
            if not seg.initial_state or seg.bookmarked:
                self.fail("ordered", f"INITIAL event for {job.job_id} outside the snapshot (revision {rev})")
            if job.job_id in self._jobs:
                self.fail("unique", f"job {job.job_id} twice in the initial snapshot")
            self._jobs[job.job_id] = job
            self.events.append(Seen(INITIAL, rev, job.job_id, job.version, len(self._segments) - 1))
            return
        if seg.initial_state and not seg.bookmarked:
            self.fail("ordered", f"live event at {rev} before the snapshot's bookmark")
        if rev in self._revisions:
            self.fail("unique", f"revision {rev} delivered twice (job {job.job_id})")
        if rev <= self._last_revision or rev <= self._covered:
            self.fail(
                "ordered",
                f"event at {rev} (job {job.job_id}) after revision {max(self._last_revision, self._covered)} "
                "was delivered or promised",
            )
        if seg.covered_from is None:
            seg.covered_from = rev
        self._revisions.add(rev)
        self._last_revision = rev
        self._check_job(event, rev)
        self.events.append(Seen(event.type, rev, job.job_id, job.version, len(self._segments) - 1))

    def _check_job(self, event: spb.WatchEvent, rev: int) -> None:
        job = event.job
        before = self._jobs.get(job.job_id)
        if event.type == CREATED:
            if job.version != 1:
                self.fail("reliable", f"CREATED {job.job_id} at {rev} has version {job.version}, not 1")
            if before is not None:
                self.fail("reliable", f"CREATED {job.job_id} at {rev} while it exists at version {before.version}")
            self._deleted.discard(job.job_id)
            self._jobs[job.job_id] = job
            return
        if job.job_id in self._deleted:
            if not self.node_id or event.type != UPDATED:
                self.fail("reliable", f"{ET.Name(event.type)} of deleted job {job.job_id} at {rev}")
            # A job created again under the same id: its CREATED had no execution on the node, so it did not
            # match; this is the first matching change of the new job.
            self._deleted.discard(job.job_id)
            before = None
        if event.type == DELETED:
            if before is not None and job.version != before.version:
                self.fail(
                    "reliable",
                    f"DELETED {job.job_id} at {rev} carries version {job.version}, the last seen was {before.version}",
                )
            self._jobs.pop(job.job_id, None)
            self._deleted.add(job.job_id)
            return
        if event.type != UPDATED:
            self.fail("atomic", f"unknown event type {event.type} at {rev}")
        if before is not None:
            if job.version != before.version + 1:
                self.fail(
                    "reliable",
                    f"job {job.job_id} at {rev}: version {job.version} after {before.version} (a change missed "
                    "or repeated)",
                )
            self._check_step(before, job, rev)
        self._jobs[job.job_id] = job

    def _check_step(self, before: pb.JobState, after: pb.JobState, rev: int) -> None:
        """One change, one event: exactly one thing moved between two consecutive versions of a job."""
        jid = after.job_id
        if before.state in TERMINAL_JOB:
            self.fail("atomic", f"job {jid} changed at {rev} after reaching a final state")
        old = {e.compute_reference: e for e in before.executions}
        changed = [e for e in after.executions if (p := old.get(e.compute_reference)) is None or e.version != p.version]
        for e in changed:
            prev = old.get(e.compute_reference)
            if prev is None:
                if e.version != 1:
                    self.fail("atomic", f"new execution {e.compute_reference} of {jid} at {rev} is v{e.version}")
            elif e.version != prev.version + 1:
                self.fail(
                    "atomic",
                    f"execution {e.compute_reference} of {jid} went from v{prev.version} to v{e.version} at {rev}",
                )
            elif prev.state in TERMINAL_EXECUTION:
                self.fail("atomic", f"final execution {e.compute_reference} of {jid} changed at {rev}")
        if after.state != before.state:
            if after.state in TERMINAL_JOB:
                still = [e.compute_reference for e in after.executions if e.state not in TERMINAL_EXECUTION]
                if still:
                    self.fail("atomic", f"job {jid} final at {rev} but executions {still} are not (cascade split)")
                for e in changed:
                    if e.state != pb.EXECUTION_STATE_TYPE_CANCELLED or e.compute_reference not in old:
                        self.fail("atomic", f"job {jid} final at {rev} changed execution {e.compute_reference} too")
            elif changed:
                self.fail("atomic", f"job {jid} changed its state and executions in one event at {rev}")
        elif len(changed) > 1:
            # Zero is allowed: a job set to its own state again (to record a comment) is a change too.
            self.fail("atomic", f"job {jid} at {rev}: {len(changed)} executions changed in one event")

    def lagged(self, resume_revision: int) -> None:
        """The stream ended with WATCHER_LAGGED naming ``resume_revision``: it must be where we stopped."""
        if self._segments and self._segments[-1].covered_from is None and not self.events:
            return
        if resume_revision != self.next_revision:
            self.fail(
                "resumable",
                f"WATCHER_LAGGED says resume from {resume_revision}, but {self.next_revision - 1} was the last "
                "revision delivered",
            )

    # -- the end -------------------------------------------------------------------------------------------

    def live_events(self) -> list[Seen]:
        return [e for e in self.events if e.type != INITIAL]

    def check_complete(self, commits: Iterable[Commit], *, exhaustive: bool = True) -> int:
        """Every committed change matching the filter in each stream's covered range was delivered, as committed.

        ``exhaustive``: ``commits`` holds every change of the store (no timeouts or unknown writers), so every
        delivered event must also be one of them. Returns how many commits were checked.
        """
        by_rev = {c.revision: c for c in commits}
        delivered = {e.revision: e for e in self.live_events()}
        for e in delivered.values():
            c = by_rev.get(e.revision)
            if c is None:
                if exhaustive:
                    self.fail("reliable", f"event at {e.revision} (job {e.job_id}) matches no committed change")
                continue
            if (c.job_id, c.version) != (e.job_id, e.version):
                self.fail(
                    "reliable",
                    f"event at {e.revision} is job {e.job_id} v{e.version}, committed was {c.job_id} v{c.version}",
                )
            if c.deleted != (e.type == DELETED):
                self.fail("reliable", f"event at {e.revision} is {ET.Name(e.type)}, committed deleted={c.deleted}")
        checked = 0
        for seg in self._segments:
            if seg.covered_from is None:
                continue
            for rev in range(seg.covered_from, seg.covered_to + 1):
                c = by_rev.get(rev)
                if c is None or not self.match(c.job_id, c.nodes):
                    continue
                checked += 1
                if rev not in delivered:
                    self.fail(
                        "reliable",
                        f"committed change at {rev} (job {c.job_id} v{c.version}) never delivered; stream "
                        f"covered {seg.covered_from}..{seg.covered_to}",
                    )
        return checked

    def check_snapshot(self, jobs: Iterable[pb.JobState], *, partial: bool = False) -> None:
        """The latest state seen per job equals ``jobs`` (what GetJob/ListJobs say after all writes).

        ``partial``: the watch started after some jobs last changed (start_revision 0), so only the jobs it
        saw are compared.
        """
        want = {j.job_id: j for j in jobs if self.match(j.job_id, (e.node_id for e in j.executions))}
        have = self._jobs
        if partial:
            want = {k: v for k, v in want.items() if k in have}
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        if missing or extra:
            self.fail("reliable", f"final state differs: missing {missing[:5]}, extra {extra[:5]}")
        for job_id, job in want.items():
            if have[job_id] != job:
                self.fail(
                    "reliable", f"job {job_id}: watch ends at v{have[job_id].version}, the store has v{job.version}"
                )
