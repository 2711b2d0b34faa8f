"""core.py's I/O-free logic: request builders, the watch cursor, the informer cache, backoff."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import grpc
import pytest

from jobstate.client import core
from jobstate.client.core import Backoff, JobCache, WatchCursor
from jobstate.client.errors import (
    Cancelled,
    FailedPrecondition,
    Internal,
    JobStateError,
    OutOfRange,
    Reason,
    ResourceExhausted,
    Unavailable,
)
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb

JS = pb.JobStateType
ES = pb.ExecutionStateType
ET = spb.WatchEventType

# --- state names -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("COMPLETED", JS.JOB_STATE_TYPE_COMPLETED),
        ("in_progress", JS.JOB_STATE_TYPE_IN_PROGRESS),
        ("in-progress", JS.JOB_STATE_TYPE_IN_PROGRESS),
        (" queued ", JS.JOB_STATE_TYPE_QUEUED),
        ("JOB_STATE_TYPE_ERROR", JS.JOB_STATE_TYPE_ERROR),
        (3, JS.JOB_STATE_TYPE_CANCELLED),
        (99, 99),  # numbers pass through: the server judges unknown ones
    ],
)
def test_job_state_names(value: int | str, want: int) -> None:
    assert core.job_state(value) == want


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("BID_ACCEPTED", ES.EXECUTION_STATE_TYPE_BID_ACCEPTED),
        ("ask_for_bid", ES.EXECUTION_STATE_TYPE_ASK_FOR_BID),
        ("EXECUTION_STATE_TYPE_FAILED", ES.EXECUTION_STATE_TYPE_FAILED),
        (7, ES.EXECUTION_STATE_TYPE_COMPLETED),
    ],
)
def test_execution_state_names(value: int | str, want: int) -> None:
    assert core.execution_state(value) == want


@pytest.mark.parametrize("bad", ["FINISHED", "", "BID_ACCEPTED"])
def test_unknown_job_state_name(bad: str) -> None:
    with pytest.raises(ValueError, match="unknown job state"):
        core.job_state(bad)


def test_unknown_execution_state_name() -> None:
    with pytest.raises(ValueError, match="unknown execution state"):
        core.execution_state("IN_PROGRESS")


def test_short_names() -> None:
    assert core.short_job_state(JS.JOB_STATE_TYPE_IN_PROGRESS) == "IN_PROGRESS"
    assert core.short_execution_state(ES.EXECUTION_STATE_TYPE_BID_REJECTED) == "BID_REJECTED"
    assert core.short_job_state(42) == "42"
    assert core.short_execution_state(42) == "42"


# --- request builders --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("timeout", "nanos"),
    [
        (1.5, 1_500_000_000),
        (2, 2_000_000_000),
        (dt.timedelta(minutes=1, milliseconds=250), 60_250_000_000),
        (0.000_000_001, 1),
    ],
)
def test_create_job_request_timeout(timeout: core.Seconds, nanos: int) -> None:
    req = core.create_job_request("j1", timeout, "hello")
    assert (req.job_id, req.comment) == ("j1", "hello")
    assert req.HasField("timeout")
    assert req.timeout.ToNanoseconds() == nanos


def test_create_job_request_without_timeout_leaves_it_unset() -> None:
    req = core.create_job_request()
    assert req.job_id == ""
    assert not req.HasField("timeout")


def test_list_jobs_request() -> None:
    req = core.list_jobs_request(["new", JS.JOB_STATE_TYPE_QUEUED, "JOB_STATE_TYPE_ERROR"], "n1", 10, "tok")
    assert list(req.states) == [JS.JOB_STATE_TYPE_NEW, JS.JOB_STATE_TYPE_QUEUED, JS.JOB_STATE_TYPE_ERROR]
    assert (req.node_id, req.page_size, req.page_token) == ("n1", 10, "tok")


def test_update_job_state_request_conditions() -> None:
    req = core.update_job_state_request(
        "j1", "completed", expected_version=3, expected_state="in_progress", unexpected_states=["error", 3], comment="c"
    )
    assert req.new_state == JS.JOB_STATE_TYPE_COMPLETED
    assert req.condition.expected_version == 3
    assert req.condition.expected_state == JS.JOB_STATE_TYPE_IN_PROGRESS
    assert list(req.condition.unexpected_states) == [JS.JOB_STATE_TYPE_ERROR, JS.JOB_STATE_TYPE_CANCELLED]
    assert req.comment == "c"


def test_update_job_state_request_without_condition_checks_nothing() -> None:
    cond = core.update_job_state_request("j1", 2).condition
    assert (cond.expected_version, cond.expected_state, list(cond.unexpected_states)) == (0, 0, [])


def test_create_execution_request() -> None:
    req = core.create_execution_request(
        "j1", "n1", compute_reference="e1", state="ask_for_bid", desired_state=2, status="s", comment="c"
    )
    e = req.execution
    assert (req.job_id, req.comment) == ("j1", "c")
    assert (e.node_id, e.compute_reference, e.status) == ("n1", "e1", "s")
    assert e.state == ES.EXECUTION_STATE_TYPE_ASK_FOR_BID
    assert e.desired_state == pb.ExecutionDesiredState.EXECUTION_DESIRED_STATE_RUNNING
    # state unset: the server's default (NEW) applies
    assert core.create_execution_request("j1", "n1").execution.state == 0


def test_update_execution_request_state_shortcut_masks_state() -> None:
    req = core.update_execution_request("j1", "e1", state="bid_accepted")
    assert req.execution.state == ES.EXECUTION_STATE_TYPE_BID_ACCEPTED
    assert list(req.update_mask.paths) == ["state"]


def test_update_execution_request_both_shortcuts() -> None:
    req = core.update_execution_request("j1", "e1", state="completed", status="done")
    assert list(req.update_mask.paths) == ["state", "status"]
    assert req.execution.status == "done"


def test_update_execution_request_empty_status_clears_it() -> None:
    # status="" is a value (clear the text), not "leave alone": it must be in the mask
    req = core.update_execution_request("j1", "e1", status="")
    assert list(req.update_mask.paths) == ["status"]
    assert req.execution.status == ""


def test_update_execution_request_message_without_mask_lets_server_choose() -> None:
    e = pb.ExecutionState(status="s", run_output=pb.RunCommandResult(exit_code=1))
    req = core.update_execution_request("j1", "e1", e)
    assert list(req.update_mask.paths) == []
    assert req.execution == e
    mixed = core.update_execution_request("j1", "e1", e, state="failed")
    assert list(mixed.update_mask.paths) == []  # every field set, the shortcut's too
    assert mixed.execution.state == ES.EXECUTION_STATE_TYPE_FAILED
    assert mixed.execution.status == "s"
    assert e.state == 0  # the caller's message is not modified


def test_update_execution_request_explicit_mask_is_kept() -> None:
    req = core.update_execution_request(
        "j1", "e1", pb.ExecutionState(), state="completed", update_mask=["state", "run_output.stdout"]
    )
    assert list(req.update_mask.paths) == ["state", "run_output.stdout"]
    assert req.execution.state == ES.EXECUTION_STATE_TYPE_COMPLETED


def test_update_execution_request_conditions() -> None:
    req = core.update_execution_request(
        "j1",
        "e1",
        state="completed",
        expected_version=4,
        expected_states=["bid_accepted", 3],
        unexpected_states=["failed"],
        comment="c",
    )
    assert req.condition.expected_version == 4
    assert list(req.condition.expected_states) == [
        ES.EXECUTION_STATE_TYPE_BID_ACCEPTED,
        ES.EXECUTION_STATE_TYPE_ASK_FOR_BID_ACCEPTED,
    ]
    assert list(req.condition.unexpected_states) == [ES.EXECUTION_STATE_TYPE_FAILED]
    assert (req.job_id, req.compute_reference, req.comment) == ("j1", "e1", "c")


def test_watch_request() -> None:
    req = core.watch_request(["a", "b"], "n1", 7, False, dt.timedelta(milliseconds=500))
    assert list(req.job_ids) == ["a", "b"]
    assert (req.node_id, req.start_revision, req.send_initial_state) == ("n1", 7, False)
    assert req.progress_interval.ToNanoseconds() == 500_000_000
    assert not core.watch_request().HasField("progress_interval")


# --- the watch cursor --------------------------------------------------------------------------------------


def event(kind: int, revision: int, job_id: str = "j", version: int = 1) -> spb.WatchEvent:
    if kind == ET.WATCH_EVENT_TYPE_BOOKMARK:
        return spb.WatchEvent(type=kind, revision=revision)  # type: ignore[arg-type]
    return spb.WatchEvent(type=kind, revision=revision, job=pb.JobState(job_id=job_id, version=version))  # type: ignore[arg-type]


def response(*events: spb.WatchEvent, revision: int | None = None) -> spb.WatchResponse:
    top = max((e.revision for e in events), default=0)
    return spb.WatchResponse(events=events, revision=top if revision is None else revision)


def test_cursor_resumes_after_last_revision() -> None:
    cursor = WatchCursor(core.watch_request(["j"], "n", start_revision=5))
    assert cursor.next_request().start_revision == 5
    cursor.observe(response(event(ET.WATCH_EVENT_TYPE_CREATED, 5), event(ET.WATCH_EVENT_TYPE_UPDATED, 8)))
    req = cursor.next_request()
    assert req.start_revision == 9
    assert (list(req.job_ids), req.node_id) == (["j"], "n")  # the filter is kept
    assert cursor.position == 8


def test_cursor_follows_response_revision_and_bookmarks() -> None:
    cursor = WatchCursor(core.watch_request(start_revision=3))
    cursor.observe(response(event(ET.WATCH_EVENT_TYPE_UPDATED, 4), revision=10))  # filtered: covered up to 10
    assert cursor.next_request().start_revision == 11
    cursor.observe(response(event(ET.WATCH_EVENT_TYPE_BOOKMARK, 20)))
    assert cursor.next_request().start_revision == 21
    cursor.observe(response(event(ET.WATCH_EVENT_TYPE_BOOKMARK, 15)))  # never goes back
    assert cursor.position == 20


def test_cursor_live_watch_keeps_start_zero_until_positioned() -> None:
    # Without a start revision and before any response, the position is unknown: asking for revision 1 would
    # replay the whole history.
    cursor = WatchCursor(core.watch_request())
    assert cursor.next_request().start_revision == 0
    cursor.observe(response(event(ET.WATCH_EVENT_TYPE_CREATED, 12)))
    assert cursor.next_request().start_revision == 13


def test_cursor_restarts_snapshot_until_its_bookmark() -> None:
    cursor = WatchCursor(core.watch_request(send_initial_state=True))
    cursor.observe(
        response(event(ET.WATCH_EVENT_TYPE_INITIAL, 3, "a"), event(ET.WATCH_EVENT_TYPE_INITIAL, 5, "b"), revision=0)
    )
    req = cursor.next_request()
    assert req.send_initial_state
    assert req.start_revision == 0
    assert not cursor.synced
    cursor.observe(response(event(ET.WATCH_EVENT_TYPE_INITIAL, 2, "c"), event(ET.WATCH_EVENT_TYPE_BOOKMARK, 9)))
    req = cursor.next_request()
    assert cursor.synced
    assert not req.send_initial_state
    assert req.start_revision == 10


def test_cursor_snapshot_of_empty_store_resumes_from_one() -> None:
    cursor = WatchCursor(core.watch_request(send_initial_state=True))
    cursor.observe(response(event(ET.WATCH_EVENT_TYPE_BOOKMARK, 0), revision=0))
    req = cursor.next_request()
    assert not req.send_initial_state
    assert req.start_revision == 1


def test_cursor_does_not_modify_its_request() -> None:
    original = core.watch_request(send_initial_state=True)
    cursor = WatchCursor(original)
    cursor.observe(response(event(ET.WATCH_EVENT_TYPE_BOOKMARK, 4)))
    assert cursor.next_request().start_revision == 5
    assert original.send_initial_state
    assert original.start_revision == 0


@pytest.mark.parametrize(
    ("error", "resumable"),
    [
        (Unavailable("connection reset"), True),
        (Unavailable("shutting down", Reason.SHUTTING_DOWN), True),
        (ResourceExhausted("lagged", Reason.WATCHER_LAGGED, {"resume_revision": "5"}), True),
        (ResourceExhausted("too many watchers", Reason.LIMIT_EXCEEDED), False),
        (OutOfRange("compacted", Reason.REVISION_COMPACTED, {"oldest_revision": "9"}), False),
        (Internal("Received RST_STREAM with error code 2"), True),
        (Cancelled("cancelled by the server while it stopped"), True),
        (Internal("boom"), False),
        (FailedPrecondition("no", Reason.STATE_MISMATCH), False),
    ],
)
def test_cursor_can_resume(error: JobStateError, resumable: bool) -> None:
    assert WatchCursor(core.watch_request()).can_resume(error) is resumable


def test_first_watch_request_pins_live_watch() -> None:
    pinned = core.first_watch_request(core.watch_request(["a"]), head_revision=41)
    assert pinned.start_revision == 42
    assert list(pinned.job_ids) == ["a"]
    explicit = core.watch_request(start_revision=7)
    assert core.first_watch_request(explicit, 41) is explicit
    snapshot = core.watch_request(send_initial_state=True)
    assert core.first_watch_request(snapshot, 41).start_revision == 0


# --- the informer cache ------------------------------------------------------------------------------------


def job(job_id: str, version: int, state: int = JS.JOB_STATE_TYPE_NEW) -> pb.JobState:
    return pb.JobState(job_id=job_id, version=version, state=state)  # type: ignore[arg-type]


def ev(kind: int, revision: int, j: pb.JobState) -> spb.WatchEvent:
    return spb.WatchEvent(type=kind, revision=revision, job=j)  # type: ignore[arg-type]


def test_cache_ignores_events_older_than_its_list() -> None:
    cache = JobCache()
    cache.load([job("a", 3), job("b", 1)], revision=10)
    assert not cache.apply(ev(ET.WATCH_EVENT_TYPE_UPDATED, 9, job("a", 2)))  # the list already had it
    assert not cache.apply(ev(ET.WATCH_EVENT_TYPE_UPDATED, 10, job("a", 3)))
    assert cache.jobs["a"].version == 3
    assert cache.apply(ev(ET.WATCH_EVENT_TYPE_UPDATED, 11, job("a", 4)))
    assert cache.jobs["a"].version == 4
    assert cache.revision == 11


def test_cache_pages_at_different_revisions() -> None:
    cache = JobCache()
    cache.load([job("a", 1)], revision=5)
    cache.load([job("b", 2)], revision=8)  # page 2, read later
    # replaying from page 1's revision: b's creation and update are older than what page 2 had
    assert not cache.apply(ev(ET.WATCH_EVENT_TYPE_CREATED, 6, job("b", 1)))
    assert not cache.apply(ev(ET.WATCH_EVENT_TYPE_UPDATED, 7, job("b", 2)))
    assert cache.apply(ev(ET.WATCH_EVENT_TYPE_UPDATED, 6, job("a", 2)))
    assert {k: v.version for k, v in cache.jobs.items()} == {"a": 2, "b": 2}


def test_cache_load_keeps_newer_copy() -> None:
    cache = JobCache()
    cache.load([job("a", 4)], revision=9)
    cache.load([job("a", 3)], revision=7)
    assert cache.jobs["a"].version == 4


def test_cache_delete_then_recreate() -> None:
    cache = JobCache()
    cache.load([job("a", 2)], revision=4)
    assert cache.apply(ev(ET.WATCH_EVENT_TYPE_DELETED, 5, job("a", 2)))
    assert "a" not in cache.jobs
    assert not cache.apply(ev(ET.WATCH_EVENT_TYPE_UPDATED, 5, job("a", 3)))  # stale, after the delete
    assert not cache.apply(ev(ET.WATCH_EVENT_TYPE_DELETED, 5, job("a", 2)))  # repeated
    assert "a" not in cache.jobs
    assert cache.apply(ev(ET.WATCH_EVENT_TYPE_CREATED, 6, job("a", 1)))
    assert cache.jobs["a"].version == 1
    # deleting a job the cache never had changes nothing
    assert not cache.apply(ev(ET.WATCH_EVENT_TYPE_DELETED, 7, job("zz", 1)))


def test_cache_bookmark_moves_revision_only() -> None:
    cache = JobCache()
    cache.load([job("a", 1)], revision=3)
    assert not cache.apply(spb.WatchEvent(type=ET.WATCH_EVENT_TYPE_BOOKMARK, revision=12))
    assert cache.revision == 12
    assert list(cache.jobs) == ["a"]
    cache.clear()
    assert (cache.jobs, cache.seen_at, cache.revision) == ({}, {}, 0)


# --- backoff -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attempt", [0, 1, 2, 3, 5, 8, 30, 200, 1100, 100_000])
def test_backoff_within_half_cap_and_cap(attempt: int) -> None:
    b = Backoff(initial=0.1, maximum=2.0, multiplier=2.0)
    cap = 2.0 if attempt > 64 else min(2.0, 0.1 * 2.0 ** max(0, attempt - 1))
    for _ in range(200):
        d = b.delay(attempt)
        assert cap / 2 <= d <= cap


def test_backoff_grows_then_stops_at_maximum() -> None:
    b = Backoff(initial=1.0, maximum=8.0)
    assert max(b.delay(1) for _ in range(100)) <= 1.0
    assert min(b.delay(3) for _ in range(100)) >= 2.0
    assert all(4.0 <= b.delay(n) <= 8.0 for n in (4, 10, 1000) for _ in range(50))


def test_backoff_is_jittered() -> None:
    assert len({Backoff().delay(5) for _ in range(20)}) > 1


def test_only_unavailable_and_server_cancelled_reads_are_retried() -> None:
    assert core.should_retry_read(Unavailable("down"))
    assert core.should_retry_read(Cancelled("the server stopped"))
    for code in grpc.StatusCode:
        if code not in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            assert not core.should_retry_read(JobStateError.for_code(code)("x"))


@dataclass
class Policy:
    closed: bool = False
    backoff: Backoff = field(default_factory=lambda: Backoff(initial=1.0, maximum=1.0))
    read_attempts: int = 3
    rate_limited_retries: int = 2


def rate_limited(delay: float | None) -> ResourceExhausted:
    return ResourceExhausted("slow down", Reason.RATE_LIMITED, retry_delay=delay)


@pytest.mark.parametrize(
    ("policy", "error", "attempt", "read", "want"),
    [
        (Policy(), Unavailable("down"), 1, True, (0.5, 1.0)),
        (Policy(), Unavailable("down"), 3, True, None),  # read_attempts spent
        (Policy(), Unavailable("down"), 1, False, None),  # a write's outcome is unknown: never again
        (Policy(), Cancelled("stopping"), 2, True, (0.5, 1.0)),
        (Policy(), rate_limited(0.25), 1, False, (0.25, 0.25)),  # the server's hint, exactly
        (Policy(), rate_limited(0.25), 2, True, (0.25, 0.25)),
        (Policy(), rate_limited(0.25), 3, False, None),  # rate_limited_retries spent
        (Policy(), rate_limited(None), 1, False, (0.5, 1.0)),  # no hint: the backoff
        (Policy(), rate_limited(3600), 1, False, (core.MAX_RETRY_HINT, core.MAX_RETRY_HINT)),
        (Policy(rate_limited_retries=0), rate_limited(0.25), 1, False, None),
        (Policy(closed=True), Unavailable("down"), 1, True, None),
        (Policy(closed=True), rate_limited(0.25), 1, False, None),
        (Policy(), ResourceExhausted("too many", Reason.LIMIT_EXCEEDED), 1, False, None),
    ],
)
def test_retry_delay(
    policy: Policy, error: JobStateError, attempt: int, read: bool, want: tuple[float, float] | None
) -> None:
    got = core.retry_delay(policy, error, attempt, read=read)
    if want is None:
        assert got is None
    else:
        assert got is not None
        assert want[0] <= got <= want[1]
