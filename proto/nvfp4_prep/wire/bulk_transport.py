"""The bulk transport's wire format, shared by server and client: the handshake and the chunk frames.

A Prepare call that asks for it (``PrepareHeader.bulk``) moves its chunks over a few TCP connections beside
the gRPC stream, without gRPC's per-message work. A connection opens with ``hello``: the call's ticket and
the connection's stream index; the server answers one byte, ``ACCEPTED`` or a refusal code. Then each
direction is a run of frames, a big-endian u32 length and the bytes ``encode_chunk`` makes (so CRC32C and
offsets are checked by the same ``TensorReceiver`` as inline chunks), ended by a zero length. Chunk ``k`` of
a direction travels on stream ``k % streams``: a reader visits the streams in turn and gets the chunks back
in order without a reordering buffer, while every stream is received (and sent) on a thread of its own.
The per-byte work runs on those threads too, in parallel: a reader decodes its frame and computes the CRC32C
of its data (``Chunk.actual_crc32c``, which ``TensorReceiver`` then takes), and a writer given a piece of a
tensor (``(tensor index, offset, view)``) computes its CRC32C and writes the frame straight from the tensor's
memory with one gathering ``sendmsg``, the bytes ``encode_chunk`` would make but without their copy.
"""

from __future__ import annotations

import queue
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy

from .chunk_codec import Chunk, chunk_parts, decode_chunk

TICKET_BYTES = 32
HELLO_BYTES = TICKET_BYTES + 1
MAX_STREAMS = 8
ACCEPTED = 0
# Refusal codes the server answers a hello with, before it closes the connection.
REFUSALS = {1: "unknown", 2: "replayed", 3: "expired", 4: "revoked", 5: "malformed"}
REFUSAL_CODES = {reason: code for code, reason in REFUSALS.items()}
_LENGTH = struct.Struct("!I")
_TIMEVAL = struct.Struct("@ll")  # struct timeval: seconds, microseconds
_END = object()
# How often a consumer waiting for a frame checks whether it should stop (``check``).
POLL_SECONDS = 0.05
# Frames a stream's reader (or writer) holds ahead of the consumer (producer).
DEPTH = 2
# A chunk to send, not yet encoded: (tensor index, offset, a view of its bytes).
Piece = tuple[int, int, memoryview]


class BulkStreamError(Exception):
    """A bulk connection that broke, stalled or broke the framing; ``stream`` is its index, ``kind`` one of
    "broken", "timeout", "protocol"."""

    def __init__(self, stream: int, kind: str, problem: str) -> None:
        super().__init__(f"bulk stream {stream}: {problem}")
        self.stream = stream
        self.kind = kind
        self.problem = problem


def hello(ticket: bytes, index: int) -> bytes:
    """What a client sends first on a bulk connection."""
    if len(ticket) != TICKET_BYTES or not 0 <= index < MAX_STREAMS:
        raise ValueError(f"a hello needs a {TICKET_BYTES}-byte ticket and a stream index below {MAX_STREAMS}")
    return ticket + bytes((index,))


def frame_header(length: int) -> bytes:
    return _LENGTH.pack(length)


def bound_idle(sock: socket.socket, seconds: float) -> None:
    """Makes a read or write of ``sock`` that moves no byte for ``seconds`` fail (TimeoutError, or BlockingIOError
    from the kernel's timeouts). A plain socket stays blocking with SO_RCVTIMEO and SO_SNDTIMEO set: Python's own
    timeout makes the socket non-blocking, so that a frame takes a poll and a call per kernel buffer's worth
    (some twenty for 4 MiB on loopback), each taking the GIL again, instead of one call. TLS sockets, which read
    a record at a time anyway, keep Python's timeout."""
    if isinstance(sock, ssl.SSLSocket):
        sock.settimeout(seconds)
        return
    sock.settimeout(None)
    whole = int(seconds)
    timeval = _TIMEVAL.pack(whole, max(int((seconds - whole) * 1e6), 0 if whole else 1))  # (0, 0) would be never
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    """Fills ``view`` from ``sock`` (straight into it, no copy): on a blocking plain socket in one MSG_WAITALL
    receive, unless a signal or a kernel timeout cuts it short; ConnectionError if the peer closes first."""
    flags = 0 if isinstance(sock, ssl.SSLSocket) else socket.MSG_WAITALL
    got = 0
    while got < len(view):
        received = sock.recv_into(view[got:], 0, flags)
        if not received:
            raise ConnectionError(f"the peer closed the connection after {got} of {len(view)} bytes")
        got += received


def send_parts(sock: socket.socket, parts: Sequence[bytes | memoryview]) -> None:
    """Writes ``parts`` one after the other without joining them: one ``sendmsg`` of all (again from where a
    partial send stopped), or ``sendall`` of each on TLS, whose sockets have no ``sendmsg``."""
    views = [view for view in (memoryview(part).cast("B") for part in parts) if view.nbytes]
    if isinstance(sock, ssl.SSLSocket):
        for view in views:
            sock.sendall(view)
        return
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= views[0].nbytes:
            sent -= views.pop(0).nbytes
        if sent:
            views[0] = views[0][sent:]


def frame_parts(message: bytes | Piece) -> tuple[bytes | memoryview, ...]:
    """The frame of ``message`` (an encoded chunk message, or a piece encoded here, its CRC32C computed on the
    calling thread) as buffers to write in order: the same bytes either way."""
    if not isinstance(message, tuple):
        return frame_header(len(message)), message
    prefix, view, tail = chunk_parts(*message)
    return frame_header(len(prefix) + view.nbytes + len(tail)) + prefix, view, tail


def recv_exact(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    recv_exact_into(sock, memoryview(buffer))
    return bytes(buffer)


def _kind(error: BaseException) -> str:
    return "timeout" if isinstance(error, TimeoutError | BlockingIOError) else "broken"


class FrameReaders:
    """Receives one direction's frames from every stream, each on a thread of its own, and hands them to one
    consumer in chunk order (``for frame, chunk in readers``). A frame is a memoryview valid until the next one
    is asked for; its buffer then goes back to its stream (``reuse``), or is left to whoever still holds it.
    ``chunk`` is the frame decoded on its stream's thread, its data's CRC32C computed there
    (``actual_crc32c``), or None when the frame is not a plain chunk message.

    ``limit`` bounds a frame's length; ``check`` runs while the consumer waits and may raise to stop it.
    """

    def __init__(self, sockets: Sequence[socket.socket], limit: int, check: Callable[[], None] = lambda: None,
                 reuse: bool = True, name: str = "nvfp4-prep-bulk-read") -> None:
        self._sockets = list(sockets)
        self._limit = limit
        self._check = check
        self._reuse = reuse
        self._stop = threading.Event()
        self._failures: list[BulkStreamError] = []  # of any stream: the consumer need not wait for its turn
        self._ready = [queue.Queue(DEPTH) for _ in self._sockets]
        self._free: list[queue.Queue] = [queue.Queue() for _ in self._sockets]
        self._threads = [threading.Thread(target=self._read, args=(index,), name=f"{name}-{index}", daemon=True)
                         for index in range(len(self._sockets))]
        for thread in self._threads:
            thread.start()

    def _buffer(self, index: int, size: int) -> numpy.ndarray:
        free = self._free[index]
        while True:
            try:
                buffer = free.get_nowait()
            except queue.Empty:
                return numpy.empty(max(size, 1), dtype=numpy.uint8)
            if len(buffer) >= size:
                return buffer

    def _put(self, index: int, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._ready[index].put(item, timeout=POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def _read(self, index: int) -> None:
        sock = self._sockets[index]
        try:
            while not self._stop.is_set():
                (length,) = _LENGTH.unpack(recv_exact(sock, _LENGTH.size))
                if length == 0:
                    self._put(index, _END)
                    return
                if length > self._limit:
                    raise BulkStreamError(index, "protocol", f"a frame of {length} bytes, more than the "
                                                             f"{self._limit} bytes a frame may hold")
                buffer = self._buffer(index, length)
                view = memoryview(buffer)[:length]
                recv_exact_into(sock, view)
                if not self._put(index, (buffer, view, decode_chunk(view, checksum=True))):
                    return
        except BulkStreamError as err:
            self._failures.append(err)
        except OSError as err:
            if not self._stop.is_set():
                self._failures.append(BulkStreamError(index, _kind(err), str(err) or type(err).__name__))

    def _get(self, index: int) -> object:
        while True:
            try:
                return self._ready[index].get(timeout=POLL_SECONDS)
            except queue.Empty:
                if self._failures:
                    raise self._failures[0] from None
                self._check()

    def __iter__(self) -> Iterator[tuple[memoryview, Chunk | None]]:
        streams = len(self._sockets)
        sequence = 0
        held: tuple[int, numpy.ndarray] | None = None
        try:
            while True:
                index = sequence % streams
                item = self._get(index)
                if held is not None and self._reuse:
                    self._free[held[0]].put(held[1])
                held = None
                if item is _END:
                    break
                buffer, view, chunk = item
                held = (index, buffer)
                yield view, chunk
                sequence += 1
            for other in range(1, streams):  # every other stream must end here as well
                late = (index + other) % streams
                if self._get(late) is not _END:
                    raise BulkStreamError(late, "protocol", f"sent a frame after stream {index} ended the "
                                                            f"direction at chunk {sequence}")
        finally:
            self.close()

    def close(self) -> None:
        """Stops the threads (they end at their next frame, or when their socket is closed)."""
        self._stop.set()


class FrameWriters:
    """Sends one direction's chunks round robin over the streams, each stream on a thread of its own a few
    chunks behind ``send``; ``finish`` ends the direction and returns once every byte was written. A chunk is
    an encoded message or a Piece, which its stream's thread encodes (``frame_parts``) and writes without a
    copy, so a piece's view must stay valid until ``finish`` returned. A stream that fails makes the next
    ``send`` or ``finish`` raise its BulkStreamError."""

    def __init__(self, sockets: Sequence[socket.socket], check: Callable[[], None] = lambda: None,
                 name: str = "nvfp4-prep-bulk-write") -> None:
        self._sockets = list(sockets)
        self._check = check
        self._stop = threading.Event()
        self._queues = [queue.Queue(DEPTH) for _ in self._sockets]
        self._errors: list[BulkStreamError] = []
        self._ended: set[int] = set()
        self._sequence = 0
        self._written = [0] * len(self._sockets)  # chunks each stream wrote
        self._progress = threading.Condition()
        self._threads = [threading.Thread(target=self._write, args=(index,), name=f"{name}-{index}", daemon=True)
                         for index in range(len(self._sockets))]
        for thread in self._threads:
            thread.start()

    def _write(self, index: int) -> None:
        sock, pending = self._sockets[index], self._queues[index]
        try:
            while not self._stop.is_set():
                try:
                    message = pending.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    continue
                if message is _END:
                    sock.sendall(frame_header(0))
                    self._ended.add(index)
                    return
                send_parts(sock, frame_parts(message))
                with self._progress:
                    self._written[index] += 1
                    self._progress.notify_all()
        except OSError as err:
            if not self._stop.is_set():
                self._errors.append(BulkStreamError(index, _kind(err), str(err) or type(err).__name__))
                self._stop.set()

    def _raise(self) -> None:
        if self._errors:
            raise self._errors[0]
        self._check()

    def _put(self, index: int, message: object) -> None:
        while True:
            self._raise()
            if self._stop.is_set():
                raise BulkStreamError(index, "broken", "closed")
            try:
                self._queues[index].put(message, timeout=POLL_SECONDS)
                return
            except queue.Full:
                continue

    def send(self, message: bytes | Piece) -> None:
        """Queues the next chunk (an encoded message or a piece) for its stream."""
        self._put(self._sequence % len(self._sockets), message)
        self._sequence += 1

    def wait_written(self, sequence: int) -> None:
        """Waits until every chunk up to ``sequence`` (counting ``send`` calls from 0) was written, so that the
        buffers of those pieces may be reused; raises as ``send`` does."""
        streams = len(self._sockets)
        needed = [max(0, (sequence - index) // streams + 1) for index in range(streams)]
        with self._progress:
            while any(written < need for written, need in zip(self._written, needed, strict=True)):
                self._raise()
                if self._stop.is_set():
                    raise BulkStreamError(0, "broken", "closed")
                self._progress.wait(POLL_SECONDS)

    def finish(self) -> None:
        """Ends the direction on every stream and waits until everything queued was written."""
        for index in range(len(self._sockets)):
            self._put(index, _END)
        for thread in self._threads:
            while thread.is_alive():
                thread.join(POLL_SECONDS)
                self._raise()
        self._raise()
        unended = [index for index in range(len(self._sockets)) if index not in self._ended]
        if unended:
            raise BulkStreamError(unended[0], "broken", "closed before the direction ended")

    def close(self) -> None:
        """Stops the threads (a thread blocked in a write ends when its socket is closed)."""
        self._stop.set()
