"""HTTP next to gRPC, on one server (``python -m bench.vs_http``; ``make bench`` runs it after the main table).

One jobstate server (memory engine) with its HTTP listener; each run measures, on that same server:

- unary: 32 writers doing compare-and-set ``UpdateJobState`` on distinct jobs (the main table's "CAS distinct"
  workload) for ``duration`` seconds, once over gRPC (grpc.aio) and once over Connect JSON (connectrpc's
  generated client on HTTP/1.1): calls/s, p99, and the server's CPU a call;
- fan-out: 100 watchers of every job, a writer at 1,000 writes/s and at full speed (both over gRPC, so only the
  watch path differs), once with the watchers on gRPC and once on Connect streaming (binary, and JSON at
  1,000/s): events/s received and p99 send-to-receipt.

``--runs N`` repeats the whole set on a fresh server each time; the table gives the median of the runs and the
spread (lowest-highest), so a reader sees how far one run is from the next on this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from bench import servers
from bench.run import FULL, QUICK, RESULTS, machine, run_cas, run_fanout

GRPC = "jobstate"
CONNECT_JSON = "jobstate-connect-json"
CONNECT_PROTO = "jobstate-connect-proto"


def one_run(quick: bool, uv: bool) -> dict[str, dict[str, Any]]:
    sz = replace(QUICK if quick else FULL, duration=1.0 if quick else 3.0)
    out: dict[str, dict[str, Any]] = {}

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] http bench: {msg}", file=sys.stderr, flush=True)

    with servers.jobstate_server(100_000, http=True) as srv:
        for key, system, target in (
            ("unary_grpc", GRPC, srv.target),
            ("unary_connect_json", CONNECT_JSON, srv.http_url),
        ):
            out[key] = r = run_cas(system, target, sz, False, uv, srv.pids, False, "")
            log(
                f"{key}: {r['throughput']:.0f} calls/s p99 {r['p99']:.2f} ms, {r['server_cpu_us_per_write']:.0f} us CPU"
            )
        for rate in (1000.0, 0.0):
            watchers = [("grpc", GRPC, srv.target), ("connect_proto", CONNECT_PROTO, srv.http_url)]
            for name, system, target in watchers:
                key = f"fanout_{'full' if not rate else int(rate)}_{name}"
                out[key] = r = run_fanout(system, target, sz, 100, "all", rate, uv, srv.pids, writer=(GRPC, srv.target))
                log(
                    f"{key}: {r['throughput']:.0f} ev/s p99 {r['p99'] or 0:.2f} ms "
                    f"{r['received']}/{r['expected']}, {r['server_cpu_us_per_event']:.1f} us CPU an event"
                )
    return out


ROWS: list[tuple[str, str, str, str, str]] = [
    # (label, unit, gRPC key, HTTP key, how)
    ("unary: CAS UpdateJobState, 32 writers", "calls/s", "unary_grpc", "unary_connect_json", "Connect JSON"),
    (
        "Watch, 100 watchers, 1,000 writes/s",
        "events/s",
        "fanout_1000_grpc",
        "fanout_1000_connect_proto",
        "Connect binary",
    ),
    (
        "Watch, 100 watchers, full-speed writer",
        "events/s",
        "fanout_full_grpc",
        "fanout_full_connect_proto",
        "Connect binary",
    ),
]


def _stat(runs: list[dict[str, dict[str, Any]]], key: str, field: str) -> tuple[float, float, float] | None:
    values = [r[key][field] for r in runs if r.get(key) and r[key].get(field) is not None]
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def _fmt(s: tuple[float, float, float] | None, digits: int = 0) -> str:
    if s is None:
        return "-"
    med, lo, hi = s
    f: Callable[[float], str] = (lambda x: f"{x:,.0f}") if digits == 0 else (lambda x: f"{x:.{digits}f}")
    return f"{f(med)} ({f(lo)}-{f(hi)})"


def table(runs: list[dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    out = []
    for label, unit, g, h, how in ROWS:
        gt, ht = _stat(runs, g, "throughput"), _stat(runs, h, "throughput")
        cpu = "server_cpu_us_per_write" if unit == "calls/s" else "server_cpu_us_per_event"
        out.append(
            {
                "scenario": label,
                "http": how,
                "unit": unit,
                "grpc": gt,
                "grpc_p99_ms": _stat(runs, g, "p99"),
                "grpc_cpu_us": _stat(runs, g, cpu),
                "over_http": ht,
                "http_p99_ms": _stat(runs, h, "p99"),
                "http_cpu_us": _stat(runs, h, cpu),
                "http_over_grpc": (ht[0] / gt[0]) if gt and ht and gt[0] else None,
            }
        )
    return out


def markdown(rows: list[dict[str, Any]], n: int, info: dict[str, Any], quick: bool) -> str:
    head = (
        f"HTTP next to gRPC on one jobstate server (memory engine), {n} run(s){' (quick)' if quick else ''}: "
        "median (lowest-highest). Server CPU is µs of the server process per call or per event delivered.\n\n"
        "| scenario | HTTP protocol | gRPC | HTTP | HTTP / gRPC | gRPC p99 ms | HTTP p99 ms "
        "| gRPC CPU µs | HTTP CPU µs |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['scenario']} ({r['unit']}) | {r['http']} | {_fmt(r['grpc'])} | {_fmt(r['over_http'])} | "
        f"{r['http_over_grpc']:.2f} | {_fmt(r['grpc_p99_ms'], 2)} | {_fmt(r['http_p99_ms'], 2)} | "
        f"{_fmt(r['grpc_cpu_us'], 1)} | {_fmt(r['http_cpu_us'], 1)} |"
        if r["http_over_grpc"] is not None
        else f"| {r['scenario']} | {r['http']} | - | - | - | - | - | - | - |"
        for r in rows
    ]
    env = (
        f"\n\n{info['cores']} cores ({info['cpu']}), Python {info['python']}, grpcio {info['grpcio']}, "
        f"{info['date']}, source {info['jobstate_source']}. Clients and server share the machine."
    )
    return head + "\n".join(lines) + env + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.vs_http", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="one-second phases")
    ap.add_argument("--runs", type=int, default=3, help="fresh-server runs (the table gives median and spread)")
    ap.add_argument("--uvloop", action="store_true", help="clients on uvloop's event loop")
    ap.add_argument("--out", default="", help="file stem under bench/results (default: http, or http-quick)")
    args = ap.parse_args(argv)
    runs = [one_run(args.quick, args.uvloop) for _ in range(max(1, args.runs))]
    rows = table(runs)
    info = machine()
    stem = args.out or ("http-quick" if args.quick else "http")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"machine": info, "runs": runs, "table": rows}, indent=1))
    text = markdown(rows, len(runs), info, args.quick)
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
