"""The HTTP listener under the same --tls-cert/--tls-key as gRPC: HTTPS only, verified against the test CA, the
certificate reloaded on SIGHUP for new connections; plaintext HTTP on a non-loopback address refused."""

from __future__ import annotations

import ssl
from typing import Any

import httpx
import pytest
from pki import PKI, make_pki

from jobstate.server.main import ServerConfig, build_http
from jobstate.server.service import JobStateService


def _post(client: httpx.Client, url: str) -> httpx.Response:
    return client.post(
        f"{url}/jobstate.v1.JobStateService/CreateJob",
        content=b'{"jobId": "tls"}',
        headers={"content-type": "application/json"},
    )


def test_https_with_the_servers_certificate(make_server: Any, tmp_path: Any) -> None:
    (tmp_path / "first").mkdir()
    (tmp_path / "renewed").mkdir()
    pki: PKI = make_pki(tmp_path / "first")  # its own: the reload below rewrites the server's files
    server = make_server(http_port=0, tls_cert=str(pki.server.cert), tls_key=str(pki.server.key))
    url = server.app.http_url
    assert url.startswith("https://127.0.0.1:")
    with httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca)), timeout=10) as client:
        r = _post(client, url)
        assert r.status_code == 200, r.text
        assert r.json()["job"]["jobId"] == "tls"
    # A client that does not trust the CA cannot talk to it; plaintext neither.
    with httpx.Client(timeout=10) as client, pytest.raises(httpx.ConnectError):
        _post(client, url)
    with httpx.Client(timeout=10) as client, pytest.raises(httpx.TransportError):
        _post(client, url.replace("https://", "http://"))

    # SIGHUP's reload: new connections get the renewed certificate (another CA here, so the change shows).
    renewed = make_pki(tmp_path / "renewed")
    pki.server.cert.write_bytes(renewed.server.cert.read_bytes())
    pki.server.key.write_bytes(renewed.server.key.read_bytes())
    server.run(server.app.reload)
    with httpx.Client(verify=ssl.create_default_context(cafile=str(renewed.ca)), timeout=10) as client:
        assert _post(client, url).status_code == 409  # the job exists: same server, new certificate


def test_plaintext_http_off_loopback_is_refused(make_server: Any) -> None:
    server = make_server()
    service = JobStateService(server.store)
    with pytest.raises(ValueError, match="plaintext HTTP"):
        build_http(ServerConfig(http_port=0, http_host="0.0.0.0"), service, None)
