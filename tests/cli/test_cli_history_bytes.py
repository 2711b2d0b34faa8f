"""``jobstate serve --history-bytes``: sizes as people write them, refused when they do not parse, and in force
in the server it starts (its log line and its metrics say so)."""

from __future__ import annotations

import argparse
import json
import subprocess
import urllib.request
from collections.abc import Callable

import pytest
from cliutil import LineReader, free_port, run

from jobstate.client.cli import byte_size

Spawn = Callable[..., subprocess.Popen[str]]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("1048576", 1 << 20),
        ("256MiB", 256 << 20),
        ("8M", 8 << 20),
        ("8mib", 8 << 20),
        ("1GiB", 1 << 30),
        ("1.5KiB", 1536),
        ("100MB", 100_000_000),
        ("512KB", 512_000),
    ],
)
def test_sizes(text: str, value: int) -> None:
    assert byte_size(text) == value


@pytest.mark.parametrize("text", ["", "-1", "lots", "8 TiB", "MiB", "1e9"])
def test_sizes_that_do_not_parse(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        byte_size(text)


def test_a_bad_size_is_a_usage_error() -> None:
    r = run("serve", "--port", str(free_port()), "--history-bytes", "lots")
    assert r.code == 2
    assert "invalid size 'lots'" in r.err


def test_serve_holds_history_within_the_given_bytes(spawn: Spawn) -> None:
    port, metrics = free_port(), free_port()
    server = spawn(
        "serve",
        "--port",
        str(port),
        "--history-bytes",
        "8MiB",
        "--metrics-port",
        str(metrics),
        "--log-format",
        "json",
        "--grace",
        "1",
    )
    assert server.stderr is not None
    log = LineReader(server.stderr)
    serving = json.loads(log.until(lambda line: '"serving"' in line, timeout=30))
    assert serving["history_bytes"] == 8 * 1024 * 1024
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert "jobstate_history_capacity_bytes 8.388608e+06" in text
