"""``jobstate watch`` piped: one JSON object per event, seeing changes other commands make; resuming after the
server restarts; and ``jobstate serve`` itself."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from typing import Any

from cliutil import LineReader, Result, free_port, run, stop

from jobstate.client import Client

Cli = Callable[..., Result]
Spawn = Callable[..., subprocess.Popen[str]]


def test_watch_json_sees_changes_made_by_other_commands(cli: Cli, server: Any, spawn: Spawn) -> None:
    with Client(server.target) as c:
        c.create_job("before")
    watch = spawn("--target", server.target, "watch", "--initial", "--output", "json")
    assert watch.stdout is not None
    lines = LineReader(watch.stdout)
    initial = json.loads(lines.next())
    assert initial["type"] == "WATCH_EVENT_TYPE_INITIAL"
    assert initial["job"]["jobId"] == "before"
    bookmark = json.loads(lines.next())
    assert bookmark == {"type": "WATCH_EVENT_TYPE_BOOKMARK", "revision": "1"}

    assert cli("create", "j1").code == 0
    assert cli("set-state", "j1", "queued", "--expect-version", "1").code == 0
    assert cli("exec", "create", "j1", "node-a", "--ref", "e1").code == 0
    assert cli("delete", "before").code == 0

    events = [json.loads(lines.next()) for _ in range(4)]
    assert [(e["type"], e["job"]["jobId"], e["job"]["version"], e["revision"]) for e in events] == [
        ("WATCH_EVENT_TYPE_CREATED", "j1", "1", "2"),
        ("WATCH_EVENT_TYPE_UPDATED", "j1", "2", "3"),
        ("WATCH_EVENT_TYPE_UPDATED", "j1", "3", "4"),
        ("WATCH_EVENT_TYPE_DELETED", "before", "1", "5"),
    ]
    assert events[1]["job"]["state"] == "JOB_STATE_TYPE_QUEUED"
    assert events[2]["job"]["executions"][0]["nodeId"] == "node-a"
    assert all("time" in e for e in events)
    assert stop(watch) is not None


def test_watch_piped_defaults_to_json_and_filters(cli: Cli, server: Any, spawn: Spawn) -> None:
    with Client(server.target) as c:
        head = c.head_revision()
    # From a known revision, so that nothing made after this line can be missed however late the process starts.
    watch = spawn("--target", server.target, "watch", "j2", "--from-revision", str(head + 1))
    assert watch.stdout is not None
    lines = LineReader(watch.stdout)
    for job in ("j1", "j2", "j3"):
        assert cli("create", job).code == 0
    assert cli("set-state", "j2", "in_progress").code == 0
    first, second = json.loads(lines.next()), json.loads(lines.next())
    assert (first["job"]["jobId"], first["job"]["version"]) == ("j2", "1")
    assert (second["job"]["jobId"], second["job"]["state"]) == ("j2", "JOB_STATE_TYPE_IN_PROGRESS")


def test_watch_node_filter_text_lines(cli: Cli, server: Any, spawn: Spawn) -> None:
    with Client(server.target) as c:
        head = c.head_revision()
    watch = spawn(
        "--target", server.target, "watch", "--node", "node-b", "--from-revision", str(head + 1), "--output", "text"
    )
    assert watch.stdout is not None
    lines = LineReader(watch.stdout)
    cli("create", "j1")
    cli("exec", "create", "j1", "node-a", "--ref", "a")
    cli("exec", "create", "j1", "node-b", "--ref", "b")
    line = lines.next()
    assert line.split() == ["3", "UPDATED", "j1", "NEW", "v3", "executions:", "2", "NEW"]


def test_watch_from_compacted_revision_exits_1(make_server: Callable[..., Any]) -> None:
    server = make_server(history_size=2)
    with Client(server.target) as c:
        for i in range(5):
            c.create_job(f"j{i}")
    r = run("--target", server.target, "watch", "--from-revision", "1", "-o", "json")
    assert r.code == 1
    assert r.err.startswith("error: OUT_OF_RANGE (REVISION_COMPACTED): ")


def _wait_serving(target: str, proc: subprocess.Popen[str], timeout: float = 20) -> None:
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


def test_serve_and_watch_resumes_after_restart(spawn: Spawn) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    serve_args = ("serve", "--port", str(port), "--log-format", "json", "--grace", "1")
    server = spawn(*serve_args)
    _wait_serving(target, server)
    with Client(target) as c:
        c.create_job("a1")
        c.create_job("a2")
    watch = spawn("--target", target, "watch", "--initial", "-o", "json")
    assert watch.stdout is not None
    assert watch.stderr is not None
    lines = LineReader(watch.stdout)
    errors = LineReader(watch.stderr)
    assert [json.loads(lines.next())["type"] for _ in range(3)] == [
        "WATCH_EVENT_TYPE_INITIAL",
        "WATCH_EVENT_TYPE_INITIAL",
        "WATCH_EVENT_TYPE_BOOKMARK",
    ]

    assert stop(server) == 0  # SIGTERM: a graceful stop, exit 0
    assert server.stderr is not None
    logs = [json.loads(line) for line in server.stderr.read().splitlines()]
    assert [entry["msg"] for entry in logs] == ["serving", "stopping", "stopped"]
    assert logs[0]["address"] == target

    notice = errors.next(timeout=20)
    assert notice.startswith("watch: stream ended (UNAVAILABLE")
    assert "resuming at revision 3" in notice

    # A new, empty in-memory server on the same port: its revision 3 is another store's. Resuming there would
    # silently skip b1 and b2, so the server refuses the resume (REVISION_COMPACTED, the store ids differ) and
    # the watch ends with exit status 1, telling the user to list again.
    server = spawn(*serve_args)
    _wait_serving(target, server)
    with Client(target) as c:
        c.create_job("b1")
        c.create_job("b2")
        c.create_job("b3")
    assert watch.wait(timeout=30) == 1
    said = []
    while not any("REVISION_COMPACTED" in line for line in said):
        said.append(errors.next(timeout=10))
    assert any("reset or replaced" in line for line in said), said
    assert not any('"b3"' in line for line in lines.seen), "no event of the new store may pass as a resumed one"
