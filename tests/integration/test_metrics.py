"""Prometheus metrics: scrape the real endpoint after a known workload and check every number moved exactly.

Counters are compared before and after the workload; gauges are checked against the state the workload left.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobstate.server.hub import WatchSpec
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb
from jobstate.v1 import job_state_service_pb2_grpc as spb_grpc

JS = pb.JobStateType
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample of the endpoint, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(samples: Samples, name: str, **labels: str) -> float:
    """The samples of ``name`` with these labels, added up over the labels not named (e.g. ``protocol``)."""
    want = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and want <= set(have))


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return get(after, name, **labels) - get(before, name, **labels)


def wait_for(port: int, check: Callable[[Samples], bool], timeout: float = 10.0) -> Samples:
    """Scrapes until ``check`` holds (a stream's end is observed on the server after the client lets go)."""
    deadline = time.monotonic() + timeout
    while True:
        s = scrape(port)
        if check(s) or time.monotonic() > deadline:
            return s
        time.sleep(0.02)


def read_events(stream: Iterator[spb.WatchResponse], n: int) -> list[spb.WatchEvent]:
    events: list[spb.WatchEvent] = []
    while len(events) < n:
        events.extend(e for e in next(stream).events if e.type != spb.WATCH_EVENT_TYPE_BOOKMARK)
    return events


@pytest.fixture
def metrics_server(make_server: Callable[..., Any]) -> Any:
    return make_server(metrics_port=0)


def test_workload_moves_counters_and_gauges_exactly(metrics_server: Any) -> None:
    port = metrics_server.app.metrics_port
    assert port
    before = scrape(port)
    with grpc.insecure_channel(metrics_server.target) as channel:
        stub = spb_grpc.JobStateServiceStub(channel)
        # Two watchers of every job; the initial bookmark proves each is registered before the first write.
        watches = [stub.Watch(spb.WatchRequest(send_initial_state=True), timeout=30) for _ in range(2)]
        for w in watches:
            assert [e.type for e in next(w).events] == [spb.WATCH_EVENT_TYPE_BOOKMARK]
        for i in range(5):
            stub.CreateJob(spb.CreateJobRequest(job_id=f"m{i}"))
        for job_id, state in (("m0", JS.JOB_STATE_TYPE_QUEUED), ("m1", JS.JOB_STATE_TYPE_QUEUED)):
            stub.UpdateJobState(spb.UpdateJobStateRequest(job_id=job_id, new_state=state))
        stub.UpdateJobState(spb.UpdateJobStateRequest(job_id="m2", new_state=JS.JOB_STATE_TYPE_CANCELLED))
        with pytest.raises(grpc.RpcError) as missing:
            stub.GetJob(spb.GetJobRequest(job_id="nope"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as stale:
            stub.UpdateJobState(
                spb.UpdateJobStateRequest(
                    job_id="m3",
                    new_state=JS.JOB_STATE_TYPE_QUEUED,
                    condition=spb.JobCondition(expected_version=7),
                )
            )
        assert stale.value.code() == grpc.StatusCode.ABORTED
        for w in watches:
            assert [e.revision for e in read_events(w, 8)] == list(range(1, 9))

        after = scrape(port)
        for w in watches:
            w.cancel()
        ended = wait_for(port, lambda s: get(s, "jobstate_requests_total", method="Watch", code="CANCELLED") == 2)

    assert delta(before, after, "jobstate_requests_total", method="CreateJob", code="OK") == 5
    assert delta(before, after, "jobstate_requests_total", method="UpdateJobState", code="OK") == 3
    assert delta(before, after, "jobstate_requests_total", method="UpdateJobState", code="ABORTED") == 1
    assert delta(before, after, "jobstate_requests_total", method="GetJob", code="NOT_FOUND") == 1
    assert delta(before, after, "jobstate_requests_total", method="GetJob", code="OK") == 0
    # Latency: one observation per unary call, whatever its code; Watch has no latency.
    assert delta(before, after, "jobstate_request_duration_seconds_count", method="CreateJob") == 5
    assert delta(before, after, "jobstate_request_duration_seconds_count", method="UpdateJobState") == 4
    assert delta(before, after, "jobstate_request_duration_seconds_count", method="GetJob") == 1
    assert get(after, "jobstate_request_duration_seconds_bucket", method="CreateJob", le="+Inf") == 5
    assert get(after, "jobstate_request_duration_seconds_sum", method="CreateJob") > 0
    assert get(after, "jobstate_request_duration_seconds_count", method="Watch") == 0

    assert delta(before, after, "jobstate_events_published_total") == 8
    assert delta(before, after, "jobstate_events_delivered_total") == 16  # 8 changes x 2 watchers
    assert 2 <= delta(before, after, "jobstate_watch_responses_total") <= 16
    assert delta(before, after, "jobstate_watchers_started_total") == 2
    assert get(after, "jobstate_watchers") == 2
    assert get(after, "jobstate_watcher_lag_max_revisions") == 0
    assert get(after, "jobstate_watchers_behind") == 0

    assert get(after, "jobstate_jobs", state="NEW") == 2
    assert get(after, "jobstate_jobs", state="QUEUED") == 2
    assert get(after, "jobstate_jobs", state="CANCELLED") == 1
    for state in ("IN_PROGRESS", "COMPLETED", "ERROR"):
        assert ("jobstate_jobs", (("state", state),)) in after  # present at zero
        assert get(after, "jobstate_jobs", state=state) == 0
    assert get(after, "jobstate_revision") == 8
    assert get(after, "jobstate_history_held_changes") == 8
    assert get(after, "jobstate_history_capacity_changes") == metrics_server.config.history_size
    # Eight small changes: their bytes and the fixed overhead each, well within the default budget.
    assert 8 * 200 < get(after, "jobstate_history_held_bytes") < 8 * 2000
    assert get(after, "jobstate_history_capacity_bytes") == metrics_server.config.history_bytes

    # A client cancelling its watch is not a drop.
    assert get(ended, "jobstate_requests_total", method="Watch", code="CANCELLED") == 2
    assert get(ended, "jobstate_watchers") == 0
    assert get(ended, "jobstate_watchers_dropped_total") == 0
    assert get(ended, "jobstate_watchers_lagged_total") == 0


def test_lag_gauges_and_lagged_watcher(make_server: Callable[..., Any]) -> None:
    s = make_server(metrics_port=0, history_size=5)
    port = s.app.metrics_port
    # A watcher that never reads: driven by hand on the server loop, so how far behind it is is exact.
    stream = s.store.watch(WatchSpec(send_initial_state=True))
    s.call(stream.__anext__())  # the initial bookmark: the watcher is registered at revision 0
    with grpc.insecure_channel(s.target) as channel:
        stub = spb_grpc.JobStateServiceStub(channel)
        for i in range(3):
            stub.CreateJob(spb.CreateJobRequest(job_id=f"l{i}"))
        behind = scrape(port)
        for i in range(3, 9):
            stub.CreateJob(spb.CreateJobRequest(job_id=f"l{i}"))
    assert get(behind, "jobstate_watchers") == 1
    assert get(behind, "jobstate_watcher_lag_max_revisions") == 3
    assert get(behind, "jobstate_watcher_lag_sum_revisions") == 3
    assert get(behind, "jobstate_watchers_behind") == 1
    assert get(behind, "jobstate_watchers_lagged_total") == 0

    far = scrape(port)
    assert get(far, "jobstate_watcher_lag_max_revisions") == 9
    assert get(far, "jobstate_history_held_changes") == 5
    assert get(far, "jobstate_history_capacity_changes") == 5

    async def next_response() -> BaseException | None:
        try:
            await stream.__anext__()
        except Exception as exc:
            return exc
        return None

    exc = s.call(next_response())
    assert type(exc).__name__ == "WatcherLagged"
    done = scrape(port)
    assert get(done, "jobstate_watchers_lagged_total") == 1
    assert get(done, "jobstate_watchers") == 0
    assert get(done, "jobstate_watcher_lag_max_revisions") == 0


def test_watch_refused_over_the_limit_counts_as_dropped(make_server: Callable[..., Any]) -> None:
    s = make_server(metrics_port=0, max_watchers=1)
    port = s.app.metrics_port
    with grpc.insecure_channel(s.target) as channel:
        stub = spb_grpc.JobStateServiceStub(channel)
        first = stub.Watch(spb.WatchRequest(send_initial_state=True), timeout=30)
        next(first)
        with pytest.raises(grpc.RpcError) as refused:
            next(stub.Watch(spb.WatchRequest(), timeout=30))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        got = scrape(port)
        first.cancel()
    assert get(got, "jobstate_requests_total", method="Watch", code="RESOURCE_EXHAUSTED") == 1
    assert get(got, "jobstate_watchers_dropped_total") == 1
    assert get(got, "jobstate_watchers_lagged_total") == 0
    assert get(got, "jobstate_watchers") == 1


def test_servers_keep_separate_numbers_and_endpoint_answers_only_metrics(make_server: Callable[..., Any]) -> None:
    a = make_server(metrics_port=0)
    b = make_server(metrics_port=0)
    plain = make_server()
    assert plain.app.metrics_port is None
    assert a.app.metrics_port != b.app.metrics_port
    with grpc.insecure_channel(a.target) as channel:
        spb_grpc.JobStateServiceStub(channel).CreateJob(spb.CreateJobRequest(job_id="only-a"))
    assert get(scrape(a.app.metrics_port), "jobstate_requests_total", method="CreateJob", code="OK") == 1
    assert get(scrape(b.app.metrics_port), "jobstate_requests_total", method="CreateJob", code="OK") == 0
    assert get(scrape(b.app.metrics_port), "jobstate_jobs", state="NEW") == 0
    with pytest.raises(urllib.error.HTTPError) as nf:
        urllib.request.urlopen(f"http://127.0.0.1:{a.app.metrics_port}/other", timeout=10)
    assert nf.value.code == 404


def test_metrics_stop_with_the_server(make_server: Callable[..., Any]) -> None:
    s = make_server(metrics_port=0)
    port = s.app.metrics_port
    assert get(scrape(port), "jobstate_watchers") == 0
    s.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_calls_refused_before_the_service_are_counted(make_server: Callable[..., Any], tmp_path: Any) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("reader-token-0123456789 reader alice\nwriter-token-0123456789 writer bob\n")
    tokens.chmod(0o600)
    server = make_server(
        metrics_port=0, auth_tokens_file=str(tokens), write_rate_per_client=0.01, write_burst_per_client=1
    )
    port = server.app.metrics_port
    before = scrape(port)
    alice = (("authorization", "Bearer reader-token-0123456789"),)
    bob = (("authorization", "Bearer writer-token-0123456789"),)
    with grpc.insecure_channel(server.target) as channel:
        stub = spb_grpc.JobStateServiceStub(channel)
        refused = [
            (lambda: stub.GetJob(spb.GetJobRequest(job_id="a"), timeout=10), grpc.StatusCode.UNAUTHENTICATED),
            (
                lambda: stub.CreateJob(spb.CreateJobRequest(job_id="a"), timeout=10, metadata=alice),
                grpc.StatusCode.PERMISSION_DENIED,
            ),
            (lambda: next(stub.Watch(spb.WatchRequest(), timeout=10)), grpc.StatusCode.UNAUTHENTICATED),
        ]
        for call, code in refused:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == code
        stub.CreateJob(spb.CreateJobRequest(job_id="b"), timeout=10, metadata=bob)
        with pytest.raises(grpc.RpcError) as info:  # the second write within the second: over the rate
            stub.CreateJob(spb.CreateJobRequest(job_id="c"), timeout=10, metadata=bob)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    after = scrape(port)
    name = "jobstate_requests_total"
    assert delta(before, after, name, method="GetJob", code="UNAUTHENTICATED") == 1
    assert delta(before, after, name, method="CreateJob", code="PERMISSION_DENIED") == 1
    assert delta(before, after, name, method="Watch", code="UNAUTHENTICATED") == 1
    assert delta(before, after, name, method="CreateJob", code="RESOURCE_EXHAUSTED") == 1
    assert delta(before, after, name, method="CreateJob", code="OK") == 1
