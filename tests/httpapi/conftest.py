"""Fixtures of the HTTP tests: a real server with its HTTP listener on a free loopback port, and httpx clients."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import pytest

from jobstate.v1 import job_state_service_pb2_grpc as spb_grpc


class HttpServer:
    """A ServerThread with ``http_port=0``: its HTTP base URL, an httpx client on it, and a gRPC stub."""

    def __init__(self, thread: Any) -> None:
        self.thread = thread
        port = thread.app.http_port
        assert port is not None
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=30)
        self.channel = grpc.insecure_channel(thread.target)
        self.grpc = spb_grpc.JobStateServiceStub(self.channel)

    def revision(self) -> int:
        return int(self.thread.run(lambda: self.thread.store.stats().revision))

    def close(self) -> None:
        self.client.close()
        self.channel.close()


@pytest.fixture
def make_http(make_server: Callable[..., Any]) -> Iterator[Callable[..., HttpServer]]:
    made: list[HttpServer] = []

    def make(**config: Any) -> HttpServer:
        s = HttpServer(make_server(http_port=0, **config))
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.fixture
def http(make_http: Callable[..., HttpServer]) -> HttpServer:
    return make_http()
