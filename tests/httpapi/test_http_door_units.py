"""The HTTP door's pieces on their own: the shared JSON form of Watch responses stays within its byte budget and
says what the binary says."""

from __future__ import annotations

import json

from google.protobuf import json_format

from jobstate.server.http_door import RawCodec, _JsonWatchCache
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb


def _response(i: int, comment_bytes: int = 0) -> bytes:
    job = pb.JobState(job_id=f"job-{i}", version=i + 1)
    if comment_bytes:
        job.executions.add(status="x" * comment_bytes)
    event = spb.WatchEvent(type=spb.WATCH_EVENT_TYPE_UPDATED, revision=i + 1, job=job)
    return spb.WatchResponse(events=[event], revision=i + 1).SerializeToString()


def test_json_watch_text_matches_the_binary() -> None:
    codec = RawCodec("json")
    data = _response(7)
    text = codec.encode(data)
    parsed = json_format.Parse(text, spb.WatchResponse())
    assert parsed.SerializeToString() == data
    assert json.loads(text)["events"][0]["job"]["jobId"] == "job-7"
    assert codec.encode(data) is text  # the second watcher gets the same text, not a second conversion
    assert RawCodec("proto").encode(data) is data  # binary: the store's bytes as they are


def test_cache_stays_within_its_budget() -> None:
    cache = _JsonWatchCache()
    for i in range(400):
        cache.get(_response(i, comment_bytes=20_000))
    assert 0 < cache._bytes <= cache.BUDGET
    assert len(cache._texts) < 400
    big = _response(1, comment_bytes=cache.BUDGET // 5)  # a catch-up batch: converted, not kept
    before = cache._bytes
    assert json.loads(cache.get(big))["revision"] == "2"
    assert cache._bytes == before
