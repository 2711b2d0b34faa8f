"""Who may call what: TLS credentials, bearer tokens and roles, per-client limits.

- ``ServerTls`` reads the TLS files: server certificate and key, and optionally a client CA, which makes
  client certificates required and verified (mTLS); a reload (SIGHUP) reads them again for new connections.
- ``TokenTable`` is a parsed tokens file: ``token role [name]`` lines, and ``cert:CN role [name]`` lines that
  give a role to a verified client certificate by its subject CN. A token is looked up by comparing its
  SHA-256 digest with every known digest in constant time, so neither timing nor an early exit tells how
  much of a guess was right, and the table never holds a token in the clear once parsed.
- ``SecurityInterceptor`` checks each call to ``jobstate.v1.JobStateService`` before the servicer sees it:
  who is calling (token or certificate), whether the role allows the method, the caller's read and write
  rates, and its open watch streams against its share and the server's total. Health and reflection need no
  credential, so probes need nothing, but ``Health/Watch`` streams count against the same watch limits.
  The decisions (``identify``, ``admit``, ``watch_slot``, ``watching``) take plain values, not grpc's call
  context, so the HTTP door (``jobstate.server.http_door``) asks the same object the same questions.
- ``client_share`` is what one client may hold of a global limit unless configured otherwise (all but a tenth).
- ``RefusalLog`` keeps refused calls from flooding the log: the first per client per interval, then a count.
  A reload of the tokens file checks every open watch stream again: one whose token (or certificate name) is
  no longer accepted ends with ``UNAUTHENTICATED``; the others go on.

Tokens never reach a log line: failures log the peer and the reason, a known caller by its name.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import hmac
import logging
import ssl
import stat
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from jobstate.server import errors
from jobstate.server.service import CALLER, SERVICE_NAME, Observer, to_status, wire_of

log = logging.getLogger("jobstate.server.security")

MIN_TOKEN_LENGTH = 16
CERT_PREFIX = "cert:"


class Role(enum.IntEnum):
    """Each role may do everything the roles below it may."""

    READER = 1
    WRITER = 2
    ADMIN = 3


READ_METHODS = frozenset({"GetJob", "ListJobs", "GetJobHistory", "Watch"})
WRITE_METHODS = frozenset({"CreateJob", "UpdateJobState", "CreateExecution", "UpdateExecution", "DeleteJob"})
# The role each method needs; a method of the service missing here needs ADMIN (safe for RPCs added later).
REQUIRED_ROLE: dict[str, Role] = {
    **dict.fromkeys(READ_METHODS, Role.READER),
    **dict.fromkeys(WRITE_METHODS, Role.WRITER),
}


@dataclass(frozen=True, slots=True)
class Principal:
    """A caller as the server knows it: a name for logs and per-client limits, and a role."""

    name: str
    role: Role


# --- TLS ---------------------------------------------------------------------------------------------------


class ServerTls:
    """The server's TLS files, read again on ``reload`` (SIGHUP) so a renewed certificate needs no restart.

    grpc asks ``fetch`` before each new connection's handshake: it gets the files read by the last good reload
    once, then None (keep what you have). Connections already open keep the certificate they started with.
    A reload checks that the certificate and key match and that the CA parses before anything is replaced, so a
    half-written renewal is refused (logged) and the server goes on with the previous files.
    """

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str | None = None) -> None:
        self.cert_file, self.key_file, self.client_ca_file = cert_file, key_file, client_ca_file
        self._initial = self._read()
        self._next: grpc.ServerCertificateConfiguration | None = None

    def _contents(self) -> tuple[bytes, bytes, bytes | None]:
        ca = Path(self.client_ca_file).read_bytes() if self.client_ca_file else None
        return Path(self.cert_file).read_bytes(), Path(self.key_file).read_bytes(), ca

    def _read(self) -> grpc.ServerCertificateConfiguration:
        cert, key, ca = self._contents()
        check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            check.load_cert_chain(self.cert_file, self.key_file)
            if self.client_ca_file:
                check.load_verify_locations(self.client_ca_file)
        except ssl.SSLError as exc:
            raise ValueError(f"TLS files {self.cert_file}, {self.key_file}: {exc.reason or exc}") from exc
        # ssl checked the files by name: what it read must be what grpc gets, not a renewal written meanwhile.
        if self._contents() != (cert, key, ca):
            raise ValueError("TLS files changed while being read; send SIGHUP again once they are written")
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial,
            self.fetch,  # type: ignore[arg-type]  # the stubs leave out None, which grpc reads as "no change"
            require_client_authentication=self.client_ca_file is not None,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by grpc's own threads: one assignment each way, no lock needed under the GIL.
        config, self._next = self._next, None
        return config

    def reload(self) -> bool:
        try:
            self._next = self._read()
        except (OSError, ValueError) as exc:
            log.error("TLS files not reloaded, keeping the previous ones", extra={"error": str(exc)})
            return False
        log.info("TLS files reloaded: new connections use them", extra={"cert": self.cert_file})
        return True


# --- tokens ------------------------------------------------------------------------------------------------


def _digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


@dataclass
class TokenTable:
    """A parsed tokens file. ``lookup`` takes time independent of which token (if any) matches."""

    tokens: list[tuple[bytes, Principal]] = field(default_factory=list)
    certs: dict[str, Principal] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, source: str = "tokens file") -> TokenTable:
        """Parses ``token role [name]`` and ``cert:CN role [name]`` lines; ``#`` starts a comment.

        Errors name the file and line, never the token.
        """
        table = cls()
        seen: set[bytes] = set()
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            where = f"{source} line {number}"
            if len(parts) not in (2, 3):
                raise ValueError(f"{where}: expected 'token role [name]', found {len(parts)} fields")
            secret, role_name = parts[0], parts[1]
            try:
                role = Role[role_name.upper()]
            except KeyError:
                # Not the field's content: with the columns swapped (``admin <token>``) it is the token.
                raise ValueError(f"{where}: the second field is not a role (reader, writer or admin)") from None
            if secret.startswith(CERT_PREFIX):
                cn = secret[len(CERT_PREFIX) :]
                if not cn:
                    raise ValueError(f"{where}: 'cert:' needs the certificate's subject CN")
                table.certs[cn] = Principal(parts[2] if len(parts) == 3 else cn, role)
                continue
            if len(secret) < MIN_TOKEN_LENGTH:
                raise ValueError(f"{where}: token shorter than {MIN_TOKEN_LENGTH} characters")
            digest = _digest(secret)
            if digest in seen:
                raise ValueError(f"{where}: the same token appears twice")
            seen.add(digest)
            # Without a name the caller is known by a short fingerprint: stable across reloads, and useless
            # for guessing the token.
            name = parts[2] if len(parts) == 3 else "token-" + digest.hex()[:8]
            table.tokens.append((digest, Principal(name, role)))
        return table

    @classmethod
    def load(cls, path: str) -> TokenTable:
        p = Path(path)
        mode = p.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("tokens file is readable by others; chmod 600 it", extra={"path": str(p)})
        return cls.parse(p.read_text(), str(p))

    def lookup(self, token: str | bytes) -> Principal | None:
        presented = _digest(token)
        found: Principal | None = None
        for digest, principal in self.tokens:
            # No early exit: every call compares against every token.
            if hmac.compare_digest(digest, presented):
                found = principal
        return found


# --- rate limiting -----------------------------------------------------------------------------------------


class RateLimiter:
    """A token bucket per client: ``rate`` writes a second on average, bursts of up to ``burst``."""

    MAX_CLIENTS = 100_000

    def __init__(self, rate: float, burst: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = float(burst if burst > 0 else max(1, round(rate)))
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """Takes one write for ``key``: 0 if allowed, otherwise the seconds until one would be."""
        now = self._clock()
        level, last = self._buckets.get(key, (self.burst, now))
        level = min(self.burst, level + (now - last) * self.rate)
        if level >= 1:
            self._buckets[key] = (level - 1, now)
            if len(self._buckets) > self.MAX_CLIENTS:
                self._prune(now)
            return 0.0
        self._buckets[key] = (level, now)
        return (1 - level) / self.rate

    def _prune(self, now: float) -> None:
        # A bucket that has refilled is the same as no bucket: forgetting it bounds memory under many peers.
        full = [k for k, (level, last) in self._buckets.items() if level + (now - last) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]


# --- the log of refused calls ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Window:
    count: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class RefusalLog:
    """Refused calls in the log at most twice per client per ``interval``: the first in full when it happens,
    then, when the interval ends, one line with how many more were refused and why.

    A client hammering the server with bad calls must not turn the log into the flood (2,000 unauthenticated
    calls once wrote 1,826 lines). At most ``MAX_CLIENTS`` clients have a window at once; beyond that, refusals
    share one window named ``*``, so a swarm of addresses costs bounded memory and still shows in the log.
    """

    MAX_CLIENTS = 10_000
    OTHERS = "*"

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._windows: dict[str, _Window] = {}

    def refused(self, client: str, method: str, peer: str, exc: errors.JobStateError) -> None:
        window = self._windows.get(client)
        if window is None and len(self._windows) >= self.MAX_CLIENTS:
            client = self.OTHERS
            window = self._windows.get(client)
        if window is not None:
            window.count += 1
            window.reasons[exc.reason] = window.reasons.get(exc.reason, 0) + 1
            return
        log.info(
            "call refused",
            extra={"client": client, "method": method, "peer": peer, "reason": exc.reason, "why": exc.message},
        )
        self._windows[client] = _Window()
        asyncio.get_running_loop().call_later(self.interval, self._end, client)

    def _end(self, client: str) -> None:
        window = self._windows.pop(client, None)
        if window is not None and window.count:
            log.info(
                "calls refused",
                extra={
                    "client": client,
                    "refused": window.count,
                    "reasons": ",".join(f"{r}={n}" for r, n in sorted(window.reasons.items())),
                    "seconds": self.interval,
                },
            )

    def flush(self) -> None:
        """Writes every pending count now (at shutdown, so the last window is not lost)."""
        for client in list(self._windows):
            self._end(client)


# --- the interceptor ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SecurityConfig:
    auth_tokens_file: str | None = None
    # Without a tokens file but with mTLS, a verified certificate is enough: the CA is the trust.
    mtls: bool = False
    write_rate_per_client: float = 0.0  # writes a second; 0: unlimited
    write_burst_per_client: int = 0  # 0: one second's worth
    read_rate_per_client: float = 0.0  # reads a second (GetJob, ListJobs, GetJobHistory, Watch); 0: unlimited
    read_burst_per_client: int = 0  # 0: one second's worth
    # Watch streams (jobstate's and grpc.health.v1.Health/Watch alike) in total and per client; 0: unlimited.
    max_watchers: int = 0
    max_watchers_per_client: int = 0
    # The store limits jobs per client by the name it is given with each CreateJob (CALLER).
    track_job_owners: bool = False
    # Refused calls are logged once per client per this many seconds, with a count (RefusalLog).
    refusal_log_interval: float = 10.0

    @property
    def needed(self) -> bool:
        return bool(self.guard_unary or self.max_watchers or self.max_watchers_per_client)

    @property
    def guard_unary(self) -> bool:
        """Whether unary calls need the interceptor at all (it costs each call a few microseconds)."""
        return bool(
            self.auth_tokens_file or self.write_rate_per_client or self.read_rate_per_client or self.track_job_owners
        )


def client_share(limit: int) -> int:
    """What one client may hold of a global ``limit`` unless told otherwise: all but a tenth of it (at least one),
    which stays for the other clients whatever one client does. 0 (no limit) stays 0."""
    if limit <= 0:
        return 0
    return max(1, limit - max(1, -(-limit // 10)))


def peer_host(peer: str) -> str:
    """``ipv4:127.0.0.1:5000`` → ``127.0.0.1``; ``ipv6:[::1]:5000`` → ``::1``."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return peer


def _authorization(metadata: Sequence[Any] | None) -> str | None:
    for item in metadata or ():
        key, value = item[0], item[1]
        if key == "authorization":
            return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return None


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value; None without one, "" for any other scheme."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return ""  # present but not a bearer token: as bad as an unknown one


Context = grpc.aio.ServicerContext[Any, Any]


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # not subscriptable at run time
    _Interceptor = grpc.aio.ServerInterceptor


async def _close(messages: AsyncIterator[Any]) -> None:
    aclose = getattr(messages, "aclose", None)
    if aclose is not None:
        await aclose()


@dataclass(eq=False, slots=True)
class _OpenStream:
    """A watch stream as a reload needs it: how its caller authenticated, and the task serving it."""

    method: str
    # Asks again who the caller is (raises when its credential is no longer accepted).
    recheck: Callable[[], Principal]
    task: asyncio.Task[Any] | None
    revoked: errors.JobStateError | None = None
    # True while the task waits for the service's next message. Only then may a reload cancel it: cancelled
    # anywhere else (inside grpc, sending the last message), the call would be left open with no status.
    waiting: bool = False

    def revoke(self, exc: errors.JobStateError) -> None:
        if self.revoked is not None:
            return
        self.revoked = exc
        if self.waiting and self.task is not None:
            self.task.cancel()  # the stream's guard turns the cancellation into ``exc``


HEALTH_WATCH = "/grpc.health.v1.Health/Watch"


class SecurityInterceptor(_Interceptor):
    """Authentication, roles, read and write rates and watch streams (in total and per client) for
    ``jobstate.v1.JobStateService``; ``grpc.health.v1.Health/Watch`` streams are counted under the same watch
    limits (they need no credential, so a caller without one is counted by its address)."""

    def __init__(self, config: SecurityConfig) -> None:
        self.config = config
        self.tokens: TokenTable | None = None
        if config.auth_tokens_file:
            self.tokens = TokenTable.load(config.auth_tokens_file)
        self.limiter = (
            RateLimiter(config.write_rate_per_client, config.write_burst_per_client)
            if config.write_rate_per_client > 0
            else None
        )
        self.read_limiter = (
            RateLimiter(config.read_rate_per_client, config.read_burst_per_client)
            if config.read_rate_per_client > 0
            else None
        )
        # Open watch streams by client, and in total (health watches included).
        self.watchers: dict[str, int] = {}
        self.watcher_total = 0
        self.streams: set[_OpenStream] = set()
        # Refused calls never reach the service, so they are reported to its observer (metrics) from here.
        self.observer: Observer | None = None
        self.refusals = RefusalLog(config.refusal_log_interval)

    # -- the tokens file -----------------------------------------------------------------------------------

    def reload(self) -> bool:
        """Reads the tokens file again (on SIGHUP). Open watch streams whose caller the new table no longer
        accepts end with UNAUTHENTICATED (or PERMISSION_DENIED); a bad file keeps the old table and every stream."""
        if not self.config.auth_tokens_file:
            return False
        try:
            table = TokenTable.load(self.config.auth_tokens_file)
        except (OSError, ValueError) as exc:
            log.error("tokens file not reloaded, keeping the previous one", extra={"error": str(exc)})
            return False
        self.tokens = table
        ended = 0
        for stream in list(self.streams):
            try:
                self.authorize(stream.recheck(), stream.method)
            except errors.JobStateError as exc:
                if stream.revoked is None:
                    stream.revoke(exc)  # ends it now if it waits, else when it next asks for a message
                    ended += 1
        log.info(
            "tokens file reloaded",
            extra={"tokens": len(table.tokens), "certs": len(table.certs), "streams_ended": ended},
        )
        return True

    # -- checks --------------------------------------------------------------------------------------------

    def authenticate(self, metadata: Sequence[Any] | None, context: Context) -> Principal:
        return self.identify(_authorization(metadata), self._cert_cn(context), peer_host(context.peer()))

    def identify(self, authorization: str | None, cert_cn: str | None, peer: str) -> Principal:
        """Who calls: by its ``Authorization`` value, else its verified certificate's CN; ``peer`` (its address)
        names it when the server has no tokens file."""
        cn = cert_cn
        table = self.tokens
        if table is None:
            # No tokens: everyone who got through TLS (if any) may do everything; limits key on who it is.
            return Principal(cn or peer, Role.ADMIN)
        token = bearer(authorization)
        if token is not None:
            principal = table.lookup(token) if token else None
            if principal is None:
                raise errors.Unauthenticated("the bearer token is not valid")
            return principal
        if cn is not None:
            principal = table.certs.get(cn)
            if principal is not None:
                return principal
        raise errors.Unauthenticated("this call needs 'authorization: Bearer <token>' metadata (an HTTP header)")

    def _cert_cn(self, context: Context) -> str | None:
        if not self.config.mtls:
            return None
        names = context.auth_context().get("x509_common_name")
        if not names:
            return None
        value = next(iter(names))
        return value.decode(errors="replace") if isinstance(value, bytes) else str(value)

    def authorize(self, principal: Principal, method: str) -> None:
        need = REQUIRED_ROLE.get(method, Role.ADMIN)
        if principal.role < need:
            raise errors.PermissionDenied(
                f"{principal.role.name.lower()} may not call {method}; it needs {need.name.lower()}",
                role=principal.role.name.lower(),
                required_role=need.name.lower(),
            )

    def admit(self, principal: Principal, method: str) -> None:
        self.authorize(principal, method)
        if method in WRITE_METHODS:
            limiter, kind = self.limiter, "writes"
        elif method in READ_METHODS:
            limiter, kind = self.read_limiter, "reads"
        else:
            return
        if limiter is not None:
            wait = limiter.take(principal.name)
            if wait > 0:
                raise errors.RateLimited(
                    f"{principal.name} {kind} faster than {limiter.rate:g}/s; retry in {wait * 1000:.0f}ms",
                    retry_after=wait,
                )

    def admit_watcher(self, client: str) -> None:
        """Refuses one more watch stream over the server's or the client's limit."""
        total, mine = self.config.max_watchers, self.config.max_watchers_per_client
        if total and self.watcher_total >= total:
            raise errors.ResourceLimit(
                f"the server already has {self.watcher_total} watch streams open, its limit", limit="max_watchers"
            )
        if mine and self.watchers.get(client, 0) >= mine:
            raise errors.ResourceLimit(
                f"{client} already has {mine} watch streams open, its limit", limit="max_watchers_per_client"
            )

    def _opened(self, client: str) -> None:
        self.watchers[client] = self.watchers.get(client, 0) + 1
        self.watcher_total += 1

    def _closed(self, client: str) -> None:
        self.watcher_total -= 1
        left = self.watchers[client] - 1
        if left:
            self.watchers[client] = left
        else:
            del self.watchers[client]

    def watch_slot(self, principal: Principal) -> None:
        """Refuses a new watch stream over the server's or the caller's limit of them."""
        self.admit_watcher(principal.name)

    async def watching(
        self, principal: Principal, method: str, recheck: Callable[[], Principal], messages: AsyncIterator[Any]
    ) -> AsyncGenerator[Any, None]:
        """Yields ``messages`` while the caller holds one of its watch slots. A reload that no longer accepts
        the caller (``recheck``) ends it: ``messages`` is closed (its watcher released) and the reason raised."""
        key = principal.name
        self._opened(key)
        try:
            if self.tokens is None:
                # Nothing can revoke this caller: pass the messages on with nothing more per message.
                async for item in messages:
                    yield item
                return
            stream = _OpenStream(method, recheck, None)
            self.streams.add(stream)
            try:
                while stream.revoked is None:
                    # Whichever task asks for this message is the one a reload cancels.
                    stream.task = asyncio.current_task()
                    stream.waiting = True
                    try:
                        item = await anext(messages)
                    except StopAsyncIteration:
                        return
                    except asyncio.CancelledError:
                        if stream.revoked is None or stream.task is None:
                            raise
                        # Cancelled by a reload that no longer accepts this caller: end with the reason.
                        stream.task.uncancel()
                        break
                    finally:
                        stream.waiting = False
                    yield item
                await _close(messages)
                raise stream.revoked
            finally:
                self.streams.discard(stream)
        finally:
            self._closed(key)

    # -- wiring --------------------------------------------------------------------------------------------

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        if handler is None:
            return handler
        metadata = details.invocation_metadata
        if details.method == HEALTH_WATCH and handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._guard_health_watch(handler.unary_stream, metadata),  # type: ignore[arg-type]
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        service, _, method = details.method.lstrip("/").partition("/")
        if service != SERVICE_NAME:
            return handler
        if handler.unary_unary is not None:
            if not self.config.guard_unary:
                return handler
            return grpc.unary_unary_rpc_method_handler(
                self._guard_unary(handler.unary_unary, method, metadata),  # type: ignore[arg-type]
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._guard_stream(handler.unary_stream, method, metadata),  # type: ignore[arg-type]
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def refused(
        self, method: str, peer: str, exc: errors.JobStateError, protocol: str, client: str | None = None
    ) -> None:
        """Logs (a line per client per interval, RefusalLog) and counts a call refused here: it never reaches
        the service, which counts the others. An unauthenticated caller is known only by its address."""
        self.refusals.refused(client or peer_host(peer), method, peer, exc)
        if self.observer is not None:
            self.observer.observe(method, wire_of(exc).grpc, 0.0, protocol)

    async def _refuse(
        self,
        context: Context,
        method: str,
        exc: errors.JobStateError,
        client: str | None = None,
        *,
        observe: bool = True,
    ) -> None:
        if observe:
            self.refused(method, context.peer(), exc, "grpc", client)
        else:
            self.refusals.refused(client or peer_host(context.peer()), method, context.peer(), exc)
        status = to_status(exc)
        await context.abort(status.code, status.details, status.trailing_metadata)

    def _guard_unary(
        self, inner: Callable[[Any, Context], Awaitable[Any]], method: str, metadata: Sequence[Any] | None
    ) -> Callable[[Any, Context], Awaitable[Any]]:
        async def guarded(request: Any, context: Context) -> Any:
            principal: Principal | None = None
            try:
                principal = self.authenticate(metadata, context)
                self.admit(principal, method)
            except errors.JobStateError as exc:
                await self._refuse(context, method, exc, principal.name if principal else None)
            assert principal is not None  # _refuse ends the call
            CALLER.set(principal.name)  # the service's own task: the store counts the jobs it creates per caller
            return await inner(request, context)

        return guarded

    def _guard_stream(
        self, inner: Callable[[Any, Context], AsyncIterator[Any]], method: str, metadata: Sequence[Any] | None
    ) -> Callable[[Any, Context], AsyncIterator[Any]]:
        async def guarded(request: Any, context: Context) -> AsyncIterator[Any]:
            principal: Principal | None = None
            try:
                principal = self.authenticate(metadata, context)
                self.admit(principal, method)
                self.watch_slot(principal)
            except errors.JobStateError as exc:
                await self._refuse(context, method, exc, principal.name if principal else None)
            assert principal is not None  # _refuse ends the call
            messages = aiter(inner(request, context))
            try:
                recheck = lambda: self.authenticate(metadata, context)  # noqa: E731
                async with (
                    contextlib.aclosing(messages),  # type: ignore[type-var]
                    contextlib.aclosing(self.watching(principal, method, recheck, messages)) as items,
                ):
                    async for item in items:
                        yield item
            except errors.JobStateError as exc:
                # Revoked by a reload: the watcher is released; end the call with the reason. (The service
                # counts a stream cut short as cancelled; the reason goes to the client only.) The door never
                # raises domain errors (it aborts), so this is the reload's.
                await self._refuse(context, method, exc, principal.name, observe=False)

        return guarded

    def _guard_health_watch(
        self, inner: Callable[[Any, Context], Awaitable[None]], metadata: Sequence[Any] | None
    ) -> Callable[[Any, Context], Awaitable[None]]:
        async def guarded(request: Any, context: Context) -> None:
            # Health needs no credential; a caller that shows a valid one is counted as itself.
            try:
                client = self.authenticate(metadata, context).name
            except errors.JobStateError:
                client = self._cert_cn(context) or peer_host(context.peer())
            try:
                self.admit_watcher(client)
            except errors.JobStateError as exc:
                await self._refuse(context, "Health.Watch", exc, client, observe=False)
            self._opened(client)
            try:
                await inner(request, context)
            finally:
                self._closed(client)

        return guarded
