"""The bulk port: accepts connections, runs their TLS and ticket handshake, hands them to their calls.

The accept loop runs on a thread of its own; each handshake on a short-lived thread, at most
``MAX_HANDSHAKES`` at once (connections beyond are closed at once) and within ``HANDSHAKE_TIMEOUT`` seconds,
so that connections which never present a ticket cannot pile up. A refused connection gets its one-byte
refusal code, is closed, and is counted in ``nvfp4_prep_bulk_refused_total{reason}``; nothing it sent is
logged.
"""

from __future__ import annotations

import logging
import selectors
import socket
import ssl
import threading

from nvfp4_prep.wire.bulk_transport import ACCEPTED, HELLO_BYTES, REFUSAL_CODES, TICKET_BYTES, recv_exact

from ..config import ConfigError
from ..metrics import Metrics
from .tickets import TicketBook, close_connection

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
MAX_HANDSHAKES = 64
BACKLOG = 128
POLL_SECONDS = 0.25
THREAD_PREFIX = "nvfp4-prep-bulk"


class BulkListener:
    """Listens on ``host:port`` (port 0: any free one, see ``port``) for the connections of ``book``'s tickets;
    ``ssl_context`` makes every connection TLS (and, when it wants client certificates, mutual TLS)."""

    def __init__(self, host: str, port: int, book: TicketBook, metrics: Metrics,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.book = book
        self._metrics = metrics
        self._ssl = ssl_context
        host = host.removeprefix("[").removesuffix("]")
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
            self._socket = socket.create_server((host, port), family=family, backlog=BACKLOG)
        except OSError as err:
            raise ConfigError(f"--bulk-address: cannot listen on {host}:{port} ({err.strerror or err})") from None
        self.port = self._socket.getsockname()[1]
        self._slots = threading.BoundedSemaphore(MAX_HANDSHAKES)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name=f"{THREAD_PREFIX}-accept", daemon=True)

    def start(self) -> BulkListener:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops accepting and revokes every ticket (closing the connections of calls still running)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._socket.close()
        self.book.revoke_all()

    def _accept(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._socket, selectors.EVENT_READ)
            while not self._stop.is_set():
                if not selector.select(POLL_SECONDS):
                    continue
                try:
                    connection, _ = self._socket.accept()
                except OSError:
                    continue
                if not self._slots.acquire(blocking=False):
                    self._refused(connection, "busy")
                    continue
                threading.Thread(target=self._handshake, args=(connection,), name=f"{THREAD_PREFIX}-handshake",
                                 daemon=True).start()

    def _handshake(self, connection: socket.socket) -> None:
        try:
            connection.settimeout(HANDSHAKE_TIMEOUT)
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ssl is not None:
                try:
                    connection = self._ssl.wrap_socket(connection, server_side=True)
                except (OSError, ssl.SSLError):
                    self._refused(connection, "handshake")
                    return
            try:
                hello = recv_exact(connection, HELLO_BYTES)
            except OSError:
                self._refused(connection, "handshake")
                return
            ticket, reason = self.book.claim(hello[:TICKET_BYTES], hello[TICKET_BYTES])
            if ticket is None:
                self._refused(connection, reason, REFUSAL_CODES[reason])
                return
            try:
                connection.sendall(bytes((ACCEPTED,)))
            except OSError:
                close_connection(connection)
                return
            connection.settimeout(None)  # the call sets its own timeouts
            self.book.attach(ticket, hello[TICKET_BYTES], connection)
        finally:
            self._slots.release()

    def _refused(self, connection: socket.socket, reason: str, code: int | None = None) -> None:
        """Closes a connection that is not let in, after its refusal code when it got that far."""
        self._metrics.bulk_refused.labels(reason).inc()
        log.debug("bulk connection refused: %s", reason)
        if code is not None:
            try:
                connection.sendall(bytes((code,)))
            except OSError:
                pass
        close_connection(connection)
