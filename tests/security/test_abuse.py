"""Hostile clients (issue 13): what one client can cost the server and the others, and what reaches the log.

Each test here failed on the server before the fix it names: TLS without client authentication on a public
address, a token echoed from a broken tokens file, a flood of refusals written line by line, global limits
taken by one client, unmetered reads, uncounted health watches.
"""

from __future__ import annotations

import logging
import math
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pki import PKI
from secutil import TOKENS, bearer, client_env, free_port, wait_for
from test_limits import details

from jobstate.server import rules
from jobstate.server.main import ServerConfig, check_transport
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb
from jobstate.v1 import job_state_service_pb2_grpc as spb_grpc

TIMEOUT = 5

CLI = [sys.executable, "-m", "jobstate"]
RUN_TIMEOUT = 60.0


def serve_once(*args: str) -> subprocess.CompletedProcess[str]:
    """``jobstate serve ARGS`` expected to refuse to start: it must exit by itself."""
    env = {k: v for k, v in client_env().items() if k not in ("JOBSTATE_TOKEN", "JOBSTATE_TARGET")}
    return subprocess.run(
        [*CLI, "serve", "--port", str(free_port()), "--grace", "1s", *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


# --- item 5: TLS alone does not say who may call ------------------------------------------------------------


def test_tls_without_client_authentication_on_a_public_address_is_refused(pki: PKI) -> None:
    tls = ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)]
    p = serve_once("--host", "0.0.0.0", *tls)
    assert p.returncode == 1, p.stderr
    assert "refusing to serve 0.0.0.0 with TLS but no client authentication" in p.stderr
    for flag in ("--auth-tokens", "--tls-client-ca", "--insecure"):
        assert flag in p.stderr


def test_the_http_listener_is_held_to_the_same_rule(pki: PKI) -> None:
    """gRPC on loopback does not make a public HTTP listener safe: HTTPS that asks no caller for a credential,
    or plaintext HTTP, off loopback is refused at start as the gRPC port would be."""
    tls = ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)]
    https = serve_once("--http-port", str(free_port()), "--http-host", "0.0.0.0", *tls)
    assert https.returncode == 1, https.stderr
    assert "refusing to serve HTTP 0.0.0.0 with TLS but no client authentication" in https.stderr
    plain = serve_once("--http-port", str(free_port()), "--http-host", "0.0.0.0")
    assert plain.returncode == 1, plain.stderr
    assert "refusing to serve plaintext HTTP on 0.0.0.0" in plain.stderr
    # Each way of saying who may call is accepted (checked without binding: tests stay on loopback).
    base = ServerConfig(host="0.0.0.0", tls_cert=str(pki.server.cert), tls_key=str(pki.server.key))
    for extra in ({"auth_tokens_file": "tokens"}, {"tls_client_ca": str(pki.ca)}, {"insecure": True}):
        assert check_transport(ServerConfig(**{**base.__dict__, **extra})) is not None
    # On loopback, TLS alone is still fine (a local proxy or sidecar in front).
    assert check_transport(ServerConfig(tls_cert=str(pki.server.cert), tls_key=str(pki.server.key))) is not None


# --- item 10: a broken tokens file never echoes a token -----------------------------------------------------

SWAPPED = "swp-TOKEN-7f3a9c1e5b2d8046"


def swapped_tokens_text() -> str:
    """A tokens file whose second line has its columns swapped: the token sits where the role should be."""
    return f"{TOKENS['admin']} admin ops\nadmin {SWAPPED} ops2\n"


def test_a_swapped_tokens_line_at_start_names_the_line_not_the_token(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(swapped_tokens_text())
    tokens.chmod(0o600)
    p = serve_once("--auth-tokens", str(tokens))
    assert p.returncode == 1
    assert "line 2" in p.stderr
    for secret in (SWAPPED, TOKENS["admin"]):
        assert secret not in p.stderr + p.stdout
        assert secret[:12] not in p.stderr + p.stdout


def test_a_swapped_tokens_line_on_sighup_names_the_line_not_the_token(server_process: Any, tokens_file: Path) -> None:
    server = server_process(auth_tokens_file=str(tokens_file))
    tokens_file.write_text(swapped_tokens_text())
    server.signal(signal.SIGHUP)
    wait_for(lambda: "tokens file not reloaded" in server.log(), what="the reload's refusal in the log")
    log = server.log()
    assert "line 2" in log
    assert SWAPPED not in log
    assert SWAPPED[:12] not in log


# --- item 4: no one client takes a whole global limit -------------------------------------------------------


def test_the_default_share_leaves_room_for_the_others() -> None:
    from jobstate.server.security import client_share  # here: the module's other tests run on any server

    assert [client_share(n) for n in (0, 1, 2, 10, 50, 10_000)] == [0, 1, 1, 9, 45, 9_000]


def test_one_writer_cannot_take_every_job(make_server: Any, tokens_file: Path) -> None:
    server = make_server(auth_tokens_file=str(tokens_file), limits=rules.Limits(max_jobs=50))
    bob, carol = bearer(TOKENS["writer"]), bearer(TOKENS["writer2"])
    with grpc.insecure_channel(server.target) as channel:
        stub = spb_grpc.JobStateServiceStub(channel)
        for i in range(45):
            stub.CreateJob(spb.CreateJobRequest(job_id=f"bob-{i}"), timeout=TIMEOUT, metadata=bob)
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateJob(spb.CreateJobRequest(job_id="bob-45"), timeout=TIMEOUT, metadata=bob)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details(info.value)["metadata"]["limit"] == "max_jobs_per_client"
        # The second writer still creates, up to the global limit.
        for i in range(5):
            stub.CreateJob(spb.CreateJobRequest(job_id=f"carol-{i}"), timeout=TIMEOUT, metadata=carol)
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateJob(spb.CreateJobRequest(job_id="carol-5"), timeout=TIMEOUT, metadata=carol)
        assert details(info.value)["metadata"]["limit"] == "max_jobs"
        # A job deleted (by anyone) no longer counts for its creator.
        stub.DeleteJob(spb.DeleteJobRequest(job_id="bob-0"), timeout=TIMEOUT, metadata=carol)
        stub.CreateJob(spb.CreateJobRequest(job_id="bob-again"), timeout=TIMEOUT, metadata=bob)


def _open_watch(stub: spb_grpc.JobStateServiceStub, md: Any = None) -> Any:
    call = stub.Watch(spb.WatchRequest(send_initial_state=True), metadata=md)
    assert next(call).events[-1].type == spb.WATCH_EVENT_TYPE_BOOKMARK  # registered
    return call


def _open_health_watch(channel: grpc.Channel, md: Any = None) -> Any:
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), metadata=md)
    assert next(call).status == health_pb2.HealthCheckResponse.SERVING  # registered
    return call


def test_one_client_cannot_take_every_watch_stream(make_server: Any, tokens_file: Path) -> None:
    server = make_server(auth_tokens_file=str(tokens_file), max_watchers=10)
    alice, bob = bearer(TOKENS["reader"]), bearer(TOKENS["writer"])
    with grpc.insecure_channel(server.target) as channel:
        stub = spb_grpc.JobStateServiceStub(channel)
        calls = [_open_watch(stub, alice) for _ in range(9)]
        with pytest.raises(grpc.RpcError) as info:
            _open_watch(stub, alice)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details(info.value)["metadata"]["limit"] == "max_watchers_per_client"
        calls.append(_open_watch(stub, bob))
        for call in calls:
            call.cancel()


# --- item 8: Health.Watch streams count as watch streams ----------------------------------------------------


def test_health_watches_are_counted_under_the_watch_limits(make_server: Any, tokens_file: Path) -> None:
    server = make_server(auth_tokens_file=str(tokens_file), max_watchers=4)
    bob = bearer(TOKENS["writer"])
    with grpc.insecure_channel(server.target) as channel:
        stub = spb_grpc.JobStateServiceStub(channel)
        # No credential needed; this caller is known by its address, and gets its share (3 of 4).
        health = [_open_health_watch(channel) for _ in range(3)]
        with pytest.raises(grpc.RpcError) as info:
            _open_health_watch(channel)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details(info.value)["metadata"]["limit"] == "max_watchers_per_client"
        # Health and job watches share the server's total.
        job_watch = _open_watch(stub, bob)
        with pytest.raises(grpc.RpcError) as info:
            _open_watch(stub, bob)
        assert details(info.value)["metadata"]["limit"] == "max_watchers"
        with pytest.raises(grpc.RpcError) as info:
            _open_health_watch(channel, bob)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # A health watch that ends frees its place.
        health.pop().cancel()
        wait_for(lambda: server.run(lambda: server.app.security.watcher_total) == 3, what="the health watch released")
        health.append(_open_health_watch(channel))
        # The plain health check stays open to all.
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        for call in [*health, job_watch]:
            call.cancel()
        wait_for(lambda: server.run(lambda: server.app.security.watcher_total) == 0, what="every watch released")


# --- item 3: reads are metered per client, and a filtered list walks an index -------------------------------


def test_reads_are_rate_limited_per_client(make_server: Any, tokens_file: Path) -> None:
    server = make_server(auth_tokens_file=str(tokens_file), read_rate_per_client=0.5, read_burst_per_client=3)
    alice, bob = bearer(TOKENS["reader"]), bearer(TOKENS["writer"])
    with grpc.insecure_channel(server.target) as channel:
        stub = spb_grpc.JobStateServiceStub(channel)
        stub.CreateJob(spb.CreateJobRequest(job_id="j"), timeout=TIMEOUT, metadata=bob)  # writes: not reads
        for _ in range(3):
            stub.GetJob(spb.GetJobRequest(job_id="j"), timeout=TIMEOUT, metadata=alice)
        for call in (
            lambda: stub.ListJobs(spb.ListJobsRequest(), timeout=TIMEOUT, metadata=alice),
            lambda: next(stub.Watch(spb.WatchRequest(), timeout=TIMEOUT, metadata=alice)),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            got = details(info.value)
            assert got["reason"] == "RATE_LIMITED"
            assert 0 < got["retry_delay"] <= 2.0
        # Another client reads on.
        assert stub.GetJob(spb.GetJobRequest(job_id="j"), timeout=TIMEOUT, metadata=bob).job.job_id == "j"


def test_a_filtered_list_over_grpc_visits_only_matching_jobs(make_server: Any) -> None:
    server = make_server()
    store = server.store

    async def fill() -> None:
        for i in range(5000):
            await store.create_job(f"j{i:05d}")
        await store.update_job_state("j04321", pb.JOB_STATE_TYPE_COMPLETED)

    server.call(fill())
    before = server.run(lambda: store.scan_visits)
    with grpc.insecure_channel(server.target) as channel:
        stub = spb_grpc.JobStateServiceStub(channel)
        page = stub.ListJobs(spb.ListJobsRequest(states=[pb.JOB_STATE_TYPE_COMPLETED], page_size=1), timeout=TIMEOUT)
    assert [j.job_id for j in page.jobs] == ["j04321"]
    assert page.next_page_token == ""
    assert server.run(lambda: store.scan_visits) - before == 1


# --- item 9: a flood of refusals is a few log lines, with counts --------------------------------------------


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def refusals(self) -> list[logging.LogRecord]:
        return [r for r in self.records if r.getMessage() in ("call refused", "calls refused")]

    def counted(self) -> int:
        return sum(getattr(r, "refused", 1) for r in self.refusals())


@pytest.fixture
def security_log() -> Iterator[_Lines]:
    lines = _Lines()
    logger = logging.getLogger("jobstate.server.security")
    level = logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)


def test_refused_calls_are_logged_once_per_client_per_interval(
    make_server: Any, tokens_file: Path, security_log: _Lines
) -> None:
    interval = 1.0
    server = make_server(auth_tokens_file=str(tokens_file), refusal_log_interval=interval)
    calls = 500
    start = time.monotonic()
    with grpc.insecure_channel(server.target) as channel:
        stub = spb_grpc.JobStateServiceStub(channel)
        for i in range(calls):
            with pytest.raises(grpc.RpcError) as info:
                stub.GetJob(spb.GetJobRequest(job_id=f"j{i}"), timeout=TIMEOUT)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Every refusal is accounted for once its interval ends: the first in full, the rest as a count.
    wait_for(lambda: security_log.counted() == calls, what="every refusal counted in the log")
    elapsed = time.monotonic() - start
    lines = security_log.refusals()
    assert len(lines) <= 2 * (math.ceil(elapsed / interval) + 1), len(lines)
    assert len(lines) < calls / 10
    summary = [r for r in lines if r.getMessage() == "calls refused"]
    assert summary
    assert all(r.__dict__["client"] == "127.0.0.1" for r in lines)
    assert all(r.__dict__["reasons"] == f"UNAUTHENTICATED={r.__dict__['refused']}" for r in summary)
