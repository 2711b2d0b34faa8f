"""Both Python clients over TLS and mTLS with a token: the options, $JOBSTATE_TOKEN, and refusals mapped to
the client's exception classes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pki import PKI
from secutil import TOKENS

from jobstate.client import AsyncClient, Client
from jobstate.client.errors import PermissionDenied, Unauthenticated, Unavailable


def mtls_server(make_server: Any, pki: PKI, tokens_file: Path) -> Any:
    return make_server(
        tls_cert=str(pki.server.cert),
        tls_key=str(pki.server.key),
        tls_client_ca=str(pki.ca),
        auth_tokens_file=str(tokens_file),
    )


def test_sync_client_tls_options_and_token(
    make_server: Any, pki: PKI, tokens_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JOBSTATE_TOKEN", raising=False)
    server = mtls_server(make_server, pki, tokens_file)
    tls = {"tls_ca": str(pki.ca), "tls_cert": str(pki.other_client.cert), "tls_key": str(pki.other_client.key)}
    with Client(server.target, token=TOKENS["writer"], **tls) as c:
        assert c.create_job("j1").job.version == 1
    # client-b's certificate has no role of its own: without a token it is refused.
    with Client(server.target, **tls) as c, pytest.raises(Unauthenticated):
        c.get_job("j1")
    monkeypatch.setenv("JOBSTATE_TOKEN", TOKENS["reader"])
    with Client(server.target, **tls) as c:
        assert c.get_job("j1").job.job_id == "j1"
        with pytest.raises(PermissionDenied):
            c.create_job("j2")
    # An explicit empty token sends none, whatever the environment says.
    with Client(server.target, token="", **tls) as c, pytest.raises(Unauthenticated):
        c.get_job("j1")
    # No client certificate: the TLS handshake fails, which a client sees as UNAVAILABLE.
    no_cert = Client(server.target, tls_ca=str(pki.ca), token=TOKENS["admin"], read_attempts=1)
    with no_cert as c, pytest.raises(Unavailable):
        c.get_job("j1")


async def test_async_client_tls_options_and_token(
    make_server: Any, pki: PKI, tokens_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JOBSTATE_TOKEN", raising=False)
    server = mtls_server(make_server, pki, tokens_file)
    tls = {"tls_ca": str(pki.ca), "tls_cert": str(pki.client.cert), "tls_key": str(pki.client.key)}
    # client-a's certificate maps to a reader: it may watch without a token.
    async with (
        AsyncClient(server.target, token=TOKENS["writer"], **tls) as writer,
        AsyncClient(server.target, **tls) as reader,
    ):
        stream = reader.watch(start_revision=1)
        created = await writer.create_job("j1")
        async for event in stream:
            assert event.job.job_id == "j1"
            assert event.revision == created.revision
            break
        stream.close()
        with pytest.raises(PermissionDenied):
            await reader.create_job("j2")


def test_half_a_client_key_pair_is_refused(pki: PKI) -> None:
    with pytest.raises(ValueError, match="tls_key"):
        Client("127.0.0.1:1", tls_cert=str(pki.client.cert))
