"""Speaking Connect and gRPC-Web by hand with httpx, as a curl user or a browser would: no generated client, so
the tests see the exact bytes, headers and status codes on the wire.

- ``unary(client, method, body)``: a Connect unary call in JSON (dict) or binary (a message); returns the
  ``httpx.Response``.
- ``stream(client, method, request, ...)``: a Connect (or gRPC-Web) server-streaming call; ``Stream`` reads its
  envelopes one by one as they arrive and, at the end, the error of the end-of-stream message (Connect) or the
  trailers (gRPC-Web).
- ``error_info(body)``: the google.rpc.ErrorInfo in a Connect error's details.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from google.protobuf import json_format, message
from google.rpc import error_details_pb2

from jobstate.v1 import job_state_service_pb2 as spb

SERVICE = "/jobstate.v1.JobStateService/"
ERROR_INFO_TYPE = "google.rpc.ErrorInfo"


def unary(
    client: httpx.Client,
    method: str,
    body: dict[str, Any] | message.Message | bytes,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    h = dict(headers or {})
    if isinstance(body, dict):
        h.setdefault("content-type", "application/json")
        content = json.dumps(body).encode()
    elif isinstance(body, message.Message):
        h.setdefault("content-type", "application/proto")
        content = body.SerializeToString()
    else:
        content = body
    return client.post(SERVICE + method, content=content, headers=h)


def ok_json(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    out: dict[str, Any] = response.json()
    return out


def error_info(body: dict[str, Any]) -> error_details_pb2.ErrorInfo:
    """The one ErrorInfo of a Connect error body (as JSON), decoded from its base64 value."""
    infos = [d for d in body.get("details", []) if d["type"] == ERROR_INFO_TYPE]
    assert len(infos) == 1, body
    value = infos[0]["value"]
    return error_details_pb2.ErrorInfo.FromString(base64.b64decode(value + "=" * (-len(value) % 4)))


def envelope(payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(payload)) + payload


@dataclass
class Stream:
    """A streaming call's response, read envelope by envelope."""

    response: httpx.Response
    json: bool
    grpc_web: bool
    _chunks: Iterator[bytes] = field(init=False)
    _buf: bytes = b""
    end: dict[str, Any] | None = None  # Connect's end-of-stream message
    trailers: dict[str, str] | None = None  # gRPC-Web's trailers

    def __post_init__(self) -> None:
        self._chunks = self.response.iter_raw()

    def _read(self, n: int) -> bytes | None:
        while len(self._buf) < n:
            try:
                self._buf += next(self._chunks)
            except StopIteration:
                return None
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def next(self) -> spb.WatchResponse | None:
        """The next message, or None once the stream ended (then ``end`` or ``trailers`` is set)."""
        head = self._read(5)
        if head is None:
            return None
        flags, length = struct.unpack(">BI", head)
        payload = self._read(length)
        assert payload is not None, "stream cut inside an envelope"
        if self.grpc_web and flags & 0x80:
            lines = payload.decode().split("\r\n")
            self.trailers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines if ln)}
            return None
        if not self.grpc_web and flags & 0x02:
            self.end = json.loads(payload)
            return None
        m = spb.WatchResponse()
        if self.json:
            json_format.Parse(payload, m)
        else:
            m.ParseFromString(payload)
        return m

    def events(self, n: int) -> list[spb.WatchEvent]:
        """The next ``n`` events that are not bookmarks."""
        out: list[spb.WatchEvent] = []
        while len(out) < n:
            r = self.next()
            assert r is not None, f"stream ended after {len(out)} of {n} events: {self.end or self.trailers}"
            out.extend(e for e in r.events if e.type != spb.WATCH_EVENT_TYPE_BOOKMARK)
        return out

    def error(self) -> dict[str, Any] | None:
        """Reads to the end; the end-of-stream error (Connect), or None when it ended cleanly."""
        while self.next() is not None:
            pass
        assert self.end is not None, "no end-of-stream message"
        err: dict[str, Any] | None = self.end.get("error")
        return err


def open_stream(
    client: httpx.Client,
    method: str,
    request: message.Message,
    *,
    json_codec: bool = True,
    grpc_web: bool = False,
    headers: dict[str, str] | None = None,
) -> Any:
    """A context manager of a ``Stream`` (the response is closed, and the call cancelled, on exit)."""
    if grpc_web:
        ctype = "application/grpc-web+json" if json_codec else "application/grpc-web+proto"
    else:
        ctype = "application/connect+json" if json_codec else "application/connect+proto"
    payload = json_format.MessageToJson(request).encode() if json_codec else request.SerializeToString()
    h = {"content-type": ctype, **(headers or {})}
    if grpc_web:
        h.setdefault("x-grpc-web", "1")

    class _Ctx:
        def __enter__(self) -> Stream:
            req = client.build_request("POST", SERVICE + method, content=envelope(payload), headers=h)
            self.response = client.send(req, stream=True)
            return Stream(self.response, json_codec, grpc_web)

        def __exit__(self, *exc: object) -> None:
            self.response.close()

    return _Ctx()
