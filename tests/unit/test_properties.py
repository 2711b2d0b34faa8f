"""Random sequences of operations against MemoryStore, checking the store's invariants after every step.

MemoryStore's methods never await (a write runs from validation to publish in one step), so the machine
drives each coroutine to completion with a single ``send`` instead of an event loop; a method that did
await would fail here, which is itself a property worth keeping.
"""

from __future__ import annotations

import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from watchcheck import Commit, WatchChecker

from jobstate.server import errors, rules
from jobstate.server.hub import WatchHub, encode_response
from jobstate.server.store import MemoryStore
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb

T = TypeVar("T")

JOB_IDS = st.sampled_from(["j0", "j1", "j2", "j3"])
NODES = st.sampled_from(["n0", "n1", "n2"])
REFS = st.sampled_from(["", "r0", "r1", "r2", "r3", "r4"])
JOB_STATES = st.integers(0, 7)  # 0 and 7 are invalid
EXEC_STATES = st.integers(0, 10)  # 10 is invalid
VERSIONS = st.integers(0, 8)
HISTORY = 64  # small, so the ring wraps during a run


def run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError("a MemoryStore method awaited: a write must not yield between validation and publish")


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = MemoryStore(WatchHub(HISTORY))
        self.revision = 0
        self.jobs: dict[str, pb.JobState] = {}
        self.commits: list[Commit] = []
        self.checker = WatchChecker("published")
        self.checker.begin(1)
        self.clock_offset = 0

    # -- bookkeeping ---------------------------------------------------------------------------------------

    def attempt(self, coro: Coroutine[Any, Any, Any], must_fail: bool = False, must_pass: bool = False) -> Any:
        """Runs one store call: a success is exactly one change; a refusal changes nothing."""
        before = {k: v for k, v in self.store._jobs.items()}
        try:
            result = run(coro)
        except errors.JobStateError as exc:
            if must_pass:
                raise AssertionError(f"refused although valid: {exc!r}") from exc
            assert self.store.stats().revision == self.revision, "a refused request changed the revision"
            assert self.store._jobs == before
            assert {k: r.job for k, r in self.store._jobs.items()} == self.jobs, "a refused request changed a job"
            return None
        assert not must_fail, f"accepted although it must be refused: {result}"
        self.revision += 1
        assert result.revision == self.revision == self.store.stats().revision, "revision did not rise by exactly 1"
        return result

    def committed(self, result: Any, deleted: bool = False) -> None:
        self.commits.append(Commit.of(result, deleted=deleted))
        job = result.job
        old = self.jobs.get(job.job_id)
        if deleted:
            assert old is not None
            assert job == old, "DeleteJob must return the last state"
            del self.jobs[job.job_id]
            return
        if old is None:
            assert job.version == 1
        else:
            assert job.version == old.version + 1, "job version did not rise by exactly 1"
            assert not rules.is_terminal_job(old.state), "a final job changed"
            assert job.create_time == old.create_time
            olds = {e.compute_reference: e for e in old.executions}
            for e in job.executions:
                prev = olds.get(e.compute_reference)
                if prev is not None and prev != e:
                    assert e.version == prev.version + 1
                    assert not rules.is_terminal_execution(prev.state), "a final execution changed"
        self.jobs[job.job_id] = job

    # -- rules ---------------------------------------------------------------------------------------------

    @rule(job_id=JOB_IDS, timeout_s=st.sampled_from([0, 0, 1, 2]))
    def create_job(self, job_id: str, timeout_s: int) -> None:
        exists = job_id in self.jobs
        r = self.attempt(self.store.create_job(job_id, timeout_s * 10**9), must_fail=exists, must_pass=not exists)
        if r is not None:
            self.committed(r)

    @rule(
        job_id=JOB_IDS,
        new_state=JOB_STATES,
        expected_state=JOB_STATES,
        expected_version=VERSIONS,
        unexpected=st.lists(st.integers(1, 6), max_size=2),
        use_condition=st.booleans(),
    )
    def set_state(
        self,
        job_id: str,
        new_state: int,
        expected_state: int,
        expected_version: int,
        unexpected: list[int],
        use_condition: bool,
    ) -> None:
        cond = (
            spb.JobCondition(
                expected_state=expected_state,  # type: ignore[arg-type]
                expected_version=expected_version,
                unexpected_states=unexpected,  # type: ignore[arg-type]
            )
            if use_condition
            else None
        )
        job = self.jobs.get(job_id)
        valid = new_state in rules.JOB_STATES and (cond is None or expected_state in rules.JOB_STATES | {0})
        holds = job is not None and (
            cond is None
            or (
                (not expected_version or job.version == expected_version)
                and (not expected_state or job.state == expected_state)
                and job.state not in unexpected
            )
        )
        ok = valid and holds and job is not None and not rules.is_terminal_job(job.state)
        r = self.attempt(self.store.update_job_state(job_id, new_state, cond, "c"), must_fail=not ok, must_pass=ok)
        if r is not None:
            self.committed(r)
            assert r.job.state == new_state
            if rules.is_terminal_job(new_state):
                assert all(rules.is_terminal_execution(e.state) for e in r.job.executions)

    @rule(job_id=JOB_IDS, node=NODES, ref=REFS, state=EXEC_STATES)
    def create_execution(self, job_id: str, node: str, ref: str, state: int) -> None:
        job = self.jobs.get(job_id)
        r = self.attempt(
            self.store.create_execution(job_id, pb.ExecutionState(node_id=node, compute_reference=ref, state=state))  # type: ignore[arg-type]
        )
        if r is None:
            return
        assert job is not None
        assert not rules.is_terminal_job(job.state), "an execution was added to a final job"
        assert state in rules.EXECUTION_STATES | {0}
        assert ref == "" or ref not in {e.compute_reference for e in job.executions}
        self.committed(r)

    @rule(
        job_id=JOB_IDS,
        ref=REFS,
        state=EXEC_STATES,
        status=st.sampled_from(["", "x", "y"]),
        expected=st.lists(st.integers(1, 9), max_size=2),
        expected_version=VERSIONS,
    )
    def update_execution(
        self, job_id: str, ref: str, state: int, status: str, expected: list[int], expected_version: int
    ) -> None:
        job = self.jobs.get(job_id)
        cond = spb.ExecutionCondition(expected_states=expected, expected_version=expected_version)  # type: ignore[arg-type]
        values = pb.ExecutionState(state=state, status=status)  # type: ignore[arg-type]
        r = self.attempt(self.store.update_execution(job_id, ref, values, None, cond))
        if r is None:
            return
        assert job is not None
        before = next(e for e in job.executions if e.compute_reference == ref)
        assert not expected or before.state in expected
        assert not expected_version or before.version == expected_version
        self.committed(r)
        assert r.execution is not None
        assert r.execution.compute_reference == ref
        assert r.execution.version == before.version + 1
        if state:
            assert r.execution.state == state

    @rule(job_id=JOB_IDS, expected_version=VERSIONS)
    def delete(self, job_id: str, expected_version: int) -> None:
        job = self.jobs.get(job_id)
        ok = job is not None and (not expected_version or expected_version == job.version)
        r = self.attempt(self.store.delete_job(job_id, expected_version), must_fail=not ok, must_pass=ok)
        if r is not None:
            self.committed(r, deleted=True)

    @precondition(lambda self: bool(self.store._timeouts))
    @rule(advance_s=st.integers(0, 3))
    def expire(self, advance_s: int) -> None:
        self.clock_offset += advance_s * 10**9
        now = time.time_ns() + self.clock_offset
        due = {
            j.job_id
            for j in self.jobs.values()
            if j.HasField("timeout_at") and j.timeout_at.ToNanoseconds() <= now and not rules.is_terminal_job(j.state)
        }
        count = run(self.store.expire_due(now_ns=now))
        assert count == len(due)
        assert self.store.stats().revision == self.revision + count
        for offset, job_id in enumerate(sorted(due, key=lambda j: self.store._jobs[j].mod_revision)):
            rec = self.store._jobs[job_id]
            assert rec.mod_revision == self.revision + 1 + offset
            assert rec.job.state == pb.JOB_STATE_TYPE_ERROR
            assert rec.entries()[-1].comment == rules.TIMEOUT_COMMENT
            self.commits.append(Commit(rec.mod_revision, job_id, rec.job.version, frozenset(), False))
            self.committed(type("R", (), {"job": rec.job, "revision": rec.mod_revision})())
        self.revision += count

    @rule(retain_s=st.integers(0, 3), limit=st.integers(1, 4))
    def remove_finished(self, retain_s: int, limit: int) -> None:
        """Retention: final jobs (only) go, oldest final change first, each as one DELETED change."""
        cutoff = time.time_ns() + self.clock_offset - retain_s * 10**9
        due = sorted(
            (
                j
                for j in self.jobs.values()
                if rules.is_terminal_job(j.state) and j.update_time.ToNanoseconds() <= cutoff
            ),
            key=lambda j: (j.update_time.ToNanoseconds(), j.job_id),
        )[:limit]
        removed = run(self.store.remove_finished(cutoff, limit))
        assert removed == len(due)
        for offset, job in enumerate(due):
            assert job.job_id not in self.store._jobs
            revision = self.revision + 1 + offset
            self.committed(type("R", (), {"job": job, "revision": revision})(), deleted=True)
        self.revision += removed
        assert self.store.stats().revision == self.revision

    # -- invariants ----------------------------------------------------------------------------------------

    @invariant()
    def timeouts_index_exactly_the_open_jobs_that_have_one(self) -> None:
        expected = sorted(
            (j.timeout_at.ToNanoseconds(), j.job_id, self.store._jobs[j.job_id].create_ns)
            for j in self.jobs.values()
            if j.HasField("timeout_at") and not rules.is_terminal_job(j.state)
        )
        assert self.store._timeouts == expected

    @invariant()
    def store_matches_the_model(self) -> None:
        assert {k: r.job for k, r in self.store._jobs.items()} == self.jobs
        assert self.store.stats().revision == self.revision

    @invariant()
    def history_has_one_entry_per_version(self) -> None:
        for rec in self.store._jobs.values():
            assert len(rec.history) == rec.job.version
            assert [e.version for e in rec.entries()] == list(range(1, rec.job.version + 1))
            revs = [e.revision for e in rec.entries()]
            assert revs == sorted(set(revs))
            assert revs[-1] == rec.mod_revision

    @invariant()
    def one_active_execution_per_node_and_final_jobs_have_none(self) -> None:
        for job in self.jobs.values():
            active = [e.node_id for e in job.executions if not rules.is_terminal_execution(e.state)]
            assert len(active) == len(set(active)), f"two active executions on one node: {job}"
            if rules.is_terminal_job(job.state):
                assert not active
            assert all(e.version >= 1 and e.job_id == job.job_id for e in job.executions)

    @invariant()
    def published_stream_keeps_the_watch_guarantees(self) -> None:
        hub = self.store.hub
        assert hub.head_revision == self.revision
        while self.checker.next_revision <= hub.head_revision:
            rev = self.checker.next_revision
            change = hub._ring[rev % HISTORY]
            assert change is not None
            assert change.revision == rev
            self.checker.observe(encode_response([change.frame], rev))
        self.checker.check_complete(self.commits[-HISTORY:])


StoreMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStoreMachine = StoreMachine.TestCase
