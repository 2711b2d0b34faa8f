"""Authentication and roles: every RPC x every role x no token / bad token / right token, the ErrorInfo of
each refusal, open health and reflection, tokens kept out of logs, and the tokens file's format."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from secutil import BAD_TOKEN, TOKENS, bearer

from jobstate.server.main import JsonFormatter, TextFormatter
from jobstate.server.security import Role, TokenTable
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb
from jobstate.v1 import job_state_service_pb2_grpc as spb_grpc

TIMEOUT = 5
OK = grpc.StatusCode.OK
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED

# Each RPC with a request that succeeds against the fixture's store (job "seed" with execution "e1" on n1).
# Writes touch their own job per call, so the order of the table does not matter.
Call = Callable[[spb_grpc.JobStateServiceStub, Any, str], Any]


def _watch(stub: spb_grpc.JobStateServiceStub, md: Any, _: str) -> Any:
    stream = stub.Watch(spb.WatchRequest(send_initial_state=True), timeout=TIMEOUT, metadata=md)
    try:
        return next(iter(stream))
    finally:
        stream.cancel()


RPCS: dict[str, tuple[Role, Call]] = {
    "GetJob": (Role.READER, lambda s, md, _: s.GetJob(spb.GetJobRequest(job_id="seed"), timeout=TIMEOUT, metadata=md)),
    "ListJobs": (Role.READER, lambda s, md, _: s.ListJobs(spb.ListJobsRequest(), timeout=TIMEOUT, metadata=md)),
    "GetJobHistory": (
        Role.READER,
        lambda s, md, _: s.GetJobHistory(spb.GetJobHistoryRequest(job_id="seed"), timeout=TIMEOUT, metadata=md),
    ),
    "Watch": (Role.READER, _watch),
    "CreateJob": (
        Role.WRITER,
        lambda s, md, tag: s.CreateJob(spb.CreateJobRequest(job_id=f"new-{tag}"), timeout=TIMEOUT, metadata=md),
    ),
    "UpdateJobState": (
        Role.WRITER,
        lambda s, md, tag: s.UpdateJobState(
            spb.UpdateJobStateRequest(job_id=f"job-{tag}", new_state=pb.JOB_STATE_TYPE_QUEUED),
            timeout=TIMEOUT,
            metadata=md,
        ),
    ),
    "CreateExecution": (
        Role.WRITER,
        lambda s, md, tag: s.CreateExecution(
            spb.CreateExecutionRequest(job_id=f"job-{tag}", execution=pb.ExecutionState(node_id="n2")),
            timeout=TIMEOUT,
            metadata=md,
        ),
    ),
    "UpdateExecution": (
        Role.WRITER,
        lambda s, md, tag: s.UpdateExecution(
            spb.UpdateExecutionRequest(
                job_id=f"job-{tag}", compute_reference="e1", execution=pb.ExecutionState(status="running")
            ),
            timeout=TIMEOUT,
            metadata=md,
        ),
    ),
    "DeleteJob": (
        Role.WRITER,
        lambda s, md, tag: s.DeleteJob(spb.DeleteJobRequest(job_id=f"del-{tag}"), timeout=TIMEOUT, metadata=md),
    ),
}
ROLES = {"reader": Role.READER, "writer": Role.WRITER, "admin": Role.ADMIN}
CREDENTIALS = ["none", "bad", "malformed", *ROLES]


def expected(method: str, credential: str) -> grpc.StatusCode:
    if credential not in ROLES:
        return UNAUTH
    return OK if ROLES[credential] >= RPCS[method][0] else DENIED


def metadata_of(credential: str) -> Any:
    if credential == "none":
        return ()
    if credential == "bad":
        return bearer(BAD_TOKEN)
    if credential == "malformed":
        return (("authorization", f"Basic {TOKENS['admin']}"),)
    return bearer(TOKENS[credential])


def error_info(exc: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None, "the refusal carries no rich status"
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    raise AssertionError("no ErrorInfo in the status details")


def seed(stub: spb_grpc.JobStateServiceStub, tags: list[str]) -> None:
    md = bearer(TOKENS["admin"])
    stub.CreateJob(spb.CreateJobRequest(job_id="seed"), timeout=TIMEOUT, metadata=md)
    for tag in tags:
        stub.CreateJob(spb.CreateJobRequest(job_id=f"job-{tag}"), timeout=TIMEOUT, metadata=md)
        stub.CreateExecution(
            spb.CreateExecutionRequest(
                job_id=f"job-{tag}", execution=pb.ExecutionState(node_id="n1", compute_reference="e1")
            ),
            timeout=TIMEOUT,
            metadata=md,
        )
        stub.CreateJob(spb.CreateJobRequest(job_id=f"del-{tag}"), timeout=TIMEOUT, metadata=md)


def test_every_rpc_every_role_every_credential(make_server: Any, tokens_file: Path) -> None:
    server = make_server(auth_tokens_file=str(tokens_file))
    cases = [(m, c) for m in RPCS for c in CREDENTIALS]
    tags = [f"{m}-{c}" for m, c in cases]
    with grpc.insecure_channel(server.target) as channel:
        stub = spb_grpc.JobStateServiceStub(channel)
        seed(stub, tags)
        before = stub.ListJobs(spb.ListJobsRequest(), timeout=TIMEOUT, metadata=bearer(TOKENS["admin"])).revision
        wrong: list[str] = []
        accepted_writes = 0
        for method, credential in cases:
            want = expected(method, credential)
            try:
                RPCS[method][1](stub, metadata_of(credential), f"{method}-{credential}")
                got = OK
            except grpc.RpcError as exc:
                got = exc.code()
                if got in (UNAUTH, DENIED):
                    info = error_info(exc)
                    assert info.domain == "jobstate"
                    assert info.reason == got.name, (method, credential, info.reason)
            if got != want:
                wrong.append(f"{method} as {credential}: {got.name}, want {want.name}")
            if got == OK and RPCS[method][0] == Role.WRITER:
                accepted_writes += 1
        assert not wrong, "\n".join(wrong)
        after = stub.ListJobs(spb.ListJobsRequest(), timeout=TIMEOUT, metadata=bearer(TOKENS["admin"])).revision
        # Refused writes changed nothing: the revision moved once per accepted write and no more.
        assert after - before == accepted_writes
        print(f"auth table: {len(cases)} calls ({len(RPCS)} RPCs x {len(CREDENTIALS)} credentials)")


def test_health_and_reflection_need_no_token(make_server: Any, tokens_file: Path) -> None:
    server = make_server(auth_tokens_file=str(tokens_file))
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert "jobstate.v1.JobStateService" in names


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines = io.StringIO()
        self.text_format = TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.json_format = JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.write(self.text_format.format(record) + "\n" + self.json_format.format(record) + "\n")


def test_tokens_never_appear_in_logs(make_server: Any, tokens_file: Path, tmp_path: Path) -> None:
    capture = _Capture()
    loggers = [logging.getLogger(), logging.getLogger("jobstate"), logging.getLogger("grpc")]
    saved = [(lg, lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(capture)
        lg.setLevel(logging.DEBUG)
    try:
        server = make_server(auth_tokens_file=str(tokens_file))
        with grpc.insecure_channel(server.target) as channel:
            stub = spb_grpc.JobStateServiceStub(channel)
            for method, credential in [(m, c) for m in RPCS for c in CREDENTIALS]:
                with contextlib.suppress(grpc.RpcError):
                    RPCS[method][1](stub, metadata_of(credential), f"log-{method}-{credential}")
        # A broken tokens file on reload is reported without echoing the line it failed on.
        tokens_file.write_text(f"{TOKENS['admin']} superuser\n{TOKENS['reader']}\n")
        assert server.run(server.app.security.reload) is False
    finally:
        for lg, level, propagate in saved:
            lg.removeHandler(capture)
            lg.setLevel(level)
            lg.propagate = propagate
    text = capture.lines.getvalue()
    assert "call refused" in text, "the capture saw no refusal: it captured nothing useful"
    assert "tokens file not reloaded" in text
    for secret in [*TOKENS.values(), BAD_TOKEN]:
        assert secret not in text
        assert secret[:12] not in text


def test_tokens_file_format() -> None:
    table = TokenTable.parse(
        "# comment\n\n"
        "aaaaaaaaaaaaaaaa1 reader alice\n"
        "aaaaaaaaaaaaaaaa2 WRITER\n"
        "aaaaaaaaaaaaaaaa3 admin root # trailing\n"
        "cert:node-7 writer compute-7\n"
    )
    alice = table.lookup("aaaaaaaaaaaaaaaa1")
    assert alice is not None
    assert (alice.name, alice.role) == ("alice", Role.READER)
    unnamed = table.lookup("aaaaaaaaaaaaaaaa2")
    assert unnamed is not None
    assert unnamed.role == Role.WRITER
    assert unnamed.name.startswith("token-")
    assert "aaaa" not in unnamed.name
    assert table.lookup("aaaaaaaaaaaaaaaa") is None
    assert table.lookup("") is None
    assert table.certs["node-7"].role == Role.WRITER
    for bad, message in [
        ("aaaaaaaaaaaaaaaa1 owner", "not a role"),
        ("aaaaaaaaaaaaaaaa1", "fields"),
        ("s3cr3t reader", "shorter than"),
        ("aaaaaaaaaaaaaaaa1 reader\naaaaaaaaaaaaaaaa1 writer", "twice"),
        ("cert: reader", "CN"),
    ]:
        with pytest.raises(ValueError, match=message) as info:
            TokenTable.parse(bad, "tokens")
        secret = bad.split()[0]
        if not secret.startswith("cert:"):
            assert secret not in str(info.value)
