"""The ``jobstate`` command's security and limit flags, end to end: the real command as a subprocess
(``python -m jobstate``) against ``jobstate serve`` started with those flags. Every process is bounded in time
and killed after its test."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from pki import PKI
from secutil import TOKENS, client_env, free_port, wait_healthy

CLI = [sys.executable, "-m", "jobstate"]
RUN_TIMEOUT = 60.0


def env(**extra: str) -> dict[str, str]:
    """The child's environment, without a token or target the developer may have exported."""
    e = {k: v for k, v in client_env().items() if k not in ("JOBSTATE_TOKEN", "JOBSTATE_TARGET")}
    return {**e, **extra}


@dataclass
class Result:
    code: int
    out: str
    err: str


def jobstate(*args: str, **env_extra: str) -> Result:
    p = subprocess.run(
        [*CLI, "--timeout", "5s", *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=env(**env_extra),
        stdin=subprocess.DEVNULL,
        check=False,
    )
    return Result(p.returncode, p.stdout, p.stderr)


class Serve:
    """``jobstate serve ARGS --port P`` until the test ends."""

    def __init__(self, log: Path, *args: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [*CLI, "serve", "--port", str(self.port), "--grace", "1s", *args],
            env=env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_healthy(self.target, credentials)
        except BaseException:
            self.kill()
            raise

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self._log.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[type[Serve]]:
    started: list[Serve] = []

    class Tracked(Serve):
        def __init__(self, *args: str, credentials: grpc.ChannelCredentials | None = None) -> None:
            started.append(self)
            super().__init__(tmp_path / f"serve-{len(started)}.log", *args, credentials=credentials)

    try:
        yield Tracked
    finally:
        for s in started:
            s.kill()


def tls_credentials(pki: PKI) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())


def test_tls_and_tokens_through_the_cli(serve: type[Serve], pki: PKI, tokens_file: Path) -> None:
    server = serve(
        "--tls-cert",
        str(pki.server.cert),
        "--tls-key",
        str(pki.server.key),
        "--auth-tokens",
        str(tokens_file),
        credentials=tls_credentials(pki),
    )
    tls = ["--target", server.target, "--tls-ca", str(pki.ca)]

    r = jobstate(*tls, "--token", TOKENS["writer"], "create", "j1")
    assert r.code == 0, r.err
    assert "created job j1" in r.out
    r = jobstate(*tls, "--token", TOKENS["reader"], "get", "j1", "--output", "json")
    assert r.code == 0, r.err
    assert '"jobId": "j1"' in r.out

    # A reader may not write; the server says which role it lacks.
    r = jobstate(*tls, "--token", TOKENS["reader"], "create", "j2")
    assert r.code == 1
    assert "PERMISSION_DENIED" in r.err

    # No token at all, and one the server does not know.
    r = jobstate(*tls, "get", "j1")
    assert r.code == 1
    assert "UNAUTHENTICATED" in r.err
    r = jobstate(*tls, "--token", "not-a-known-token-at-all", "get", "j1")
    assert r.code == 1
    assert "UNAUTHENTICATED" in r.err

    # The token from the environment, and the options after the subcommand too.
    r = jobstate("create", "j3", *tls, JOBSTATE_TOKEN=TOKENS["writer"])
    assert r.code == 0, r.err
    r = jobstate(*tls, "list", "--output", "json", JOBSTATE_TOKEN=TOKENS["reader"])
    assert r.code == 0, r.err
    assert '"j1"' in r.out
    assert '"j3"' in r.out
    assert '"j2"' not in r.out

    # Plaintext to the TLS port never gets an answer.
    r = jobstate("--target", server.target, "--token", TOKENS["writer"], "create", "plain")
    assert r.code == 1
    assert "UNAVAILABLE" in r.err
    # ... and the CLI says what to try, since grpc only says the socket closed.
    assert f"hint: the server at {server.target} may require TLS: give --tls-ca FILE" in r.err, r.err
    # Refusals are logged, tokens never.
    log = server.log()
    assert "reason=PERMISSION_DENIED" in log
    assert "reason=UNAUTHENTICATED" in log
    for token in TOKENS.values():
        assert token not in log


def test_mtls_through_the_cli(serve: type[Serve], pki: PKI, tokens_file: Path) -> None:
    client_cert = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=pki.client.key.read_bytes(),
        certificate_chain=pki.client.cert.read_bytes(),
    )
    server = serve(
        "--tls-cert",
        str(pki.server.cert),
        "--tls-key",
        str(pki.server.key),
        "--tls-client-ca",
        str(pki.ca),
        "--auth-tokens",
        str(tokens_file),
        credentials=client_cert,
    )
    tls = ["--target", server.target, "--tls-ca", str(pki.ca)]
    # client-a's certificate is a reader by the tokens file's "cert:client-a reader" line.
    cert_a = ["--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)]

    r = jobstate(*tls, *cert_a, "--token", TOKENS["writer"], "create", "j1")
    assert r.code == 0, r.err
    r = jobstate(*tls, *cert_a, "get", "j1")
    assert r.code == 0, r.err
    r = jobstate(*tls, *cert_a, "create", "j2")
    assert r.code == 1
    assert "PERMISSION_DENIED" in r.err
    # Without a certificate the handshake fails: no call is made.
    r = jobstate(*tls, "--token", TOKENS["writer"], "create", "j3")
    assert r.code == 1
    assert "UNAVAILABLE" in r.err
    assert f"hint: the server at {server.target} may require a client certificate (mTLS): give --tls-cert" in r.err


def test_tls_client_to_a_plaintext_server_gets_a_hint(serve: type[Serve], pki: PKI) -> None:
    server = serve()
    r = jobstate("--target", server.target, "--tls-ca", str(pki.ca), "get", "j1")
    assert r.code == 1
    assert f"hint: the server at {server.target} does not use TLS: leave out --tls-ca" in r.err, r.err


def test_serve_refuses_plaintext_on_all_interfaces(tmp_path: Path) -> None:
    p = subprocess.run(
        [*CLI, "serve", "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=env(),
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert p.returncode != 0
    assert "refusing to serve plaintext on 0.0.0.0" in p.stderr
    assert "--insecure" in p.stderr


def test_serve_insecure_on_all_interfaces_starts_and_stops(tmp_path: Path) -> None:
    port = free_port()
    with (tmp_path / "serve.log").open("wb") as log:
        proc = subprocess.Popen(
            [*CLI, "serve", "--host", "0.0.0.0", "--port", str(port), "--insecure", "--grace", "1s"],
            env=env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_healthy(f"127.0.0.1:{port}")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def test_max_jobs_through_the_cli(serve: type[Serve]) -> None:
    server = serve(
        "--max-jobs", "2", "--max-jobs-per-client", "0", "--write-rate", "1000", "--max-watchers-per-client", "5"
    )
    target = ["--target", server.target]
    assert jobstate(*target, "create", "a").code == 0
    assert jobstate(*target, "create", "b").code == 0
    r = jobstate(*target, "create", "c")
    assert r.code == 1
    assert "RESOURCE_EXHAUSTED" in r.err
    assert "LIMIT_EXCEEDED" in r.err
    # Deleting one makes room again.
    assert jobstate(*target, "delete", "a").code == 0
    assert jobstate(*target, "create", "c").code == 0


def test_client_tls_options_that_cannot_work_are_usage_errors(tmp_path: Path, pki: PKI) -> None:
    r = jobstate("--tls-ca", str(tmp_path / "missing.pem"), "get", "j")
    assert r.code == 2
    assert "missing.pem" in r.err
    r = jobstate("--tls-ca", str(pki.ca), "--tls-cert", str(pki.client.cert), "get", "j")
    assert r.code == 2
    assert "tls_key" in r.err


def test_serve_flags_that_cannot_work(pki: PKI) -> None:
    for args, message in (
        (["--tls-cert", str(pki.server.cert)], "--tls-key"),
        (["--tls-client-ca", str(pki.ca)], "--tls-cert"),
        (["--max-executions-per-job", "0"], "must be 1 or more"),
        (["--write-rate", "-1"], "must be 0 or more"),
    ):
        p = subprocess.run(
            [*CLI, "serve", "--port", str(free_port()), *args],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            env=env(),
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert p.returncode != 0, args
        assert message in p.stderr, (args, p.stderr)
