"""Small builders shared by the unit tests of the store (requests are plain protobuf messages)."""

from __future__ import annotations

from google.protobuf import field_mask_pb2

from jobstate.server.hub import WatchHub
from jobstate.server.rules import Limits
from jobstate.server.store import MemoryStore
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb

JS = pb.JobStateType
ES = pb.ExecutionStateType


def new_store(history_size: int = 1000, limits: Limits | None = None) -> MemoryStore:
    return MemoryStore(WatchHub(history_size), limits or Limits())


def execution(node_id: str = "n1", ref: str = "", state: int = 0, **fields: object) -> pb.ExecutionState:
    return pb.ExecutionState(node_id=node_id, compute_reference=ref, state=state, **fields)  # type: ignore[arg-type]


def job_cond(state: int = 0, version: int = 0, unexpected: tuple[int, ...] = ()) -> spb.JobCondition:
    return spb.JobCondition(expected_state=state, expected_version=version, unexpected_states=unexpected)  # type: ignore[arg-type]


def exec_cond(
    states: tuple[int, ...] = (), version: int = 0, unexpected: tuple[int, ...] = ()
) -> spb.ExecutionCondition:
    return spb.ExecutionCondition(expected_states=states, expected_version=version, unexpected_states=unexpected)  # type: ignore[arg-type]


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


async def job_with_execution(store: MemoryStore, job_id: str = "j1", node_id: str = "n1", ref: str = "e1") -> None:
    await store.create_job(job_id)
    await store.create_execution(job_id, execution(node_id, ref))
