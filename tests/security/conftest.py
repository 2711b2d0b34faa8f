"""Fixtures of the security tests: a throwaway PKI, a tokens file, and servers run as subprocesses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from pki import PKI, make_pki
from secutil import ServerProcess, tokens_text


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(tokens_text())
    path.chmod(0o600)
    return path


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[Any]:
    started: list[ServerProcess] = []

    def start(
        credentials: grpc.ChannelCredentials | None = None, port: int | None = None, **config: Any
    ) -> ServerProcess:
        p = ServerProcess(config, tmp_path / f"server-{len(started)}.log", credentials, port)
        started.append(p)
        return p

    try:
        yield start
    finally:
        for p in started:
            p.kill()
