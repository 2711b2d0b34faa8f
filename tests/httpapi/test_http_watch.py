"""Watch over HTTP/1.1: Connect server streaming (JSON and binary) and gRPC-Web, with the same guarantees as
over gRPC: the store id header, resume by revision (refused from another store), bookmarks, the release of a
watcher whose client went away, and the end of every stream at shutdown with unavailable / SHUTTING_DOWN."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from connectutil import error_info, open_stream, unary
from google.protobuf import duration_pb2
from google.rpc import status_pb2

from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb

ET = spb.WatchEventType


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def watchers(http: Any) -> int:
    return int(http.thread.run(lambda: http.thread.store.stats().watchers))


@pytest.mark.parametrize("json_codec", [True, False], ids=["json", "proto"])
def test_watch_initial_state_then_live_changes(http: Any, json_codec: bool) -> None:
    http.grpc.CreateJob(spb.CreateJobRequest(job_id="a"))
    with open_stream(http.client, "Watch", spb.WatchRequest(send_initial_state=True), json_codec=json_codec) as s:
        assert s.response.status_code == 200
        first = s.next()
        assert first is not None
        assert [e.type for e in first.events] == [ET.WATCH_EVENT_TYPE_INITIAL, ET.WATCH_EVENT_TYPE_BOOKMARK]
        assert first.events[0].job.job_id == "a"
        store_id = s.response.headers["jobstate-store-id"]
        assert store_id == http.thread.store.store_id
        # A write through gRPC reaches the HTTP watcher, in order.
        http.grpc.UpdateJobState(spb.UpdateJobStateRequest(job_id="a", new_state=pb.JOB_STATE_TYPE_QUEUED))
        unary(http.client, "CreateJob", {"jobId": "b"})
        events = s.events(2)
        assert [(e.type, e.job.job_id, e.revision) for e in events] == [
            (ET.WATCH_EVENT_TYPE_UPDATED, "a", 2),
            (ET.WATCH_EVENT_TYPE_CREATED, "b", 3),
        ]
        assert events[0].job.state == pb.JOB_STATE_TYPE_QUEUED


def test_resume_by_revision_with_the_store_id(http: Any) -> None:
    for i in range(5):
        http.grpc.CreateJob(spb.CreateJobRequest(job_id=f"j{i}"))
    store_id = http.thread.store.store_id
    resume = spb.WatchRequest(start_revision=3)
    with open_stream(http.client, "Watch", resume, headers={"jobstate-store-id": store_id}) as s:
        assert [e.revision for e in s.events(3)] == [3, 4, 5]
    # Revisions of another store (a server whose store was reset) are refused, not served.
    with open_stream(http.client, "Watch", resume, headers={"jobstate-store-id": "mem-someotherstore"}) as s:
        assert s.response.status_code == 200  # a stream's error is in its end message
        err = s.error()
        assert err is not None
        assert err["code"] == "out_of_range"
        assert error_info(err).reason == "REVISION_COMPACTED"


def test_compacted_revision_names_the_oldest(make_http: Any) -> None:
    http = make_http(history_size=4)
    for i in range(10):
        http.grpc.CreateJob(spb.CreateJobRequest(job_id=f"j{i}"))
    with open_stream(http.client, "Watch", spb.WatchRequest(start_revision=2)) as s:
        err = s.error()
        assert err is not None
        assert err["code"] == "out_of_range"
        info = error_info(err)
        assert info.reason == "REVISION_COMPACTED"
        assert info.metadata["oldest_revision"] == "7"


def test_bookmarks_without_writes(http: Any) -> None:
    http.grpc.CreateJob(spb.CreateJobRequest(job_id="a"))
    request = spb.WatchRequest(start_revision=2, progress_interval=duration_pb2.Duration(nanos=50_000_000))
    with open_stream(http.client, "Watch", request) as s:
        for _ in range(2):
            r = s.next()
            assert r is not None
            assert [e.type for e in r.events] == [ET.WATCH_EVENT_TYPE_BOOKMARK]
            assert r.revision == 1
        assert s.response.headers["jobstate-store-id"] == http.thread.store.store_id


def test_bad_watch_request_ends_with_invalid_argument(http: Any) -> None:
    with open_stream(http.client, "Watch", spb.WatchRequest(start_revision=-1)) as s:
        err = s.error()
    assert err is not None
    assert err["code"] == "invalid_argument"
    assert error_info(err).metadata["field"] == "start_revision"


def test_a_client_that_goes_away_releases_its_watcher(http: Any) -> None:
    with open_stream(http.client, "Watch", spb.WatchRequest(send_initial_state=True)) as s:
        assert s.next() is not None
        assert watchers(http) == 1
    wait_until(lambda: watchers(http) == 0)


def test_grpc_web_unary_and_watch(http: Any) -> None:
    r = http.client.post(
        "/jobstate.v1.JobStateService/CreateJob",
        content=b"\x00" + len(b := spb.CreateJobRequest(job_id="w").SerializeToString()).to_bytes(4, "big") + b,
        headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1"},
    )
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/grpc-web+proto"
    body = r.content
    length = int.from_bytes(body[1:5], "big")
    assert spb.CreateJobResponse.FromString(body[5 : 5 + length]).job.job_id == "w"
    assert body[5 + length] == 0x80  # the trailers frame
    assert b"grpc-status: 0" in body[5 + length :]

    with open_stream(http.client, "Watch", spb.WatchRequest(send_initial_state=True), grpc_web=True) as s:
        first = s.next()
        assert first is not None
        assert first.events[0].job.job_id == "w"
        assert s.response.headers["jobstate-store-id"] == http.thread.store.store_id
        unary(http.client, "DeleteJob", {"jobId": "w"})
        assert [e.type for e in s.events(1)] == [ET.WATCH_EVENT_TYPE_DELETED]

    # An error: status, message and the same ErrorInfo in grpc-status-details-bin.
    with open_stream(
        http.client, "Watch", spb.WatchRequest(start_revision=99, job_ids=["a b"]), json_codec=False, grpc_web=True
    ) as s:
        assert s.next() is None
        trailers = s.trailers
    assert trailers is not None
    assert trailers["grpc-status"] == "3"  # INVALID_ARGUMENT
    details = trailers["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(base64.b64decode(details + "=" * (-len(details) % 4)))
    assert status.code == 3
    assert status.details[0].type_url == "type.googleapis.com/google.rpc.ErrorInfo"


def test_shutdown_ends_open_streams_with_shutting_down(http: Any) -> None:
    with open_stream(http.client, "Watch", spb.WatchRequest(send_initial_state=True)) as s:
        assert s.next() is not None  # the stream is established
        stopper = threading.Thread(target=http.thread.stop, kwargs={"grace": 2.0})
        stopper.start()
        err = s.error()
        stopper.join(15)
    assert not stopper.is_alive()
    assert err is not None
    assert err["code"] == "unavailable"
    assert error_info(err).reason == "SHUTTING_DOWN"
