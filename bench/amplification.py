"""The history amplification repro of issue 13: server memory when a few requests ask it to keep gigabytes.

One writer builds a job just under the per-job size limit (four executions, each with large run output), then
sends 1,000 tiny status updates to one execution. Before the byte budget every change kept a full copy of the
2 MiB job for watchers, so the server grew by about 1.9 GiB; now the watch history is bounded by
``--history-bytes`` and a status update shares the unchanged run output with the change before it.

    python -m bench.amplification                      # default flags
    python -m bench.amplification -- --history-bytes 8MiB

Prints the server's RSS before, after building the job and after the updates (one line of JSON at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from bench.servers import HOST, REPO, _stop, _wait_port, free_port, rss_bytes
from jobstate.client import Client
from jobstate.server import rules
from jobstate.v1 import job_state_pb2 as pb

MiB = 1024 * 1024


def build_big_job(c: Client, job_id: str, executions: int = 4) -> int:
    """A job of ``executions`` executions whose run output brings it just under the size limit; its size."""
    c.create_job(job_id)
    limit = rules.DEFAULT_LIMITS.max_job_bytes
    out_max = rules.DEFAULT_LIMITS.max_output_bytes
    # Leave room for ids, times and the 1,000 statuses that follow.
    per_exec = (limit - 16 * 1024) // executions
    for i in range(executions):
        ref = f"exec-{i}"
        c.create_execution(job_id, f"node-{i}", compute_reference=ref)
        stdout = out_max if per_exec > out_max else per_exec - 512
        stderr = max(0, per_exec - stdout - 512)
        run = pb.ExecutionState(run_output=pb.RunCommandResult(stdout="o" * stdout, stderr="e" * stderr))
        c.update_execution(job_id, ref, run, status="running with output")
    return c.get_job(job_id).job.ByteSize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=1000)
    parser.add_argument("serve_args", nargs="*", help="extra flags for jobstate serve (after --)")
    args = parser.parse_args(argv)
    port = free_port()
    cmd = [sys.executable, "-m", "jobstate", "serve", "--host", HOST, "--port", str(port), *args.serve_args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO / d) for d in ("server", "client", "gen"))}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log, env=env)
        try:
            _wait_port(port, proc)
            with Client(f"{HOST}:{port}") as c:
                c.list_jobs()
                time.sleep(0.2)
                start = rss_bytes(proc.pid)
                size = build_big_job(c, "big")
                built = rss_bytes(proc.pid)
                t0 = time.perf_counter()
                for i in range(args.updates):
                    c.update_execution("big", "exec-0", status=f"s{i}")
                elapsed = time.perf_counter() - t0
                c.get_job("big")
                after = rss_bytes(proc.pid)
        finally:
            _stop(proc)
    result = {
        "serve_args": args.serve_args,
        "job_bytes": size,
        "updates": args.updates,
        "rss_start_mib": round(start / MiB, 1),
        "rss_built_mib": round(built / MiB, 1),
        "rss_after_mib": round(after / MiB, 1),
        "growth_mib": round((after - start) / MiB, 1),
        "updates_per_s": round(args.updates / elapsed, 1),
    }
    print(
        f"job {size / MiB:.2f} MiB; RSS {result['rss_start_mib']} MiB at start, {result['rss_built_mib']} MiB "
        f"with the job, {result['rss_after_mib']} MiB after {args.updates} status updates "
        f"(+{result['growth_mib']} MiB); {result['updates_per_s']} updates/s"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
