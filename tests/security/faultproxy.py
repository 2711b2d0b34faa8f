"""A TCP proxy for fault tests, in its own thread: forwards 127.0.0.1:PORT to a server, and can cut every
connection (``cut``: both sides see the socket close), cut connections at random, or stop forwarding without
closing anything (``blackhole``: what a pulled cable looks like to both ends)."""

from __future__ import annotations

import contextlib
import random
import select
import socket
import threading
from types import TracebackType


class FaultProxy:
    def __init__(self, upstream_port: int, *, seed: int = 0) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.target = f"127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._stop = threading.Event()
        self._blackholed = threading.Event()
        self._random = random.Random(seed)
        self.cuts = 0
        self.connections = 0
        self._threads = [threading.Thread(target=self._accept, name="faultproxy-accept", daemon=True)]
        self._threads[0].start()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, server))
                self.connections += 1
            t = threading.Thread(target=self._pump, args=(client, server), name="faultproxy-pump", daemon=True)
            self._threads.append(t)
            t.start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while not self._stop.is_set():
                if self._blackholed.is_set():
                    self._stop.wait(0.1)  # hold the sockets open, move nothing
                    continue
                readable, _, _ = select.select([a, b], [], [], 0.1)
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    peers[s].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            self._close_pair(a, b)

    def _close_pair(self, a: socket.socket, b: socket.socket) -> None:
        with self._lock:
            if (a, b) in self._pairs:
                self._pairs.remove((a, b))
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def cut(self, fraction: float = 1.0) -> int:
        """Closes ``fraction`` of the open connections (chosen at random); returns how many."""
        with self._lock:
            pairs = [p for p in self._pairs if self._random.random() < fraction]
        for a, b in pairs:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        self.cuts += len(pairs)
        return len(pairs)

    def blackhole(self) -> None:
        self._blackholed.set()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for t in self._threads:
            t.join(5)
        with self._lock:
            pairs = list(self._pairs)
        for a, b in pairs:
            self._close_pair(a, b)
