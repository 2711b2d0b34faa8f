"""Every code block in README.md and docs/*.md is either a file under docs/examples/ that a test here runs as
written, or says why it is not run (``<!-- not run: ... -->``) or that it is output (``<!-- output ... -->``).

The marker is an HTML comment on the line before the block (invisible on GitHub):
- ``<!-- snippet: docs/examples/F -->``: the block is exactly the file F, and ``RUN_BY`` names the test running F;
- ``<!-- output of: docs/examples/F -->``: what F prints, compared with a real run by F's test;
- ``<!-- output -->`` / ``<!-- not run: why -->``: an illustration, or a command the tests cannot run as such.

The examples talk to ``$JOBSTATE_TARGET`` (default ``127.0.0.1:50051``), as the CLI does, and the HTTP ones to
``$JOBSTATE_HTTP_URL`` (default ``http://127.0.0.1:8080``), so the tests point them at their own server without
editing them. The HTTP ones run against ``jobstate serve --http-port``, as ``make run`` starts it.

In a script's ``# =>`` lines (what the command above prints), ``…`` stands for text that changes from run to run
(a time), and a line starting ``#    `` goes on with the ``# =>`` line above it, after one space.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from jobstate.client import Client, job_state_name

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!-- (snippet|output of): (\S+) -->$|^<!-- (output|not run: .+) -->$")

# Each example and the test that runs it (Go: extracted and checked here, not compiled: no Go toolchain).
RUN_BY = {
    "quickstart.py": "test_python_quickstart",
    "tour.sh": "test_cli_tour",
    "watch-jq.sh": "test_watch_piped_to_jq",
    "node-client.js": "test_node_client",
    "buf-quick.sh": "test_buf_quick",
    "buf-curl.sh": "test_buf_curl_session",
    "buf-watch.sh": "test_buf_curl_session",
    "buf-watch-changes.sh": "test_buf_curl_session",
    "buf-watch-resume.sh": "test_buf_curl_session",
    "buf-watch-node.sh": "test_buf_curl_session",
    "http-curl.sh": "test_http_curl_session",
    "http-watch-curl.sh": "test_http_curl_session",
    "http-watch-buf.sh": "test_http_curl_session",
    "connect-client.ts": "test_connect_client",
    "connect-client.sh": "test_connect_client",
    "http-buf-curl.sh": "test_buf_curl_over_http",
    "go/install.sh": "test_go_install_lines",
    "go/buf.gen.yaml": "(not run: no Go toolchain here)",
    "go/main.go": "(not run: no Go toolchain here)",
}


@dataclass
class Block:
    doc: Path
    line: int
    marker: str
    text: str


def blocks() -> list[Block]:
    found = []
    for doc in DOCS:
        lines = doc.read_text().splitlines(keepends=True)
        i = 0
        while i < len(lines):
            fence = re.match(r"^(`{3,})", lines[i])
            if not fence:
                i += 1
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].rstrip() == fence.group(1))
            before = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            found.append(Block(doc, i + 1, before, "".join(lines[i + 1 : end])))
            i = end + 1
    return found


def block_of(marker: str) -> str:
    return next(b.text for b in blocks() if b.marker == marker)


def test_every_block_is_a_run_example_or_says_why_not() -> None:
    bad = [f"{b.doc.name}:{b.line}: {b.marker!r}" for b in blocks() if not MARKER.match(b.marker)]
    assert not bad, "blocks without a marker:\n" + "\n".join(bad)


def test_snippets_are_the_example_files_exactly() -> None:
    used = set()
    for b in blocks():
        m = MARKER.match(b.marker)
        assert m
        if m.group(1) == "snippet":
            path = ROOT / m.group(2)
            assert path.is_file(), f"{b.doc.name}:{b.line}: no file {m.group(2)}"
            assert b.text == path.read_text(), f"{b.doc.name}:{b.line} differs from {m.group(2)}"
            used.add(path.relative_to(EXAMPLES).as_posix())
    files = {p.relative_to(EXAMPLES).as_posix() for p in EXAMPLES.rglob("*") if p.is_file()}
    assert files == used, f"examples no document shows: {files - used}"
    assert files == set(RUN_BY), f"examples without a test: {files - set(RUN_BY)}"


def test_go_install_lines() -> None:
    """`go install A@v B@v` only works when A and B are in one module: one module per line, everywhere."""
    for doc in [*DOCS, EXAMPLES / "go" / "install.sh"]:
        for args in re.findall(r"go install ([^`\n]*)", doc.read_text()):
            assert sum("@" in arg for arg in args.split()) <= 1, f"{doc.name}: go install {args}"


# --- running them ----------------------------------------------------------------------------------------------


def env_for(target: str, http_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBSTATE_")}
    env["JOBSTATE_TARGET"] = target
    if http_url is not None:
        env["JOBSTATE_HTTP_URL"] = http_url
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `jobstate` as after activate
    return env


def run(
    args: list[str], target: str, timeout: float = 60, http_url: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=ROOT, env=env_for(target, http_url), capture_output=True, text=True, timeout=timeout, check=False
    )


class Background:
    """A long-running example (a watch) in its own process group; ``stop()`` ends the group."""

    def __init__(self, args: list[str], target: str, http_url: str | None = None) -> None:
        self.proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env=env_for(target, http_url),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self.chunks: queue.Queue[str | None] = queue.Queue()
        self.buffer = ""
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, pipe: IO[str] | None) -> None:
        assert pipe is not None
        for line in pipe:
            self.chunks.put(line)
        self.chunks.put(None)

    def _more(self, timeout: float) -> None:
        try:
            chunk = self.chunks.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"nothing more within {timeout}s; so far: {self.buffer[-500:]!r}") from None
        if chunk is None:
            raise AssertionError(f"the example ended; it printed: {self.buffer[-500:]!r}")
        self.buffer += chunk

    def line(self, timeout: float = 30) -> str:
        while "\n" not in self.buffer:
            self._more(timeout)
        line, self.buffer = self.buffer.split("\n", 1)
        return line

    def message(self, timeout: float = 30) -> Any:
        """The next JSON value (buf curl prints each message as indented JSON over several lines)."""
        decoder = json.JSONDecoder()
        while True:
            text = self.buffer.lstrip()
            if text:
                try:
                    value, end = decoder.raw_decode(text)
                except json.JSONDecodeError:
                    pass
                else:
                    self.buffer = text[end:]
                    return value
            self._more(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(10)


@pytest.fixture
def background() -> Iterator[Any]:
    started: list[Background] = []

    def start(args: list[str], target: str, http_url: str | None = None) -> Background:
        b = Background(args, target, http_url)
        started.append(b)
        return b

    yield start
    for b in started:
        b.stop()


def need(*tools: str) -> None:
    for tool in tools:
        if not (shutil.which(tool) or (ROOT / tool).exists()):
            # make test installs every one of them (node-deps, docs-deps): a missing tool is a failed check.
            pytest.fail(
                f"{tool} is not installed (make node-deps installs buf and the Node packages, docs-deps curl, jq)"
            )


def test_python_quickstart(server: Any) -> None:
    r = run([sys.executable, str(EXAMPLES / "quickstart.py")], server.target)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "lost the race; the job is at version 3"
    assert re.fullmatch(r"INITIAL [0-9a-f-]{36} QUEUED version 3 at revision 3, executions: 1 NEW", lines[1]), lines
    assert lines[2:] == ["BOOKMARK at revision 3"]


def test_cli_tour(server: Any) -> None:
    r = run(["bash", str(EXAMPLES / "tour.sh")], server.target)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("created job job-1 (NEW, version 1, revision 1)")
    assert "job job-1: COMPLETED, version 7 (revision 7)" in out
    assert "7         7        " in out  # the history's last row: revision 7, version 7
    assert out.rstrip().endswith("exit status 1")
    assert r.stderr == "error: FAILED_PRECONDITION (JOB_TERMINAL): job job-1 is COMPLETED, a final state\n"


def test_watch_piped_to_jq(server: Any, background: Any) -> None:
    need("jq")
    with Client(server.target) as c:
        c.create_job("j1")
    watch = background(["bash", str(EXAMPLES / "watch-jq.sh")], server.target)
    assert json.loads(watch.line()) == {
        "type": "WATCH_EVENT_TYPE_INITIAL",
        "revision": "1",
        "job": "j1",
        "state": "JOB_STATE_TYPE_NEW",
        "version": "1",
    }
    assert json.loads(watch.line()) == {
        "type": "WATCH_EVENT_TYPE_BOOKMARK",
        "revision": "1",
        "job": None,
        "state": None,
        "version": None,
    }
    with Client(server.target) as c:
        c.update_job_state("j1", "queued")
    assert json.loads(watch.line())["state"] == "JOB_STATE_TYPE_QUEUED"


def test_node_client(server: Any) -> None:
    need("node", "node_modules/@grpc/grpc-js", "node_modules/@grpc/proto-loader")
    r = run(["node", "docs/examples/node-client.js"], server.target)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    lines = r.stdout.splitlines()
    assert lines[0] == "created node-1 JOB_STATE_TYPE_NEW 1"
    assert sorted(lines[1:]) == [
        "WATCH_EVENT_TYPE_CREATED 1 node-1 JOB_STATE_TYPE_NEW 1",
        "WATCH_EVENT_TYPE_UPDATED 2 node-1 JOB_STATE_TYPE_QUEUED 2",
        "moved JOB_STATE_TYPE_QUEUED 2",
    ]
    # The id the snippet chose reached the server (without keepCase it was dropped and the server made a UUID).
    with Client(server.target) as c:
        assert [job.job_id for job in c.iter_jobs()] == ["node-1"]


def test_buf_quick(server: Any) -> None:
    need("node_modules/.bin/buf")
    r = run(["bash", str(EXAMPLES / "buf-quick.sh")], server.target)
    assert r.returncode == 0, r.stderr
    decoder = json.JSONDecoder()
    created, end = decoder.raw_decode(r.stdout)
    got, _ = decoder.raw_decode(r.stdout[end:].lstrip())
    assert created["job"]["jobId"] == got["job"]["jobId"] == "job-1"
    assert created["revision"] == got["revision"] == "1"


def test_buf_curl_session(server: Any, background: Any) -> None:
    """The docs' `buf curl` walk-through, in its order, on one fresh server: each `# =>` line is what the command
    above it prints; then the watch in one terminal while the changes are made in another."""
    need("node_modules/.bin/buf", "jq")
    script = EXAMPLES / "buf-curl.sh"
    r = run(["bash", str(script)], server.target, timeout=120)
    expected = [line.removeprefix("# => ") for line in script.read_text().splitlines() if line.startswith("# => ")]
    assert r.stdout.splitlines() == expected, r.stderr

    watch = background(["bash", str(EXAMPLES / "buf-watch.sh")], server.target)
    lines = [watch.line(), watch.line()]
    assert json.loads(lines[-1])["type"] == "WATCH_EVENT_TYPE_BOOKMARK"
    changes = run(["bash", str(EXAMPLES / "buf-watch-changes.sh")], server.target)
    assert changes.returncode == 0, changes.stderr
    lines += [watch.line() for _ in range(3)]
    assert lines == block_of("<!-- output of: docs/examples/buf-watch.sh -->").splitlines()

    resumed = background(["bash", str(EXAMPLES / "buf-watch-resume.sh")], server.target)
    events = []
    while len(events) < 3:
        events += resumed.message()["events"]
    assert [(e["type"], e["revision"]) for e in events] == [
        ("WATCH_EVENT_TYPE_CREATED", "6"),
        ("WATCH_EVENT_TYPE_UPDATED", "7"),
        ("WATCH_EVENT_TYPE_DELETED", "8"),
    ]

    node = background(["bash", str(EXAMPLES / "buf-watch-node.sh")], server.target)
    events = []
    while not events or events[-1]["type"] != "WATCH_EVENT_TYPE_BOOKMARK":
        events += node.message()["events"]
    assert [(e["type"], e.get("job", {}).get("jobId")) for e in events] == [
        ("WATCH_EVENT_TYPE_INITIAL", "job-1"),
        ("WATCH_EVENT_TYPE_BOOKMARK", None),
    ]


def test_the_live_view_shown_uses_the_cli_state_names() -> None:
    from jobstate.client import core

    frame = next(b.text for b in blocks() if b.marker == "<!-- output -->" and b.text.startswith("jobstate watch"))
    rows = [line for line in frame.splitlines() if "ago  " in line]
    assert rows
    for row in rows:
        words = row.split("ago  ", 1)[1].split()
        if words != ["-"]:
            for name in words[1::2]:
                assert core.execution_state(name), row


# --- over HTTP, against `jobstate serve --http-port` ------------------------------------------------------------


@dataclass
class Served:
    target: str
    http_url: str


@pytest.fixture
def served() -> Iterator[Served]:
    """`jobstate serve --port 0 --http-port 0` as a user runs it; its addresses come from its start-up line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobstate", "serve", "--port", "0", "--http-port", "0"],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("JOBSTATE_")},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read(pipe: IO[str] | None) -> None:  # drains the log for as long as the server runs
        assert pipe is not None
        for line in pipe:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, args=(proc.stdout,), daemon=True).start()
    try:
        while True:
            line = lines.get(timeout=60)
            assert line is not None, "jobstate serve ended before it served"
            m = re.search(r" serving address=(\S+) .*http_address=(\S+)", line)
            if m:
                break
        yield Served(m.group(1), m.group(2))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Frames:
    """Raw Connect streaming on an example's stdout: each message is a flags byte, its length (4 bytes,
    big-endian), then its JSON."""

    def __init__(self, args: list[str], http_url: str) -> None:
        self.proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env=env_for("", http_url),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.chunks: queue.Queue[bytes | None] = queue.Queue()
        self.buffer = b""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(65536):
            self.chunks.put(chunk)
        self.chunks.put(None)

    def message(self, timeout: float = 30) -> tuple[int, Any]:
        """The next message's flags and JSON."""
        while len(self.buffer) < 5 or len(self.buffer) < 5 + int.from_bytes(self.buffer[1:5], "big"):
            try:
                chunk = self.chunks.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no whole message within {timeout}s; so far: {self.buffer!r}") from None
            if chunk is None:
                raise AssertionError(f"the example ended; it printed: {self.buffer!r}")
            self.buffer += chunk
        size = int.from_bytes(self.buffer[1:5], "big")
        flags, body, self.buffer = self.buffer[0], self.buffer[5 : 5 + size], self.buffer[5 + size :]
        return flags, json.loads(body)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(10)


def expected_output(script: Path) -> list[str]:
    """A script's `# =>` lines, each with the `#    ` lines that go on with it."""
    out: list[str] = []
    going_on = False
    for line in script.read_text().splitlines():
        if line.startswith("# => "):
            out.append(line.removeprefix("# => "))
            going_on = True
        elif going_on and line.startswith("#    "):
            out[-1] += " " + line.removeprefix("#    ")
        else:
            going_on = False
    return out


def assert_prints(expected: list[str], got: list[str]) -> None:
    """``…`` in an expected line stands for any text within one JSON string (a time)."""
    patterns = [re.escape(line).replace("…", '[^"]*') for line in expected]
    bad = [(e, g) for e, p, g in zip(expected, patterns, got, strict=False) if not re.fullmatch(p, g)]
    assert not bad, "\n".join(f"expected {e}\n     got {g}" for e, g in bad)
    assert len(got) == len(expected), f"expected {len(expected)} lines, got {got}"


def summary(events: list[Any]) -> list[tuple[str, str | None]]:
    return [(e["type"].removeprefix("WATCH_EVENT_TYPE_"), e.get("job", {}).get("jobId")) for e in events]


def test_http_curl_session(served: Served, background: Any) -> None:
    """The README's curl calls over HTTP in their order on one fresh `jobstate serve`: each `# =>` line is what
    the command above it prints. Then both Watch examples, raw curl and buf curl, while a job is created."""
    need("curl", "jq", "node_modules/.bin/buf")
    script = EXAMPLES / "http-curl.sh"
    r = run(["bash", str(script)], served.target, http_url=served.http_url)
    assert r.returncode == 0, r.stderr
    assert_prints(expected_output(script), r.stdout.splitlines())
    with Client(served.target) as c:  # the refused calls changed nothing
        got = c.get_job("job-1")
        assert (got.job.version, got.revision) == (2, 2)

    raw = Frames(["bash", str(EXAMPLES / "http-watch-curl.sh")], served.http_url)
    try:
        events: list[Any] = []
        while not events or events[-1]["type"] != "WATCH_EVENT_TYPE_BOOKMARK":
            flags, msg = raw.message()
            assert flags == 0, msg  # a message, not the stream's end
            events += msg["events"]
        assert summary(events) == [("INITIAL", "job-1"), ("BOOKMARK", None)]

        watch = background(["bash", str(EXAMPLES / "http-watch-buf.sh")], served.target, served.http_url)
        lines = [watch.line(), watch.line()]
        assert json.loads(lines[-1])["type"] == "WATCH_EVENT_TYPE_BOOKMARK"
        created = subprocess.run(
            [
                *("curl", "-s", "-H", "content-type: application/json", "-d", '{"jobId": "job-2"}'),
                f"{served.http_url}/jobstate.v1.JobStateService/CreateJob",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert json.loads(created.stdout)["revision"] == "3"
        lines.append(watch.line())
        assert lines == block_of("<!-- output of: docs/examples/http-watch-buf.sh -->").splitlines()

        flags, msg = raw.message()
        assert flags == 0, msg
        assert [(e["type"], e["revision"], e["job"]["jobId"]) for e in msg["events"]] == [
            ("WATCH_EVENT_TYPE_CREATED", "3", "job-2")
        ]
    finally:
        raw.stop()


def test_connect_client(served: Served) -> None:
    """The TypeScript Connect client, bundled by esbuild and run by node as the README says."""
    need("node", "node_modules/.bin/esbuild", "node_modules/@connectrpc/connect-node")
    r = run(["bash", str(EXAMPLES / "connect-client.sh")], served.target, timeout=120, http_url=served.http_url)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert r.stdout.splitlines() == block_of("<!-- output of: docs/examples/connect-client.sh -->").splitlines()
    with Client(served.target) as c:  # what it did is in the store, seen over gRPC
        job = c.get_job("ts-1").job
        assert (job_state_name(job.state), job.version) == ("QUEUED", 2)


def test_buf_curl_over_http(served: Served, background: Any) -> None:
    """`buf curl` against the HTTP port with the schema from protos/: Connect, gRPC-Web, and a Connect Watch."""
    need("node_modules/.bin/buf")
    calls = background(["bash", str(EXAMPLES / "http-buf-curl.sh")], served.target, served.http_url)
    created, got = calls.message(), calls.message()
    assert created["job"]["jobId"] == got["job"]["jobId"] == "job-9"
    assert created["revision"] == got["revision"] == "1"
    events: list[Any] = []
    while not events or events[-1]["type"] != "WATCH_EVENT_TYPE_BOOKMARK":
        events += calls.message()["events"]
    assert summary(events) == [("INITIAL", "job-9"), ("BOOKMARK", None)]
