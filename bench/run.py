"""The coordinator: starts each server, runs every scenario against it from client processes, writes the table.

Run as ``python -m bench`` (``make bench``); ``--quick`` is the same with small counts (``make bench QUICK=1``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import servers
from bench.backends import make
from bench.work import Hist, Sync, entry

CTX = mp.get_context("spawn")
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Sizes:
    duration: float  # seconds of each measured fan-out / CAS phase
    cas_writers: int
    watchers: tuple[int, ...]
    rates: tuple[float, ...]  # writes/s; 0 = full speed
    modes: tuple[str, ...]  # "all": every watcher watches every job; "single": each watches one job
    full_speed_lanes: int
    jobs: int  # the memory / initial-sync population, each with 2 executions
    idle_watchers: int
    behind: int  # catch-up distance in revisions
    populate_lanes: int = 64
    drain: float = 30.0  # at most this long waiting for watchers to receive what was written


FULL = Sizes(2.0, 32, (1, 10, 100, 1000), (1000.0, 0.0), ("all", "single"), 16, 100_000, 1000, 100_000, 64, 20.0)
QUICK = Sizes(0.5, 32, (100,), (1000.0, 0.0), ("all", "single"), 16, 2_000, 200, 5_000, 32, 8.0)

# jobstate on sqlite and on etcd: the scenarios that show what durability and distribution cost (CAS, fan-out to
# 100 watchers of every job, initial sync, catch-up, memory), at smaller counts: each of their writes commits to
# the disk or to etcd, so populating 100,000 jobs would take most of the run. No idle-watcher row (0).
ENGINE_FULL = replace(FULL, watchers=(100,), modes=("all",), jobs=20_000, idle_watchers=0, behind=50_000)
ENGINE_QUICK = replace(
    QUICK, duration=0.25, watchers=(100,), modes=("all",), jobs=300, idle_watchers=0, behind=1_000, drain=5.0
)

# The systems ``--systems`` accepts, in table order: the column each gets and the engine it runs on.
SYSTEMS = {"jobstate": "memory", "jobstate-sqlite": "sqlite", "jobstate-etcd": "etcd", "etcd": ""}
ENGINES = {"jobstate-sqlite": "jobstate (sqlite)", "jobstate-etcd": "jobstate (on etcd)"}
ENGINE_KEY = {"jobstate-sqlite": "sqlite", "jobstate-etcd": "on_etcd"}  # their keys in the JSON table
SHORT = {"jobstate-sqlite": "sqlite", "jobstate-etcd": "on-etcd"}  # in column names and notes


def sizes_of(system: str, quick: bool) -> Sizes:
    if system in ENGINES:
        return ENGINE_QUICK if quick else ENGINE_FULL
    return QUICK if quick else FULL


def new_sync(procs: int) -> Sync:
    return Sync(
        go=CTX.Event(),
        stop=CTX.Event(),
        jobs_ready=CTX.Event(),
        head=CTX.Value("q", 0),
        started=CTX.Value("q", 0),
        ready=CTX.Value("q", 0),
        t_start=CTX.Value("q", 0, lock=False),
        received=CTX.Array("q", max(procs, 1)),
    )


@dataclass
class Procs:
    """Client processes of one scenario run; ``results`` waits for every one (bounded) and returns their dicts."""

    system: str
    target: str
    sync: Sync
    uv: bool
    running: list[tuple[Any, Any]] = field(default_factory=list)

    def spawn(self, name: str, p: dict[str, Any], index: int = 0, via: tuple[str, str] | None = None) -> None:
        """Starts client process ``name``; ``via`` (system, target) overrides the run's own."""
        system, target = via or (self.system, self.target)
        parent, child = CTX.Pipe(duplex=False)
        proc = CTX.Process(target=entry, args=(name, system, target, p, self.sync, index, child, self.uv), daemon=True)
        proc.start()
        child.close()
        self.running.append((proc, parent))

    def results(self, timeout: float = 300) -> list[dict[str, Any]]:
        out = []
        deadline = time.monotonic() + timeout
        for proc, conn in self.running:
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                proc.terminate()
                raise TimeoutError(f"client process {proc.pid} gave no result in {timeout}s")
            r = conn.recv()
            proc.join(10)
            if "error" in r:
                raise RuntimeError(f"client process failed:\n{r['error']}")
            out.append(r)
        self.running.clear()
        return out

    def kill(self) -> None:
        for proc, _ in self.running:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        self.running.clear()


def cpu_seconds(pids: tuple[int, ...]) -> float:
    """User + system CPU time of processes ``pids`` so far (a server and its helpers: jobstate's etcd)."""
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def wait_until(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done after {timeout}s")
        time.sleep(0.01)


class Profiler(AbstractContextManager["Profiler"]):
    """py-spy sampling the server while a scenario runs (``--profile``); collapsed stacks to ``path``."""

    def __init__(self, pid: int, seconds: float, path: Path) -> None:
        self.pid, self.seconds, self.path = pid, seconds, path
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Profiler:
        spy = Path(sys.executable).with_name("py-spy")
        self.proc = subprocess.Popen(
            [
                *(str(spy), "record", "--pid", str(self.pid), "--duration", str(max(1, round(self.seconds)))),
                *("--rate", "200", "--format", "raw", "--nonblocking", "-o", str(self.path)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(timeout=self.seconds + 30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# --- scenarios -----------------------------------------------------------------------------------------------


def run_cas(
    system: str,
    target: str,
    sz: Sizes,
    shared: bool,
    uv: bool,
    server_pids: tuple[int, ...],
    profile: bool,
    tag: str,
) -> dict[str, Any]:
    run = f"cas-{'shared' if shared else 'distinct'}-{time.monotonic_ns()}"
    per_proc = sz.cas_writers // 2
    jobs = [f"{run}-0"] * sz.cas_writers if shared else [f"{run}-{i}" for i in range(sz.cas_writers)]

    async def setup() -> None:
        b = make(system, target)
        for j in sorted(set(jobs)):
            await b.create(j)
        await b.close()

    asyncio.run(setup())
    sync = new_sync(2)
    procs = Procs(system, target, sync, uv)
    try:
        for i in range(2):
            procs.spawn("cas", {"jobs": jobs[i * per_proc : (i + 1) * per_proc], "duration": sz.duration}, i)
        time.sleep(0.5)  # let every process connect and read its tokens before the clock starts
        cpu0 = cpu_seconds(server_pids)
        with Profiler(server_pids[0], sz.duration, RESULTS / f"profile-{tag}.txt") if profile else _null():
            sync.go.set()
            rs = procs.results()
        cpu = cpu_seconds(server_pids) - cpu0
    finally:
        procs.kill()
    hist = Hist()
    for r in rs:
        hist.merge(Hist(r["hist"]))
    ok = sum(r["ok"] for r in rs)
    conflicts = sum(r["conflicts"] for r in rs)
    elapsed = max(r["elapsed"] for r in rs)
    return {
        "throughput": ok / elapsed,
        "p50": hist.percentile_ms(50),
        "p99": hist.percentile_ms(99),
        "conflict_rate": conflicts / max(1, ok + conflicts),
        "writes": ok,
        "server_cpu_us_per_write": cpu * 1e6 / max(1, ok + conflicts),
    }


class _null(AbstractContextManager[None]):
    def __exit__(self, *exc: object) -> None:
        return None


def run_fanout(
    system: str,
    target: str,
    sz: Sizes,
    watchers: int,
    mode: str,
    rate: float,
    uv: bool,
    server_pids: tuple[int, ...],
    profile: bool = False,
    tag: str = "",
    writer: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """``writer`` (system, target): the writer's client when it is not the watchers' (the HTTP rows write over
    gRPC, so only the watch path differs)."""
    single = mode == "single"
    pool = max(100, watchers) if single else 100
    run = f"fan-{mode}-{watchers}-{int(rate)}-{time.monotonic_ns()}"
    jobs = [f"{run}-{i}" for i in range(pool)]
    nproc = 1 if watchers == 1 else 2
    sync = new_sync(nproc)
    procs = Procs(system, target, sync, uv)
    common = {"jobs": jobs, "single": single, "watchers": watchers}
    try:
        for i in range(nproc):
            procs.spawn("fanout_watchers", {**common, "mine": list(range(i, watchers, nproc))}, i)
        procs.spawn(
            "fanout_writer",
            {**common, "rate": rate, "duration": sz.duration, "concurrency": sz.full_speed_lanes},
            nproc,
            via=writer,
        )
        writer_proc, writer_conn = procs.running[-1]
        wait_until(lambda: sync.t_start.value != 0 or not writer_proc.is_alive(), 180, "fan-out warm-up")
        cpu0 = cpu_seconds(server_pids)
        with Profiler(server_pids[0], sz.duration, RESULTS / f"profile-{tag}.txt") if profile else _null():
            if not writer_conn.poll(sz.duration + 60):
                raise TimeoutError("fan-out writer gave no result")
        w = writer_conn.recv()
        if "error" in w:
            raise RuntimeError(f"writer failed:\n{w['error']}")
        procs.running.pop()
        writes = w["writes"]
        watched_writes = writes if not single else sum(1 for i in range(writes) if i % pool < watchers)
        if single and rate == 0.0:
            # Full-speed lanes visit jobs unevenly; every watched job's share is about watchers/pool.
            watched_writes = round(writes * watchers / pool)
        expected = watched_writes * (watchers if not single else 1)
        # Drain: until every expected event arrived, or nothing more arrives for 3 s (bounded by sz.drain).
        last, last_change, deadline = -1, time.monotonic(), time.monotonic() + sz.drain
        while time.monotonic() < deadline:
            got = sum(sync.received[:])
            if got >= expected:
                break
            if got != last:
                last, last_change = got, time.monotonic()
            elif time.monotonic() - last_change > 3:
                break
            time.sleep(0.05)
        cpu = cpu_seconds(server_pids) - cpu0
        sync.stop.set()
        rs = procs.results()
    finally:
        procs.kill()
    hist = Hist()
    for r in rs:
        hist.merge(Hist(r["hist"]))
    received = sum(r["received"] for r in rs)
    last_receipt = max(r["last_receipt"] for r in rs)
    span = max(1e-9, (last_receipt - sync.t_start.value) / 1e9)
    errors = [e for r in rs for e in r["errors"]]
    return {
        "throughput": received / span,
        "p50": hist.percentile_ms(50),
        "p99": hist.percentile_ms(99),
        "writes_per_s": writes / w["elapsed"],
        "received": received,
        "events_per_response": received / max(1, sum(r["responses"] for r in rs)),
        "server_cpu_us_per_event": cpu * 1e6 / max(1, received),
        "expected": expected,
        "errors": errors,
    }


def run_idle_watchers(system: str, srv: servers.Server, n: int, uv: bool) -> dict[str, Any]:
    jobs = [f"idle-{i}" for i in range(n)]

    async def setup() -> None:
        b = make(system, srv.target)
        from bench.work import bounded

        await bounded(32, jobs, b.create)
        await b.close()

    asyncio.run(setup())
    time.sleep(0.5)
    before = srv.rss()
    sync = new_sync(2)
    procs = Procs(system, srv.target, sync, uv)
    try:
        for i in range(2):
            procs.spawn("idle_watchers", {"jobs": jobs[i::2]}, i)
        wait_until(lambda: sync.ready.value >= n, 120, "idle watchers")
        time.sleep(1.0)  # let the server's allocations settle
        after = srv.rss()
        sync.stop.set()
        procs.results()
    finally:
        procs.kill()
    return {"bytes": after - before, "per_watcher": (after - before) / n, "watchers": n}


def run_population(system: str, srv: servers.Server, sz: Sizes, uv: bool) -> dict[str, Any]:
    time.sleep(0.5)
    before = srv.rss()
    sync = new_sync(2)
    procs = Procs(system, srv.target, sync, uv)
    half = sz.jobs // 2
    try:
        for i in range(2):
            p = {"prefix": "pop", "first": i * half, "last": sz.jobs if i else half, "executions": 2}
            procs.spawn("populate", {**p, "concurrency": sz.populate_lanes}, i)
        rs = procs.results(timeout=1200)
    finally:
        procs.kill()
    time.sleep(1.0)
    after = srv.rss()
    elapsed = max(r["elapsed"] for r in rs)
    return {
        "bytes": after - before,
        "per_job": (after - before) / sz.jobs,
        "jobs": sz.jobs,
        "writes_per_s": 3 * sz.jobs / elapsed,
        "rss_after": after,
        "disk_per_job": disk / sz.jobs if (disk := srv.disk()) is not None else None,
    }


def run_reads(system: str, target: str, sz: Sizes, uv: bool) -> dict[str, Any]:
    procs = Procs(system, target, new_sync(1), uv)
    try:
        procs.spawn("reads", {"behind": sz.behind})
        (r,) = procs.results(timeout=600)
    finally:
        procs.kill()
    return r


def run_system(system: str, args: argparse.Namespace) -> dict[str, Any]:
    uv = args.uvloop
    sz = sizes_of(system, args.quick)
    out: dict[str, Any] = {"cas": {}, "fanout": {}}
    history = max(100_000, sz.behind)
    profile = args.profile and system == "jobstate"

    def server() -> AbstractContextManager[servers.Server]:
        if system == "etcd":
            return servers.etcd_server()
        return servers.jobstate_server(history, uvloop=uv, source=args.source_dir, store=SYSTEMS[system])

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {system}: {msg}", file=sys.stderr, flush=True)

    with server() as srv:
        for shared in (False, True):
            key = "shared" if shared else "distinct"
            out["cas"][key] = r = run_cas(system, srv.target, sz, shared, uv, srv.pids, profile and not shared, "cas")
            log(
                f"cas {key}: {r['throughput']:.0f}/s p99 {r['p99']:.2f} ms conflicts {r['conflict_rate']:.1%}, "
                f"server {r['server_cpu_us_per_write']:.0f} us CPU a write"
            )
        for mode in sz.modes:
            for rate in sz.rates:
                for n in sz.watchers:
                    key = f"{mode}/{n}/{'full' if not rate else int(rate)}"
                    prof = profile and mode == "all" and n == 100
                    tag = f"fanout-{mode}-{n}-{'full' if not rate else int(rate)}"
                    out["fanout"][key] = r = run_fanout(system, srv.target, sz, n, mode, rate, uv, srv.pids, prof, tag)
                    log(
                        f"fan-out {key}: {r['throughput']:.0f} ev/s, {r['writes_per_s']:.0f} w/s, "
                        f"p99 {r['p99'] or 0:.2f} ms, {r['received']}/{r['expected']}, "
                        f"{r['events_per_response']:.1f} events a response, "
                        f"server {r['server_cpu_us_per_event']:.1f} us CPU an event"
                    )
    with server() as srv:
        out["memory"] = r = run_population(system, srv, sz, uv)
        log(f"population: {r['per_job']:.0f} B/job, {r['writes_per_s']:.0f} writes/s")
        if sz.idle_watchers:
            out["idle"] = r = run_idle_watchers(system, srv, sz.idle_watchers, uv)
            log(f"idle watchers: {r['per_watcher'] / 1024:.1f} KiB each")
        out["reads"] = r = run_reads(system, srv.target, sz, uv)
        log(f"initial sync {r['listed']} in {r['sync_s']:.2f}s; catch-up {r['events']} in {r['catch_s']:.2f}s")
    return out


# --- report --------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def v(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "-"

    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(mem / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "grpcio": v("grpcio"),
        "protobuf": v("protobuf"),
        "aetcd": v("aetcd"),
        "uvloop": v("uvloop"),
        "etcd": servers.etcd_version(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "jobstate_source": _describe_source(),
        "sqlite_fs": servers.filesystem_of(servers.SQLITE_BASE or tempfile.gettempdir()),
    }


def _describe_source() -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=servers.REPO, capture_output=True, text=True, timeout=30).stdout.strip()

    rev = git("rev-parse", "--short", "HEAD") or "?"
    dirty = git("status", "--porcelain", "--", "server", "gen")
    return f"{rev}{' + uncommitted changes' if dirty else ''}"


def _f(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.2f}"


def _ratio_of(a: dict[str, Any], b: dict[str, Any], k: str) -> float | None:
    return (a[k] / b[k]) if a.get(k) and b.get(k) else None


def _lost(r: dict[str, Any]) -> bool:
    return bool(r["received"] < r["expected"] * 0.999)


def _engine_note(system: str, what: str, r: dict[str, Any] | None) -> str:
    """The notes of one engine column on one row: ``what`` picks the figures."""
    if not r:
        return ""
    who = SHORT[system]
    cpu = "jobstate + etcd CPU" if system == "jobstate-etcd" else "server CPU"
    if what == "cas":
        return f"{who}: conflicts {r['conflict_rate']:.0%}, {cpu} a write {r['server_cpu_us_per_write']:.0f} us"
    if what == "fanout":
        text = f"{who}: writes/s {r['writes_per_s']:,.0f}, {cpu} an event {r['server_cpu_us_per_event']:.0f} us"
        return text + (f", got {r['received']}/{r['expected']}" if _lost(r) else "")
    if what in ("sync_s", "catch_s"):
        return f"{who}: {_f(r[what])} s"
    if what == "memory":
        rss = "jobstate + etcd RSS" if system == "jobstate-etcd" else "RSS"
        disk = f", {r['disk_per_job']:,.0f} B on disk" if r.get("disk_per_job") is not None else ""
        return f"{who}: {rss} {_f(r['per_job'])} B a job{disk}"
    return ""


def rows(res: dict[str, dict[str, Any]], quick: bool) -> list[dict[str, Any]]:
    """The table: one row a scenario, jobstate (memory) vs etcd, and when run the engines' figures beside them."""
    sz, esz = sizes_of("jobstate", quick), sizes_of("jobstate-sqlite", quick)
    js, et = res.get("jobstate", {}), res.get("etcd", {})
    engines = [s for s in ENGINES if s in res]
    out: list[dict[str, Any]] = []

    def add(
        name: str,
        unit: str,
        a: dict[str, Any] | None,
        b: dict[str, Any] | None,
        note: str = "",
        extra: dict[str, dict[str, Any] | None] | None = None,
        what: str = "",
    ) -> None:
        a, b = a or {}, b or {}
        row = {
            "scenario": name,
            "unit": unit,
            "jobstate": a.get("throughput"),
            "etcd": b.get("throughput"),
            "ratio": _ratio_of(a, b, "throughput"),
            "jobstate_p50": a.get("p50"),
            "etcd_p50": b.get("p50"),
            "jobstate_p99": a.get("p99"),
            "etcd_p99": b.get("p99"),
            "p99_ratio": _ratio_of(a, b, "p99"),
            "note": note,
        }
        notes = [note] if note else []
        for system in engines:
            key = ENGINE_KEY[system]
            e = (extra or {}).get(system) or {}
            row[key] = e.get("throughput")
            row[f"{key}_ratio"] = _ratio_of(e, b, "throughput")
            row[f"{key}_p50"] = e.get("p50")
            row[f"{key}_p99"] = e.get("p99")
            if n := _engine_note(system, what, (extra or {}).get(system + ":raw")):
                notes.append(n)
        row["note"] = "; ".join(notes)
        out.append(row)

    def eng(part: str, key: str | None = None) -> dict[str, dict[str, Any] | None]:
        """Each engine's result of ``part`` (and ``key`` in it), as the row's figures and as its raw result."""
        got: dict[str, dict[str, Any] | None] = {}
        for system in engines:
            r = res[system].get(part)
            r = r.get(key) if (r is not None and key is not None) else r
            got[system] = got[system + ":raw"] = r
        return got

    for key, label in (("distinct", "distinct jobs"), ("shared", "one shared job")):
        a, b = js.get("cas", {}).get(key), et.get("cas", {}).get(key)
        note = ""
        if a and b:
            note = (
                f"conflicts {a['conflict_rate']:.0%} / {b['conflict_rate']:.0%}; server CPU a write "
                f"{a['server_cpu_us_per_write']:.0f} / {b['server_cpu_us_per_write']:.0f} us"
            )
        add(f"CAS, {sz.cas_writers} writers, {label}", "writes/s", a, b, note, eng("cas", key), "cas")
    keys: dict[str, None] = {}
    for s in res.values():
        keys |= dict.fromkeys(s.get("fanout", {}))
    for key in keys:
        mode, n, rate = key.split("/")
        a, b = js.get("fanout", {}).get(key), et.get("fanout", {}).get(key)
        what = "all jobs" if mode == "all" else "one job each"
        speed = "full speed" if rate == "full" else f"{rate} writes/s"
        note = ""
        if a and b:
            note = (
                f"writes/s {a['writes_per_s']:,.0f} / {b['writes_per_s']:,.0f}; events a response "
                f"{a['events_per_response']:.1f} / {b['events_per_response']:.1f}; server CPU an event "
                f"{a['server_cpu_us_per_event']:.0f} / {b['server_cpu_us_per_event']:.0f} us"
            )
            lost = [f"{s} got {r['received']}/{r['expected']}" for s, r in (("js", a), ("etcd", b))]
            if any(_lost(r) for r in (a, b)):
                note += "; " + ", ".join(lost)
        add(f"fan-out, {n} watchers of {what}, {speed}", "events/s", a, b, note, eng("fanout", key), "fanout")

    def also(what: str) -> str:
        """The row name's mention of the engines' smaller counts."""
        return f" (engines: {what})" if engines else ""

    ra, rb = js.get("reads"), et.get("reads")
    er = eng("reads")
    if ra or rb or any(er.values()):

        def rd(r: dict[str, Any] | None, k: str, n: str) -> dict[str, Any] | None:
            return {"throughput": r[n] / r[k]} if r else None

        note = f"{_f(ra['sync_s'] if ra else None)} s / {_f(rb['sync_s'] if rb else None)} s" if ra or rb else ""
        sync = {s: rd(r, "sync_s", "listed") if ":" not in s else r for s, r in er.items()}
        add(
            f"initial sync, list then watch {sz.jobs:,} jobs{also(f'{esz.jobs:,}')}",
            "jobs/s",
            rd(ra, "sync_s", "listed"),
            rd(rb, "sync_s", "listed"),
            note,
            sync,
            "sync_s",
        )
        note = f"{_f(ra['catch_s'] if ra else None)} s / {_f(rb['catch_s'] if rb else None)} s" if ra or rb else ""
        catch = {s: rd(r, "catch_s", "events") if ":" not in s else r for s, r in er.items()}
        behind = {r["behind"] for s, r in er.items() if r and ":" not in s}
        add(
            f"catch-up, {sz.behind:,} revisions behind{also(', '.join(f'{n:,}' for n in sorted(behind)))}",
            "events/s",
            rd(ra, "catch_s", "events"),
            rd(rb, "catch_s", "events"),
            note,
            catch,
            "catch_s",
        )

    def mm(r: dict[str, Any] | None, k: str, s: float) -> dict[str, Any] | None:
        return {"throughput": r[k] * s / 2**20} if r else None

    ma, mb = js.get("memory"), et.get("memory")
    em = eng("memory")
    if ma or mb or any(em.values()):
        scale = 100_000 / sz.jobs
        note = ""
        if ma or mb:
            note = f"{_f(ma['per_job'] if ma else None)} B / {_f(mb['per_job'] if mb else None)} B a job"
        add(
            f"memory: RSS per 100,000 jobs, 2 executions each{also(f'scaled from {esz.jobs:,}')}",
            "MiB",
            mm(ma, "bytes", scale),
            mm(mb, "bytes", scale),
            note,
            {s: mm(r, "bytes", 100_000 / esz.jobs) if ":" not in s else r for s, r in em.items()},
            "memory",
        )
    ia, ib = js.get("idle"), et.get("idle")
    if ia or ib:
        scale = 1000 / sz.idle_watchers
        note = (
            f"{_f(ia['per_watcher'] / 1024 if ia else None)} KiB / {_f(ib['per_watcher'] / 1024 if ib else None)} KiB"
            " a watcher"
        )
        add("memory: RSS per 1,000 idle watchers", "MiB", mm(ia, "bytes", scale), mm(ib, "bytes", scale), note)
    return out


def markdown(table: list[dict[str, Any]], info: dict[str, Any], quick: bool, args: argparse.Namespace) -> str:
    engines = [s for s in ENGINES if table and ENGINE_KEY[s] in table[0]]
    cols = ["scenario", "unit", "jobstate", "etcd", "jobstate/etcd"]
    for s in engines:
        cols += [ENGINES[s], f"{SHORT[s]}/etcd"]
    cols += ["p50 ms jobstate", "p50 ms etcd", "p99 ms jobstate", "p99 ms etcd", "p99 jobstate/etcd"]
    cols += [f"p50 / p99 ms {SHORT[s]}" for s in engines]
    cols += ["notes (jobstate / etcd" + ("; engines)" if engines else ")")]
    aligns = ["---", "---"] + ["---:"] * (len(cols) - 3) + ["---"]  # text, figures, notes
    head = "| " + " | ".join(cols) + " |\n| " + " | ".join(aligns) + " |\n"

    def line(r: dict[str, Any]) -> str:
        cells = [r["scenario"], r["unit"], _f(r["jobstate"]), _f(r["etcd"]), _ratio(r["jobstate"], r["etcd"])]
        for s in engines:
            k = ENGINE_KEY[s]
            cells += [_f(r[k]), _ratio(r[k], r["etcd"])]
        cells += [_f(r["jobstate_p50"]), _f(r["etcd_p50"]), _f(r["jobstate_p99"]), _f(r["etcd_p99"])]
        cells += [_ratio(r["jobstate_p99"], r["etcd_p99"])]
        for s in engines:
            k = ENGINE_KEY[s]
            cells.append("-" if r[f"{k}_p99"] is None else f"{_f(r[f'{k}_p50'])} / {_f(r[f'{k}_p99'])}")
        cells.append(r["note"])
        return "| " + " | ".join(cells) + " |"

    lines = [line(r) for r in table]
    m = info
    title = "QUICK run (small counts; memory scaled up from them)" if quick else "Full run"
    flags = (" --uvloop" if args.uvloop else "") + (f" --source {args.source}" if args.source else "")
    esz = sizes_of("jobstate-sqlite", quick)
    about = ""
    if "jobstate-sqlite" in engines:
        about += (
            f" jobstate (sqlite): `--store sqlite`, its data dir a fresh folder under {servers.SQLITE_BASE} "
            f"({m['sqlite_fs']}), removed after; WAL, an fsync a commit (synchronous=FULL)."
        )
    if "jobstate-etcd" in engines:
        about += (
            " jobstate (on etcd): `--store etcd`, one jobstate server on a single-member etcd of its own "
            "(started as the etcd column's, data dir on tmpfs); its CPU and memory figures count both processes."
        )
    if engines:
        about += (
            " The engines run fewer scenarios (CAS; fan-out to 100 watchers of every job; initial sync, catch-up "
            f"and memory from {esz.jobs:,} jobs, as the row names say); their ratio columns are engine/etcd."
        )
    return (
        f"# jobstate vs etcd: {title}\n\n"
        f"{m['date']} · {m['cores']} cores, {m['cpu']}, {m['memory_gib']} GiB · Python {m['python']}, "
        f"grpcio {m['grpcio']}, protobuf {m['protobuf']}, etcd {m['etcd']} (client: aetcd {m['aetcd']} stubs)"
        f"{' · uvloop ' + m['uvloop'] if args.uvloop else ''}"
        f" · jobstate {args.source or m['jobstate_source']}\n\n"
        f"Reproduce: `make bench{' QUICK=1' if quick else ''}`{f' (BENCH_ARGS={flags.strip()})' if flags else ''}. "
        "Server and clients share the machine; clients are separate processes (2 writer or watcher processes, "
        "one fan-out writer process), the same layout and the same thin grpc.aio layer for both systems. "
        "Throughput: higher is better; latency and memory: lower is better. Latency of writes is the call's "
        "round trip; of fan-out, send-to-receipt (the writer stamps its send time in the payload). etcd's data "
        f"dir is on tmpfs.{about}\n\n" + head + "\n".join(lines) + "\n"
    )


def targets(res: dict[str, dict[str, Any]]) -> list[str]:
    """Issue 4's targets, each with the measured figure."""
    js, et = res.get("jobstate", {}), res.get("etcd", {})
    out = []

    def line(ok: bool | None, text: str) -> None:
        out.append(f"- [{'x' if ok else ' '}] {text}" if ok is not None else f"- [?] {text}")

    f = js.get("fanout", {})
    full100 = f.get("all/100/full")
    if full100:
        line(
            full100["throughput"] >= 100_000,
            f"fan-out ≥ 100,000 events/s with 100 watchers: {full100['throughput']:,.0f}",
        )
    r100 = f.get("all/100/1000")
    if r100 and r100["p99"] is not None:
        line(r100["p99"] < 50, f"delivery p99 < 50 ms at 1,000 writes/s, 100 watchers: {r100['p99']:.2f} ms")
    cas = js.get("cas", {}).get("distinct")
    if cas:
        line(cas["throughput"] >= 3000, f"conditional writes ≥ 3,000/s: {cas['throughput']:,.0f}")
    mem = js.get("memory")
    if mem:
        line(mem["per_job"] < 2048, f"memory < 2 KiB a job with 2 executions: {mem['per_job']:,.0f} B")
    idle = js.get("idle")
    if idle:
        line(idle["per_watcher"] < 20 * 1024, f"memory < 20 KiB an idle watcher: {idle['per_watcher'] / 1024:.1f} KiB")
    if full100 and et.get("fanout", {}).get("all/100/full"):
        e = et["fanout"]["all/100/full"]["throughput"]
        line(
            full100["throughput"] > e,
            f"fan-out throughput ahead of etcd (100 watchers, full speed): x{full100['throughput'] / e:.2f}",
        )
    if js.get("reads") and et.get("reads"):
        a, b = js["reads"]["catch_s"], et["reads"]["catch_s"]
        line(a < b, f"catch-up ahead of etcd: {a:.2f} s vs {b:.2f} s (x{b / a:.2f} faster)")
    if cas and et.get("cas", {}).get("distinct"):
        e = et["cas"]["distinct"]["throughput"]
        line(
            cas["throughput"] * 2 >= e, f"conditional writes within 2x of etcd: x{cas['throughput'] / e:.2f} of etcd's"
        )
    return out


def profile_summary(path: Path, top: int = 15) -> str:
    """The hottest functions of a py-spy raw (collapsed) profile: own samples and inclusive samples."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f.strip() for f in stack.split(";")]
        frames = [f for f in frames if f and not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for fr in set(frames):
            incl[fr] += n
    if not total:
        return "(no samples)\n"
    out = [f"{total} samples\n", "| own % | function |", "| ---: | --- |"]
    out += [f"| {c / total:.1%} | `{fn}` |" for fn, c in own.most_common(top)]
    out += ["", "| inclusive % | function |", "| ---: | --- |"]
    out += [f"| {c / total:.1%} | `{fn}` |" for fn, c in incl.most_common(top + 10)]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small counts: the whole run in under a minute")
    ap.add_argument("--uvloop", action="store_true", help="server and clients on uvloop's event loop")
    ap.add_argument("--profile", action="store_true", help="py-spy the jobstate server under CAS and fan-out")
    ap.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated subset of {','.join(SYSTEMS)} (jobstate: the memory engine)",
    )
    ap.add_argument("--out", default="", help="file stem under bench/results (default: latest, or quick)")
    ap.add_argument("--source", default="", help="run the jobstate server of this git revision (default: work tree)")
    args = ap.parse_args(argv)
    with servers.exported(args.source) if args.source else contextlib.nullcontext() as src:
        args.source_dir = src
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    sz = QUICK if args.quick else FULL
    systems = [s for s in args.systems.split(",") if s]
    RESULTS.mkdir(parents=True, exist_ok=True)
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown system(s) {', '.join(unknown)}: choose from {', '.join(SYSTEMS)}")
    systems = [s for s in SYSTEMS if s in systems]  # table order, whatever the order asked
    if "etcd" in systems or "jobstate-etcd" in systems:
        servers.ensure_etcd()
    t0 = time.monotonic()
    res = {s: run_system(s, args) for s in systems}
    info = machine()
    table = rows(res, args.quick)
    md = markdown(table, info, args.quick, args)
    goals = targets(res)
    if goals:
        md += "\nIssue 4 targets (jobstate):\n\n" + "\n".join(goals) + "\n"
    if args.profile:
        for prof in sorted(RESULTS.glob("profile-*.txt")):
            md += f"\n## Profile of the jobstate server: {prof.stem.removeprefix('profile-')}\n\n"
            md += profile_summary(prof)
    md += f"\nWall time of the run: {time.monotonic() - t0:.0f} s.\n"
    stem = args.out or ("quick" if args.quick else "latest")
    (RESULTS / f"{stem}.md").write_text(md)
    (RESULTS / f"{stem}.json").write_text(
        json.dumps(
            {
                "machine": info,
                "quick": args.quick,
                "uvloop": args.uvloop,
                "sizes": sz.__dict__,
                "engine_sizes": sizes_of("jobstate-sqlite", args.quick).__dict__,
                "table": table,
                "raw": res,
            },
            indent=1,
            default=str,
        )
    )
    print(md)
    print(f"written: {RESULTS / (stem + '.md')}, {RESULTS / (stem + '.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    tempfile.tempdir = None
    sys.exit(main())
