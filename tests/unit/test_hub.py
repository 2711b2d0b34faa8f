"""WatchHub on its own: the hand-written wire encoding, batching, filters, resuming, lagging, shutdown, leaks."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from storeutil import ES, JS, execution, new_store
from watchcheck import Commit, WatchChecker

from jobstate.server import errors
from jobstate.server.hub import (
    BOOKMARK,
    CREATED,
    DELETED,
    INITIAL,
    UPDATED,
    WatchHub,
    WatchSpec,
    encode_event,
    encode_response,
)
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb

WAIT = 5.0  # seconds; only a bound for a test that would otherwise hang, never a timing assertion


# --- wire encoding --------------------------------------------------------------------------------------------

jobs = st.builds(
    pb.JobState,
    job_id=st.text(alphabet="abcxyz0123456789-", min_size=1, max_size=40),
    state=st.sampled_from(sorted(JS.values())),
    version=st.integers(0, 2**62),
    executions=st.lists(
        st.builds(pb.ExecutionState, node_id=st.text(max_size=300), status=st.text(max_size=200)), max_size=3
    ),
)
events = st.tuples(
    st.sampled_from([CREATED, UPDATED, DELETED, INITIAL, BOOKMARK]),
    st.integers(0, 2**63 - 1),
    st.one_of(st.none(), jobs),
    st.integers(0, 2**63 - 1),
)


def expected_event(event_type: int, revision: int, job: pb.JobState | None, time_ns: int) -> spb.WatchEvent:
    e = spb.WatchEvent(type=event_type, revision=revision)  # type: ignore[arg-type]
    if job is not None:
        e.job.CopyFrom(job)
    if time_ns:
        e.time.FromNanoseconds(time_ns)
    return e


@given(st.lists(events, max_size=6), st.integers(0, 2**63 - 1))
def test_encoding_parses_into_exactly_the_expected_messages(
    batch: list[tuple[int, int, pb.JobState | None, int]], revision: int
) -> None:
    frames = [encode_event(t, r, None if j is None else j.SerializeToString(), ns) for t, r, j, ns in batch]
    data = encode_response(frames, revision)
    want = spb.WatchResponse(events=[expected_event(*e) for e in batch], revision=revision)
    got = spb.WatchResponse.FromString(data)
    assert got == want
    # Field order and encoding are protobuf's own, so the bytes are what protobuf would write.
    assert data == want.SerializeToString(deterministic=True)


@pytest.mark.parametrize("n", [0, 1, 127, 128, 255, 16383, 16384, 2**31, 2**63 - 1])
def test_varint_boundaries(n: int) -> None:
    got = spb.WatchResponse.FromString(encode_response([encode_event(UPDATED, n, b"", n)], n))
    assert got.revision == n
    assert got.events[0].revision == n
    assert got.events[0].time.ToNanoseconds() == n
    assert got.events[0].HasField("job")


# --- helpers --------------------------------------------------------------------------------------------------


class Publisher:
    """Publishes consecutive changes to a hub, keeping per-job versions like a store would."""

    def __init__(self, hub: WatchHub) -> None:
        self.hub = hub
        self.versions: dict[str, int] = {}
        self.commits: list[Commit] = []

    def __call__(self, job_id: str, nodes: Iterable[str] = (), event_type: int | None = None, pad: int = 0) -> int:
        version = self.versions.get(job_id, 0) + (0 if event_type == DELETED else 1)
        if event_type is None:
            event_type = CREATED if version == 1 else UPDATED
        self.versions[job_id] = version
        job = pb.JobState(job_id=job_id, version=version, state=JS.JOB_STATE_TYPE_NEW)
        for i, node in enumerate(nodes):
            job.executions.add(node_id=node, compute_reference=f"e{i}", version=1, state=ES.EXECUTION_STATE_TYPE_NEW)
        if pad:
            job.executions.add(node_id="pad", compute_reference="pad", version=1, status="p" * pad, state=9)
        revision = self.hub.head_revision + 1
        self.hub.publish(revision, event_type, job, 1_000_000 * revision)
        self.commits.append(
            Commit(revision, job_id, version, frozenset(e.node_id for e in job.executions), event_type == DELETED)
        )
        if event_type == DELETED:
            del self.versions[job_id]
        return revision


async def next_response(stream: AsyncIterator[bytes]) -> spb.WatchResponse:
    return spb.WatchResponse.FromString(await asyncio.wait_for(anext(stream), WAIT))


async def is_waiting(stream: AsyncIterator[bytes]) -> asyncio.Task[bytes]:
    """Starts reading ``stream`` and checks the read does not finish while the loop has nothing else to do."""
    task: asyncio.Task[bytes] = asyncio.ensure_future(anext(stream))  # type: ignore[arg-type]
    for _ in range(20):
        await asyncio.sleep(0)
    assert not task.done(), "a response arrived although nothing matching was published"
    return task


def revisions(r: spb.WatchResponse) -> list[int]:
    return [e.revision for e in r.events]


# --- batching -------------------------------------------------------------------------------------------------


async def test_one_response_per_change_when_keeping_up() -> None:
    hub = WatchHub(100)
    pub = Publisher(hub)
    stream = hub.watch(WatchSpec())
    task = await is_waiting(stream)
    pub("a")
    r = spb.WatchResponse.FromString(await asyncio.wait_for(task, WAIT))
    assert (revisions(r), r.revision) == ([1], 1)
    assert r.events[0].type == CREATED
    assert r.events[0].job.job_id == "a"
    await stream.aclose()  # type: ignore[attr-defined]
    assert hub.watcher_count == 0


@pytest.mark.parametrize("spec", [WatchSpec(start_revision=1), WatchSpec(job_ids=frozenset({"a"}), start_revision=1)])
async def test_waiting_changes_arrive_in_one_response(spec: WatchSpec) -> None:
    hub = WatchHub(1000)
    pub = Publisher(hub)
    for _ in range(50):
        pub("a")
    stream = hub.watch(spec)
    r = await next_response(stream)
    assert revisions(r) == list(range(1, 51))
    assert r.revision == 50
    assert [e.job.version for e in r.events] == list(range(1, 51))
    await stream.aclose()  # type: ignore[attr-defined]


@pytest.mark.parametrize("filtered", [False, True])
async def test_batches_respect_the_size_bound_and_never_split_a_change(filtered: bool) -> None:
    limit = 2000
    hub = WatchHub(1000, max_batch_bytes=limit)
    pub = Publisher(hub)
    sizes = [10, 700, 50, 3000, 5, 900, 900, 900, 10, 10, 1999, 1]
    for pad in sizes:
        pub("a", pad=pad)
    stream = hub.watch(WatchSpec(job_ids=frozenset({"a"}) if filtered else None, start_revision=1))
    seen: list[int] = []
    checker = WatchChecker("batches")
    checker.begin(1)
    while len(seen) < len(sizes):
        data = await asyncio.wait_for(anext(stream), WAIT)
        r = spb.WatchResponse.FromString(data)
        checker.observe(r)
        frames = [
            len(encode_event(e.type, e.revision, e.job.SerializeToString(), e.time.ToNanoseconds())) for e in r.events
        ]
        assert r.events, "empty batch"
        # The bound is checked before each change is added: a batch ends at the first change that reaches it.
        assert sum(frames[:-1]) < limit, f"batch of {len(frames)} went on after reaching the bound"
        for e in r.events:
            assert e.job.executions[-1].status == "p" * sizes[e.revision - 1]  # whole, never cut
        seen += revisions(r)
    assert seen == list(range(1, len(sizes) + 1))
    checker.check_complete(pub.commits)
    await stream.aclose()  # type: ignore[attr-defined]


# --- filters --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        pytest.param(WatchSpec(), ["a", "b", "c", "a", "b", "c", "d"], id="all"),
        pytest.param(WatchSpec(job_ids=frozenset({"a"})), ["a", "a"], id="one-job"),
        pytest.param(WatchSpec(job_ids=frozenset({"a", "c", "zz"})), ["a", "c", "a", "c"], id="job-set"),
        pytest.param(WatchSpec(node_id="n1"), ["b", "a", "b", "c", "d"], id="node"),
        pytest.param(WatchSpec(node_id="n2"), ["c", "c"], id="other-node"),
        pytest.param(WatchSpec(job_ids=frozenset({"a", "b"}), node_id="n1"), ["b", "a", "b"], id="jobs-and-node"),
        pytest.param(WatchSpec(job_ids=frozenset({"c"}), node_id="n9"), [], id="nothing"),
    ],
)
@pytest.mark.parametrize("from_history", [False, True])
async def test_filters(spec: WatchSpec, want: list[str], from_history: bool) -> None:
    hub = WatchHub(100)
    pub = Publisher(hub)
    changes = [
        ("a", ()),
        ("b", ("n1",)),
        ("c", ("n2", "n3")),
        ("a", ("n1",)),
        ("b", ("n1",)),
        ("c", ("n1", "n2")),
        ("d", ("n1",)),
    ]
    stream = hub.watch(WatchSpec(spec.job_ids, spec.node_id, start_revision=1))
    if not from_history:
        task = await is_waiting(stream)
        for job_id, nodes in changes:
            pub(job_id, nodes)
    else:
        for job_id, nodes in changes:
            pub(job_id, nodes)
        task = asyncio.ensure_future(anext(stream))  # type: ignore[arg-type]
    got: list[spb.WatchEvent] = []
    checker = WatchChecker("filter", job_ids=spec.job_ids, node_id=spec.node_id)
    checker.begin(1)
    end = pub("end-marker", ("n1", "n2", "n3", "n9"))
    while checker.next_revision <= len(changes) and want:
        r = spb.WatchResponse.FromString(await asyncio.wait_for(task, WAIT))
        checker.observe(r)
        got += [e for e in r.events if e.job.job_id != "end-marker"]
        task = asyncio.ensure_future(anext(stream))  # type: ignore[arg-type]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert [e.job.job_id for e in got] == want
    del end
    await stream.aclose()  # type: ignore[attr-defined]
    assert hub.watcher_count == 0


async def test_node_watcher_sees_every_later_change_of_a_job_once_it_has_an_execution_there() -> None:
    store = new_store()
    stream = store.watch(WatchSpec(node_id="n1"))
    checker = WatchChecker("node", node_id="n1")
    task = await is_waiting(stream)
    await store.create_job("j")
    await store.update_job_state("j", JS.JOB_STATE_TYPE_QUEUED)
    await store.create_execution("j", execution("n2", "other"))
    r = await store.create_execution("j", execution("n1", "mine"))
    checker.observe(spb.WatchResponse.FromString(await asyncio.wait_for(task, WAIT)))
    assert [e.revision for e in checker.live_events()] == [r.revision]
    await store.update_execution("j", "other", execution(status="x"))  # not n1's execution, but n1's job
    await store.update_job_state("j", JS.JOB_STATE_TYPE_CANCELLED)
    await store.delete_job("j")
    while checker.next_revision <= store.stats().revision:
        checker.observe(await next_response(stream))
    assert [e.type for e in checker.live_events()] == [UPDATED, UPDATED, UPDATED, DELETED]
    await stream.aclose()  # type: ignore[attr-defined]


# --- start_revision, compaction, lagging ---------------------------------------------------------------------


@pytest.mark.parametrize("start", [1, 7, 10, 11, 15])
async def test_start_revision(start: int) -> None:
    hub = WatchHub(100)
    pub = Publisher(hub)
    for i in range(10):
        pub(f"j{i % 3}")
    stream = hub.watch(WatchSpec(start_revision=start))
    checker = WatchChecker(f"start-{start}")
    checker.begin(start)
    if start <= 10:
        checker.observe(await next_response(stream))
    task = asyncio.ensure_future(anext(stream))  # type: ignore[arg-type]
    for i in range(10, 16):
        pub(f"j{i % 3}")
    checker.observe(spb.WatchResponse.FromString(await asyncio.wait_for(task, WAIT)))
    while checker.next_revision <= 16:
        checker.observe(await next_response(stream))
    assert [e.revision for e in checker.live_events()] == list(range(start, 17))
    assert checker.check_complete(pub.commits) == 17 - start
    await stream.aclose()  # type: ignore[attr-defined]


@pytest.mark.parametrize("spec", [WatchSpec(), WatchSpec(job_ids=frozenset({"a"})), WatchSpec(node_id="n")])
async def test_compacted_start_revision_names_the_oldest_held(spec: WatchSpec) -> None:
    hub = WatchHub(5)
    pub = Publisher(hub)
    for _ in range(20):
        pub("a", ("n",))
    assert (hub.oldest_revision, hub.held) == (16, 5)
    for start in (1, 15):
        with pytest.raises(errors.RevisionCompacted) as info:
            await anext(hub.watch(WatchSpec(spec.job_ids, spec.node_id, start_revision=start)))
        assert info.value.metadata == {"oldest_revision": "16"}
    stream = hub.watch(WatchSpec(spec.job_ids, spec.node_id, start_revision=16))
    assert revisions(await next_response(stream)) == [16, 17, 18, 19, 20]
    await stream.aclose()  # type: ignore[attr-defined]
    assert hub.watcher_count == 0


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(WatchSpec(), id="unfiltered"),
        pytest.param(WatchSpec(job_ids=frozenset({"a"})), id="job"),
        pytest.param(WatchSpec(node_id="n"), id="node"),
    ],
)
async def test_a_reader_that_falls_out_of_the_ring_is_told_where_to_resume(spec: WatchSpec) -> None:
    hub = WatchHub(8, max_pending=4)
    pub = Publisher(hub)
    stream = hub.watch(spec)
    task = await is_waiting(stream)
    pub("a", ("n",))
    assert revisions(spb.WatchResponse.FromString(await asyncio.wait_for(task, WAIT))) == [1]
    for _ in range(20):  # the reader reads nothing meanwhile
        pub("a", ("n",))
    with pytest.raises(errors.WatcherLagged) as info:
        await anext(stream)
    assert info.value.metadata == {"resume_revision": "2"}
    assert hub.watcher_count == 0
    assert hub.stats.lagged == 1
    # Resuming there is refused as compacted, naming what is held: the reader relists.
    with pytest.raises(errors.RevisionCompacted) as compacted:
        await anext(hub.watch(WatchSpec(spec.job_ids, spec.node_id, start_revision=2)))
    assert compacted.value.metadata == {"oldest_revision": str(hub.oldest_revision)}


async def test_pending_overflow_falls_back_to_the_ring_and_returns() -> None:
    hub = WatchHub(1000, max_pending=3)
    pub = Publisher(hub)
    spec = WatchSpec(job_ids=frozenset({"a"}))
    stream = hub.watch(spec)
    checker = WatchChecker("overflow", job_ids=spec.job_ids)
    task = await is_waiting(stream)
    pub("a")
    checker.observe(spb.WatchResponse.FromString(await asyncio.wait_for(task, WAIT)))
    (watcher,) = hub._watchers
    assert not watcher.overflow  # caught up: on its pending queue
    for i in range(30):
        pub("a" if i % 2 else "b")
    assert watcher.overflow
    assert not watcher.pending
    while checker.next_revision <= hub.head_revision:
        checker.observe(await next_response(stream))
    assert not watcher.overflow
    task = await is_waiting(stream)
    pub("a")
    assert len(watcher.pending) == 1  # back on its queue
    checker.observe(spb.WatchResponse.FromString(await asyncio.wait_for(task, WAIT)))
    assert checker.check_complete(pub.commits) == 17
    await stream.aclose()  # type: ignore[attr-defined]
    assert hub.watcher_count == 0


async def test_a_slow_reader_does_not_hold_back_others() -> None:
    hub = WatchHub(10, max_pending=2)
    pub = Publisher(hub)
    slow = hub.watch(WatchSpec())
    slow_task = await is_waiting(slow)
    fast = hub.watch(WatchSpec(job_ids=frozenset({"a"})))
    fast_checker = WatchChecker("fast", job_ids=frozenset({"a"}))
    pending = await is_waiting(fast)
    pub("a")
    await asyncio.wait_for(slow_task, WAIT)  # then the slow reader stops reading
    for _ in range(30):
        pub("a")
        fast_checker.observe(spb.WatchResponse.FromString(await asyncio.wait_for(pending, WAIT)))
        pending = asyncio.ensure_future(anext(fast))  # type: ignore[arg-type]
    pending.cancel()
    assert [e.revision for e in fast_checker.live_events()][-1] == 31
    with pytest.raises(errors.WatcherLagged):
        await anext(slow)
    await fast.aclose()  # type: ignore[attr-defined]
    assert hub.watcher_count == 0


# --- initial state, bookmarks ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(WatchSpec(send_initial_state=True), id="all"),
        pytest.param(WatchSpec(job_ids=frozenset({"j1", "j3", "gone"}), send_initial_state=True), id="jobs"),
        pytest.param(WatchSpec(node_id="n1", send_initial_state=True), id="node"),
    ],
)
async def test_initial_state_then_live_with_no_gap_and_no_repeat(spec: WatchSpec) -> None:
    store = new_store()
    commits: list[Commit] = []
    for i in range(5):
        commits.append(Commit.of(await store.create_job(f"j{i}")))
    commits.append(Commit.of(await store.create_execution("j1", execution("n1"))))
    commits.append(Commit.of(await store.create_execution("j3", execution("n1"))))
    commits.append(Commit.of(await store.update_job_state("j2", JS.JOB_STATE_TYPE_QUEUED)))
    commits.append(Commit.of(await store.create_job("gone")))
    commits.append(Commit.of(await store.delete_job("gone"), deleted=True))
    stream = store.watch(spec)
    checker = WatchChecker("initial", job_ids=spec.job_ids, node_id=spec.node_id)
    checker.begin(initial_state=True)
    first = await next_response(stream)
    checker.observe(first)
    snapshot = store.stats().revision
    assert first.events[-1].type == BOOKMARK
    assert first.events[-1].revision == first.revision == snapshot
    initial = [e for e in first.events if e.type == INITIAL]
    assert all(e.revision <= snapshot for e in initial)
    jobs = [(await store.get_job(e.job.job_id)).job for e in initial]
    assert [e.job for e in initial] == jobs
    # Changes made after the snapshot, some while the reader is not reading.
    task = asyncio.ensure_future(anext(stream))  # type: ignore[arg-type]
    commits.append(Commit.of(await store.update_job_state("j1", JS.JOB_STATE_TYPE_IN_PROGRESS)))
    checker.observe(spb.WatchResponse.FromString(await asyncio.wait_for(task, WAIT)))
    commits.append(Commit.of(await store.update_job_state("j3", JS.JOB_STATE_TYPE_COMPLETED)))
    commits.append(Commit.of(await store.create_execution("j0", execution("n1"))))
    commits.append(Commit.of(await store.delete_job("j4"), deleted=True))
    commits.append(Commit.of(await store.create_job("gone")))
    while checker.next_revision <= store.stats().revision:
        checker.observe(await next_response(stream))
    checker.check_complete(commits)
    checker.check_snapshot((await store.list_jobs()).jobs)
    await stream.aclose()  # type: ignore[attr-defined]
    assert store.stats().watchers == 0


async def test_initial_state_of_many_jobs_comes_in_bounded_chunks() -> None:
    store = new_store()
    store.hub._max_batch_bytes = 500
    for i in range(40):
        await store.create_job(f"job-{i:03d}")
    stream = store.watch(WatchSpec(send_initial_state=True))
    checker = WatchChecker("chunks")
    checker.begin(initial_state=True)
    responses: list[spb.WatchResponse] = []
    while not responses or responses[-1].events[-1].type != BOOKMARK:
        responses.append(await next_response(stream))
        checker.observe(responses[-1])
    assert len(responses) > 1
    assert all(r.revision == 0 for r in responses[:-1])  # no promise before the snapshot is complete
    assert len([e for e in checker.events if e.type == INITIAL]) == 40
    await stream.aclose()  # type: ignore[attr-defined]


async def test_progress_bookmarks_while_idle() -> None:
    hub = WatchHub(100)
    pub = Publisher(hub)
    for _ in range(3):
        pub("a")
    stream = hub.watch(WatchSpec(job_ids=frozenset({"b"}), progress_interval=0.01))
    bookmark = await next_response(stream)
    assert [(e.type, e.revision) for e in bookmark.events] == [(BOOKMARK, 3)]
    assert bookmark.revision == 3
    pub("b")
    pub("a")
    got = await next_response(stream)
    assert revisions(got) == [4]
    after = await next_response(stream)
    assert after.events[0].type == BOOKMARK
    assert after.revision >= 4  # never behind what was delivered
    await stream.aclose()  # type: ignore[attr-defined]


# --- shutdown, limits, leaks ----------------------------------------------------------------------------------


async def test_close_ends_streams_with_shutting_down() -> None:
    hub = WatchHub(100)
    streams = [
        hub.watch(WatchSpec()),
        hub.watch(WatchSpec(job_ids=frozenset({"a"}))),
        hub.watch(WatchSpec(node_id="n")),
    ]
    tasks = [await is_waiting(s) for s in streams]
    assert hub.watcher_count == 3
    hub.close()
    for task in tasks:
        with pytest.raises(errors.ShuttingDown):
            await asyncio.wait_for(task, WAIT)
    assert hub.watcher_count == 0
    with pytest.raises(errors.ShuttingDown):
        await anext(hub.watch(WatchSpec()))


async def test_max_watchers() -> None:
    hub = WatchHub(100, max_watchers=2)
    a, b = hub.watch(WatchSpec()), hub.watch(WatchSpec(node_id="x"))
    tasks = [await is_waiting(a), await is_waiting(b)]
    with pytest.raises(errors.ResourceLimit):
        await anext(hub.watch(WatchSpec()))
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert hub.watcher_count == 0
    c = hub.watch(WatchSpec())
    task = await is_waiting(c)
    task.cancel()


@pytest.mark.parametrize(
    "spec",
    [WatchSpec(), WatchSpec(job_ids=frozenset({"a", "b"})), WatchSpec(node_id="n"), WatchSpec(send_initial_state=True)],
)
async def test_watchers_are_unregistered_however_the_consumer_stops(spec: WatchSpec) -> None:
    store = new_store()
    await store.create_job("a")
    hub = store.hub
    # Closed after reading, cancelled while waiting, and abandoned after an error.
    s1 = store.watch(spec)
    t1 = await is_waiting(s1) if not spec.send_initial_state else None
    if t1 is None:
        await next_response(s1)
    s2 = store.watch(spec)
    t2 = asyncio.ensure_future(anext(s2))  # type: ignore[arg-type]
    for _ in range(5):
        await asyncio.sleep(0)
    assert hub.watcher_count == 2
    if t1 is not None:
        t1.cancel()
        await asyncio.gather(t1, return_exceptions=True)
    await s1.aclose()  # type: ignore[attr-defined]
    t2.cancel()
    await asyncio.gather(t2, return_exceptions=True)
    await s2.aclose()  # type: ignore[attr-defined]
    assert hub.watcher_count == 0
    assert hub._by_job == {}
    assert hub._by_node == {}
    assert hub._unfiltered == 0


def test_publish_refuses_a_gap() -> None:
    hub = WatchHub(10)
    hub.publish(1, CREATED, pb.JobState(job_id="a", version=1), 1)
    with pytest.raises(ValueError, match="consecutive"):
        hub.publish(3, UPDATED, pb.JobState(job_id="a", version=2), 2)
    assert hub.head_revision == 1


# --- engines whose revisions have gaps, or whose source of changes fails -------------------------------------


@pytest.mark.parametrize(
    "spec", [WatchSpec(start_revision=1), WatchSpec(job_ids=frozenset({"a"}), start_revision=1), WatchSpec(node_id="n")]
)
async def test_gaps_are_skipped_and_match_no_watcher(spec: WatchSpec) -> None:
    hub = WatchHub(100)
    pub = Publisher(hub)
    stream = hub.watch(spec)
    task = await is_waiting(stream)
    hub.skip_to(4)  # revisions 1-4 belong to someone else
    for _ in range(20):
        await asyncio.sleep(0)
    assert not task.done(), "a gap was delivered as a response"
    assert pub("a", ["n"]) == 5
    hub.skip_to(9)
    assert pub("a", ["n"]) == 10
    r = spb.WatchResponse.FromString(await asyncio.wait_for(task, WAIT))
    got = revisions(r)
    while got[-1] < 10:
        got += revisions(await next_response(stream))
    assert got == [5, 10]
    # Resuming inside a gap, or at it, starts with the next change.
    for start in (6, 10):
        again = hub.watch(WatchSpec(start_revision=start))
        assert revisions(await next_response(again)) == [10]
        await again.aclose()  # type: ignore[attr-defined]
    await stream.aclose()  # type: ignore[attr-defined]


async def test_a_gap_longer_than_the_ring_does_not_lag_a_watcher_that_read_everything() -> None:
    hub = WatchHub(10)
    pub = Publisher(hub)
    pub("a")
    caught_up, behind = hub.watch(WatchSpec(start_revision=1)), hub.watch(WatchSpec(start_revision=1))
    for stream in (caught_up, behind):
        assert revisions(await next_response(stream)) == [1]
    pub("a")
    assert revisions(await next_response(caught_up)) == [2]
    task = await is_waiting(caught_up)
    hub.skip_to(1000)
    assert (hub.oldest_revision, hub.head_revision) == (991, 1000)
    assert pub("a") == 1001
    r = spb.WatchResponse.FromString(await asyncio.wait_for(task, WAIT))
    assert revisions(r) == [1001]
    # One that had not read revision 2 yet has lost it: it is told where to resume.
    with pytest.raises(errors.WatcherLagged) as lagged:
        await next_response(behind)
    assert lagged.value.metadata["resume_revision"] == "2"
    await caught_up.aclose()  # type: ignore[attr-defined]


async def test_fail_all_ends_the_open_streams_only() -> None:
    hub = WatchHub(100)
    pub = Publisher(hub)
    streams = [
        hub.watch(WatchSpec()),
        hub.watch(WatchSpec(job_ids=frozenset({"a"}))),
        hub.watch(WatchSpec(node_id="n")),
    ]
    tasks = [await is_waiting(s) for s in streams]
    hub.fail_all(lambda: errors.StoreUnavailable("lost the source"))
    for task in tasks:
        with pytest.raises(errors.StoreUnavailable, match="lost the source"):
            await asyncio.wait_for(task, WAIT)
    assert hub.watcher_count == 0
    later = hub.watch(WatchSpec())  # the hub itself goes on
    task = await is_waiting(later)
    pub("a")
    assert revisions(spb.WatchResponse.FromString(await asyncio.wait_for(task, WAIT))) == [1]
    await later.aclose()  # type: ignore[attr-defined]


async def test_restart_at_forgets_what_is_held_and_ends_every_stream() -> None:
    hub = WatchHub(100)
    pub = Publisher(hub)
    for _ in range(3):
        pub("a")
    stream = hub.watch(WatchSpec(start_revision=1))
    assert revisions(await next_response(stream)) == [1, 2, 3]
    task = await is_waiting(stream)
    hub.restart_at(50, lambda: errors.StoreUnavailable("missed changes"))
    with pytest.raises(errors.StoreUnavailable):
        await asyncio.wait_for(task, WAIT)
    assert (hub.oldest_revision, hub.head_revision) == (51, 50)
    with pytest.raises(errors.RevisionCompacted):
        await anext(hub.watch(WatchSpec(start_revision=3)))
    assert pub("a") == 51
    fresh = hub.watch(WatchSpec(start_revision=51))
    assert revisions(await next_response(fresh)) == [51]
    await fresh.aclose()  # type: ignore[attr-defined]


async def test_a_stream_lets_go_of_its_initial_snapshot() -> None:
    store = new_store()
    await store.create_job("a")
    stream = store.watch(WatchSpec(send_initial_state=True))
    r = await next_response(stream)
    assert [e.type for e in r.events] == [INITIAL, BOOKMARK]
    task = await is_waiting(stream)  # live now, past the snapshot
    old = store._jobs["a"].data
    await store.update_job_state("a", JS.JOB_STATE_TYPE_QUEUED)
    assert store._jobs["a"].data is not old
    await asyncio.wait_for(task, WAIT)
    # Only this test's name holds the job's old bytes (and getrefcount's argument): not the stream.
    assert sys.getrefcount(old) == 2
    await stream.aclose()  # type: ignore[attr-defined]
