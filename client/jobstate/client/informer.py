"""Informers: a local dict of jobs kept current by list + watch (the Kubernetes client pattern).

An informer lists every matching job, then watches from the list's first revision + 1 so that no change in
between is missed, and applies each event to a ``JobCache``. When the server no longer holds the revision to
resume from (REVISION_COMPACTED) it lists again from scratch. Callers read ``get()``/``jobs()`` at any time
and may pass ``on_change(event)`` to react to each applied event.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable

from jobstate.client.aio import AsyncClient
from jobstate.client.core import JobCache
from jobstate.client.errors import OutOfRange, Unavailable
from jobstate.client.sync import Client, WatchStream
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb

OnChange = Callable[[spb.WatchEvent], None]


class AsyncInformer:
    """``async with AsyncInformer(client) as inf: await inf.synced.wait(); inf.get(job_id)``."""

    def __init__(self, client: AsyncClient, *, node_id: str = "", on_change: OnChange | None = None) -> None:
        self.client = client
        self.node_id = node_id
        self.on_change = on_change
        self.cache = JobCache()
        self.synced = asyncio.Event()
        self.relists = 0
        self._task: asyncio.Task[None] | None = None

    def get(self, job_id: str) -> pb.JobState | None:
        return self.cache.jobs.get(job_id)

    def jobs(self) -> list[pb.JobState]:
        return list(self.cache.jobs.values())

    async def _list(self) -> int:
        first_revision = 0
        token = ""
        fresh = JobCache()
        while True:
            page = await self.client.list_jobs(node_id=self.node_id, page_token=token, page_size=1000)
            first_revision = first_revision or page.revision
            fresh.load(page.jobs, page.revision)
            token = page.next_page_token
            if not token:
                break
        self.cache = fresh
        self.cache.revision = first_revision
        return first_revision

    async def _relist(self) -> int:
        """Lists until it succeeds: an informer outlives a server restart (jittered backoff between tries)."""
        attempt = 0
        while True:
            try:
                return await self._list()
            except Unavailable:
                attempt += 1
                await asyncio.sleep(self.client.backoff.delay(attempt))

    async def run(self) -> None:
        """Lists and watches until cancelled."""
        while True:
            revision = await self._relist()
            self.synced.set()
            stream = self.client.watch(node_id=self.node_id, start_revision=revision + 1)
            try:
                async for event in stream:
                    if self.cache.apply(event) and self.on_change is not None:
                        self.on_change(event)
            except OutOfRange:
                self.relists += 1
                continue
            finally:
                stream.close()

    async def __aenter__(self) -> AsyncInformer:
        self._task = asyncio.create_task(self.run(), name="jobstate-informer")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class Informer:
    """The blocking informer: a background thread keeps ``get()``/``jobs()`` current.

    ``with Informer(client) as inf: inf.wait_synced(5); inf.get(job_id)``.
    """

    def __init__(self, client: Client, *, node_id: str = "", on_change: OnChange | None = None) -> None:
        self.client = client
        self.node_id = node_id
        self.on_change = on_change
        self.cache = JobCache()
        self.relists = 0
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._synced = threading.Event()
        self._stopped = threading.Event()
        self._stream: WatchStream | None = None
        self._thread = threading.Thread(target=self._run, name="jobstate-informer", daemon=True)

    def get(self, job_id: str) -> pb.JobState | None:
        with self._lock:
            return self.cache.jobs.get(job_id)

    def jobs(self) -> list[pb.JobState]:
        with self._lock:
            return list(self.cache.jobs.values())

    def wait_synced(self, timeout: float | None = None) -> bool:
        return self._synced.wait(timeout)

    def _list(self) -> int:
        first_revision = 0
        token = ""
        fresh = JobCache()
        while True:
            page = self.client.list_jobs(node_id=self.node_id, page_token=token, page_size=1000)
            first_revision = first_revision or page.revision
            fresh.load(page.jobs, page.revision)
            token = page.next_page_token
            if not token:
                break
        fresh.revision = first_revision
        with self._lock:
            self.cache = fresh
        return first_revision

    def _relist(self) -> int:
        """Lists until it succeeds (or the informer stops: -1), backing off between tries."""
        attempt = 0
        while not self._stopped.is_set():
            try:
                return self._list()
            except Unavailable:
                attempt += 1
                if self._stopped.wait(self.client.backoff.delay(attempt)):
                    break
        return -1

    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                revision = self._relist()
                if revision < 0:
                    return
                self._synced.set()
                self._stream = self.client.watch(node_id=self.node_id, start_revision=revision + 1)
                if self._stopped.is_set():
                    return
                try:
                    for event in self._stream:
                        with self._lock:
                            changed = self.cache.apply(event)
                        if changed and self.on_change is not None:
                            self.on_change(event)
                except OutOfRange:
                    self.relists += 1
        except BaseException as exc:  # surfaced to the owner through .error; the thread must not die silently
            if not self._stopped.is_set():
                self.error = exc

    def start(self) -> Informer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._stream is not None:
            self._stream.close()
        self._thread.join(5)

    def __enter__(self) -> Informer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
