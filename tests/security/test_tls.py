"""Transport security: TLS only when configured, mTLS refuses clients without a trusted certificate, and the
server refuses plaintext on a non-loopback address."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from pki import CA, PKI
from secutil import TOKENS, bearer, wait_for

from jobstate.server.main import ServerConfig, build_server, check_transport
from jobstate.v1 import job_state_service_pb2 as spb
from jobstate.v1 import job_state_service_pb2_grpc as spb_grpc

CALL_TIMEOUT = 5


def tls_config(pki: PKI, *, mtls: bool = False, **extra: Any) -> dict[str, Any]:
    return {
        "tls_cert": str(pki.server.cert),
        "tls_key": str(pki.server.key),
        "tls_client_ca": str(pki.ca) if mtls else None,
        **extra,
    }


def creds(pki: PKI, client: Any = None, ca: Path | None = None) -> grpc.ChannelCredentials:
    cert, key = client.read() if client is not None else (None, None)
    return grpc.ssl_channel_credentials((ca or pki.ca).read_bytes(), private_key=key, certificate_chain=cert)


def list_jobs(channel: grpc.Channel, metadata: Any = ()) -> spb.ListJobsResponse:
    return spb_grpc.JobStateServiceStub(channel).ListJobs(
        spb.ListJobsRequest(), timeout=CALL_TIMEOUT, metadata=metadata
    )


def code_of(fn: Callable[[], object]) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_tls_server_serves_tls_and_refuses_plaintext(make_server: Any, pki: PKI) -> None:
    server = make_server(**tls_config(pki))
    with grpc.secure_channel(server.target, creds(pki)) as channel:
        assert list_jobs(channel).revision == 0
    with grpc.insecure_channel(server.target) as channel:
        assert code_of(lambda: list_jobs(channel)) == grpc.StatusCode.UNAVAILABLE


def test_client_that_does_not_trust_the_server_ca_fails(make_server: Any, pki: PKI) -> None:
    server = make_server(**tls_config(pki))
    with grpc.secure_channel(server.target, creds(pki, ca=pki.stranger_ca)) as channel:
        assert code_of(lambda: list_jobs(channel)) == grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_clients_without_a_trusted_certificate(make_server: Any, pki: PKI) -> None:
    server = make_server(**tls_config(pki, mtls=True))
    with grpc.secure_channel(server.target, creds(pki)) as channel:
        assert code_of(lambda: list_jobs(channel)) == grpc.StatusCode.UNAVAILABLE
    with grpc.secure_channel(server.target, creds(pki, pki.stranger)) as channel:
        assert code_of(lambda: list_jobs(channel)) == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(server.target) as channel:
        assert code_of(lambda: list_jobs(channel)) == grpc.StatusCode.UNAVAILABLE
    with grpc.secure_channel(server.target, creds(pki, pki.client)) as channel:
        assert list_jobs(channel).revision == 0


def test_mtls_certificate_subject_maps_to_a_role(make_server: Any, pki: PKI, tokens_file: Path) -> None:
    # The tokens file says "cert:client-a reader"; client-b has a valid certificate but no role.
    server = make_server(**tls_config(pki, mtls=True, auth_tokens_file=str(tokens_file)))
    with grpc.secure_channel(server.target, creds(pki, pki.client)) as channel:
        stub = spb_grpc.JobStateServiceStub(channel)
        assert list_jobs(channel).revision == 0
        denied = code_of(lambda: stub.CreateJob(spb.CreateJobRequest(job_id="j"), timeout=CALL_TIMEOUT))
        assert denied == grpc.StatusCode.PERMISSION_DENIED
        # A token, when given, decides: the writer's token lets the same connection write.
        stub.CreateJob(spb.CreateJobRequest(job_id="j"), timeout=CALL_TIMEOUT, metadata=bearer(TOKENS["writer"]))
    with grpc.secure_channel(server.target, creds(pki, pki.other_client)) as channel:
        assert code_of(lambda: list_jobs(channel)) == grpc.StatusCode.UNAUTHENTICATED
        assert list_jobs(channel, bearer(TOKENS["reader"])).revision == 1


def test_mtls_without_tokens_lets_every_verified_client_in(make_server: Any, pki: PKI) -> None:
    server = make_server(**tls_config(pki, mtls=True, max_watchers_per_client=5))
    with grpc.secure_channel(server.target, creds(pki, pki.other_client)) as channel:
        stub = spb_grpc.JobStateServiceStub(channel)
        assert stub.CreateJob(spb.CreateJobRequest(job_id="j"), timeout=CALL_TIMEOUT).revision == 1


def test_plaintext_on_a_non_loopback_address_is_refused(pki: PKI) -> None:
    with pytest.raises(ValueError, match="--insecure"):
        build_server(ServerConfig(host="0.0.0.0", port=0))
    with pytest.raises(ValueError, match="--insecure"):
        check_transport(ServerConfig(host="::"))
    # Accepted, and so not refused: loopback, an explicit --insecure, or TLS (no bind here: tests stay on loopback).
    assert check_transport(ServerConfig(host="127.0.0.1")) is None
    assert check_transport(ServerConfig(host="localhost")) is None
    assert check_transport(ServerConfig(host="0.0.0.0", insecure=True)) is None
    tls = ServerConfig(
        host="0.0.0.0", tls_cert=str(pki.server.cert), tls_key=str(pki.server.key), tls_client_ca=str(pki.ca)
    )
    files = check_transport(tls)
    assert files is not None
    assert isinstance(files.credentials(), grpc.ServerCredentials)


def test_half_a_tls_configuration_is_refused(pki: PKI) -> None:
    with pytest.raises(ValueError, match="--tls-key"):
        check_transport(ServerConfig(tls_cert=str(pki.server.cert)))
    with pytest.raises(ValueError, match="--tls-cert"):
        check_transport(ServerConfig(tls_client_ca=str(pki.ca)))


def test_sighup_reloads_the_tls_files_for_new_connections(server_process: Any, pki: PKI, tmp_path: Path) -> None:
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(pki.server.cert.read_bytes())
    key.write_bytes(pki.server.key.read_bytes())
    server = server_process(credentials=creds(pki), tls_cert=str(cert), tls_key=str(key))
    renewed_ca = CA(tmp_path, "renewed-ca")
    renewed = renewed_ca.issue("jobstate-server-renewed", server=True)
    with grpc.secure_channel(server.target, creds(pki)) as before:
        assert list_jobs(before).revision == 0
        # Half a renewal (the new certificate, the old key) is refused, and the server keeps its files.
        cert.write_bytes(renewed.cert.read_bytes())
        server.signal(signal.SIGHUP)
        wait_for(lambda: "TLS files not reloaded" in server.log(), what="the refused reload to be logged")
        with grpc.secure_channel(server.target, creds(pki)) as fresh:
            assert list_jobs(fresh).revision == 0
        # The whole renewal: new connections get the new certificate.
        key.write_bytes(renewed.key.read_bytes())
        server.signal(signal.SIGHUP)
        wait_for(lambda: "TLS files reloaded" in server.log(), what="the reload")
        with grpc.secure_channel(server.target, creds(pki, ca=renewed_ca.pem)) as fresh:
            assert list_jobs(fresh).revision == 0
        with grpc.secure_channel(server.target, creds(pki)) as stale:
            assert code_of(lambda: list_jobs(stale)) == grpc.StatusCode.UNAVAILABLE
        # A connection made before the reload goes on with the certificate it started with.
        assert list_jobs(before).revision == 0
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
