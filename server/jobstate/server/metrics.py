"""Prometheus metrics, served over plain HTTP on ``ServerConfig.metrics_port``.

Two kinds of numbers:

- Per-RPC counts and latencies are recorded as calls finish (``Metrics.observe``, the service's ``Observer``).
- Everything the store and the watch hub already count (jobs by state, history, watchers, events published and
  delivered, lag) is read when Prometheus scrapes, by a collector callback, so the write and fan-out paths do no
  extra work for metrics at all.

The HTTP endpoint is a small asyncio handler on the server's own event loop rather than prometheus_client's
threaded server. The store and the hub belong to that loop's thread, so a scrape reads them between two steps
of the loop: it sees a consistent state (never half a change) and never iterates a dict that is being changed.
A scrape costs one pass over the jobs (for jobs by state) and over the watchers (for lag).

Each ``Metrics`` has its own ``CollectorRegistry``: several servers in one process (as in the tests) keep
separate numbers.

Metric names (all prefixed ``jobstate_``):

- ``requests_total{method,code,protocol}`` finished RPCs by method, status code name (``OK``, ``NOT_FOUND``...;
  the gRPC name also for a call over HTTP) and protocol (``grpc``, ``connect``, ``grpc-web``), including calls
  the security layer refused (``UNAUTHENTICATED``, ``PERMISSION_DENIED``, rate limited); a Watch stream counts
  once, when it ends.
- ``request_duration_seconds{method}`` latency histogram of the unary RPCs (a Watch's duration is its stream's
  lifetime, not a latency, so Watch is left out).
- ``jobs{state}`` jobs by state (``NEW``, ``QUEUED``, ...); ``jobs_total`` does not exist, sum the states.
- ``revision`` the store's latest revision.
- ``history_held_changes`` and ``history_capacity_changes``: changes held for watchers to resume from, and
  the most it holds (``--history-size``).
- ``watchers`` live watch streams; ``watchers_started_total``.
- ``events_published_total`` changes published to the hub; ``events_delivered_total`` events sent on watch
  streams (one change sent to three watchers counts three); ``watch_responses_total`` messages they went in.
- ``watcher_lag_max_revisions`` and ``watcher_lag_sum_revisions``: how far behind the head the watchers are
  (the most behind one, and all of them added up); ``watchers_behind`` how many are behind at all.
- ``watchers_lagged_total`` streams ended with ``RESOURCE_EXHAUSTED``/``WATCHER_LAGGED`` (fell out of history).
- ``watchers_dropped_total`` watch streams the server ended or refused rather than the client: lagged,
  over ``max_watchers``, or shutting down.
- ``retention_removed_jobs_total`` jobs removed by retention (``--retain-finished``);
  ``retention_sweep_seconds`` how long each sweep took (a histogram; sweeps run at least once a second).
- ``job_history_entries`` history entries of the jobs held (GetJobHistory's), all jobs together; not on etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

import grpc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from jobstate.server.hub import WatchHub
from jobstate.server.service import Observer
from jobstate.server.store import Store
from jobstate.v1 import job_state_pb2 as pb

log = logging.getLogger("jobstate.server")

PREFIX = "jobstate"
# Unary calls on the in-memory store take tens of microseconds to a few milliseconds; the top buckets catch
# a stalled loop.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Watch endings that the server chose: lagged or over the watcher limit, and shutting down.
_DROPPED = frozenset((grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE))
# A scraper that does not send its request within this long is cut off.
_REQUEST_TIMEOUT = 10.0
_STATE_PREFIX = "JOB_STATE_TYPE_"


def state_label(state: int) -> str:
    """``NEW`` for ``JOB_STATE_TYPE_NEW``; the number for a value the schema does not name."""
    try:
        return pb.JobStateType.Name(state).removeprefix(_STATE_PREFIX)  # type: ignore[arg-type]
    except ValueError:
        return str(state)


_JOB_STATES = [v.number for v in pb.JobStateType.DESCRIPTOR.values if v.number != 0]


class _StoreCollector(Collector):
    """Reads the store's and hub's own counters at scrape time (on the server loop; see the module doc)."""

    def __init__(self, store: Store, metrics: Metrics) -> None:
        self.store = store
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        s = self.store.stats()
        jobs = GaugeMetricFamily(f"{PREFIX}_jobs", "Jobs by state.", labels=["state"])
        # Every named state is always present, at 0 when no job is in it, so dashboards see a flat line.
        for state in _JOB_STATES:
            jobs.add_metric([state_label(state)], s.jobs_by_state.get(state, 0))
        for state, n in s.jobs_by_state.items():
            if state not in _JOB_STATES:
                jobs.add_metric([state_label(state)], n)
        yield jobs
        yield GaugeMetricFamily(f"{PREFIX}_revision", "The store's latest revision.", value=s.revision)
        yield GaugeMetricFamily(
            f"{PREFIX}_history_held_changes", "Changes held for watchers to resume from.", value=s.history_held
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_history_capacity_changes", "The most changes history holds.", value=s.history_size
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_history_held_bytes",
            "Memory the changes held for watchers take (their bytes, and a fixed overhead each).",
            value=s.history_bytes_held,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_history_capacity_bytes",
            "The most memory the held changes may take (0: bounded by count only).",
            value=s.history_bytes,
        )
        yield GaugeMetricFamily(f"{PREFIX}_watchers", "Live watch streams.", value=s.watchers)
        if s.job_history_entries >= 0:
            yield GaugeMetricFamily(
                f"{PREFIX}_job_history_entries",
                "History entries of the jobs held, all jobs together.",
                value=s.job_history_entries,
            )
        lags = s.watcher_lags
        yield GaugeMetricFamily(
            f"{PREFIX}_watcher_lag_max_revisions",
            "Revisions the watcher furthest behind the head has yet to receive.",
            value=max(lags, default=0),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_watcher_lag_sum_revisions",
            "Revisions every watcher has yet to receive, added up.",
            value=sum(lags),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_watchers_behind",
            "Watchers that have not yet received every change.",
            value=sum(1 for n in lags if n),
        )
        yield CounterMetricFamily(
            f"{PREFIX}_watchers_dropped",
            "Watch streams the server ended or refused: lagged, over max_watchers, or shutting down.",
            value=self.metrics.watchers_dropped,
        )
        hub = getattr(self.store, "hub", None)
        if isinstance(hub, WatchHub):
            st = hub.stats
            yield CounterMetricFamily(
                f"{PREFIX}_events_published", "Changes published to watchers.", value=st.published
            )
            yield CounterMetricFamily(
                f"{PREFIX}_events_delivered",
                "Events sent on watch streams, one per change per watcher.",
                value=st.events_delivered,
            )
            yield CounterMetricFamily(
                f"{PREFIX}_watch_responses",
                "WatchResponse messages sent (each one or a batch of events).",
                value=st.responses,
            )
            yield CounterMetricFamily(f"{PREFIX}_watchers_started", "Watch streams started.", value=st.watchers_started)
            yield CounterMetricFamily(
                f"{PREFIX}_watchers_lagged",
                "Watch streams ended with WATCHER_LAGGED: they fell behind the history held.",
                value=st.lagged,
            )


class Metrics:
    """The server's metrics: an ``Observer`` for the service, a registry, and the HTTP endpoint."""

    def __init__(self, store: Store) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Finished RPCs by method, status code and protocol (grpc, connect, grpc-web).",
            ["method", "code", "protocol"],
            registry=self.registry,
        )
        self.latency = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time to answer a unary RPC, by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.retention_removed = Counter(
            f"{PREFIX}_retention_removed_jobs",
            "Jobs removed by retention after being final for --retain-finished.",
            registry=self.registry,
        )
        self.retention_seconds = Histogram(
            f"{PREFIX}_retention_sweep_seconds",
            "Time each retention sweep took, all its batches together.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        # A plain int: observe runs on the server loop, and the collector reads it there too.
        self.watchers_dropped = 0
        self.registry.register(_StoreCollector(store, self))
        self._server: asyncio.Server | None = None
        self.port: int | None = None

    # -- Observer --------------------------------------------------------------------------------------------

    def observe(self, method: str, code: grpc.StatusCode, seconds: float, protocol: str = "grpc") -> None:
        self.requests.labels(method, code.name, protocol).inc()
        if method == "Watch":
            if code in _DROPPED:
                self.watchers_dropped += 1
        else:
            self.latency.labels(method).observe(seconds)

    def observe_retention(self, removed: int, seconds: float) -> None:
        self.retention_removed.inc(removed)
        self.retention_seconds.observe(seconds)

    # -- HTTP endpoint ---------------------------------------------------------------------------------------

    def render(self) -> bytes:
        """The exposition text, as a scrape gets it. Call it on the server loop."""
        return generate_latest(self.registry)

    async def start(self, host: str, port: int) -> int:
        """Serves ``/metrics`` on ``host:port`` (0: a free port) from the running loop; returns the port."""
        self._server = await asyncio.start_server(self._handle, host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT):
                request_line = await reader.readline()
                while True:  # headers: nothing in them changes the answer
                    line = await reader.readline()
                    if line in (b"\r\n", b"\n", b""):
                        break
            parts = request_line.decode("latin-1").split()
            method, path = (parts[0], parts[1].split("?", 1)[0]) if len(parts) >= 2 else ("", "")
            if not method:
                status, ctype, body = "400 Bad Request", "text/plain", b"bad request\n"
            elif method not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET /metrics\n"
            elif path not in ("/metrics", "/"):
                status, ctype, body = "404 Not Found", "text/plain", b"metrics are at /metrics\n"
            else:
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, self.render()
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode("latin-1")
            writer.write(head if method == "HEAD" else head + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass  # a scraper that hung up or sent garbage; nothing to answer
        except Exception:
            log.exception("metrics request failed")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


class Observers:
    """Several observers as one (metrics and a caller's own)."""

    def __init__(self, *observers: Observer) -> None:
        self.observers = observers

    def observe(self, method: str, code: grpc.StatusCode, seconds: float, protocol: str = "grpc") -> None:
        for o in self.observers:
            o.observe(method, code, seconds, protocol)
