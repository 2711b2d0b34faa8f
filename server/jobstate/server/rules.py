"""The domain rules: which states are final, what a valid request looks like, and the limits.

Pure functions over the protobuf messages; no I/O and no gRPC. Every engine of the store calls them, so a
rule is written once. Each validator raises ``InvalidArgument`` with a message that names the bad field.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from google.protobuf import field_mask_pb2

from jobstate.server.errors import InvalidArgument, StateMismatch, VersionMismatch
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb

JS = pb.JobStateType
ES = pb.ExecutionStateType

TERMINAL_JOB_STATES = frozenset({JS.JOB_STATE_TYPE_COMPLETED, JS.JOB_STATE_TYPE_ERROR, JS.JOB_STATE_TYPE_CANCELLED})
TERMINAL_EXECUTION_STATES = frozenset(
    {
        ES.EXECUTION_STATE_TYPE_ASK_FOR_BID_REJECTED,
        ES.EXECUTION_STATE_TYPE_BID_REJECTED,
        ES.EXECUTION_STATE_TYPE_COMPLETED,
        ES.EXECUTION_STATE_TYPE_FAILED,
        ES.EXECUTION_STATE_TYPE_CANCELLED,
    }
)
JOB_STATES = frozenset(JS.values()) - {JS.JOB_STATE_TYPE_UNSPECIFIED}
EXECUTION_STATES = frozenset(ES.values()) - {ES.EXECUTION_STATE_TYPE_UNSPECIFIED}
DESIRED_STATES = frozenset(pb.ExecutionDesiredState.values())

TIMEOUT_COMMENT = "timed out"

# Ids are printed in logs and terminals and used as keys elsewhere (etcd keys, file names):
# printable ASCII without separators or spaces keeps them safe everywhere.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*")
MAX_ID_LENGTH = 128


@dataclass(frozen=True, slots=True)
class Limits:
    """Sizes the store refuses to exceed; each is documented in the README's configuration table."""

    max_comment_bytes: int = 4096
    max_status_bytes: int = 4096
    max_output_bytes: int = 256 * 1024
    max_field_bytes: int = 4096
    max_metadata_entries: int = 64
    max_executions_per_job: int = 1000
    max_jobs: int = 0  # 0: no limit
    # Jobs one caller may hold (counted by who created them); 0: no limit. The server makes it a share of max_jobs.
    max_jobs_per_client: int = 0
    max_watch_job_ids: int = 1000
    default_page_size: int = 100
    max_page_size: int = 1000
    max_timeout_seconds: int = 366 * 24 * 3600
    max_job_bytes: int = 2 * 1024 * 1024
    # A ListJobs or GetJobHistory page ends before its items pass this many bytes (it always holds at least
    # one): under the 4 MiB a stock gRPC client accepts, so every page reaches every client whatever the jobs'
    # sizes. The server lowers it to fit --max-message-bytes.
    max_page_bytes: int = 4 * 1024 * 1024 - 64 * 1024
    # History entries kept per job: a job's older changes are dropped beyond it (0: keep every change).
    max_history_per_job: int = 1000


DEFAULT_LIMITS = Limits()


def is_terminal_job(state: int) -> bool:
    return state in TERMINAL_JOB_STATES


def is_terminal_execution(state: int) -> bool:
    return state in TERMINAL_EXECUTION_STATES


def job_state_name(state: int) -> str:
    try:
        return JS.Name(state).removeprefix("JOB_STATE_TYPE_")  # type: ignore[arg-type]
    except ValueError:
        return str(state)


def execution_state_name(state: int) -> str:
    try:
        return ES.Name(state).removeprefix("EXECUTION_STATE_TYPE_")  # type: ignore[arg-type]
    except ValueError:
        return str(state)


# --- validation --------------------------------------------------------------------------------------------


def validate_id(value: str, field: str, *, required: bool = True) -> None:
    if not value:
        if required:
            raise InvalidArgument(f"{field} is required", field=field)
        return
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument(f"{field} is longer than {MAX_ID_LENGTH} characters", field=field)
    if not ID_PATTERN.fullmatch(value):
        raise InvalidArgument(
            f"{field} {value[:40]!r} may hold only letters, digits and . _ : @ - and must start with a letter or digit",
            field=field,
        )


def validate_text(value: str, field: str, limit: int) -> None:
    if len(value) > limit or len(value.encode()) > limit:
        raise InvalidArgument(f"{field} is longer than {limit} bytes", field=field)


def validate_job_state(value: int, field: str, *, allow_unspecified: bool = False) -> None:
    if value == JS.JOB_STATE_TYPE_UNSPECIFIED and allow_unspecified:
        return
    if value not in JOB_STATES:
        what = "is required" if value == 0 else f"has unknown JobStateType {value}"
        raise InvalidArgument(f"{field} {what}", field=field)


def validate_execution_state(value: int, field: str, *, allow_unspecified: bool = False) -> None:
    if value == ES.EXECUTION_STATE_TYPE_UNSPECIFIED and allow_unspecified:
        return
    if value not in EXECUTION_STATES:
        what = "is required" if value == 0 else f"has unknown ExecutionStateType {value}"
        raise InvalidArgument(f"{field} {what}", field=field)


def validate_page(page_size: int, limits: Limits) -> int:
    """Returns the page size to use: the default for 0, capped at the maximum."""
    if page_size < 0:
        raise InvalidArgument("page_size must not be negative", field="page_size")
    if page_size == 0:
        return limits.default_page_size
    return min(page_size, limits.max_page_size)


def validate_job_condition(cond: spb.JobCondition) -> None:
    validate_job_state(cond.expected_state, "condition.expected_state", allow_unspecified=True)
    if cond.expected_version < 0:
        raise InvalidArgument("condition.expected_version must not be negative", field="condition")
    for s in cond.unexpected_states:
        validate_job_state(s, "condition.unexpected_states")


def validate_execution_condition(cond: spb.ExecutionCondition) -> None:
    if cond.expected_version < 0:
        raise InvalidArgument("condition.expected_version must not be negative", field="condition")
    for s in cond.expected_states:
        validate_execution_state(s, "condition.expected_states")
    for s in cond.unexpected_states:
        validate_execution_state(s, "condition.unexpected_states")


def validate_execution_values(e: pb.ExecutionState, limits: Limits, prefix: str = "execution") -> None:
    """Checks every writable field of ``e`` (enums known, sizes within limits)."""
    validate_execution_state(e.state, f"{prefix}.state", allow_unspecified=True)
    if e.desired_state not in DESIRED_STATES:
        raise InvalidArgument(
            f"{prefix}.desired_state has unknown ExecutionDesiredState {e.desired_state}",
            field=f"{prefix}.desired_state",
        )
    validate_text(e.status, f"{prefix}.status", limits.max_status_bytes)
    r = e.published_results
    for name in ("storage_source", "name", "cid", "url", "path"):
        validate_text(getattr(r, name), f"{prefix}.published_results.{name}", limits.max_field_bytes)
    if len(r.metadata) > limits.max_metadata_entries:
        raise InvalidArgument(
            f"{prefix}.published_results.metadata has more than {limits.max_metadata_entries} entries",
            field=f"{prefix}.published_results.metadata",
        )
    for k, v in r.metadata.items():
        validate_text(k, f"{prefix}.published_results.metadata key", limits.max_field_bytes)
        validate_text(v, f"{prefix}.published_results.metadata[{k[:40]!r}]", limits.max_field_bytes)
    o = e.run_output
    validate_text(o.stdout, f"{prefix}.run_output.stdout", limits.max_output_bytes)
    validate_text(o.stderr, f"{prefix}.run_output.stderr", limits.max_output_bytes)
    validate_text(o.runner_error, f"{prefix}.run_output.runner_error", limits.max_status_bytes)


# Top-level fields of ExecutionState that UpdateExecution may change; the others are identity or output only.
MUTABLE_EXECUTION_FIELDS = frozenset({"state", "status", "desired_state", "published_results", "run_output"})
_EXECUTION_DESCRIPTOR = pb.ExecutionState.DESCRIPTOR


def execution_update_paths(e: pb.ExecutionState, mask: field_mask_pb2.FieldMask) -> list[str]:
    """The field paths an UpdateExecution changes: the mask's, or every mutable field set in ``e``."""
    if mask.paths:
        paths = list(mask.paths)
        for path in paths:
            top = path.split(".", 1)[0]
            if top not in MUTABLE_EXECUTION_FIELDS:
                raise InvalidArgument(
                    f"update_mask path {path!r} cannot be changed; changeable: "
                    + ", ".join(sorted(MUTABLE_EXECUTION_FIELDS)),
                    field="update_mask",
                )
        if not mask.IsValidForDescriptor(_EXECUTION_DESCRIPTOR):
            raise InvalidArgument(
                f"update_mask {list(mask.paths)} names a field ExecutionState does not have",
                field="update_mask",
            )
        return paths
    paths = []
    if e.state:
        paths.append("state")
    if e.status:
        paths.append("status")
    if e.desired_state:
        paths.append("desired_state")
    if e.HasField("published_results"):
        paths.append("published_results")
    if e.HasField("run_output"):
        paths.append("run_output")
    if not paths:
        raise InvalidArgument("execution sets no field to change and update_mask is empty", field="execution")
    return paths


def apply_execution_update(target: pb.ExecutionState, source: pb.ExecutionState, paths: Sequence[str]) -> None:
    """Writes the ``paths`` of ``source`` into ``target``: a named field unset in ``source`` is cleared."""
    mask = field_mask_pb2.FieldMask(paths=list(paths))
    mask.MergeMessage(source, target, replace_message_field=True, replace_repeated_field=True)


# --- conditions --------------------------------------------------------------------------------------------


def check_job_condition(job: pb.JobState, cond: spb.JobCondition) -> None:
    if cond.expected_version and job.version != cond.expected_version:
        raise VersionMismatch(
            f"job {job.job_id} is at version {job.version}, not {cond.expected_version}",
            current_version=job.version,
        )
    if cond.expected_state and job.state != cond.expected_state:
        raise StateMismatch(
            f"job {job.job_id} is {job_state_name(job.state)}, not {job_state_name(cond.expected_state)}",
            current_state=job_state_name(job.state),
        )
    if job.state in cond.unexpected_states:
        raise StateMismatch(
            f"job {job.job_id} is {job_state_name(job.state)}, which the condition excludes",
            current_state=job_state_name(job.state),
        )


def check_execution_condition(e: pb.ExecutionState, cond: spb.ExecutionCondition) -> None:
    if cond.expected_version and e.version != cond.expected_version:
        raise VersionMismatch(
            f"execution {e.compute_reference} is at version {e.version}, not {cond.expected_version}",
            current_version=e.version,
        )
    if cond.expected_states and e.state not in cond.expected_states:
        raise StateMismatch(
            f"execution {e.compute_reference} is {execution_state_name(e.state)}, not one of "
            + ", ".join(execution_state_name(s) for s in cond.expected_states),
            current_state=execution_state_name(e.state),
        )
    if e.state in cond.unexpected_states:
        raise StateMismatch(
            f"execution {e.compute_reference} is {execution_state_name(e.state)}, which the condition excludes",
            current_state=execution_state_name(e.state),
        )


def node_ids(job: pb.JobState) -> frozenset[str]:
    return frozenset(e.node_id for e in job.executions)


def active_execution_on(executions: Iterable[pb.ExecutionState], node_id: str) -> pb.ExecutionState | None:
    for e in executions:
        if e.node_id == node_id and e.state not in TERMINAL_EXECUTION_STATES:
            return e
    return None
