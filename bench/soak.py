"""``make soak``: does a server left running keep a flat memory? (issue 9)

Each run starts ``jobstate serve`` as a subprocess and drives it with the demo workload
(``jobstate.client.demo``: jobs created at a fixed rate, queued, executions asked to bid, one run with status
updates, then completed, failed, retried, cancelled or timed out by the server), with watchers of every job
connected throughout. Every few seconds it samples the server's RSS (``/proc/PID/status``), the jobs and the
history entries it holds (its metrics), the changes its watch ring holds, and the SQLite files' size.

The same run is made twice side by side, with retention on (``--retain-finished``, short enough for the run)
and off (0: keep finished jobs). Verdict: with retention, RSS grows less than 1% over the last half of the run
(a least-squares line through the last half's samples, its rise across that half divided by its value at the
half); without, the jobs held grow linearly (R² of a line through them) and so does RSS.

Writes ``bench/results/soak-<engine>.csv`` (every sample), ``soak.md`` (figures and verdicts) and ``soak.png``.
``python -m bench.soak --help`` for the knobs; ``make soak`` runs memory and SQLite for 10 minutes each.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MIB = 1024 * 1024


@dataclass
class Spec:
    engine: str = "memory"
    retain: float = 30.0  # seconds; 0: retention off
    duration: float = 600.0
    rate: float = 20.0  # jobs created per second
    watchers: int = 2
    sample_every: float = 5.0
    history_size: int = 20_000
    seed: int = 9

    @property
    def mode(self) -> str:
        return "on" if self.retain else "off"


@dataclass
class Sample:
    t: float
    rss_mib: float
    jobs: int
    history_entries: int
    ring: int
    db_mib: float
    removed: int
    created: int
    writes: int
    events_seen: int
    sweeps: int = 0
    sweep_seconds: float = 0.0  # all retention sweeps so far, added up


@dataclass
class Run:
    spec: Spec
    samples: list[Sample] = field(default_factory=list)
    demo: dict[str, Any] = field(default_factory=dict)


# --- one run (a child process) ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


async def scrape(port: int) -> dict[str, float]:
    """The server's metrics, summed by name (labels dropped)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: soak\r\n\r\n")
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
    out: dict[str, float] = {}
    for line in data.decode().split("\r\n\r\n", 1)[-1].splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        name = name.split("{", 1)[0]
        out[name] = out.get(name, 0.0) + float(value)
    return out


def db_mib(data_dir: Path | None) -> float:
    if data_dir is None:
        return 0.0
    total = 0
    for name in ("jobstate.db", "jobstate.db-wal"):
        with contextlib.suppress(OSError):
            total += (data_dir / name).stat().st_size
    return total / MIB


def start_server(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


async def run_one(spec: Spec, workdir: Path, log: Path) -> Run:
    # Imported here: the parent process (tables, plot) needs none of the client.
    from jobstate.client.aio import AsyncClient
    from jobstate.client.demo import DemoConfig, DemoScheduler

    port, metrics_port = free_port(), free_port()
    data_dir = workdir / "data" if spec.engine == "sqlite" else None
    command = [sys.executable, "-m", "jobstate", "serve", "--port", str(port), "--metrics-port", str(metrics_port)]
    command += [
        "--store",
        spec.engine,
        "--retain-finished",
        f"{spec.retain}s",
        "--history-size",
        str(spec.history_size),
    ]
    command += ["--log-level", "info"]
    if data_dir is not None:
        command += ["--data-dir", str(data_dir)]
    server = start_server(command, log)
    run = Run(spec)
    try:
        client = AsyncClient(f"127.0.0.1:{port}", timeout=30)
        deadline = time.monotonic() + 30
        while True:  # ready when it answers a call
            try:
                await client.list_jobs(page_size=1)
                break
            except Exception:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start; see {log}") from None
                await asyncio.sleep(0.1)
        seen = [0]

        async def watch() -> None:
            async for _ in client.watch():
                seen[0] += 1

        watchers = [asyncio.create_task(watch()) for _ in range(spec.watchers)]
        scheduler = DemoScheduler(client, DemoConfig(rate=spec.rate, duration=spec.duration, seed=spec.seed))
        demo = asyncio.create_task(scheduler.run())
        started = time.monotonic()
        next_at = started
        while True:
            m = await scrape(metrics_port)
            run.samples.append(
                Sample(
                    t=round(time.monotonic() - started, 2),
                    rss_mib=round(rss_mib(server.pid), 2),
                    jobs=int(m.get("jobstate_jobs", 0)),
                    history_entries=int(m.get("jobstate_job_history_entries", 0)),
                    ring=int(m.get("jobstate_history_held_changes", 0)),
                    db_mib=round(db_mib(data_dir), 3),
                    removed=int(m.get("jobstate_retention_removed_jobs_total", 0)),
                    created=scheduler.stats.created,
                    writes=scheduler.stats.writes,
                    events_seen=seen[0],
                    sweeps=int(m.get("jobstate_retention_sweep_seconds_count", 0)),
                    sweep_seconds=round(m.get("jobstate_retention_sweep_seconds_sum", 0.0), 6),
                )
            )
            if demo.done():
                break
            last = run.samples[-1]
            if len(run.samples) % max(1, round(60 / spec.sample_every)) == 0:  # a progress line a minute
                print(
                    f"  [{spec.engine}, retention {spec.mode}] {last.t:4.0f}s  RSS {last.rss_mib:.1f} MiB  "
                    f"{last.jobs} jobs held  {last.created} created",
                    flush=True,
                )
            next_at += spec.sample_every
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(demo), max(0.0, next_at - time.monotonic()))
        stats = demo.result()
        run.demo = {k: v for k, v in asdict(stats).items() if k != "started"}
        for w in watchers:
            w.cancel()
        for w in watchers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await w
        await client.close()
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    return run


def child_main(args: argparse.Namespace) -> int:
    # The demo's writes still in flight when its time is up are cancelled unawaited: expected, not news.
    warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
    spec = Spec(**json.loads(args.spec))
    workdir = Path(args.workdir)
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        run = runner.run(run_one(spec, workdir, workdir / "server.log"))
    Path(args.out).write_text(
        json.dumps({"spec": asdict(run.spec), "samples": [asdict(s) for s in run.samples], "demo": run.demo})
    )
    return 0


# --- runs side by side, figures and verdicts (the parent) --------------------------------------------------


def run_pair(specs: Sequence[Spec], workroot: Path, nice: int = 0) -> list[Run]:
    """Runs each spec in a child process of its own, all at once, and returns their results."""
    procs = []
    for i, spec in enumerate(specs):
        workdir = workroot / f"{spec.engine}-{spec.mode}-{i}"
        workdir.mkdir(parents=True, exist_ok=True)
        out = workdir / "run.json"
        command = [sys.executable, "-m", "bench.soak", "child", "--spec", json.dumps(asdict(spec))]
        command += ["--workdir", str(workdir), "--out", str(out)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        pre = (lambda: os.nice(nice)) if nice else None
        procs.append((subprocess.Popen(command, env=env, preexec_fn=pre), out, workdir))
    runs = []
    for proc, out, workdir in procs:
        if proc.wait() != 0 or not out.exists():
            log = (workdir / "server.log").read_text()[-2000:] if (workdir / "server.log").exists() else ""
            raise RuntimeError(f"soak run in {workdir} failed (exit {proc.returncode}):\n{log}")
        data = json.loads(out.read_text())
        runs.append(Run(Spec(**data["spec"]), [Sample(**s) for s in data["samples"]], data["demo"]))
    return runs


def fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least squares ``y = a + b x``: (a, b, R²)."""
    n = len(xs)
    if n < 2:
        return (ys[0] if ys else 0.0), 0.0, 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    syy = sum((y - my) ** 2 for y in ys)
    b = sxy / sxx if sxx else 0.0
    r2 = (sxy * sxy) / (sxx * syy) if sxx and syy else 0.0
    return my - b * mx, b, r2


def theil_sen(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """The Theil-Sen line ``y = a + b x`` (the median of the slopes between every two points): (a, b).

    RSS samples have short spikes (a burst of responses queued while the CPU was busy elsewhere), which pull a
    least-squares line far when they fall near either end of the window; the median slope follows the level.
    """
    slopes = sorted(
        (ys[j] - ys[i]) / (xs[j] - xs[i]) for i in range(len(xs)) for j in range(i + 1, len(xs)) if xs[j] != xs[i]
    )
    if not slopes:
        return (ys[0] if ys else 0.0), 0.0
    b = statistics.median(slopes)
    return statistics.median(y - b * x for x, y in zip(xs, ys, strict=True)), b


@dataclass
class Figures:
    rss_growth_pct: float  # over the last half, from its Theil-Sen line (the verdict)
    rss_growth_lsq_pct: float  # the same from a least-squares line, for comparison
    rss_mid: float
    rss_end: float
    jobs_mid: int
    jobs_end: int
    jobs_max_last_half: int
    jobs_r2: float
    jobs_per_min: float  # slope of jobs held over the last half
    history_end: int
    db_mid: float
    db_end: float
    created: int
    writes: int
    removed: int
    events_seen: int
    seconds: float
    sweep_ms_mean: float


def figures(run: Run) -> Figures:
    s = run.samples
    end = s[-1].t
    half = [x for x in s if x.t >= end / 2]
    if len(half) < 2:
        half = s[-2:]
    xs = [x.t for x in half]
    a, b = theil_sen(xs, [x.rss_mib for x in half])
    mid_fit = a + b * xs[0]
    la, lb, _ = fit(xs, [x.rss_mib for x in half])
    lsq_mid = la + lb * xs[0]
    _, jb, _ = fit(xs, [float(x.jobs) for x in half])
    _, _, jr2 = fit([x.t for x in s], [float(x.jobs) for x in s])
    last = s[-1]
    return Figures(
        rss_growth_pct=100.0 * b * (xs[-1] - xs[0]) / mid_fit if mid_fit else 0.0,
        rss_growth_lsq_pct=100.0 * lb * (xs[-1] - xs[0]) / lsq_mid if lsq_mid else 0.0,
        rss_mid=half[0].rss_mib,
        rss_end=last.rss_mib,
        jobs_mid=half[0].jobs,
        jobs_end=last.jobs,
        jobs_max_last_half=max(x.jobs for x in half),
        jobs_r2=jr2,
        jobs_per_min=jb * 60,
        history_end=last.history_entries,
        db_mid=half[0].db_mib,
        db_end=last.db_mib,
        created=last.created,
        writes=last.writes,
        removed=last.removed,
        events_seen=last.events_seen,
        seconds=end,
        sweep_ms_mean=1000 * last.sweep_seconds / last.sweeps if last.sweeps else 0.0,
    )


def verdict(on: Run, off: Run | None, *, rss_limit_pct: float = 1.0) -> tuple[bool, list[str]]:
    """The flat-memory verdict: retention on is flat, retention off grows."""
    f_on = figures(on)
    lines = []
    ok = f_on.rss_growth_pct < rss_limit_pct
    lines.append(
        f"{on.spec.engine}, retention {on.spec.retain:g}s: RSS {f_on.rss_mid:.1f} -> {f_on.rss_end:.1f} MiB over "
        f"the last half, growth {f_on.rss_growth_pct:+.2f}% (Theil-Sen; least squares {f_on.rss_growth_lsq_pct:+.2f}%; "
        f"limit {rss_limit_pct}%): "
        f"{'FLAT' if ok else 'GROWING'}; jobs held {f_on.jobs_mid} -> {f_on.jobs_end} ({f_on.jobs_per_min:+.1f}/min)"
    )
    if off is not None:
        f_off = figures(off)
        grows = f_off.jobs_r2 > 0.95 and f_off.jobs_per_min > 0 and f_off.rss_growth_pct > f_on.rss_growth_pct
        ok = ok and grows
        lines.append(
            f"{off.spec.engine}, retention off: jobs held grow {f_off.jobs_per_min:+.0f}/min (R² {f_off.jobs_r2:.3f}), "
            f"RSS {f_off.rss_mid:.1f} -> {f_off.rss_end:.1f} MiB ({f_off.rss_growth_pct:+.1f}% over the last half): "
            f"{'LINEAR GROWTH' if grows else 'NOT GROWING'}"
        )
    return ok, lines


def write_csv(runs: Sequence[Run], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        names = list(Sample.__dataclass_fields__)
        w.writerow(["engine", "retention_s", *names])
        for run in runs:
            for s in run.samples:
                w.writerow([run.spec.engine, run.spec.retain, *(getattr(s, n) for n in names)])


def markdown(runs: Sequence[Run], verdicts: Sequence[str], passed: bool) -> str:
    out = ["# Soak: memory with and without retention", ""]
    spec = runs[0].spec
    out.append(
        f"Demo workload at {spec.rate:g} jobs/s (about 11 writes each), {spec.watchers} watchers of every job, "
        f"--history-size {spec.history_size}, samples every {spec.sample_every:g}s. Machine: {os.cpu_count()} cores."
    )
    out += [
        "",
        "| engine | retention | run s | jobs created | writes/s | jobs held mid→end | history entries end "
        "| RSS MiB mid→end | RSS growth, last half (least squares) | SQLite MiB mid→end | removed | mean sweep ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        f = figures(run)
        db = f"{f.db_mid:.1f}→{f.db_end:.1f}" if run.spec.engine == "sqlite" else "—"
        out.append(
            f"| {run.spec.engine} | {f'{run.spec.retain:g}s' if run.spec.retain else 'off'} | {f.seconds:.0f} | "
            f"{f.created} | {f.writes / max(f.seconds, 1):.0f} | {f.jobs_mid}→{f.jobs_end} | {f.history_end} | "
            f"{f.rss_mid:.1f}→{f.rss_end:.1f} | {f.rss_growth_pct:+.2f}% ({f.rss_growth_lsq_pct:+.2f}%) | {db} | "
            f"{f.removed} | "
            f"{f.sweep_ms_mean:.2f} |"
        )
    out += ["", "## Verdict", "", *(f"- {v}" for v in verdicts), "", f"**{'PASS' if passed else 'FAIL'}**", ""]
    out += [
        "## Every minute",
        "",
        "| engine | retention | t s | RSS MiB | jobs held | history entries | ring | SQLite MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        step = max(1, round(60 / run.spec.sample_every))
        for s in run.samples[::step]:
            out.append(
                f"| {run.spec.engine} | {f'{run.spec.retain:g}s' if run.spec.retain else 'off'} | {s.t:.0f} | "
                f"{s.rss_mib:.1f} | {s.jobs} | {s.history_entries} | {s.ring} | {s.db_mib:.2f} |"
            )
    return "\n".join(out) + "\n"


def plot(runs: Sequence[Run], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return False
    panels = [("rss_mib", "server RSS (MiB)"), ("jobs", "jobs held"), ("history_entries", "history entries held")]
    if any(r.spec.engine == "sqlite" for r in runs):
        panels.append(("db_mib", "SQLite files (MiB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    # One colour per engine and retention, the same in every panel.
    colours = {("memory", "on"): "tab:blue", ("memory", "off"): "tab:orange"}
    colours |= {("sqlite", "on"): "tab:green", ("sqlite", "off"): "tab:red"}
    for ax, (key, title) in zip(axes, panels, strict=True):
        for run in runs:
            if key == "db_mib" and run.spec.engine != "sqlite":
                continue
            label = f"{run.spec.engine}, " + (f"retain {run.spec.retain:g}s" if run.spec.retain else "retention off")
            ax.plot(
                [s.t / 60 for s in run.samples],
                [getattr(s, key) for s in run.samples],
                "-" if run.spec.retain else "--",
                color=colours.get((run.spec.engine, run.spec.mode)),
                label=label,
            )
        ax.set_title(title)
        ax.set_xlabel("minutes")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def read_csv(path: Path) -> list[Run]:
    """The runs a ``soak-<engine>.csv`` holds (for ``replot``)."""
    runs: dict[tuple[str, float], Run] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            key = (row.pop("engine"), float(row.pop("retention_s")))
            run = runs.setdefault(key, Run(Spec(engine=key[0], retain=key[1])))
            run.samples.append(
                Sample(
                    **{
                        k: (float(v) if k in ("t", "rss_mib", "db_mib", "sweep_seconds") else int(v))
                        for k, v in row.items()
                    }
                )  # type: ignore[arg-type]
            )
    return list(runs.values())


def base_spec(args: argparse.Namespace, rates: dict[str, float], engine: str) -> Spec:
    rate = rates.get(engine, rates.get("*", 20.0))
    return Spec(engine, args.retain, args.duration, rate, args.watchers, args.sample_every, args.history_size)


def report(args: argparse.Namespace, rates: dict[str, float], out: Path) -> int:
    runs: list[Run] = []
    verdicts: list[str] = []
    passed = True
    for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
        pair = read_csv(out / f"soak-{engine}.csv")
        pair.sort(key=lambda r: r.spec.retain == 0)  # retention on first
        for run in pair:
            run.spec = Spec(**{**asdict(base_spec(args, rates, engine)), "retain": run.spec.retain})
        ok, lines = verdict(pair[0], pair[1] if len(pair) > 1 else None)
        print(*("  " + line for line in lines), sep="\n")
        runs += pair
        verdicts += lines
        passed = passed and ok
    (out / "soak.md").write_text(markdown(runs, verdicts, passed))
    plot(runs, out / "soak.png")
    print(f"soak: {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


def parse_rates(text: str) -> dict[str, float]:
    """``20`` (every engine) or ``memory=20,sqlite=8``."""
    if "=" not in text:
        return {"*": float(text)}
    return {k.strip(): float(v) for k, v in (p.split("=", 1) for p in text.split(","))}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command")
    c = sub.add_parser("child")
    c.add_argument("--spec", required=True)
    c.add_argument("--workdir", required=True)
    c.add_argument("--out", required=True)
    sub.add_parser("replot", help="draw soak.png again from the soak-*.csv in --out")
    sub.add_parser("report", help="soak.md, soak.png and the verdict again from the soak-*.csv in --out")
    p.add_argument("--engines", default="memory,sqlite")
    p.add_argument("--duration", type=float, default=600.0, help="seconds each run lasts")
    p.add_argument("--rate", default="memory=20,sqlite=10", help="jobs/s: 20, or memory=20,sqlite=10")
    p.add_argument("--retain", type=float, default=30.0, help="--retain-finished of the retention-on run (s)")
    p.add_argument("--watchers", type=int, default=2)
    p.add_argument("--sample-every", type=float, default=5.0)
    p.add_argument("--history-size", type=int, default=20_000)
    p.add_argument("--no-off", action="store_true", help="skip the retention-off runs")
    p.add_argument("--nice", type=int, default=10)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.command == "child":
        return child_main(args)
    if args.command == "replot":
        runs = [r for path in sorted(Path(args.out).glob("soak-*.csv")) for r in read_csv(path)]
        return 0 if plot(runs, Path(args.out) / "soak.png") else 1
    rates = parse_rates(args.rate)
    out = Path(args.out)
    if args.command == "report":  # the same options as the run, so the specs match
        return report(args, rates, out)
    out.mkdir(parents=True, exist_ok=True)
    all_runs: list[Run] = []
    verdicts: list[str] = []
    passed = True
    with tempfile.TemporaryDirectory(prefix="jobstate-soak-") as tmp:
        for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
            base = base_spec(args, rates, engine)
            rate = base.rate
            specs = [base] + ([] if args.no_off else [Spec(**{**asdict(base), "retain": 0.0})])
            print(f"soak: {engine} at {rate:g} jobs/s for {args.duration:g}s, retention {args.retain:g}s and off ...")
            runs = run_pair(specs, Path(tmp), args.nice)
            write_csv(runs, out / f"soak-{engine}.csv")
            ok, lines = verdict(runs[0], runs[1] if len(runs) > 1 else None)
            for line in lines:
                print("  " + line)
            all_runs += runs
            verdicts += lines
            passed = passed and ok
    (out / "soak.md").write_text(markdown(all_runs, verdicts, passed))
    plot(all_runs, out / "soak.png")
    print(f"soak: {'PASS' if passed else 'FAIL'}; wrote {out / 'soak.md'}, {out / 'soak.png'} and the CSVs")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
