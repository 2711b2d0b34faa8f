"""Building and running the server process.

``build_server(config)`` assembles a ready ``App`` (grpc.aio server, store, health, reflection, and with
``http_port`` the HTTP listener: Connect, gRPC-Web and the dashboard) bound to its ports but not started, so
tests start a real server on port 0. ``serve(config)`` runs it until SIGTERM or SIGINT, then shuts down
gracefully: health turns NOT_SERVING, watch streams (gRPC and HTTP) end with UNAVAILABLE / SHUTTING_DOWN,
in-flight calls get ``grace`` seconds to finish, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field, replace

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer  # health.aio, spelled so type checkers find it
from grpc_reflection.v1alpha import reflection

from jobstate.server import engines, rules
from jobstate.server.grpc_door import GrpcDoor
from jobstate.server.http_door import HttpDoor, asgi_app
from jobstate.server.http_server import HttpApp, HttpConfig, HttpListener, HttpTls
from jobstate.server.hub import DEFAULT_HISTORY_BYTES
from jobstate.server.metrics import Metrics, Observers
from jobstate.server.security import SecurityConfig, SecurityInterceptor, ServerTls, client_share
from jobstate.server.service import SERVICE_NAME, JobStateService, Observer
from jobstate.server.store import Store

log = logging.getLogger("jobstate.server")

# How often the timeout sweeper looks at the earliest deadline; a job times out at most this late.
SWEEP_INTERVAL = 0.1
# Retention: the sweeper looks at the job final longest at least this often, and removes jobs in batches of
# RETENTION_BATCH (one SQLite transaction each, about a millisecond of the loop in memory), giving the loop
# back between batches so that writers and watchers wait for one batch at most.
RETENTION_INTERVAL = 1.0
RETENTION_BATCH = 32
RETENTION_MIN_DELAY = 0.01
# SQLite gives the space of removed jobs back at most this often.
MAINTAIN_INTERVAL = 10.0


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    history_size: int = 100_000
    # What the change history may take in memory, in bytes (0: bounded by history_size only).
    history_bytes: int = DEFAULT_HISTORY_BYTES
    max_watchers: int = 10_000
    grace: float = 5.0
    max_message_bytes: int = 8 * 1024 * 1024
    limits: rules.Limits = field(default_factory=rules.Limits)
    keepalive_seconds: float = 30.0
    # A peer that does not answer a keepalive ping within this long is dead: its calls end, its watchers go.
    keepalive_timeout_seconds: float = 10.0
    # Prometheus metrics over HTTP on host:metrics_port (0: a free port); None: no metrics.
    metrics_port: int | None = None
    # The storage engine (jobstate.server.engines): memory, sqlite (in data_dir) or etcd.
    store: str = "memory"
    data_dir: str | None = None
    etcd_endpoints: tuple[str, ...] = ()
    etcd_prefix: str = "/jobstate"
    # Transport security and callers (SECURITY.md). TLS needs cert and key; a client CA makes it mTLS.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    # Plaintext on a non-loopback address is refused unless this is set.
    insecure: bool = False
    auth_tokens_file: str | None = None
    write_rate_per_client: float = 0.0  # writes a second per client; 0: unlimited
    write_burst_per_client: int = 0  # 0: one second's worth
    read_rate_per_client: float = 0.0  # reads a second per client; 0: unlimited
    read_burst_per_client: int = 0  # 0: one second's worth
    # Per-client shares of the global limits; None: security.client_share of it (all but a tenth), 0: none.
    max_watchers_per_client: int | None = None
    max_jobs_per_client: int | None = None
    # Refused calls are logged once per client per this many seconds, then as one line with a count.
    refusal_log_interval: float = 10.0
    # Seconds a job stays after reaching a final state before it is removed (DELETED, cause RETENTION);
    # 0: finished jobs are kept until a client deletes them.
    retain_finished: float = 24 * 3600.0
    # The HTTP listener (Connect, gRPC-Web, the dashboard): on http_host:http_port (0: a free port); None: off.
    http_port: int | None = None
    http_host: str = "127.0.0.1"
    # Browser origins allowed to call the API across origins (CORS); none by default.
    cors_origins: tuple[str, ...] = ()
    # Host header names answered besides the loopback names and http_host (DNS rebinding guard).
    http_allowed_hosts: tuple[str, ...] = ()
    http_max_connections: int = 1000


@dataclass
class App:
    """A built server and what it serves; ``start`` and ``stop`` run it."""

    config: ServerConfig
    server: grpc.aio.Server
    port: int
    store: Store
    health: HealthServicer
    metrics: Metrics | None = None
    security: SecurityInterceptor | None = None
    service: JobStateService | None = None
    tls: ServerTls | None = None
    http: HttpListener | None = None
    # time.monotonic() when grpc's own server.stop began; from then on grpc core, not the service, answers
    # calls that reach the server, and a call still on its way is answered CANCELLED (docs: shutdown).
    transport_stop_started: float | None = None
    _sweeper: asyncio.Task[None] | None = None
    _retention: asyncio.Task[None] | None = None

    def reload(self) -> None:
        """SIGHUP: the tokens file and the TLS files are read again; each keeps its previous version if the new
        one is broken."""
        if self.security is not None:
            self.security.reload()
        if self.tls is not None:
            self.tls.reload()
        if self.http is not None and self.http.tls is not None:
            self.http.tls.reload()

    @property
    def target(self) -> str:
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def http_port(self) -> int | None:
        """The HTTP listener's bound port, or None when it is off."""
        return None if self.http is None else self.http.port

    @property
    def http_url(self) -> str | None:
        if self.http is None:
            return None
        host = self.http.config.host
        scheme = "https" if self.http.tls is not None else "http"
        return f"{scheme}://[{host}]:{self.http.port}" if ":" in host else f"{scheme}://{host}:{self.http.port}"

    @property
    def metrics_port(self) -> int | None:
        """The port metrics are served on once started (the bound one when configured as 0)."""
        return None if self.metrics is None else self.metrics.port

    async def start(self) -> None:
        if self.metrics is not None and self.config.metrics_port is not None:
            # Bound first, so a taken metrics port fails the start before the server takes any call.
            await self.metrics.start(self.config.host, self.config.metrics_port)
        await self.store.start()
        await self.server.start()
        if self.http is not None:
            await self.http.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        self._sweeper = asyncio.create_task(sweep_timeouts(self.store), name="timeout-sweeper")
        if self.config.retain_finished > 0:
            self._retention = asyncio.create_task(
                sweep_retention(self.store, self.config.retain_finished, self.metrics), name="retention-sweeper"
            )

    async def stop(self, grace: float | None = None) -> None:
        """Health turns NOT_SERVING, watch streams end and new calls are refused with UNAVAILABLE /
        SHUTTING_DOWN, calls already running get ``grace`` seconds (default: the config's) to finish."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.config.grace if grace is None else grace)
        await self.health.enter_graceful_shutdown()
        for sweeper in (self._sweeper, self._retention):  # first, so no sweep runs into a closed store
            if sweeper is not None:
                sweeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeper
        if self.service is not None:
            self.service.begin_shutdown()
        # Watch streams end with SHUTTING_DOWN; a persistent engine refuses later writes the same way.
        await self.store.close()
        if self.service is not None:
            await settle(self.service, deadline)
        if self.transport_stop_started is None:
            self.transport_stop_started = time.monotonic()
        left = max(0.0, deadline - loop.time())
        if self.http is not None:
            await asyncio.gather(self.server.stop(left), self.http.stop(left))
        else:
            await self.server.stop(left)
        if self.security is not None:
            self.security.refusals.flush()  # the counts of the last interval, not lost with the process
        if self.metrics is not None:
            await self.metrics.stop()


# Shutdown stops the gRPC server once no call has arrived for SETTLE_QUIET seconds, or SETTLE_MAX seconds
# after the running calls finished when clients keep calling (always within grace).
SETTLE_QUIET = 0.05
SETTLE_MAX = 0.5


async def settle(service: JobStateService, deadline: float) -> None:
    """Waits, until ``deadline`` (loop time) at most, for the running unary calls to finish and then for calls
    to stop arriving.

    Until grpc's ``server.stop`` is called, the service answers each new call UNAVAILABLE / SHUTTING_DOWN,
    which clients take as "try again later or elsewhere", and running calls finish. From that call on, grpc
    core answers for the server and cannot be told otherwise: it cancels the calls it holds queued but not yet
    handed to the service, and any call that arrives before the client has read the server's GOAWAY (both are
    "zombie" calls in grpc core's server, ended by unref, which the client sees as CANCELLED); when grace ends
    it cancels whatever still runs. Waiting for calls to stop arriving makes that window rare, never
    impossible: a client may send a call at any instant. docs/CONTRACT.md states the promise that is left:
    CANCELLED only from a server whose transport is stopping, never applied unless grace ran out, and the
    jobstate clients retry it for reads and watches.
    """
    loop = asyncio.get_running_loop()
    drained_at: float | None = None
    while (now := loop.time()) < deadline:
        if service.in_flight:
            drained_at = None
        else:
            drained_at = now if drained_at is None else drained_at
            if time.monotonic() - service.last_call >= SETTLE_QUIET or now - drained_at >= SETTLE_MAX:
                return
        await asyncio.sleep(min(SETTLE_QUIET / 5, deadline - now))


async def sweep_timeouts(store: Store) -> None:
    """Moves jobs whose ``timeout_at`` has passed to ERROR, "timed out"."""
    while True:
        due = store.next_timeout_ns()
        delay = SWEEP_INTERVAL if due is None else min(SWEEP_INTERVAL, max(0.0, (due - time.time_ns()) / 1e9))
        await asyncio.sleep(delay)
        try:
            expired = await store.expire_due()
        except Exception:  # the sweeper must outlive one bad sweep; the next one retries
            log.exception("timeout sweep failed")
            continue
        if expired:
            log.info("timeout sweep", extra={"expired": expired})


async def sweep_retention(store: Store, retain_seconds: float, metrics: Metrics | None = None) -> None:
    """Removes jobs that have been final for longer than ``retain_seconds``, oldest first, in short batches.

    Safe on several servers sharing one etcd: each removal is guarded there, so each job is removed once."""
    retain_ns = int(retain_seconds * 1e9)
    # Sweeps are at least this far apart, so that jobs finishing one after another are removed together (one
    # sweep, one log line a second at most) rather than each by a sweep of its own.
    gap = max(RETENTION_MIN_DELAY, min(RETENTION_INTERVAL, retain_seconds / 4))
    maintained = time.monotonic()
    pending_maintenance = False
    while True:
        due = store.next_finished_ns()
        delay = RETENTION_INTERVAL
        if due is not None:
            delay = min(delay, max(gap, (due + retain_ns - time.time_ns()) / 1e9))
        await asyncio.sleep(delay)
        started = time.perf_counter()
        removed = 0
        failed = False
        try:
            while True:
                n = await store.remove_finished(time.time_ns() - retain_ns, RETENTION_BATCH)
                removed += n
                if n < RETENTION_BATCH:
                    break
                await asyncio.sleep(0)  # writers and watchers run between batches
        except Exception:  # the sweeper must outlive one bad sweep; the next one retries
            log.exception("retention sweep failed")
            failed = True
        seconds = time.perf_counter() - started
        if metrics is not None:
            metrics.observe_retention(removed, seconds)
        if removed:
            pending_maintenance = True
            log.info(
                "retention sweep",
                extra={"removed": removed, "seconds": round(seconds, 4), "jobs": store.stats().jobs},
            )
        if pending_maintenance and time.monotonic() - maintained >= MAINTAIN_INTERVAL:
            pending_maintenance = False
            maintained = time.monotonic()
            await store.maintain()
        if failed:
            await asyncio.sleep(RETENTION_INTERVAL)  # a store that is down is not asked again at once


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_server(config: ServerConfig, store: Store | None = None, observer: Observer | None = None) -> App:
    """A server bound to ``config.host:config.port`` (0: a free port), not yet started.

    Raises ``ValueError`` for a configuration that would be unsafe or cannot work (plaintext on a
    non-loopback address without ``insecure``, half a TLS key pair, a client CA without TLS).
    """
    tls = check_transport(config)
    check_retention(config)
    config = with_client_shares(config)
    # A page must fit in a message: with a smaller --max-message-bytes, pages end sooner.
    page_bytes = min(config.limits.max_page_bytes, max(64 * 1024, config.max_message_bytes - 64 * 1024))
    if page_bytes != config.limits.max_page_bytes:
        config = replace(config, limits=replace(config.limits, max_page_bytes=page_bytes))
    security_config = SecurityConfig(
        auth_tokens_file=config.auth_tokens_file,
        mtls=config.tls_client_ca is not None,
        write_rate_per_client=config.write_rate_per_client,
        write_burst_per_client=config.write_burst_per_client,
        read_rate_per_client=config.read_rate_per_client,
        read_burst_per_client=config.read_burst_per_client,
        max_watchers=config.max_watchers,
        max_watchers_per_client=config.max_watchers_per_client or 0,
        track_job_owners=config.limits.max_jobs_per_client > 0,
        refusal_log_interval=config.refusal_log_interval,
    )
    security = SecurityInterceptor(security_config) if security_config.needed else None
    if store is None:
        store = engines.open_store(config)
    metrics: Metrics | None = None
    if config.metrics_port is not None:
        metrics = Metrics(store)
        observer = metrics if observer is None else Observers(metrics, observer)
    keepalive_ms = int(config.keepalive_seconds * 1000)
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            # Dead watchers are found by keepalive pings and released.
            ("grpc.keepalive_time_ms", keepalive_ms),
            ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_seconds * 1000)),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            # grpcio 1.85 waits for a ping's ack for ping_timeout_ms, not keepalive_timeout_ms: without this a
            # peer that vanished (no FIN, no RST) kept its watchers long past the keepalive timeout.
            ("grpc.http2.ping_timeout_ms", int(config.keepalive_timeout_seconds * 1000)),
            # Keep pinging an idle watch stream: a dead watcher sends no data, which is the case to catch.
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.so_reuseport", 0),
        ],
        interceptors=[security] if security is not None else None,
    )
    service = JobStateService(store, observer)
    if security is not None:
        security.observer = observer
    server.add_generic_rpc_handlers((GrpcDoor(service).handler(),))
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}"
    try:
        port = (
            server.add_secure_port(address, tls.credentials()) if tls is not None else server.add_insecure_port(address)
        )
    except RuntimeError as exc:  # grpc reports a failed bind this way; say it as the OS would
        raise OSError(f"cannot listen on {address}: address in use or not available") from exc
    http = build_http(config, service, security) if config.http_port is not None else None
    return App(replace(config, port=port), server, port, store, health_servicer, metrics, security, service, tls, http)


def build_http(config: ServerConfig, service: JobStateService, security: SecurityInterceptor | None) -> HttpListener:
    """The HTTP listener over the same service and security layer as gRPC, bound but not started."""
    if config.http_port is None:
        raise ValueError("no HTTP port")
    http_config = HttpConfig(
        host=config.http_host,
        port=config.http_port,
        cors_origins=config.cors_origins,
        allowed_hosts=config.http_allowed_hosts,
        max_connections=config.http_max_connections,
        max_message_bytes=config.max_message_bytes,
        keepalive_seconds=config.keepalive_seconds,
        keepalive_timeout_seconds=config.keepalive_timeout_seconds,
    )
    tls = None
    refuse_unsafe(config, config.http_host, "HTTP ", tls=config.tls_cert is not None)
    if config.tls_cert is not None and config.tls_key is not None:
        tls = HttpTls(config.tls_cert, config.tls_key, config.tls_client_ca)
    api = asgi_app(HttpDoor(service, security), config.max_message_bytes)
    return HttpListener(HttpApp(api, http_config), http_config, tls)


def with_client_shares(config: ServerConfig) -> ServerConfig:
    """The config with each per-client limit left unset (None) made a share of its global limit, so that no
    one client can take all of it (SECURITY.md)."""
    watchers = config.max_watchers_per_client
    jobs = config.max_jobs_per_client
    if watchers is None:
        watchers = client_share(config.max_watchers)
    if jobs is None:
        jobs = client_share(config.limits.max_jobs)
    return replace(
        config,
        max_watchers_per_client=watchers,
        max_jobs_per_client=jobs,
        limits=replace(config.limits, max_jobs_per_client=jobs),
    )


def check_retention(config: ServerConfig) -> None:
    if not config.retain_finished >= 0 or config.retain_finished == float("inf"):
        raise ValueError(
            f"retain_finished must be 0 (keep forever) or a positive duration, not {config.retain_finished}"
        )
    if config.limits.max_history_per_job < 0:
        raise ValueError(f"max_history_per_job must be 0 (no limit) or more, not {config.limits.max_history_per_job}")


def check_transport(config: ServerConfig) -> ServerTls | None:
    """The TLS files the config asks for, read and checked, after refusing what is unsafe."""
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ValueError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
    if config.tls_client_ca is not None and config.tls_cert is None:
        raise ValueError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key too")
    refuse_unsafe(config, config.host, "", tls=config.tls_cert is not None)
    if config.tls_cert is not None and config.tls_key is not None:
        return ServerTls(config.tls_cert, config.tls_key, config.tls_client_ca)
    return None


def refuse_unsafe(config: ServerConfig, host: str, what: str, *, tls: bool) -> None:
    """Refuses to listen off loopback where anyone who can reach the port could read and change every job:
    plaintext, or TLS that asks no caller for a credential (TLS keeps eavesdroppers out, not callers), unless
    the operator says ``--insecure``. ``what`` names the listener ("" for gRPC, "HTTP ")."""
    if is_loopback(host) or config.insecure:
        return
    if not tls:
        raise ValueError(
            f"refusing to serve plaintext {what}on {host}: anyone who can reach it could read and change every "
            "job. Give --tls-cert and --tls-key (and --auth-tokens), or --insecure to accept that"
        )
    if config.auth_tokens_file is None and config.tls_client_ca is None:
        raise ValueError(
            f"refusing to serve {what}{host} with TLS but no client authentication: anyone who can reach it "
            "could read and change every job. Give --auth-tokens or --tls-client-ca, or --insecure to accept that"
        )


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and whatever ``extra`` the call passed."""

    _plain = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in record.__dict__.items() if k not in self._plain})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    _plain = JsonFormatter._plain

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = " ".join(f"{k}={v}" for k, v in record.__dict__.items() if k not in self._plain)
        return f"{line} {extra}" if extra else line


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger("jobstate")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def where(config: ServerConfig) -> dict[str, str]:
    """For the startup line: which engine holds the jobs, and where. A person starting the server should not have
    to guess which data dir or etcd it uses. (A listener added later, e.g. HTTP, puts its URL next to these.)"""
    fields = {"store": config.store}
    if config.store == "sqlite" and config.data_dir:
        fields["data_dir"] = os.path.abspath(config.data_dir)
    if config.store == "etcd":
        fields["etcd"] = ",".join(config.etcd_endpoints)
        fields["etcd_prefix"] = config.etcd_prefix
    return fields


async def serve(config: ServerConfig, ready: asyncio.Event | None = None) -> None:
    """Runs the server until SIGTERM or SIGINT, then stops gracefully."""
    app = build_server(config)
    await app.start()
    log.info(
        "serving",
        extra={
            "address": app.target,
            **where(config),
            "history_size": config.history_size,
            "history_bytes": config.history_bytes,
            "max_watchers": config.max_watchers,
            "max_watchers_per_client": app.config.max_watchers_per_client,
            "tls": "mtls" if config.tls_client_ca else ("on" if config.tls_cert else "off"),
            "auth": "tokens" if config.auth_tokens_file else "off",
            "retain_finished": config.retain_finished or "forever",
            "max_history_per_job": config.limits.max_history_per_job or "unlimited",
            **({"metrics_port": app.metrics_port} if app.metrics_port is not None else {}),
            **({"http_address": app.http_url} if app.http_url is not None else {}),
        },
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if (app.security is not None and config.auth_tokens_file) or app.tls is not None:
        loop.add_signal_handler(signal.SIGHUP, app.reload)
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("stopping", extra={"grace_seconds": config.grace, "watchers": app.store.stats().watchers})
    await app.stop()
    log.info("stopped")


def run(config: ServerConfig) -> int:
    """Serves ``config`` on uvloop's event loop when it is installed (measured: about twice the watch fan-out
    throughput and a fifth more unary calls than the default loop; see the README's performance section).
    ``JOBSTATE_EVENT_LOOP=asyncio`` keeps the default loop."""
    loop_factory = None
    if os.environ.get("JOBSTATE_EVENT_LOOP", "uvloop") == "uvloop":
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            log.info("uvloop is not installed; serving on asyncio's default event loop")
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(config))
    return 0
