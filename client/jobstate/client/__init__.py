"""The jobstate client library.

``Client`` (blocking) and ``AsyncClient`` (asyncio) call every RPC of ``jobstate.v1.JobStateService``;
``watch()`` returns a stream that resumes by itself; informers keep a local copy of the jobs current.
Failures raise a ``JobStateError`` subclass, one per gRPC status code, with the server's ErrorInfo reason.
``describe()`` and the ``*_name()`` functions give states, events and jobs by name.
"""

from jobstate.client.aio import AsyncClient, AsyncWatchStream
from jobstate.client.core import Backoff, JobCache, execution_state, job_state
from jobstate.client.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    JobStateError,
    NotFound,
    OutOfRange,
    PermissionDenied,
    Reason,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
)
from jobstate.client.informer import AsyncInformer, Informer
from jobstate.client.names import describe, event_type_name, execution_state_name, job_state_name
from jobstate.client.sync import Client, WatchStream
from jobstate.v1.job_state_pb2 import (
    ExecutionDesiredState,
    ExecutionState,
    ExecutionStateType,
    JobHistoryEntry,
    JobState,
    JobStateType,
    RunCommandResult,
    StorageSpec,
)
from jobstate.v1.job_state_service_pb2 import WatchEvent, WatchEventType, WatchResponse

__all__ = [
    "Aborted",
    "AlreadyExists",
    "AsyncClient",
    "AsyncInformer",
    "AsyncWatchStream",
    "Backoff",
    "Cancelled",
    "Client",
    "DataLoss",
    "DeadlineExceeded",
    "ExecutionDesiredState",
    "ExecutionState",
    "ExecutionStateType",
    "FailedPrecondition",
    "Informer",
    "Internal",
    "InvalidArgument",
    "JobCache",
    "JobHistoryEntry",
    "JobState",
    "JobStateError",
    "JobStateType",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "Reason",
    "ResourceExhausted",
    "RunCommandResult",
    "StorageSpec",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "WatchEvent",
    "WatchEventType",
    "WatchResponse",
    "WatchStream",
    "describe",
    "event_type_name",
    "execution_state",
    "execution_state_name",
    "job_state",
    "job_state_name",
]
