"""Limits: each one refuses what exceeds it with RESOURCE_EXHAUSTED (or OUT_OF_RANGE for history), and a
client hitting a limit leaves every other client's calls untouched. Dead watchers are released."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from secutil import ROOT, TOKENS, bearer, wait_for

from jobstate.client import AsyncClient, Client, JobStateError, Reason, ResourceExhausted
from jobstate.server import rules
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb
from jobstate.v1 import job_state_service_pb2_grpc as spb_grpc

TIMEOUT = 5


def details(exc: grpc.RpcError) -> dict[str, Any]:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None
    out: dict[str, Any] = {}
    for d in status.details:
        info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
        if d.Unpack(info):
            out["reason"], out["metadata"] = info.reason, dict(info.metadata)
        elif d.Unpack(retry):
            out["retry_delay"] = retry.retry_delay.ToNanoseconds() / 1e9
    return out


def test_write_rate_limit_gives_a_retry_hint_and_spares_other_clients(make_server: Any, tokens_file: Path) -> None:
    server = make_server(auth_tokens_file=str(tokens_file), write_rate_per_client=2, write_burst_per_client=5)
    with grpc.insecure_channel(server.target) as channel:
        stub = spb_grpc.JobStateServiceStub(channel)
        bob, carol = bearer(TOKENS["writer"]), bearer(TOKENS["writer2"])
        accepted, limited = 0, []
        codes = []
        for i in range(30):
            try:
                stub.CreateJob(spb.CreateJobRequest(job_id=f"bob-{i}"), timeout=TIMEOUT, metadata=bob)
                accepted += 1
            except grpc.RpcError as exc:
                codes.append(exc.code())
                limited.append(details(exc))
        assert set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert 5 <= accepted < 30
        assert limited
        for d in limited:
            assert d["reason"] == "RATE_LIMITED"
            assert 0 < d["retry_delay"] <= 0.5 + 1e-3
            assert int(d["metadata"]["retry_after_ms"]) > 0
        # Bob is throttled; Carol writes her whole burst, and Bob's reads are not limited.
        for i in range(5):
            stub.CreateJob(spb.CreateJobRequest(job_id=f"carol-{i}"), timeout=TIMEOUT, metadata=carol)
        for _ in range(20):
            stub.GetJob(spb.GetJobRequest(job_id="bob-0"), timeout=TIMEOUT, metadata=bob)
        listed = stub.ListJobs(spb.ListJobsRequest(page_size=1000), timeout=TIMEOUT, metadata=bob)
        # Refused writes left no trace.
        assert len(listed.jobs) == accepted + 5
        assert listed.revision == accepted + 5
        # After the hinted delay, Bob can write again.
        time.sleep(max(d["retry_delay"] for d in limited[-1:]) + 0.05)
        stub.CreateJob(spb.CreateJobRequest(job_id="bob-again"), timeout=TIMEOUT, metadata=bob)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_clients_wait_out_the_rate_limit_hint(make_server: Any, tokens_file: Path, kind: str) -> None:
    server = make_server(auth_tokens_file=str(tokens_file), write_rate_per_client=20, write_burst_per_client=2)
    writes = 12

    async def write_all(retries: int) -> tuple[int, list[JobStateError]]:
        """Creates ``writes`` jobs as fast as the client lets it; returns how many were accepted, and refusals."""
        refused: list[JobStateError] = []
        accepted = 0
        if kind == "sync":
            with Client(server.target, token=TOKENS["writer"], rate_limited_retries=retries) as c:
                for i in range(writes):
                    try:
                        c.create_job(f"{kind}-{retries}-{i}")
                        accepted += 1
                    except JobStateError as exc:
                        refused.append(exc)
        else:
            async with AsyncClient(server.target, token=TOKENS["writer"], rate_limited_retries=retries) as a:
                for i in range(writes):
                    try:
                        await a.create_job(f"{kind}-{retries}-{i}")
                        accepted += 1
                    except JobStateError as exc:
                        refused.append(exc)
        return accepted, refused

    # Without retries the burst goes through and the rest is refused, each refusal with the server's hint.
    accepted, refused = asyncio.run(write_all(0))
    assert accepted < writes
    assert refused
    assert {(type(e), e.reason) for e in refused} == {(ResourceExhausted, Reason.RATE_LIMITED)}
    assert all(e.retry_delay is not None and 0 < e.retry_delay <= 0.05 + 1e-3 for e in refused)
    # With them, every write lands: the client waited as told instead of failing.
    time.sleep(0.2)  # a fresh burst
    accepted, refused = asyncio.run(write_all(3))
    assert (accepted, refused) == (writes, [])
    with Client(server.target, token=TOKENS["reader"]) as reader:
        names = {j.job_id for j in reader.iter_jobs()}
    assert {f"{kind}-3-{i}" for i in range(writes)} <= names


def _open_watch(stub: spb_grpc.JobStateServiceStub, md: Any) -> Any:
    call = stub.Watch(spb.WatchRequest(send_initial_state=True), metadata=md)
    first = next(call)  # the snapshot's bookmark: the stream is registered
    assert first.events[-1].type == spb.WATCH_EVENT_TYPE_BOOKMARK
    return call


def test_watch_streams_per_client_and_in_total(make_server: Any, tokens_file: Path) -> None:
    server = make_server(auth_tokens_file=str(tokens_file), max_watchers_per_client=3, max_watchers=5)
    alice, bob, carol = bearer(TOKENS["reader"]), bearer(TOKENS["writer"]), bearer(TOKENS["writer2"])
    with grpc.insecure_channel(server.target) as channel:
        stub = spb_grpc.JobStateServiceStub(channel)
        calls = [_open_watch(stub, alice) for _ in range(3)]
        with pytest.raises(grpc.RpcError) as info:
            _open_watch(stub, alice)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details(info.value)["metadata"]["limit"] == "max_watchers_per_client"
        # Another client is not affected by Alice's limit...
        calls += [_open_watch(stub, bob) for _ in range(2)]
        # ...until the server-wide limit.
        with pytest.raises(grpc.RpcError) as info:
            _open_watch(stub, carol)
        assert details(info.value)["metadata"]["limit"] == "max_watchers"
        # Streams that are open still deliver.
        stub.CreateJob(spb.CreateJobRequest(job_id="seen"), timeout=TIMEOUT, metadata=bob)
        for call in calls:
            assert next(call).events[0].job.job_id == "seen"
        calls.pop(0).cancel()
        wait_for(lambda: server.run(lambda: server.app.security.watchers.get("alice", 0)) == 2, what="release")
        calls.append(_open_watch(stub, alice))
        for call in calls:
            call.cancel()
        wait_for(lambda: server.run(lambda: server.store.stats().watchers) == 0, what="all watchers released")
        assert server.run(lambda: dict(server.app.security.watchers)) == {}


def test_store_limits(make_server: Any) -> None:
    server = make_server(
        history_size=5,
        max_message_bytes=64 * 1024,
        limits=rules.Limits(max_jobs=3, max_executions_per_job=2),
        max_jobs_per_client=0,  # one client here: the global limit is the one under test
    )
    with grpc.insecure_channel(server.target) as channel:
        stub = spb_grpc.JobStateServiceStub(channel)
        for i in range(3):
            stub.CreateJob(spb.CreateJobRequest(job_id=f"j{i}"), timeout=TIMEOUT)
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateJob(spb.CreateJobRequest(job_id="j3"), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details(info.value)["metadata"]["limit"] == "max_jobs"
        for node in ("n1", "n2"):
            req = spb.CreateExecutionRequest(job_id="j0", execution=pb.ExecutionState(node_id=node))
            stub.CreateExecution(req, timeout=TIMEOUT)
        req = spb.CreateExecutionRequest(job_id="j0", execution=pb.ExecutionState(node_id="n3"))
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateExecution(req, timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # 5 changes so far and 5 held; one more pushes revision 1 out of the history.
        stub.UpdateJobState(spb.UpdateJobStateRequest(job_id="j1", new_state=pb.JOB_STATE_TYPE_QUEUED), timeout=TIMEOUT)
        with pytest.raises(grpc.RpcError) as info:
            next(stub.Watch(spb.WatchRequest(start_revision=1), timeout=TIMEOUT))
        assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert details(info.value)["metadata"]["oldest_revision"] == "2"
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateJob(spb.CreateJobRequest(job_id="x", comment="c" * 100_000), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Nobody else was harmed by any of it.
        assert stub.ListJobs(spb.ListJobsRequest(), timeout=TIMEOUT).revision == 6


WATCHER_SCRIPT = """
import sys
import grpc
from jobstate.v1 import job_state_service_pb2 as spb, job_state_service_pb2_grpc as g
channel = grpc.insecure_channel(sys.argv[1])
for response in g.JobStateServiceStub(channel).Watch(spb.WatchRequest(send_initial_state=True)):
    print("ready", flush=True)
"""


def test_a_killed_client_s_watchers_are_released(make_server: Any) -> None:
    server = make_server()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("server", "client", "gen"))}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WATCHER_SCRIPT, server.target], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready"
        assert server.run(lambda: server.store.stats().watchers) == 3
        for p in procs:
            p.send_signal(signal.SIGKILL)
        wait_for(lambda: server.run(lambda: server.store.stats().watchers) == 0, what="killed watchers released")
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


def test_a_vanished_peer_is_found_by_keepalive(make_server: Any) -> None:
    """A peer whose packets stop (no FIN, no RST: a pulled cable) is dropped after a keepalive timeout."""
    from faultproxy import FaultProxy

    server = make_server(keepalive_seconds=0.5, keepalive_timeout_seconds=1.0)
    with FaultProxy(server.port) as proxy, grpc.insecure_channel(proxy.target) as channel:
        call = spb_grpc.JobStateServiceStub(channel).Watch(spb.WatchRequest(send_initial_state=True))
        next(call)
        assert server.run(lambda: server.store.stats().watchers) == 1
        proxy.blackhole()
        wait_for(lambda: server.run(lambda: server.store.stats().watchers) == 0, 15, "keepalive to drop the watcher")
        call.cancel()


def test_sighup_reloads_tokens_ending_only_the_revoked_streams(server_process: Any, tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{TOKENS['writer']} writer bob\n{TOKENS['reader']} reader alice\n")
    path.chmod(0o600)
    server = server_process(auth_tokens_file=str(path))
    with grpc.insecure_channel(server.target) as channel:
        stub = spb_grpc.JobStateServiceStub(channel)
        bob, alice, carol = bearer(TOKENS["writer"]), bearer(TOKENS["reader"]), bearer(TOKENS["writer2"])
        watch = stub.Watch(spb.WatchRequest(send_initial_state=True), metadata=alice, timeout=60)
        next(watch)
        bobs_watch = stub.Watch(spb.WatchRequest(send_initial_state=True), metadata=bob, timeout=60)
        next(bobs_watch)
        # Bob is revoked, Carol added; Alice keeps reading.
        path.write_text(f"{TOKENS['writer2']} writer carol\n{TOKENS['reader']} reader alice\n")
        server.signal(signal.SIGHUP)

        def carol_can_write() -> bool:
            try:
                stub.CreateJob(spb.CreateJobRequest(job_id="by-carol"), timeout=TIMEOUT, metadata=carol)
                return True
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                    raise
                return False

        wait_for(carol_can_write, what="the reload")
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateJob(spb.CreateJobRequest(job_id="by-bob"), timeout=TIMEOUT, metadata=bob)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Bob's open stream ended with the reason, at the reload (it waited for nothing else).
        with pytest.raises(grpc.RpcError) as info:
            next(bobs_watch)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "not valid" in (info.value.details() or "")
        # Alice's stream, opened before the reload, is still delivering.
        got: list[str] = []
        reader = threading.Thread(target=lambda: got.append(next(watch).events[0].job.job_id), daemon=True)
        reader.start()
        reader.join(10)
        assert got == ["by-carol"]
        # A broken file on reload keeps the last good table.
        path.write_text("this is not a tokens file\n")
        server.signal(signal.SIGHUP)
        wait_for(lambda: "tokens file not reloaded" in server.log(), what="the failed reload to be logged")
        stub.CreateJob(spb.CreateJobRequest(job_id="by-carol-2"), timeout=TIMEOUT, metadata=carol)
        watch.cancel()
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    log = server.log()
    assert "tokens file reloaded" in log
    for secret in TOKENS.values():
        assert secret not in log
