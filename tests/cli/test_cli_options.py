"""The CLI's options say one thing each, go anywhere, and refuse what cannot work with a message a person can act
on: the call's deadline against the job's timeout, client options given to ``serve``, negative durations, a data
dir another server holds, an unreachable store, and a server that is not there."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cliutil import CLI, LineReader, Result, free_port, run, stop, wait_serving

from jobstate.client import Client
from jobstate.client.cli import build_parser, main

Cli = Callable[..., Result]
Spawn = Callable[..., subprocess.Popen[str]]


def test_the_call_deadline_goes_before_or_after_the_command(cli: Cli) -> None:
    for args in (
        ["--deadline", "5s", "create", "a"],
        ["create", "b", "--deadline", "5s"],
        ["--timeout", "5s", "create", "c"],  # the old global name still means the call's deadline
        ["get", "a", "--timeout", "5s"],
        ["get", "a", "--deadline", "5s", "-o", "json"],
    ):
        r = cli(*args)
        assert r.code == 0, (args, r.err)


def test_the_job_timeout_has_its_own_name(cli: Cli, server: Any) -> None:
    r = cli("create", "j1", "--job-timeout", "10m")
    assert r.code == 0, r.err
    with Client(server.target) as c:
        job = c.get_job("j1").job
    assert job.timeout_at.seconds - job.create_time.seconds == 600

    # `create --timeout` meant the job's timeout before: refused, naming both options, and nothing created.
    r = cli("create", "j2", "--timeout", "10m")
    assert r.code == 2
    assert "--job-timeout" in r.err
    assert "--deadline" in r.err
    with Client(server.target) as c:
        assert [j.job_id for j in c.iter_jobs()] == ["j1"]


def test_negative_duration_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--timeout", "-5s", "get", "j"]) == 2
    err = capsys.readouterr().err
    assert "a duration cannot be negative: '-5s'" in err
    assert "expected one argument" not in err
    # argparse's own answer to a value that looks like an option was "expected one argument".
    assert main(["get", "j", "--deadline", "-5s"]) == 2
    assert "a duration cannot be negative: '-5s'" in capsys.readouterr().err
    assert main(["create", "j", "--comment", "-x", "--job-timeout", "-1m"]) == 2
    assert "a duration cannot be negative: '-1m'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [
        ["--target", "127.0.0.1:1", "serve"],
        ["-o", "json", "serve"],
        ["--deadline", "1s", "serve"],
        ["serve", "-o", "json"],
    ],
)
def test_serve_refuses_client_options(args: list[str]) -> None:
    # A subprocess with its own port: a serve that wrongly accepted the options would run until the timeout.
    r = run(*args, "--port", "0", timeout=20)
    assert r.code == 2
    assert "error" in r.err
    assert re.search(r"--target|--output|-o|--deadline", r.err)


def _helps() -> dict[str, str]:
    parser = build_parser()
    helps = {"jobstate": parser.format_help()}
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))  # type: ignore[union-attr]
    todo = list(sub.choices.items())
    while todo:
        name, p = todo.pop()
        helps[name] = p.format_help()
        for action in p._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                todo += [(f"{name} {n}", q) for n, q in action.choices.items()]
    return helps


def test_help_states_each_default_once() -> None:
    helps = _helps()
    assert {"serve", "create", "watch", "exec update"} <= set(helps)
    for name, text in helps.items():
        flat = " ".join(text.split())
        assert "(default: None)" not in flat, name
        assert "(default: False)" not in flat, name
        for option in re.split(r"\s(?=-{1,2}[a-z])", flat):
            assert option.count("default") <= 1, (name, option)


def test_second_server_on_a_data_dir_says_who_holds_it(spawn: Spawn, tmp_path: Path) -> None:
    port = free_port()
    first = spawn("serve", "--port", str(port), "--store", "sqlite", "--data-dir", str(tmp_path))
    wait_serving(f"127.0.0.1:{port}", first)
    second = subprocess.run(
        [*CLI, "serve", "--port", str(free_port()), "--store", "sqlite", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert lines[0].startswith("jobstate serve: error: data dir ")
    assert f"(process {first.pid})" in lines[0]
    assert first.poll() is None  # the first server is untouched


def test_an_unreachable_etcd_is_one_line() -> None:
    r = run(
        "serve", "--port", str(free_port()), "--store", "etcd", "--etcd-endpoints", f"http://127.0.0.1:{free_port()}"
    )
    assert r.code == 1
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err
    assert lines[0].startswith("jobstate serve: error: etcd is not available"), r.err


def test_no_server_there_says_what_to_check() -> None:
    target = f"127.0.0.1:{free_port()}"
    r = run("--target", target, "get", "j1", "--deadline", "2s")
    assert r.code == 1
    assert r.err.startswith("error: UNAVAILABLE")
    assert f"hint: is a jobstate server running at {target}?" in r.err


def test_the_startup_line_names_the_engine_and_its_data(spawn: Spawn, tmp_path: Path) -> None:
    for extra, expected in (
        ([], {"store": "memory"}),
        (
            ["--store", "sqlite", "--data-dir", str(tmp_path / "db")],
            {"store": "sqlite", "data_dir": str(tmp_path / "db")},
        ),
    ):
        port = free_port()
        proc = spawn("serve", "--port", str(port), "--log-format", "json", *extra)
        assert proc.stderr is not None
        first = json.loads(LineReader(proc.stderr).next(timeout=30))
        assert first["msg"] == "serving"
        assert first["address"] == f"127.0.0.1:{port}"
        assert {k: first.get(k) for k in expected} == expected
        stop(proc)


def test_an_unknown_host_says_so() -> None:
    r = run("--target", "no-such-host.invalid:50051", "get", "j1", "--deadline", "5s")
    assert r.code == 1
    assert "hint: the host name in no-such-host.invalid:50051 could not be resolved" in r.err, r.err
