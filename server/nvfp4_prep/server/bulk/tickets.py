"""One-time tickets that bind bulk connections to the Prepare call that handed them out.

A ticket is 32 random bytes, given in the call's ``BulkOffer`` only (so under ``--auth-token-file`` only an
authenticated call gets one). It admits one connection per stream index, within ``ttl`` seconds of being
handed out, and none once its call ended (revoked). Revoked and expired tickets are remembered for ``ttl``
more seconds, so that a refusal says why; after that they are unknown like any wrong ticket.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Callable

from nvfp4_prep.wire.bulk_transport import TICKET_BYTES

DEFAULT_TTL = 30.0


class Ticket:
    """The connections one call's ticket admitted, by stream index."""

    def __init__(self, value: bytes, streams: int, issued: float) -> None:
        self.value = value
        self.streams = streams
        self.issued = issued
        self.revoked_at: float | None = None
        self.claimed: set[int] = set()  # indices presented and accepted, whether still open or not
        self.connections: dict[int, socket.socket] = {}
        self.changed = threading.Condition()


class TicketBook:
    """Every live ticket of one server."""

    def __init__(self, ttl: float = DEFAULT_TTL, clock: Callable[[], float] = time.monotonic) -> None:
        if not ttl > 0:
            raise ValueError(f"ttl: expected seconds > 0, got {ttl!r}")
        self.ttl = ttl
        self._clock = clock
        self._tickets: dict[bytes, Ticket] = {}
        self._lock = threading.Lock()

    def issue(self, streams: int) -> Ticket:
        with self._lock:
            self._forget_old()
            ticket = Ticket(secrets.token_bytes(TICKET_BYTES), streams, self._clock())
            self._tickets[ticket.value] = ticket
            return ticket

    def claim(self, value: bytes, index: int) -> tuple[Ticket | None, str | None]:
        """The ticket ``value`` admits stream ``index`` of (its slot now used), or the reason it does not:
        "unknown", "revoked", "expired", "replayed" or "malformed" (an index beyond its streams)."""
        with self._lock:
            self._forget_old()
            ticket = self._tickets.get(value)
            if ticket is None:
                return None, "unknown"
            if ticket.revoked_at is not None:
                return None, "revoked"
            if index in ticket.claimed:
                return None, "replayed"
            if self._clock() - ticket.issued > self.ttl:
                return None, "expired"
            if index >= ticket.streams:
                return None, "malformed"
            ticket.claimed.add(index)
            return ticket, None

    def attach(self, ticket: Ticket, index: int, connection: socket.socket) -> None:
        """Hands an accepted connection to its call (closed at once when the call already ended)."""
        with ticket.changed:
            if ticket.revoked_at is None:
                ticket.connections[index] = connection
                ticket.changed.notify_all()
                return
        close_connection(connection)

    def revoke(self, ticket: Ticket) -> None:
        """The call ended: its ticket admits nothing more and its connections are closed."""
        with self._lock, ticket.changed:
            if ticket.revoked_at is None:
                ticket.revoked_at = self._clock()
            connections, ticket.connections = list(ticket.connections.values()), {}
            ticket.changed.notify_all()
        for connection in connections:
            close_connection(connection)

    def revoke_all(self) -> None:
        with self._lock:
            tickets = list(self._tickets.values())
        for ticket in tickets:
            self.revoke(ticket)

    def _forget_old(self) -> None:
        """Drops tickets revoked more than ``ttl`` seconds ago (every call revokes its own when it ends)."""
        now = self._clock()
        old = [value for value, ticket in self._tickets.items()
               if (ticket.revoked_at is not None and now - ticket.revoked_at > self.ttl)]
        for value in old:
            del self._tickets[value]

    def __len__(self) -> int:
        with self._lock:
            return len(self._tickets)


def close_connection(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    connection.close()
