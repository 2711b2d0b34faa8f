"""One awaitable face over ``Client`` and ``AsyncClient``, so that each client test is written once for both.

``Api.call("create_job", ...)`` runs the method of the same name on either client; ``collect`` drains an
iterator method (``iter_jobs``, ``iter_history``); ``watch`` starts a ``Recorder`` that consumes a watch stream
in the background (a thread for the blocking client, a task for the asyncio one) and hands its responses over
a queue, so tests wait on them with a deadline instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from jobstate.client import AsyncClient, AsyncWatchStream, Backoff, Client, WatchStream
from jobstate.v1 import job_state_service_pb2 as spb

FAST = Backoff(initial=0.001, maximum=0.05)
_END = object()


class Recorder:
    """Responses of one watch, as they arrive. ``next_event`` skips bookmarks unless asked for them."""

    def __init__(self) -> None:
        self.responses: list[spb.WatchResponse] = []
        self._pending: list[spb.WatchEvent] = []
        self.ended = False

    async def _get(self, timeout: float) -> Any:
        raise NotImplementedError

    async def next_response(self, timeout: float = 10) -> spb.WatchResponse:
        item = await self._get(timeout)
        if item is _END:
            self.ended = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.ended = True
            raise item
        self.responses.append(item)
        return item  # type: ignore[no-any-return]

    async def next_event(self, timeout: float = 10, *, bookmarks: bool = False) -> spb.WatchEvent:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            while self._pending:
                e = self._pending.pop(0)
                if bookmarks or e.type != spb.WATCH_EVENT_TYPE_BOOKMARK:
                    return e
            r = await self.next_response(max(0.01, deadline - loop.time()))
            self._pending.extend(r.events)

    async def events(self, n: int, timeout: float = 10, *, bookmarks: bool = False) -> list[spb.WatchEvent]:
        return [await self.next_event(timeout, bookmarks=bookmarks) for _ in range(n)]

    async def end(self, timeout: float = 10) -> BaseException | None:
        """Waits for the stream to end; returns the exception it ended with (None: it just stopped)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                await self.next_response(max(0.01, deadline - loop.time()))
            except StopAsyncIteration:
                return None
            except TimeoutError:
                raise
            except Exception as exc:
                return exc

    @property
    def position(self) -> int:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class ThreadRecorder(Recorder):
    def __init__(self, stream: WatchStream) -> None:
        super().__init__()
        self.stream = stream
        self._q: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="watch-recorder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for response in self.stream.responses():
                self._q.put(response)
        except BaseException as exc:
            self._q.put(exc)
            return
        self._q.put(_END)

    async def _get(self, timeout: float) -> Any:
        try:
            return await asyncio.to_thread(self._q.get, True, timeout)
        except queue.Empty:
            raise TimeoutError(f"no watch response within {timeout}s") from None

    @property
    def position(self) -> int:
        return self.stream.position

    async def close(self) -> None:
        self.stream.close()
        await asyncio.to_thread(self._thread.join, 10)
        assert not self._thread.is_alive(), "the watch thread did not stop after close()"


class TaskRecorder(Recorder):
    def __init__(self, stream: AsyncWatchStream) -> None:
        super().__init__()
        self.stream = stream
        self._q: asyncio.Queue[Any] = asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name="watch-recorder")

    async def _run(self) -> None:
        try:
            async for response in self.stream.responses():
                self._q.put_nowait(response)
        except Exception as exc:
            self._q.put_nowait(exc)
            return
        self._q.put_nowait(_END)

    async def _get(self, timeout: float) -> Any:
        async with asyncio.timeout(timeout):
            return await self._q.get()

    @property
    def position(self) -> int:
        return self.stream.position

    async def close(self) -> None:
        self.stream.close()
        # close() alone must end the iteration: no cancel of the consuming task here.
        done, _ = await asyncio.wait({self._task}, timeout=10)
        assert done, "the watch task did not stop after close()"
        assert not self._task.cancelled(), "close() cancelled the task iterating the stream"


class Api:
    kind: str

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    async def collect(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        raise NotImplementedError

    async def watch(self, *args: Any, **kwargs: Any) -> Recorder:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class SyncApi(Api):
    kind = "sync"

    def __init__(self, target: str, **options: Any) -> None:
        self.client = Client(target, **{"backoff": FAST, **options})

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        # A blocking call in the test's loop is fine: the server runs on a loop of its own.
        return getattr(self.client, method)(*args, **kwargs)

    async def collect(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        it: Iterator[Any] = getattr(self.client, method)(*args, **kwargs)
        return list(it)

    async def watch(self, *args: Any, **kwargs: Any) -> Recorder:
        stream = await asyncio.to_thread(lambda: self.client.watch(*args, **kwargs))
        return ThreadRecorder(stream)

    async def close(self) -> None:
        self.client.close()


class AsyncApi(Api):
    kind = "async"

    def __init__(self, target: str, **options: Any) -> None:
        self.client = AsyncClient(target, **{"backoff": FAST, **options})

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return await getattr(self.client, method)(*args, **kwargs)

    async def collect(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        it: AsyncIterator[Any] = getattr(self.client, method)(*args, **kwargs)
        return [x async for x in it]

    async def watch(self, *args: Any, **kwargs: Any) -> Recorder:
        return TaskRecorder(self.client.watch(*args, **kwargs))

    async def close(self) -> None:
        await self.client.close()


KINDS = ("sync", "async")


def make_api(kind: str, target: str, **options: Any) -> Api:
    return SyncApi(target, **options) if kind == "sync" else AsyncApi(target, **options)


@contextlib.asynccontextmanager
async def opened(kind: str, target: str, **options: Any) -> AsyncIterator[Api]:
    api = make_api(kind, target, **options)
    try:
        yield api
    finally:
        await api.close()
