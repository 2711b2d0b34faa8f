"""``jobstate demo`` for a few seconds against a real server: the workload it leaves behind is a realistic one."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from cliutil import run

from jobstate.client import Client, core
from jobstate.v1 import job_state_pb2 as pb

ES = pb.ExecutionStateType


def test_demo_drives_a_realistic_workload(server: Any) -> None:
    r = run(
        "--target",
        server.target,
        "demo",
        "--duration",
        "4s",
        "--rate",
        "10/s",
        "--speed",
        "4",
        "--nodes",
        "4",
        "--fail-rate",
        "0.5",
        "--timeout-rate",
        "0.3",
        "--seed",
        "7",
        timeout=60,
    )
    assert r.code == 0, r.err
    # Piped: one progress line per interval, a final one, and what the demo leaves unfinished.
    last = r.err.strip().splitlines()[-2]
    assert last.startswith("demo ")
    assert " jobs: " in last
    assert " errors (" not in r.err  # every write failure was explained (a timeout), none unexpected

    with Client(server.target) as c:
        jobs = list(c.iter_jobs())
        histories = {job.job_id: list(c.iter_history(job.job_id)) for job in jobs}
    assert len(jobs) >= 10
    states = Counter(pb.JobStateType.Name(job.state) for job in jobs)
    assert len(states) >= 3, states
    assert states["JOB_STATE_TYPE_COMPLETED"] >= 1, states

    nodes = {e.node_id for job in jobs for e in job.executions}
    assert len(nodes) >= 3
    bids = Counter(e.state for job in jobs for e in job.executions)
    assert bids[ES.EXECUTION_STATE_TYPE_ASK_FOR_BID_REJECTED] + bids[ES.EXECUTION_STATE_TYPE_BID_REJECTED] >= 1

    # A completed job went the whole way: queued, bids asked and accepted, run, completed; each step one version.
    done = next(job for job in jobs if job.state == pb.JOB_STATE_TYPE_COMPLETED)
    steps = histories[done.job_id]
    assert [h.version for h in steps] == list(range(1, done.version + 1))
    job_steps = [pb.JobStateType.Name(h.job_state.new_state) for h in steps if h.WhichOneof("change") == "job_state"]
    assert job_steps[:2] == ["JOB_STATE_TYPE_NEW", "JOB_STATE_TYPE_QUEUED"]
    assert job_steps[-2:] == ["JOB_STATE_TYPE_IN_PROGRESS", "JOB_STATE_TYPE_COMPLETED"]
    winner = next(e for e in done.executions if e.state == ES.EXECUTION_STATE_TYPE_COMPLETED)
    path = [
        h.execution_state.new_state
        for h in steps
        if h.WhichOneof("change") == "execution_state"
        and h.execution_state.compute_reference == winner.compute_reference
    ]
    assert path == [
        ES.EXECUTION_STATE_TYPE_ASK_FOR_BID,
        ES.EXECUTION_STATE_TYPE_ASK_FOR_BID_ACCEPTED,
        ES.EXECUTION_STATE_TYPE_BID_ACCEPTED,
        ES.EXECUTION_STATE_TYPE_COMPLETED,
    ]

    # A failed run was retried on another node: after a FAILED execution, a new one on a node not yet tried.
    retried = []
    for job_id, steps in histories.items():
        failed_nodes: set[str] = set()
        for h in steps:
            if h.WhichOneof("change") != "execution_state":
                continue
            change = h.execution_state
            if change.new_state == ES.EXECUTION_STATE_TYPE_FAILED:
                failed_nodes.add(change.node_id)
            elif change.previous_state == ES.EXECUTION_STATE_TYPE_UNSPECIFIED and failed_nodes:
                assert change.node_id not in failed_nodes
                retried.append(job_id)
    assert retried, "no failed run was retried"

    # Some jobs timed out: the server moved them to ERROR with the comment "timed out".
    timed_out = [job_id for job_id, steps in histories.items() if steps[-1].comment == "timed out"]
    assert timed_out
    # The history is read after the list, so a job can time out in between: judge by the history itself.
    assert all(histories[job_id][-1].job_state.new_state == pb.JOB_STATE_TYPE_ERROR for job_id in timed_out)


def test_demo_summary_adds_up_to_the_store_and_says_what_it_leaves(server: Any) -> None:
    """Stopped mid-run (by --duration), the demo leaves jobs queued or running: its last line counts them, and
    every count matches the store. No short timeouts, so nothing changes in the store after the demo ends."""
    r = run(
        "--target",
        server.target,
        "demo",
        "--duration",
        "2s",
        "--rate",
        "20/s",
        "--timeout-rate",
        "0",
        "--seed",
        "3",
        timeout=60,
    )
    assert r.code == 0, r.err
    summary, left = r.err.strip().splitlines()[-2:]
    m = re.search(
        r" (\d+) jobs: (\d+) unfinished (\d+) completed (\d+) failed (\d+) timed out (\d+) cancelled ", summary
    )
    assert m, summary
    created, unfinished, completed, failed, timed_out, cancelled = map(int, m.groups())
    assert unfinished + completed + failed + timed_out + cancelled == created

    with Client(server.target) as c:
        jobs = list(c.iter_jobs())
    states = Counter(core.short_job_state(job.state) for job in jobs)
    assert created == len(jobs)
    assert completed == states["COMPLETED"]
    assert failed + timed_out == states["ERROR"]
    assert cancelled == states["CANCELLED"]
    assert unfinished == states["NEW"] + states["QUEUED"] + states["IN_PROGRESS"]
    assert unfinished > 0, "two seconds at normal speed always leaves runs going"
    assert left.startswith(f"left unfinished in the store: {unfinished} job")
    for state in ("NEW", "QUEUED", "IN_PROGRESS"):
        if states[state]:
            assert f"{states[state]} {state}" in left
