"""The ``jobstate`` command: run the server, call every RPC, watch jobs live, drive a demo workload.

Exit codes: 0 success; 1 the call failed (stderr: ``error: CODE (REASON): message``); 2 bad usage.
``--output json`` prints protobuf's JSON mapping of the response (enum names, lowerCamelCase fields, int64
as strings), one object; ``watch`` prints one such object per event, a line each, so it composes with jq.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TextIO, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from jobstate.client import core, names, view
from jobstate.client.aio import AsyncClient
from jobstate.client.errors import JobStateError
from jobstate.client.sync import Client
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb

T = TypeVar("T")

EXIT_OK, EXIT_API_ERROR, EXIT_USAGE = 0, 1, 2
TARGET_ENV = "JOBSTATE_TARGET"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration(text: str) -> float:
    """Seconds from ``30s``, ``5m``, ``1h``, ``250ms`` or a plain number of seconds (``1.5``)."""
    if text.strip().startswith("-"):
        raise argparse.ArgumentTypeError(f"a duration cannot be negative: {text!r} (examples: 30s, 5m, 1h, 1.5)")
    m = _DURATION.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (examples: 30s, 5m, 1h, 1.5)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def rate(text: str) -> float:
    """Per second from ``5``, ``5/s`` or ``300/m``."""
    value, _, unit = text.partition("/")
    try:
        n = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid rate {text!r} (examples: 5, 5/s, 300/m)") from None
    per = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}.get(unit.strip())
    if per is None or n <= 0:
        raise argparse.ArgumentTypeError(f"invalid rate {text!r} (examples: 5, 5/s, 300/m)")
    return n / per


def job_state_arg(text: str) -> int:
    try:
        return core.job_state(text)
    except ValueError:
        names = ", ".join(core.short_job_state(v) for v in pb.JobStateType.values() if v)
        raise argparse.ArgumentTypeError(f"unknown job state {text!r} (one of {names})") from None


def execution_state_arg(text: str) -> int:
    try:
        return core.execution_state(text)
    except ValueError:
        names = ", ".join(core.short_execution_state(v) for v in pb.ExecutionStateType.values() if v)
        raise argparse.ArgumentTypeError(f"unknown execution state {text!r} (one of {names})") from None


def desired_state_arg(text: str) -> int:
    name = text.strip().upper().replace("-", "_")
    if not name.startswith("EXECUTION_DESIRED_STATE_"):
        name = "EXECUTION_DESIRED_STATE_" + name
    try:
        return pb.ExecutionDesiredState.Value(name)
    except ValueError:
        raise argparse.ArgumentTypeError(f"unknown desired state {text!r} (PENDING, RUNNING, STOPPED)") from None


def non_negative_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return n


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "kb": 1000, "mb": 1000**2, "gb": 1000**3}


def byte_size(text: str) -> int:
    """Bytes from ``268435456``, ``256MiB``, ``8M`` (binary), ``100MB`` (decimal) or ``0``."""
    m = _SIZE.fullmatch(text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 256MiB, 8MiB, 1GiB, 1048576)")
    unit = (m.group(2) or "").lower().replace("ib", "")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def positive_int(text: str) -> int:
    n = non_negative_int(text)
    if n == 0:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {text!r}")
    return n


def non_negative_float(text: str) -> float:
    try:
        n = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not n >= 0 or n == float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return n


# --- output ------------------------------------------------------------------------------------------------


def to_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message)


def print_json(message: Message, out: TextIO) -> None:
    out.write(json.dumps(to_dict(message), indent=2) + "\n")


def when(ts: object, now: float | None = None) -> str:
    """A timestamp as local time, with how long ago (or how far ahead) it is."""
    seconds = view.seconds_of(ts)
    if not seconds:
        return "-"
    now = time.time() if now is None else now
    local = dt.datetime.fromtimestamp(seconds, dt.UTC).astimezone()
    delta = now - seconds
    rel = f"{view.ago(delta)} ago" if delta >= 0 else f"in {view.ago(-delta)}"
    return f"{local.isoformat(timespec='milliseconds')} ({rel})"


def execution_line(e: pb.ExecutionState) -> str:
    parts = [
        e.compute_reference,
        f"node={e.node_id}",
        core.short_execution_state(e.state),
        f"v{e.version}",
    ]
    if e.desired_state:
        parts.append(
            "desired=" + pb.ExecutionDesiredState.Name(e.desired_state).removeprefix("EXECUTION_DESIRED_STATE_")
        )
    if e.HasField("run_output"):
        parts.append(f"exit={e.run_output.exit_code}")
    if e.status:
        parts.append(json.dumps(e.status))
    return "  ".join(parts)


def job_block(job: pb.JobState, revision: int | None = None) -> str:
    lines = [
        f"job        {job.job_id}",
        f"state      {core.short_job_state(job.state)}",
        f"version    {job.version}",
        f"created    {when(job.create_time)}",
        f"updated    {when(job.update_time)}",
    ]
    if job.HasField("timeout_at"):
        lines.append(f"timeout at {when(job.timeout_at)}")
    if revision is not None:
        lines.append(f"revision   {revision}")
    lines.append(f"executions {len(job.executions)}")
    lines += ["  " + execution_line(e) for e in job.executions]
    return "\n".join(lines)


def executions_summary(job: pb.JobState) -> str:
    return " ".join(text for text, _ in view.execution_counts(job)) or "-"


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def history_change(entry: pb.JobHistoryEntry) -> str:
    def exec_change(c: pb.ExecutionStateChange) -> str:
        before = core.short_execution_state(c.previous_state) if c.previous_state else "created"
        return f"execution {c.compute_reference} on {c.node_id}: {before} -> {core.short_execution_state(c.new_state)}"

    kind = entry.WhichOneof("change")
    if kind == "job_state":
        c = entry.job_state
        before = core.short_job_state(c.previous_state) if c.previous_state else "created"
        text = f"job: {before} -> {core.short_job_state(c.new_state)}"
    elif kind == "execution_state":
        text = exec_change(entry.execution_state)
    else:
        text = "?"
    if entry.cancelled_executions:
        text += f" (+{len(entry.cancelled_executions)} execution(s) cancelled)"
    return text


def event_line(event: spb.WatchEvent) -> str:
    kind = names.event_type_name(event.type)
    if event.type == spb.WATCH_EVENT_TYPE_BOOKMARK:
        return f"{event.revision:>8}  {kind}"
    job = event.job
    return (
        f"{event.revision:>8}  {kind:<8} {job.job_id}  {core.short_job_state(job.state)}  v{job.version}"
        f"  executions: {executions_summary(job)}"
    )


# --- commands ----------------------------------------------------------------------------------------------


class UsageError(Exception):
    """Options that cannot work (exit 2)."""


class Context:
    def __init__(self, args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
        self.args = args
        self.out = out
        self.err = err
        self.json = args.output == "json"

    def _security(self) -> dict[str, Any]:
        """TLS files and token for the client; the client itself reads $JOBSTATE_TOKEN when --token is absent."""
        a = self.args
        return {name: getattr(a, name, None) for name in ("tls_ca", "tls_cert", "tls_key", "token")}

    def client(self) -> Client:
        try:
            return Client(self.args.target, timeout=self.args.deadline, **self._security())
        except (OSError, ValueError) as exc:  # a TLS file that cannot be read, half a key pair
            raise UsageError(str(exc)) from exc

    def aclient(self) -> AsyncClient:
        try:
            return AsyncClient(self.args.target, timeout=self.args.deadline, **self._security())
        except (OSError, ValueError) as exc:
            raise UsageError(str(exc)) from exc

    def emit(self, message: Message, text: Callable[[], str]) -> int:
        if self.json:
            print_json(message, self.out)
        else:
            self.out.write(text() + "\n")
        return EXIT_OK


def cmd_serve(ctx: Context) -> int:
    from jobstate.server import errors as server_errors
    from jobstate.server import rules
    from jobstate.server.main import ServerConfig, run, setup_logging
    from jobstate.server.sqlite_store import DataDirInUse

    a = ctx.args
    setup_logging(a.log_level, a.log_format)
    config = ServerConfig(
        host=a.host,
        port=a.port,
        history_size=a.history_size,
        history_bytes=a.history_bytes,
        max_watchers=a.max_watchers,
        grace=a.grace,
        metrics_port=a.metrics_port,
        store=a.store,
        data_dir=a.data_dir,
        etcd_endpoints=tuple(u for u in a.etcd_endpoints.split(",") if u),
        etcd_prefix=a.etcd_prefix,
        tls_cert=a.server_tls_cert,
        tls_key=a.server_tls_key,
        tls_client_ca=a.tls_client_ca,
        insecure=a.insecure,
        auth_tokens_file=a.auth_tokens,
        write_rate_per_client=a.write_rate,
        write_burst_per_client=a.write_burst,
        read_rate_per_client=a.read_rate,
        read_burst_per_client=a.read_burst,
        max_watchers_per_client=a.max_watchers_per_client,
        max_jobs_per_client=a.max_jobs_per_client,
        max_message_bytes=a.max_message_bytes,
        limits=rules.Limits(
            max_jobs=a.max_jobs,
            max_executions_per_job=a.max_executions_per_job,
            max_history_per_job=a.max_history_per_job,
        ),
        retain_finished=a.retain_finished,
        keepalive_seconds=a.keepalive,
        keepalive_timeout_seconds=a.keepalive_timeout,
        http_port=a.http_port,
        http_host=a.http_host,
        cors_origins=tuple(a.cors_origin or ()),
        http_allowed_hosts=tuple(a.http_allowed_host or ()),
        http_max_connections=a.http_max_connections,
    )
    try:
        return run(config)
    # A taken port or data dir, an engine without what it needs or unreachable, unsafe TLS: one line a person can
    # act on, not a traceback.
    except (OSError, ValueError, DataDirInUse, server_errors.JobStateError) as exc:
        ctx.err.write(f"jobstate serve: error: {exc}\n")
        return EXIT_API_ERROR


def cmd_create(ctx: Context) -> int:
    a = ctx.args
    with ctx.client() as c:
        r = c.create_job(a.job_id or "", timeout=a.job_timeout, comment=a.comment)

    def text() -> str:
        line = f"created job {r.job.job_id} ({core.short_job_state(r.job.state)}, version {r.job.version}"
        line += f", revision {r.revision})"
        if r.job.HasField("timeout_at"):
            line += f"\ntimes out at {when(r.job.timeout_at)}"
        return line

    return ctx.emit(r, text)


def cmd_get(ctx: Context) -> int:
    with ctx.client() as c:
        r = c.get_job(ctx.args.job_id)
    return ctx.emit(r, lambda: job_block(r.job, r.revision))


def cmd_list(ctx: Context) -> int:
    a = ctx.args
    states = a.state or []
    with ctx.client() as c:
        r = c.list_jobs(states, a.node or "", a.page_size, a.page_token or "")
        if a.all:
            # One answer made of every page; its revision is the first page's, from which a watch misses nothing.
            while r.next_page_token:
                page = c.list_jobs(states, a.node or "", a.page_size, r.next_page_token)
                r.jobs.extend(page.jobs)
                r.next_page_token = page.next_page_token

    def text() -> str:
        lines: list[str] = []
        if r.jobs:
            rows = [["JOB ID", "STATE", "VERSION", "EXECUTIONS", "CREATED"]]
            now = time.time()
            for job in r.jobs:
                rows.append(
                    [
                        job.job_id,
                        core.short_job_state(job.state),
                        str(job.version),
                        executions_summary(job),
                        view.ago(now - view.seconds_of(job.create_time)) + " ago",
                    ]
                )
            lines += table(rows)
        lines.append(f"{len(r.jobs)} job{'s' if len(r.jobs) != 1 else ''} at revision {r.revision}")
        if r.next_page_token:
            lines.append(f"more: --page-token {r.next_page_token} (or --all)")
        return "\n".join(lines)

    return ctx.emit(r, text)


def cmd_set_state(ctx: Context) -> int:
    a = ctx.args
    with ctx.client() as c:
        r = c.update_job_state(
            a.job_id,
            a.new_state,
            expected_version=a.expect_version,
            expected_state=a.expect_state,
            unexpected_states=a.unexpected_state or (),
            comment=a.comment,
        )

    def text() -> str:
        job = r.job
        line = f"job {job.job_id}: {core.short_job_state(job.state)}, version {job.version} (revision {r.revision})"
        cancelled = [e for e in job.executions if e.state == pb.EXECUTION_STATE_TYPE_CANCELLED]
        if cancelled and job.state in (
            pb.JOB_STATE_TYPE_COMPLETED,
            pb.JOB_STATE_TYPE_ERROR,
            pb.JOB_STATE_TYPE_CANCELLED,
        ):
            line += f"\n{len(cancelled)} execution(s) cancelled"
        return line

    return ctx.emit(r, text)


def cmd_exec_create(ctx: Context) -> int:
    a = ctx.args
    with ctx.client() as c:
        r = c.create_execution(
            a.job_id,
            a.node_id,
            compute_reference=a.ref or "",
            state=a.state,
            desired_state=a.desired_state or 0,
            status=a.status or "",
            comment=a.comment,
        )
    return ctx.emit(
        r,
        lambda: (
            f"created execution {execution_line(r.execution)}\n"
            f"job {r.job.job_id}: version {r.job.version} (revision {r.revision})"
        ),
    )


def cmd_exec_update(ctx: Context) -> int:
    a = ctx.args
    e = pb.ExecutionState()
    paths: list[str] = []
    if a.state is not None:
        e.state = a.state
        paths.append("state")
    if a.status is not None:
        e.status = a.status
        paths.append("status")
    if a.desired_state is not None:
        e.desired_state = a.desired_state
        paths.append("desired_state")
    for flag, path in (("exit_code", "exit_code"), ("stdout", "stdout"), ("stderr", "stderr")):
        value = getattr(a, flag)
        if value is not None:
            setattr(e.run_output, path, value)
            paths.append(f"run_output.{path}")
    if a.mask is not None:
        paths = [p.strip() for p in a.mask.split(",") if p.strip()]
    if not paths:
        ctx.err.write("jobstate exec update: error: nothing to change (give --state, --status, ... or --mask)\n")
        return EXIT_USAGE
    with ctx.client() as c:
        r = c.update_execution(
            a.job_id,
            a.ref,
            e,
            update_mask=paths,
            expected_version=a.expect_version,
            expected_states=[s for group in a.expect_state or () for s in group],
            unexpected_states=[s for group in a.unexpected_state or () for s in group],
            comment=a.comment,
        )
    return ctx.emit(
        r,
        lambda: (
            f"updated execution {execution_line(r.execution)}\n"
            f"job {r.job.job_id}: {core.short_job_state(r.job.state)}, version {r.job.version} (revision {r.revision})"
        ),
    )


def cmd_history(ctx: Context) -> int:
    a = ctx.args
    with ctx.client() as c:
        r = c.get_job_history(a.job_id, a.page_size)
        while r.next_page_token:
            page = c.get_job_history(a.job_id, a.page_size, r.next_page_token)
            r.entries.extend(page.entries)
            r.next_page_token = page.next_page_token

    def text() -> str:
        rows = [["REVISION", "VERSION", "TIME", "CHANGE", "COMMENT"]]
        for entry in r.entries:
            t = dt.datetime.fromtimestamp(view.seconds_of(entry.time), dt.UTC).astimezone()
            rows.append(
                [
                    str(entry.revision),
                    str(entry.version),
                    t.strftime("%H:%M:%S.%f")[:-3],
                    history_change(entry),
                    json.dumps(entry.comment) if entry.comment else "",
                ]
            )
        lines = table(rows)
        if r.dropped_entries:
            lines.insert(0, f"{r.dropped_entries} earlier changes dropped (the server keeps the last ones only)")
        return "\n".join(lines)

    return ctx.emit(r, text)


def cmd_delete(ctx: Context) -> int:
    a = ctx.args
    with ctx.client() as c:
        r = c.delete_job(a.job_id, expected_version=a.expect_version)
    return ctx.emit(r, lambda: f"deleted job {a.job_id} (revision {r.revision})")


def cmd_watch(ctx: Context) -> int:
    a = ctx.args
    mode = a.output or ("live" if ctx.out.isatty() else "json")
    if mode == "text" and ctx.out.isatty():
        mode = "live"
    if mode == "live":
        return run_async(lambda: _live(ctx))
    return run_async(lambda: _stream(ctx, as_json=mode == "json"))


async def _live(ctx: Context) -> int:
    a = ctx.args
    async with ctx.aclient() as client:
        await view.run_live_view(
            client, ctx.out, job_ids=a.job_ids, node_id=a.node or "", start_revision=a.from_revision or 0
        )
    return EXIT_OK


async def _stream(ctx: Context, as_json: bool) -> int:
    a = ctx.args

    def on_resume(err: JobStateError, attempt: int, delay: float) -> None:
        ctx.err.write(
            f"watch: stream ended ({err}); resuming at revision {stream.position + 1} in {delay:.2f}s"
            f" (attempt {attempt})\n"
        )
        ctx.err.flush()

    async with ctx.aclient() as client:
        stream = client.watch(
            a.job_ids,
            node_id=a.node or "",
            start_revision=a.from_revision or 0,
            send_initial_state=a.initial,
            on_resume=on_resume,
        )
        try:
            async for event in stream:
                line = json.dumps(to_dict(event), separators=(",", ":")) if as_json else event_line(event)
                ctx.out.write(line + "\n")
                ctx.out.flush()
        finally:
            stream.close()
    return EXIT_OK


def cmd_demo(ctx: Context) -> int:
    from jobstate.client.demo import DemoConfig, run_demo

    a = ctx.args
    config = DemoConfig(
        rate=a.rate,
        jobs=a.jobs,
        nodes=a.nodes,
        duration=a.duration,
        speed=a.speed,
        fail_rate=a.fail_rate,
        timeout_rate=a.timeout_rate,
        seed=a.seed,
    )

    async def go() -> int:
        async with ctx.aclient() as client:
            await run_demo(client, config, ctx.err)
        return EXIT_OK

    return run_async(go)


def run_async(factory: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Runs a command on an event loop; Ctrl-C is a normal way to stop a long-running command (exit 0)."""
    try:
        return asyncio.run(factory())
    except KeyboardInterrupt:
        return EXIT_OK


# --- parser ------------------------------------------------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Adds ``(default: X)`` only where the help text does not already say what the default is, and never a
    default of nothing (``(default: None)``, ``(default: False)``)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or "(0:" in text or action.default in (None, False, argparse.SUPPRESS, [], ""):
            return text
        return super()._get_help_string(action)


DEFAULT_DEADLINE = 10.0
# The client's options: given before ``serve`` they would be silently ignored, so ``serve`` refuses them.
CLIENT_ONLY = {
    "target": "--target",
    "output": "--output",
    "deadline": "--deadline",
    "tls_ca": "--tls-ca",
    "tls_cert": "--tls-cert",
    "tls_key": "--tls-key",
    "token": "--token",
}


def _common(timeout_alias: bool = True) -> argparse.ArgumentParser:
    """The client's options, accepted both before and after the subcommand (``jobstate get J --deadline 5s``).

    ``--timeout`` is the old name of ``--deadline``; ``create`` leaves it out, because there it meant the job's
    timeout (now ``--job-timeout``).
    """
    p = argparse.ArgumentParser(add_help=False)
    names = ["--deadline", "--timeout"] if timeout_alias else ["--deadline"]
    p.add_argument(
        *names,
        dest="deadline",
        type=duration,
        metavar="DURATION",
        default=argparse.SUPPRESS,
        help=f"deadline of each call, e.g. 5s (default: {DEFAULT_DEADLINE:g}s)"
        + ("; --timeout is its old name" if timeout_alias else ""),
    )
    g = p.add_argument_group("TLS and authentication (the client's)")
    g.add_argument("--tls-ca", metavar="FILE", default=argparse.SUPPRESS, help="use TLS, trusting this CA (PEM)")
    g.add_argument("--tls-cert", metavar="FILE", default=argparse.SUPPRESS, help="client certificate, for mTLS (PEM)")
    g.add_argument("--tls-key", metavar="FILE", default=argparse.SUPPRESS, help="the client certificate's key")
    g.add_argument(
        "--token",
        default=argparse.SUPPRESS,
        help="bearer token sent with every call (default: $JOBSTATE_TOKEN)",
    )
    p.add_argument(
        "--target",
        default=argparse.SUPPRESS,
        help=f"server address host:port (default: ${TARGET_ENV} or {core.DEFAULT_TARGET})",
    )
    p.add_argument(
        "-o",
        "--output",
        choices=["text", "json"],
        default=argparse.SUPPRESS,
        help="text for people, json (protobuf's JSON mapping) for programs (default: text; "
        "watch: a live view in a terminal, json when piped)",
    )
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jobstate")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class _Ambiguous(argparse.Action):
    """``create --timeout`` once meant the job's timeout, while ``--timeout`` elsewhere is the call's deadline:
    rather than guess, say which name to use."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        parser.error(
            "--timeout is ambiguous here: use --job-timeout for the job's timeout (it moves to ERROR when it "
            "passes), or --deadline for this call's deadline"
        )


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="jobstate",
        description="Keep the state of cluster jobs and follow every change: the server, and a client for it.",
        epilog="Exit status: 0 ok, 1 the call failed (code and reason on stderr), 2 bad usage.\n"
        "Try: jobstate serve & jobstate watch & jobstate demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(
        name: str, help_text: str, description: str = "", parent: argparse.ArgumentParser = common
    ) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_text,
            description=description or help_text,
            parents=[parent],
            formatter_class=_Formatter,
        )

    # serve takes none of the client's options: --target, --output or the client's TLS files would do nothing.
    p = add(
        "serve",
        "run the server",
        "Run the jobstate server until SIGTERM or Ctrl-C.",
        argparse.ArgumentParser(add_help=False),
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=50051, help="port to listen on (0: a free one)")
    p.add_argument("--history-size", type=non_negative_int, default=100_000, help="changes kept for watchers")
    p.add_argument(
        "--history-bytes",
        type=byte_size,
        default=256 * 1024 * 1024,
        metavar="SIZE",
        help="memory the changes kept for watchers may take, oldest let go first (e.g. 256MiB; 0: no bound but "
        "--history-size)",
    )
    p.add_argument("--max-watchers", type=non_negative_int, default=10_000, help="concurrent watch streams")
    p.add_argument("--grace", type=duration, default=5.0, help="seconds in-flight calls get at shutdown")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    p.add_argument("--log-format", choices=["text", "json"], default="text")
    p.add_argument("--metrics-port", type=non_negative_int, default=None, help="serve Prometheus metrics on this port")
    p.add_argument(
        "--store",
        choices=["memory", "sqlite", "etcd"],
        default="memory",
        help="storage engine: memory (lost on exit), sqlite (durable, in --data-dir), etcd (shared by many servers)",
    )
    p.add_argument("--data-dir", help="directory of the sqlite store's database (created if missing)")
    p.add_argument("--etcd-endpoints", default="", metavar="URL[,URL...]", help="etcd members for --store etcd")
    p.add_argument("--etcd-prefix", default="/jobstate", help="key prefix of the jobs in etcd")
    g = p.add_argument_group("HTTP: Connect, gRPC-Web, JSON and the dashboard")
    g.add_argument(
        "--http-port",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="serve HTTP on this port too (0: a free one; off by default; `make run` uses 8080)",
    )
    g.add_argument("--http-host", default="127.0.0.1", help="address of the HTTP listener")
    g.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        help="a browser origin (https://app.example:8443) allowed to call the API; repeatable; none by default",
    )
    g.add_argument(
        "--http-allowed-host",
        action="append",
        metavar="NAME",
        help="a Host header name answered besides loopback and --http-host (DNS rebinding guard); repeatable",
    )
    g.add_argument(
        "--http-max-connections",
        type=positive_int,
        default=1000,
        metavar="N",
        help="HTTP connections and requests at once; over it: 503",
    )
    g = p.add_argument_group("security (SECURITY.md)")
    g.add_argument(
        "--tls-cert",
        dest="server_tls_cert",
        metavar="FILE",
        help="server certificate (PEM): TLS only; read again on SIGHUP",
    )
    g.add_argument("--tls-key", dest="server_tls_key", metavar="FILE", help="the server certificate's key")
    g.add_argument("--tls-client-ca", metavar="FILE", help="require client certificates signed by this CA (mTLS)")
    g.add_argument(
        "--insecure", action="store_true", help="allow plaintext on a non-loopback address (no TLS: anyone can listen)"
    )
    g.add_argument(
        "--auth-tokens", metavar="FILE", help="'token role [name]' lines (reader, writer, admin); reloaded on SIGHUP"
    )
    g = p.add_argument_group("limits")
    g.add_argument(
        "--write-rate",
        type=non_negative_float,
        default=0.0,
        metavar="N",
        help="writes per second per client (0: unlimited)",
    )
    g.add_argument(
        "--write-burst", type=non_negative_int, default=0, metavar="N", help="write burst per client (0: one second's)"
    )
    g.add_argument(
        "--read-rate",
        type=non_negative_float,
        default=0.0,
        metavar="N",
        help="reads (get, list, history, watch) per second per client (0: unlimited)",
    )
    g.add_argument(
        "--read-burst", type=non_negative_int, default=0, metavar="N", help="read burst per client (0: one second's)"
    )
    g.add_argument(
        "--max-watchers-per-client",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="watch streams per client, health watches included (default: 90%% of --max-watchers; 0: no own limit)",
    )
    g.add_argument(
        "--max-jobs-per-client",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="jobs one client may hold, by who created them (default: 90%% of --max-jobs; 0: no own limit)",
    )
    g.add_argument(
        "--max-message-bytes", type=positive_int, default=8 * 1024 * 1024, metavar="N", help="largest message, each way"
    )
    g.add_argument("--max-jobs", type=non_negative_int, default=0, metavar="N", help="jobs held at once (0: unlimited)")
    g.add_argument(
        "--max-executions-per-job", type=positive_int, default=1000, metavar="N", help="executions in one job"
    )
    g.add_argument(
        "--retain-finished",
        type=duration,
        default=24 * 3600.0,
        metavar="DURATION",
        help="remove a job this long after it reached a final state (watchers see DELETED, cause RETENTION); "
        "0: keep finished jobs until deleted",
    )
    g.add_argument(
        "--max-history-per-job",
        type=non_negative_int,
        default=1000,
        metavar="N",
        help="history entries kept per job; older ones are dropped (0: keep all)",
    )
    g.add_argument(
        "--keepalive", type=duration, default=30.0, metavar="DURATION", help="ping connections this often (seconds)"
    )
    g.add_argument(
        "--keepalive-timeout",
        type=duration,
        default=10.0,
        metavar="DURATION",
        help="drop a peer that does not answer a ping within this (seconds)",
    )
    p.set_defaults(func=cmd_serve)

    p = add("create", "create a job", "Create a job in state NEW (version 1).", _common(timeout_alias=False))
    p.add_argument("job_id", nargs="?", metavar="JOB_ID", help="the job's id (default: the server makes a UUID)")
    p.add_argument(
        "--job-timeout",
        dest="job_timeout",
        type=duration,
        default=None,
        metavar="DURATION",
        help="the job moves to ERROR if not finished within this, e.g. 10m (default: never)",
    )
    p.add_argument("--timeout", action=_Ambiguous, help=argparse.SUPPRESS)
    p.add_argument("--comment", default="", help="recorded in the job's history")
    p.set_defaults(func=cmd_create)

    p = add("get", "show one job", "Show a job and its executions.")
    p.add_argument("job_id", metavar="JOB_ID")
    p.set_defaults(func=cmd_get)

    p = add("list", "list jobs", "List jobs, oldest first (by create time, then id), one page or --all.")
    p.add_argument("--state", type=job_state_arg, action="append", help="only jobs in this state (repeatable)")
    p.add_argument("--node", help="only jobs with an execution on this node")
    p.add_argument("--page-size", type=non_negative_int, default=0, help="jobs per page (0: the server's default)")
    p.add_argument("--page-token", help="the next page's token from a previous list")
    p.add_argument("--all", action="store_true", help="every page")
    p.set_defaults(func=cmd_list)

    p = add(
        "set-state",
        "change a job's state",
        "Change a job's state, optionally only if it is at a version or in a state (compare-and-set).",
    )
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("new_state", metavar="STATE", type=job_state_arg, help="e.g. queued, in_progress, completed")
    p.add_argument("--expect-version", type=non_negative_int, default=0, help="fail unless the job is at it")
    p.add_argument("--expect-state", type=job_state_arg, default=None, help="fail unless the job is in it")
    p.add_argument("--unexpected-state", type=job_state_arg, action="append", help="fail if the job is in it")
    p.add_argument("--comment", default="", help="recorded in the job's history")
    p.set_defaults(func=cmd_set_state)

    p = add("exec", "create or update an execution", "Executions: one run of a job on one node.")
    exec_sub = p.add_subparsers(dest="exec_command", metavar="ACTION", required=True)

    def add_exec(name: str, help_text: str) -> argparse.ArgumentParser:
        return exec_sub.add_parser(
            name, help=help_text, description=help_text, parents=[common], formatter_class=_Formatter
        )

    q = add_exec("create", "add an execution to a job")
    q.add_argument("job_id", metavar="JOB_ID")
    q.add_argument("node_id", metavar="NODE_ID")
    q.add_argument("--ref", help="the execution's id (compute_reference; default: the server makes one)")
    q.add_argument("--state", type=execution_state_arg, default=None, help="initial state (default NEW)")
    q.add_argument("--desired-state", type=desired_state_arg, default=None, help="PENDING, RUNNING or STOPPED")
    q.add_argument("--status", default=None, help="free text")
    q.add_argument("--comment", default="", help="recorded in the job's history")
    q.set_defaults(func=cmd_exec_create)

    q = add_exec("update", "change an execution (only the fields given, or the --mask)")
    q.add_argument("job_id", metavar="JOB_ID")
    q.add_argument("ref", metavar="REF", help="the execution's compute_reference")
    q.add_argument("--state", type=execution_state_arg, default=None, help="e.g. bid_accepted, completed, failed")
    q.add_argument("--status", default=None, help="free text")
    q.add_argument("--desired-state", type=desired_state_arg, default=None, help="PENDING, RUNNING or STOPPED")
    q.add_argument("--exit-code", type=int, default=None, help="run_output.exit_code")
    q.add_argument("--stdout", default=None, help="run_output.stdout")
    q.add_argument("--stderr", default=None, help="run_output.stderr")
    q.add_argument(
        "--mask",
        default=None,
        help="comma-separated field paths to change (a path named but not given is cleared), e.g. status,run_output",
    )
    q.add_argument("--expect-version", type=non_negative_int, default=0, help="the execution's own version")
    q.add_argument(
        "--expect-state",
        type=lambda s: [execution_state_arg(x) for x in s.split(",") if x.strip()],
        action="append",
        metavar="S[,S...]",
        help="fail unless the execution is in one of these (repeatable)",
    )
    q.add_argument(
        "--unexpected-state",
        type=lambda s: [execution_state_arg(x) for x in s.split(",") if x.strip()],
        action="append",
        metavar="S[,S...]",
        help="fail if the execution is in one of these",
    )
    q.add_argument("--comment", default="", help="recorded in the job's history")
    q.set_defaults(func=cmd_exec_update)

    p = add("history", "show every change of a job", "Every change of a job, oldest first.")
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--page-size", type=non_negative_int, default=0, help="entries fetched per call")
    p.set_defaults(func=cmd_history)

    p = add("delete", "delete a job and its history")
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--expect-version", type=non_negative_int, default=0, help="fail unless the job is at it")
    p.set_defaults(func=cmd_delete)

    p = add(
        "watch",
        "follow jobs live",
        "Follow jobs as they change. In a terminal: a live table, one row per job, redrawn in place.\n"
        "Piped, or with --output json: one JSON object per event (protobuf's JSON mapping), a line each.\n"
        "A dropped connection is resumed where it left off, and says so. Ctrl-C stops it.",
    )
    p.add_argument("job_ids", nargs="*", metavar="JOB_ID", help="only these jobs (default: all)")
    p.add_argument("--node", help="only jobs with an execution on this node")
    p.add_argument("--from-revision", type=non_negative_int, default=0, help="replay changes from this revision")
    p.add_argument("--initial", action="store_true", help="start with every matching job (INITIAL events)")
    p.set_defaults(func=cmd_watch)

    p = add(
        "demo",
        "drive a realistic workload",
        "Create jobs at a steady rate and schedule them like a requester would: queue, ask nodes to bid, run,\n"
        "fail and retry on another node, time out, complete. Every write is a compare-and-set.",
    )
    p.add_argument("--rate", type=rate, default=4.0, help="jobs created per second, e.g. 4 or 4/s or 120/m")
    p.add_argument("--jobs", type=non_negative_int, default=0, help="stop after creating this many (0: no limit)")
    p.add_argument("--nodes", type=int, default=5, help="compute nodes bidding")
    p.add_argument("--duration", type=duration, default=None, help="stop after this long (default: Ctrl-C)")
    p.add_argument("--speed", type=float, default=1.0, help="time runs this many times faster")
    p.add_argument("--fail-rate", type=float, default=0.25, help="share of runs that fail (then retry)")
    p.add_argument("--timeout-rate", type=float, default=0.1, help="share of jobs stuck until they time out")
    p.add_argument("--seed", type=int, default=None, help="random seed, for a repeatable run")
    p.set_defaults(func=cmd_demo)
    return parser


def _attach_dash_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--deadline -5s`` as ``--deadline=-5s``: argparse takes a value starting with ``-`` for an option and
    answers "expected one argument"; attached, the value reaches its type check, which says what is wrong."""
    takes_value: set[str] = set()
    flags: set[str] = set()
    todo = [parser]
    while todo:
        p = todo.pop()
        for action in p._actions:
            flags.update(action.option_strings)
            if action.option_strings and action.nargs is None:
                takes_value.update(o for o in action.option_strings if o.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                todo += list(action.choices.values())
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            out += argv[i:]
            break
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if arg in takes_value and nxt is not None and nxt.startswith("-") and nxt.split("=")[0] not in flags:
            out.append(f"{arg}={nxt}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def connection_hint(args: argparse.Namespace, exc: JobStateError) -> str:
    """What to try when no answer came from the server: grpc only says ``Socket closed`` or a TLS error code. The
    server's own UNAVAILABLE answers carry a reason (SHUTTING_DOWN, ...) and need no hint."""
    if exc.code.name != "UNAVAILABLE" or exc.reason:
        return ""
    text = str(exc).lower()
    target = getattr(args, "target", "")
    tls_ca, tls_cert = getattr(args, "tls_ca", None), getattr(args, "tls_cert", None)
    if "connection refused" in text:
        return f"is a jobstate server running at {target}? (--target HOST:PORT or ${TARGET_ENV})"
    if "resolv" in text:
        return f"the host name in {target} could not be resolved (--target HOST:PORT or ${TARGET_ENV})"
    if "wrong_version_number" in text:
        return f"the server at {target} does not use TLS: leave out --tls-ca, --tls-cert and --tls-key"
    if "certificate_verify_failed" in text or "certificate verify failed" in text:
        return f"the server's certificate is not signed by the --tls-ca given ({tls_ca}), or not for this host name"
    # A TLS server closes a plaintext connection, and an mTLS server one without a client certificate.
    if not any(word in text for word in ("socket closed", "connection reset", "handshake", "end of file")):
        return ""
    if not tls_ca:
        return (
            f"the server at {target} may require TLS: give --tls-ca FILE (the CA that signed its certificate), and "
            "--tls-cert FILE --tls-key FILE if it also asks for a client certificate"
        )
    if not tls_cert:
        return f"the server at {target} may require a client certificate (mTLS): give --tls-cert FILE --tls-key FILE"
    return ""


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(_attach_dash_values(parser, argv))
    except SystemExit as exc:  # argparse's way of saying usage error (2) or --help (0)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    if args.command == "serve":
        given = [flag for dest, flag in CLIENT_ONLY.items() if hasattr(args, dest)]
        if given:
            what = "is a client option" if len(given) == 1 else "are client options"
            err.write(
                f"jobstate serve: error: {', '.join(given)} {what} and would do nothing here"
                " (the server's own: --host, --port, --tls-cert/--tls-key after serve)\n"
            )
            return EXIT_USAGE
    if not hasattr(args, "deadline"):
        args.deadline = DEFAULT_DEADLINE
    if not hasattr(args, "target"):
        args.target = os.environ.get(TARGET_ENV) or core.DEFAULT_TARGET
    if not hasattr(args, "output"):
        args.output = None if args.command == "watch" else "text"
    ctx = Context(args, out, err)
    func: Callable[[Context], int] = args.func
    try:
        return func(ctx)
    except JobStateError as exc:
        err.write(f"error: {exc}\n")
        hint = connection_hint(args, exc)
        if hint:
            err.write(f"hint: {hint}\n")
        return EXIT_API_ERROR
    except UsageError as exc:
        err.write(f"jobstate: error: {exc}\n")
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (``jobstate watch | head -1``): not an error. Stop Python from complaining
        # again when it flushes stdout on exit.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
