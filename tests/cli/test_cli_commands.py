"""The ``jobstate`` command against a real server: text and JSON output, exit codes, error reporting."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
from cliutil import Result, clean_env, free_port, run

from jobstate.client import Client
from jobstate.client.cli import main

Cli = Callable[..., Result]

SUBCOMMANDS = [
    ["serve"],
    ["create"],
    ["get"],
    ["list"],
    ["set-state"],
    ["exec"],
    ["exec", "create"],
    ["exec", "update"],
    ["history"],
    ["delete"],
    ["watch"],
    ["demo"],
]


def test_help_lists_every_subcommand() -> None:
    r = run("--help")
    assert r.code == 0
    for name in ("serve", "create", "get", "list", "set-state", "exec", "history", "delete", "watch", "demo"):
        assert name in r.out
    assert "Exit status" in r.out


# In-process from here on (the same ``main`` the command runs): a subprocess each would only add start-up time.
@pytest.mark.parametrize("words", SUBCOMMANDS, ids=lambda w: " ".join(w))
def test_help_of_each_subcommand(words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*words, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: jobstate {' '.join(words)}")
    # The client's options everywhere but in serve, where they would do nothing.
    assert ("--target" in out) == (words != ["serve"])


def test_usage_error_exits_2() -> None:
    r = run("set-state", "j1", "bogus")
    assert r.code == 2
    assert "jobstate set-state: error: argument STATE: unknown job state 'bogus'" in r.err
    assert r.out == ""


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["get"],
        ["create", "--job-timeout", "soon"],
        ["list", "--page-size", "-1"],
        ["exec", "update", "j1", "e1"],  # nothing to change
        ["exec", "update", "j1", "e1", "--expect-state", "running-ish"],
        ["--output", "yaml", "list"],
        ["demo", "--rate", "fast"],
    ],
    ids=lambda a: " ".join(a) or "(nothing)",
)
def test_usage_errors(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    err = io.StringIO()
    assert main(["--target", f"127.0.0.1:{free_port()}", *args], err=err) == 2
    captured = capsys.readouterr()
    assert "error" in captured.err + err.getvalue()
    assert captured.out == ""


def test_create_and_get_text(cli: Cli) -> None:
    r = cli("create", "j1", "--job-timeout", "5m", "--comment", "first")
    assert r.code == 0, r.err
    assert "created job j1 (NEW, version 1, revision 1)" in r.out
    assert "times out at" in r.out

    r = cli("get", "j1")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].split() == ["job", "j1"]
    assert lines[1].split() == ["state", "NEW"]
    assert lines[2].split() == ["version", "1"]
    assert any(line.startswith("timeout at") for line in lines)
    assert "executions 0" in r.out


def test_create_and_get_json(cli: Cli) -> None:
    r = cli("--output", "json", "create", "j1", "--job-timeout", "30s")
    assert r.code == 0, r.err
    created = r.json()
    assert created["revision"] == "1"  # protobuf's JSON mapping: int64 as a string
    assert created["job"]["jobId"] == "j1"
    assert created["job"]["state"] == "JOB_STATE_TYPE_NEW"
    assert created["job"]["version"] == "1"
    assert created["job"]["timeoutAt"] > created["job"]["createTime"]

    got = cli("get", "j1", "-o", "json").json()  # --output after the subcommand works too
    assert got["job"] == created["job"]
    assert got["revision"] == "1"


def test_server_made_id(cli: Cli) -> None:
    job = cli("create", "-o", "json").json()["job"]
    assert len(job["jobId"]) >= 32
    assert cli("get", job["jobId"]).code == 0


def test_lifecycle_text(cli: Cli) -> None:
    assert cli("create", "j1").code == 0
    r = cli("set-state", "j1", "queued", "--expect-version", "1", "--expect-state", "NEW", "--comment", "no capacity")
    assert (r.code, r.out.strip()) == (0, "job j1: QUEUED, version 2 (revision 2)")

    r = cli("exec", "create", "j1", "node-a", "--ref", "e1", "--state", "ask_for_bid")
    assert r.code == 0, r.err
    assert "created execution e1  node=node-a  ASK_FOR_BID  v1" in r.out
    assert "job j1: version 3 (revision 3)" in r.out

    r = cli(
        "exec",
        "update",
        "j1",
        "e1",
        "--state",
        "bid_accepted",
        "--status",
        "running",
        "--expect-version",
        "1",
        "--expect-state",
        "ask_for_bid,ask_for_bid_accepted",
    )
    assert r.code == 0, r.err
    assert 'updated execution e1  node=node-a  BID_ACCEPTED  v2  "running"' in r.out

    r = cli("set-state", "j1", "in-progress", "--expect-version", "4")
    assert r.code == 0, r.err
    r = cli("exec", "update", "j1", "e1", "--state", "failed", "--exit-code", "3", "--stderr", "oom")
    assert r.code == 0, r.err
    assert "FAILED  v3  exit=3" in r.out

    r = cli("get", "j1")
    assert r.code == 0
    assert "state      IN_PROGRESS" in r.out
    assert "version    6" in r.out
    assert "  e1  node=node-a  FAILED  v3  exit=3" in r.out

    r = cli("set-state", "j1", "error", "--comment", "gave up")
    assert r.code == 0
    r = cli("history", "j1")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].split()[:4] == ["REVISION", "VERSION", "TIME", "CHANGE"]
    changes = [line.split(None, 3)[3] for line in lines[1:]]
    assert [c.split("  ")[0] for c in changes] == [
        "job: created -> NEW",
        "job: NEW -> QUEUED",
        "execution e1 on node-a: created -> ASK_FOR_BID",
        "execution e1 on node-a: ASK_FOR_BID -> BID_ACCEPTED",
        "job: QUEUED -> IN_PROGRESS",
        "execution e1 on node-a: BID_ACCEPTED -> FAILED",
        "job: IN_PROGRESS -> ERROR",
    ]
    assert '"no capacity"' in lines[2]
    assert '"gave up"' in lines[7]


def test_lifecycle_json(cli: Cli) -> None:
    cli("create", "j1")
    r = cli("-o", "json", "exec", "create", "j1", "n1", "--ref", "e1", "--desired-state", "pending")
    assert r.code == 0, r.err
    out = r.json()
    assert out["execution"]["state"] == "EXECUTION_STATE_TYPE_NEW"
    assert out["execution"]["desiredState"] == "EXECUTION_DESIRED_STATE_PENDING"
    assert out["job"]["version"] == "2"

    r = cli("-o", "json", "exec", "update", "j1", "e1", "--state", "bid_accepted", "--exit-code", "0")
    out = r.json()
    assert out["execution"]["state"] == "EXECUTION_STATE_TYPE_BID_ACCEPTED"
    assert out["execution"]["version"] == "2"
    assert out["execution"]["desiredState"] == "EXECUTION_DESIRED_STATE_PENDING"  # not in the mask: kept

    # An explicit mask clears a field it names but the command does not give.
    out = cli("-o", "json", "exec", "update", "j1", "e1", "--mask", "desired_state,status").json()
    assert "desiredState" not in out["execution"]

    out = cli("-o", "json", "set-state", "j1", "completed", "--expect-state", "new").json()
    assert out["job"]["state"] == "JOB_STATE_TYPE_COMPLETED"
    assert out["job"]["executions"][0]["state"] == "EXECUTION_STATE_TYPE_CANCELLED"  # the job's end cancels it

    history = cli("-o", "json", "history", "j1", "--page-size", "2").json()  # pages joined into one answer
    entries = history["entries"]
    assert [e["version"] for e in entries] == ["1", "2", "3", "4", "5"]
    assert entries[0]["jobState"] == {"newState": "JOB_STATE_TYPE_NEW"}
    assert entries[1]["executionState"]["computeReference"] == "e1"
    assert entries[4]["cancelledExecutions"][0]["newState"] == "EXECUTION_STATE_TYPE_CANCELLED"
    assert "nextPageToken" not in history


def test_list_filters_and_paging(cli: Cli, server: Any) -> None:
    with Client(server.target) as c:
        for i in range(5):
            c.create_job(f"j{i}")
        c.update_job_state("j1", "queued")
        c.update_job_state("j3", "completed")
        c.create_execution("j4", "node-x")

    r = cli("list")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].split() == ["JOB", "ID", "STATE", "VERSION", "EXECUTIONS", "CREATED"]
    assert [line.split()[0] for line in lines[1:6]] == ["j0", "j1", "j2", "j3", "j4"]
    assert lines[2].split()[:3] == ["j1", "QUEUED", "2"]
    assert lines[5].split()[:4] == ["j4", "NEW", "2", "1"]
    assert lines[6] == "5 jobs at revision 8"

    out = cli("-o", "json", "list", "--state", "queued", "--state", "COMPLETED").json()
    assert [j["jobId"] for j in out["jobs"]] == ["j1", "j3"]
    out = cli("-o", "json", "list", "--node", "node-x").json()
    assert [j["jobId"] for j in out["jobs"]] == ["j4"]

    first = cli("-o", "json", "list", "--page-size", "2").json()
    assert [j["jobId"] for j in first["jobs"]] == ["j0", "j1"]
    token = first["nextPageToken"]
    second = cli("-o", "json", "list", "--page-size", "2", "--page-token", token).json()
    assert [j["jobId"] for j in second["jobs"]] == ["j2", "j3"]
    r = cli("list", "--page-size", "2")
    assert f"more: --page-token {token}" in r.out

    every = cli("-o", "json", "list", "--page-size", "2", "--all").json()
    assert [j["jobId"] for j in every["jobs"]] == ["j0", "j1", "j2", "j3", "j4"]
    assert "nextPageToken" not in every


def test_delete(cli: Cli, server: Any) -> None:
    with Client(server.target) as c:
        c.create_job("j1")
        c.update_job_state("j1", "queued")
    r = cli("delete", "j1", "--expect-version", "1")
    assert r.code == 1
    assert r.err.startswith("error: ABORTED (VERSION_MISMATCH): ")
    r = cli("delete", "j1", "--expect-version", "2")
    assert (r.code, r.out.strip()) == (0, "deleted job j1 (revision 3)")
    assert cli("get", "j1").code == 1


def _terminal_job(c: Client) -> None:
    c.create_job("j1")
    c.update_job_state("j1", "cancelled")


def _job_with_execution(c: Client) -> None:
    c.create_job("j1")
    c.create_execution("j1", "n1", compute_reference="e1")


@pytest.mark.parametrize(
    ("setup", "args", "expected"),
    [
        (None, ["get", "nope"], "NOT_FOUND (JOB_NOT_FOUND)"),
        ("j1", ["create", "j1"], "ALREADY_EXISTS (JOB_ALREADY_EXISTS)"),
        ("j1", ["set-state", "j1", "queued", "--expect-version", "3"], "ABORTED (VERSION_MISMATCH)"),
        ("j1", ["set-state", "j1", "queued", "--expect-state", "queued"], "FAILED_PRECONDITION (STATE_MISMATCH)"),
        (_terminal_job, ["exec", "create", "j1", "n1"], "FAILED_PRECONDITION (JOB_TERMINAL)"),
        (_job_with_execution, ["exec", "create", "j1", "n1"], "FAILED_PRECONDITION (NODE_HAS_ACTIVE_EXECUTION)"),
        ("j1", ["exec", "update", "j1", "e9", "--state", "failed"], "NOT_FOUND (EXECUTION_NOT_FOUND)"),
        (None, ["create", "bad id"], "INVALID_ARGUMENT (INVALID_ARGUMENT)"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_api_errors_exit_1(cli: Cli, server: Any, setup: Any, args: list[str], expected: str) -> None:
    with Client(server.target) as c:
        if isinstance(setup, str):
            c.create_job(setup)
        elif setup is not None:
            setup(c)
    r = cli(*args)
    assert r.code == 1, (r.out, r.err)
    assert r.out == ""
    assert r.err.startswith(f"error: {expected}: "), r.err
    assert len(r.err.splitlines()) == 1


def test_version_mismatch_message_names_both_versions(cli: Cli, server: Any) -> None:
    with Client(server.target) as c:
        c.create_job("j")
        c.update_job_state("j", "queued")
        c.update_job_state("j", "new")
    r = cli("set-state", "j", "queued", "--expect-version", "1")
    assert r.code == 1
    assert r.err.strip() == "error: ABORTED (VERSION_MISMATCH): job j is at version 3, not 1"


def test_unreachable_server_exits_1() -> None:
    r = run("--target", f"127.0.0.1:{free_port()}", "--timeout", "2s", "get", "j1")
    assert r.code == 1
    assert r.err.startswith("error: UNAVAILABLE")


def test_target_from_environment(server: Any) -> None:
    with Client(server.target) as c:
        c.create_job("from-env")
    r = run("get", "from-env", env=clean_env(JOBSTATE_TARGET=server.target))
    assert r.code == 0, r.err
    assert "from-env" in r.out
