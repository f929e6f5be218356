"""The chunk-carrying Prepare messages, encoded and decoded by hand on the hot path.

``PrepareRequest`` and ``PrepareResponse`` both carry a ``TensorChunk`` as field
2; nearly every byte of a Prepare stream sits in such a message. Protobuf's
Python runtime copies a chunk's data twice to parse it and once more to
serialize it, all under the GIL. Here a chunk is encoded with one copy
straight from the tensor's memory (or none: ``chunk_parts`` leaves the data
where it lies, for a gathering write) and decoded with none (its data is a
view of the received message). The bytes on the wire are exactly what protobuf
writes (tests compare them), and anything that is not a plain chunk message
goes through protobuf.
"""

from __future__ import annotations

from typing import NamedTuple

from nvfp4_prep.v1 import prep_pb2 as pb

from .checksum import crc32c

# Tags: field number << 3 | wire type.
_CHUNK_FIELD = 0x12  # field 2, length-delimited
_INDEX = 0x08  # field 1, varint
_OFFSET = 0x10  # field 2, varint
_DATA = 0x1A  # field 3, length-delimited
_CRC = 0x25  # field 4, fixed32


class Chunk(NamedTuple):
    """A decoded TensorChunk; ``data`` is a view of the message it came in. ``actual_crc32c`` is the CRC32C
    computed over ``data`` where it was decoded (a bulk stream's own thread), None when not computed yet."""

    tensor_index: int
    offset: int
    data: memoryview
    crc32c: int
    actual_crc32c: int | None = None


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(raw) or shift > 63:
            raise ValueError("truncated varint")
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def chunk_parts(index: int, offset: int, data) -> tuple[bytes, memoryview, bytes]:
    """The message ``encode_chunk`` makes, in three parts: everything before the data, a view of ``data`` (any
    contiguous buffer), and the CRC32C field; sent one after the other (``socket.sendmsg``) without a copy."""
    view = memoryview(data).cast("B")
    crc = crc32c(view)
    head = bytearray()
    if index:
        head += bytes((_INDEX,)) + _varint(index)
    if offset:
        head += bytes((_OFFSET,)) + _varint(offset)
    head += bytes((_DATA,)) + _varint(view.nbytes)
    tail = bytes((_CRC,)) + crc.to_bytes(4, "little") if crc else b""
    prefix = bytes((_CHUNK_FIELD,)) + _varint(len(head) + view.nbytes + len(tail)) + head
    return prefix, view, tail


def encode_chunk(index: int, offset: int, data) -> bytes:
    """A whole PrepareRequest/PrepareResponse holding one chunk of ``data`` (any contiguous buffer) with its
    CRC32C; the one copy of ``data`` is the final join."""
    return b"".join(chunk_parts(index, offset, data))


def decode_chunk(raw: bytes | memoryview, checksum: bool = False) -> Chunk | None:
    """The chunk of a serialized PrepareRequest/PrepareResponse, or None if it is not a plain chunk message;
    ``checksum`` computes its ``actual_crc32c`` here and now (on the thread that received it)."""
    if not raw or raw[0] != _CHUNK_FIELD:
        return None
    try:
        length, pos = _read_varint(raw, 1)
        if pos + length != len(raw):
            return None
        index = offset = crc = 0
        data = memoryview(raw)[0:0]
        while pos < len(raw):
            tag = raw[pos]
            pos += 1
            if tag == _INDEX:
                index, pos = _read_varint(raw, pos)
            elif tag == _OFFSET:
                offset, pos = _read_varint(raw, pos)
            elif tag == _DATA:
                size, pos = _read_varint(raw, pos)
                data = memoryview(raw)[pos:pos + size]
                pos += size
            elif tag == _CRC and pos + 4 <= len(raw):
                crc = int.from_bytes(raw[pos:pos + 4], "little")
                pos += 4
            else:
                return None
        if pos != len(raw) or index > 0xFFFFFFFF:
            return None
        return Chunk(index, offset, data, crc, crc32c(data) if checksum else None)
    except ValueError:
        return None


def encode_message(message) -> bytes:
    """Serializer for Prepare streams: pre-encoded chunks pass through, messages are serialized."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def decode_request(raw: bytes) -> Chunk | pb.PrepareRequest:
    chunk = decode_chunk(raw)
    return chunk if chunk is not None else pb.PrepareRequest.FromString(raw)


def decode_response(raw: bytes) -> Chunk | pb.PrepareResponse:
    chunk = decode_chunk(raw)
    return chunk if chunk is not None else pb.PrepareResponse.FromString(raw)


def chunk_of(message: Chunk | pb.PrepareRequest | pb.PrepareResponse) -> Chunk | pb.TensorChunk | None:
    """The chunk a decoded message carries (however it was decoded), or None for a header."""
    if isinstance(message, Chunk):
        return message
    return message.chunk if message.WhichOneof("message") == "chunk" else None
