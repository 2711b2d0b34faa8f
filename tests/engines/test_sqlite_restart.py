"""A jobstate server on SQLite, as its own process, restarted with nothing lost.

Graceful (SIGTERM) and hard (SIGKILL, mid-write) restarts: jobs, versions, history and the revision counter
continue where they stopped, a watcher resumes by revision with no gap and no repeat (checked by
``tests/watchcheck.py``), timeouts set before the restart still fire after it, and after ``kill -9`` every
acknowledged write is there.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from watchcheck import Commit, WatchChecker

from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb
from jobstate.v1 import job_state_service_pb2_grpc as spb_grpc

JS = pb.JobStateType
ES = pb.ExecutionStateType
DEADLINE = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``jobstate`` serving on SQLite in ``data_dir`` at a fixed port, so clients reconnect to the same target."""

    def __init__(self, data_dir: Path, port: int, log: Path) -> None:
        self.data_dir, self.port, self.log = data_dir, port, log
        self.target = f"127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "jobstate", "serve", "--port", str(self.port), "--grace", "1"]
        command += ["--store", "sqlite", "--data-dir", str(self.data_dir), "--log-level", "debug"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + DEADLINE
        with grpc.insecure_channel(self.target) as channel:
            ready = grpc.channel_ready_future(channel)
            # Waits for the port to answer, or for the process to exit (it refused to start), whichever first.
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    ready.cancel()
                    raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
                try:
                    ready.result(timeout=0.2)
                    return
                except grpc.FutureTimeoutError:
                    continue
            ready.cancel()
        raise AssertionError(f"server did not start in {DEADLINE}s:\n{self.log.read_text()}")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(DEADLINE)
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(DEADLINE)
        self.proc = None


@pytest.fixture
def sqlite_server(tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path / "data", free_port(), tmp_path / "server.log")
    server.start()
    try:
        yield server
    finally:
        server.kill()


class Reader:
    """Follows one watch into a checker across servers: each ``follow`` starts a stream on its own thread."""

    def __init__(self, checker: WatchChecker) -> None:
        self.checker = checker
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self.stream: Any = None
        self.ended: grpc.RpcError | None = None

    def follow(self, stub: spb_grpc.JobStateServiceStub, start: int) -> None:
        self.checker.begin(start)
        request = spb.WatchRequest(start_revision=start)
        request.progress_interval.FromMilliseconds(50)
        self.stream = stub.Watch(request, timeout=DEADLINE)
        self.ended = None
        threading.Thread(target=self._read, args=(self.stream,), daemon=True).start()

    def _read(self, stream: Iterator[spb.WatchResponse]) -> None:
        try:
            for response in stream:
                with self.cond:
                    self.checker.observe(response)
                    self.cond.notify_all()
        except grpc.RpcError as exc:
            with self.cond:
                self.ended = exc
                self.cond.notify_all()
        except BaseException as exc:
            with self.cond:
                self.error = exc
                self.cond.notify_all()

    def wait_covered(self, revision: int) -> None:
        with self.cond:
            ok = self.cond.wait_for(
                lambda: self.error is not None or self.checker.next_revision > revision, timeout=DEADLINE
            )
        assert self.error is None, repr(self.error)
        assert ok, f"the watch did not reach revision {revision} (at {self.checker.next_revision - 1})"

    def wait_ended(self) -> grpc.RpcError:
        with self.cond:
            assert self.cond.wait_for(lambda: self.ended is not None or self.error is not None, timeout=DEADLINE)
        assert self.error is None, repr(self.error)
        assert self.ended is not None
        return self.ended


def everything(stub: spb_grpc.JobStateServiceStub) -> tuple[int, list[pb.JobState], dict[str, list[bytes]]]:
    page = stub.ListJobs(spb.ListJobsRequest(page_size=1000))
    history = {
        j.job_id: [e.SerializeToString() for e in stub.GetJobHistory(spb.GetJobHistoryRequest(job_id=j.job_id)).entries]
        for j in page.jobs
    }
    return page.revision, list(page.jobs), history


def writes(stub: spb_grpc.JobStateServiceStub, prefix: str, jobs: int) -> list[Commit]:
    commits: list[Commit] = []
    for i in range(jobs):
        job_id = f"{prefix}{i}"
        commits.append(Commit.of(stub.CreateJob(spb.CreateJobRequest(job_id=job_id))))
        r = stub.CreateExecution(
            spb.CreateExecutionRequest(job_id=job_id, execution=pb.ExecutionState(node_id=f"n{i % 2}"))
        )
        commits.append(Commit.of(r))
        update = spb.UpdateExecutionRequest(
            job_id=job_id,
            compute_reference=r.execution.compute_reference,
            execution=pb.ExecutionState(state=ES.EXECUTION_STATE_TYPE_ASK_FOR_BID, status=f"step {i}"),
        )
        commits.append(Commit.of(stub.UpdateExecution(update)))
        if i % 3 == 1:
            done = spb.UpdateJobStateRequest(job_id=job_id, new_state=JS.JOB_STATE_TYPE_COMPLETED, comment="ok")
            commits.append(Commit.of(stub.UpdateJobState(done)))
        if i % 4 == 2:
            commits.append(Commit.of(stub.DeleteJob(spb.DeleteJobRequest(job_id=job_id)), deleted=True))
    return commits


def test_graceful_restart_loses_nothing(sqlite_server: ServerProcess) -> None:
    channel = grpc.insecure_channel(sqlite_server.target)
    stub = spb_grpc.JobStateServiceStub(channel)
    reader = Reader(WatchChecker("across-restart"))
    reader.follow(stub, 1)
    commits = writes(stub, "a", 12)
    late = stub.CreateJob(spb.CreateJobRequest(job_id="late", timeout=duration_pb2.Duration(seconds=3600)))
    # A timeout set just before the restart falls due while the server is down or just after it is back.
    timed = stub.CreateJob(spb.CreateJobRequest(job_id="timed", timeout=duration_pb2.Duration(seconds=3)))
    commits += [Commit.of(late), Commit.of(timed)]
    head, jobs, history = everything(stub)
    assert head == timed.revision == len(commits)
    reader.wait_covered(head)

    assert sqlite_server.stop(signal.SIGTERM) == 0
    assert reader.wait_ended().code() == grpc.StatusCode.UNAVAILABLE
    channel.close()
    sqlite_server.start()

    # The watcher resumes on the restarted server where it stopped.
    channel = grpc.insecure_channel(sqlite_server.target)
    stub = spb_grpc.JobStateServiceStub(channel)
    reader.follow(stub, reader.checker.next_revision)
    head2, jobs2, history2 = everything(stub)
    assert head2 >= head
    unchanged = [j for j in jobs if j.job_id != "timed"]
    assert [j for j in jobs2 if j.job_id != "timed"] == unchanged  # versions, executions, times
    assert {k: v for k, v in history2.items() if k != "timed"} == {k: v for k, v in history.items() if k != "timed"}
    assert history2["timed"][:1] == history["timed"]

    # Revisions and versions continue; the timeout fires after the restart like any change.
    r = stub.UpdateJobState(spb.UpdateJobStateRequest(job_id="late", new_state=JS.JOB_STATE_TYPE_QUEUED))
    assert r.job.version == 2
    after = writes(stub, "b", 3)
    commits += [Commit.of(r), *after]
    with grpc.insecure_channel(sqlite_server.target) as probe:
        probe_stub = spb_grpc.JobStateServiceStub(probe)
        stream = probe_stub.Watch(spb.WatchRequest(job_ids=["timed"], send_initial_state=True), timeout=DEADLINE)
        for response in stream:
            if any(e.job.state == JS.JOB_STATE_TYPE_ERROR for e in response.events):
                stream.cancel()
                break
    timed_out = stub.GetJob(spb.GetJobRequest(job_id="timed")).job
    assert (timed_out.state, timed_out.version) == (JS.JOB_STATE_TYPE_ERROR, 2)
    entries = stub.GetJobHistory(spb.GetJobHistoryRequest(job_id="timed")).entries
    assert entries[-1].comment == "timed out"
    assert entries[-1].revision > head  # it happened after the restart
    commits.append(Commit(entries[-1].revision, "timed", 2))
    final, final_jobs, _ = everything(stub)
    reader.wait_covered(final)

    checker = reader.checker
    assert checker.check_complete(commits) == len(commits)  # every change, each once, in order, as committed
    checker.check_snapshot(final_jobs)
    assert [e.revision for e in checker.live_events()] == list(range(1, final + 1))  # no gap, no repeat
    reader.stream.cancel()
    channel.close()


def test_kill_9_keeps_every_acknowledged_write(sqlite_server: ServerProcess) -> None:
    acked: list[Commit] = []
    lock = threading.Lock()
    enough = threading.Event()
    failures: list[grpc.StatusCode] = []

    def writer(n: int) -> None:
        with grpc.insecure_channel(sqlite_server.target) as channel:
            stub = spb_grpc.JobStateServiceStub(channel)
            for i in range(10_000):  # bounded; the kill ends it long before
                try:
                    got = writes(stub, f"w{n}-{i}-", 1)
                except grpc.RpcError as exc:
                    failures.append(exc.code())  # type: ignore[attr-defined]
                    return
                with lock:
                    acked.extend(got)
                    if len(acked) >= 300:
                        enough.set()

    threads = [threading.Thread(target=writer, args=(n,), daemon=True) for n in range(3)]
    for t in threads:
        t.start()
    assert enough.wait(DEADLINE), "the writers did not get going"
    assert sqlite_server.stop(signal.SIGKILL) == -signal.SIGKILL  # in the middle of writing
    for t in threads:
        t.join(DEADLINE)
    with lock:
        acknowledged = list(acked)
    assert failures, "every writer should have seen the server die"
    sqlite_server.start()

    with grpc.insecure_channel(sqlite_server.target) as channel:
        stub = spb_grpc.JobStateServiceStub(channel)
        head, jobs, history = everything(stub)
        assert head >= max(c.revision for c in acknowledged)
        # Every acknowledged change is in the replayed event history, as acknowledged, in order, once.
        checker = WatchChecker("after-kill-9")
        checker.begin(1)
        stream = stub.Watch(spb.WatchRequest(start_revision=1), timeout=DEADLINE)
        for response in stream:
            checker.observe(response)
            if checker.next_revision > head:
                stream.cancel()
                break
        assert checker.check_complete(acknowledged, exhaustive=False) == len(acknowledged)
        checker.check_snapshot(jobs)
        assert [e.revision for e in checker.live_events()] == list(range(1, head + 1))
        # ... and in the jobs and their histories.
        latest: dict[str, Commit] = {}
        for c in acknowledged:
            latest[c.job_id] = c
        by_id = {j.job_id: j for j in jobs}
        for job_id, c in latest.items():
            if c.deleted:
                continue
            assert by_id[job_id].version >= c.version, job_id
            revisions = {pb.JobHistoryEntry.FromString(e).revision for e in history[job_id]}
            assert {a.revision for a in acknowledged if a.job_id == job_id} <= revisions, job_id
        # The counter continues after the last change that made it to disk.
        r = stub.CreateJob(spb.CreateJobRequest(job_id="after"))
        assert (r.revision, r.job.version) == (head + 1, 1)


def test_second_server_on_the_same_data_dir_is_refused(sqlite_server: ServerProcess, tmp_path: Path) -> None:
    other = ServerProcess(sqlite_server.data_dir, free_port(), tmp_path / "other.log")
    with pytest.raises(AssertionError, match="in use by another jobstate server"):
        other.start()
    with grpc.insecure_channel(sqlite_server.target) as channel:  # the first one serves on, undisturbed
        stub = spb_grpc.JobStateServiceStub(channel)
        assert stub.CreateJob(spb.CreateJobRequest(job_id="still")).revision == 1
