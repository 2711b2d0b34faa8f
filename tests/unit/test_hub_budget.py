"""The watch history bounded by bytes (issue 13, items 1 and 2).

What a change holds for watchers is counted in bytes against ``history_bytes``; the oldest changes go first, and
a watcher that falls behind is told where to resume exactly as when the ring wraps. A change shares the pieces of
a large job it did not change with the job's change before it, and the count stays exact: ``bytes_held`` is what
the held changes' distinct bytes objects take, plus the fixed overhead per change and per piece.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from storeutil import ES, execution
from watchcheck import WatchChecker

from jobstate.server import errors
from jobstate.server.hub import (
    CHANGE_OVERHEAD,
    GAP,
    PART_OVERHEAD,
    UPDATED,
    Change,
    WatchHub,
    WatchSpec,
    encode_event,
)
from jobstate.server.rules import Limits
from jobstate.server.store import MemoryStore
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb

WAIT = 5.0  # seconds; only a bound for a test that would otherwise hang, never a timing assertion
KiB = 1024
MiB = 1024 * KiB


def accounted(hub: WatchHub) -> int:
    """What the held changes take, counted from the ring itself: each distinct bytes object once."""
    seen: set[int] = set()
    total = 0
    for r in range(hub.oldest_revision, hub.head_revision + 1):
        c = hub._ring[r % hub.history_size]
        assert c is not None, f"revision {r} is held but its slot is empty"
        if c is GAP:
            continue
        parts = c.parts.parts if c.parts is not None else (c.frame,)
        total += CHANGE_OVERHEAD + (PART_OVERHEAD * len(parts) if c.parts is not None else 0)
        for p in parts:
            if id(p) not in seen:
                seen.add(id(p))
                total += len(p)
    return total


def big_job(job_id: str, version: int, outputs: list[str], status: str = "") -> pb.JobState:
    job = pb.JobState(job_id=job_id, version=version, state=pb.JobStateType.JOB_STATE_TYPE_IN_PROGRESS)
    for i, out in enumerate(outputs):
        e = job.executions.add(node_id=f"n{i}", compute_reference=f"e{i}", version=version, status=status)
        e.state = ES.EXECUTION_STATE_TYPE_BID_ACCEPTED
        e.run_output.stdout = out
    return job


async def output_store(budget: int, executions: int = 4, output: int = 200 * KiB) -> MemoryStore:
    """A store whose job "big" has ``executions`` executions of ``output`` bytes of run output each."""
    store = MemoryStore(WatchHub(100_000, history_bytes=budget), Limits())
    await store.create_job("big")
    for i in range(executions):
        await store.create_execution("big", execution(f"n{i}", f"e{i}"))
        half = output // 2
        run = pb.ExecutionState(run_output=pb.RunCommandResult(stdout=chr(65 + i) * half, stderr="e" * half))
        await store.update_execution("big", f"e{i}", run)
    return store


async def next_response(stream: AsyncIterator[bytes]) -> bytes:
    return await asyncio.wait_for(anext(stream), WAIT)


async def test_held_bytes_stay_within_the_budget_and_are_counted_exactly() -> None:
    budget = 1 * MiB
    store = await output_store(budget, executions=2)
    hub = store.hub
    published = hub.head_revision
    for i in range(60):
        if i % 3:
            await store.update_execution("big", f"e{i % 2}", execution(status=f"step {i}"))
        else:  # new output: nothing of it can be shared
            run = pb.ExecutionState(run_output=pb.RunCommandResult(stdout=f"{i:04d}" * 50_000))
            await store.update_execution("big", f"e{i % 2}", run)
        if i == 30:
            hub.skip_to(hub.head_revision + 3)  # an engine's gap: three revisions that hold nothing
            store._revision = hub.head_revision
        published += 1
        assert hub.bytes_held <= budget
        assert hub.bytes_held == accounted(hub)
    assert hub.oldest_revision > 1, "the budget let go of nothing"
    assert hub.held < published


async def test_status_updates_share_the_unchanged_output_and_send_the_same_bytes() -> None:
    store = await output_store(256 * MiB, executions=4, output=480 * KiB)
    hub = store.hub
    job_bytes = (await store.get_job("big")).job.ByteSize()
    assert job_bytes > 1.8 * MiB
    first = hub.head_revision + 1
    before = hub.bytes_held
    for i in range(200):
        await store.update_execution("big", "e0", execution(status=f"s{i}"))
    # 200 full copies would be 400 MB; each update now holds its small fields only.
    assert hub.bytes_held - before < 200 * 4 * KiB
    assert hub.bytes_held == accounted(hub)
    # A watcher replaying them gets exactly what protobuf writes, event by event.
    stream = hub.watch(WatchSpec(start_revision=first))
    got: list[spb.WatchEvent] = []
    while len(got) < 200:
        data = await next_response(stream)
        response = spb.WatchResponse.FromString(data)
        assert data == response.SerializeToString(deterministic=True)
        got += response.events
    for i, e in enumerate(got):
        assert e.revision == first + i
        assert e.job.executions[0].status == f"s{i}"
        assert [len(x.run_output.stdout) for x in e.job.executions] == [240 * KiB] * 4
    await stream.aclose()  # type: ignore[attr-defined]


async def test_a_split_change_keeps_its_wire_bytes() -> None:
    hub = WatchHub(100)
    frames = []
    for version, outputs in enumerate([["a" * 40_000, "b" * 40_000], ["a" * 40_000, "c" * 40_000]], start=1):
        job = big_job("j", version, outputs, status=f"v{version}")
        c = Change(version, UPDATED, job, 5, job.SerializeToString())
        frames.append(c.frame)
        assert c.frame == encode_event(UPDATED, version, job.SerializeToString(), 5)
        hub.publish_change(c)
        assert c.parts is not None
        assert len(c.parts.parts) > 1
        assert c.frame == frames[-1]
    first, second = hub._ring[1], hub._ring[2]
    assert first is not None
    assert second is not None
    assert first.parts is not None
    assert second.parts is not None
    shared = {id(p) for p in first.parts.parts} & {id(p) for p in second.parts.parts}
    assert len(shared) == 1  # execution e0's output, unchanged
    assert hub.bytes_held == accounted(hub)


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(WatchSpec(), id="unfiltered"),
        pytest.param(WatchSpec(job_ids=frozenset({"big"})), id="job"),
        pytest.param(WatchSpec(node_id="n1"), id="node"),
    ],
)
async def test_a_watcher_behind_the_byte_budget_is_told_where_to_resume(spec: WatchSpec) -> None:
    hub = WatchHub(100_000, history_bytes=512 * KiB)
    checker = WatchChecker("budget", job_ids=spec.job_ids, node_id=spec.node_id)
    stream = hub.watch(spec)
    read = asyncio.ensure_future(anext(stream))  # type: ignore[arg-type]
    for _ in range(3):
        await asyncio.sleep(0)
    hub.publish(1, UPDATED, big_job("big", 1, ["x" * 60_000, "y" * 60_000]), 1)
    checker.observe(spb.WatchResponse.FromString(await asyncio.wait_for(read, WAIT)))
    for v in range(2, 40):  # the reader reads nothing meanwhile; each change brings new output
        hub.publish(v, UPDATED, big_job("big", v, [f"{v:03d}" * 20_000, "y" * 60_000]), v)
        assert hub.bytes_held <= 512 * KiB
    assert hub.oldest_revision > 2
    with pytest.raises(errors.WatcherLagged) as info:
        await next_response(stream)
    assert info.value.metadata == {"resume_revision": "2"}
    assert hub.watcher_count == 0
    with pytest.raises(errors.RevisionCompacted) as compacted:
        await anext(hub.watch(WatchSpec(spec.job_ids, spec.node_id, start_revision=2)))
    assert compacted.value.metadata == {"oldest_revision": str(hub.oldest_revision)}
    # From what is held, a new watcher reads every change held, in order (each one matches every spec here).
    again = hub.watch(WatchSpec(spec.job_ids, spec.node_id, start_revision=hub.oldest_revision))
    got: list[int] = []
    while len(got) < hub.held:
        got += [e.revision for e in spb.WatchResponse.FromString(await next_response(again)).events]
    assert got == list(range(hub.oldest_revision, hub.head_revision + 1))
    await again.aclose()  # type: ignore[attr-defined]


@pytest.mark.parametrize("bound", ["count", "bytes"])
async def test_a_stalled_filtered_watcher_pins_nothing_the_ring_let_go(bound: str) -> None:
    # Issue 13, item 2: a Watch(job_ids=[big]) that never reads kept up to 1,024 changes whatever their size.
    hub = WatchHub(20, max_pending=1024) if bound == "count" else WatchHub(100_000, history_bytes=1 * MiB)
    stream = hub.watch(WatchSpec(job_ids=frozenset({"big"})))
    read = asyncio.ensure_future(anext(stream))  # type: ignore[arg-type]
    for _ in range(3):
        await asyncio.sleep(0)
    hub.publish(1, UPDATED, big_job("big", 1, ["x" * 60_000]), 1)
    await asyncio.wait_for(read, WAIT)
    (watcher,) = hub._watchers
    for v in range(2, 300):
        hub.publish(v, UPDATED, big_job("big", v, [f"{v:03d}" * 20_000]), v)
    assert not watcher.overflow  # still on its queue: it never read
    assert len(watcher.pending) == 298
    in_ring = {id(c) for c in hub._ring if c is not None}
    pinned = sum(c.size for c in watcher.pending if id(c) not in in_ring)
    assert pinned == 0, f"the queue pins {pinned} bytes the history let go of"
    assert hub.bytes_held == accounted(hub)
    with pytest.raises(errors.WatcherLagged) as info:
        await next_response(stream)
    assert info.value.metadata == {"resume_revision": "2"}
    assert hub.watcher_count == 0


def test_restore_keeps_the_newest_changes_within_the_budget() -> None:
    source = WatchHub(1000)
    for v in range(1, 51):
        source.publish(v, UPDATED, big_job(f"j{v % 3}", v, [f"{v:03d}" * 10_000]), v)
    frames = [(c.revision, c.job_id, c.nodes, c.frame) for c in source._ring if c is not None]
    frames.sort()
    hub = WatchHub(1000, history_bytes=256 * KiB)
    hub.restore(50, (Change.restored(*f) for f in frames))
    assert hub.head_revision == 50
    assert hub.bytes_held <= 256 * KiB
    assert hub.bytes_held == accounted(hub)
    assert 40 < hub.oldest_revision <= 50


async def test_a_large_event_that_is_not_a_job_as_written_here_is_kept_whole() -> None:
    # etcd's follower publishes what it reads: a value another program wrote there must not break the hub.
    hub = WatchHub(100)
    frame = encode_event(UPDATED, 1, b"\x0f" * 40_000, 7)  # field 1 with wire type 7: not protobuf
    c = Change.restored(1, "odd", (), frame)
    hub.publish_change(c)
    assert c.parts is None
    assert c.frame == frame
    assert hub.bytes_held == accounted(hub) == CHANGE_OVERHEAD + len(frame)
    stream = hub.watch(WatchSpec(start_revision=1))
    assert await next_response(stream) == frame + b"\x10\x01"
    await stream.aclose()  # type: ignore[attr-defined]
