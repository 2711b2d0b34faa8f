"""A loopback TCP proxy that can cut every connection through it on demand, to drop watch streams for real.

Threads, not asyncio, so it serves sync and async clients alike without sharing their loops. ``cut()`` closes
every open connection (both sides), ``refuse()`` makes new connections close as soon as they are accepted
(a server that cannot be reached) until ``admit()``.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from types import TracebackType

_CHUNK = 64 * 1024


class TcpProxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self._target = (host, target_port)
        self._listener = socket.create_server((host, 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self.target = f"{host}:{self.port}"
        self.accepted = 0
        self.cuts = 0
        self._lock = threading.Lock()
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._refusing = False
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)
        self._acceptor.start()

    # -- control -------------------------------------------------------------------------------------------

    @property
    def open(self) -> int:
        """Connections open now (accepted and not cut)."""
        with self._lock:
            return len(self._pairs)

    def cut(self) -> int:
        """Closes every open connection; returns how many were cut."""
        with self._lock:
            pairs = list(self._pairs)
            self._pairs.clear()
            self.cuts += 1
        for pair in pairs:
            _close_pair(pair)
        return len(pairs)

    def refuse(self) -> None:
        with self._lock:
            self._refusing = True

    def admit(self) -> None:
        with self._lock:
            self._refusing = False

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def close(self) -> None:
        self._stopped.set()
        self._acceptor.join(5)
        self._listener.close()
        self.cut()
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            while not self._stopped.is_set():
                if not sel.select(timeout=0.05):
                    continue
                try:
                    client, _ = self._listener.accept()
                except (BlockingIOError, OSError):
                    continue
                self._serve(client)

    def _serve(self, client: socket.socket) -> None:
        client.setblocking(True)
        with self._lock:
            self.accepted += 1
            refusing = self._refusing
        if refusing:
            client.close()
            return
        try:
            upstream = socket.create_connection(self._target, timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = (client, upstream)
        with self._lock:
            self._pairs.add(pair)
        self._threads = [t for t in self._threads if t.is_alive()]
        for src, dst in ((client, upstream), (upstream, client)):
            t = threading.Thread(target=self._pump, args=(pair, src, dst), name="proxy-pump", daemon=True)
            t.start()
            self._threads.append(t)

    def _pump(self, pair: tuple[socket.socket, socket.socket], src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(_CHUNK)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._pairs.discard(pair)
        _close_pair(pair)


def _close_pair(pair: tuple[socket.socket, socket.socket]) -> None:
    for s in pair:
        # shutdown wakes the pump thread blocked in recv on this socket; close alone would not.
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            s.close()
