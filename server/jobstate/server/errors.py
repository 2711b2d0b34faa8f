"""Domain errors of the store and the watch hub.

They are plain values that know nothing of gRPC: ``jobstate.server.service`` turns each into a status code
through one table. ``reason`` is the ``google.rpc.ErrorInfo`` reason a client switches on, and
``metadata`` the ErrorInfo metadata (string values, as ErrorInfo requires).
"""

from __future__ import annotations


class JobStateError(Exception):
    """Base of every error the store and the hub raise on purpose."""

    reason: str = "INTERNAL"

    def __init__(self, message: str, **metadata: object) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = {k: str(v) for k, v in metadata.items()}


class InvalidArgument(JobStateError):
    """The request is malformed; nothing was changed."""

    reason = "INVALID_ARGUMENT"


class JobNotFound(JobStateError):
    reason = "JOB_NOT_FOUND"


class ExecutionNotFound(JobStateError):
    reason = "EXECUTION_NOT_FOUND"


class JobAlreadyExists(JobStateError):
    reason = "JOB_ALREADY_EXISTS"


class ExecutionAlreadyExists(JobStateError):
    reason = "EXECUTION_ALREADY_EXISTS"


class VersionMismatch(JobStateError):
    """A compare-and-set lost: ``metadata['current_version']`` says what to retry with."""

    reason = "VERSION_MISMATCH"


class StateMismatch(JobStateError):
    """An expected or unexpected state condition did not hold."""

    reason = "STATE_MISMATCH"


class JobTerminal(JobStateError):
    reason = "JOB_TERMINAL"


class ExecutionTerminal(JobStateError):
    reason = "EXECUTION_TERMINAL"


class NodeHasActiveExecution(JobStateError):
    reason = "NODE_HAS_ACTIVE_EXECUTION"


class ResourceLimit(JobStateError):
    """A configured limit (jobs, executions per job, watchers) would be exceeded."""

    reason = "LIMIT_EXCEEDED"


class RateLimited(ResourceLimit):
    """A client wrote faster than its configured rate; ``retry_after`` seconds is when a write will pass."""

    reason = "RATE_LIMITED"

    def __init__(self, message: str, retry_after: float, **metadata: object) -> None:
        super().__init__(message, retry_after_ms=max(1, round(retry_after * 1000)), **metadata)
        self.retry_after = retry_after


class Unauthenticated(JobStateError):
    """The call carried no credential, or one the server does not know."""

    reason = "UNAUTHENTICATED"


class PermissionDenied(JobStateError):
    """The caller is known, but its role does not allow this method."""

    reason = "PERMISSION_DENIED"


class RevisionCompacted(JobStateError):
    """A watch asked for revisions no longer held: ``metadata['oldest_revision']`` is the oldest held."""

    reason = "REVISION_COMPACTED"


class WatcherLagged(JobStateError):
    """A watcher fell behind what the hub holds: ``metadata['resume_revision']`` is where to resume."""

    reason = "WATCHER_LAGGED"


class ShuttingDown(JobStateError):
    reason = "SHUTTING_DOWN"


class StoreUnavailable(JobStateError):
    """The storage engine cannot be reached (etcd down or without quorum); the call may be retried.

    As with etcd's own clients, a write that fails this way may or may not have been committed.
    """

    reason = "STORE_UNAVAILABLE"
