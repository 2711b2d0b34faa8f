"""The watch streams' resumption.

Scripted (grpc_testing's channel plays the server for the blocking client, so each drop is exactly where the test
puts it): the request after a drop starts at the last revision + 1, a snapshot dropped before its bookmark
starts again, REVISION_COMPACTED is raised, on_resume sees each attempt, close() ends it.

Real (a server behind a TCP proxy whose connections are cut while a writer writes): the stream resumes by
itself, and the recorded events pass the watch checker (no gap, no repeat), for both clients.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import grpc_testing
import pytest
from watchcheck import Commit, WatchChecker

from jobstate.client import (
    AsyncClient,
    Backoff,
    Cancelled,
    Client,
    InvalidArgument,
    JobStateError,
    OutOfRange,
    Reason,
    ResourceExhausted,
    Unavailable,
    WatchStream,
)
from jobstate.client import core as client_core
from jobstate.server import errors as server_errors
from jobstate.server.service import to_status
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb

from .apis import make_api
from .proxy import TcpProxy

ET = spb.WatchEventType
SERVICE = spb.DESCRIPTOR.services_by_name["JobStateService"]
WATCH = SERVICE.methods_by_name["Watch"]
LIST_JOBS = SERVICE.methods_by_name["ListJobs"]
FAST = Backoff(initial=0.001, maximum=0.01)
_END = object()

# --- scripted server ---------------------------------------------------------------------------------------


def _bounded(fn: Callable[[], Any], timeout: float = 10) -> Any:
    """Runs a blocking grpc_testing call (they wait forever) on a daemon thread, with a deadline."""
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    if not box:
        raise TimeoutError(f"{fn} did not return within {timeout}s")
    return box[0]


class Script:
    def __init__(self) -> None:
        self.channel = grpc_testing.channel(spb.DESCRIPTOR.services_by_name.values(), grpc_testing.strict_real_time())
        self.client = Client("scripted", channel=self.channel, backoff=FAST)

    def take_watch(self) -> tuple[spb.WatchRequest, Any]:
        _, request, rpc = _bounded(lambda: self.channel.take_unary_stream(WATCH))
        return request, rpc

    def answer_head_revision(self, revision: int) -> spb.ListJobsRequest:
        _, request, rpc = _bounded(lambda: self.channel.take_unary_unary(LIST_JOBS))
        rpc.terminate(spb.ListJobsResponse(revision=revision), (), grpc.StatusCode.OK, "")
        return request  # type: ignore[no-any-return]


class Consumer:
    """Iterates a sync WatchStream on a thread; events (or the error it ended with) arrive on a queue."""

    def __init__(self, open_stream: Callable[[], WatchStream]) -> None:
        self._open = open_stream
        self._q: queue.Queue[Any] = queue.Queue()
        self._ready = threading.Event()
        self.stream: WatchStream | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.stream = self._open()
            self._ready.set()
            for event in self.stream:
                self._q.put(event)
        except BaseException as exc:
            self._q.put(exc)
            return
        finally:
            self._ready.set()
        self._q.put(_END)

    def opened(self) -> WatchStream:
        assert self._ready.wait(10), "watch() did not return"
        assert self.stream is not None
        return self.stream

    def next(self, timeout: float = 10) -> Any:
        return self._q.get(timeout=timeout)

    def revisions(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            item = self.next()
            assert isinstance(item, spb.WatchEvent), f"expected an event, got {item!r}"
            out.append(item.revision)
        return out

    def ended_with(self) -> Any:
        item = self.next()
        self.thread.join(10)
        assert not self.thread.is_alive()
        return item


def ev(kind: int, revision: int, job_id: str = "a", version: int = 1) -> spb.WatchEvent:
    if kind == ET.WATCH_EVENT_TYPE_BOOKMARK:
        return spb.WatchEvent(type=kind, revision=revision)  # type: ignore[arg-type]
    job = pb.JobState(job_id=job_id, version=version)
    return spb.WatchEvent(type=kind, revision=revision, job=job)  # type: ignore[arg-type]


def resp(*events: spb.WatchEvent, revision: int | None = None) -> spb.WatchResponse:
    top = max((e.revision for e in events), default=0)
    return spb.WatchResponse(events=events, revision=top if revision is None else revision)


def terminate(rpc: Any, error: server_errors.JobStateError | None = None, code: grpc.StatusCode | None = None) -> None:
    """Ends a scripted stream the way the server would: the rich status of a domain error, or a bare code."""
    if error is not None:
        status = to_status(error)
        rpc.terminate(status.trailing_metadata, status.code, status.details)
    else:
        assert code is not None
        rpc.terminate((), code, "transport says no")


@pytest.fixture
def script() -> Iterator[Script]:
    s = Script()
    yield s
    s.client.close()


Resumes = list[tuple[JobStateError, int, float]]


def test_resumes_after_last_revision(script: Script) -> None:
    resumes: Resumes = []
    c = Consumer(
        lambda: script.client.watch(["a"], node_id="n", start_revision=5, on_resume=lambda *a: resumes.append(a))
    )

    req, rpc = script.take_watch()
    assert (req.start_revision, list(req.job_ids), req.node_id, req.send_initial_state) == (5, ["a"], "n", False)
    rpc.send_response(resp(ev(ET.WATCH_EVENT_TYPE_CREATED, 5), ev(ET.WATCH_EVENT_TYPE_UPDATED, 6, version=2)))
    assert c.revisions(2) == [5, 6]
    terminate(rpc, code=grpc.StatusCode.UNAVAILABLE)

    req, rpc = script.take_watch()
    assert (req.start_revision, list(req.job_ids), req.node_id) == (7, ["a"], "n")
    assert len(resumes) == 1
    err, attempt, delay = resumes[0]
    assert (type(err), attempt) == (Unavailable, 1)
    assert 0.0005 <= delay <= 0.001
    # a filtered stream's response covers more than its events: resume after what it covers
    rpc.send_response(resp(ev(ET.WATCH_EVENT_TYPE_UPDATED, 7, version=3), revision=9))
    assert c.revisions(1) == [7]
    terminate(rpc, server_errors.WatcherLagged("fell behind", resume_revision=10))

    req, rpc = script.take_watch()
    assert req.start_revision == 10
    err, attempt, _ = resumes[1]
    assert (type(err), err.reason, err.resume_revision, attempt) == (ResourceExhausted, Reason.WATCHER_LAGGED, 10, 1)
    terminate(rpc, code=grpc.StatusCode.UNAVAILABLE)  # fails again before any response: attempt 2

    req, rpc = script.take_watch()
    assert req.start_revision == 10
    _, attempt, delay = resumes[2]
    assert attempt == 2
    assert 0.001 <= delay <= 0.002
    terminate(rpc, server_errors.RevisionCompacted("gone", oldest_revision=50))

    err = c.ended_with()
    assert isinstance(err, OutOfRange)
    assert (err.reason, err.oldest_revision) == (Reason.REVISION_COMPACTED, 50)
    assert len(resumes) == 3  # compaction is not retried
    assert c.opened().cursor.resumes == 3


def test_live_watch_is_pinned_to_head_revision(script: Script) -> None:
    c = Consumer(lambda: script.client.watch(["a"]))
    list_req = script.answer_head_revision(41)
    assert list_req.page_size == 1
    req, rpc = script.take_watch()
    assert req.start_revision == 42
    terminate(rpc, code=grpc.StatusCode.UNAVAILABLE)
    req, rpc = script.take_watch()
    assert req.start_revision == 42  # nothing delivered yet: the same place
    rpc.send_response(resp(ev(ET.WATCH_EVENT_TYPE_CREATED, 45)))
    assert c.revisions(1) == [45]
    c.opened().close()
    assert c.ended_with() is _END


def test_snapshot_dropped_before_bookmark_starts_again(script: Script) -> None:
    c = Consumer(lambda: script.client.watch(send_initial_state=True))
    req, rpc = script.take_watch()
    assert (req.send_initial_state, req.start_revision) == (True, 0)
    rpc.send_response(
        resp(ev(ET.WATCH_EVENT_TYPE_INITIAL, 3, "a"), ev(ET.WATCH_EVENT_TYPE_INITIAL, 5, "b"), revision=0)
    )
    assert c.revisions(2) == [3, 5]
    terminate(rpc, code=grpc.StatusCode.UNAVAILABLE)

    req, rpc = script.take_watch()
    assert (req.send_initial_state, req.start_revision) == (True, 0)  # the snapshot again, from scratch
    rpc.send_response(
        resp(ev(ET.WATCH_EVENT_TYPE_INITIAL, 3, "a"), ev(ET.WATCH_EVENT_TYPE_INITIAL, 6, "b", 2), revision=0)
    )
    rpc.send_response(resp(ev(ET.WATCH_EVENT_TYPE_BOOKMARK, 10)))
    rpc.send_response(resp(ev(ET.WATCH_EVENT_TYPE_UPDATED, 11, "a", 2)))
    assert c.revisions(4) == [3, 6, 10, 11]
    terminate(rpc, code=grpc.StatusCode.UNAVAILABLE)

    req, rpc = script.take_watch()
    assert (req.send_initial_state, req.start_revision) == (False, 12)  # after the bookmark: by revision
    rpc.send_response(resp(ev(ET.WATCH_EVENT_TYPE_BOOKMARK, 20)))
    assert c.revisions(1) == [20]
    terminate(rpc, server_errors.WatcherLagged("fell behind", resume_revision=21))
    req, rpc = script.take_watch()
    assert (req.send_initial_state, req.start_revision) == (False, 21)
    c.opened().close()
    assert c.ended_with() is _END


def test_close_stops_an_open_stream(script: Script) -> None:
    c = Consumer(lambda: script.client.watch(start_revision=1))
    _, rpc = script.take_watch()
    stream = c.opened()
    stream.close()
    _bounded(rpc.cancelled)  # the call itself was cancelled, not just abandoned
    assert c.ended_with() is _END


def test_close_during_backoff(script: Script) -> None:
    slow = Client("scripted", channel=script.channel, backoff=Backoff(initial=60, maximum=60))
    waiting = threading.Event()
    c = Consumer(lambda: slow.watch(start_revision=1, on_resume=lambda *a: waiting.set()))
    _, rpc = script.take_watch()
    terminate(rpc, code=grpc.StatusCode.UNAVAILABLE)
    assert waiting.wait(10)
    started = time.monotonic()
    c.opened().close()
    assert c.ended_with() is _END
    assert time.monotonic() - started < 20  # did not sit out the 30-60s delay


def test_a_call_the_server_cancelled_is_resumed(script: Script) -> None:
    # A server stopping cancels the calls it still holds queued: a watch that raced a restart sees CANCELLED.
    resumes: Resumes = []
    c = Consumer(lambda: script.client.watch(start_revision=3, on_resume=lambda *a: resumes.append(a)))
    _, rpc = script.take_watch()
    rpc.send_response(resp(ev(ET.WATCH_EVENT_TYPE_CREATED, 3)))
    assert c.revisions(1) == [3]
    terminate(rpc, code=grpc.StatusCode.CANCELLED)
    req, rpc = script.take_watch()
    assert req.start_revision == 4
    assert [type(err) for err, _, _ in resumes] == [Cancelled]
    c.opened().close()
    assert c.ended_with() is _END


def test_a_closed_client_does_not_resume(script: Script) -> None:
    resumes: Resumes = []
    c = Consumer(lambda: script.client.watch(start_revision=3, on_resume=lambda *a: resumes.append(a)))
    _, rpc = script.take_watch()
    script.client.close()
    terminate(rpc, code=grpc.StatusCode.CANCELLED)  # what closing a real channel does to its calls
    assert isinstance(c.ended_with(), Cancelled)
    assert resumes == []


def test_without_resume_a_drop_is_raised(script: Script) -> None:
    c = Consumer(lambda: script.client.watch(start_revision=3, resume=False))
    req, rpc = script.take_watch()
    assert req.start_revision == 3
    terminate(rpc, code=grpc.StatusCode.UNAVAILABLE)
    assert isinstance(c.ended_with(), Unavailable)


def test_errors_that_are_not_drops_are_raised(script: Script) -> None:
    resumes: Resumes = []
    c = Consumer(lambda: script.client.watch(start_revision=3, on_resume=lambda *a: resumes.append(a)))
    _, rpc = script.take_watch()
    terminate(rpc, server_errors.InvalidArgument("bad node id", field="node_id"))
    err = c.ended_with()
    assert isinstance(err, InvalidArgument)
    assert resumes == []


def test_server_end_of_stream_ends_iteration(script: Script) -> None:
    c = Consumer(lambda: script.client.watch(start_revision=3))
    _, rpc = script.take_watch()
    rpc.send_response(resp(ev(ET.WATCH_EVENT_TYPE_CREATED, 3)))
    rpc.terminate((), grpc.StatusCode.OK, "")
    assert c.revisions(1) == [3]
    assert c.ended_with() is _END


# --- real server behind a proxy ----------------------------------------------------------------------------

# Reconnect at once after a cut, instead of grpc's default of a second or more.
FAST_RECONNECT = [
    *client_core.CHANNEL_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 100),
]
JOBS = 8
CUTS = 3
EVENTS_BETWEEN_CUTS = 40


class Writer:
    """Writes changes on its own connection (not through the proxy) until stopped, recording each commit."""

    def __init__(self, target: str) -> None:
        self.client = Client(target)
        self.commits: list[Commit] = []
        for i in range(JOBS):
            self.client.create_job(f"j{i}")
            self.client.create_execution(f"j{i}", "n1", compute_reference="e1")
        self.start = self.client.head_revision() + 1
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for i in range(20_000):
                if self._stop.is_set():
                    return
                r = self.client.update_execution(f"j{i % JOBS}", "e1", status=f"s{i}")
                self.commits.append(Commit.of(r))
        except BaseException as exc:
            self.error = exc

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive()
        self.client.close()
        assert self.error is None, self.error
        assert self.commits, "the writer wrote nothing"
        return self.commits[-1].revision


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.005)


def test_sync_watch_resumes_through_cuts(server: Any) -> None:
    with TcpProxy(server.port) as proxy:
        writer = Writer(server.target)
        checker = WatchChecker("sync-through-proxy")
        checker.begin(writer.start)
        resumes: list[JobStateError] = []
        failure: list[BaseException] = []
        client = Client(proxy.target, channel=grpc.insecure_channel(proxy.target, FAST_RECONNECT), backoff=FAST)

        def on_resume(err: JobStateError, attempt: int, delay: float) -> None:
            resumes.append(err)
            checker.begin(stream.cursor.next_request().start_revision)  # raises if not last + 1

        stream = client.watch(start_revision=writer.start, on_resume=on_resume)

        def consume() -> None:
            try:
                for response in stream.responses():
                    checker.observe(response)
            except BaseException as exc:
                failure.append(exc)

        consumer = threading.Thread(target=consume, daemon=True)
        consumer.start()
        try:
            for n in range(1, CUTS + 1):
                # Events of the previous connection may still be arriving from the client's buffers after the
                # cut, so wait for the reconnection too: a cut must find a connection to cut.
                wait_until(
                    lambda n=n: (len(checker.events) >= n * EVENTS_BETWEEN_CUTS and proxy.open > 0) or bool(failure),
                    20,
                    "events on a connection",
                )
                assert proxy.cut() >= 1
            wait_until(lambda: len(resumes) >= CUTS or bool(failure), 20, "resumes")
            last = writer.stop()
            wait_until(lambda: stream.position >= last or bool(failure), 20, f"position {stream.position} < {last}")
        finally:
            stream.close()
            consumer.join(10)
            client.close()
        assert not failure, failure
        assert not consumer.is_alive()
        assert checker.check_complete(writer.commits) == len(writer.commits)
        assert len(checker.live_events()) == len(writer.commits)
        assert len(resumes) >= CUTS
        assert all(isinstance(e, Unavailable) or "RST_STREAM" in e.message for e in resumes), resumes
        assert proxy.accepted >= CUTS + 1


async def test_async_watch_resumes_through_cuts(server: Any) -> None:
    with TcpProxy(server.port) as proxy:
        writer = await asyncio.to_thread(Writer, server.target)
        checker = WatchChecker("async-through-proxy")
        checker.begin(writer.start)
        resumes: list[JobStateError] = []
        client = AsyncClient(
            proxy.target, channel=grpc.aio.insecure_channel(proxy.target, options=FAST_RECONNECT), backoff=FAST
        )

        def on_resume(err: JobStateError, attempt: int, delay: float) -> None:
            resumes.append(err)
            assert stream.cursor is not None
            checker.begin(stream.cursor.next_request().start_revision)

        stream = client.watch(start_revision=writer.start, on_resume=on_resume)

        async def consume() -> None:
            async for response in stream.responses():
                checker.observe(response)

        consumer = asyncio.create_task(consume())

        async def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
            async with asyncio.timeout(timeout):
                while not cond():
                    if consumer.done():
                        consumer.result()  # raises what the consumer died of
                        raise AssertionError("the watch ended")
                    await asyncio.sleep(0.005)

        try:
            for n in range(1, CUTS + 1):
                await until(
                    lambda n=n: len(checker.events) >= n * EVENTS_BETWEEN_CUTS and proxy.open > 0,
                    20,
                    "events on a connection",
                )
                assert proxy.cut() >= 1
            await until(lambda: len(resumes) >= CUTS, 20, "resumes")
            last = await asyncio.to_thread(writer.stop)
            await until(lambda: stream.position >= last, 20, "position")
        finally:
            stream.close()
            done, _ = await asyncio.wait({consumer}, timeout=10)
            await client.close()
        assert done
        consumer.result()
        assert checker.check_complete(writer.commits) == len(writer.commits)
        assert len(checker.live_events()) == len(writer.commits)
        assert len(resumes) >= CUTS
        assert all(isinstance(e, Unavailable) or "RST_STREAM" in e.message for e in resumes), resumes


async def test_close_during_backoff_ends_at_once(kind: str, server: Any) -> None:
    """Regression: the asyncio stream slept out its whole backoff delay after close()."""
    with TcpProxy(server.port) as proxy:
        proxy.refuse()  # every attempt fails: the stream sits in its backoff
        resumed = threading.Event()
        api = make_api(kind, proxy.target, backoff=Backoff(initial=60, maximum=60))
        try:
            rec = await api.watch(start_revision=1, on_resume=lambda *a: resumed.set())
            assert await asyncio.to_thread(resumed.wait, 10)
            started = time.monotonic()
            await rec.close()  # asserts the consumer ended (within 10s) without being cancelled
            assert time.monotonic() - started < 20
            assert rec.responses == []
        finally:
            await api.close()
