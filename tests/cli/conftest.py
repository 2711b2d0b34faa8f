"""Fixtures for the CLI tests: the command against the test's server, and long-running commands that end."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cliutil import CLI, Result, run, stop


@pytest.fixture
def cli(server: Any) -> Callable[..., Result]:
    """``cli("get", "j1")``: the command against the test's server."""

    def call(*args: str, timeout: float = 30) -> Result:
        return run("--target", server.target, *args, timeout=timeout)

    return call


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Starts long-running commands (watch, serve); every one is ended after the test."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [*CLI, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        procs.append(p)
        return p

    yield start
    for p in procs:
        stop(p)
