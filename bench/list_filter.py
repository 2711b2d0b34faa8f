"""What a filtered ListJobs costs the server, and what it costs another client (issue 13 item 3).

    python bench/list_filter.py [--jobs 100000] [--readers 8] [--filter state|state+node]

Starts a server in a subprocess holding ``--jobs`` jobs (the 10 newest COMPLETED, 20 with an execution on node
``n-rare``), then prints: the time of one ``ListJobs(states=[COMPLETED], page_size=1)`` alone, and the latency of
another client's ``GetJob`` while ``--readers`` processes send that ListJobs in a loop. Figures only: no
assertion, timing depends on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]


def serve(jobs: int, port_file: str) -> None:
    from jobstate.server.main import ServerConfig, build_server
    from jobstate.v1 import job_state_pb2 as pb

    async def main() -> None:
        app = build_server(ServerConfig(port=0))
        store = app.store
        for i in range(jobs):
            await store.create_job(f"j{i:06d}")
        for i in range(10):  # the newest: an unindexed walk passes every other job first
            await store.update_job_state(f"j{jobs - 10 + i:06d}", pb.JOB_STATE_TYPE_COMPLETED)
        for i in range(20):
            await store.create_execution(f"j{(i + 1) * jobs // 21:06d}", pb.ExecutionState(node_id="n-rare"))
        await app.start()
        await asyncio.to_thread(Path(port_file).write_text, str(app.port))
        await asyncio.Event().wait()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def request(kind: str) -> object:
    from jobstate.v1 import job_state_pb2 as pb
    from jobstate.v1 import job_state_service_pb2 as spb

    if kind == "state+node":
        # Both filters: the walk takes the smaller index (the node's) and checks the state.
        return spb.ListJobsRequest(states=[pb.JOB_STATE_TYPE_NEW], node_id="n-rare", page_size=1000)
    return spb.ListJobsRequest(states=[pb.JOB_STATE_TYPE_COMPLETED], page_size=1)


def reader(target: str, kind: str, stop: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    from jobstate.v1 import job_state_service_pb2_grpc as g

    stub = g.JobStateServiceStub(grpc.insecure_channel(target))
    req = request(kind)
    while not stop.is_set():
        stub.ListJobs(req, timeout=60)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=100_000)
    ap.add_argument("--readers", type=int, default=8)
    ap.add_argument("--filter", choices=["state", "state+node"], default="state")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port-file", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        serve(a.jobs, a.port_file)
        return 0

    from jobstate.v1 import job_state_service_pb2 as spb
    from jobstate.v1 import job_state_service_pb2_grpc as g

    port_file = Path(f"/tmp/list_filter.{os.getpid()}.port")
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--jobs", str(a.jobs), "--port-file", str(port_file)], cwd=ROOT
    )
    try:
        while not port_file.exists():
            if server.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.1)
        target = f"127.0.0.1:{port_file.read_text()}"
        stub = g.JobStateServiceStub(grpc.insecure_channel(target))
        req = request(a.filter)
        stub.ListJobs(req, timeout=60)
        alone = []
        for _ in range(30):
            t = time.perf_counter()
            stub.ListJobs(req, timeout=60)
            alone.append(time.perf_counter() - t)
        quiet = []
        for _ in range(200):
            t = time.perf_counter()
            stub.GetJob(spb.GetJobRequest(job_id="j000001"), timeout=60)
            quiet.append(time.perf_counter() - t)
        stop = multiprocessing.Event()
        procs = [multiprocessing.Process(target=reader, args=(target, a.filter, stop)) for _ in range(a.readers)]
        for p in procs:
            p.start()
        time.sleep(1.0)  # the readers connected and busy
        busy = []
        for _ in range(200):
            t = time.perf_counter()
            stub.GetJob(spb.GetJobRequest(job_id="j000001"), timeout=60)
            busy.append(time.perf_counter() - t)
        stop.set()
        for p in procs:
            p.join(30)
        ms = 1000
        print(
            f"jobs {a.jobs}  filter {a.filter}  ListJobs alone: median {statistics.median(alone) * ms:.2f} ms  "
            f"GetJob median: quiet {statistics.median(quiet) * ms:.2f} ms, with {a.readers} listing readers "
            f"{statistics.median(busy) * ms:.2f} ms (p90 {sorted(busy)[179] * ms:.2f} ms)"
        )
    finally:
        server.kill()
        server.wait()
        port_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
