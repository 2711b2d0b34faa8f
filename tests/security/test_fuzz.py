"""Bad input: hypothesis-generated requests for every method, and random bytes as the raw request of every
method. Each call ends with a status (never UNKNOWN or INTERNAL: a crash), the server keeps serving, and a
call that was refused left the store exactly as it was (revision and every job)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as _descriptor
from google.protobuf import message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from secutil import ThreadServer

from jobstate.server.main import ServerConfig
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb

SERVICE = spb.DESCRIPTOR.services_by_name["JobStateService"]
METHODS = [m.name for m in SERVICE.methods]
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
CRASH = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNIMPLEMENTED}
TIMEOUT = 5
FD = _descriptor.FieldDescriptor

# Ids the store holds, so that generated requests reach past "not found" into the rules.
KNOWN_IDS = ["job-a", "job-b", "job-c", "n1", "n2", "e1"]
IDS = st.one_of(
    st.sampled_from(KNOWN_IDS),
    st.sampled_from(["", " ", "a" * 129, "../etc", "job-a\x00", "ü", "-x", "job-a "]),
    st.text(max_size=40),
)
INTS = st.one_of(st.integers(-3, 12), st.sampled_from([-(2**31), 2**31 - 1, 999]))
INT64S = st.one_of(st.integers(-3, 12), st.sampled_from([-(2**63), 2**63 - 1, 2**40]))


def strategy_for(desc: _descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[message.Message]:
    """Any message of ``desc``: each field absent or random, ids drawn mostly from the known ones."""
    cls = _message_class(desc)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for f in desc.fields:
        if depth > 3 and f.type == FD.TYPE_MESSAGE:
            continue
        value = _value(f, depth)
        if f.is_repeated and not _is_map(f):
            value = st.lists(value, max_size=3)
        fields[f.name] = value

    @st.composite
    def build(draw: st.DrawFn) -> message.Message:
        m = cls()
        for name, strat in fields.items():
            if not draw(st.booleans()):
                continue
            f = desc.fields_by_name[name]
            v = draw(strat)
            if _is_map(f):
                getattr(m, name).update(v)
            elif f.is_repeated:
                if f.type == FD.TYPE_MESSAGE:
                    getattr(m, name).extend(v)
                else:
                    getattr(m, name).extend(v)
            elif f.type == FD.TYPE_MESSAGE:
                getattr(m, name).CopyFrom(v)
            else:
                setattr(m, name, v)
        return m

    return build()


def _is_map(f: _descriptor.FieldDescriptor) -> bool:
    return f.type == FD.TYPE_MESSAGE and f.message_type.GetOptions().map_entry


def _message_class(desc: _descriptor.Descriptor) -> type[message.Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(desc)  # type: ignore[no-any-return]


def _value(f: _descriptor.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if _is_map(f):
        return st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3)
    if f.type == FD.TYPE_MESSAGE:
        name = f.message_type.full_name
        if name == "google.protobuf.Duration":
            # Never a short positive timeout: a job timing out mid-check would change the store by itself.
            return st.builds(_duration, st.one_of(st.integers(-(10**12), 0), st.integers(86_400 * 10**9, 10**20)))
        if name == "google.protobuf.Timestamp":
            return st.builds(_timestamp, st.integers(-(10**10), 10**10))
        if name == "google.protobuf.FieldMask":
            return st.builds(
                _mask, st.lists(st.sampled_from(["state", "status", "job_id", "nope", "run_output.stdout", ""]))
            )
        return strategy_for(f.message_type, depth + 1)
    if f.type == FD.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in f.enum_type.values]), st.integers(-5, 50))
    if f.type == FD.TYPE_STRING:
        return IDS if f.name.endswith(("_id", "_ids", "reference")) else st.text(max_size=60)
    if f.type == FD.TYPE_BYTES:
        return st.binary(max_size=40)
    if f.type == FD.TYPE_BOOL:
        return st.booleans()
    if f.type in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return INT64S
    if f.type in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if f.type in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if f.type in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return st.floats(allow_nan=True)
    return INTS


def _duration(ns: int) -> Any:
    from google.protobuf import duration_pb2

    d = duration_pb2.Duration()
    d.FromNanoseconds(ns)
    return d


def _timestamp(s: int) -> Any:
    from google.protobuf import timestamp_pb2

    return timestamp_pb2.Timestamp(seconds=s)


def _mask(paths: list[str]) -> Any:
    from google.protobuf import field_mask_pb2

    return field_mask_pb2.FieldMask(paths=paths)


class Fuzzed:
    """A server with a few jobs, a raw channel to it, and the counts of what was tried."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.channel = grpc.insecure_channel(server.target)
        self.calls = 0
        self.refused = 0
        self.codes: dict[str, int] = {}
        self.methods = {
            m.name: (
                f"/{SERVICE.full_name}/{m.name}",
                m.server_streaming,
                _message_class(m.input_type),
                _message_class(m.output_type),
            )
            for m in SERVICE.methods
        }
        for job_id in ("job-a", "job-b", "job-c"):
            self.raw("CreateJob", spb.CreateJobRequest(job_id=job_id).SerializeToString())
        req = spb.CreateExecutionRequest(
            job_id="job-a", execution=pb.ExecutionState(node_id="n1", compute_reference="e1")
        )
        self.raw("CreateExecution", req.SerializeToString())

    def state(self) -> tuple[int, list[bytes]]:
        """The store's revision and every job, serialized (read on the server's own loop)."""

        async def read() -> tuple[int, list[bytes]]:
            page = await self.server.store.list_jobs([], "", 1000, "")
            return page.revision, [j.SerializeToString(deterministic=True) for j in page.jobs]

        return self.server.call(read())  # type: ignore[no-any-return]

    def raw(self, method: str, data: bytes) -> grpc.StatusCode:
        path, streaming, _, _ = self.methods[method]
        self.calls += 1
        try:
            if streaming:
                call = self.channel.unary_stream(path, request_serializer=None, response_deserializer=None)(
                    data, timeout=0.3
                )
                for _ in call:
                    pass
            else:
                self.channel.unary_unary(path, request_serializer=None, response_deserializer=None)(
                    data, timeout=TIMEOUT
                )
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
        self.codes[code.name] = self.codes.get(code.name, 0) + 1
        return code

    def check(self, method: str, data: bytes) -> None:
        before = self.state()
        code = self.raw(method, data)
        assert code not in CRASH, f"{method} answered {code.name} to {data!r}"
        streaming = self.methods[method][1]
        if code != grpc.StatusCode.OK and not streaming:
            self.refused += 1
            assert self.state() == before, f"refused {method} ({code.name}) changed the store: {data!r}"
        if streaming or method in ("GetJob", "ListJobs", "GetJobHistory"):
            assert self.state() == before, f"read {method} changed the store"


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[Fuzzed]:
    server = ThreadServer(ServerConfig())
    f = Fuzzed(server)
    try:
        yield f
        with grpc.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        print(f"\nfuzz: {f.calls} calls, {f.refused} refused, codes {dict(sorted(f.codes.items()))}")
    finally:
        f.channel.close()
        server.stop()


FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], database=None
)


@pytest.mark.parametrize("method", METHODS)
def test_generated_requests(fuzzed: Fuzzed, method: str) -> None:
    desc = SERVICE.methods_by_name[method].input_type

    @FUZZ_SETTINGS
    @given(strategy_for(desc))
    def run(req: message.Message) -> None:
        fuzzed.check(method, req.SerializeToString())

    run()


@pytest.mark.parametrize("method", METHODS)
def test_random_bytes(fuzzed: Fuzzed, method: str) -> None:
    @FUZZ_SETTINGS
    @given(
        st.one_of(
            st.binary(max_size=256),
            # Valid framing with garbage inside: field tags of every wire type, lengths that lie.
            st.lists(st.sampled_from([b"\x0a", b"\x12\xff\xff\xff\xff\x0f", b"\x08\x80", b"\xff", b"\x1a\x05ab"])).map(
                b"".join
            ),
        )
    )
    def run(data: bytes) -> None:
        fuzzed.check(method, data)

    run()


def test_oversized_and_truncated_requests(fuzzed: Fuzzed) -> None:
    good = spb.CreateJobRequest(job_id="job-z", comment="x" * 100).SerializeToString()
    for method in METHODS:
        for data in (good[: len(good) // 2], b"\x0a" + b"\xff" * 9 + b"\x01", b"\x00" * 1000):
            fuzzed.check(method, data)
    # Bigger than the server's max message size: refused by gRPC itself, the server unharmed.
    before = fuzzed.state()
    assert fuzzed.raw("CreateJob", b"\x0a\x01x" + b"\x22" + b"\x80\x80\x80\x05" + b"y" * (10 * 1024 * 1024)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert fuzzed.state() == before


def _heavy_run(fuzzed: Fuzzed, method: str) -> None:
    desc = SERVICE.methods_by_name[method].input_type

    @settings(FUZZ_SETTINGS, max_examples=EXAMPLES * 10)
    @given(strategy_for(desc), st.binary(max_size=512))
    def run(req: message.Message, noise: bytes) -> None:
        fuzzed.check(method, req.SerializeToString())
        fuzzed.check(method, noise)

    run()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_generated_requests_heavy(fuzzed: Fuzzed) -> None:
    for method in METHODS:
        _heavy_run(fuzzed, method)
