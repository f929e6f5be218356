"""The SDK's side of the bulk transport (``PrepClient(bulk_streams=N)``): tensor chunks over N TCP
connections beside the Prepare stream, without gRPC's per-message work.

The call asks for it in its header; the server's first response offers a ticket and a port. The client
connects every stream (TLS with the channel's own CA and client certificate), presents the ticket, and once
all are accepted ends its request stream and uploads the chunks over the connections, straight from the
caller's tensors (each stream's thread computes its chunks' CRC32C and writes them without a copy); the
answer's header still comes on the gRPC stream, its chunks over the connections, checked by the same
``TensorReceiver`` and landed by the same sinks as inline chunks. When the server offers nothing (port 0),
or the connections cannot be made within ``CONNECT_TIMEOUT`` seconds (a closed port, a firewall, a TLS
failure, a refused ticket), or no offer comes within ``OFFER_TIMEOUT``, the call simply goes on inline; that is
logged once per client at INFO, and the client's calls of the next ``UNREACHABLE_SECONDS`` ask for none.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.wire import MAX_CHUNK_SIZE, MESSAGE_OVERHEAD, Chunk, FramingError, encode_chunk
from nvfp4_prep.wire.bulk_transport import (
    ACCEPTED,
    MAX_STREAMS,
    REFUSALS,
    BulkStreamError,
    FrameReaders,
    FrameWriters,
    Piece,
    hello,
    recv_exact,
)

from .credentials import PemSource, pem_bytes
from .errors import PrepUnavailable

log = logging.getLogger(__name__)

# Seconds to connect every stream, finish TLS and hear the ticket accepted; past it the call goes inline.
CONNECT_TIMEOUT = 5.0
# Seconds the request stream waits for the server's offer (a server that does not know the bulk transport
# sends none) before it sends the chunks inline.
OFFER_TIMEOUT = 10.0
# Largest frame taken from a server: its largest message.
FRAME_LIMIT = MAX_CHUNK_SIZE + MESSAGE_OVERHEAD
# Seconds a client that could not connect asks for no bulk transport (its calls go inline at once, instead of each
# waiting up to CONNECT_TIMEOUT for a port that a firewall drops), before it tries again.
UNREACHABLE_SECONDS = 60.0


class _Refused(Exception):
    """The server refused the ticket (its one-byte code named why)."""


def target_host(target: str) -> str | None:
    """The host a gRPC target names, or None when it names several (``ipv4:a:p,b:p``) or none (``unix:``)."""
    if target.startswith(("unix:", "unix-abstract:", "vsock:")):
        return None
    body = target
    for scheme in ("ipv4:", "ipv6:"):
        if body.startswith(scheme):
            addresses = body[len(scheme):].split(",")
            if len(addresses) != 1:
                return None
            body = addresses[0]
            break
    else:
        if body.startswith("dns:"):
            body = body[len("dns:"):]
            if body.startswith("//"):  # dns://[authority]/host:port
                body = body[2:].split("/", 1)[1] if "/" in body[2:] else ""
    if body.startswith("[") and "]" in body:
        return body[1:body.index("]")] or None
    return (body.rsplit(":", 1)[0] if ":" in body else body) or None


def _load_chain(context: ssl.SSLContext, cert: PemSource, key: PemSource) -> None:
    """The client certificate for mutual TLS; ``ssl`` reads only files, so PEM bytes go through a private
    temporary directory for the moment of loading."""
    if not isinstance(cert, bytes) and not isinstance(key, bytes):
        context.load_cert_chain(os.fspath(cert), os.fspath(key))
        return
    with tempfile.TemporaryDirectory(prefix="nvfp4-prep-tls-") as directory:
        paths = []
        for name, source, argument in (("cert.pem", cert, "tls_cert"), ("key.pem", key, "tls_key")):
            path = Path(directory) / name
            path.write_bytes(pem_bytes(source, argument))
            path.chmod(0o600)
            paths.append(str(path))
        context.load_cert_chain(*paths)


def tls_context(tls_ca: PemSource | None, tls_cert: PemSource | None, tls_key: PemSource | None) -> ssl.SSLContext:
    """A client context like the channel's credentials: ``tls_ca`` (default the system's roots) to verify the
    server, ``tls_cert``/``tls_key`` for mutual TLS."""
    cadata = pem_bytes(tls_ca, "tls_ca").decode("ascii", "replace") if tls_ca is not None else None
    context = ssl.create_default_context(cadata=cadata)
    if tls_cert is not None and tls_key is not None:
        _load_chain(context, tls_cert, tls_key)
    return context


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class BulkDialer:
    """How one PrepClient reaches its servers' bulk ports: ``streams`` connections per call, to the offer's
    host or else the host of ``target``, TLS through ``tls`` (None: plaintext), its certificate checked for
    ``server_name`` (default the target's host)."""

    def __init__(self, streams: int, target: str, tls: ssl.SSLContext | None, server_name: str | None = None,
                 unusable: str = "") -> None:
        if not isinstance(streams, int) or not 1 <= streams <= MAX_STREAMS:
            raise ValueError(f"bulk_streams: expected 0 (inline) to {MAX_STREAMS}, got {streams!r}")
        self.streams = streams
        self._host = target_host(target)
        self._tls = tls
        self._server_name = server_name or self._host
        self._unusable = unusable  # why bulk cannot work with this client at all ("" when it can)
        self._unreachable_until = 0.0  # time.monotonic() until which the last failed connection holds
        self._logged = False
        self._lock = threading.Lock()

    def request(self) -> pb.BulkRequest | None:
        """What the header asks for (None: the header asks for nothing, since bulk cannot work here, or could not
        connect less than ``UNREACHABLE_SECONDS`` ago)."""
        if self._unusable:
            self.fell_back(self._unusable)
            return None
        if time.monotonic() < self._unreachable_until:
            return None
        return pb.BulkRequest(streams=self.streams)

    def fell_back(self, why: str) -> None:
        """Logs, once per client, that a call goes inline."""
        with self._lock:
            logged, self._logged = self._logged, True
        if not logged:
            log.info("bulk transport not used (%s); sending inline over gRPC", why)

    def unreachable(self, why: str) -> None:
        """A call waited for its bulk connections in vain (``why``): the next ``UNREACHABLE_SECONDS`` ask for none."""
        self._unreachable_until = time.monotonic() + UNREACHABLE_SECONDS
        self.fell_back(f"{why}; not asked for again for {UNREACHABLE_SECONDS:g}s")

    def connect(self, offer: pb.BulkOffer) -> list[socket.socket] | None:
        """Every stream of ``offer`` connected and accepted, or None (logged) to go inline."""
        host = offer.host or self._host
        if not offer.port:
            self.fell_back("the server offers no bulk port")
            return None
        if not host:
            self.fell_back("the server names no host and the target has not one host to dial")
            return None
        if not 1 <= offer.streams <= MAX_STREAMS:
            self.fell_back(f"the server offers {offer.streams} streams")
            return None
        deadline = time.monotonic() + CONNECT_TIMEOUT
        sockets: list[socket.socket] = []
        try:
            for index in range(offer.streams):
                sockets.append(self._open(host, offer.port, offer.ticket, index, deadline))
        except (OSError, ValueError, _Refused) as err:
            for sock in sockets:
                _close(sock)
            self.unreachable(f"bulk stream {len(sockets)} to {host}:{offer.port}: {err}")
            return None
        return sockets

    def _open(self, host: str, port: int, ticket: bytes, index: int, deadline: float) -> socket.socket:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"not connected within {CONNECT_TIMEOUT:g}s")
        sock = socket.create_connection((host, port), timeout=remaining)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self._server_name)
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(hello(ticket, index))
            (answer,) = recv_exact(sock, 1)
            if answer != ACCEPTED:
                raise _Refused(f"the server refused the ticket ({REFUSALS.get(answer, f'code {answer}')})")
            sock.settimeout(None)  # stalls are the call's to bound: its deadline, or the server ending it
            return sock
        except BaseException:
            _close(sock)
            raise


class BulkAttempt:
    """The bulk side of one Prepare attempt: the choice between bulk and inline, the upload over the
    connections, and the answer's chunks from them. ``close()`` ends it (closing the connections)."""

    def __init__(self, dialer: BulkDialer) -> None:
        self._dialer = dialer
        self._decided = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] | None = None
        self._writer: threading.Thread | None = None
        self._closed = False

    @property
    def active(self) -> bool:
        """Whether the connections carry this attempt's chunks."""
        return self._sockets is not None

    def requests(self, first: object, upload: Iterator[Piece]) -> Iterator[object]:
        """The request stream: ``first`` (the header), then, once the offer was answered, nothing (bulk: the
        ``upload`` pieces go over the connections, encoded by the streams' threads) or the ``upload`` pieces
        encoded inline."""
        yield first
        if not self._decided.wait(OFFER_TIMEOUT) and self._decide(None, ""):
            self._dialer.unreachable(f"no bulk offer came within {OFFER_TIMEOUT:g}s")
        with self._lock:
            if self._closed:
                return
            bulk = self._sockets is not None
            if bulk:
                self._writer = threading.Thread(target=self._send, args=(upload,),
                                                name="nvfp4-prep-client-bulk-upload", daemon=True)
                self._writer.start()
        if not bulk:
            for piece in upload:
                yield encode_chunk(*piece)

    def on_offer(self, offer: pb.BulkOffer | None) -> None:
        """Answers the server's first response: connects (bulk) unless ``offer`` is None (the server sent
        none) or offers no port; connections that come too late for the request stream are closed."""
        if offer is None:
            self._decide(None, "the server answered without a bulk offer")
            return
        sockets = self._dialer.connect(offer) if not self._decided.is_set() else None
        if not self._decide(sockets, "") and sockets is not None:
            for sock in sockets:
                _close(sock)

    def _decide(self, sockets: list[socket.socket] | None, inline_because: str) -> bool:
        with self._lock:
            if self._decided.is_set() or self._closed:
                return False
            if inline_because:
                self._dialer.fell_back(inline_because)
            self._sockets = sockets
            self._decided.set()
            return True

    def _send(self, upload: Iterator[Piece]) -> None:
        writers = FrameWriters(self._sockets, name="nvfp4-prep-client-bulk-write")
        try:
            for message in upload:
                writers.send(message)
            writers.finish()
        except (BulkStreamError, OSError) as err:  # the server ended the call: its status says why
            log.debug("bulk upload stopped: %s", err)
        finally:
            writers.close()

    def chunks(self, call: grpc.Call) -> Iterator[Chunk]:
        """The answer's chunks from the connections, in order, then the end of ``call`` (which must bring no
        further message). A connection that breaks raises the call's own error when it failed (a server that
        ended the call, or went away), else PrepUnavailable naming the stream, so the SDK retries and
        resumes."""
        readers = FrameReaders(self._sockets, FRAME_LIMIT, lambda: _raise_if_failed(call),
                               name="nvfp4-prep-client-bulk-read")
        try:
            for frame, chunk in readers:  # decoded and checksummed on the streams' threads
                if chunk is None:
                    raise FramingError("response.bulk.frame", f"holds {len(frame)} bytes that are not a chunk",
                                       "a serialized PrepareResponse holding one TensorChunk")
                yield chunk
        except BulkStreamError as err:
            for _ in call:  # raises the call's error, if it failed
                pass
            raise PrepUnavailable(f"{err} while the gRPC stream ended OK", grpc.StatusCode.UNAVAILABLE,
                                  f"bulk.stream[{err.stream}]") from None
        finally:
            readers.close()
        for _ in call:
            raise FramingError("response", "a message came on the gRPC stream after the bulk answer began",
                               "only the end of the stream")

    def close(self) -> None:
        """Ends the attempt: releases a request stream still waiting, closes the connections."""
        with self._lock:
            self._closed = True
            self._decided.set()
            sockets = self._sockets or []
        for sock in sockets:
            _close(sock)
        if self._writer is not None:
            self._writer.join(5)


def _raise_if_failed(call: grpc.Call) -> None:
    """Raises ``call`` (an RpcError too) once it ended with an error."""
    if call.done() and call.code() != grpc.StatusCode.OK:
        raise call
