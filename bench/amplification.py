"""The history amplification repro of issue 13: server memory when a few requests ask it to keep gigabytes.

One writer builds a job just under the per-job size limit (four executions, each with large run output), then
sends 1,000 tiny status updates to one execution. Before the byte budget every change kept a full copy of the
2 MiB job for watchers, so the server grew by about 1.9 GiB; now the watch history is bounded by
``--history-bytes`` and a status update shares the unchanged run output with the change before it.

    python -m bench.amplification                      # default flags, memory engine
    python -m bench.amplification --store sqlite       # or etcd (the RSS is then the server's and etcd's)
    python -m bench.amplification --rev 93fdda3        # a commit's server (before the byte budget)
    python -m bench.amplification -- --history-bytes 8MiB

Prints the server's RSS before, after building the job and after the updates (one line of JSON at the end).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.servers import (
    HOST,
    REPO,
    SQLITE_BASE,
    _stop,
    _wait_port,
    dir_bytes,
    etcd_server,
    exported,
    free_port,
    rss_bytes,
)
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
    parser.add_argument("--store", choices=["memory", "sqlite", "etcd"], default="memory")
    parser.add_argument("--rev", help="measure this git revision's server instead of the work tree (e.g. a commit)")
    parser.add_argument("serve_args", nargs="*", help="extra flags for jobstate serve (after --)")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(exported(args.rev)) if args.rev else REPO
        engine: list[str] = []
        helpers: tuple[int, ...] = ()
        data = ""
        if args.store == "sqlite":
            data = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-amp-", dir=SQLITE_BASE))
            engine = ["--store", "sqlite", "--data-dir", data]
        elif args.store == "etcd":
            etcd = stack.enter_context(etcd_server())
            helpers = (etcd.pid,)
            engine = ["--store", "etcd", "--etcd-endpoints", f"http://{etcd.target}"]
        port = free_port()
        cmd = [sys.executable, "-m", "jobstate", "serve", "--host", HOST, "--port", str(port), *engine]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(source / d) for d in ("server", "client", "gen"))}
        log = stack.enter_context(tempfile.TemporaryFile())
        proc = subprocess.Popen([*cmd, *args.serve_args], cwd=REPO, stdout=log, stderr=log, env=env)

        def rss() -> tuple[int, int]:
            """The server's RSS, and its helpers' (etcd)."""
            return rss_bytes(proc.pid), sum(rss_bytes(p) for p in helpers)

        try:
            _wait_port(port, proc)
            with Client(f"{HOST}:{port}") as c:
                c.list_jobs()
                time.sleep(0.2)
                (start, etcd_start) = rss()
                size = build_big_job(c, "big")
                built, _ = rss()
                t0 = time.perf_counter()
                for i in range(args.updates):
                    c.update_execution("big", "exec-0", status=f"s{i}")
                elapsed = time.perf_counter() - t0
                c.get_job("big")
                (after, etcd_after) = rss()
                disk = dir_bytes(Path(data)) if data else None
        finally:
            _stop(proc)
    result = {
        "store": args.store,
        "rev": args.rev or "work tree",
        "serve_args": args.serve_args,
        "job_bytes": size,
        "updates": args.updates,
        "rss_start_mib": round(start / MiB, 1),
        "rss_built_mib": round(built / MiB, 1),
        "rss_after_mib": round(after / MiB, 1),
        "growth_mib": round((after - start) / MiB, 1),
        "updates_per_s": round(args.updates / elapsed, 1),
        "etcd_growth_mib": round((etcd_after - etcd_start) / MiB, 1) if helpers else None,
        "disk_mib": round(disk / MiB, 1) if disk is not None else None,
    }
    print(
        f"{args.store} ({result['rev']}): job {size / MiB:.2f} MiB; RSS {result['rss_start_mib']} MiB at start, "
        f"{result['rss_built_mib']} MiB with the job, {result['rss_after_mib']} MiB after {args.updates} status "
        f"updates (+{result['growth_mib']} MiB); {result['updates_per_s']} updates/s"
        + (f"; etcd itself +{result['etcd_growth_mib']} MiB" if helpers else "")
        + (f"; data dir {result['disk_mib']} MiB" if disk is not None else "")
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
