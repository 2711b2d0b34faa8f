"""Readable forms of states, events and jobs (``describe``): names a person reads and the CLI accepts back."""

from __future__ import annotations

from typing import Any

from jobstate.client import (
    Client,
    core,
    describe,
    event_type_name,
    execution_state_name,
    job_state_name,
)
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb


def test_names_of_every_enum_value_round_trip_through_the_cli_parsers() -> None:
    for value in pb.JobStateType.values():
        if value:
            assert core.job_state(job_state_name(value)) == value
    for value in pb.ExecutionStateType.values():
        if value:
            assert core.execution_state(execution_state_name(value)) == value
    assert event_type_name(spb.WATCH_EVENT_TYPE_CREATED) == "CREATED"


def test_a_value_from_a_newer_server_is_still_printable() -> None:
    assert job_state_name(42) == "42"
    job = pb.JobState(job_id="j", state=6, version=2)
    job.executions.add(state=99)
    assert describe(job) == "j QUEUED version 2, executions: 1 99"


def test_describe_a_real_watch_by_name(server: Any) -> None:
    with Client(server.target) as c:
        job = c.create_job("j1").job
        c.update_job_state("j1", "queued", expected_version=job.version)
        c.create_execution("j1", "node-a", compute_reference="e1", state="bid_accepted")
        c.create_execution("j1", "node-b", compute_reference="e2", state="bid_rejected")
        lines = []
        for event in c.watch(["j1"], send_initial_state=True):
            lines.append(describe(event))
            if event.type == spb.WATCH_EVENT_TYPE_BOOKMARK:
                break
        job_text = describe(c.get_job("j1").job)
        response_text = describe(
            spb.WatchResponse(events=[spb.WatchEvent(type=spb.WATCH_EVENT_TYPE_BOOKMARK, revision=4)])
        )
    assert lines == [
        "INITIAL j1 QUEUED version 4 at revision 4, executions: 1 BID_ACCEPTED 1 BID_REJECTED",
        "BOOKMARK at revision 4",
    ]
    assert job_text == "j1 QUEUED version 4, executions: 1 BID_ACCEPTED 1 BID_REJECTED"
    assert response_text == "BOOKMARK at revision 4"
    assert describe(pb.StorageSpec(name="n")) == 'name: "n"'
