"""A Prepare call's side of the bulk transport: its offer, the choice between bulk and inline, its chunks.

When the header asks for bulk the call's first response is a ``BulkOffer`` (port 0 when this server has no
bulk port: everything stays inline). The client then either connects every stream and ends its request
stream, or sends its chunks inline; the first request after the header tells which (``choose``). Whatever
ends the call (done, error, cancelled, deadline) revokes its ticket and closes its connections, which also
unblocks any thread still reading or writing them.
"""

from __future__ import annotations

import itertools
import logging
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import grpc

from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.wire import Chunk
from nvfp4_prep.wire.bulk_transport import (
    MAX_STREAMS,
    BulkStreamError,
    FrameReaders,
    FrameWriters,
    Piece,
    bound_idle,
)

from ..deadline import CallClock
from ..errors import CallCancelled, DeadlinePassed, ServerDraining, invalid
from .listener import HANDSHAKE_TIMEOUT
from .tickets import Ticket, TicketBook

log = logging.getLogger(__name__)

_END = object()


class BulkStreamBroken(ServerDraining):
    """A bulk connection of the call dropped part-way (UNAVAILABLE, like a broken gRPC stream: the client
    retries, resuming after the bytes it verified)."""


@dataclass(frozen=True)
class BulkHub:
    """What the calls of one server share: the ticket book, the listener's port and the host it advertises
    ("": the client dials the host its channel targets), and the limits a bulk connection keeps."""

    book: TicketBook
    port: int
    host: str
    idle_seconds: float
    frame_limit: int


class BulkChannel:
    """The call's accepted connections, in stream order."""

    def __init__(self, sockets: list[socket.socket], hub: BulkHub, check: Callable[[], None]) -> None:
        self._sockets = sockets
        self._hub = hub
        self._check = check
        for sock in sockets:
            bound_idle(sock, hub.idle_seconds)

    @property
    def streams(self) -> int:
        return len(self._sockets)

    def chunks(self, reuse: bool) -> Iterator[Chunk]:
        """The request's chunks, in order, each with the CRC32C its stream's thread computed; each chunk's data
        is valid until the next is asked for (also after, unless ``reuse``)."""
        readers = FrameReaders(self._sockets, self._hub.frame_limit, self._check, reuse)
        try:
            for frame, chunk in readers:
                if chunk is None:
                    raise invalid("bulk.frame", f"holds {len(frame)} bytes that are not a chunk message",
                                  "a serialized PrepareRequest holding one TensorChunk")
                yield chunk
        except BulkStreamError as err:
            raise self._failure(err, "send") from None
        finally:
            readers.close()

    def take_empty_upload(self) -> None:
        """Reads the request direction of a call that uploads nothing (a reference): its end on every stream. Left
        unread, those bytes would make closing the connections reset them, and the client could lose answer bytes
        it had not read yet."""
        for _ in self.chunks(reuse=True):
            raise invalid("bulk.frame", "carries a chunk in a call whose layer the server reads",
                          "no chunks (the header names header.ref)")

    def send(self, messages: Iterable[bytes]) -> None:
        """Sends the answer's encoded chunk messages and returns once every byte was written."""
        writers = FrameWriters(self._sockets, self._check)
        try:
            for message in messages:
                writers.send(message)
            writers.finish()
        except BulkStreamError as err:
            raise self._failure(err, "read") from None
        finally:
            writers.close()

    def send_pieces(self, pieces: Iterable[Piece], held: int) -> None:
        """Sends the answer's chunks as ``(tensor index, offset, buffer)`` pieces, each checksummed and written
        straight from its buffer on its stream's thread (no copy into a message); a buffer stays valid while
        ``held`` more pieces are taken, so none is taken before all those ``held`` back were written."""
        writers = FrameWriters(self._sockets, self._check)
        try:
            taken = iter(pieces)
            sequence = 0
            while True:
                if sequence > held:
                    writers.wait_written(sequence - held - 1)
                piece = next(taken, None)
                if piece is None:
                    break
                writers.send(piece)
                sequence += 1
            writers.finish()
        except BulkStreamError as err:
            raise self._failure(err, "read") from None
        finally:
            writers.close()

    def _failure(self, err: BulkStreamError, what: str) -> Exception:
        """The call's error for a broken stream. ``err`` loses its traceback first: the streams' readers or
        writers keep ``err``, and its traceback's frames hold them and the call's tensors, a cycle that only the
        garbage collector would break (the layer staying in memory, on its device too, until it ran)."""
        err.__traceback__ = None
        field = f"bulk.stream[{err.stream}]"
        if err.kind == "timeout":
            seconds = self._hub.idle_seconds
            return DeadlinePassed(f"{field}: the client did not {what} anything for {seconds:g}s "
                                  f"(--idle-timeout={seconds:g}s)", "idle_timeout")
        if err.kind == "protocol":
            return invalid(field, err.problem, "frames of at most the server's message size, ended once")
        return BulkStreamBroken(f"{field}: the bulk connection broke ({err.problem})", field)


class BulkSession:
    """One call's ticket (None when this server has no bulk port) and what it admitted."""

    def __init__(self, hub: BulkHub | None, request: pb.BulkRequest, context: grpc.ServicerContext,
                 clock: CallClock, cancelled: Callable[[], bool]) -> None:
        if not 1 <= request.streams <= MAX_STREAMS:
            raise invalid("header.bulk.streams", f"is {request.streams}", f"1 to {MAX_STREAMS}")
        self._hub = hub
        self._clock = clock
        self._cancelled = cancelled
        self._ticket: Ticket | None = hub.book.issue(request.streams) if hub is not None else None
        if self._ticket is not None:
            context.add_callback(self.close)  # the call ended, however: on gRPC's thread
            clock.on_end(self.close)  # the watchdog ended it

    def offer(self) -> pb.PrepareResponse:
        if self._ticket is None:
            return pb.PrepareResponse(bulk=pb.BulkOffer())
        return pb.PrepareResponse(bulk=pb.BulkOffer(ticket=self._ticket.value, port=self._hub.port,
                                                    streams=self._ticket.streams, host=self._hub.host))

    def choose(self, requests: Iterator) -> tuple[Iterator, BulkChannel | None]:
        """The requests still to read and the connections to use: inline when the client sends a chunk (or
        connected fewer streams than offered), bulk when it ended its stream with every stream accepted."""
        if self._ticket is None:
            return requests, None
        first = next(requests, _END)
        if first is not _END:
            self.close()
            return itertools.chain([first], requests), None
        sockets = self._accepted()
        if sockets is None:
            self.close()
            return iter(()), None
        return iter(()), BulkChannel(sockets, self._hub, self._check)

    def _accepted(self) -> list[socket.socket] | None:
        """The connections of every stream, once each accepted one reached the call; None unless all were."""
        ticket = self._ticket
        with ticket.changed:
            ticket.changed.wait_for(lambda: ticket.revoked_at is not None
                                    or len(ticket.connections) == len(ticket.claimed), HANDSHAKE_TIMEOUT)
            if ticket.revoked_at is not None or len(ticket.connections) != ticket.streams:
                if ticket.claimed:
                    log.info("bulk: %d of %d streams connected; answering inline", len(ticket.connections),
                             ticket.streams)
                return None
            return [ticket.connections[index] for index in range(ticket.streams)]

    def _check(self) -> None:
        self._clock.check("while moving chunks over the bulk connections")
        if self._cancelled():
            raise CallCancelled("client went away during a bulk transfer")

    def close(self) -> None:
        """Revokes the ticket and closes its connections (any thread, any number of times)."""
        if self._ticket is not None:
            self._hub.book.revoke(self._ticket)
