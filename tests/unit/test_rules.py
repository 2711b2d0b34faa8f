"""The store's rules, case by case, against MemoryStore: conditions, final states, update masks, validation.

Every refused request must raise the named domain error and change nothing: the revision, the job and its
history stay as they were.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from storeutil import ES, JS, exec_cond, execution, job_cond, job_with_execution, mask, new_store

from jobstate.server import errors, rules
from jobstate.server.rules import Limits
from jobstate.server.store import MemoryStore
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb

NON_TERMINAL_JOB = sorted(rules.JOB_STATES - rules.TERMINAL_JOB_STATES)
TERMINAL_JOB = sorted(rules.TERMINAL_JOB_STATES)
NON_TERMINAL_EXEC = sorted(rules.EXECUTION_STATES - rules.TERMINAL_EXECUTION_STATES)
TERMINAL_EXEC = sorted(rules.TERMINAL_EXECUTION_STATES)


async def refused(store: MemoryStore, job_id: str, error: type[errors.JobStateError], call: Awaitable[Any]) -> Any:
    """Awaits ``call``, which must raise ``error`` and leave the store unchanged."""
    revision = store.stats().revision
    before = (await store.get_job(job_id)).job if job_id in store._jobs else None
    history = len(store._jobs[job_id].history) if before is not None else 0
    with pytest.raises(error) as info:
        await call
    assert store.stats().revision == revision
    if before is not None:
        assert (await store.get_job(job_id)).job == before
        assert len(store._jobs[job_id].history) == history
    return info.value


def test_terminal_sets_match_the_contract() -> None:
    final = {JS.JOB_STATE_TYPE_COMPLETED, JS.JOB_STATE_TYPE_ERROR, JS.JOB_STATE_TYPE_CANCELLED}
    assert final == rules.TERMINAL_JOB_STATES
    assert {
        ES.EXECUTION_STATE_TYPE_ASK_FOR_BID_REJECTED,
        ES.EXECUTION_STATE_TYPE_BID_REJECTED,
        ES.EXECUTION_STATE_TYPE_COMPLETED,
        ES.EXECUTION_STATE_TYPE_FAILED,
        ES.EXECUTION_STATE_TYPE_CANCELLED,
    } == rules.TERMINAL_EXECUTION_STATES


# --- job conditions: the job is IN_PROGRESS at version 2 ------------------------------------------------------

IP, NEW, QUEUED = JS.JOB_STATE_TYPE_IN_PROGRESS, JS.JOB_STATE_TYPE_NEW, JS.JOB_STATE_TYPE_QUEUED


@pytest.mark.parametrize(
    ("condition", "error"),
    [
        pytest.param(job_cond(), None, id="zero-checks-nothing"),
        pytest.param(None, None, id="no-condition"),
        pytest.param(job_cond(state=IP), None, id="expected-state-holds"),
        pytest.param(job_cond(state=NEW), errors.StateMismatch, id="expected-state-differs"),
        pytest.param(job_cond(version=2), None, id="expected-version-holds"),
        pytest.param(job_cond(version=1), errors.VersionMismatch, id="expected-version-older"),
        pytest.param(job_cond(version=3), errors.VersionMismatch, id="expected-version-newer"),
        pytest.param(job_cond(unexpected=(NEW,)), None, id="unexpected-other"),
        pytest.param(job_cond(unexpected=(IP,)), errors.StateMismatch, id="unexpected-current"),
        pytest.param(job_cond(unexpected=(NEW, IP)), errors.StateMismatch, id="unexpected-list"),
        pytest.param(job_cond(state=IP, version=2, unexpected=(NEW,)), None, id="all-hold"),
        pytest.param(job_cond(state=IP, version=1), errors.VersionMismatch, id="state-holds-version-not"),
        pytest.param(job_cond(state=NEW, version=2), errors.StateMismatch, id="version-holds-state-not"),
    ],
)
async def test_job_condition(condition: spb.JobCondition | None, error: type[errors.JobStateError] | None) -> None:
    store = new_store()
    await store.create_job("j")
    await store.update_job_state("j", IP)
    if error is None:
        r = await store.update_job_state("j", QUEUED, condition, "go")
        assert (r.job.state, r.job.version, r.revision) == (QUEUED, 3, 3)
        return
    exc = await refused(store, "j", error, store.update_job_state("j", QUEUED, condition))
    if error is errors.VersionMismatch:
        assert exc.metadata["current_version"] == "2"


# --- execution conditions: the execution is ASK_FOR_BID at version 2 ------------------------------------------

AFB, NEW_E, BA = ES.EXECUTION_STATE_TYPE_ASK_FOR_BID, ES.EXECUTION_STATE_TYPE_NEW, ES.EXECUTION_STATE_TYPE_BID_ACCEPTED


@pytest.mark.parametrize(
    ("condition", "error"),
    [
        pytest.param(exec_cond(), None, id="zero-checks-nothing"),
        pytest.param(None, None, id="no-condition"),
        pytest.param(exec_cond(states=(AFB,)), None, id="expected-state-holds"),
        pytest.param(exec_cond(states=(NEW_E, AFB)), None, id="expected-one-of"),
        pytest.param(exec_cond(states=(NEW_E,)), errors.StateMismatch, id="expected-state-differs"),
        pytest.param(exec_cond(version=2), None, id="expected-version-holds"),
        pytest.param(exec_cond(version=1), errors.VersionMismatch, id="expected-version-older"),
        pytest.param(exec_cond(version=7), errors.VersionMismatch, id="expected-version-newer"),
        pytest.param(exec_cond(unexpected=(NEW_E,)), None, id="unexpected-other"),
        pytest.param(exec_cond(unexpected=(AFB,)), errors.StateMismatch, id="unexpected-current"),
        pytest.param(exec_cond(states=(AFB,), version=2, unexpected=(BA,)), None, id="all-hold"),
    ],
)
async def test_execution_condition(
    condition: spb.ExecutionCondition | None, error: type[errors.JobStateError] | None
) -> None:
    store = new_store()
    await job_with_execution(store)
    await store.update_execution("j1", "e1", execution(state=AFB))
    values = pb.ExecutionState(state=BA)
    if error is None:
        r = await store.update_execution("j1", "e1", values, None, condition)
        assert r.execution is not None
        assert (r.execution.state, r.execution.version, r.job.version, r.revision) == (BA, 3, 4, 4)
        return
    exc = await refused(store, "j1", error, store.update_execution("j1", "e1", values, None, condition))
    if error is errors.VersionMismatch:
        # The execution's own version, which is what the condition compared.
        assert exc.metadata["current_version"] == "2"


# --- final states ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("final", TERMINAL_JOB)
@pytest.mark.parametrize(
    "attempt",
    [
        pytest.param(lambda s: s.update_job_state("j1", JS.JOB_STATE_TYPE_IN_PROGRESS), id="set-state"),
        pytest.param(lambda s: s.update_job_state("j1", JS.JOB_STATE_TYPE_COMPLETED), id="set-terminal"),
        pytest.param(lambda s: s.create_execution("j1", execution("n2")), id="new-execution"),
        pytest.param(lambda s: s.create_execution("j1", execution("n3", state=8)), id="new-final-execution"),
        pytest.param(lambda s: s.update_execution("j1", "e1", execution(status="x")), id="update-execution"),
    ],
)
async def test_a_final_job_changes_no_more(final: int, attempt: Callable[[MemoryStore], Awaitable[Any]]) -> None:
    store = new_store()
    await job_with_execution(store)
    await store.update_job_state("j1", final)
    await refused(store, "j1", errors.JobTerminal, attempt(store))


@pytest.mark.parametrize("final", TERMINAL_JOB)
async def test_a_final_job_can_be_deleted(final: int) -> None:
    store = new_store()
    await store.create_job("j1")
    await store.update_job_state("j1", final)
    r = await store.delete_job("j1")
    assert r.job.state == final
    with pytest.raises(errors.JobNotFound):
        await store.get_job("j1")


@pytest.mark.parametrize("final", TERMINAL_EXEC)
@pytest.mark.parametrize("then", [*NON_TERMINAL_EXEC, *TERMINAL_EXEC])
async def test_a_final_execution_changes_no_more(final: int, then: int) -> None:
    store = new_store()
    await job_with_execution(store)
    await store.update_execution("j1", "e1", execution(state=final))
    await refused(store, "j1", errors.ExecutionTerminal, store.update_execution("j1", "e1", execution(state=then)))
    # Only its state field set to the same value, or a status only: still refused.
    await refused(store, "j1", errors.ExecutionTerminal, store.update_execution("j1", "e1", execution(status="s")))


@pytest.mark.parametrize("state", NON_TERMINAL_JOB)
@pytest.mark.parametrize("then", NON_TERMINAL_JOB)
async def test_non_terminal_job_states_move_freely(state: int, then: int) -> None:
    store = new_store()
    await store.create_job("j1")
    await store.update_job_state("j1", state)
    r = await store.update_job_state("j1", then, comment="again")
    assert (r.job.state, r.job.version) == (then, 3)


# --- update_mask ----------------------------------------------------------------------------------------------

FULL = pb.ExecutionState(
    state=AFB,
    status="running",
    desired_state=pb.EXECUTION_DESIRED_STATE_RUNNING,
    published_results=pb.StorageSpec(storage_source="ipfs", cid="Qm1", metadata={"a": "1"}),
    run_output=pb.RunCommandResult(stdout="out", exit_code=3, stderr="err"),
)


def _fields(e: pb.ExecutionState) -> dict[str, Any]:
    return {
        "state": e.state,
        "status": e.status,
        "desired_state": e.desired_state,
        "published_results": e.published_results.SerializeToString(deterministic=True),
        "run_output": e.run_output.SerializeToString(deterministic=True),
    }


@pytest.mark.parametrize(
    ("values", "paths", "expect"),
    [
        pytest.param(
            pb.ExecutionState(status="new status"), (), {"status": "new status"}, id="empty-mask-set-fields-only"
        ),
        pytest.param(
            pb.ExecutionState(state=BA, run_output=pb.RunCommandResult(exit_code=1)),
            (),
            {"state": BA, "run_output": pb.RunCommandResult(exit_code=1).SerializeToString()},
            id="empty-mask-replaces-whole-message",
        ),
        pytest.param(pb.ExecutionState(), ("status",), {"status": ""}, id="masked-unset-status-cleared"),
        pytest.param(
            pb.ExecutionState(), ("published_results",), {"published_results": b""}, id="masked-unset-message-cleared"
        ),
        pytest.param(
            pb.ExecutionState(desired_state=pb.EXECUTION_DESIRED_STATE_STOPPED),
            ("desired_state",),
            {"desired_state": pb.EXECUTION_DESIRED_STATE_STOPPED},
            id="masked-enum",
        ),
        pytest.param(
            pb.ExecutionState(run_output=pb.RunCommandResult(exit_code=9, stdout="ignored")),
            ("run_output.exit_code",),
            {"run_output": pb.RunCommandResult(stdout="out", exit_code=9, stderr="err").SerializeToString()},
            id="sub-path-only",
        ),
        pytest.param(
            pb.ExecutionState(run_output=pb.RunCommandResult()),
            ("run_output.stdout",),
            {"run_output": pb.RunCommandResult(exit_code=3, stderr="err").SerializeToString()},
            id="sub-path-cleared",
        ),
        pytest.param(
            pb.ExecutionState(status="only this", state=BA),
            ("status",),
            {"status": "only this"},
            id="unmasked-set-field-ignored",
        ),
    ],
)
async def test_update_mask(values: pb.ExecutionState, paths: tuple[str, ...], expect: dict[str, Any]) -> None:
    store = new_store()
    await job_with_execution(store)
    await store.update_execution("j1", "e1", FULL)
    before = _fields((await store.get_job("j1")).job.executions[0])
    r = await store.update_execution("j1", "e1", values, mask(*paths))
    assert r.execution is not None
    after = _fields(r.execution)
    assert after == {**before, **expect}
    assert r.execution.version == 3
    assert (r.execution.node_id, r.execution.compute_reference, r.execution.job_id) == ("n1", "e1", "j1")


@pytest.mark.parametrize(
    ("values", "paths"),
    [
        pytest.param(pb.ExecutionState(node_id="n9"), ("node_id",), id="node_id"),
        pytest.param(pb.ExecutionState(compute_reference="x"), ("compute_reference",), id="compute_reference"),
        pytest.param(pb.ExecutionState(job_id="other"), ("job_id",), id="job_id"),
        pytest.param(pb.ExecutionState(version=99), ("version",), id="version"),
        pytest.param(pb.ExecutionState(), ("create_time",), id="create_time"),
        pytest.param(pb.ExecutionState(), ("update_time.seconds",), id="update_time-sub-path"),
        pytest.param(pb.ExecutionState(status="x"), ("status", "node_id"), id="one-bad-of-two"),
        pytest.param(pb.ExecutionState(), ("no_such_field",), id="unknown-field"),
        pytest.param(pb.ExecutionState(), ("run_output.no_such",), id="unknown-sub-path"),
        pytest.param(pb.ExecutionState(), ("state",), id="state-cleared"),
        pytest.param(pb.ExecutionState(), (), id="nothing-to-change"),
    ],
)
async def test_update_mask_refused(values: pb.ExecutionState, paths: tuple[str, ...]) -> None:
    store = new_store()
    await job_with_execution(store)
    await refused(store, "j1", errors.InvalidArgument, store.update_execution("j1", "e1", values, mask(*paths)))


# --- validation: every refused request changes nothing --------------------------------------------------------

LONG_ID = "a" * (rules.MAX_ID_LENGTH + 1)
TINY = Limits(max_comment_bytes=8, max_status_bytes=8, max_output_bytes=8, max_field_bytes=8, max_metadata_entries=1)


def _calls() -> list[Any]:
    """(id, call on a store holding job j1 with execution e1 on n1)."""
    big = "x" * 9
    cases: list[tuple[str, Callable[[MemoryStore], Awaitable[Any]]]] = [
        ("create-long-id", lambda s: s.create_job(LONG_ID)),
        ("create-bad-chars", lambda s: s.create_job("a b")),
        ("create-slash", lambda s: s.create_job("a/b")),
        ("create-leading-dash", lambda s: s.create_job("-a")),
        ("create-non-ascii", lambda s: s.create_job("jób")),
        ("create-negative-timeout", lambda s: s.create_job("t", -1)),
        ("create-huge-timeout", lambda s: s.create_job("t", (Limits().max_timeout_seconds + 1) * 10**9)),
        ("create-long-comment", lambda s: s.create_job("t", 0, big)),
        ("get-missing-id", lambda s: s.get_job("")),
        ("get-long-id", lambda s: s.get_job(LONG_ID)),
        ("state-missing-id", lambda s: s.update_job_state("", JS.JOB_STATE_TYPE_QUEUED)),
        ("state-unset", lambda s: s.update_job_state("j1", 0)),
        ("state-unknown", lambda s: s.update_job_state("j1", 77)),
        ("state-negative", lambda s: s.update_job_state("j1", -1)),
        ("state-cond-unknown", lambda s: s.update_job_state("j1", QUEUED, job_cond(state=42))),
        ("state-cond-unexpected-unknown", lambda s: s.update_job_state("j1", QUEUED, job_cond(unexpected=(0,)))),
        ("state-cond-negative-version", lambda s: s.update_job_state("j1", QUEUED, job_cond(version=-1))),
        ("state-long-comment", lambda s: s.update_job_state("j1", QUEUED, None, big)),
        ("exec-missing-node", lambda s: s.create_execution("j1", execution(""))),
        ("exec-bad-node", lambda s: s.create_execution("j1", execution("n 2"))),
        ("exec-long-node", lambda s: s.create_execution("j1", execution(LONG_ID))),
        ("exec-bad-ref", lambda s: s.create_execution("j1", execution("n2", "r/1"))),
        ("exec-unknown-state", lambda s: s.create_execution("j1", execution("n2", state=10))),
        ("exec-unknown-desired", lambda s: s.create_execution("j1", execution("n2", desired_state=4))),
        ("exec-long-status", lambda s: s.create_execution("j1", execution("n2", status=big))),
        (
            "exec-long-stdout",
            lambda s: s.create_execution("j1", execution("n2", run_output=pb.RunCommandResult(stdout=big))),
        ),
        (
            "exec-long-cid",
            lambda s: s.create_execution("j1", execution("n2", published_results=pb.StorageSpec(cid=big))),
        ),
        (
            "exec-too-much-metadata",
            lambda s: s.create_execution(
                "j1", execution("n2", published_results=pb.StorageSpec(metadata={"a": "1", "b": "2"}))
            ),
        ),
        ("exec-long-comment", lambda s: s.create_execution("j1", execution("n2"), big)),
        ("update-missing-ref", lambda s: s.update_execution("j1", "", execution(status="x"))),
        ("update-unknown-state", lambda s: s.update_execution("j1", "e1", execution(state=99))),
        ("update-long-status", lambda s: s.update_execution("j1", "e1", execution(status=big))),
        (
            "update-cond-unknown",
            lambda s: s.update_execution("j1", "e1", execution(status="x"), None, exec_cond(states=(12,))),
        ),
        (
            "update-cond-negative-version",
            lambda s: s.update_execution("j1", "e1", execution(status="x"), None, exec_cond(version=-2)),
        ),
        ("delete-negative-version", lambda s: s.delete_job("j1", -1)),
        ("delete-missing-id", lambda s: s.delete_job("")),
        ("list-unknown-state", lambda s: s.list_jobs([9])),
        ("list-unset-state", lambda s: s.list_jobs([0])),
        ("list-negative-page", lambda s: s.list_jobs(page_size=-1)),
        ("list-bad-node", lambda s: s.list_jobs(node_id="a b")),
        ("list-garbage-token", lambda s: s.list_jobs(page_token="garbage!")),
        ("list-wrong-token-shape", lambda s: s.list_jobs(page_token="WzFd")),  # [1]
        ("history-negative-page", lambda s: s.get_history("j1", -5)),
        ("history-garbage-token", lambda s: s.get_history("j1", 0, "%%%")),
        ("history-wrong-token-shape", lambda s: s.get_history("j1", 0, "WyJhIl0=")),  # ["a"]
        ("history-negative-token", lambda s: s.get_history("j1", 0, "Wy0xXQ==")),  # [-1]
    ]
    return [pytest.param(call, id=name) for name, call in cases]


@pytest.mark.parametrize("call", _calls())
async def test_invalid_requests_change_nothing(call: Callable[[MemoryStore], Awaitable[Any]]) -> None:
    store = new_store(limits=TINY)
    await job_with_execution(store)
    exc = await refused(store, "j1", errors.InvalidArgument, call(store))
    assert exc.reason == "INVALID_ARGUMENT"
    assert exc.message


@pytest.mark.parametrize(
    ("call", "error"),
    [
        pytest.param(lambda s: s.get_job("nope"), errors.JobNotFound, id="get"),
        pytest.param(lambda s: s.update_job_state("nope", QUEUED), errors.JobNotFound, id="set-state"),
        pytest.param(lambda s: s.create_execution("nope", execution()), errors.JobNotFound, id="create-execution"),
        pytest.param(
            lambda s: s.update_execution("nope", "e1", execution(status="x")), errors.JobNotFound, id="update-exec"
        ),
        pytest.param(lambda s: s.delete_job("nope"), errors.JobNotFound, id="delete"),
        pytest.param(lambda s: s.get_history("nope"), errors.JobNotFound, id="history"),
        pytest.param(
            lambda s: s.update_execution("j1", "e9", execution(status="x")), errors.ExecutionNotFound, id="no-exec"
        ),
        pytest.param(lambda s: s.create_job("j1"), errors.JobAlreadyExists, id="job-exists"),
        pytest.param(
            lambda s: s.create_execution("j1", execution("n2", "e1")), errors.ExecutionAlreadyExists, id="exec-exists"
        ),
        pytest.param(
            lambda s: s.create_execution("j1", execution("n1", "e2")),
            errors.NodeHasActiveExecution,
            id="node-busy",
        ),
    ],
)
async def test_refused_requests_change_nothing(
    call: Callable[[MemoryStore], Awaitable[Any]], error: type[errors.JobStateError]
) -> None:
    store = new_store()
    await job_with_execution(store)
    await refused(store, "j1", error, call(store))


async def test_oversize_job_is_refused() -> None:
    store = new_store(limits=Limits(max_job_bytes=2000, max_output_bytes=1500))
    await job_with_execution(store)
    output = pb.RunCommandResult(stdout="x" * 1000)
    await store.update_execution("j1", "e1", execution(run_output=output))
    await refused(store, "j1", errors.ResourceLimit, store.create_execution("j1", execution("n2", run_output=output)))
    await refused(store, "j1", errors.ResourceLimit, store.update_execution("j1", "e1", execution(status="s" * 1100)))


async def test_max_jobs_limit() -> None:
    store = new_store(limits=Limits(max_jobs=2))
    await store.create_job("a")
    await store.create_job("b")
    await refused(store, "a", errors.ResourceLimit, store.create_job("c"))
    await store.delete_job("a")
    assert (await store.create_job("c")).job.version == 1


async def test_max_executions_per_job_limit() -> None:
    store = new_store(limits=Limits(max_executions_per_job=2))
    await store.create_job("j")
    await store.create_execution("j", execution("n1", state=ES.EXECUTION_STATE_TYPE_FAILED))
    await store.create_execution("j", execution("n1"))
    await refused(store, "j", errors.ResourceLimit, store.create_execution("j", execution("n2")))


@pytest.mark.parametrize(
    "job_id", ["a", "A-1", "job.1", "x:y@z_w", "0" * rules.MAX_ID_LENGTH, "9f0c6f7e-4b39-4c07-9d3e-3f1f8a9a2b11"]
)
async def test_valid_ids_are_accepted(job_id: str) -> None:
    store = new_store()
    r = await store.create_job(job_id)
    assert r.job.job_id == job_id
    assert (await store.get_job(job_id)).job == r.job
