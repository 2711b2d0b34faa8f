"""Connect unary calls over HTTP/1.1: JSON and binary, POST and GET, through the same service as gRPC."""

from __future__ import annotations

import base64
import json
import urllib.parse
from typing import Any

from connectutil import SERVICE, error_info, ok_json, unary

from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb


def test_json_write_and_read_are_the_grpc_service(http: Any) -> None:
    created = ok_json(unary(http.client, "CreateJob", {"jobId": "j1", "comment": "from curl"}))
    assert created["job"]["jobId"] == "j1"
    assert created["job"]["state"] == "JOB_STATE_TYPE_NEW"
    assert created["job"]["version"] == "1"  # int64 is a string in proto JSON
    assert created["revision"] == "1"
    moved = ok_json(
        unary(
            http.client,
            "UpdateJobState",
            {"jobId": "j1", "newState": "JOB_STATE_TYPE_QUEUED", "condition": {"expectedVersion": "1"}},
        )
    )
    assert moved["job"]["state"] == "JOB_STATE_TYPE_QUEUED"
    # gRPC sees the HTTP write: one store behind both doors.
    got = http.grpc.GetJob(spb.GetJobRequest(job_id="j1"))
    assert got.job.state == pb.JOB_STATE_TYPE_QUEUED
    assert got.job.version == 2
    # and HTTP sees a gRPC write
    http.grpc.CreateJob(spb.CreateJobRequest(job_id="j2"))
    listed = ok_json(unary(http.client, "ListJobs", {}))
    assert [j["jobId"] for j in listed["jobs"]] == ["j1", "j2"]


def test_binary_unary(http: Any) -> None:
    r = unary(http.client, "CreateJob", spb.CreateJobRequest(job_id="bin"))
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/proto"
    created = spb.CreateJobResponse.FromString(r.content)
    assert created.job.job_id == "bin"
    assert created.job.version == 1
    r = unary(http.client, "GetJob", spb.GetJobRequest(job_id="nope"))
    # A Connect unary error is JSON whatever the request's codec.
    assert r.status_code == 404
    assert r.json()["code"] == "not_found"
    assert error_info(r.json()).reason == "JOB_NOT_FOUND"


def test_gzip_request_and_response(http: Any) -> None:
    import gzip

    body = gzip.compress(json.dumps({"jobId": "gz"}).encode())
    r = http.client.post(
        SERVICE + "CreateJob",
        content=body,
        headers={"content-type": "application/json", "content-encoding": "gzip", "accept-encoding": "gzip"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["job"]["jobId"] == "gz"  # httpx undoes the response's gzip


def _get(http: Any, method: str, message: dict[str, Any], **params: str) -> Any:
    query = urllib.parse.urlencode({"encoding": "json", "message": json.dumps(message), **params})
    return http.client.get(f"{SERVICE}{method}?{query}")


def test_get_reads(http: Any) -> None:
    ok_json(unary(http.client, "CreateJob", {"jobId": "g1"}))
    ok_json(unary(http.client, "UpdateJobState", {"jobId": "g1", "newState": "JOB_STATE_TYPE_QUEUED"}))
    job = ok_json(_get(http, "GetJob", {"jobId": "g1"}))
    assert job["job"]["state"] == "JOB_STATE_TYPE_QUEUED"
    listed = ok_json(_get(http, "ListJobs", {"states": ["JOB_STATE_TYPE_QUEUED"]}))
    assert [j["jobId"] for j in listed["jobs"]] == ["g1"]
    history = ok_json(_get(http, "GetJobHistory", {"jobId": "g1"}))
    assert [e["version"] for e in history["entries"]] == ["1", "2"]
    # Binary in the URL, base64: what connect-web sends for a GET.
    b64 = base64.urlsafe_b64encode(spb.GetJobRequest(job_id="g1").SerializeToString()).decode().rstrip("=")
    r = http.client.get(f"{SERVICE}GetJob?encoding=proto&base64=1&message={b64}")
    assert r.status_code == 200
    assert spb.GetJobResponse.FromString(r.content).job.job_id == "g1"
    # A read's error over GET is the same error.
    r = _get(http, "GetJob", {"jobId": "missing"})
    assert r.status_code == 404
    assert error_info(r.json()).reason == "JOB_NOT_FOUND"


def test_get_is_refused_for_writes(http: Any) -> None:
    before = http.revision()
    r = _get(http, "CreateJob", {"jobId": "sneaky"})
    assert r.status_code == 405
    assert "POST" in r.headers["allow"]
    assert http.revision() == before
    assert http.grpc.ListJobs(spb.ListJobsRequest()).jobs == []
