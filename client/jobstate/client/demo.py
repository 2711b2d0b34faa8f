"""``jobstate demo``: a scheduler and its compute nodes, simulated against a real server.

Jobs arrive at a steady rate (exponential gaps). Each is scheduled the way a requester does it: queued, a few
nodes asked to bid, one bid accepted, the execution run; a failed run is retried on a node that has not run the
job yet, and a job that keeps failing ends in ERROR. Some jobs get a short timeout and are held back until the
server times them out; a few are cancelled by their "user". Every job change is a compare-and-set on the
version last seen, as two schedulers sharing a store must do; a write that loses to the timeout sweeper is how
the scheduler learns the job timed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, TextIO

from jobstate.client.aio import AsyncClient
from jobstate.client.errors import JobStateError, NotFound
from jobstate.client.names import job_state_name
from jobstate.v1 import job_state_pb2 as pb

MAX_RUNS = 3  # runs of a job (first try and retries) before it is given up as ERROR
MAX_BID_ROUNDS = 4  # rounds of asking for bids before a job nobody will take is given up
CANCEL_RATE = 0.03
BID_ACCEPT_RATE = 0.7
TALLY_SECONDS = 30.0  # reading the unfinished jobs back at the end; a server gone by then is reported, not waited


@dataclass(frozen=True)
class DemoConfig:
    rate: float = 4.0  # jobs created per second
    jobs: int = 0  # 0: no limit
    nodes: int = 5
    duration: float | None = None  # None: until cancelled
    speed: float = 1.0  # every pause is divided by this
    fail_rate: float = 0.25
    timeout_rate: float = 0.1
    seed: int | None = None


@dataclass
class DemoStats:
    created: int = 0
    completed: int = 0
    failed: int = 0
    timed_out: int = 0
    cancelled: int = 0
    retries: int = 0
    conflicts: int = 0  # writes that lost a compare-and-set
    errors: int = 0  # anything unexpected; ``last_error`` says what
    writes: int = 0
    active: int = 0  # jobs being scheduled now; at the end, jobs left unfinished in the store
    last_error: str = ""
    started: float = field(default_factory=time.monotonic)
    # Set by the end-of-run tally: the demo's jobs still NEW, QUEUED or IN_PROGRESS in the store, by state.
    unfinished: dict[str, int] | None = None

    def line(self, writes_per_second: float) -> str:
        elapsed = time.monotonic() - self.started
        active = f"{self.active} active" if self.unfinished is None else f"{self.active} unfinished"
        text = (
            f"demo {elapsed:4.0f}s  {self.created} jobs: {active} {self.completed} completed "
            f"{self.failed} failed {self.timed_out} timed out {self.cancelled} cancelled  "
            f"{self.retries} retries  {writes_per_second:.0f} writes/s"
        )
        if self.errors:
            text += f"  {self.errors} errors ({self.last_error[:60]})"
        return text

    def left_line(self) -> str:
        """What the demo leaves behind, once tallied: the jobs it did not finish stay as they are."""
        if not self.unfinished:
            return "every job the demo created is finished"
        by_state = ", ".join(f"{n} {state}" for state, n in self.unfinished.items())
        return (
            f"left unfinished in the store: {self.active} job{'s' if self.active != 1 else ''} ({by_state}); "
            "they stay so until changed or deleted, or until their timeout (at most 10m) passes"
        )


class _TimedOut(Exception):
    pass


class DemoScheduler:
    def __init__(self, client: AsyncClient, config: DemoConfig) -> None:
        self.client = client
        self.config = config
        self.rng = random.Random(config.seed)
        self.run_id = secrets.token_hex(2)  # fresh per run, so runs against one server never collide
        self.nodes = [f"node-{i + 1}" for i in range(max(1, config.nodes))]
        self.stats = DemoStats()
        self._samples: deque[tuple[float, int]] = deque()
        # Every job a create was sent for, and how the ones that ran to an end ended: the final tally reads the
        # others back from the store, so the summary is what the store holds, not what the tasks got to count.
        self.job_ids: list[str] = []
        self.outcomes: dict[str, str] = {}

    async def pause(self, low: float, high: float) -> None:
        await asyncio.sleep(self.rng.uniform(low, high) / self.config.speed)

    async def write(self, call: Any) -> Any:
        response = await call
        self.stats.writes += 1
        return response

    async def run_job(self, n: int) -> None:
        job_id = f"job-{self.run_id}-{n:04d}"
        self.job_ids.append(job_id)
        self.stats.active += 1
        try:
            await self._lifecycle(job_id)
        except (_TimedOut, JobStateError) as exc:
            await self._explain(job_id, exc)
        finally:
            self.stats.active -= 1

    async def _explain(self, job_id: str, exc: Exception) -> None:
        """A write failed: find out whether the server timed the job out (the expected way to lose)."""
        try:
            job = (await self.client.get_job(job_id)).job
        except JobStateError as get_exc:
            self.stats.errors += 1
            self.stats.last_error = str(get_exc)
            return
        if job.state == pb.JOB_STATE_TYPE_ERROR:
            self.stats.timed_out += 1
            self.outcomes[job_id] = "timed_out"
            if isinstance(exc, JobStateError):
                self.stats.conflicts += 1
        else:
            self.stats.errors += 1
            self.stats.last_error = str(exc)

    async def _lifecycle(self, job_id: str) -> None:
        cfg = self.config
        stuck = self.rng.random() < cfg.timeout_rate
        timeout = self.rng.uniform(1.5, 3.0) / cfg.speed if stuck else 600.0
        stuck_in_queue = stuck and self.rng.random() < 0.5
        r = await self.write(self.client.create_job(job_id, timeout=timeout, comment="submitted"))
        self.stats.created += 1
        version: int = r.job.version
        await self.pause(0.1, 0.5)
        r = await self.write(
            self.client.update_job_state(
                job_id, pb.JOB_STATE_TYPE_QUEUED, expected_version=version, comment="waiting for capacity"
            )
        )
        version = r.job.version
        if stuck_in_queue:
            await asyncio.sleep(timeout + 0.5 / cfg.speed)  # no capacity for it until after its deadline
        tried: set[str] = set()
        runs = 0
        rounds = 0
        state = pb.JOB_STATE_TYPE_QUEUED
        while True:
            await self.pause(0.2, 0.8)
            rounds += 1
            fresh = [n for n in self.nodes if n not in tried] or list(self.nodes)
            bidders = self.rng.sample(fresh, min(len(fresh), self.rng.choice((2, 3))))
            refs = {node: f"e{rounds}-{node}" for node in bidders}
            created = await asyncio.gather(
                *(
                    self.write(
                        self.client.create_execution(
                            job_id,
                            node,
                            compute_reference=refs[node],
                            state=pb.EXECUTION_STATE_TYPE_ASK_FOR_BID,
                            desired_state=pb.EXECUTION_DESIRED_STATE_PENDING,
                            comment=f"asking {node} to bid",
                        )
                    )
                    for node in bidders
                )
            )
            version = max([version, *(c.job.version for c in created)])
            await self.pause(0.2, 0.6)
            answers = {node: self.rng.random() < BID_ACCEPT_RATE for node in bidders}
            answered = await asyncio.gather(
                *(
                    self.write(
                        self.client.update_execution(
                            job_id,
                            refs[node],
                            state=(
                                pb.EXECUTION_STATE_TYPE_ASK_FOR_BID_ACCEPTED
                                if ok
                                else pb.EXECUTION_STATE_TYPE_ASK_FOR_BID_REJECTED
                            ),
                            status="offered to run it" if ok else "no capacity",
                            expected_version=1,
                            expected_states=[pb.EXECUTION_STATE_TYPE_ASK_FOR_BID],
                        )
                    )
                    for node, ok in answers.items()
                )
            )
            version = max([version, *(a.job.version for a in answered)])
            accepted = [node for node, ok in answers.items() if ok]
            if not accepted:
                if rounds >= MAX_BID_ROUNDS:
                    await self.write(
                        self.client.update_job_state(
                            job_id, pb.JOB_STATE_TYPE_ERROR, expected_version=version, comment="no node would run it"
                        )
                    )
                    self._ended(job_id, "failed")
                    return
                r = await self.write(
                    self.client.update_job_state(
                        job_id, pb.JOB_STATE_TYPE_QUEUED, expected_version=version, comment="no bids; requeued"
                    )
                )
                version, state = r.job.version, pb.JOB_STATE_TYPE_QUEUED
                continue
            node = self.rng.choice(accepted)
            tried.add(node)
            decided = await asyncio.gather(
                *(
                    self.write(
                        self.client.update_execution(
                            job_id,
                            refs[other],
                            pb.ExecutionState(
                                state=(
                                    pb.EXECUTION_STATE_TYPE_BID_ACCEPTED
                                    if other == node
                                    else pb.EXECUTION_STATE_TYPE_BID_REJECTED
                                ),
                                desired_state=(
                                    pb.EXECUTION_DESIRED_STATE_RUNNING
                                    if other == node
                                    else pb.EXECUTION_DESIRED_STATE_STOPPED
                                ),
                                status="running" if other == node else "another node was chosen",
                            ),
                            expected_version=2,
                            expected_states=[pb.EXECUTION_STATE_TYPE_ASK_FOR_BID_ACCEPTED],
                        )
                    )
                    for other in accepted
                )
            )
            version = max([version, *(d.job.version for d in decided)])
            if state != pb.JOB_STATE_TYPE_IN_PROGRESS:
                r = await self.write(
                    self.client.update_job_state(
                        job_id, pb.JOB_STATE_TYPE_IN_PROGRESS, expected_version=version, comment=f"running on {node}"
                    )
                )
                version, state = r.job.version, pb.JOB_STATE_TYPE_IN_PROGRESS
            runs += 1
            if stuck and not stuck_in_queue:
                await asyncio.sleep(timeout + 0.5 / cfg.speed)  # a run that hangs past the job's deadline
            else:
                await self.pause(0.5, 2.5)
            if self.rng.random() < CANCEL_RATE:
                await self.write(
                    self.client.update_job_state(
                        job_id, pb.JOB_STATE_TYPE_CANCELLED, expected_version=version, comment="cancelled by user"
                    )
                )
                self._ended(job_id, "cancelled")
                return
            if self.rng.random() < cfg.fail_rate:
                r = await self.write(
                    self.client.update_execution(
                        job_id,
                        refs[node],
                        pb.ExecutionState(
                            state=pb.EXECUTION_STATE_TYPE_FAILED,
                            status="exit code 1",
                            run_output=pb.RunCommandResult(exit_code=1, stderr="error: out of memory\n"),
                        ),
                        expected_version=3,
                        expected_states=[pb.EXECUTION_STATE_TYPE_BID_ACCEPTED],
                    )
                )
                version = max(version, r.job.version)
                if runs >= MAX_RUNS:
                    await self.write(
                        self.client.update_job_state(
                            job_id,
                            pb.JOB_STATE_TYPE_ERROR,
                            expected_version=version,
                            comment=f"failed {runs} times",
                        )
                    )
                    self._ended(job_id, "failed")
                    return
                self.stats.retries += 1
                continue
            r = await self.write(
                self.client.update_execution(
                    job_id,
                    refs[node],
                    pb.ExecutionState(
                        state=pb.EXECUTION_STATE_TYPE_COMPLETED,
                        status="results published",
                        run_output=pb.RunCommandResult(exit_code=0, stdout="done\n"),
                        published_results=pb.StorageSpec(
                            storage_source="ipfs", name=f"{job_id}-results", cid="bafy" + secrets.token_hex(8)
                        ),
                    ),
                    expected_version=3,
                    expected_states=[pb.EXECUTION_STATE_TYPE_BID_ACCEPTED],
                )
            )
            version = max(version, r.job.version)
            await self.write(
                self.client.update_job_state(
                    job_id, pb.JOB_STATE_TYPE_COMPLETED, expected_version=version, comment=f"completed on {node}"
                )
            )
            self._ended(job_id, "completed")
            return

    def _ended(self, job_id: str, outcome: str) -> None:
        self.outcomes[job_id] = outcome
        setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)

    async def tally(self) -> None:
        """Recounts the jobs from the store: the runs cut short when the demo stopped are read back, so the
        summary adds up to what ``jobstate list`` shows (a job whose create never committed is not counted)."""
        counts = {"completed": 0, "failed": 0, "timed_out": 0, "cancelled": 0}
        unfinished: dict[str, int] = {}
        created = 0
        for job_id in self.job_ids:
            outcome = self.outcomes.get(job_id)
            if outcome is None:
                try:
                    job = (await self.client.get_job(job_id)).job
                except NotFound:
                    continue
                if job.state == pb.JOB_STATE_TYPE_COMPLETED:
                    outcome = "completed"
                elif job.state == pb.JOB_STATE_TYPE_CANCELLED:
                    outcome = "cancelled"
                elif job.state == pb.JOB_STATE_TYPE_ERROR:
                    last = [h async for h in self.client.iter_history(job_id)][-1]
                    outcome = "timed_out" if last.comment == "timed out" else "failed"
                else:
                    name = job_state_name(job.state)
                    unfinished[name] = unfinished.get(name, 0) + 1
            created += 1
            if outcome is not None:
                counts[outcome] += 1
        st = self.stats
        st.created = created
        st.completed, st.failed, st.timed_out, st.cancelled = (
            counts["completed"],
            counts["failed"],
            counts["timed_out"],
            counts["cancelled"],
        )
        st.unfinished = {name: unfinished[name] for name in ("NEW", "QUEUED", "IN_PROGRESS") if name in unfinished}
        st.active = sum(unfinished.values())

    async def run(self, progress: TextIO | None = None) -> DemoStats:
        """Creates jobs until ``jobs`` are created (then lets them finish) or ``duration`` passes, or cancelled."""
        cfg = self.config
        deadline = None if cfg.duration is None else time.monotonic() + cfg.duration
        tasks: set[asyncio.Task[None]] = set()
        reporter = asyncio.create_task(self._report(progress)) if progress is not None else None
        try:
            n = 0
            next_at = time.monotonic()
            while not cfg.jobs or n < cfg.jobs:
                next_at += self.rng.expovariate(cfg.rate)
                if deadline is not None and next_at >= deadline:
                    break
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                n += 1
                task = asyncio.create_task(self.run_job(n))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                await asyncio.wait(set(tasks), timeout=remaining)
        finally:
            for task in list(tasks):
                task.cancel()
            for task in list(tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if reporter is not None:
                reporter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reporter
            rate = self._rate()
            try:
                await asyncio.wait_for(self.tally(), TALLY_SECONDS)
            except (JobStateError, TimeoutError) as exc:
                self.stats.errors += 1
                self.stats.last_error = f"could not read the jobs back: {exc}"
            if progress is not None:
                progress.write(("\r\x1b[K" if progress.isatty() else "") + self.stats.line(rate) + "\n")
                if self.stats.unfinished is not None:
                    progress.write(self.stats.left_line() + "\n")
                progress.flush()
        return self.stats

    def _rate(self) -> float:
        """Writes per second over the last few seconds."""
        now = time.monotonic()
        samples = self._samples
        samples.append((now, self.stats.writes))
        while len(samples) > 2 and samples[0][0] < now - 3.0:
            samples.popleft()
        t0, w0 = samples[0]
        return (self.stats.writes - w0) / (now - t0) if now > t0 else 0.0

    async def _report(self, out: TextIO) -> None:
        tty = out.isatty()
        interval = 0.25 if tty else 2.0
        while True:
            await asyncio.sleep(interval)
            line = self.stats.line(self._rate())
            # On a terminal one line rewritten in place (cut to its width, or it would wrap and scroll);
            # in a log one line per interval.
            if tty:
                out.write("\r" + line[: shutil.get_terminal_size().columns - 1] + "\x1b[K")
            else:
                out.write(line + "\n")
            out.flush()


async def run_demo(client: AsyncClient, config: DemoConfig, progress: TextIO | None = None) -> DemoStats:
    return await DemoScheduler(client, config).run(progress)
