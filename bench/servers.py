"""Starting and stopping the servers under test, each as its own process on free loopback ports."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def ensure_etcd() -> str:
    """The etcd binary, installed from Debian's etcd-server package when it is missing."""
    path = shutil.which("etcd")
    if path:
        return path
    print("etcd not found: installing Debian's etcd-server", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=300)
    subprocess.run(["apt-get", "install", "-y", "-qq", "etcd-server"], check=True, env=env, timeout=600)
    path = shutil.which("etcd")
    if not path:
        raise RuntimeError("etcd-server installed but no etcd binary on PATH")
    return path


def etcd_version() -> str:
    out = subprocess.run([ensure_etcd(), "--version"], capture_output=True, text=True, timeout=30).stdout
    return out.splitlines()[0].removeprefix("etcd Version: ").strip() if out else "?"


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {HOST}:{port} after {timeout}s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def filesystem_of(path: str) -> str:
    """The type and device of the filesystem holding ``path`` (from /proc/mounts), e.g. "ext4 on /dev/vda"."""
    real = os.path.realpath(path)
    best, desc = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, desc = mnt, f"{fstype} on {dev}"
    return desc


# The sqlite engine's data dir: under /tmp, as a user's would be on a disk (not /dev/shm): its fsyncs are the
# cost of durability. The table's header says which filesystem /tmp is.
SQLITE_BASE = "/tmp" if os.path.isdir("/tmp") else None


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class Server:
    """A server under test: its process, and the processes it needs (jobstate on etcd: its etcd)."""

    def __init__(
        self,
        name: str,
        proc: subprocess.Popen[bytes],
        target: str,
        helpers: tuple[int, ...] = (),
        data_dir: Path | None = None,
        http_url: str = "",
    ) -> None:
        self.http_url = http_url  # the HTTP listener's base URL, when started with one
        self.name = name
        self.proc = proc
        self.target = target
        self.helpers = helpers
        self.data_dir = data_dir

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def pids(self) -> tuple[int, ...]:
        """The server's process and its helpers': what a user runs, so CPU and memory count all of them."""
        return (self.proc.pid, *self.helpers)

    def rss(self) -> int:
        return sum(rss_bytes(p) for p in self.pids)

    def disk(self) -> int | None:
        return dir_bytes(self.data_dir) if self.data_dir else None


@contextlib.contextmanager
def jobstate_server(
    history_size: int, uvloop: bool = False, source: Path | None = None, store: str = "memory", http: bool = False
) -> Iterator[Server]:
    """The server as ``jobstate serve`` starts it; from ``source`` (an exported tree) instead of this one if set.

    ``store``: ``memory``; ``sqlite`` in a fresh data dir under ``SQLITE_BASE``, removed after; ``etcd`` on a
    fresh etcd of its own (started as for the etcd rows), stopped after."""
    with contextlib.ExitStack() as stack:
        helpers: tuple[int, ...] = ()
        data_dir: Path | None = None
        engine: list[str] = []
        if store == "sqlite":
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-sqlite-", dir=SQLITE_BASE)))
            engine = ["--store", "sqlite", "--data-dir", str(data_dir)]
        elif store == "etcd":
            etcd = stack.enter_context(etcd_server())
            helpers = (etcd.pid,)
            engine = ["--store", "etcd", "--etcd-endpoints", f"http://{etcd.target}", "--etcd-prefix", "/jobstate"]
        elif store != "memory":
            raise ValueError(f"unknown store {store!r}")
        port = free_port()
        env = dict(os.environ)
        if source is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(source / d) for d in ("server", "client", "gen")] + [str(REPO)])
        args = ["--host", HOST, "--port", str(port), "--history-size", str(history_size), *engine]
        http_port = free_port() if http else 0
        if http:
            args += ["--http-port", str(http_port)]
        # The harness's own launcher installs uvloop's event loop before the server starts; otherwise the
        # server runs exactly as a user starts it.
        module = ["-m", "bench.uvserve"] if uvloop else ["-m", "jobstate", "serve"]
        log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in finally, after the server stops
        proc = subprocess.Popen([sys.executable, *module, *args], cwd=REPO, stdout=log, stderr=log, env=env)
        try:
            _wait_port(port, proc)
            if http:
                _wait_port(http_port, proc)
            name = "jobstate" if store == "memory" else f"jobstate-{store}"
            yield Server(name, proc, f"{HOST}:{port}", helpers, data_dir, f"http://{HOST}:{http_port}" if http else "")
        finally:
            _stop(proc)
            if proc.returncode not in (0, -signal.SIGTERM):
                log.seek(0)
                sys.stderr.write(log.read()[-4000:].decode(errors="replace"))
            log.close()


@contextlib.contextmanager
def etcd_server() -> Iterator[Server]:
    etcd = ensure_etcd()
    client, peer = free_port(), free_port()
    # The data dir is in memory (tmpfs) when the machine has one: jobstate keeps everything in memory, so
    # etcd's fsync on a disk would measure the disk, not the server.
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="bench-etcd-", dir=base) as data:
        log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in finally, after the server stops
        proc = subprocess.Popen(
            [
                etcd,
                "--name=bench",
                f"--data-dir={data}",
                f"--listen-client-urls=http://{HOST}:{client}",
                f"--advertise-client-urls=http://{HOST}:{client}",
                f"--listen-peer-urls=http://{HOST}:{peer}",
                f"--initial-advertise-peer-urls=http://{HOST}:{peer}",
                f"--initial-cluster=bench=http://{HOST}:{peer}",
                "--quota-backend-bytes=8589934592",
                # A job may be 2 MiB (the size limit); the jobstate-on-etcd rows and bench.amplification need it.
                "--max-request-bytes=8388608",
                "--log-level=warn",
            ],
            stdout=log,
            stderr=log,
        )
        try:
            _wait_port(client, proc)
            yield Server("etcd", proc, f"{HOST}:{client}")
        finally:
            _stop(proc)
            log.close()


@contextlib.contextmanager
def exported(rev: str) -> Iterator[Path]:
    """The server, client and stubs of git revision ``rev``, exported to a temp dir (to measure a commit while
    the work tree changes)."""
    with tempfile.TemporaryDirectory(prefix="bench-src-") as d:
        archive = subprocess.run(
            ["git", "archive", rev, "server", "client", "gen"], cwd=REPO, check=True, capture_output=True, timeout=60
        ).stdout
        subprocess.run(["tar", "-x", "-C", d], input=archive, check=True, timeout=60)
        yield Path(d)
