"""Graceful shutdown: watch streams end with UNAVAILABLE / SHUTTING_DOWN, in-flight calls finish, the process
exits 0 on SIGTERM, and no watcher outlives its client."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from jobstate.server.main import ServerConfig, build_server
from jobstate.server.store import MemoryStore, ReadResult
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb
from jobstate.v1 import job_state_service_pb2_grpc as spb_grpc

WAIT = 10.0
ROOT = Path(__file__).resolve().parents[2]


def reason_of(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.domain == "jobstate"
    return info.reason


async def eventually(check: Callable[[], bool], timeout: float = WAIT) -> None:
    """Waits, bounded, for a condition that no event announces (the server's own bookkeeping)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


class GatedStore(MemoryStore):
    """GetJob waits at a gate, so that a call is certainly in flight when the server stops."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def get_job(self, job_id: str) -> ReadResult:
        self.entered.set()
        await self.gate.wait()
        return await super().get_job(job_id)


async def test_stop_ends_watch_streams_and_lets_in_flight_calls_finish() -> None:
    store = GatedStore()
    app = build_server(ServerConfig(host="127.0.0.1", port=0, grace=WAIT), store=store)
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            stub = spb_grpc.JobStateServiceStub(ch)
            await stub.CreateJob(spb.CreateJobRequest(job_id="j"))
            specs = [
                spb.WatchRequest(send_initial_state=True),
                spb.WatchRequest(job_ids=["j"], send_initial_state=True),
                spb.WatchRequest(node_id="n", send_initial_state=True),
            ]
            streams = [stub.Watch(spec) for spec in specs]
            for s in streams:  # each has its snapshot: it is registered
                first = await asyncio.wait_for(s.read(), WAIT)
                assert first.events[-1].type == spb.WATCH_EVENT_TYPE_BOOKMARK
            assert store.stats().watchers == 3
            in_flight = asyncio.ensure_future(stub.GetJob(spb.GetJobRequest(job_id="j")))
            await asyncio.wait_for(store.entered.wait(), WAIT)
            stopping = asyncio.ensure_future(app.stop())
            for s in streams:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await asyncio.wait_for(s.read(), WAIT)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert reason_of(info.value) == "SHUTTING_DOWN"
            assert not in_flight.done()
            store.gate.set()
            got = await asyncio.wait_for(in_flight, WAIT)
            assert got.job.job_id == "j"
            await asyncio.wait_for(stopping, WAIT)
            assert store.stats().watchers == 0
    finally:
        store.gate.set()
        await app.stop(0)


async def test_calls_during_shutdown_get_unavailable_while_running_ones_finish() -> None:
    """A unary call running when stop begins completes OK; a call made after is refused with UNAVAILABLE,
    either by the service (SHUTTING_DOWN) or, once the server is gone, by the connection: never CANCELLED."""
    store = GatedStore()
    app = build_server(ServerConfig(host="127.0.0.1", port=0, grace=WAIT), store=store)
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            stub = spb_grpc.JobStateServiceStub(ch)
            await stub.CreateJob(spb.CreateJobRequest(job_id="j"))
            in_flight = asyncio.ensure_future(stub.GetJob(spb.GetJobRequest(job_id="j")))
            await asyncio.wait_for(store.entered.wait(), WAIT)
            stopping = asyncio.ensure_future(app.stop())
            await eventually(lambda: app.service is not None and app.service.shutting_down)
            # The gated call still runs, so the server is certainly still up: the service itself answers.
            for call in (
                stub.CreateJob(spb.CreateJobRequest(job_id="late"), timeout=WAIT),
                stub.ListJobs(spb.ListJobsRequest(), timeout=WAIT),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert reason_of(info.value) == "SHUTTING_DOWN"
            late_watch = stub.Watch(spb.WatchRequest(send_initial_state=True), timeout=WAIT)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await late_watch.read()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert reason_of(info.value) == "SHUTTING_DOWN"
            assert not in_flight.done()
            store.gate.set()
            got = await asyncio.wait_for(in_flight, WAIT)
            assert got.job.job_id == "j"
            await asyncio.wait_for(stopping, WAIT)
            # Gone now: a call is refused by the connection, still UNAVAILABLE to the client.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetJob(spb.GetJobRequest(job_id="j"), timeout=WAIT)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert store.stats().jobs == 1  # the refused create changed nothing
    finally:
        store.gate.set()
        await app.stop(0)


async def test_calls_during_shutdown_are_cancelled_only_once_grpc_stops_the_transport() -> None:
    """Clients calling in a loop while the server stops, backing off after UNAVAILABLE as the jobstate client
    does: every call the service answers is OK or UNAVAILABLE / SHUTTING_DOWN. Only once grpc's own
    ``server.stop`` has begun can a call be answered CANCELLED, by grpc core, for a call it held queued or that
    was still on its way (docs/CONTRACT.md, "Shutdown"); no answer before that instant is ever CANCELLED.

    This is the promise that holds whatever the timing: under load, some runs do get CANCELLED answers (a
    trace showed ten callers whose backoff brought them back in the same millisecond that ``server.stop``
    began, answered CANCELLED 2-7 ms later), and the clients retry reads and watches on it."""
    app = build_server(ServerConfig(host="127.0.0.1", port=0, grace=WAIT))
    await app.start()
    answers: list[tuple[float, grpc.StatusCode, str]] = []  # (answered at, code, reason)
    stopped = asyncio.Event()
    busy = asyncio.Event()

    async def caller(i: int) -> None:
        delay = 0.05
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            stub = spb_grpc.JobStateServiceStub(ch)
            for n in range(100_000):  # bounded; ends once the server is gone
                reason = ""
                try:
                    await stub.CreateJob(spb.CreateJobRequest(job_id=f"c{i}-{n}"), timeout=WAIT)
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                    if rpc_status.from_call(exc) is not None:  # type: ignore[arg-type]
                        reason = reason_of(exc)
                answers.append((time.monotonic(), code, reason))
                if sum(1 for a in answers if a[1] == grpc.StatusCode.OK) >= 200:
                    busy.set()
                if stopped.is_set():
                    return
                if code == grpc.StatusCode.UNAVAILABLE:
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, 1.0)

    try:
        callers = [asyncio.ensure_future(caller(i)) for i in range(10)]
        await asyncio.wait_for(busy.wait(), WAIT)
        await asyncio.wait_for(app.stop(), WAIT + 5)
        stopped.set()
        await asyncio.wait_for(asyncio.gather(*callers), WAIT)
    finally:
        await app.stop(0)
    transport_stop = app.transport_stop_started
    assert transport_stop is not None
    counts: dict[str, int] = {}
    for _, code, _ in answers:
        counts[code.name] = counts.get(code.name, 0) + 1
    print(f"\nanswers while stopping under load: {counts}")
    # The service itself refused the calls that came once shutdown began, with the reason clients retry on.
    assert any(code == grpc.StatusCode.UNAVAILABLE and reason == "SHUTTING_DOWN" for _, code, reason in answers)
    assert {code for _, code, _ in answers} <= {
        grpc.StatusCode.OK,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
    }
    early = [(at - transport_stop, reason) for at, code, reason in answers if code == grpc.StatusCode.CANCELLED]
    assert all(offset >= 0 for offset, _ in early), f"CANCELLED before grpc's stop began: {early}"
    # grpc core's CANCELLED carries no ErrorInfo: the service never sends it.
    assert all(reason == "" for _, reason in early)


async def test_reads_through_the_client_during_shutdown_never_surface_cancelled() -> None:
    """The jobstate client retries a read that a stopping server cancelled (or refused with UNAVAILABLE), so a
    reader in a loop sees answers or, once the server is gone for good, UNAVAILABLE: never CANCELLED."""
    from jobstate.client import AsyncClient
    from jobstate.client.errors import Cancelled, JobStateError

    app = build_server(ServerConfig(host="127.0.0.1", port=0, grace=WAIT))
    await app.start()
    outcomes: dict[str, int] = {}
    stopped = asyncio.Event()
    busy = asyncio.Event()

    async def reader(i: int) -> None:
        async with AsyncClient(f"127.0.0.1:{app.port}", timeout=WAIT, read_attempts=6) as client:
            await client.create_job(f"r{i}")
            for _ in range(100_000):  # bounded; ends once the server is gone
                try:
                    await client.get_job(f"r{i}")
                    name = "OK"
                except Cancelled:
                    name = "CANCELLED"
                except JobStateError as exc:
                    name = exc.code.name
                outcomes[name] = outcomes.get(name, 0) + 1
                if outcomes.get("OK", 0) >= 200:
                    busy.set()
                if stopped.is_set() and name != "OK":
                    return

    try:
        readers = [asyncio.ensure_future(reader(i)) for i in range(10)]
        await asyncio.wait_for(busy.wait(), WAIT)
        await asyncio.wait_for(app.stop(), WAIT + 5)
        stopped.set()
        await asyncio.wait_for(asyncio.gather(*readers), 3 * WAIT)
    finally:
        await app.stop(0)
    print(f"\nreads through the client while stopping: {outcomes}")
    assert "CANCELLED" not in outcomes
    assert set(outcomes) <= {"OK", "UNAVAILABLE"}
    assert outcomes.get("UNAVAILABLE", 0) >= 10  # each reader ended on the gone server


async def test_no_watcher_outlives_its_client(server: Any) -> None:
    def watchers() -> int:
        return int(server.run(lambda: server.store.stats().watchers))

    async with grpc.aio.insecure_channel(server.target) as ch:
        stub = spb_grpc.JobStateServiceStub(ch)
        await stub.CreateJob(spb.CreateJobRequest(job_id="j"))
        calls = [
            stub.Watch(spb.WatchRequest(send_initial_state=True)),
            stub.Watch(spb.WatchRequest(job_ids=["j"], send_initial_state=True)),
            stub.Watch(spb.WatchRequest(node_id="n1", send_initial_state=True)),
            stub.Watch(spb.WatchRequest(start_revision=1)),
        ]
        for c in calls:
            await asyncio.wait_for(c.read(), WAIT)
        assert watchers() == 4
        calls[0].cancel()  # the client cancels one stream
        await eventually(lambda: watchers() == 3)
        await stub.CreateExecution(spb.CreateExecutionRequest(job_id="j", execution=pb.ExecutionState(node_id="n1")))
        for c in calls[1:]:  # the others still work
            response = await asyncio.wait_for(c.read(), WAIT)
            assert response.events[-1].revision == 2
    # The channel closed under the remaining streams.
    await eventually(lambda: watchers() == 0)
    # Streams that ended with an error leave nothing behind either.
    async with grpc.aio.insecure_channel(server.target) as ch:
        stub = spb_grpc.JobStateServiceStub(ch)
        for _ in range(20):
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Watch(spb.WatchRequest(job_ids=["bad id"])).read()
    assert watchers() == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_process_exits_0_on_sigterm_and_ends_streams() -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("server", "client", "gen"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobstate", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            status = health.Check(health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=20)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            stub = spb_grpc.JobStateServiceStub(ch)
            stub.CreateJob(spb.CreateJobRequest(job_id="j"))
            stream = stub.Watch(spb.WatchRequest(send_initial_state=True), timeout=20)
            first = next(stream)
            assert [e.job.job_id for e in first.events if e.job.job_id] == ["j"]
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as info:
                next(stream)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            assert reason_of(info.value) == "SHUTTING_DOWN"
        code = proc.wait(timeout=20)
        _, err = proc.communicate(timeout=5)
        assert code == 0, err.decode(errors="replace")[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
