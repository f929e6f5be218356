"""The bulk transport, spoken by hand over raw sockets against a real server: offers, tickets refused when
wrong, replayed, expired or revoked (and counted), frames checked like inline chunks, TLS on the bulk port,
resumed answers, and connections that drop or stall. Then the transport's own writers and readers over
loopback connections: pieces of tensors go out as exactly the frames of their encoded messages (plaintext,
TLS, partial sends), and arrive decoded and checksummed on the streams' threads."""

from __future__ import annotations

import os
import socket
import ssl
import struct
import threading
import time
from types import SimpleNamespace

import grpc
import pytest
import torch

from nvfp4_prep import pipeline
from nvfp4_prep.server.bulk.connection import BulkChannel, BulkHub
from nvfp4_prep.server.bulk.tickets import TicketBook
from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.v1 import prep_pb2_grpc
from nvfp4_prep.wire import (
    ChecksumError,
    HostTensors,
    TensorReceiver,
    TensorSpec,
    crc32c,
    encode_chunk,
    header_for,
    iter_pieces,
)
from nvfp4_prep.wire.bulk_transport import FrameReaders, FrameWriters, frame_header
from tests.helpers.certificates import server_and_client
from tests.helpers.layer_factory import random_layer
from tests.helpers.server_state import idle, wait_for

BACKEND = "flashinfer_cutlass"
CHUNK = 64 << 10
BULK = {"bulk_address": ("127.0.0.1", 0)}
CODES = {"accepted": 0, "unknown": 1, "replayed": 2, "expired": 3, "revoked": 4, "malformed": 5}


@pytest.fixture(scope="module")
def layer():
    return random_layer(2, 256, 128)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return server_and_client(tmp_path_factory.mktemp("bulk-pki"))


def header_of(layer, streams: int = 1, **fields) -> pb.PrepareHeader:
    return pb.PrepareHeader(backend=BACKEND, activation="swiglu", input_scale_policy="max",
                            bulk=pb.BulkRequest(streams=streams),
                            tensors=pb.TensorSet(form=pb.TENSOR_FORM_STACKED,
                                                 tensors=[header_for(n, t) for n, t in layer.items()]), **fields)


def messages_of(layer) -> list[bytes]:
    return [encode_chunk(index, offset, data) for index, offset, data in iter_pieces(list(layer.values()), CHUNK)]


class RawCall:
    """A Prepare call with the bulk header: its offer is read at once; ``end(inline)`` then ends the request
    stream (after sending ``inline`` messages on it)."""

    def __init__(self, address: str, header: pb.PrepareHeader, channel_credentials=None) -> None:
        target = address
        self.channel = (grpc.secure_channel(target, channel_credentials) if channel_credentials is not None
                        else grpc.insecure_channel(target))
        self._go = threading.Event()
        self._inline: list[pb.PrepareRequest] = []

        def requests():
            yield pb.PrepareRequest(header=header)
            self._go.wait(60)
            yield from self._inline

        self.call = prep_pb2_grpc.PrepStub(self.channel).Prepare(requests(), timeout=60)
        self.offer = next(self.call).bulk

    def end(self, inline: list[pb.PrepareRequest] = ()) -> None:
        self._inline = list(inline)
        self._go.set()

    def rest(self) -> list[pb.PrepareResponse] | grpc.RpcError:
        try:
            return list(self.call)
        except grpc.RpcError as err:
            return err

    def close(self) -> None:
        self._go.set()
        self.call.cancel()
        self.channel.close()


@pytest.fixture
def raw_calls():
    calls: list[RawCall] = []

    def make(*args, **kwargs) -> RawCall:
        calls.append(RawCall(*args, **kwargs))
        return calls[-1]

    yield make
    for call in calls:
        call.close()


def dial(port: int, ticket: bytes, index: int, context: ssl.SSLContext | None = None) -> tuple[socket.socket, bytes]:
    """A connection that sent its hello, and the server's one-byte answer (b"" when it closed without one)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    if context is not None:
        sock = context.wrap_socket(sock, server_hostname="localhost")
    sock.sendall(ticket + bytes((index,)))
    try:
        return sock, sock.recv(1)
    except ConnectionResetError:  # closed with our bytes unread: refused all the same
        return sock, b""


def connected(call: RawCall, streams: int) -> list[socket.socket]:
    """Every stream of ``call``'s offer connected and accepted; then its request stream ends (the upload goes over
    the connections)."""
    sockets = [dial(call.offer.port, call.offer.ticket, index)[0] for index in range(streams)]
    call.end()
    return sockets


def send_frame(sock: socket.socket, message: bytes) -> None:
    sock.sendall(frame_header(len(message)) + message)


def send_frames(sock: socket.socket, messages: list[bytes]) -> None:
    for message in messages:
        send_frame(sock, message)
    sock.sendall(frame_header(0))


def read_frames(sock: socket.socket) -> list[pb.TensorChunk]:
    chunks = []
    while True:
        (length,) = struct.unpack("!I", _exact(sock, 4))
        if length == 0:
            return chunks
        chunks.append(pb.PrepareResponse.FromString(_exact(sock, length)).chunk)


def _exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        part = sock.recv(size - len(data))
        assert part, "the server closed the bulk connection early"
        data += part
    return data


def assemble(header: pb.PreparedHeader, chunks: list[pb.TensorChunk]) -> dict[str, bytes]:
    out = {t.name: bytearray() for t in header.tensors}
    names = [t.name for t in header.tensors]
    for chunk in chunks:
        out[names[chunk.tensor_index]] += chunk.data
    return {name: bytes(data) for name, data in out.items()}


def refused(server, reason: str) -> float:
    return server.metrics.registry.get_sample_value("nvfp4_prep_bulk_refused_total", {"reason": reason}) or 0.0


def want_bytes(layer) -> dict[str, bytes]:
    return {name: t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            for name, t in pipeline.prepare(layer, BACKEND).tensors.items()}


# -- offers and the happy path by hand ----------------------------------------------------------------

def test_a_server_without_bulk_offers_port_0_and_answers_inline(start_server, raw_calls, layer):
    server = start_server()
    assert server.service.capabilities.bulk_port == 0
    call = raw_calls(server.address, header_of(layer))
    assert call.offer.port == 0 and not call.offer.ticket
    call.end([pb.PrepareRequest.FromString(m) for m in messages_of(layer)])
    responses = call.rest()
    assert not isinstance(responses, grpc.RpcError), responses
    header, chunks = responses[0].header, [r.chunk for r in responses[1:]]
    assert assemble(header, chunks) == want_bytes(layer)


@pytest.mark.parametrize("streams", [1, 3])
def test_chunks_both_ways_over_the_bulk_connections(start_server, raw_calls, layer, streams):
    server = start_server(**BULK)
    assert server.service.capabilities.bulk_port == server.bulk.port > 0
    call = raw_calls(server.address, header_of(layer, streams))
    offer = call.offer
    assert offer.port == server.bulk.port and offer.streams == streams and len(offer.ticket) == 32
    sockets = []
    for index in range(streams):
        sock, answer = dial(offer.port, offer.ticket, index)
        assert answer == b"\x00"
        sockets.append(sock)
    call.end()  # nothing inline: the upload goes over the connections, chunk k on stream k % streams
    messages = messages_of(layer)
    for index, sock in enumerate(sockets):
        send_frames(sock, messages[index::streams])
    per_stream = [read_frames(sock) for sock in sockets]
    responses = call.rest()
    assert not isinstance(responses, grpc.RpcError), responses
    assert len(responses) == 1, "only the header travels on the gRPC stream"
    chunks = [per_stream[k % streams][k // streams] for k in range(sum(map(len, per_stream)))]
    assert assemble(responses[0].header, chunks) == want_bytes(layer)
    wait_for(lambda: idle(server), 30)


def test_a_resumed_answer_starts_at_its_resume_point(start_server, raw_calls, layer):
    server = start_server(**BULK)
    want = want_bytes(layer)
    first = next(iter(want))
    call = raw_calls(server.address, header_of(layer, 1, resume_from=pb.ResumePoint(tensor_index=0, offset=1000)))
    sock, answer = dial(call.offer.port, call.offer.ticket, 0)
    assert answer == b"\x00"
    call.end()
    send_frames(sock, messages_of(layer))
    chunks = read_frames(sock)
    assert chunks[0].tensor_index == 0 and chunks[0].offset == 1000
    got = assemble(call.rest()[0].header, chunks)
    assert got[first] == want[first][1000:]
    assert {k: v for k, v in got.items() if k != first} == {k: v for k, v in want.items() if k != first}


def test_a_cached_answer_is_replayed_over_bulk(start_server, raw_calls, layer):
    server = start_server(cache_bytes=64 << 20, **BULK)
    for attempt in range(2):
        call = raw_calls(server.address, header_of(layer, 2))
        sockets = connected(call, 2)
        messages = messages_of(layer)
        for index, sock in enumerate(sockets):
            send_frames(sock, messages[index::2])
        per_stream = [read_frames(sock) for sock in sockets]
        header = call.rest()[0].header
        assert header.cache_hit == (attempt == 1)
        chunks = [per_stream[k % 2][k // 2] for k in range(sum(map(len, per_stream)))]
        assert assemble(header, chunks) == want_bytes(layer)


def test_a_client_that_sends_inline_gets_an_inline_answer(start_server, raw_calls, layer):
    server = start_server(**BULK)
    call = raw_calls(server.address, header_of(layer, 2))
    call.end([pb.PrepareRequest.FromString(m) for m in messages_of(layer)])  # never connected
    responses = call.rest()
    assert assemble(responses[0].header, [r.chunk for r in responses[1:]]) == want_bytes(layer)


def test_streams_out_of_range_are_refused_naming_the_field(start_server, raw_calls, layer):
    server = start_server(**BULK)
    channel = grpc.insecure_channel(server.address)
    stub = prep_pb2_grpc.PrepStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Prepare(iter([pb.PrepareRequest(header=header_of(layer, 9))]), timeout=30))
    channel.close()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "header.bulk.streams" in caught.value.details()


# -- tickets -------------------------------------------------------------------------------------------

def test_a_wrong_ticket_is_refused_and_counted(start_server):
    server = start_server(**BULK)
    sock, answer = dial(server.bulk.port, os.urandom(32), 0)
    assert answer == bytes((CODES["unknown"],))
    assert sock.recv(1) == b"", "closed after the refusal"
    sock.close()
    wait_for(lambda: refused(server, "unknown") == 1)


def test_a_replayed_slot_an_index_out_of_range_and_a_revoked_ticket_are_refused(start_server, raw_calls, layer):
    server = start_server(**BULK)
    call = raw_calls(server.address, header_of(layer, 2))
    first, answer = dial(call.offer.port, call.offer.ticket, 0)
    assert answer == b"\x00"
    again, answer = dial(call.offer.port, call.offer.ticket, 0)
    assert answer == bytes((CODES["replayed"],))
    beyond, answer = dial(call.offer.port, call.offer.ticket, 5)
    assert answer == bytes((CODES["malformed"],))
    call.close()  # the call ends: its ticket is revoked, its connection closed
    wait_for(lambda: idle(server), 30)
    first.settimeout(30)
    assert first.recv(1) == b"", "the accepted connection closes with its call"
    late, answer = dial(call.offer.port, call.offer.ticket, 1)
    assert answer == bytes((CODES["revoked"],))
    for sock in (first, again, beyond, late):
        sock.close()
    wait_for(lambda: (refused(server, "replayed"), refused(server, "malformed"), refused(server, "revoked"))
             == (1, 1, 1))


def test_an_expired_ticket_is_refused(start_server, raw_calls, layer):
    server = start_server(bulk_ticket_timeout=0.5, **BULK)
    call = raw_calls(server.address, header_of(layer, 1))
    time.sleep(1.0)
    sock, answer = dial(call.offer.port, call.offer.ticket, 0)
    assert answer == bytes((CODES["expired"],))
    sock.close()
    call.end([pb.PrepareRequest.FromString(m) for m in messages_of(layer)])  # the call itself goes on inline
    responses = call.rest()
    assert assemble(responses[0].header, [r.chunk for r in responses[1:]]) == want_bytes(layer)
    assert refused(server, "expired") == 1


# -- frames ---------------------------------------------------------------------------------------------

def test_a_corrupted_frame_is_refused_naming_the_tensor(start_server, raw_calls, layer):
    server = start_server(**BULK)
    call = raw_calls(server.address, header_of(layer, 1))
    sock, _ = dial(call.offer.port, call.offer.ticket, 0)
    call.end()
    messages = messages_of(layer)
    bad = bytearray(messages[1])
    bad[len(bad) // 2] ^= 0xFF  # a data byte: the chunk's CRC32C no longer matches
    try:
        send_frames(sock, [messages[0], bytes(bad), *messages[2:]])
    except (BrokenPipeError, ConnectionResetError):  # the server hung up at the bad frame, before the rest went
        pass
    error = call.rest()
    assert isinstance(error, grpc.RpcError)
    assert error.code() == grpc.StatusCode.DATA_LOSS
    index = pb.PrepareRequest.FromString(messages[1]).chunk.tensor_index
    assert f"tensors[{index}] ({list(layer)[index]}).chunk.crc32c" in error.details()
    wait_for(lambda: idle(server), 30)


def test_a_frame_that_is_not_a_chunk_is_refused_naming_the_frame(start_server, raw_calls, layer):
    server = start_server(**BULK)
    call = raw_calls(server.address, header_of(layer, 2))
    sockets = connected(call, 2)
    messages = messages_of(layer)
    again = pb.PrepareRequest(header=header_of(layer, 2)).SerializeToString()
    for sock, message in zip(sockets, [messages[0], again], strict=True):  # chunk 1's turn: a header instead
        send_frame(sock, message)
    error = call.rest()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "bulk.frame" in error.details() and f"{len(again)} bytes" in error.details()
    wait_for(lambda: idle(server), 30)


def test_a_frame_larger_than_the_server_takes_is_refused(start_server, raw_calls, layer):
    server = start_server(**BULK)
    call = raw_calls(server.address, header_of(layer, 1))
    sock, _ = dial(call.offer.port, call.offer.ticket, 0)
    call.end()
    sock.sendall(struct.pack("!I", 1 << 30))
    error = call.rest()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "bulk.stream[0]" in error.details()
    wait_for(lambda: idle(server), 30)


def test_a_connection_dropping_mid_upload_fails_the_call_and_frees_everything(start_server, raw_calls, layer):
    server = start_server(**BULK)
    call = raw_calls(server.address, header_of(layer, 2))
    sockets = connected(call, 2)
    messages = messages_of(layer)
    for index, message in enumerate(messages[:2]):
        send_frame(sockets[index % 2], message)
    wait_for(lambda: server.workers[0].budget.in_use > 0, 30)
    sockets[1].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sockets[1].close()  # a reset, as when the client's host goes away
    error = call.rest()
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "bulk.stream[1]" in error.details()
    wait_for(lambda: idle(server), 30)


@pytest.mark.parametrize("tls", [False, True])
def test_an_upload_stalled_mid_frame_ends_at_the_idle_timeout_and_frees_everything(start_server, raw_calls, pki,
                                                                                   layer, tls):
    idle_timeout = 1.0
    tls_files = {"tls_cert": pki.server.cert_path, "tls_key": pki.server.key_path} if tls else {}
    server = start_server(idle_timeout=idle_timeout, **tls_files, **BULK)
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert_pem) if tls else None
    call = raw_calls(f"localhost:{server.port}", header_of(layer, 1), credentials)
    context = ssl.create_default_context(cadata=pki.ca.cert_pem.decode()) if tls else None
    sock, answer = dial(call.offer.port, call.offer.ticket, 0, context)
    assert answer == b"\x00"
    call.end()
    messages = messages_of(layer)
    send_frame(sock, messages[0])
    sock.sendall(frame_header(len(messages[1])) + messages[1][:len(messages[1]) // 2])  # then nothing more
    started = time.monotonic()
    error = call.rest()
    waited = time.monotonic() - started
    assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "bulk.stream[0]" in error.details() and "--idle-timeout=1s" in error.details()
    assert waited < idle_timeout + 20, f"the stalled upload held the call for {waited:.1f}s"
    wait_for(lambda: idle(server), 30)


def test_a_client_that_stops_reading_the_answer_ends_at_the_idle_timeout(start_server, raw_calls):
    big = random_layer(16, 1024, 512)  # an answer of some 12 MB: more than both kernel buffers hold
    server = start_server(idle_timeout=1.0, **BULK)
    call = raw_calls(server.address, header_of(big, 1))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", call.offer.port))
    sock.sendall(call.offer.ticket + bytes((0,)))
    assert sock.recv(1) == b"\x00"
    call.end()
    send_frames(sock, messages_of(big))  # and then no answer byte is read
    started = time.monotonic()
    error = call.rest()
    waited = time.monotonic() - started
    sock.close()
    assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "bulk.stream[0]: the client did not read anything" in error.details()
    assert waited < 21, f"the stuck reader held the call for {waited:.1f}s"
    wait_for(lambda: idle(server), 30)


# -- TLS ------------------------------------------------------------------------------------------------

def test_the_bulk_port_speaks_tls_when_the_server_does(start_server, raw_calls, pki, layer):
    server = start_server(tls_cert=pki.server.cert_path, tls_key=pki.server.key_path, **BULK)
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert_pem)
    call = raw_calls(f"localhost:{server.port}", header_of(layer, 1), credentials)
    plain, answer = dial(call.offer.port, call.offer.ticket, 0)  # plaintext to a TLS port
    assert answer != b"\x00"
    plain.close()
    context = ssl.create_default_context(cadata=pki.ca.cert_pem.decode())
    sock, answer = dial(call.offer.port, call.offer.ticket, 0, context)
    assert answer == b"\x00", "the plaintext attempt did not use up the slot"
    assert sock.version() is not None
    call.end()
    send_frames(sock, messages_of(layer))
    chunks = read_frames(sock)
    assert assemble(call.rest()[0].header, chunks) == want_bytes(layer)
    wait_for(lambda: refused(server, "handshake") == 1)


def test_a_mutual_tls_bulk_port_wants_the_client_certificate(start_server, raw_calls, pki, layer):
    server = start_server(tls_cert=pki.server.cert_path, tls_key=pki.server.key_path,
                          tls_client_ca=pki.ca.cert_path, **BULK)
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert_pem, private_key=pki.client.key_pem,
                                               certificate_chain=pki.client.cert_pem)
    call = raw_calls(f"localhost:{server.port}", header_of(layer, 1), credentials)
    anonymous = ssl.create_default_context(cadata=pki.ca.cert_pem.decode())
    try:
        _, answer = dial(call.offer.port, call.offer.ticket, 0, anonymous)
    except (ssl.SSLError, OSError):  # the server's refusal of the handshake, seen here or at the first read
        answer = b""
    assert answer == b"", "no client certificate: no answer to the hello"
    identified = ssl.create_default_context(cadata=pki.ca.cert_pem.decode())
    identified.load_cert_chain(pki.client.cert_path, pki.client.key_path)
    sock, answer = dial(call.offer.port, call.offer.ticket, 0, identified)
    assert answer == b"\x00"
    call.end()
    send_frames(sock, messages_of(layer))
    assert assemble(call.rest()[0].header, read_frames(sock)) == want_bytes(layer)


# -- the writers and readers themselves -------------------------------------------------------------------

PIECE = 64 << 10


def random_tensors() -> list[torch.Tensor]:
    """Two tensors of random bytes, neither a whole number of pieces long (so chunks of both tensors, at offsets
    past 0, and short last pieces)."""
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, 256, (size,), dtype=torch.uint8, generator=gen) for size in (300_001, 70_000)]


def frames_of(messages: list[bytes]) -> bytes:
    return b"".join(frame_header(len(message)) + message for message in messages)


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        part = sock.recv(min(size - len(data), 1 << 16))
        assert part, f"the connection closed after {len(data)} of {size} bytes"
        data += part
    return bytes(data)


class RecordingSocket(socket.socket):
    """A plain TCP socket that keeps, for every ``sendmsg``, how many bytes it was given and how many it sent."""

    def __init__(self, sock: socket.socket) -> None:
        timeout = sock.gettimeout()
        super().__init__(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self.settimeout(timeout)
        self.sends: list[tuple[int, int]] = []

    def sendmsg(self, buffers, *args) -> int:
        buffers = list(buffers)
        sent = super().sendmsg(buffers, *args)
        self.sends.append((sum(memoryview(b).nbytes for b in buffers), sent))
        return sent


@pytest.fixture
def connect(pki):
    """Makes a connected (sender, receiver) pair on loopback, TLS both ways with ``tls``; ``buffer`` bytes of
    kernel buffer each way when given. Closes them all at the end."""
    opened: list[socket.socket] = []

    def make(tls: bool = False, buffer: int | None = None) -> tuple[socket.socket, socket.socket]:
        with socket.socket() as listener:
            if buffer is not None:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)  # the accepted socket's too
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            sender = socket.socket()
            opened.append(sender)
            if buffer is not None:
                sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
            sender.settimeout(30)
            sender.connect(listener.getsockname())
            receiver, _ = listener.accept()
        opened.append(receiver)
        receiver.settimeout(30)
        if not tls:
            return sender, receiver
        server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_side.load_cert_chain(pki.server.cert_path, pki.server.key_path)
        client_side = ssl.create_default_context(cadata=pki.ca.cert_pem.decode())
        accepted: list[ssl.SSLSocket] = []
        handshake = threading.Thread(target=lambda: accepted.append(server_side.wrap_socket(receiver,
                                                                                            server_side=True)))
        handshake.start()
        sender = client_side.wrap_socket(sender, server_hostname="localhost")
        handshake.join(30)
        opened.extend([sender, *accepted])
        return sender, accepted[0]

    yield make
    for sock in opened:
        sock.close()


@pytest.mark.parametrize("tls", [False, True])
def test_pieces_go_out_as_the_frames_of_their_encoded_messages(connect, tls):
    sender, receiver = connect(tls)
    pieces = list(iter_pieces(random_tensors(), PIECE))
    messages = [encode_chunk(*piece) for piece in pieces]
    writers = FrameWriters([sender])
    for piece in pieces:
        writers.send(piece)
    for message in messages:  # encoded messages (the server's answers) are still taken as they are
        writers.send(message)
    writers.finish()
    writers.close()
    want = frames_of(messages) * 2 + frame_header(0)
    assert read_exactly(receiver, len(want)) == want
    sender.shutdown(socket.SHUT_WR)  # not close(): TLS tickets it never read would make that a reset
    assert receiver.recv(1) == b"", "nothing after the end of the direction"


def test_partial_sends_deliver_every_byte(connect):
    sender, receiver = connect(buffer=4096)
    sender = RecordingSocket(sender)  # it has a timeout, so a send writes what the kernel takes, and returns
    pieces = list(iter_pieces(random_tensors(), PIECE))
    want = frames_of([encode_chunk(*piece) for piece in pieces]) + frame_header(0)
    got = bytearray()

    def read_slowly() -> None:
        while len(got) < len(want):
            part = receiver.recv(4096)
            if not part:
                return
            got.extend(part)
            time.sleep(0.001)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    writers = FrameWriters([sender])
    for piece in pieces:
        writers.send(piece)
    writers.finish()
    writers.close()
    reader.join(60)
    assert bytes(got) == want
    assert any(sent < given for given, sent in sender.sends), "the kernel took every send whole: nothing partial"
    sender.close()


def send_all(writers: FrameWriters, messages: list) -> threading.Thread:
    """Sends ``messages`` and finishes the direction on a thread of its own (the readers run on this one)."""

    def run() -> None:
        for message in messages:
            writers.send(message)
        writers.finish()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("streams", [1, 3])
def test_pieces_arrive_in_order_checksummed_where_they_were_received(connect, streams):
    tensors = random_tensors()
    specs = [TensorSpec(f"t{index}", torch.uint8, tuple(t.shape), t.numel()) for index, t in enumerate(tensors)]
    pairs = [connect() for _ in range(streams)]
    writers = FrameWriters([sender for sender, _ in pairs])
    sending = send_all(writers, list(iter_pieces(tensors, PIECE)))
    sink = HostTensors(specs)
    receiver = TensorReceiver(specs, sink)
    for frame, chunk in FrameReaders([r for _, r in pairs], limit=2 * PIECE):
        assert chunk.actual_crc32c == crc32c(bytes(chunk.data)) == chunk.crc32c
        assert bytes(frame) == encode_chunk(chunk.tensor_index, chunk.offset, chunk.data)
        receiver.add(chunk)
    receiver.finish()
    sending.join(30)
    writers.close()
    assert all(torch.equal(got, want) for got, want in zip(sink.tensors().values(), tensors, strict=True))


def test_a_corrupted_frame_or_one_that_is_no_chunk_is_told_apart_by_the_readers(connect):
    tensors = random_tensors()
    specs = [TensorSpec(f"t{index}", torch.uint8, tuple(t.shape), t.numel()) for index, t in enumerate(tensors)]
    pieces = list(iter_pieces(tensors, PIECE))
    bad = bytearray(encode_chunk(*pieces[-1]))  # a chunk of t1
    bad[len(bad) // 2] ^= 0xFF
    other = pb.PrepareRequest(header=pb.PrepareHeader(backend=BACKEND)).SerializeToString()
    pairs = [connect() for _ in range(2)]
    writers = FrameWriters([sender for sender, _ in pairs])
    sending = send_all(writers, [other, *pieces[:-1], bytes(bad)])
    frames = iter(FrameReaders([r for _, r in pairs], limit=2 * PIECE))
    frame, chunk = next(frames)
    assert chunk is None and bytes(frame) == other
    receiver = TensorReceiver(specs, HostTensors(specs))
    with pytest.raises(ChecksumError, match=r"tensors\[1\] \(t1\)\.chunk\.crc32c"):
        for _, chunk in frames:
            receiver.add(chunk)
    assert receiver.position == (1, pieces[-1][1]), "every chunk before the corrupted one landed"
    frames.close()
    sending.join(30)
    writers.close()


@pytest.mark.parametrize("streams", [1, 3])
def test_pieces_from_reused_buffers_arrive_intact(streams):
    # A staging ring of held + 1 buffers, each refilled as soon as the sender's rule lets it take the next piece:
    # with readers that lag, a buffer reused before its piece was written would show as another chunk's bytes.
    held, count, size = 2, 24, 256 << 10
    pairs = [socket.socketpair() for _ in range(streams)]
    ring = [torch.empty(size, dtype=torch.uint8) for _ in range(held + 1)]

    def pieces():
        for k in range(count):
            buffer = ring[k % len(ring)]
            buffer.fill_(k)
            yield 0, k * size, memoryview(buffer.numpy())

    hub = BulkHub(TicketBook(), 0, "", 30.0, size + 1024)
    sender = threading.Thread(target=BulkChannel([a for a, _ in pairs], hub, lambda: None).send_pieces,
                              args=(pieces(), held))
    sender.start()
    got = bytearray()
    for _, chunk in FrameReaders([b for _, b in pairs], size + 1024):
        time.sleep(0.005)
        got += bytes(chunk.data)
    sender.join(10)
    assert bytes(got) == b"".join(bytes([k]) * size for k in range(count))
    for a, b in pairs:
        a.close()
        b.close()
