"""A load generator for the load and fault tests, run as its own process so that its CPU is not the server's.

``python tests/security/loadgen.py CONFIG_JSON`` runs writers and watchers against a server for a fixed time,
then waits for every watcher to reach the last revision and checks each with the watch checker. It prints
``ready`` once every watcher is registered (faults may start then) and one JSON line of figures at the end;
the exit status is 0 only if no guarantee was violated.

Writers each drive their own jobs through a life (create, an execution, two execution updates, the job
completed, deleted), so the store stays small and every event is checkable. A write that fails with
UNAVAILABLE or DEADLINE_EXCEEDED has an unknown outcome: the writer abandons that job and starts another.
Watchers (unfiltered, by job ids, by node) use the client library's resuming ``AsyncClient.watch``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
from watchcheck import Commit, WatchChecker

from jobstate.client import AsyncClient, Client
from jobstate.client.core import Backoff
from jobstate.client.errors import JobStateError
from jobstate.v1 import job_state_service_pb2 as spb

# A write that failed with one of these may or may not have been committed. CANCELLED is here because a call
# that reaches a server as it stops is cancelled by gRPC before the service sees it (not UNAVAILABLE).
UNKNOWN_OUTCOME = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
NODES = 10
JOBS_PER_WATCHED_SET = 40


@dataclass
class Figures:
    writes: int = 0
    unknown: int = 0
    unexpected: list[str] = field(default_factory=list)
    watchers: int = 0
    stalled: int = 0
    responses: int = 0
    events: int = 0
    checked: int = 0
    resumes: int = 0
    violations: list[str] = field(default_factory=list)
    final_revision: int = 0
    seconds: float = 0.0
    cpu: float = 0.0


class Writer:
    def __init__(self, index: int, client: Client, figures: Figures, commits: list[Commit], prefix: str = "") -> None:
        self.prefix = prefix
        self.index = index
        self.client = client
        self.figures = figures
        self.commits = commits
        self.acked: dict[str, tuple[int, bool]] = {}  # job -> (last acked version, deleted)
        self.n = 0

    def run(self, until: float) -> None:
        while time.monotonic() < until:
            job_id = f"{self.prefix}w{self.index}-j{self.n}"
            node = f"node-{self.n % NODES}"
            self.n += 1
            try:
                self.life(job_id, node)
            except JobStateError as exc:
                if exc.code in UNKNOWN_OUTCOME:
                    self.figures.unknown += 1
                    time.sleep(0.05)
                else:
                    self.figures.unexpected.append(f"{job_id}: {exc.code.name} {exc.message}")

    def ack(self, response: Any, deleted: bool = False) -> None:
        self.figures.writes += 1
        commit = Commit.of(response, deleted=deleted)
        self.commits.append(commit)
        self.acked[commit.job_id] = (commit.version, deleted)

    def life(self, job_id: str, node: str) -> None:
        c = self.client
        self.ack(c.create_job(job_id))
        r = c.create_execution(job_id, node)
        self.ack(r)
        ref = r.execution.compute_reference
        self.ack(c.update_execution(job_id, ref, state="BID_ACCEPTED", expected_version=1))
        self.ack(c.update_execution(job_id, ref, state="COMPLETED", expected_version=2))
        self.ack(c.update_job_state(job_id, "COMPLETED", expected_version=4))
        self.ack(c.delete_job(job_id, expected_version=5), deleted=True)


class Watcher:
    def __init__(self, name: str, client: AsyncClient, start: int, figures: Figures, **spec: Any) -> None:
        self.checker = WatchChecker(
            name, job_ids=frozenset(spec["job_ids"]) if spec.get("job_ids") else None, node_id=spec.get("node_id", "")
        )
        self.checker.begin(start)
        self.figures = figures
        self.stream = client.watch(
            spec.get("job_ids", ()),
            node_id=spec.get("node_id", ""),
            start_revision=start,
            progress_interval=1.0,  # bookmarks carry idle watchers to the final revision
            on_resume=self._resumed,
        )
        self.registered = asyncio.Event()
        self.reached = asyncio.Event()
        self.target = 0
        self.error: BaseException | None = None

    def _resumed(self, err: JobStateError, attempt: int, delay: float) -> None:
        self.figures.resumes += 1
        self.checker.begin(self.stream.position + 1)

    async def run(self) -> None:
        try:
            async for response in self.stream.responses():
                self.registered.set()
                self.checker.observe(response)
                if self.target and self.stream.position >= self.target:
                    self.reached.set()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.error = exc
            self.reached.set()
            self.registered.set()


async def main(cfg: dict[str, Any]) -> Figures:
    figures = Figures()
    prefix = cfg.get("prefix", "")
    backoff = Backoff(initial=0.02, maximum=0.5)
    # Writers are blocking clients in threads of their own, so that watchers busy on the event loop do not
    # delay them.
    write_clients = [Client(cfg["target"], timeout=5, backoff=backoff) for _ in range(max(1, cfg["writers"] // 4))]
    watch_clients = [
        AsyncClient(cfg.get("watch_target", cfg["target"]), timeout=5, backoff=backoff)
        for _ in range(max(1, cfg["watchers"] // 50))
    ]
    start = write_clients[0].list_jobs(page_size=1).revision + 1
    watchers: list[Watcher] = []
    for i in range(cfg["watchers"]):
        client = watch_clients[i % len(watch_clients)]
        kind = i % 10
        if kind == 0:
            spec: dict[str, Any] = {}
        elif kind < 6:
            w = i % cfg["writers"]
            spec = {"job_ids": [f"{prefix}w{w}-j{n}" for n in range(JOBS_PER_WATCHED_SET)]}
        else:
            spec = {"node_id": f"node-{i % NODES}"}
        watchers.append(Watcher(f"watcher-{i}", client, start, figures, **spec))
    figures.watchers = len(watchers)
    tasks = [asyncio.create_task(w.run()) for w in watchers]
    stall_calls = []
    for _ in range(cfg.get("stalled", 0)):
        # Opened and never read: the server must keep serving everyone else.
        call = watch_clients[0]._stub.Watch(spb.WatchRequest(start_revision=start))
        stall_calls.append(call)
    figures.stalled = len(stall_calls)
    async with asyncio.timeout(60):
        await asyncio.gather(*(w.registered.wait() for w in watchers))
    print("ready", flush=True)

    commits: list[Commit] = []
    writers = [
        Writer(i, write_clients[i % len(write_clients)], figures, commits, prefix) for i in range(cfg["writers"])
    ]
    t0 = time.monotonic()
    loop = asyncio.get_running_loop()
    with concurrent.futures.ThreadPoolExecutor(len(writers) or 1, thread_name_prefix="writer") as pool:
        await asyncio.gather(*(loop.run_in_executor(pool, w.run, t0 + cfg["duration"]) for w in writers))
    figures.seconds = round(time.monotonic() - t0, 2)
    figures.cpu = round(time.process_time(), 2)

    # The final reads wait out a server still restarting (a fault test's last restart can outlast the writers).
    reader = Client(cfg["target"], timeout=5, backoff=Backoff(initial=0.05, maximum=0.5), read_attempts=200)
    final = reader.list_jobs(page_size=1).revision
    figures.final_revision = final
    for w in watchers:
        w.target = final
        if w.stream.position >= final:
            w.reached.set()
    try:
        async with asyncio.timeout(cfg.get("settle", 60)):
            await asyncio.gather(*(w.reached.wait() for w in watchers))
    except TimeoutError:
        behind = [(w.checker.name, w.stream.position) for w in watchers if not w.reached.is_set()]
        figures.violations.append(f"{len(behind)} watchers never reached revision {final}: {behind[:5]}")
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for call in stall_calls:
        call.cancel()

    jobs = list(reader.iter_jobs(page_size=1000))
    exhaustive = figures.unknown == 0
    for w in watchers:
        figures.responses += w.checker.responses
        figures.events += len(w.checker.live_events())
        if w.error is not None:
            figures.violations.append(f"{w.checker.name}: ended with {w.error!r}")
            continue
        try:
            figures.checked += w.checker.check_complete(commits, exhaustive=exhaustive)
            w.checker.check_snapshot(jobs)
        except AssertionError as exc:
            figures.violations.append(str(exc))
    # Every acknowledged write is visible: each job is at least at its last acknowledged version, or gone.
    have = {j.job_id: j.version for j in jobs}
    for writer in writers:
        for job_id, (version, deleted) in writer.acked.items():
            if deleted and job_id in have:
                figures.violations.append(f"{job_id} deleted (acknowledged) but still listed")
            elif not deleted and have.get(job_id, 0) < version:
                figures.violations.append(f"{job_id} acknowledged at v{version}, the store has {have.get(job_id)}")
    for c in [*write_clients, reader]:
        c.close()
    for a in watch_clients:
        await a.close()
    return figures


if __name__ == "__main__":
    result = asyncio.run(main(json.loads(sys.argv[1])))
    print(json.dumps(result.__dict__), flush=True)
    sys.exit(1 if result.violations or result.unexpected else 0)
