"""What ``jobstate watch`` shows in a terminal: one row per job, redrawn in place as events arrive.

``LiveModel`` is the state of the view (the jobs, the revision, the event rate, reconnects), fed with watch
responses; ``render`` turns it into one frame of text for a terminal of a given size. Both are free of I/O;
``run_live_view`` joins them to a watch stream and redraws at most ``MAX_FPS`` times a second, so a busy
stream costs one redraw per tenth of a second rather than one per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import shutil
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from jobstate.client import names
from jobstate.client.aio import AsyncClient
from jobstate.client.core import short_job_state
from jobstate.client.errors import JobStateError, OutOfRange
from jobstate.v1 import job_state_pb2 as pb
from jobstate.v1 import job_state_service_pb2 as spb

MAX_FPS = 10
RATE_WINDOW = 5.0  # seconds of events the rate in the header averages over
FRESH = 2.0  # seconds a changed row stays marked
PROGRESS_INTERVAL = 2.0  # idle bookmarks: they tell the view a resumed stream is live again

CSI = "\x1b["
RESET = CSI + "0m"
HOME = CSI + "H"
CLEAR_LINE = CSI + "K"
CLEAR_BELOW = CSI + "J"
ENTER = CSI + "?1049h" + CSI + "?25l"  # alternate screen, cursor hidden: the shell's screen comes back on exit
LEAVE = CSI + "?25h" + CSI + "?1049l"

DIM = "2"
BOLD = "1"

# SGR colours of the job states; terminal states are the ones a person scans for.
JOB_COLOURS: dict[int, str] = {
    pb.JOB_STATE_TYPE_NEW: "37",
    pb.JOB_STATE_TYPE_QUEUED: "33",
    pb.JOB_STATE_TYPE_IN_PROGRESS: "1;36",
    pb.JOB_STATE_TYPE_COMPLETED: "32",
    pb.JOB_STATE_TYPE_ERROR: "1;31",
    pb.JOB_STATE_TYPE_CANCELLED: "35",
}
JOB_ORDER = [
    pb.JOB_STATE_TYPE_NEW,
    pb.JOB_STATE_TYPE_QUEUED,
    pb.JOB_STATE_TYPE_IN_PROGRESS,
    pb.JOB_STATE_TYPE_COMPLETED,
    pb.JOB_STATE_TYPE_ERROR,
    pb.JOB_STATE_TYPE_CANCELLED,
]

# Execution states are counted under the CLI's names for them (``jobstate exec update --state BID_ACCEPTED``), so
# the view needs no legend; colours follow the job states' (waiting yellow, running cyan, failed red).
EXECUTION_COLOURS: dict[int, str] = {
    pb.EXECUTION_STATE_TYPE_NEW: "37",
    pb.EXECUTION_STATE_TYPE_ASK_FOR_BID: "33",
    pb.EXECUTION_STATE_TYPE_ASK_FOR_BID_ACCEPTED: "33",
    pb.EXECUTION_STATE_TYPE_BID_ACCEPTED: "1;36",
    pb.EXECUTION_STATE_TYPE_COMPLETED: "32",
    pb.EXECUTION_STATE_TYPE_FAILED: "1;31",
    pb.EXECUTION_STATE_TYPE_ASK_FOR_BID_REJECTED: DIM,
    pb.EXECUTION_STATE_TYPE_BID_REJECTED: DIM,
    pb.EXECUTION_STATE_TYPE_CANCELLED: "35",
}

Segment = tuple[str, str]  # (text, SGR parameters; "" for plain)


def colour_enabled(stream: TextIO) -> bool:
    """Colour for terminals, unless NO_COLOR is set (https://no-color.org) or TERM is dumb."""
    return stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def paint(text: str, sgr: str, colour: bool = True) -> str:
    return f"{CSI}{sgr}m{text}{RESET}" if colour and sgr else text


def job_state_segment(state: int) -> Segment:
    return short_job_state(state), JOB_COLOURS.get(state, "")


def execution_counts(job: pb.JobState) -> list[Segment]:
    """``1 BID_ACCEPTED 2 FAILED``: the job's executions counted by state, in lifecycle order, coloured."""
    return [
        (f"{n} {names.execution_state_name(state)}", EXECUTION_COLOURS.get(state, ""))
        for state, n in names.execution_counts(job)
    ]


def join_segments(parts: Sequence[Segment], sep: str = " ") -> list[Segment]:
    out: list[Segment] = []
    for i, part in enumerate(parts):
        if i:
            out.append((sep, ""))
        out.append(part)
    return out


def fit(segments: Iterable[Segment], width: int, colour: bool = True) -> str:
    """The segments as one line of at most ``width`` visible characters (escape sequences do not count)."""
    out: list[str] = []
    left = width
    for text, sgr in segments:
        if left <= 0:
            break
        if len(text) > left:
            text = text[: max(0, left - 1)] + "…"
        left -= len(text)
        out.append(paint(text, sgr, colour))
    return "".join(out)


def cell(text: str, width: int, right: bool = False) -> str:
    if len(text) > width:
        return text[: max(0, width - 1)] + "…"
    return text.rjust(width) if right else text.ljust(width)


def ago(seconds: float) -> str:
    """``45s``, ``12m``, ``3h``, ``2d``: how long ago, in the largest whole unit."""
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 2 * 3600:
        return f"{s // 60}m"
    if s < 2 * 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def seconds_of(ts: object) -> float:
    return float(getattr(ts, "seconds", 0)) + float(getattr(ts, "nanos", 0)) / 1e9


@dataclass
class Row:
    job: pb.JobState
    revision: int  # of the job's last change: rows are sorted by it, most recent first
    changed: float = 0.0  # monotonic time this view saw it change (0: it came in the initial snapshot)


@dataclass
class LiveModel:
    """The live view's state, fed with watch responses."""

    target: str
    scope: str = "all jobs"
    rows: dict[str, Row] = field(default_factory=dict)
    revision: int = 0
    synced: bool = False
    events: int = 0
    deleted: int = 0
    expired: int = 0  # removed by the server's retention of finished jobs, not by a client
    recent: deque[float] = field(default_factory=deque)
    connected: bool = False  # a response has arrived (failures before it are a slow start, not a resume)
    reconnecting: str = ""  # why the stream is down, while it is
    resumed: str = ""  # the last resume, once the stream is live again
    resumes: int = 0
    relists: int = 0

    def apply(self, response: spb.WatchResponse, now: float) -> None:
        if self.reconnecting and self.connected:
            self.resumed = f"resumed after {self.reconnecting} at {dt.datetime.now():%H:%M:%S}"
        self.reconnecting = ""
        self.connected = True
        for event in response.events:
            self.apply_event(event, now)
        self.revision = max(self.revision, response.revision)

    def apply_event(self, event: spb.WatchEvent, now: float) -> None:
        self.revision = max(self.revision, event.revision)
        if event.type == spb.WATCH_EVENT_TYPE_BOOKMARK:
            self.synced = True
            return
        job_id = event.job.job_id
        row = self.rows.get(job_id)
        if row is not None and event.revision <= row.revision:
            return  # already seen (a resumed stream never repeats, but an initial snapshot may overlap)
        if event.type == spb.WATCH_EVENT_TYPE_INITIAL:
            self.rows[job_id] = Row(event.job, event.revision)
            return
        self.events += 1
        self.recent.append(now)
        if event.type == spb.WATCH_EVENT_TYPE_DELETED:
            self.rows.pop(job_id, None)
            if event.delete_cause == spb.DELETE_CAUSE_RETENTION:
                self.expired += 1
            else:
                self.deleted += 1
            return
        self.rows[job_id] = Row(event.job, event.revision, now)

    def on_resume(self, err: JobStateError, attempt: int, delay: float) -> None:
        self.resumes += 1
        self.reconnecting = err.code.name + (f" ({err.reason})" if err.reason else "")
        self.resumed = ""

    def relist(self) -> None:
        """The revisions to resume from are gone: start again from a fresh snapshot.

        The revision starts again too: after a store was replaced, the new one's revisions may be lower than
        any this view has seen, and the header must show the store being watched, not the highest number.
        """
        self.rows.clear()
        self.revision = 0
        self.deleted = 0
        self.synced = False
        self.relists += 1

    def rate(self, now: float) -> float:
        while self.recent and self.recent[0] < now - RATE_WINDOW:
            self.recent.popleft()
        return len(self.recent) / RATE_WINDOW

    def counts(self) -> dict[int, int]:
        out: dict[int, int] = dict.fromkeys(JOB_ORDER, 0)
        for row in self.rows.values():
            out[row.job.state] = out.get(row.job.state, 0) + 1
        return out


def render(model: LiveModel, width: int, height: int, now: float, wall: float, colour: bool = True) -> list[str]:
    """One frame: header, column titles, and as many rows as fit, most recently changed first."""
    width = max(width, 20)
    lines: list[list[Segment]] = []
    status: Segment = ("live", "32") if model.synced else ("syncing…", "33")
    if model.reconnecting:
        status = (f"{'reconnecting' if model.connected else 'connecting'}: {model.reconnecting}", "1;33")
    lines.append(
        [
            ("jobstate watch", BOLD),
            (f"  {model.target}  {model.scope}  revision {model.revision}  ", ""),
            (f"{model.rate(now):.1f} events/s", ""),
            ("  ", ""),
            status,
        ]
    )
    counts = model.counts()
    summary: list[Segment] = [(f"{len(model.rows)} jobs", BOLD)]
    for state in JOB_ORDER:
        name, sgr = job_state_segment(state)
        summary += [("  ", ""), (f"{counts[state]} {name}", sgr if counts[state] else DIM)]
    if model.deleted:
        summary += [("  ", ""), (f"{model.deleted} deleted", DIM)]
    if model.expired:
        summary += [("  ", ""), (f"{model.expired} expired", DIM)]
    lines.append(summary)
    notice: list[Segment] = []
    if model.resumed:
        notice.append((f"{model.resumed} ({model.resumes} reconnect{'s' if model.resumes != 1 else ''})", "33"))
    if model.relists:
        notice.append((f"  relisted {model.relists}x (history compacted)", "33"))
    lines.append(notice)

    rows = sorted(model.rows.values(), key=lambda r: (r.revision, r.job.job_id), reverse=True)
    id_width = min(36, max([6, *(len(r.job.job_id) for r in rows[: max(0, height)])]))
    titles = f"  {cell('JOB ID', id_width)}  {cell('STATE', 11)}  {cell('VER', 4, True)}  {cell('AGE', 4, True)}"
    titles += f"  {cell('CHANGED', 7, True)}  EXECUTIONS"
    lines.append([(titles, DIM if colour else "")])
    room = max(0, height - len(lines))
    shown = rows if len(rows) <= room else rows[: max(0, room - 1)]
    for row in shown:
        job = row.job
        fresh = row.changed and now - row.changed < FRESH
        state_name, state_sgr = job_state_segment(job.state)
        segs: list[Segment] = [
            ("● " if fresh else "  ", "1;33" if fresh else ""),
            (cell(job.job_id, id_width), BOLD if fresh else ""),
            ("  ", ""),
            (cell(state_name, 11), state_sgr),
            (f"  {cell(str(job.version), 4, True)}", ""),
            (f"  {cell(ago(wall - seconds_of(job.create_time)), 4, True)}", ""),
            (f"  {cell(ago(wall - seconds_of(job.update_time)) + ' ago', 7, True)}  ", DIM),
        ]
        segs += join_segments(execution_counts(job)) or [("-", DIM)]
        lines.append(segs)
    if len(shown) < len(rows):
        lines.append([(f"  … {len(rows) - len(shown)} more jobs (least recently changed)", DIM)])
    return [fit(segs, width, colour) for segs in lines[:height]]


def frame(lines: Sequence[str]) -> str:
    """Redraws in place: cursor home, each line cleared to its end, and the rest of the screen cleared."""
    return HOME + "".join(line + CLEAR_LINE + "\r\n" for line in lines[:-1]) + lines[-1] + CLEAR_LINE + CLEAR_BELOW


async def run_live_view(
    client: AsyncClient,
    out: TextIO,
    *,
    job_ids: Sequence[str] = (),
    node_id: str = "",
    start_revision: int = 0,
) -> None:
    """Watches and redraws until cancelled (Ctrl-C); the terminal is restored on the way out."""
    scope = "all jobs"
    if job_ids:
        scope = "jobs " + ",".join(job_ids)
    if node_id:
        scope = f"node {node_id}" if not job_ids else f"{scope} on node {node_id}"
    model = LiveModel(client.target, scope)
    dirty = asyncio.Event()
    colour = colour_enabled(out)

    def on_resume(err: JobStateError, attempt: int, delay: float) -> None:
        model.on_resume(err, attempt, delay)
        dirty.set()

    async def consume() -> None:
        while True:
            stream = client.watch(
                job_ids,
                node_id=node_id,
                start_revision=start_revision,
                send_initial_state=not start_revision,
                progress_interval=PROGRESS_INTERVAL,
                on_resume=on_resume,
            )
            try:
                async for response in stream.responses():
                    model.apply(response, time.monotonic())
                    dirty.set()
                return
            except OutOfRange:
                model.relist()
            finally:
                stream.close()

    async def draw() -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(dirty.wait(), 1.0)  # ages and the rate move even when nothing happens
            dirty.clear()
            size = shutil.get_terminal_size()
            out.write(frame(render(model, size.columns, size.lines, time.monotonic(), time.time(), colour)))
            out.flush()
            await asyncio.sleep(1 / MAX_FPS)

    out.write(ENTER)
    out.flush()
    tasks = [asyncio.create_task(consume()), asyncio.create_task(draw())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # an error the stream could not resume from ends the view, and is reported
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        out.write(LEAVE)
        out.flush()
