"""`buf curl` (npm @bufbuild/buf) against a running server through server reflection, with no .proto files.

This is what a person reaching for a generic gRPC tool sees: unary calls and the Watch stream in protobuf's JSON
mapping (enum names, int64 as strings), and errors with their google.rpc.ErrorInfo.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2

from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb
from jobstate.v1 import job_state_service_pb2_grpc as spb_grpc

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "node_modules" / ".bin" / "buf"
SERVICE = "jobstate.v1.JobStateService"
WAIT = 20.0  # seconds any one step may take; buf's first call also reads the schema by reflection


@pytest.fixture(scope="module", autouse=True)
def _buf_installed() -> None:
    if not BUF.exists():
        pytest.fail(f"{BUF} is missing: run `make node-deps` (make test does)")


def buf_args(target: str, method: str, body: dict[str, Any]) -> list[str]:
    return [
        str(BUF),
        "curl",
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        "--connect-timeout",
        "10",
        "-d",
        json.dumps(body),
        f"http://{target}/{SERVICE}/{method}",
    ]


def buf_curl(target: str, method: str, body: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(buf_args(target, method, body), capture_output=True, text=True, timeout=60, check=False)


def unary(target: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
    r = buf_curl(target, method, body)
    assert r.returncode == 0, f"buf curl {method} failed ({r.returncode}): {r.stderr}"
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def test_unary_calls_through_reflection(server: Any) -> None:
    created = unary(server.target, "CreateJob", {"job_id": "curl-1", "timeout": "60s", "comment": "via buf"})
    job = created["job"]
    assert job["jobId"] == "curl-1"
    assert job["state"] == "JOB_STATE_TYPE_NEW"  # enums by name
    assert job["version"] == "1"  # int64 as a JSON string
    assert created["revision"] == "1"
    assert job["timeoutAt"] > job["createTime"]  # RFC 3339, same length here: compares as text

    moved = unary(
        server.target,
        "UpdateJobState",
        {"job_id": "curl-1", "new_state": "JOB_STATE_TYPE_QUEUED", "condition": {"expected_version": 1}},
    )
    assert (moved["job"]["state"], moved["job"]["version"], moved["revision"]) == ("JOB_STATE_TYPE_QUEUED", "2", "2")

    got = unary(server.target, "GetJob", {"job_id": "curl-1"})
    assert (got["job"]["state"], got["job"]["version"], got["revision"]) == ("JOB_STATE_TYPE_QUEUED", "2", "2")
    # buf's JSON is the canonical mapping: parsed back, it is exactly what a Python client reads.
    with grpc.insecure_channel(server.target) as channel:
        direct = spb_grpc.JobStateServiceStub(channel).GetJob(spb.GetJobRequest(job_id="curl-1"), timeout=10)
    assert json_format.ParseDict(got, spb.GetJobResponse()) == direct


def test_error_carries_error_info(server: Any) -> None:
    r = buf_curl(server.target, "GetJob", {"job_id": "missing"})
    assert r.returncode != 0
    err = json.loads(r.stderr)
    assert err["code"] == "not_found"
    [detail] = err["details"]
    assert detail["type"] == "google.rpc.ErrorInfo"
    raw = detail["value"]
    info = error_details_pb2.ErrorInfo.FromString(base64.b64decode(raw + "=" * (-len(raw) % 4)))
    assert (info.domain, info.reason, dict(info.metadata)) == ("jobstate", "JOB_NOT_FOUND", {"job_id": "missing"})


def end_group(proc: subprocess.Popen[str]) -> None:
    """Ends the process group ``proc`` leads (started with ``start_new_session``), politely then firmly."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


class StreamReader:
    """Reads the JSON messages a streaming `buf curl` prints (pretty-printed, one after another) into a queue."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="buf-curl-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self.proc.stdout is not None
        decoder = json.JSONDecoder()
        buf = ""
        for line in self.proc.stdout:  # buf writes each message as it arrives
            buf += line
            while True:
                text = buf.lstrip()
                try:
                    message, end = decoder.raw_decode(text)
                except json.JSONDecodeError:
                    break  # the message is not complete yet
                self.messages.put(message)
                buf = text[end:]
        self.messages.put(None)  # the stream ended

    def join(self) -> None:
        self._thread.join(WAIT)

    def next(self) -> dict[str, Any]:
        try:
            message = self.messages.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"buf curl printed no message within {WAIT}s") from None
        if message is None:
            stderr = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"buf curl's stream ended early: {stderr}")
        return message

    def events(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` events (bookmarks included), checking no response splits or reorders them."""
        out: list[dict[str, Any]] = []
        while len(out) < n:
            response = self.next()
            events = response["events"]
            assert response["revision"] == events[-1]["revision"]
            out.extend(events)
        assert len(out) == n, f"more events than expected: {out[n:]}"
        return out


def test_watch_stream_through_reflection(server: Any) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = spb_grpc.JobStateServiceStub(channel)
        stub.CreateJob(spb.CreateJobRequest(job_id="before"), timeout=10)
        proc = subprocess.Popen(
            buf_args(server.target, "Watch", {"send_initial_state": True}),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # npm's `buf` is a Node wrapper that runs the real binary as its child: a group of their own lets
            # the test end both at once.
            start_new_session=True,
        )
        reader = StreamReader(proc)
        try:
            # The snapshot and its bookmark: after it the watcher is registered, so the writes below reach it.
            initial, bookmark = reader.events(2)
            assert (initial["type"], initial["revision"]) == ("WATCH_EVENT_TYPE_INITIAL", "1")
            assert (initial["job"]["jobId"], initial["job"]["version"]) == ("before", "1")
            assert (bookmark["type"], bookmark["revision"]) == ("WATCH_EVENT_TYPE_BOOKMARK", "1")

            stub.CreateJob(spb.CreateJobRequest(job_id="during"), timeout=10)
            stub.UpdateJobState(
                spb.UpdateJobStateRequest(
                    job_id="before",
                    new_state=pb.JOB_STATE_TYPE_QUEUED,
                    condition=spb.JobCondition(expected_version=1),
                ),
                timeout=10,
            )
            stub.CreateExecution(
                spb.CreateExecutionRequest(job_id="during", execution=pb.ExecutionState(node_id="n1")), timeout=10
            )
            stub.DeleteJob(spb.DeleteJobRequest(job_id="before", expected_version=2), timeout=10)

            events = reader.events(4)
            seen = [
                (e["type"], e["revision"], e["job"]["jobId"], e["job"]["version"], e["job"]["state"]) for e in events
            ]
            assert seen == [
                ("WATCH_EVENT_TYPE_CREATED", "2", "during", "1", "JOB_STATE_TYPE_NEW"),
                ("WATCH_EVENT_TYPE_UPDATED", "3", "before", "2", "JOB_STATE_TYPE_QUEUED"),
                ("WATCH_EVENT_TYPE_UPDATED", "4", "during", "2", "JOB_STATE_TYPE_NEW"),
                ("WATCH_EVENT_TYPE_DELETED", "5", "before", "2", "JOB_STATE_TYPE_QUEUED"),
            ]
            assert [x["nodeId"] for x in events[2]["job"]["executions"]] == ["n1"]
            assert proc.poll() is None  # still watching
        finally:
            end_group(proc)
            reader.join()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
