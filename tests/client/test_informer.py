"""Informer and AsyncInformer: list, then watch from the list's revision, keeping a local dict of jobs current.

Each test runs with both (``kind``). The cache is compared with a fresh list at the end; ``on_change`` must be
called once per applied change, in revision order. Relisting after REVISION_COMPACTED is forced for real: the
informer's connection goes through a proxy that is cut and refuses connections while more changes are written
than the server (history_size 5) holds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from jobstate.client import AsyncClient, AsyncInformer, Client, Informer
from jobstate.client import core as client_core
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb

from .apis import FAST, Api, opened
from .proxy import TcpProxy

ET = spb.WatchEventType
FAST_RECONNECT = [
    *client_core.CHANNEL_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 100),
]


class Handle:
    """One informer of either kind, driven from the test's loop."""

    def __init__(self, kind: str, target: str, node_id: str = "") -> None:
        self.kind = kind
        self.changes: list[spb.WatchEvent] = []
        on_change = self.changes.append
        self.inf: Any
        if kind == "sync":
            self.client: Any = Client(target, channel=grpc.insecure_channel(target, FAST_RECONNECT), backoff=FAST)
            self.inf = Informer(self.client, node_id=node_id, on_change=on_change)
        else:
            channel = grpc.aio.insecure_channel(target, options=FAST_RECONNECT)
            self.client = AsyncClient(target, channel=channel, backoff=FAST)
            self.inf = AsyncInformer(self.client, node_id=node_id, on_change=on_change)

    async def start(self) -> None:
        if self.kind == "sync":
            self.inf.start()
            assert await asyncio.to_thread(self.inf.wait_synced, 10)
        else:
            await self.inf.__aenter__()
            async with asyncio.timeout(10):
                await self.inf.synced.wait()

    async def stop(self) -> None:
        if self.kind == "sync":
            await asyncio.to_thread(self.inf.stop)
            assert not self.inf._thread.is_alive(), "the informer thread did not stop"
            assert self.inf.error is None, self.inf.error
            self.client.close()
        else:
            task = self.inf._task
            await self.inf.__aexit__(None, None, None)
            assert task is not None
            assert task.done()
            await self.client.close()

    def jobs(self) -> dict[str, pb.JobState]:
        return {j.job_id: j for j in self.inf.jobs()}

    def get(self, job_id: str) -> pb.JobState | None:
        return self.inf.get(job_id)  # type: ignore[no-any-return]

    @property
    def revision(self) -> int:
        return self.inf.cache.revision  # type: ignore[no-any-return]

    @property
    def relists(self) -> int:
        return self.inf.relists  # type: ignore[no-any-return]

    def check_alive(self) -> None:
        if self.kind == "sync":
            assert self.inf.error is None, self.inf.error
        elif self.inf._task is not None and self.inf._task.done():
            self.inf._task.result()
            raise AssertionError("the informer's task ended")


async def until(cond: Callable[[], bool], handle: Handle, what: str, timeout: float = 20) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not cond():
                handle.check_alive()
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def fresh(api: Api, node_id: str = "") -> dict[str, pb.JobState]:
    return {j.job_id: j for j in await api.collect("iter_jobs", node_id=node_id)}


@pytest.fixture
async def informer(kind: str, server: Any) -> AsyncIterator[Handle]:
    h = Handle(kind, server.target)
    yield h
    await h.stop()


async def test_syncs_existing_jobs(informer: Handle, server: Any) -> None:
    async with opened("sync", server.target) as api:
        for i in range(5):
            await api.call("create_job", f"j{i}")
        await api.call("create_execution", "j1", "n1")
        await api.call("update_job_state", "j2", "completed")
        await api.call("delete_job", "j3")
        head = await api.call("head_revision")
        await informer.start()
        assert informer.jobs() == await fresh(api)
        assert set(informer.jobs()) == {"j0", "j1", "j2", "j4"}
        assert informer.revision == head
        assert informer.get("j3") is None
        assert informer.changes == []  # the list is not reported as changes


async def test_follows_changes_of_another_client(informer: Handle, server: Any) -> None:
    async with opened("async", server.target) as api:
        await api.call("create_job", "old")
        await informer.start()
        writes: list[tuple[int, int]] = []

        async def w(kind: int, method: str, *args: Any, **kwargs: Any) -> None:
            writes.append((kind, (await api.call(method, *args, **kwargs)).revision))

        await w(ET.WATCH_EVENT_TYPE_CREATED, "create_job", "a")
        await w(ET.WATCH_EVENT_TYPE_UPDATED, "create_execution", "a", "n1", compute_reference="e1")
        await w(ET.WATCH_EVENT_TYPE_UPDATED, "update_execution", "a", "e1", state="bid_accepted")
        await w(ET.WATCH_EVENT_TYPE_CREATED, "create_job", "b")
        await w(ET.WATCH_EVENT_TYPE_UPDATED, "update_job_state", "old", "queued")
        await w(ET.WATCH_EVENT_TYPE_DELETED, "delete_job", "old")
        await w(ET.WATCH_EVENT_TYPE_UPDATED, "update_job_state", "a", "completed")
        await w(ET.WATCH_EVENT_TYPE_DELETED, "delete_job", "b")
        await w(ET.WATCH_EVENT_TYPE_CREATED, "create_job", "b")  # re-created after its delete
        last = writes[-1][1]
        await until(lambda: informer.revision >= last, informer, f"revision {last}")

        assert [(e.type, e.revision) for e in informer.changes] == writes  # once each, in order
        assert informer.jobs() == await fresh(api)
        a = informer.get("a")
        assert a is not None
        assert (a.state, a.version, a.executions[0].state) == (
            pb.JOB_STATE_TYPE_COMPLETED,
            4,
            pb.EXECUTION_STATE_TYPE_CANCELLED,
        )
        b = informer.get("b")
        assert b is not None
        assert b.version == 1
        assert informer.get("old") is None
        assert informer.relists == 0


async def test_node_informer(kind: str, server: Any) -> None:
    h = Handle(kind, server.target, node_id="n1")
    async with opened("sync", server.target) as api:
        for name in ("a", "b", "c"):
            await api.call("create_job", name)
        await api.call("create_execution", "a", "n1")
        await api.call("create_execution", "b", "n2")
        await h.start()
        try:
            assert set(h.jobs()) == {"a"}
            placed = await api.call("create_execution", "c", "n1")
            await api.call("update_job_state", "b", "queued")  # not on n1
            await until(lambda: h.revision >= placed.revision, h, "c placed on n1")
            assert set(h.jobs()) == {"a", "c"}
            assert h.jobs() == await fresh(api, node_id="n1")
            assert [e.job.job_id for e in h.changes] == ["c"]
        finally:
            await h.stop()


async def test_relists_after_revision_compacted(kind: str, make_server: Any) -> None:
    srv = make_server(history_size=5)
    with TcpProxy(srv.port) as proxy:
        h = Handle(kind, proxy.target)
        async with opened("sync", srv.target) as api:
            for name in ("keep", "gone", "changed"):
                await api.call("create_job", name)
            await h.start()
            try:
                w = await api.call("update_job_state", "changed", "queued")
                await until(lambda: h.revision >= w.revision, h, "the first change")
                assert len(h.changes) == 1

                # Out of reach while more changes happen than the server keeps: its position gets compacted.
                proxy.refuse()
                proxy.cut()
                await api.call("delete_job", "gone")
                await api.call("create_job", "new")
                for i in range(10):
                    await api.call("create_execution", "changed", f"n{i}")
                last = await api.call("head_revision")
                proxy.admit()

                await until(lambda: h.relists >= 1 and h.revision >= last, h, "the relist")
                assert h.relists == 1
                assert h.jobs() == await fresh(api)
                assert set(h.jobs()) == {"keep", "changed", "new"}
                changed = h.get("changed")
                assert changed is not None
                assert len(changed.executions) == 10
                # the relist replaced the cache; on_change saw only what it applied from the watch
                assert len(h.changes) == 1

                # and it follows on from the relist
                after = await api.call("update_job_state", "keep", "in_progress")
                await until(lambda: h.revision >= after.revision, h, "a change after the relist")
                assert [e.revision for e in h.changes] == [w.revision, after.revision]
                assert h.jobs() == await fresh(api)
            finally:
                await h.stop()


async def test_informer_releases_its_watcher(kind: str, server: Any) -> None:
    h = Handle(kind, server.target)
    await h.start()

    def watchers() -> int:
        return int(server.run(lambda: server.store.stats().watchers))

    async with opened("sync", server.target) as api:
        w = await api.call("create_job", "a")
        await until(lambda: h.revision >= w.revision, h, "the watch")
    assert await asyncio.to_thread(watchers) == 1
    await h.stop()
    for _ in range(500):  # ~5s at most: the server lets go of a watcher when it sees the call cancelled
        if await asyncio.to_thread(watchers) == 0:
            break
        await asyncio.sleep(0.01)
    assert await asyncio.to_thread(watchers) == 0
