"""A watch resumed by revision must come back to the same store: a server whose store was reset (an in-memory
server restarted at the same address) refuses it instead of serving another history's revisions."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from jobstate.v1 import job_state_service_pb2 as spb
from jobstate.v1 import job_state_service_pb2_grpc as spb_grpc

KEY = "jobstate-store-id"


def _first_response_and_store_id(stub: Any, request: spb.WatchRequest, metadata: tuple = ()) -> tuple[Any, str]:
    call = stub.Watch(request, metadata=metadata, timeout=10)
    first = next(call)
    ids = [v for k, v in call.initial_metadata() if k == KEY]
    call.cancel()
    return first, ids[0] if ids else ""


def test_watch_names_its_store_and_refuses_another_stores_revisions(make_server: Any) -> None:
    a, b = make_server(), make_server()
    with grpc.insecure_channel(a.target) as ca, grpc.insecure_channel(b.target) as cb:
        sa, sb = spb_grpc.JobStateServiceStub(ca), spb_grpc.JobStateServiceStub(cb)
        for stub in (sa, sb):
            stub.CreateJob(spb.CreateJobRequest(job_id="j"))
            stub.UpdateJobState(spb.UpdateJobStateRequest(job_id="j", new_state=6))
        first, id_a = _first_response_and_store_id(sa, spb.WatchRequest(start_revision=1))
        _, id_b = _first_response_and_store_id(sb, spb.WatchRequest(start_revision=1))
        assert first.events[0].revision == 1
        assert id_a
        assert id_b
        assert id_a != id_b

        # The same store: the resume is served.
        again, _ = _first_response_and_store_id(sa, spb.WatchRequest(start_revision=2), ((KEY, id_a),))
        assert again.events[0].revision == 2

        # Another store's id with a revision: OUT_OF_RANGE / REVISION_COMPACTED, naming this server's store.
        with pytest.raises(grpc.RpcError) as caught:
            _first_response_and_store_id(sb, spb.WatchRequest(start_revision=2), ((KEY, id_a),))
        assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
        status = rpc_status.from_call(caught.value)
        assert status is not None
        info = error_details_pb2.ErrorInfo()
        assert status.details[0].Unpack(info)
        assert (info.reason, info.metadata["store_id"]) == ("REVISION_COMPACTED", id_b)

        # Without a revision there is nothing to resume: a live watch or a snapshot is served anywhere.
        snap, _ = _first_response_and_store_id(sb, spb.WatchRequest(send_initial_state=True), ((KEY, id_a),))
        assert snap.events[0].type == spb.WATCH_EVENT_TYPE_INITIAL


def test_sqlite_store_keeps_its_id_across_restarts(make_server: Any, tmp_path: Any) -> None:
    first = make_server(engine="sqlite", data_dir=str(tmp_path))
    id_before = first.store.store_id
    first.stop()
    second = make_server(engine="sqlite", data_dir=str(tmp_path))
    assert id_before.startswith("sqlite-")
    assert second.store.store_id == id_before
