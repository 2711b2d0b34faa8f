"""`jobstate serve --http-port 0` as a user runs it: the start-up line names the HTTP address, the CORS and Host
flags take effect, and the process's
signals stay the server's own (the HTTP server installs none): SIGHUP reloads the tokens file (a new token works
over HTTP at once), SIGTERM ends an open HTTP Watch with unavailable / SHUTTING_DOWN and the process exits 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from connectutil import error_info, open_stream, unary

from jobstate.v1 import job_state_service_pb2 as spb

FIRST = "first-token-0123456789"
LATER = "later-token-0123456789"


def test_serve_with_http_signals_and_shutdown(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{FIRST} writer\n")
    tokens.chmod(0o600)
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "jobstate", "serve", "--port", "0", "--http-port", "0", "--grace", "2"),
                *("--auth-tokens", str(tokens)),
                *("--cors-origin", "https://app.example", "--http-allowed-host", "jobs.example"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        found = threading.Event()
        url: list[str] = []

        def follow() -> None:
            # Reads the log as it grows until the start-up line appears (or the process ends).
            with log.open("rb") as f:
                while proc.poll() is None and not found.is_set():
                    line = f.readline().decode()
                    if not line:
                        found.wait(0.02)
                        continue
                    m = re.search(r" serving .*http_address=(http://\S+)", line)
                    if m:
                        url.append(m.group(1))
                        found.set()

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        reader.join(30)
        assert url, f"no start-up line with http_address:\n{log.read_text()}"
        first, later = ({"authorization": f"Bearer {t}"} for t in (FIRST, LATER))
        with httpx.Client(base_url=url[0], timeout=30) as client:
            assert unary(client, "CreateJob", {"jobId": "p"}, headers=first).status_code == 200
            assert unary(client, "GetJob", {"jobId": "p"}, headers=later).status_code == 401
            # The CLI's CORS and Host flags reach the listener.
            preflight = client.options(
                "/jobstate.v1.JobStateService/GetJob",
                headers={"origin": "https://app.example", "access-control-request-method": "POST"},
            )
            assert preflight.status_code == 204
            assert preflight.headers["access-control-allow-origin"] == "https://app.example"
            for host, status in (("jobs.example", 200), ("other.example", 403)):
                assert unary(client, "GetJob", {"jobId": "p"}, headers={**first, "host": host}).status_code == status
            tokens.write_text(f"{FIRST} writer\n{LATER} reader\n")
            os.kill(proc.pid, signal.SIGHUP)
            deadline = time.monotonic() + 20
            while unary(client, "GetJob", {"jobId": "p"}, headers=later).status_code != 200:
                assert time.monotonic() < deadline, "SIGHUP did not reload the tokens"
                time.sleep(0.02)
            assert proc.poll() is None
            with open_stream(client, "Watch", spb.WatchRequest(send_initial_state=True), headers=later) as s:
                assert s.next() is not None
                proc.send_signal(signal.SIGTERM)
                err = s.error()
        assert err is not None
        assert err["code"] == "unavailable"
        assert error_info(err).reason == "SHUTTING_DOWN"
        assert proc.wait(30) == 0, log.read_text()
        assert "stopped" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
