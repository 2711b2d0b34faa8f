"""The HTTP door: the Connect protocol (JSON and binary, unary and server streaming, GET for the reads) and
gRPC-Web, a thin adapter over ``JobStateService``.

The protocols themselves are the ``connectrpc`` runtime's (its ASGI application, made from the stubs that
``protoc-gen-connectrpc`` generated into gen/); this module gives it the service's methods:

- Requests reach the door as bytes (``_Raw``), as they reach the gRPC door, and are parsed inside the service's
  call: a malformed body is an ``InvalidArgument`` like any other, counted, with its ErrorInfo. JSON is read
  strictly: an unknown field is refused naming it (a typo such as ``expectedVersoin`` must never turn a
  conditional write into an unconditional one), and so are a wrong type and an unknown enum name.
- A domain error becomes a ``ConnectError`` with the Connect code of the one table (``service.ERRORS``) and
  the same details as over gRPC (ErrorInfo, RetryInfo), each packed as an ``Any``.
- Callers are checked by the same ``SecurityInterceptor`` as over gRPC (``Authorization: Bearer``), with the
  same roles, write rate and watch streams per client; a reload of the tokens file ends revoked HTTP watches.
- Watch sends the store id in the ``jobstate-store-id`` response header, and a resume presents it in the same
  request header. Watch responses come from the store serialized once for every watcher; for JSON each is
  converted once and the text shared by the JSON watchers (``_JsonWatchCache``).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any, NamedTuple, cast

import grpc
from connectrpc.code import Code
from connectrpc.errors import ConnectError, ErrorDetail
from connectrpc.request import RequestContext
from google.protobuf import json_format, message
from protobuf.wkt import Any as AnyPb

from jobstate.server import errors
from jobstate.server.security import SecurityInterceptor
from jobstate.server.service import CALLER, STORE_ID_KEY, JobStateService, error_details, parse, wire_of
from jobstate.v1 import job_state_service_pb2 as spb

CONNECT = "connect"
GRPC_WEB = "grpc-web"
Ctx = RequestContext[Any, Any]


class _Raw(NamedTuple):
    """A request's bytes and the codec they came in; parsed by the door, inside the service's call."""

    data: bytes
    codec: str


def protocol_of(ctx: Ctx) -> str:
    return GRPC_WEB if ctx.request_headers.get("content-type", "").startswith("application/grpc-web") else CONNECT


# --- codecs ------------------------------------------------------------------------------------------------


class _JsonWatchCache:
    """JSON text of the last serialized WatchResponses. The store hands every watcher the same bytes object,
    so a hundred JSON watchers cost one conversion per change. Bounded in bytes (what it holds of both forms);
    a response larger than a tenth of that (a watcher's own catch-up batch, shared by no one) is not kept."""

    BUDGET = 4 * 1024 * 1024

    def __init__(self) -> None:
        self._texts: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0

    def get(self, data: bytes) -> bytes:
        text = self._texts.get(data)
        if text is not None:
            return text
        text = to_json(spb.WatchResponse.FromString(data))
        size = len(data) + len(text)
        if size <= self.BUDGET // 10:
            self._texts[data] = text
            self._bytes += size
            while self._bytes > self.BUDGET:
                old, old_text = self._texts.popitem(last=False)
                self._bytes -= len(old) + len(old_text)
        return text


def to_json(m: message.Message) -> bytes:
    return json.dumps(json_format.MessageToDict(m), separators=(",", ":")).encode()


class RawCodec:
    """A connectrpc codec that leaves requests as bytes (``_Raw``) and writes responses: messages, or a Watch
    response already serialized by the store (passed on as is in binary, converted once in JSON)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._json = name == "json"
        self._watch = _JsonWatchCache()

    def name(self) -> str:
        return self._name

    def decode(self, data: bytes | bytearray, message_class: type[Any]) -> _Raw:
        return _Raw(bytes(data), self._name)

    def encode(self, m: message.Message | bytes) -> bytes:
        if isinstance(m, bytes):
            return self._watch.get(m) if self._json else m
        return to_json(m) if self._json else m.SerializeToString()


def codecs() -> list[RawCodec]:
    return [RawCodec("proto"), RawCodec("json")]


# --- strict JSON ---------------------------------------------------------------------------------------------

_NESTED = re.compile(r"Failed to parse (\S+) field: ")
_UNKNOWN = re.compile(r'has no field named "([^"]+)"')


def parse_request(kind: type[message.Message], raw: _Raw) -> Any:
    if raw.codec != "json":
        return parse(kind, raw.data)
    name = kind.DESCRIPTOR.name
    try:
        doc = json.loads(raw.data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise errors.InvalidArgument(f"request is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise errors.InvalidArgument(f"a {name} in JSON is an object, not {type(doc).__name__}")
    m = kind()
    try:
        json_format.ParseDict(doc, m, ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        text = str(exc)
        path = _NESTED.findall(text)
        unknown = _UNKNOWN.search(text)
        if unknown:
            path.append(unknown.group(1))
            field = ".".join(path)
            raise errors.InvalidArgument(
                f"{name} has no field {field!r} (refused rather than ignored, so a misspelt condition is "
                "never dropped)",
                field=field,
            ) from exc
        why = _NESTED.sub("", text).rstrip(".")
        raise errors.InvalidArgument(
            f"{name}: field {'.'.join(path) or '?'}: {why}", **({"field": ".".join(path)} if path else {})
        ) from exc
    return m


# --- errors --------------------------------------------------------------------------------------------------


def connect_error(exc: errors.JobStateError) -> ConnectError:
    """The Connect error of a domain error: the table's code, the message, the same details as over gRPC."""
    details = [ErrorDetail(AnyPb(type_url=d.type_url, value=d.value)) for d in error_details(exc)]
    return ConnectError(Code(wire_of(exc).connect), exc.message, details)


# --- the door ------------------------------------------------------------------------------------------------


def _peer(ctx: Ctx) -> str:
    address = ctx.client_address or ""
    return address.rsplit(":", 1)[0] if ":" in address else address


class HttpDoor:
    """The service's methods as connectrpc calls them (the generated ``JobStateService`` protocol)."""

    def __init__(self, service: JobStateService, security: SecurityInterceptor | None) -> None:
        self.service = service
        self.security = security

    def _admit(self, name: str, ctx: Ctx, protocol: str, watch: bool = False) -> Any:
        """The caller, once the security layer lets it call ``name``; a refusal is counted here."""
        security = self.security
        if security is None:
            return None
        try:
            principal = security.identify(ctx.request_headers.get("authorization"), None, _peer(ctx))
            security.admit(principal, name)
            CALLER.set(principal.name)  # this call's own task: the store counts the jobs it creates per caller
            if watch:
                security.watch_slot(principal)
        except errors.JobStateError as exc:
            security.refused(name, _peer(ctx), exc, protocol)
            raise connect_error(exc) from None
        return principal

    async def _unary(self, name: str, raw: _Raw, ctx: Ctx) -> message.Message:
        protocol = protocol_of(ctx)
        self._admit(name, ctx, protocol)
        kind, fn = self.service.unary[name]
        try:
            return await self.service.call(name, protocol, lambda: fn(parse_request(kind, raw)))
        except errors.JobStateError as exc:
            raise connect_error(exc) from None

    async def create_job(self, raw: _Raw, ctx: Ctx, /) -> message.Message:
        return await self._unary("CreateJob", raw, ctx)

    async def get_job(self, raw: _Raw, ctx: Ctx, /) -> message.Message:
        return await self._unary("GetJob", raw, ctx)

    async def list_jobs(self, raw: _Raw, ctx: Ctx, /) -> message.Message:
        return await self._unary("ListJobs", raw, ctx)

    async def update_job_state(self, raw: _Raw, ctx: Ctx, /) -> message.Message:
        return await self._unary("UpdateJobState", raw, ctx)

    async def create_execution(self, raw: _Raw, ctx: Ctx, /) -> message.Message:
        return await self._unary("CreateExecution", raw, ctx)

    async def update_execution(self, raw: _Raw, ctx: Ctx, /) -> message.Message:
        return await self._unary("UpdateExecution", raw, ctx)

    async def delete_job(self, raw: _Raw, ctx: Ctx, /) -> message.Message:
        return await self._unary("DeleteJob", raw, ctx)

    async def get_job_history(self, raw: _Raw, ctx: Ctx, /) -> message.Message:
        return await self._unary("GetJobHistory", raw, ctx)

    async def watch(self, raw: _Raw, ctx: Ctx, /) -> AsyncIterator[bytes]:
        service, security = self.service, self.security
        protocol = protocol_of(ctx)
        principal = self._admit("Watch", ctx, protocol, watch=True)
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            request = parse_request(spb.WatchRequest, raw)
            stream = service.open_watch(request, ctx.request_headers.get(STORE_ID_KEY, ""))
            if service.store.store_id:
                # connectrpc sends the headers with the first message (a bookmark, an event or the end).
                ctx.response_headers[STORE_ID_KEY] = service.store.store_id
            messages: AsyncIterator[bytes] = stream
            if security is not None:
                authorization, peer = ctx.request_headers.get("authorization"), _peer(ctx)

                def recheck() -> Any:
                    return security.identify(authorization, None, peer)

                messages = security.watching(principal, "Watch", recheck, stream)
            async with contextlib.aclosing(stream), _closing(messages):
                async for response in messages:
                    yield response
        except errors.JobStateError as exc:
            code = service.watch_ended(exc, _peer(ctx))
            raise connect_error(exc) from None
        except BaseException:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            service.observe("Watch", code, start, protocol)


@contextlib.asynccontextmanager
async def _closing(it: AsyncIterator[Any]) -> AsyncIterator[None]:
    try:
        yield
    finally:
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            await aclose()


def asgi_app(door: HttpDoor, max_message_bytes: int) -> Any:
    """connectrpc's ASGI application of the service, on the door's methods and codecs."""
    from jobstate.v1.job_state_service_connect import JobStateServiceASGIApplication

    return JobStateServiceASGIApplication(
        cast(Any, door),
        read_max_bytes=max_message_bytes,
        codecs=cast(Any, codecs()),
    )
