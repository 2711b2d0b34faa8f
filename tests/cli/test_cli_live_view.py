"""``jobstate watch`` in a terminal: the live view, rendered into a pseudo-terminal and read back as a screen."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cliutil import CLI, clean_env, free_port, stop, wait_serving

from jobstate.client import Client, core

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
HOME = "\x1b[H"


class Terminal:
    """A child process on a pseudo-terminal of a given size; ``screen()`` is its last full frame, as text."""

    def __init__(self, args: list[str], columns: int = 120, rows: int = 30) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        env = clean_env(TERM="xterm-256color")
        env.pop("COLUMNS", None)
        env.pop("LINES", None)
        env.pop("NO_COLOR", None)
        self.proc = subprocess.Popen(
            args, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True, close_fds=True
        )
        os.close(slave)
        self.raw = ""

    def read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            with contextlib.suppress(OSError):  # EIO: the child closed the terminal
                self.raw += os.read(self.master, 65536).decode("utf-8", "replace")

    def frames(self) -> list[str]:
        return self.raw.split(HOME)[1:]

    def screen(self) -> list[str]:
        """The last complete frame's lines, escape sequences removed (a frame ends by clearing below it)."""
        for frame in reversed(self.frames()):
            if frame.endswith("\x1b[J"):
                return [ANSI.sub("", line).rstrip("\r") for line in frame.split("\n")]
        return []

    def wait_for(self, pred: Callable[[list[str]], bool], timeout: float = 20) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if screen and pred(screen):
                return screen
            assert self.proc.poll() is None, f"the view exited ({self.proc.returncode}): {self.raw[-2000:]!r}"
            self.read(0.2)
        raise AssertionError("the screen never matched; last one:\n" + "\n".join(self.screen()))

    def close(self) -> None:
        stop(self.proc)
        os.close(self.master)


def row(screen: list[str], job_id: str) -> list[str]:
    for line in screen:
        words = line.replace("●", " ").split()
        if words and words[0] == job_id:
            return words
    return []


@pytest.fixture
def terminal() -> Iterator[Callable[..., Terminal]]:
    opened: list[Terminal] = []

    def open_terminal(*args: str, **size: Any) -> Terminal:
        t = Terminal([*CLI, *args], **size)
        opened.append(t)
        return t

    yield open_terminal
    for t in opened:
        t.close()


def test_live_view_shows_rows_and_states(server: Any, terminal: Callable[..., Terminal]) -> None:
    with Client(server.target) as c:
        c.create_job("alpha")
        c.create_job("beta")
        c.update_job_state("beta", "queued")

        term = terminal("--target", server.target, "watch", columns=120, rows=30)
        screen = term.wait_for(lambda s: bool(row(s, "alpha") and row(s, "beta")) and "live" in s[0])
        assert screen[0].startswith(f"jobstate watch  {server.target}  all jobs  revision 3")
        assert screen[1].split()[:6] == ["2", "jobs", "1", "NEW", "1", "QUEUED"]
        assert screen[3].split() == ["JOB", "ID", "STATE", "VER", "AGE", "CHANGED", "EXECUTIONS"]
        assert row(screen, "alpha")[:3] == ["alpha", "NEW", "1"]
        assert row(screen, "beta")[:3] == ["beta", "QUEUED", "2"]
        assert screen.index(next(line for line in screen if "beta" in line)) < screen.index(
            next(line for line in screen if "alpha" in line)
        ), "most recently changed first"

        # Changes arrive: a job runs on two nodes, one run fails; another job completes; a third appears.
        c.update_job_state("alpha", "in_progress")
        c.create_execution("alpha", "node-1", compute_reference="e1", state="bid_accepted")
        c.create_execution("alpha", "node-2", compute_reference="e2", state="bid_accepted")
        c.create_execution("alpha", "node-3", compute_reference="e3", state="bid_accepted")
        c.update_execution("alpha", "e3", state="failed")
        c.update_job_state("beta", "completed")
        c.create_job("gamma")
        c.delete_job("gamma")
        c.create_job("delta")

        screen = term.wait_for(lambda s: bool(row(s, "delta")) and "revision 12" in s[0])
        assert row(screen, "alpha")[:3] == ["alpha", "IN_PROGRESS", "6"]
        # Executions are counted under the CLI's own state names, which `jobstate exec update --state` takes.
        assert " ".join(row(screen, "alpha")[6:]) == "2 BID_ACCEPTED 1 FAILED"
        for word in row(screen, "alpha")[7::2]:
            assert core.execution_state(word)
        assert row(screen, "beta")[:3] == ["beta", "COMPLETED", "3"]
        assert row(screen, "gamma") == []  # deleted: gone from the view
        assert screen[1].split()[:12] == [
            "3",
            "jobs",
            "1",
            "NEW",
            "0",
            "QUEUED",
            "1",
            "IN_PROGRESS",
            "1",
            "COMPLETED",
            "0",
            "ERROR",
        ]
        assert "1 deleted" in screen[1]
        assert [line.replace("●", " ").split()[0] for line in screen[4:7]] == ["delta", "beta", "alpha"]
        assert "●" in next(line for line in screen if "delta" in line)  # just changed: marked

        # States are coloured: COMPLETED in green, IN_PROGRESS in bold cyan, a failed run in bold red.
        last = term.frames()[-1]
        assert "\x1b[32mCOMPLETED" in last
        assert "\x1b[1;36mIN_PROGRESS" in last
        assert "\x1b[1;31m1 FAILED" in last

        # Ctrl-C: exit 0 and give the terminal back (cursor shown, main screen restored).
        term.proc.send_signal(signal.SIGINT)
        assert term.proc.wait(10) == 0
        deadline = time.monotonic() + 5
        while "\x1b[?1049l" not in term.raw and time.monotonic() < deadline:
            term.read(0.2)
        assert term.raw.endswith("\x1b[?25h\x1b[?1049l")


def test_live_view_fits_a_small_terminal(server: Any, terminal: Callable[..., Terminal]) -> None:
    with Client(server.target) as c:
        for i in range(20):
            c.create_job(f"job-{i:02d}")
    term = terminal("--target", server.target, "watch", columns=60, rows=12)
    screen = term.wait_for(lambda s: any("more jobs" in line for line in s))
    assert len(screen) == 12
    assert all(len(line) <= 60 for line in screen)
    assert row(screen, "job-19")  # the newest is shown, the oldest are summed up
    assert screen[-1].strip() == "… 13 more jobs (least recently changed)"


def test_live_view_header_follows_a_replaced_store(spawn: Any, terminal: Callable[..., Terminal]) -> None:
    """A server replaced by another store on the same port: the view relists, and its header shows the new
    store's revision, not the highest one it ever saw."""
    port = free_port()
    target = f"127.0.0.1:{port}"
    serve = ("serve", "--port", str(port), "--grace", "1")
    old = spawn(*serve)
    wait_serving(target, old)
    with Client(target) as c:
        for i in range(8):
            c.create_job(f"old-{i}")
    term = terminal("--target", target, "watch", columns=120, rows=30)
    screen = term.wait_for(lambda s: "revision 8" in s[0] and "live" in s[0])

    assert stop(old) == 0
    new = spawn(*serve)
    wait_serving(target, new)
    with Client(target) as c:
        c.create_job("new-1")
        c.create_job("new-2")
    screen = term.wait_for(lambda s: bool(row(s, "new-2")) and "live" in s[0] and "relisted" in s[2])
    assert row(screen, "old-1") == []
    assert screen[0].startswith(f"jobstate watch  {target}  all jobs  revision 2  "), screen[0]
    assert screen[1].split()[:2] == ["2", "jobs"]
