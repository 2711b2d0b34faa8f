"""Hostile clients (issue 13): what one client can cost the server and the others, and what reaches the log.

Each test here failed on the server before the fix it names: TLS without client authentication on a public
address, a token echoed from a broken tokens file, a flood of refusals written line by line, global limits
taken by one client, unmetered reads, uncounted health watches.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from pki import PKI
from secutil import TOKENS, client_env, free_port, wait_for

from jobstate.server.main import ServerConfig, check_transport

CLI = [sys.executable, "-m", "jobstate"]
RUN_TIMEOUT = 60.0


def serve_once(*args: str) -> subprocess.CompletedProcess[str]:
    """``jobstate serve ARGS`` expected to refuse to start: it must exit by itself."""
    env = {k: v for k, v in client_env().items() if k not in ("JOBSTATE_TOKEN", "JOBSTATE_TARGET")}
    return subprocess.run(
        [*CLI, "serve", "--port", str(free_port()), "--grace", "1s", *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


# --- item 5: TLS alone does not say who may call ------------------------------------------------------------


def test_tls_without_client_authentication_on_a_public_address_is_refused(pki: PKI) -> None:
    tls = ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)]
    p = serve_once("--host", "0.0.0.0", *tls)
    assert p.returncode == 1, p.stderr
    assert "refusing to serve 0.0.0.0 with TLS but no client authentication" in p.stderr
    for flag in ("--auth-tokens", "--tls-client-ca", "--insecure"):
        assert flag in p.stderr
    # Each way of saying who may call is accepted (checked without binding: tests stay on loopback).
    base = ServerConfig(host="0.0.0.0", tls_cert=str(pki.server.cert), tls_key=str(pki.server.key))
    for extra in ({"auth_tokens_file": "tokens"}, {"tls_client_ca": str(pki.ca)}, {"insecure": True}):
        assert check_transport(ServerConfig(**{**base.__dict__, **extra})) is not None
    # On loopback, TLS alone is still fine (a local proxy or sidecar in front).
    assert check_transport(ServerConfig(tls_cert=str(pki.server.cert), tls_key=str(pki.server.key))) is not None


# --- item 10: a broken tokens file never echoes a token -----------------------------------------------------

SWAPPED = "swp-TOKEN-7f3a9c1e5b2d8046"


def swapped_tokens_text() -> str:
    """A tokens file whose second line has its columns swapped: the token sits where the role should be."""
    return f"{TOKENS['admin']} admin ops\nadmin {SWAPPED} ops2\n"


def test_a_swapped_tokens_line_at_start_names_the_line_not_the_token(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(swapped_tokens_text())
    tokens.chmod(0o600)
    p = serve_once("--auth-tokens", str(tokens))
    assert p.returncode == 1
    assert "line 2" in p.stderr
    for secret in (SWAPPED, TOKENS["admin"]):
        assert secret not in p.stderr + p.stdout
        assert secret[:12] not in p.stderr + p.stdout


def test_a_swapped_tokens_line_on_sighup_names_the_line_not_the_token(server_process: Any, tokens_file: Path) -> None:
    server = server_process(auth_tokens_file=str(tokens_file))
    tokens_file.write_text(swapped_tokens_text())
    server.signal(signal.SIGHUP)
    wait_for(lambda: "tokens file not reloaded" in server.log(), what="the reload's refusal in the log")
    log = server.log()
    assert "line 2" in log
    assert SWAPPED not in log
    assert SWAPPED[:12] not in log
