"""The HTTP listener: one ASGI application, served by uvicorn on the server's own event loop beside grpc.aio.

In front of the Connect/gRPC-Web door (``http_door``) it does what belongs to HTTP rather than to the service,
before any method runs:

- **Host check** against DNS rebinding: a page on any website can point its own name at 127.0.0.1 and become
  same-origin with a local listener, so only requests whose ``Host`` names an allowed host (the loopback names,
  the ``--http-host`` value, ``--http-allowed-host``) are answered; others get 403 and a sentence saying how to
  allow the name.
- **CORS**: a browser page on an origin given with ``--cors-origin`` may call the API (preflight answered; the
  Connect and gRPC-Web request headers allowed, their response headers and ``jobstate-store-id`` exposed).
  No origin is allowed by default.
- **Clear refusals**: an unknown method, HTTP/2 gRPC's content type (served on the gRPC port), and a body
  declared larger than the message limit get a Connect error body saying so.
- **Static files** of the dashboard at ``/`` (``static/`` beside this module, listed once at start: only those
  files are served, so no path can reach outside it).

uvicorn serves HTTP/1.1 (enough for Connect and gRPC-Web), never installs signal handlers (the server's own
``serve`` owns SIGTERM/SIGINT/SIGHUP), and bounds connections (``limit_concurrency``), header size and idle
keep-alive. TLS uses the same certificate and key as gRPC, in one ``ssl.SSLContext`` that a SIGHUP reloads.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import json
import logging
import mimetypes
import socket
import ssl
from collections.abc import Awaitable, Callable, Generator, Iterable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from google.protobuf import json_format
from google.protobuf import message as protobuf_message
from google.rpc import error_details_pb2

from jobstate.server.service import SERVICE_NAME, STORE_ID_KEY

log = logging.getLogger("jobstate.server.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

STATIC_DIR = Path(__file__).resolve().parent / "static"
API_PREFIX = f"/{SERVICE_NAME}/"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
# What a browser may send and read across origins: the Connect and gRPC-Web protocol headers, the bearer
# token, and the store id a resuming Watch presents and receives.
ALLOWED_REQUEST_HEADERS = (
    "content-type, connect-protocol-version, connect-timeout-ms, connect-content-encoding, "
    "connect-accept-encoding, grpc-timeout, x-grpc-web, x-user-agent, authorization, " + STORE_ID_KEY
)
EXPOSED_RESPONSE_HEADERS = (
    "grpc-status, grpc-message, grpc-status-details-bin, content-encoding, connect-content-encoding, " + STORE_ID_KEY
)
PREFLIGHT_MAX_AGE = "7200"
# Bounds of the HTTP listener (SECURITY.md).
MAX_HEADER_BYTES = 64 * 1024  # request line and headers together (h11's incomplete event)
KEEP_ALIVE_SECONDS = 30


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    max_connections: int = 1000
    max_message_bytes: int = 8 * 1024 * 1024
    # TCP keepalive on every connection (HTTP/1.1 has no pings): a peer gone without a FIN is found within
    # keepalive + keepalive_timeout seconds, and its watch streams released, as over gRPC.
    keepalive_seconds: float = 30.0
    keepalive_timeout_seconds: float = 10.0


def _host_name(host_header: str) -> str:
    """``example.com:8080`` → ``example.com``; ``[::1]:8080`` → ``::1``."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def allowed_host_names(config: HttpConfig) -> frozenset[str]:
    names = set(LOOPBACK_NAMES) | {h.lower().strip("[]") for h in config.allowed_hosts}
    names.add(config.host.lower().strip("[]"))
    return frozenset(n.strip("[]") for n in names)


def _is_loopback_ip(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"code": code, "message": message}).encode()


class HttpApp:
    """The ASGI application of the HTTP listener (see the module doc)."""

    def __init__(self, api: ASGIApp, config: HttpConfig, static_dir: Path = STATIC_DIR) -> None:
        self.api = api
        self.config = config
        self.hosts = allowed_host_names(config)
        self.origins = frozenset(o.rstrip("/") for o in config.cors_origins)
        self.methods = frozenset(f"{API_PREFIX}{name}" for name in _method_names())
        self.static = _list_static(static_dir)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        headers = _headers(scope)
        host = _host_name(headers.get("host", ""))
        if host not in self.hosts and not _is_loopback_ip(host):
            log.info("request refused: host not allowed", extra={"host": host, "path": scope.get("path")})
            await _respond(
                send,
                403,
                _error_body(
                    "permission_denied",
                    f"host {host or '(none)'!r} is not served here (a DNS rebinding guard); "
                    f"start the server with --http-allowed-host {host or 'NAME'} to allow it",
                ),
            )
            return
        origin = headers.get("origin")
        cors = origin is not None and origin.rstrip("/") in self.origins
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            await self._preflight(send, origin, cors)
            return
        if cors:
            send = _with_cors(send, origin or "")
        path: str = scope["path"]
        if path.startswith(API_PREFIX):
            await self._api(scope, receive, send, headers, path)
            return
        await self._static_file(scope, send, path)

    async def _preflight(self, send: Send, origin: str | None, allowed: bool) -> None:
        if not allowed:
            await _respond(
                send,
                403,
                _error_body(
                    "permission_denied",
                    f"origin {origin!r} may not call this server; start it with --cors-origin {origin} to allow it",
                ),
            )
            return
        await _respond(
            send,
            204,
            b"",
            content_type=None,
            extra=[
                (b"access-control-allow-origin", (origin or "").encode()),
                (b"access-control-allow-methods", b"GET, POST"),
                (b"access-control-allow-headers", ALLOWED_REQUEST_HEADERS.encode()),
                (b"access-control-max-age", PREFLIGHT_MAX_AGE.encode()),
                (b"vary", b"Origin"),
            ],
        )

    async def _api(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], path: str) -> None:
        if path not in self.methods:
            name = path[len(API_PREFIX) :]
            await _respond(
                send,
                404,
                _error_body(
                    "unimplemented",
                    f"{SERVICE_NAME} has no method {name!r}; it has {', '.join(sorted(_method_names()))}",
                ),
            )
            return
        content_type = headers.get("content-type", "")
        if content_type == "application/grpc" or content_type.startswith("application/grpc+"):
            await _respond(
                send,
                415,
                _error_body("unimplemented", "gRPC over HTTP/2 is served on the gRPC port; here: Connect, gRPC-Web"),
            )
            return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.config.max_message_bytes:
            await _respond(
                send,
                413,
                _error_body(
                    "resource_exhausted",
                    f"the request body is {length} bytes, over the limit of {self.config.max_message_bytes}",
                ),
            )
            return
        await self.api(scope, receive, send_with_length(send))

    async def _static_file(self, scope: Scope, send: Send, path: str) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            await _respond(send, 405, b"only GET here\n", content_type=b"text/plain", extra=[(b"allow", b"GET, HEAD")])
            return
        name = "index.html" if path in ("/", "") else path.lstrip("/")
        file = self.static.get(name)
        if file is None:
            if path in ("/", ""):
                body = (
                    b"jobstate: the dashboard is not built in this install. The API is here: POST "
                    + API_PREFIX.encode()
                    + b"<Method> (Connect, gRPC-Web) or GET for the reads.\n"
                )
                await _respond(send, 200, body, content_type=b"text/plain; charset=utf-8")
                return
            await _respond(send, 404, b"not found\n", content_type=b"text/plain")
            return
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind in ("application/javascript", "application/json"):
            kind += "; charset=utf-8"
        body = file.read_bytes()
        await _respond(
            send,
            200,
            b"" if scope["method"] == "HEAD" else body,
            content_type=kind.encode(),
            extra=[
                (b"cache-control", b"no-cache"),
                (b"x-content-type-options", b"nosniff"),
                (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; style-src 'self'"),
                (b"x-frame-options", b"DENY"),
            ],
            length=len(body),
        )


def _method_names() -> list[str]:
    from jobstate.v1 import job_state_service_pb2 as spb

    return [m.name for m in spb.DESCRIPTOR.services_by_name["JobStateService"].methods]


def _list_static(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def _headers(scope: Scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in scope.get("headers", ()):
        out.setdefault(key.decode("latin-1"), value.decode("latin-1"))
    return out


# Error details a person reading curl's output is shown decoded, in the Connect error's optional "debug" field.
_DEBUG_DETAILS: dict[str, type[protobuf_message.Message]] = {
    "google.rpc.ErrorInfo": error_details_pb2.ErrorInfo,
    "google.rpc.RetryInfo": error_details_pb2.RetryInfo,
}


def with_debug(body: bytes) -> bytes:
    """A Connect error body whose ErrorInfo and RetryInfo details also carry their JSON form as ``debug``."""
    try:
        doc = json.loads(body)
        for detail in doc.get("details", ()):
            kind = _DEBUG_DETAILS.get(detail.get("type", ""))
            if kind is not None and "debug" not in detail:
                value = detail["value"]
                decoded = kind.FromString(base64.b64decode(value + "=" * (-len(value) % 4)))
                detail["debug"] = json_format.MessageToDict(decoded)
    except (ValueError, TypeError, AttributeError, KeyError, protobuf_message.DecodeError):
        return body  # not the error body expected: sent as it is
    return json.dumps(doc).encode()


def send_with_length(send: Send) -> Send:
    """A response sent whole (a unary call's) gets a Content-Length instead of chunked framing (one write fewer a
    call, and a length curl shows), and an error's details their ``debug`` form. A streamed response is passed on
    as it comes."""
    held: Message | None = None

    async def send_sized(message: Message) -> None:
        nonlocal held
        kind = message["type"]
        if kind == "http.response.start":
            held = message
            return
        if held is not None:
            start, held = held, None
            if kind == "http.response.body" and not message.get("more_body", False):
                body = message["body"]
                if start["status"] >= 400 and (b"content-type", b"application/json") in start.get("headers", ()):
                    body = message["body"] = with_debug(body)
                start["headers"] = [*start.get("headers", ()), (b"content-length", str(len(body)).encode())]
            await send(start)
        await send(message)

    return send_sized


def _with_cors(send: Send, origin: str) -> Send:
    async def cors_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [
                *message.get("headers", ()),
                (b"access-control-allow-origin", origin.encode()),
                (b"access-control-expose-headers", EXPOSED_RESPONSE_HEADERS.encode()),
                (b"vary", b"Origin"),
            ]
        await send(message)

    return cors_send


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    *,
    content_type: bytes | None = b"application/json",
    extra: Iterable[tuple[bytes, bytes]] = (),
    length: int | None = None,
) -> None:
    headers = [(b"content-length", str(len(body) if length is None else length).encode()), *extra]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


# --- running it --------------------------------------------------------------------------------------------


class HttpTls:
    """The HTTP listener's TLS: one context, its certificate reloaded in place (new connections get it)."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str | None) -> None:
        self.cert_file, self.key_file, self.client_ca_file = cert_file, key_file, client_ca_file
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.set_alpn_protocols(["http/1.1"])
        self.context.load_cert_chain(cert_file, key_file)
        if client_ca_file:
            self.context.load_verify_locations(client_ca_file)
            self.context.verify_mode = ssl.CERT_REQUIRED

    def reload(self) -> bool:
        try:
            # A pair that does not match raises before anything is replaced.
            self.context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            log.error("HTTP TLS files not reloaded, keeping the previous ones", extra={"error": str(exc)})
            return False
        return True


def _keepalive(sock: socket.socket, idle: float, timeout: float) -> None:
    """TCP keepalive for the connections accepted on ``sock`` (Linux copies these options to them)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    probes = 3
    for name, value in (
        ("TCP_KEEPIDLE", max(1, int(idle))),
        ("TCP_KEEPINTVL", max(1, int(timeout / probes))),
        ("TCP_KEEPCNT", probes),
    ):
        option = getattr(socket, name, None)
        if option is not None:  # not every platform has all three
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: it shares the loop, and the process's signals, with grpc."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class HttpListener:
    """The bound socket and the uvicorn server that serves ``app`` on it."""

    def __init__(self, app: ASGIApp, config: HttpConfig, tls: HttpTls | None) -> None:
        self.config = config
        self.tls = tls
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        # Bound now, so a taken port fails the build before anything starts.
        try:
            self.socket = socket.create_server((config.host, config.port), family=family, backlog=1024)
        except OSError as exc:
            raise OSError(f"cannot listen on {config.host}:{config.port} (HTTP): {exc.strerror or exc}") from exc
        self.port = int(self.socket.getsockname()[1])
        _keepalive(self.socket, config.keepalive_seconds, config.keepalive_timeout_seconds)
        uv = uvicorn.Config(
            app,
            # h11, not httptools: h11 takes the header bound below (httptools cut the server's CPU a unary call
            # by about a quarter in one probe, but gives no such bound).
            http="h11",
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            limit_concurrency=config.max_connections,
            timeout_keep_alive=KEEP_ALIVE_SECONDS,
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
            ssl_context_factory=(lambda _config, _default: tls.context) if tls is not None else None,
        )
        self.server = _Server(uv)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.server.serve(sockets=[self.socket]), name="http-listener")
        while not self.server.started:
            if self._task.done():
                await self._task  # raises what stopped it
                raise OSError("the HTTP listener stopped while starting")
            await asyncio.sleep(0.005)

    async def stop(self, grace: float) -> None:
        """Closes the listener and idle connections; requests still running get ``grace`` seconds."""
        if self._task is None:
            self.socket.close()
            return
        self.server.config.timeout_graceful_shutdown = max(0, int(grace + 0.999))
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace + 1.0)
        except TimeoutError:
            self.server.force_exit = True
            with contextlib.suppress(BaseException):
                await self._task
        self._task = None
