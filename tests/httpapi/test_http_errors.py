"""Every error row over HTTP: the Connect code and HTTP status of the one table, and the same ErrorInfo (reason and
metadata) as over gRPC, with nothing changed in the store.

The rows are the gRPC test's own (tests/integration/test_errors_raw.py ROWS): each row's call is recorded instead
of sent, then made over Connect in JSON and in binary.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import grpc
import pytest
from connectrpc._protocol import ConnectWireError
from connectrpc.code import Code
from connectutil import error_info, unary
from google.protobuf import json_format, message
from google.rpc import error_details_pb2

from jobstate.server import errors, rules, service
from jobstate.server.http_door import connect_error
from jobstate.v1 import job_state_service_pb2 as spb

_spec = importlib.util.spec_from_file_location(
    "errors_raw_rows", Path(__file__).resolve().parent.parent / "integration" / "test_errors_raw.py"
)
assert _spec is not None
assert _spec.loader is not None
raw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(raw)


class _Recorder:
    """Stands in for the gRPC stub: ``rec.GetJob(req)`` records ("GetJob", req)."""

    def __getattr__(self, name: str) -> Any:
        def record(request: message.Message) -> tuple[str, message.Message]:
            return name, request

        return record


def _wire_of_code(code: grpc.StatusCode) -> service.Wire:
    wires = {w for w in service.ERRORS.values() if w.grpc == code}
    assert len(wires) == 1, f"{code} maps to {wires}"
    return wires.pop()


@pytest.mark.parametrize("codec", ["json", "proto"])
@pytest.mark.parametrize(("call", "code", "reason", "metadata"), [pytest.param(*r[1:], id=r[0]) for r in raw.ROWS])
def test_error_rows_over_connect(
    http: Any, codec: str, call: Any, code: grpc.StatusCode, reason: str, metadata: dict[str, str]
) -> None:
    raw._setup(http.grpc)
    revision = http.revision()
    method, request = call(_Recorder())
    body: Any = json_format.MessageToDict(request) if codec == "json" else request
    r = unary(http.client, method, body)
    wire = _wire_of_code(code)
    assert r.status_code == wire.http, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()
    assert err["code"] == wire.connect
    assert err["message"]
    info = error_info(err)
    assert info.reason == reason
    assert info.domain == "jobstate"
    for key, value in metadata.items():
        assert info.metadata[key] == value, (key, dict(info.metadata))
    # For a person reading curl's output, the same ErrorInfo decoded ("debug", optional in Connect).
    debug = err["details"][0]["debug"]
    assert debug["reason"] == reason
    assert debug.get("metadata", {}) == dict(info.metadata)
    assert http.revision() == revision
    assert http.grpc.GetJob(spb.GetJobRequest(job_id="j1")).job.version == 2


def test_table_agrees_with_connect() -> None:
    """Each row's Connect code is the gRPC code's Connect name, and its HTTP status the one Connect gives it."""
    for cls, wire in {**service.ERRORS, errors.JobStateError: service.INTERNAL}.items():
        code = Code(wire.connect)
        assert wire.connect == wire.grpc.name.lower().replace("cancelled", "canceled"), cls
        assert ConnectWireError(code, "m", ()).to_http_status().code == wire.http, cls
        try:
            exc = cls("message", k="v")
        except TypeError:
            exc = cls("message", retry_after=0.5)  # type: ignore[call-arg]
        ce = connect_error(exc)
        assert ce.code == code
        assert ce.details[0].type_name == "google.rpc.ErrorInfo"
        info = error_details_pb2.ErrorInfo.FromString(ce.details[0].message_bytes)
        assert info.reason == exc.reason


def test_limit_and_rate_rows(make_http: Any) -> None:
    limited = make_http(limits=rules.Limits(max_jobs=1))
    assert unary(limited.client, "CreateJob", {"jobId": "a"}).status_code == 200
    r = unary(limited.client, "CreateJob", {"jobId": "b"})
    assert r.status_code == 429
    assert r.json()["code"] == "resource_exhausted"
    assert error_info(r.json()).reason == "LIMIT_EXCEEDED"

    slow = make_http(write_rate_per_client=0.01, write_burst_per_client=1)
    assert unary(slow.client, "CreateJob", {"jobId": "a"}).status_code == 200
    before = slow.revision()
    r = unary(slow.client, "CreateJob", {"jobId": "b"})
    assert r.status_code == 429
    body = r.json()
    assert error_info(body).reason == "RATE_LIMITED"
    assert int(error_info(body).metadata["retry_after_ms"]) > 0
    # The standard retry hint rides along, as over gRPC.
    assert [d["type"] for d in body["details"]] == ["google.rpc.ErrorInfo", "google.rpc.RetryInfo"]
    assert slow.revision() == before
    # Reads are not rate limited.
    assert unary(slow.client, "GetJob", {"jobId": "a"}).status_code == 200
