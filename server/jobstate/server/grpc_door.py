"""The gRPC door: ``jobstate.v1.JobStateService`` over grpc.aio, a thin adapter over ``JobStateService``.

It reads the call's bytes and metadata, calls the core, and turns a domain error into a rich status through the
one table (``service.to_status``). Requests are parsed here rather than by grpc, so that garbage bytes get
INVALID_ARGUMENT (grpc's own deserializer failure would be INTERNAL). Watch responses arrive from the store
already serialized (each change is encoded once for all watchers), so Watch's response serializer is the
identity.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf import message

from jobstate.server import errors
from jobstate.server.service import SERVICE_NAME, STORE_ID_KEY, JobStateService, parse, to_status
from jobstate.v1 import job_state_service_pb2 as spb

PROTOCOL = "grpc"
Context = grpc.aio.ServicerContext[Any, Any]


def _metadata(context: Context, key: str) -> str:
    for k, v in context.invocation_metadata() or ():
        if k == key and isinstance(v, str):
            return v
    return ""


async def _abort(context: Context, exc: errors.JobStateError) -> NoReturn:
    status = to_status(exc)
    await context.abort(status.code, status.details, status.trailing_metadata)


class GrpcDoor:
    """The generic handler of the service for a grpc.aio server."""

    def __init__(self, service: JobStateService) -> None:
        self.service = service

    async def watch(self, data: bytes, context: Context) -> AsyncIterator[bytes]:
        service = self.service
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            stream = service.open_watch(parse(spb.WatchRequest, data), _metadata(context, STORE_ID_KEY))
            if service.store.store_id:
                # Sent before any event, so a client knows which store its revisions belong to from the start.
                await context.send_initial_metadata(((STORE_ID_KEY, service.store.store_id),))
            # aclosing: a cancelled call releases its watcher now, not whenever the generator is collected.
            async with contextlib.aclosing(stream):
                async for response in stream:
                    yield response
        except errors.JobStateError as exc:
            code = service.watch_ended(exc, context.peer())
            await _abort(context, exc)
        except BaseException:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            service.observe("Watch", code, start, PROTOCOL)

    def _unary(
        self, name: str, kind: type[message.Message], fn: Callable[[Any], Awaitable[message.Message]]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        service = self.service

        async def handler(data: bytes, context: Context) -> message.Message:
            try:
                return await service.call(name, PROTOCOL, lambda: fn(parse(kind, data)))
            except errors.JobStateError as exc:
                await _abort(context, exc)

        return grpc.unary_unary_rpc_method_handler(handler, request_deserializer=None, response_serializer=_serialize)

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            name: self._unary(name, kind, fn) for name, (kind, fn) in self.service.unary.items()
        }
        handlers["Watch"] = grpc.unary_stream_rpc_method_handler(
            self.watch, request_deserializer=None, response_serializer=None
        )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def _serialize(m: message.Message) -> bytes:
    return m.SerializeToString()
