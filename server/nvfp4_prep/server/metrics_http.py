"""The ``/metrics`` listener: few threads, connections with a time limit, TLS and a bearer token like gRPC.

prometheus-client's ``start_http_server`` gives every connection a thread of
its own without any timeout, so idle connections pile up threads without end
(800 connections, 810 threads). Here a connection is closed ``timeout``
seconds after it was accepted whatever it is doing (idle, dripping bytes, a
stalled TLS handshake), at most ``max_handlers`` connections are served at
once and any beyond that are closed at once, and each connection carries one
request (HTTP/1.0). With the server's certificate it speaks HTTPS (wanting a
client certificate under mutual TLS), and with tokens a scrape without
``Authorization: Bearer <token>`` gets 401, counted in the server's
``RefusalLog``. Nothing the caller sent (its path, its headers) is logged.
"""

from __future__ import annotations

import gzip
import logging
import socket
import socketserver
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import urlsplit

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from .auth import TokenSet, bearer_token, read_token_file, refusal_reason
from .config import ConfigError, ServeConfig
from .refusals import DESCRIPTIONS, METRICS, RefusalLog
from .tls import https_context

log = logging.getLogger(__name__)

PATH = "/metrics"
# Seconds a connection may stay open, from accept to close: a scrape takes milliseconds.
CONNECTION_TIMEOUT = 10.0
# Connections served at once, each on its own thread; Prometheus scrapes with one.
MAX_HANDLERS = 16
# Connections the kernel queues before accept: a burst is accepted (and closed if need be) quickly.
BACKLOG = 128
# How often the accept loop checks for connections past their time, in seconds.
POLL_INTERVAL = 0.25
THREAD_PREFIX = "nvfp4-prep-metrics"


class _Handler(BaseHTTPRequestHandler):
    server: _Listener
    server_version = "nvfp4-prep"

    def do_GET(self) -> None:
        if urlsplit(self.path).path != PATH:
            self._reply(404, b"not found: only /metrics is served here\n", [("Content-Type", "text/plain")])
            return
        if self.server.tokens is not None:
            reason = refusal_reason(self.server.tokens, bearer_token(self.headers.get("Authorization")))
            if reason is not None:
                self.server.refusals.refused(METRICS, reason, f"{self.client_address[0]}:{self.client_address[1]}")
                self._reply(401, f"the scrape carried {DESCRIPTIONS[reason]} (expected 'Authorization: Bearer "
                                 "<token>' with a token from --metrics-token-file or --auth-token-file)\n".encode(),
                            [("Content-Type", "text/plain"), ("WWW-Authenticate", 'Bearer realm="nvfp4-prep"')])
                return
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        body = encoder(self.server.collector)
        headers = [("Content-Type", content_type)]
        if "gzip" in (self.headers.get("Accept-Encoding") or "").lower():
            body = gzip.compress(body)
            headers.append(("Content-Encoding", "gzip"))
        self._reply(200, body, headers)

    def _reply(self, code: int, body: bytes, headers: list[tuple[str, str]]) -> None:
        self.send_response(code)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Request lines carry the caller's path and would flood the log: nothing is logged per request."""


class _Listener(HTTPServer):
    """An HTTPServer that runs each connection on a thread of its own, at most ``max_handlers`` at once, and
    shuts every connection down ``timeout`` seconds after accepting it."""

    request_queue_size = BACKLOG

    def __init__(self, address: tuple[str, int], collector: Collector, ssl_context: ssl.SSLContext | None,
                 tokens: TokenSet | None, refusals: RefusalLog, timeout: float, max_handlers: int) -> None:
        self.address_family = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_STREAM,
                                                 flags=socket.AI_PASSIVE)[0][0]
        super().__init__(address, _Handler)
        self.collector, self.ssl_context, self.tokens, self.refusals = collector, ssl_context, tokens, refusals
        self.timeout_s = timeout
        self._slots = threading.BoundedSemaphore(max_handlers)
        self._lock = threading.Lock()
        # A duplicate of each open connection's socket and its deadline: shutting the duplicate down ends the
        # connection whatever the handler thread is blocked in, and stays valid after TLS wraps the original.
        self._open: dict[socket.socket, float] = {}
        self._threads: set[threading.Thread] = set()
        self._accepted = 0

    def server_bind(self) -> None:
        # HTTPServer's own also looks the host's name up (socket.getfqdn), which can hang without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request: socket.socket, client_address: tuple) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # every handler busy: close at once rather than queue a thread
            return
        self._accepted += 1
        watched = request.dup()
        thread = threading.Thread(target=self._serve, args=(request, client_address, watched),
                                  name=f"{THREAD_PREFIX}-{self._accepted}", daemon=True)
        with self._lock:
            self._open[watched] = time.monotonic() + self.timeout_s
            self._threads.add(thread)
        thread.start()

    def _serve(self, request: socket.socket, client_address: tuple, watched: socket.socket) -> None:
        connection = request
        try:
            request.settimeout(self.timeout_s)
            if self.ssl_context is not None:
                connection = self.ssl_context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
                connection.do_handshake()
            self.RequestHandlerClass(connection, client_address, self)
        except OSError:  # timeouts, resets, failed handshakes: the client is gone or misbehaved
            pass
        finally:
            self.shutdown_request(connection)
            with self._lock:
                del self._open[watched]
                watched.close()
                self._threads.discard(threading.current_thread())
            self._slots.release()

    def service_actions(self) -> None:
        """Runs between accepts in ``serve_forever``: ends the connections past their time."""
        now = time.monotonic()
        with self._lock:
            for watched, deadline in self._open.items():
                if deadline <= now:
                    _shut(watched)

    def close_connections(self, timeout: float) -> None:
        """Ends every open connection and waits up to ``timeout`` seconds for their threads."""
        with self._lock:
            for watched in self._open:
                _shut(watched)
            threads = list(self._threads)
        end = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, end - time.monotonic()))


def _shut(watched: socket.socket) -> None:
    try:
        watched.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed by the other side
        pass


class MetricsHttpServer:
    """Serves ``collector`` at ``http[s]://host:port/metrics`` from a daemon thread once started; ``port`` is the
    bound port (useful with port 0). ``ssl_context`` makes it HTTPS, ``tokens`` requires a bearer token."""

    def __init__(self, collector: Collector, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
                 tokens: TokenSet | None = None, refusals: RefusalLog | None = None,
                 timeout: float = CONNECTION_TIMEOUT, max_handlers: int = MAX_HANDLERS) -> None:
        if timeout <= 0 or max_handlers < 1:
            raise ValueError(f"timeout {timeout} and max_handlers {max_handlers}: expected > 0 and >= 1")
        self._listener = _Listener((host, port), collector, ssl_context, tokens,
                                   refusals if refusals is not None else RefusalLog(), timeout, max_handlers)
        self.host = host
        self.scheme = "https" if ssl_context is not None else "http"
        self._thread = threading.Thread(target=self._listener.serve_forever, args=(POLL_INTERVAL,),
                                        name=f"{THREAD_PREFIX}-accept", daemon=True)

    @property
    def port(self) -> int:
        return self._listener.server_address[1]

    def start(self) -> MetricsHttpServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops accepting, ends every open connection and joins the threads."""
        if self._thread.is_alive():
            self._listener.shutdown()
            self._thread.join()
        self._listener.server_close()
        self._listener.close_connections(timeout=self._listener.timeout_s)


def serve_metrics(config: ServeConfig, collector: Collector, refusals: RefusalLog) -> MetricsHttpServer:
    """Starts ``/metrics`` as ``config`` says: on --metrics-address (else --host) and --metrics-port, over
    HTTPS with the gRPC port's certificate unless --no-metrics-tls, wanting a token from --metrics-token-file
    (else --auth-token-file) when either is set."""
    host = (config.metrics_address or config.host).removeprefix("[").removesuffix("]")  # [::] as gRPC writes it
    context = None
    if config.metrics_tls and config.tls_cert is not None and config.tls_key is not None:
        context = https_context(config.tls_cert, config.tls_key, config.tls_client_ca)
    tokens = None
    if config.metrics_token_file is not None:
        tokens = TokenSet(read_token_file(config.metrics_token_file, "--metrics-token-file"))
    elif config.auth_token_file is not None:
        tokens = TokenSet(read_token_file(config.auth_token_file))
    try:
        server = MetricsHttpServer(collector, host, config.metrics_port, ssl_context=context, tokens=tokens,
                                   refusals=refusals)
    except OSError as err:
        raise ConfigError(f"--metrics-port: cannot listen on {host}:{config.metrics_port} "
                          f"({err.strerror or err})") from None
    log.info("serving metrics at %s://%s:%d%s (%s)", server.scheme, host, server.port, PATH,
             "bearer token required" if tokens else "no token: reachable by anyone who reaches the address",
             extra={"metrics_port": server.port})
    return server.start()
