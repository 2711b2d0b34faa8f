"""The two systems behind one small interface, each driven through its raw generated gRPC stubs.

jobstate: ``jobstate.v1.job_state_service_pb2_grpc`` over grpc.aio. etcd: the stubs that the ``aetcd`` package
ships (``aetcd.rpc``, also grpc.aio): a job state is one key ``/jobs/<id>`` whose value is the serialized
``JobState``, a conditional update is a txn comparing ``mod_revision``, a watch is a watch from a revision.
Both sides use the same thin layer (no client-library caches, callbacks or queues), so the figures compare the
servers, and every watcher parses each ``JobState`` it receives on both sides.

A write carries its send time (``time.time_ns()``) in the payload, in ``executions[0].status``, so a watcher
measures send-to-receipt latency the same way on both sides.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from aetcd import rpc as erpc
from google.rpc import error_details_pb2, status_pb2

from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb
from jobstate.v1 import job_state_service_pb2_grpc

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]

JS = pb.JobStateType
ES = pb.ExecutionStateType
IN_PROGRESS = JS.JOB_STATE_TYPE_IN_PROGRESS
QUEUED = JS.JOB_STATE_TYPE_QUEUED
INITIAL = spb.WatchEventType.WATCH_EVENT_TYPE_INITIAL
BOOKMARK = spb.WatchEventType.WATCH_EVENT_TYPE_BOOKMARK
PREFIX = b"/jobs/"
PREFIX_END = b"/jobs0"  # "/" + 1: the end of the prefix range


def sent_ns(job: pb.JobState) -> int:
    """The send time a writer put in the job, or 0."""
    if job.executions:
        status = job.executions[0].status
        if status.isdigit():
            return int(status)
    return 0


@dataclass(slots=True)
class Token:
    """What a writer needs for its next conditional write: jobstate's version; etcd's mod_revision and value."""

    version: int
    job: pb.JobState | None = None


class Conflict(Exception):
    def __init__(self, token: Token) -> None:
        self.token = token


class Backend:
    name = ""

    async def close(self) -> None: ...

    async def create(self, job_id: str, executions: int = 0) -> Token:
        raise NotImplementedError

    async def add_execution(self, job_id: str, token: Token, node: str) -> Token:
        raise NotImplementedError

    async def cas(self, job_id: str, token: Token, new_state: int) -> Token:
        """A compare-and-set of the job's state; raises ``Conflict`` carrying the current token."""
        raise NotImplementedError

    async def touch(self, job_id: str, token: Token) -> Token:
        """An unconditional write stamping the send time in ``executions[0].status``."""
        raise NotImplementedError

    async def head(self) -> int:
        raise NotImplementedError

    def watch(self, job_id: str | None, start_revision: int) -> AsyncIterator[list[pb.JobState]]:
        """Batches of received job states (each as parsed), from ``start_revision`` on."""
        raise NotImplementedError

    async def list_then_watch(self) -> tuple[int, int]:
        """List every job then be watching from the listed revision: (jobs seen, revision)."""
        raise NotImplementedError

    async def catch_up(self, start_revision: int, until: int) -> int:
        """Watch from ``start_revision`` until ``until`` has arrived; the number of events received."""
        n = 0
        async for batch in self.watch(None, start_revision):
            n += len(batch)
            if batch and self.last_revision >= until:
                return n
        return n

    last_revision = 0


def _now_ts(msg: Any, ns: int) -> None:
    msg.FromNanoseconds(ns)


class Jobstate(Backend):
    name = "jobstate"

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = job_state_service_pb2_grpc.JobStateServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def create(self, job_id: str, executions: int = 0) -> Token:
        r = await self.stub.CreateJob(spb.CreateJobRequest(job_id=job_id))
        token = Token(r.job.version)
        for i in range(executions):
            token = await self.add_execution(job_id, token, f"node-{i}")
        return token

    async def add_execution(self, job_id: str, token: Token, node: str) -> Token:
        r = await self.stub.CreateExecution(
            spb.CreateExecutionRequest(
                job_id=job_id,
                execution=pb.ExecutionState(
                    node_id=node, desired_state=pb.ExecutionDesiredState.EXECUTION_DESIRED_STATE_RUNNING
                ),
            )
        )
        return Token(r.job.version)

    async def cas(self, job_id: str, token: Token, new_state: int) -> Token:
        try:
            r = await self.stub.UpdateJobState(
                spb.UpdateJobStateRequest(
                    job_id=job_id,
                    new_state=new_state,  # type: ignore[arg-type]
                    condition=spb.JobCondition(expected_version=token.version),
                )
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ABORTED:
                raise
            raise Conflict(Token(_current_version(exc))) from None
        return Token(r.job.version)

    async def touch(self, job_id: str, token: Token) -> Token:
        r = await self.stub.UpdateExecution(
            spb.UpdateExecutionRequest(
                job_id=job_id,
                compute_reference=f"{job_id}-e0",
                execution=pb.ExecutionState(status=str(time.time_ns())),
            )
        )
        return Token(r.job.version)

    async def create_watched(self, job_id: str) -> Token:
        """A job with one execution whose status the fan-out writer stamps."""
        await self.stub.CreateJob(spb.CreateJobRequest(job_id=job_id))
        r = await self.stub.CreateExecution(
            spb.CreateExecutionRequest(
                job_id=job_id, execution=pb.ExecutionState(node_id="node-0", compute_reference=f"{job_id}-e0")
            )
        )
        return Token(r.job.version)

    async def head(self) -> int:
        r = await self.stub.ListJobs(spb.ListJobsRequest(page_size=1))
        return r.revision

    async def watch(self, job_id: str | None, start_revision: int) -> AsyncIterator[list[pb.JobState]]:
        req = spb.WatchRequest(job_ids=[job_id] if job_id else [], start_revision=start_revision)
        call = self.stub.Watch(req)
        try:
            async for resp in call:
                if resp.events:
                    self.last_revision = resp.events[-1].revision
                    yield [e.job for e in resp.events]
        finally:
            call.cancel()

    async def watch_initial(self, job_id: str) -> AsyncIterator[list[pb.JobState]]:
        """A watch of one job with send_initial_state: its first message proves the watch is registered."""
        call = self.stub.Watch(spb.WatchRequest(job_ids=[job_id], send_initial_state=True))
        try:
            async for resp in call:
                yield [e.job for e in resp.events if e.type != BOOKMARK]
        finally:
            call.cancel()

    async def list_then_watch(self) -> tuple[int, int]:
        call = self.stub.Watch(spb.WatchRequest(send_initial_state=True))
        n = 0
        try:
            async for resp in call:
                for e in resp.events:
                    if e.type == INITIAL:
                        n += 1
                    elif e.type == BOOKMARK:
                        return n, e.revision
        finally:
            call.cancel()
        raise RuntimeError("watch ended before its bookmark")


class JobstateConnect(Backend):
    """jobstate over its HTTP listener: the Connect protocol from connectrpc's generated client (gen/), JSON or
    binary, on HTTP/1.1 (pyqwest). ``target`` is the listener's base URL. Same calls as ``Jobstate``."""

    name = "jobstate-connect"

    def __init__(self, target: str, json: bool) -> None:
        from connectrpc.compat import google_protobuf_binary_codec, google_protobuf_json_codec

        from jobstate.v1.job_state_service_connect import JobStateServiceClient

        codec = google_protobuf_json_codec() if json else google_protobuf_binary_codec()
        # No compression either way: gRPC sends these messages uncompressed too.
        self.client = JobStateServiceClient(target, codec=codec, send_compression=None, accept_compression=())

    async def close(self) -> None:
        await self.client.close()

    async def create(self, job_id: str, executions: int = 0) -> Token:
        r = await self.client.create_job(spb.CreateJobRequest(job_id=job_id))
        token = Token(r.job.version)
        for i in range(executions):
            token = await self.add_execution(job_id, token, f"node-{i}")
        return token

    async def add_execution(self, job_id: str, token: Token, node: str) -> Token:
        r = await self.client.create_execution(
            spb.CreateExecutionRequest(
                job_id=job_id,
                execution=pb.ExecutionState(
                    node_id=node, desired_state=pb.ExecutionDesiredState.EXECUTION_DESIRED_STATE_RUNNING
                ),
            )
        )
        return Token(r.job.version)

    async def cas(self, job_id: str, token: Token, new_state: int) -> Token:
        from connectrpc.code import Code
        from connectrpc.errors import ConnectError

        try:
            r = await self.client.update_job_state(
                spb.UpdateJobStateRequest(
                    job_id=job_id,
                    new_state=new_state,  # type: ignore[arg-type]
                    condition=spb.JobCondition(expected_version=token.version),
                )
            )
        except ConnectError as exc:
            if exc.code != Code.ABORTED:
                raise
            info = error_details_pb2.ErrorInfo.FromString(exc.details[0].message_bytes)
            raise Conflict(Token(int(info.metadata["current_version"]))) from None
        return Token(r.job.version)

    async def touch(self, job_id: str, token: Token) -> Token:
        r = await self.client.update_execution(
            spb.UpdateExecutionRequest(
                job_id=job_id,
                compute_reference=f"{job_id}-e0",
                execution=pb.ExecutionState(status=str(time.time_ns())),
            )
        )
        return Token(r.job.version)

    async def create_watched(self, job_id: str) -> Token:
        await self.client.create_job(spb.CreateJobRequest(job_id=job_id))
        r = await self.client.create_execution(
            spb.CreateExecutionRequest(
                job_id=job_id, execution=pb.ExecutionState(node_id="node-0", compute_reference=f"{job_id}-e0")
            )
        )
        return Token(r.job.version)

    async def get_version(self, job_id: str) -> Token:
        r = await self.client.get_job(spb.GetJobRequest(job_id=job_id))
        return Token(r.job.version)

    async def head(self) -> int:
        r = await self.client.list_jobs(spb.ListJobsRequest(page_size=1))
        return r.revision

    async def watch(self, job_id: str | None, start_revision: int) -> AsyncIterator[list[pb.JobState]]:
        req = spb.WatchRequest(job_ids=[job_id] if job_id else [], start_revision=start_revision)
        stream = self.client.watch(req)
        try:
            async for resp in stream:
                if resp.events:
                    self.last_revision = resp.events[-1].revision
                    yield [e.job for e in resp.events]
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()


def _current_version(exc: grpc.aio.AioRpcError) -> int:
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return int(info.metadata["current_version"])
    raise RuntimeError(f"ABORTED without current_version: {exc.details()}")


class Etcd(Backend):
    name = "etcd"

    def __init__(self, target: str) -> None:
        self.channel = erpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.kv = erpc.KVStub(self.channel)
        self.watch_stub = erpc.WatchStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    @staticmethod
    def _key(job_id: str) -> bytes:
        return PREFIX + job_id.encode()

    async def _put_if(self, job_id: str, job: pb.JobState, mod_revision: int) -> Token:
        """Writes ``job`` if the key's mod_revision is ``mod_revision`` (0: the key must not exist)."""
        key = self._key(job_id)
        cmp = (
            erpc.Compare(key=key, target=erpc.Compare.MOD, result=erpc.Compare.EQUAL, mod_revision=mod_revision)
            if mod_revision
            else erpc.Compare(key=key, target=erpc.Compare.CREATE, result=erpc.Compare.EQUAL, create_revision=0)
        )
        r = await self.kv.Txn(
            erpc.TxnRequest(
                compare=[cmp],
                success=[erpc.RequestOp(request_put=erpc.PutRequest(key=key, value=job.SerializeToString()))],
                failure=[erpc.RequestOp(request_range=erpc.RangeRequest(key=key))],
            )
        )
        if not r.succeeded:
            kvs = r.responses[0].response_range.kvs
            if not kvs:
                raise RuntimeError(f"etcd: {job_id} vanished")
            raise Conflict(Token(kvs[0].mod_revision, pb.JobState.FromString(kvs[0].value)))
        return Token(r.header.revision, job)

    @staticmethod
    def _new_job(job_id: str) -> pb.JobState:
        now = time.time_ns()
        job = pb.JobState(job_id=job_id, state=JS.JOB_STATE_TYPE_NEW, version=1)
        _now_ts(job.create_time, now)
        _now_ts(job.update_time, now)
        return job

    async def create(self, job_id: str, executions: int = 0) -> Token:
        token = await self._put_if(job_id, self._new_job(job_id), 0)
        for i in range(executions):
            token = await self.add_execution(job_id, token, f"node-{i}")
        return token

    async def add_execution(self, job_id: str, token: Token, node: str) -> Token:
        assert token.job is not None
        job = pb.JobState()
        job.CopyFrom(token.job)
        now = time.time_ns()
        job.version += 1
        _now_ts(job.update_time, now)
        e = job.executions.add(
            job_id=job_id,
            node_id=node,
            compute_reference=f"{job_id}-e{len(job.executions)}",
            state=ES.EXECUTION_STATE_TYPE_NEW,
            desired_state=pb.ExecutionDesiredState.EXECUTION_DESIRED_STATE_RUNNING,
            version=1,
        )
        _now_ts(e.create_time, now)
        _now_ts(e.update_time, now)
        return await self._put_if(job_id, job, token.version)

    async def cas(self, job_id: str, token: Token, new_state: int) -> Token:
        assert token.job is not None
        job = pb.JobState()
        job.CopyFrom(token.job)
        job.version += 1
        job.state = new_state  # type: ignore[assignment]
        _now_ts(job.update_time, time.time_ns())
        return await self._put_if(job_id, job, token.version)

    async def touch(self, job_id: str, token: Token) -> Token:
        # One writer per job here: the value is built from the writer's own copy, no read needed.
        assert token.job is not None
        job = token.job
        now = time.time_ns()
        job.version += 1
        _now_ts(job.update_time, now)
        e = job.executions[0]
        e.version += 1
        e.status = str(now)
        _now_ts(e.update_time, now)
        r = await self.kv.Put(erpc.PutRequest(key=self._key(job_id), value=job.SerializeToString()))
        return Token(r.header.revision, job)

    async def create_watched(self, job_id: str) -> Token:
        token = await self.create(job_id)
        return await self.add_execution(job_id, token, "node-0")

    async def head(self) -> int:
        r = await self.kv.Range(erpc.RangeRequest(key=PREFIX, range_end=PREFIX_END, limit=1, keys_only=True))
        return r.header.revision

    async def _watch_call(self, job_id: str | None, start_revision: int) -> Any:
        if job_id:
            create = erpc.WatchCreateRequest(key=self._key(job_id), start_revision=start_revision)
        else:
            create = erpc.WatchCreateRequest(key=PREFIX, range_end=PREFIX_END, start_revision=start_revision)
        call = self.watch_stub.Watch()
        await call.write(erpc.WatchRequest(create_request=create))
        return call

    async def watch(self, job_id: str | None, start_revision: int) -> AsyncIterator[list[pb.JobState]]:
        call = await self._watch_call(job_id, start_revision)
        try:
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    return
                if resp.canceled:
                    raise RuntimeError(f"etcd watch canceled: {resp.cancel_reason} (compact {resp.compact_revision})")
                if resp.events:
                    self.last_revision = resp.events[-1].kv.mod_revision
                    yield [pb.JobState.FromString(e.kv.value) for e in resp.events]
                elif resp.created:
                    yield []  # the watch is registered
        finally:
            call.cancel()

    async def list_then_watch(self) -> tuple[int, int]:
        # Paged like a Kubernetes reflector (500 a page is its default; 5,000 keeps the round trips few),
        # every page at the first page's revision so the list is one consistent snapshot.
        n = 0
        key = PREFIX
        revision = 0
        while True:
            r = await self.kv.Range(erpc.RangeRequest(key=key, range_end=PREFIX_END, limit=5000, revision=revision))
            revision = revision or r.header.revision
            for kv in r.kvs:
                pb.JobState.FromString(kv.value)
            n += len(r.kvs)
            if not r.more:
                break
            key = r.kvs[-1].key + b"\x00"
        call = await self._watch_call(None, revision + 1)
        try:
            resp = await call.read()
            if resp is grpc.aio.EOF or not resp.created:
                raise RuntimeError("etcd watch not created")
        finally:
            call.cancel()
        return n, revision


def make(name: str, target: str) -> Backend:
    """The client of system ``name``: jobstate on any engine ("jobstate", "jobstate-sqlite", ...), jobstate over
    its HTTP listener ("jobstate-connect-json", "jobstate-connect-proto": ``target`` is the base URL) or etcd."""
    if name.startswith("jobstate-connect"):
        return JobstateConnect(target, json=name.endswith("json"))
    return Jobstate(target) if name.startswith("jobstate") else Etcd(target)


async def get_token(b: Backend, job_id: str) -> Token:
    """The current token of ``job_id`` (a read)."""
    if isinstance(b, Jobstate):
        r = await b.stub.GetJob(spb.GetJobRequest(job_id=job_id))
        return Token(r.job.version)
    if isinstance(b, JobstateConnect):
        return await b.get_version(job_id)
    assert isinstance(b, Etcd)
    rr = await b.kv.Range(erpc.RangeRequest(key=b._key(job_id)))
    return Token(rr.kvs[0].mod_revision, pb.JobState.FromString(rr.kvs[0].value))
