"""The hand-written chunk codec writes and reads exactly protobuf's bytes; Prefetch keeps order and stops."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.wire import (
    Chunk,
    Prefetch,
    chunk_of,
    crc32c,
    decode_chunk,
    decode_request,
    decode_response,
    encode_chunk,
)
from nvfp4_prep.wire.chunk_codec import chunk_parts

chunks = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**63 - 1), st.binary(min_size=1, max_size=3000))


@settings(max_examples=200, deadline=None)
@given(chunks)
def test_encoding_equals_protobufs(chunk) -> None:
    index, offset, data = chunk
    for message_type in (pb.PrepareRequest, pb.PrepareResponse):
        message = message_type()
        message.chunk.tensor_index, message.chunk.offset, message.chunk.data = index, offset, data
        message.chunk.crc32c = crc32c(data)
        assert encode_chunk(index, offset, memoryview(data)) == message.SerializeToString()


@settings(max_examples=200, deadline=None)
@given(chunks)
def test_the_parts_of_a_chunk_are_its_encoding_around_the_data_itself(chunk) -> None:
    index, offset, data = chunk
    source = bytearray(data)
    prefix, view, tail = chunk_parts(index, offset, source)
    assert prefix + bytes(view) + tail == encode_chunk(index, offset, data)
    source[0] ^= 0xFF
    assert view[0] == source[0], "the data part is a view of the source, not a copy"


@settings(max_examples=200, deadline=None)
@given(chunks)
def test_decoding_reads_what_protobuf_wrote(chunk) -> None:
    index, offset, data = chunk
    message = pb.PrepareResponse()
    message.chunk.tensor_index, message.chunk.offset, message.chunk.data, message.chunk.crc32c = index, offset, data, 7
    decoded = decode_chunk(message.SerializeToString())
    assert decoded is not None
    assert (decoded.tensor_index, decoded.offset, bytes(decoded.data), decoded.crc32c) == (index, offset, data, 7)


def test_chunk_data_is_a_view_of_the_message() -> None:
    raw = encode_chunk(1, 2, b"abcdef")
    decoded = decode_chunk(raw)
    assert decoded.data.obj is raw and bytes(decoded.data) == b"abcdef"


def test_decoding_computes_the_checksum_of_the_data_only_when_asked() -> None:
    raw = bytearray(encode_chunk(1, 2, b"abcdef"))
    assert decode_chunk(raw).actual_crc32c is None
    raw[-6] ^= 0xFF  # a data byte (the CRC32C field is the last 5): the declared checksum no longer holds
    decoded = decode_chunk(raw, checksum=True)
    assert decoded.crc32c == crc32c(b"abcdef") and decoded.actual_crc32c == crc32c(bytes(decoded.data))
    assert bytes(decoded.data) == b"abcde\x99"


def test_numpy_and_memoryview_sources_encode_alike() -> None:
    import numpy

    array = numpy.arange(300, dtype=numpy.uint8)
    assert encode_chunk(0, 0, array) == encode_chunk(0, 0, memoryview(array.tobytes()))


def test_headers_and_unusual_messages_go_through_protobuf() -> None:
    header = pb.PrepareRequest(header=pb.PrepareHeader(backend="flashinfer_cutlass"))
    raw = header.SerializeToString()
    assert decode_chunk(raw) is None
    decoded = decode_request(raw)
    assert isinstance(decoded, pb.PrepareRequest) and decoded.header.backend == "flashinfer_cutlass"
    assert chunk_of(decoded) is None
    # A chunk followed by an unknown field: still valid protobuf, decoded by protobuf.
    chunk = encode_chunk(3, 4, b"xyz")
    unusual = chunk + b"\x18\x01"
    assert decode_chunk(unusual) is None
    via_protobuf = decode_response(unusual)
    assert isinstance(via_protobuf, pb.PrepareResponse) and chunk_of(via_protobuf).data == b"xyz"
    assert isinstance(decode_response(chunk), Chunk) and chunk_of(decode_response(chunk)).offset == 4


@pytest.mark.parametrize("raw", [b"\x12", b"\x12\xff", b"\x12\x05\x08\x01", b"\x12\x03\x1a\x09ab", b"\x12\x02\x25\x01"])
def test_truncated_messages_are_not_chunks(raw: bytes) -> None:
    assert decode_chunk(raw) is None


def test_prefetch_keeps_order_and_raises_the_producers_error() -> None:
    assert list(Prefetch(iter(range(100)), depth=3)) == list(range(100))

    def failing():
        yield 1
        raise KeyError("boom")

    feed = Prefetch(failing())
    assert next(feed) == 1
    with pytest.raises(KeyError, match="boom"):
        next(feed)


def test_prefetch_close_from_another_thread_ends_both_sides() -> None:
    closed = threading.Event()

    def endless():
        try:
            while True:
                yield b"x"
        finally:
            closed.set()

    feed = Prefetch(endless(), depth=2)
    assert next(feed) == b"x"
    waiting = threading.Thread(target=lambda: [time.sleep(0.05), feed.close()])
    waiting.start()
    rest = list(feed)  # ends once close() is called, although the source never does
    waiting.join()
    assert all(item == b"x" for item in rest)
    assert closed.wait(5)
