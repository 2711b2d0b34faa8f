"""The Node.js client in tests/node/ (built from protos/ alone) against a real server.

It proves the contract holds for another language: create a job, move it through its states with
compare-and-set, create and update an execution, see every change arrive on two watches with the right
versions and revisions, and read a VERSION_MISMATCH ErrorInfo out of grpc-status-details-bin.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest

from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb
from jobstate.v1 import job_state_service_pb2_grpc as spb_grpc

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "tests" / "node" / "scenario.js"


@pytest.fixture(scope="module")
def node() -> str:
    exe = shutil.which("node")
    if exe is None:
        pytest.fail("node is not installed: the cross-language test needs Node.js (see the README)")
    if not (ROOT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("node_modules is missing: run `make node-deps` (make test does)")
    return exe


def run_scenario(node: str, target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [node, str(SCENARIO), target], capture_output=True, text=True, timeout=90, check=False, cwd=ROOT
    )


def test_node_client_drives_a_job_and_watches_it(node: str, server: Any) -> None:
    r = run_scenario(node, server.target)
    assert r.returncode == 0, f"node client failed:\n{r.stdout}\n{r.stderr}"
    lines = r.stdout.splitlines()
    assert lines[-1].startswith("node client: ")
    assert "checks passed" in lines[-1]
    assert int(lines[-1].split()[2]) == sum(1 for line in lines if line.startswith("ok ")) >= 30
    for must in (
        "stale expected_version: ErrorInfo reason VERSION_MISMATCH",
        "VERSION_MISMATCH metadata names current_version",
        "live watch: 7 events with the write revisions, versions 1..7",
        "watch from the create revision: 7 events",
        "update execution (masked, CAS): BID_ACCEPTED v2",
        "list: the completed job is listed",
        "history: 7 entries with the write revisions and versions",
        "delete: the last state comes back",
        "get after delete: ErrorInfo reason JOB_NOT_FOUND",
    ):
        assert any(must in line for line in lines), f"missing check {must!r} in:\n{r.stdout}"

    # What Node wrote is what a Python client reads: one job, completed at version 7, its execution completed.
    with grpc.insecure_channel(server.target) as channel:
        listed = spb_grpc.JobStateServiceStub(channel).ListJobs(spb.ListJobsRequest(), timeout=10)
    [job] = listed.jobs
    assert job.job_id.startswith("node-")
    # Revisions 8 to 10: the scratch job Node created, queued and deleted.
    assert (job.state, job.version, listed.revision) == (pb.JOB_STATE_TYPE_COMPLETED, 7, 10)
    [ex] = job.executions
    assert (ex.node_id, ex.state, ex.version, ex.run_output.stdout) == (
        "node-a",
        pb.EXECUTION_STATE_TYPE_COMPLETED,
        3,
        "hello from node\n",
    )
    assert dict(ex.published_results.metadata) == {"lang": "js"}


def test_node_client_reports_failure(node: str) -> None:
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run_scenario(node, f"127.0.0.1:{port}")
    assert r.returncode == 1
    assert r.stderr.startswith("FAIL: "), r.stderr
    assert "UNAVAILABLE" in r.stderr
