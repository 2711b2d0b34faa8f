"""Building and running the server process.

``build_server(config)`` assembles a ready ``App`` (grpc.aio server, store, health, reflection) bound to its
port but not started, so tests start a real server on port 0. ``serve(config)`` runs it until SIGTERM or
SIGINT, then shuts down gracefully: health turns NOT_SERVING, watch streams end with UNAVAILABLE /
SHUTTING_DOWN, in-flight calls get ``grace`` seconds to finish, and the process exits 0.
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
from jobstate.server.metrics import Metrics, Observers
from jobstate.server.security import SecurityConfig, SecurityInterceptor, ServerTls, client_share
from jobstate.server.service import SERVICE_NAME, JobStateService, Observer
from jobstate.server.store import Store

log = logging.getLogger("jobstate.server")

# How often the timeout sweeper looks at the earliest deadline; a job times out at most this late.
SWEEP_INTERVAL = 0.1


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    history_size: int = 100_000
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
    _sweeper: asyncio.Task[None] | None = None

    def reload(self) -> None:
        """SIGHUP: the tokens file and the TLS files are read again; each keeps its previous version if the new
        one is broken."""
        if self.security is not None:
            self.security.reload()
        if self.tls is not None:
            self.tls.reload()

    @property
    def target(self) -> str:
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

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
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        self._sweeper = asyncio.create_task(sweep_timeouts(self.store), name="timeout-sweeper")

    async def stop(self, grace: float | None = None) -> None:
        """Health turns NOT_SERVING, watch streams end and new calls are refused with UNAVAILABLE /
        SHUTTING_DOWN, calls already running get ``grace`` seconds (default: the config's) to finish."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.config.grace if grace is None else grace)
        await self.health.enter_graceful_shutdown()
        if self._sweeper is not None:  # first, so no sweep runs into a closed store
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self.service is not None:
            self.service.begin_shutdown()
        # Watch streams end with SHUTTING_DOWN; a persistent engine refuses later writes the same way.
        await self.store.close()
        if self.service is not None:
            await settle(self.service, deadline)
        await self.server.stop(max(0.0, deadline - loop.time()))
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

    grpc.aio's ``server.stop`` cancels the calls it holds queued but not yet handed to the service (the client
    sees CANCELLED) and, when grace ends, whatever still runs. Until it is called, the service answers each new
    call UNAVAILABLE / SHUTTING_DOWN, which clients take as "try again later or elsewhere", and running calls
    finish.
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
    config = with_client_shares(config)
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
    server.add_generic_rpc_handlers((service.handler(),))
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
    return App(replace(config, port=port), server, port, store, health_servicer, metrics, security, service, tls)


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


def check_transport(config: ServerConfig) -> ServerTls | None:
    """The TLS files the config asks for, read and checked, after refusing what is unsafe."""
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ValueError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
    if config.tls_client_ca is not None and config.tls_cert is None:
        raise ValueError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key too")
    if config.tls_cert is not None and config.tls_key is not None:
        if (
            not is_loopback(config.host)
            and not config.insecure
            and config.auth_tokens_file is None
            and config.tls_client_ca is None
        ):
            # TLS keeps eavesdroppers out, not callers: with no credential asked for, every caller is admin.
            raise ValueError(
                f"refusing to serve {config.host} with TLS but no client authentication: anyone who can reach it "
                "could read and change every job. Give --auth-tokens or --tls-client-ca, or --insecure to accept that"
            )
        return ServerTls(config.tls_cert, config.tls_key, config.tls_client_ca)
    if not is_loopback(config.host) and not config.insecure:
        raise ValueError(
            f"refusing to serve plaintext on {config.host}: anyone who can reach it could read and change every "
            "job. Give --tls-cert and --tls-key (and --auth-tokens), or --insecure to accept that"
        )
    return None


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


async def serve(config: ServerConfig, ready: asyncio.Event | None = None) -> None:
    """Runs the server until SIGTERM or SIGINT, then stops gracefully."""
    app = build_server(config)
    await app.start()
    log.info(
        "serving",
        extra={
            "address": app.target,
            "history_size": config.history_size,
            "max_watchers": config.max_watchers,
            "max_watchers_per_client": app.config.max_watchers_per_client,
            "tls": "mtls" if config.tls_client_ca else ("on" if config.tls_cert else "off"),
            "auth": "tokens" if config.auth_tokens_file else "off",
            **({"metrics_port": app.metrics_port} if app.metrics_port is not None else {}),
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
