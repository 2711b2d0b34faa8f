"""What the HTTP listener checks before any method runs (Host, CORS, content type, size, path), the same tokens
and roles as gRPC, bad input, and requests counted by protocol. Every refusal changes nothing in the store."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import pytest
from connectutil import SERVICE, error_info, ok_json, open_stream, unary
from prometheus_client.parser import text_string_to_metric_families

from jobstate.v1 import job_state_service_pb2 as spb

READER = "reader-token-0123456789"
WRITER = "writer-token-0123456789"


# --- Host header (DNS rebinding) -------------------------------------------------------------------------------


def test_host_header_must_name_an_allowed_host(make_http: Any) -> None:
    http = make_http(http_allowed_hosts=("jobs.example",))
    port = http.thread.app.http_port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"jobs.example:{port}", "JOBS.example"):
        r = unary(http.client, "ListJobs", {}, headers={"host": host})
        assert r.status_code == 200, (host, r.text)
    before = http.revision()
    for host in (f"evil.example:{port}", "attacker.test", ""):
        r = unary(http.client, "CreateJob", {"jobId": "x"}, headers={"host": host})
        assert r.status_code == 403, host
        assert r.json()["code"] == "permission_denied"
        assert "--http-allowed-host" in r.json()["message"]
        # the page too
        assert http.client.get("/", headers={"host": host}).status_code == 403
    assert http.revision() == before


# --- CORS ----------------------------------------------------------------------------------------------------------

PREFLIGHT = {
    "access-control-request-method": "POST",
    "access-control-request-headers": "content-type,connect-protocol-version,authorization,jobstate-store-id",
}


def test_cors_allows_only_the_configured_origins(make_http: Any) -> None:
    http = make_http(cors_origins=("https://app.example",))
    r = http.client.options(SERVICE + "Watch", headers={"origin": "https://app.example", **PREFLIGHT})
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    allowed = {h.strip() for h in r.headers["access-control-allow-headers"].split(",")}
    assert {"content-type", "connect-protocol-version", "authorization", "jobstate-store-id", "x-grpc-web"} <= allowed
    assert "POST" in r.headers["access-control-allow-methods"]
    # The actual request: the origin is echoed and the protocol's headers are readable by the page.
    r = unary(http.client, "CreateJob", {"jobId": "c"}, headers={"origin": "https://app.example"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    exposed = {h.strip() for h in r.headers["access-control-expose-headers"].split(",")}
    assert {"grpc-status", "grpc-message", "grpc-status-details-bin", "jobstate-store-id"} <= exposed
    # Another origin: no preflight approval, no CORS headers on the response (the browser keeps it from the page).
    r = http.client.options(SERVICE + "CreateJob", headers={"origin": "https://evil.example", **PREFLIGHT})
    assert r.status_code == 403
    assert "access-control-allow-origin" not in r.headers
    r = unary(http.client, "ListJobs", {}, headers={"origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_no_origin_is_allowed_by_default(http: Any) -> None:
    r = http.client.options(SERVICE + "ListJobs", headers={"origin": "http://localhost:3000", **PREFLIGHT})
    assert r.status_code == 403
    assert "--cors-origin" in r.json()["message"]


# --- tokens and roles --------------------------------------------------------------------------------------------


@pytest.fixture
def secured(make_http: Any, tmp_path: Path) -> Any:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{READER} reader alice\n{WRITER} writer bob\n")
    tokens.chmod(0o600)
    return make_http(auth_tokens_file=str(tokens))


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_tokens_and_roles(secured: Any) -> None:
    r = unary(secured.client, "ListJobs", {})
    assert r.status_code == 401
    assert r.json()["code"] == "unauthenticated"
    assert error_info(r.json()).reason == "UNAUTHENTICATED"
    r = unary(secured.client, "ListJobs", {}, headers=bearer("not-a-known-token-at-all"))
    assert r.status_code == 401
    r = unary(secured.client, "ListJobs", {}, headers={"authorization": f"Basic {READER}"})
    assert r.status_code == 401
    # A reader reads, and may not write.
    assert unary(secured.client, "ListJobs", {}, headers=bearer(READER)).status_code == 200
    r = unary(secured.client, "CreateJob", {"jobId": "x"}, headers=bearer(READER))
    assert r.status_code == 403
    info = error_info(r.json())
    assert info.reason == "PERMISSION_DENIED"
    assert dict(info.metadata) == {"role": "reader", "required_role": "writer"}
    assert secured.revision() == 0
    # A writer writes; GET reads need the token too.
    assert unary(secured.client, "CreateJob", {"jobId": "x"}, headers=bearer(WRITER)).status_code == 200
    url = SERVICE + "GetJob?encoding=json&message=" + json.dumps({"jobId": "x"})
    assert secured.client.get(url).status_code == 401
    assert secured.client.get(url, headers=bearer(READER)).json()["job"]["jobId"] == "x"


def test_watch_needs_a_token(secured: Any) -> None:
    with open_stream(secured.client, "Watch", spb.WatchRequest()) as s:
        err = s.error()
    assert err is not None
    assert err["code"] == "unauthenticated"
    assert error_info(err).reason == "UNAUTHENTICATED"
    with open_stream(secured.client, "Watch", spb.WatchRequest(send_initial_state=True), headers=bearer(READER)) as s:
        assert s.next() is not None


def test_reload_ends_the_watch_of_a_revoked_token(secured: Any, tmp_path: Path) -> None:
    with open_stream(secured.client, "Watch", spb.WatchRequest(send_initial_state=True), headers=bearer(READER)) as s:
        assert s.next() is not None
        (tmp_path / "tokens").write_text(f"{WRITER} writer bob\n")
        secured.thread.run(secured.thread.app.reload)
        err = s.error()
    assert err is not None
    assert err["code"] == "unauthenticated"
    assert secured.thread.run(lambda: secured.thread.store.stats().watchers) == 0


# --- bad input ---------------------------------------------------------------------------------------------------


def _post(http: Any, method: str, content: bytes, ctype: str = "application/json") -> httpx.Response:
    return http.client.post(SERVICE + method, content=content, headers={"content-type": ctype})


BAD_JSON = [
    ("malformed", "CreateJob", b'{"jobId": ', None),
    ("not-an-object", "CreateJob", b'["j"]', None),
    ("wrong-type", "CreateJob", b'{"jobId": 5}', "jobId"),
    ("wrong-nested-type", "UpdateJobState", b'{"jobId": "j", "condition": {"expectedVersion": "x"}}', None),
    ("unknown-enum-name", "UpdateJobState", b'{"jobId": "j", "newState": "JOB_STATE_TYPE_DONE"}', "newState"),
    ("unknown-field", "CreateJob", b'{"jobId": "j", "timeot": "5s"}', "timeot"),
    (
        "misspelt-condition",
        "UpdateJobState",
        b'{"jobId": "j", "newState": "JOB_STATE_TYPE_QUEUED", "condition": {"expectedVersoin": "7"}}',
        "condition.expectedVersoin",
    ),
    ("misspelt-delete-version", "DeleteJob", b'{"jobId": "j", "expectedVersoin": "7"}', "expectedVersoin"),
    ("not-utf8", "CreateJob", b'{"jobId": "\xff"}', None),
    ("empty", "CreateJob", b"", None),
]


@pytest.mark.parametrize(("method", "body", "field"), [pytest.param(*r[1:], id=r[0]) for r in BAD_JSON])
def test_bad_json_is_refused_and_changes_nothing(http: Any, method: str, body: bytes, field: str | None) -> None:
    unary(http.client, "CreateJob", {"jobId": "j"})
    before = http.revision()
    r = _post(http, method, body)
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["code"] == "invalid_argument"
    info = error_info(err)
    assert info.reason == "INVALID_ARGUMENT"
    if field is not None:
        assert info.metadata["field"] == field
        assert field.split(".")[-1] in err["message"]
    assert http.revision() == before
    assert http.grpc.GetJob(spb.GetJobRequest(job_id="j")).job.version == 1


def test_garbage_binary_is_invalid_argument(http: Any) -> None:
    r = _post(http, "CreateJob", b"\xff\xff\xff\xff", "application/proto")
    assert r.status_code == 400
    assert error_info(r.json()).reason == "INVALID_ARGUMENT"
    assert http.revision() == 0


def test_refusals_of_the_listener(make_http: Any) -> None:
    http = make_http(max_message_bytes=1024)
    # Wrong content type: a clear 415 saying what is accepted.
    r = _post(http, "CreateJob", b"jobId=x", "application/x-www-form-urlencoded")
    assert r.status_code == 415
    r = _post(http, "CreateJob", b"\x00\x00\x00\x00\x00", "application/grpc")
    assert r.status_code == 415
    assert "gRPC port" in r.json()["message"]
    # Oversized, declared: refused before reading it.
    r = _post(http, "CreateJob", json.dumps({"jobId": "big", "comment": "x" * 2000}).encode())
    assert r.status_code == 413
    assert r.json()["code"] == "resource_exhausted"

    # Oversized, streamed without a length: refused by the runtime's limit as it reads.
    def chunks() -> Any:
        yield b'{"jobId": "big", "comment": "'
        for _ in range(20):
            yield b"x" * 100
        yield b'"}'

    r = http.client.post(SERVICE + "CreateJob", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 429
    assert r.json()["code"] == "resource_exhausted"
    # Unknown method and unknown path.
    r = unary(http.client, "DropAllJobs", {})
    assert r.status_code == 404
    assert r.json()["code"] == "unimplemented"
    assert "CreateJob" in r.json()["message"]
    assert http.client.get("/no/such/file").status_code == 404
    assert http.revision() == 0
    # and the server goes on serving
    assert ok_json(unary(http.client, "CreateJob", {"jobId": "ok"}))["job"]["version"] == "1"


def test_the_page_is_served(http: Any) -> None:
    r = http.client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith(("text/html", "text/plain"))


# --- metrics -----------------------------------------------------------------------------------------------------


def test_requests_are_counted_by_protocol(make_http: Any) -> None:
    http = make_http(metrics_port=0)
    unary(http.client, "CreateJob", {"jobId": "m"})
    unary(http.client, "GetJob", {"jobId": "nope"})
    http.grpc.GetJob(spb.GetJobRequest(job_id="m"))
    with open_stream(http.client, "Watch", spb.WatchRequest(send_initial_state=True), grpc_web=True) as s:
        assert s.next() is not None
    port = http.thread.app.metrics_port

    def count(**labels: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "jobstate_requests_total" and labels.items() <= sample.labels.items():
                    total += sample.value
        return total

    assert count(method="CreateJob", code="OK", protocol="connect") == 1
    assert count(method="GetJob", code="NOT_FOUND", protocol="connect") == 1
    assert count(method="GetJob", code="OK", protocol="grpc") == 1
    assert count(method="GetJob", protocol="grpc-web") == 0
    # A stream is counted when it ends: here when the client let go.
    deadline = time.monotonic() + 10
    while count(method="Watch", protocol="grpc-web") != 1:
        assert time.monotonic() < deadline, "the closed gRPC-Web Watch was not counted"
        time.sleep(0.02)
    assert count(method="Watch", code="CANCELLED", protocol="grpc-web") == 1


def test_dead_peers_are_probed(make_http: Any) -> None:
    """HTTP/1.1 has no pings: TCP keepalive (copied to each accepted connection) finds a vanished watcher."""
    import socket

    http = make_http(keepalive_seconds=7, keepalive_timeout_seconds=6)
    sock = http.thread.app.http.socket
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 2
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3


def test_watch_streams_per_client(make_http: Any) -> None:
    """The per-client watch limit counts HTTP streams as it counts gRPC ones (same client: same address)."""
    http = make_http(max_watchers_per_client=1)
    with open_stream(http.client, "Watch", spb.WatchRequest(send_initial_state=True)) as first:
        assert first.next() is not None
        with open_stream(http.client, "Watch", spb.WatchRequest()) as second:
            err = second.error()
        assert err is not None
        assert err["code"] == "resource_exhausted"
        assert error_info(err).metadata["limit"] == "max_watchers_per_client"
    # The first stream's slot is released when it goes.
    deadline = time.monotonic() + 10
    while True:
        with open_stream(http.client, "Watch", spb.WatchRequest(send_initial_state=True)) as again:
            if again.next() is not None:
                break
        assert time.monotonic() < deadline, "the closed stream's slot was never released"
        time.sleep(0.02)
