"""Pure functions that compute one change of one job: the new ``JobState`` and its history entry.

Every storage engine calls these, so the rules of docs/CONTRACT.md (conditions, final states, the cascade, one
active execution per node, update masks, the two version counters) are written once. Inputs are never
mutated: each function returns a new ``JobState`` (copy on write), which lets an engine publish the old and
the new state without copying again. The engine assigns the store revision when it commits.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from jobstate.server import rules
from jobstate.server.errors import (
    ExecutionAlreadyExists,
    ExecutionNotFound,
    ExecutionTerminal,
    InvalidArgument,
    JobTerminal,
    NodeHasActiveExecution,
    ResourceLimit,
    VersionMismatch,
)
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb

ES = pb.ExecutionStateType
JS = pb.JobStateType


@dataclass(slots=True)
class Change:
    """One computed change: the job after it, its history entry, and the execution it touched (if any)."""

    job: pb.JobState
    entry: pb.JobHistoryEntry
    execution: pb.ExecutionState | None = None


def _entry(job: pb.JobState, now_ns: int, comment: str) -> pb.JobHistoryEntry:
    entry = pb.JobHistoryEntry(version=job.version, comment=comment)
    entry.time.FromNanoseconds(now_ns)
    return entry


def _touch(job: pb.JobState, now_ns: int) -> None:
    job.version += 1
    job.update_time.FromNanoseconds(now_ns)


# What a change may add beyond ``max_job_bytes`` for the server's own bookkeeping, per execution it touches (and
# once for the job): a version and an update time each grow by a few bytes as they count up, and a job that
# reached the limit must still be able to change state or be cancelled. A comment copied into executions is
# not bookkeeping: it counts in full.
BOOKKEEPING_BYTES = 32


def _check_size(job: pb.JobState, limits: rules.Limits, slack: int = 0, hint: str = "") -> None:
    size = job.ByteSize()
    if size > limits.max_job_bytes + slack:
        raise ResourceLimit(
            f"job {job.job_id} would be {size} bytes, more than the limit of {limits.max_job_bytes}{hint}",
            limit="max_job_bytes",
        )


def new_job(job_id: str, now_ns: int, timeout_ns: int, comment: str) -> Change:
    job = pb.JobState(job_id=job_id, state=JS.JOB_STATE_TYPE_NEW, version=1)
    job.create_time.FromNanoseconds(now_ns)
    job.update_time.FromNanoseconds(now_ns)
    if timeout_ns:
        job.timeout_at.FromNanoseconds(now_ns + timeout_ns)
    entry = _entry(job, now_ns, comment)
    entry.job_state.new_state = JS.JOB_STATE_TYPE_NEW
    return Change(job, entry)


def change_job_state(
    current: pb.JobState,
    new_state: int,
    condition: spb.JobCondition | None,
    comment: str,
    now_ns: int,
    limits: rules.Limits | None = None,
) -> Change:
    """The job moved to ``new_state``; a final state cancels its active executions in the same change, each
    getting ``comment`` as its status. With ``limits`` the job after it must fit ``max_job_bytes`` (the comment
    counts once per execution it is copied into); without, it is the server's own change (a timeout), which must
    never be refused: it adds at most ``BOOKKEEPING_BYTES`` per execution plus "timed out"."""
    if condition is not None:
        rules.check_job_condition(current, condition)
    if rules.is_terminal_job(current.state):
        raise JobTerminal(
            f"job {current.job_id} is {rules.job_state_name(current.state)}, a final state",
            current_state=rules.job_state_name(current.state),
        )
    job = pb.JobState()
    job.CopyFrom(current)
    _touch(job, now_ns)
    job.state = new_state  # type: ignore[assignment]
    entry = _entry(job, now_ns, comment)
    entry.job_state.previous_state = current.state
    entry.job_state.new_state = new_state  # type: ignore[assignment]
    cancelled = 0
    if rules.is_terminal_job(new_state):
        # The cascade: one change, one version, one revision, one event.
        for e in job.executions:
            if not rules.is_terminal_execution(e.state):
                entry.cancelled_executions.add(
                    compute_reference=e.compute_reference,
                    node_id=e.node_id,
                    previous_state=e.state,
                    new_state=ES.EXECUTION_STATE_TYPE_CANCELLED,
                    version=e.version + 1,
                )
                e.state = ES.EXECUTION_STATE_TYPE_CANCELLED
                e.status = comment
                e.version += 1
                e.update_time.FromNanoseconds(now_ns)
                cancelled += 1
    if limits is not None:
        hint = ""
        if cancelled and comment:
            hint = (
                f": the comment is copied into each of the {cancelled} executions it cancels; give a shorter one "
                "(or none)"
            )
        _check_size(job, limits, BOOKKEEPING_BYTES * (1 + cancelled), hint)
    return Change(job, entry)


def _find_execution(job: pb.JobState, compute_reference: str) -> int:
    for i, e in enumerate(job.executions):
        if e.compute_reference == compute_reference:
            return i
    raise ExecutionNotFound(
        f"job {job.job_id} has no execution {compute_reference!r}", compute_reference=compute_reference
    )


def _check_job_open(job: pb.JobState) -> None:
    if rules.is_terminal_job(job.state):
        raise JobTerminal(
            f"job {job.job_id} is {rules.job_state_name(job.state)}, a final state",
            current_state=rules.job_state_name(job.state),
        )


def add_execution(
    current: pb.JobState, execution: pb.ExecutionState, comment: str, now_ns: int, limits: rules.Limits
) -> Change:
    _check_job_open(current)
    if len(current.executions) >= limits.max_executions_per_job:
        raise ResourceLimit(
            f"job {current.job_id} has {len(current.executions)} executions, the limit",
            limit="max_executions_per_job",
        )
    ref = execution.compute_reference or f"exec-{uuid.uuid4()}"
    for e in current.executions:
        if e.compute_reference == ref:
            raise ExecutionAlreadyExists(f"job {current.job_id} already has execution {ref!r}", compute_reference=ref)
    state = execution.state or ES.EXECUTION_STATE_TYPE_NEW
    if not rules.is_terminal_execution(state):
        active = rules.active_execution_on(current.executions, execution.node_id)
        if active is not None:
            raise NodeHasActiveExecution(
                f"node {execution.node_id} already runs execution {active.compute_reference} of job "
                f"{current.job_id} ({rules.execution_state_name(active.state)})",
                compute_reference=active.compute_reference,
                node_id=execution.node_id,
            )
    job = pb.JobState()
    job.CopyFrom(current)
    _touch(job, now_ns)
    e = job.executions.add()
    e.CopyFrom(execution)
    e.job_id = job.job_id
    e.compute_reference = ref
    e.state = state
    e.version = 1
    e.create_time.FromNanoseconds(now_ns)
    e.update_time.FromNanoseconds(now_ns)
    _check_size(job, limits)
    entry = _entry(job, now_ns, comment)
    entry.execution_state.compute_reference = ref
    entry.execution_state.node_id = e.node_id
    entry.execution_state.new_state = state
    entry.execution_state.version = 1
    return Change(job, entry, e)


def change_execution(
    current: pb.JobState,
    compute_reference: str,
    values: pb.ExecutionState,
    paths: Sequence[str],
    condition: spb.ExecutionCondition | None,
    comment: str,
    now_ns: int,
    limits: rules.Limits,
) -> Change:
    index = _find_execution(current, compute_reference)
    before = current.executions[index]
    if condition is not None:
        rules.check_execution_condition(before, condition)
    _check_job_open(current)
    if rules.is_terminal_execution(before.state):
        raise ExecutionTerminal(
            f"execution {compute_reference} is {rules.execution_state_name(before.state)}, a final state",
            current_state=rules.execution_state_name(before.state),
        )
    job = pb.JobState()
    job.CopyFrom(current)
    e = job.executions[index]
    rules.apply_execution_update(e, values, paths)
    if e.state == ES.EXECUTION_STATE_TYPE_UNSPECIFIED:
        # A mask naming "state" with the state unset would clear it; a stored execution always has one.
        raise InvalidArgument("execution.state cannot be cleared", field="execution.state")
    _touch(job, now_ns)
    e.version += 1
    e.update_time.FromNanoseconds(now_ns)
    _check_size(job, limits)
    entry = _entry(job, now_ns, comment)
    entry.execution_state.compute_reference = compute_reference
    entry.execution_state.node_id = e.node_id
    entry.execution_state.previous_state = before.state
    entry.execution_state.new_state = e.state
    entry.execution_state.version = e.version
    return Change(job, entry, e)


def check_delete(current: pb.JobState, expected_version: int) -> None:
    if expected_version and current.version != expected_version:
        raise VersionMismatch(
            f"job {current.job_id} is at version {current.version}, not {expected_version}",
            current_version=current.version,
        )


def expire(current: pb.JobState, now_ns: int) -> Change | None:
    """The change that times ``current`` out, or None when it is already final."""
    if rules.is_terminal_job(current.state):
        return None
    return change_job_state(current, JS.JOB_STATE_TYPE_ERROR, None, rules.TIMEOUT_COMMENT, now_ns)
