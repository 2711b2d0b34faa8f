"""A reload that revokes a caller ends its open watch streams with the reason, wherever the stream stands.

The guard is driven directly, as grpc would drive it (one message asked for at a time), so both moments are
exact: a stream waiting for its next message (cancelled at once) and one between messages, its last one still
being sent (ended when it asks for the next, never cancelled inside grpc, which would leave the call open).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from secutil import TOKENS, bearer

from jobstate.server.security import SecurityConfig, SecurityInterceptor


class Aborted(Exception):
    pass


class FakeContext:
    """What the guard uses of a grpc.aio ServicerContext: abort records the status and raises, as grpc's does."""

    def __init__(self) -> None:
        self.status: tuple[grpc.StatusCode, str] | None = None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5000"

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any = ()) -> None:
        self.status = (code, details)
        raise Aborted(code)


class Service:
    """A watch that sends one message, then waits for ever; records how it ended."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()

    async def watch(self, request: Any, context: Any) -> AsyncIterator[bytes]:
        try:
            yield b"first"
            await asyncio.Event().wait()
        finally:
            self.closed.set()


@pytest.fixture
def interceptor(tmp_path: Path) -> SecurityInterceptor:
    path = tmp_path / "tokens"
    path.write_text(f"{TOKENS['writer']} writer bob\n{TOKENS['reader']} reader alice\n")
    path.chmod(0o600)
    security = SecurityInterceptor(SecurityConfig(auth_tokens_file=str(path)))
    path.write_text(f"{TOKENS['reader']} reader alice\n")  # what the next reload reads: Bob revoked
    return security


@pytest.mark.parametrize("waiting", [True, False], ids=["waiting-for-a-message", "between-messages"])
async def test_a_revoked_stream_ends_with_unauthenticated(interceptor: SecurityInterceptor, waiting: bool) -> None:
    service, context = Service(), FakeContext()
    guarded = interceptor._guard_stream(service.watch, "Watch", bearer(TOKENS["writer"]))(None, context)  # type: ignore[arg-type]
    task = asyncio.ensure_future(anext(guarded))
    assert await asyncio.wait_for(task, 5) == b"first"
    task = asyncio.ensure_future(anext(guarded))
    if waiting:
        for _ in range(5):
            await asyncio.sleep(0)
        assert not task.done()  # suspended inside the service
        assert interceptor.reload()
    else:
        assert interceptor.reload()  # before grpc asks for the next message: nothing is cancelled
    for _ in range(20):  # a few turns of the loop, no waiting on time: the reload ended it
        await asyncio.sleep(0)
    assert task.done()
    with pytest.raises(Aborted):
        task.result()
    assert context.status is not None
    assert context.status[0] == grpc.StatusCode.UNAUTHENTICATED
    assert service.closed.is_set()  # the service's stream was released
    assert interceptor.streams == set()
    assert interceptor.watchers == {}


async def test_a_stream_still_accepted_goes_on(interceptor: SecurityInterceptor) -> None:
    service, context = Service(), FakeContext()
    guarded = interceptor._guard_stream(service.watch, "Watch", bearer(TOKENS["reader"]))(None, context)  # type: ignore[arg-type]
    assert await asyncio.wait_for(anext(guarded), 5) == b"first"
    task = asyncio.ensure_future(anext(guarded))
    assert interceptor.reload()
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()
    assert context.status is None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
