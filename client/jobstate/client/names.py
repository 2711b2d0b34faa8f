"""Readable forms of states, events and jobs: the names the CLI prints and accepts, never bare enum numbers.

``describe(event)`` is what a program logging a watch wants (``CREATED job-1 NEW version 1 at revision 6``);
the live view, ``jobstate get`` and ``jobstate list`` use the same names, so a state reads the same everywhere
and can be typed back into the CLI (``--state BID_ACCEPTED``).
"""

from __future__ import annotations

from google.protobuf import text_format
from google.protobuf.message import Message

from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb

# Execution states in lifecycle order: counts are listed in it.
EXECUTION_ORDER = [
    pb.EXECUTION_STATE_TYPE_NEW,
    pb.EXECUTION_STATE_TYPE_ASK_FOR_BID,
    pb.EXECUTION_STATE_TYPE_ASK_FOR_BID_ACCEPTED,
    pb.EXECUTION_STATE_TYPE_BID_ACCEPTED,
    pb.EXECUTION_STATE_TYPE_COMPLETED,
    pb.EXECUTION_STATE_TYPE_FAILED,
    pb.EXECUTION_STATE_TYPE_ASK_FOR_BID_REJECTED,
    pb.EXECUTION_STATE_TYPE_BID_REJECTED,
    pb.EXECUTION_STATE_TYPE_CANCELLED,
]


def _short(enum: object, prefix: str, value: int) -> str:
    try:
        return str(enum.Name(value)).removeprefix(prefix)  # type: ignore[attr-defined]
    except ValueError:  # a value added by a newer server: still printable
        return str(value)


def job_state_name(value: int) -> str:
    """``QUEUED`` for ``JOB_STATE_TYPE_QUEUED`` (6); an unknown number as itself."""
    return _short(pb.JobStateType, "JOB_STATE_TYPE_", value)


def execution_state_name(value: int) -> str:
    """``BID_ACCEPTED`` for ``EXECUTION_STATE_TYPE_BID_ACCEPTED`` (5); an unknown number as itself."""
    return _short(pb.ExecutionStateType, "EXECUTION_STATE_TYPE_", value)


def event_type_name(value: int) -> str:
    """``CREATED`` for ``WATCH_EVENT_TYPE_CREATED``; an unknown number as itself."""
    return _short(spb.WatchEventType, "WATCH_EVENT_TYPE_", value)


def execution_counts(job: pb.JobState) -> list[tuple[int, int]]:
    """``[(BID_ACCEPTED, 1), (FAILED, 2)]``: the job's executions counted by state, in lifecycle order."""
    counts: dict[int, int] = {}
    for e in job.executions:
        counts[e.state] = counts.get(e.state, 0) + 1
    ordered = [s for s in EXECUTION_ORDER if s in counts] + sorted(s for s in counts if s not in EXECUTION_ORDER)
    return [(s, counts[s]) for s in ordered]


def executions_summary(job: pb.JobState) -> str:
    """``1 BID_ACCEPTED 2 FAILED``; empty without executions."""
    return " ".join(f"{n} {execution_state_name(s)}" for s, n in execution_counts(job))


def describe_job(job: pb.JobState) -> str:
    """``job-1 IN_PROGRESS version 7, executions: 1 BID_ACCEPTED 1 FAILED``."""
    text = f"{job.job_id} {job_state_name(job.state)} version {job.version}"
    summary = executions_summary(job)
    return text + (f", executions: {summary}" if summary else "")


def describe_event(event: spb.WatchEvent) -> str:
    """``CREATED job-1 NEW version 1 at revision 6``; ``BOOKMARK at revision 5``."""
    kind = event_type_name(event.type)
    if event.type == spb.WATCH_EVENT_TYPE_BOOKMARK or not event.HasField("job"):
        return f"{kind} at revision {event.revision}"
    job = describe_job(event.job)
    head, _, tail = job.partition(", ")
    return f"{kind} {head} at revision {event.revision}" + (f", {tail}" if tail else "")


def describe(message: Message) -> str:
    """One readable line for a watch event or response, a job or an execution; other messages in protobuf's
    text format on one line (which names enum values too)."""
    if isinstance(message, spb.WatchEvent):
        return describe_event(message)
    if isinstance(message, spb.WatchResponse):
        return "; ".join(describe_event(e) for e in message.events) or f"revision {message.revision}"
    if isinstance(message, pb.JobState):
        return describe_job(message)
    if isinstance(message, pb.ExecutionState):
        return (
            f"execution {message.compute_reference} of {message.job_id} on {message.node_id} "
            f"{execution_state_name(message.state)} version {message.version}"
        )
    return text_format.MessageToString(message, as_one_line=True)
