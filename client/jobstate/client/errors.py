"""Client exceptions: one class per gRPC status code, each carrying the server's ErrorInfo.

Every ``grpc.StatusCode`` except OK has exactly one class here, registered as the class is defined, so the
mapping cannot drift (tests/client/test_errors.py checks it). ``reason`` and ``metadata`` come from the
``google.rpc.ErrorInfo`` the server attaches (domain ``jobstate``); switch on ``reason`` (see ``Reason``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import grpc
from google.rpc import error_details_pb2, status_pb2

ERROR_DOMAIN = "jobstate"
_DETAILS_KEY = "grpc-status-details-bin"


class Reason:
    """The ErrorInfo reasons of docs/CONTRACT.md's error table."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    JOB_NOT_FOUND = "JOB_NOT_FOUND"
    EXECUTION_NOT_FOUND = "EXECUTION_NOT_FOUND"
    JOB_ALREADY_EXISTS = "JOB_ALREADY_EXISTS"
    EXECUTION_ALREADY_EXISTS = "EXECUTION_ALREADY_EXISTS"
    VERSION_MISMATCH = "VERSION_MISMATCH"
    STATE_MISMATCH = "STATE_MISMATCH"
    JOB_TERMINAL = "JOB_TERMINAL"
    EXECUTION_TERMINAL = "EXECUTION_TERMINAL"
    NODE_HAS_ACTIVE_EXECUTION = "NODE_HAS_ACTIVE_EXECUTION"
    REVISION_COMPACTED = "REVISION_COMPACTED"
    WATCHER_LAGGED = "WATCHER_LAGGED"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    LIMIT_EXCEEDED = "LIMIT_EXCEEDED"
    # SECURITY.md: refusals of the security layer.
    RATE_LIMITED = "RATE_LIMITED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"


class JobStateError(Exception):
    """An RPC failed. ``code`` is the status code, ``reason`` the ErrorInfo reason ("" when the server sent
    none, e.g. a transport failure), ``metadata`` the ErrorInfo metadata."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    _by_code: ClassVar[dict[grpc.StatusCode, type[JobStateError]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.code in JobStateError._by_code:
            raise TypeError(f"{cls.__name__}: {cls.code} already maps to {JobStateError._by_code[cls.code].__name__}")
        JobStateError._by_code[cls.code] = cls

    def __init__(
        self, message: str, reason: str = "", metadata: dict[str, str] | None = None, retry_delay: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        # Seconds to wait before trying again, from the server's google.rpc.RetryInfo (RATE_LIMITED sends one).
        self.retry_delay = retry_delay

    def __str__(self) -> str:
        head = f"{self.code.name}"
        if self.reason:
            head += f" ({self.reason})"
        return f"{head}: {self.message}"

    @property
    def current_version(self) -> int | None:
        """For VERSION_MISMATCH: the version the job (or execution) is at now."""
        return _int(self.metadata.get("current_version"))

    @property
    def oldest_revision(self) -> int | None:
        """For REVISION_COMPACTED: the oldest revision the server still holds."""
        return _int(self.metadata.get("oldest_revision"))

    @property
    def resume_revision(self) -> int | None:
        """For WATCHER_LAGGED: the revision to resume the watch from."""
        return _int(self.metadata.get("resume_revision"))

    @classmethod
    def for_code(cls, code: grpc.StatusCode) -> type[JobStateError]:
        return cls._by_code.get(code, Unknown)

    @classmethod
    def from_rpc_error(cls, exc: grpc.RpcError) -> JobStateError:
        """The exception for a failed call (sync ``grpc.RpcError`` or ``grpc.aio.AioRpcError``)."""
        call: Any = exc  # sync and aio errors are both Calls, typed differently by the stubs
        code: grpc.StatusCode = call.code()
        message: str = call.details() or ""
        reason: str = ""
        metadata: dict[str, str] = {}
        retry_delay: float | None = None
        for key, value in call.trailing_metadata() or ():
            if key == _DETAILS_KEY and isinstance(value, bytes):
                reason, metadata, retry_delay = _details(value)
        return cls.for_code(code)(message, reason, metadata, retry_delay)


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.lstrip("-").isdigit() else None


def _details(data: bytes) -> tuple[str, dict[str, str], float | None]:
    """The ErrorInfo reason and metadata, and the RetryInfo delay, of a ``google.rpc.Status``."""
    try:
        status = status_pb2.Status.FromString(data)
    except Exception:  # a malformed detail must not hide the status code itself
        return "", {}, None
    reason, metadata, delay = "", {}, None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        retry = error_details_pb2.RetryInfo()
        if not reason and detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
            reason, metadata = info.reason, dict(info.metadata)
        elif delay is None and detail.Is(retry.DESCRIPTOR) and detail.Unpack(retry):
            delay = max(0.0, retry.retry_delay.ToNanoseconds() / 1e9)
    return reason, metadata, delay


class Cancelled(JobStateError):
    code = grpc.StatusCode.CANCELLED


class Unknown(JobStateError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(JobStateError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(JobStateError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(JobStateError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(JobStateError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(JobStateError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(JobStateError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(JobStateError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(JobStateError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(JobStateError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(JobStateError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(JobStateError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(JobStateError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(JobStateError):
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(JobStateError):
    code = grpc.StatusCode.UNAUTHENTICATED
