"""Helpers for running the real ``jobstate`` command as a subprocess (``python -m jobstate``), bounded in time."""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

CLI = [sys.executable, "-m", "jobstate"]


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def run(*args: str, timeout: float = 30, env: dict[str, str] | None = None) -> Result:
    p = subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL, check=False
    )
    return Result(p.returncode, p.stdout, p.stderr)


class LineReader:
    """Reads a pipe's lines in a thread so a test can wait for the next one with a timeout."""

    def __init__(self, pipe: IO[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[str]) -> None:
        for line in pipe:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next(self, timeout: float = 15) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout}s; seen so far: {self.seen[-5:]}") from None
        if line is None:
            raise AssertionError(f"the stream ended; seen: {self.seen[-5:]}")
        self.seen.append(line)
        return line

    def until(self, pred: Callable[[str], bool], timeout: float = 15, limit: int = 10_000) -> str:
        deadline = time.monotonic() + timeout
        for _ in range(limit):
            line = self.next(max(0.01, deadline - time.monotonic()))
            if pred(line):
                return line
        raise AssertionError("no matching line")


def stop(p: subprocess.Popen[Any], timeout: float = 10) -> int:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout)
    return p.returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBSTATE_")}
    env.update(extra)
    return env


def wait_serving(target: str, proc: subprocess.Popen[str], timeout: float = 20) -> None:
    """Waits until a ``jobstate serve`` process answers at ``target`` (it fails at once if the process exits)."""
    from jobstate.client import Client

    deadline = time.monotonic() + timeout
    with Client(target, timeout=1) as c:
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                c.head_revision()
                return
            except Exception:
                time.sleep(0.1)  # polling a process that is starting: there is no event to wait on
    raise AssertionError(f"server at {target} did not start within {timeout}s")
