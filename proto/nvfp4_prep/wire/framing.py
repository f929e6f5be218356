"""Tensor framing: headers, checksummed chunks, and the receiver that reassembles them.

A tensor travels as a ``TensorHeader`` and then ``TensorChunk`` messages in
header order, offsets ascending without gaps, each chunk carrying the CRC32C
of its bytes. The same rules bind the client's requests and the server's
responses, so both sides use this module.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy
import torch

from nvfp4_prep.contract.tensor_bytes import byte_view
from nvfp4_prep.v1 import prep_pb2 as pb

from .checksum import crc32c
from .chunk_codec import Chunk
from .dtypes import dtype_name, torch_dtype
from .errors import ChecksumError, FramingError

MIN_CHUNK_SIZE = 64 << 10
MAX_CHUNK_SIZE = 64 << 20
DEFAULT_CHUNK_SIZE = 2 << 20
# Room for everything in a message besides a chunk's data (and for request headers).
MESSAGE_OVERHEAD = 1 << 20
MAX_DIMS = 8


@dataclass(frozen=True)
class TensorSpec:
    """A validated tensor header."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    byte_length: int


def check_chunk_size(chunk_size: int, field: str = "chunk_size") -> int:
    """``chunk_size`` if it lies in the supported range, else a FramingError naming ``field``."""
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise FramingError(field, f"is {chunk_size} bytes", f"{MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE} bytes")
    return chunk_size


def tensor_bytes(tensor: torch.Tensor, field: str = "tensor") -> memoryview:
    """The bytes of a CPU tensor as a flat view (a copy only if it is not contiguous)."""
    if tensor.device.type != "cpu":
        raise FramingError(field, f"lives on {tensor.device}", "a CPU tensor")
    data = byte_view(tensor)
    return memoryview(data.numpy()) if data.numel() else memoryview(b"")


def header_for(name: str, tensor: torch.Tensor) -> pb.TensorHeader:
    """The header announcing ``tensor`` under ``name``."""
    return pb.TensorHeader(
        name=name,
        dtype=dtype_name(tensor.dtype, name),
        shape=list(tensor.shape),
        byte_length=tensor.numel() * tensor.element_size(),
    )


def fill_chunk(message: pb.TensorChunk, index: int, offset: int, data: bytes) -> pb.TensorChunk:
    """Sets a protobuf ``TensorChunk`` to one chunk with its CRC32C (``chunk_codec`` is the fast way)."""
    message.tensor_index = index
    message.offset = offset
    message.data = data
    message.crc32c = crc32c(data)
    return message


def iter_pieces(tensors: Sequence[torch.Tensor], chunk_size: int, spans: Sequence[tuple[int, int]] | None = None
                ) -> Iterator[tuple[int, int, memoryview]]:
    """``(tensor index, offset, view of the bytes)`` of every chunk of CPU tensors, in order, without copies;
    ``spans``: the ``[start, end)`` byte range of each tensor to cut (default: all of it)."""
    for index, tensor in enumerate(tensors):
        start, end = spans[index] if spans is not None else (0, None)
        if start == end:
            continue
        data = tensor_bytes(tensor, f"tensors[{index}]")
        end = len(data) if end is None else end
        for offset in range(start, end, chunk_size):
            yield index, offset, data[offset:min(offset + chunk_size, end)]


def read_headers(headers: Sequence[pb.TensorHeader], field: str) -> list[TensorSpec]:
    """Validates tensor headers (``field`` names the list in errors) and returns their specs."""
    specs: list[TensorSpec] = []
    seen: set[str] = set()
    for index, header in enumerate(headers):
        where = f"{field}[{index}]"
        if not header.name:
            raise FramingError(f"{where}.name", "is empty", "a tensor name")
        where = f"{field}[{index}] ({header.name})"
        if header.name in seen:
            raise FramingError(f"{where}.name", "appears twice", "unique tensor names")
        seen.add(header.name)
        dtype = torch_dtype(header.dtype, f"{where}.dtype")
        shape = tuple(header.shape)
        if len(shape) > MAX_DIMS or any(size < 0 for size in shape):
            raise FramingError(f"{where}.shape", f"is {list(shape)}", f"at most {MAX_DIMS} non-negative sizes")
        expected = math.prod(shape) * dtype.itemsize
        if header.byte_length != expected:
            raise FramingError(f"{where}.byte_length", f"is {header.byte_length}",
                               f"{expected} for shape {list(shape)} of {header.dtype}")
        specs.append(TensorSpec(header.name, dtype, shape, expected))
    return specs


class ChunkSink(Protocol):
    """Where a receiver puts verified chunk bytes."""

    def write(self, index: int, offset: int, data: bytes | memoryview) -> None: ...


class HostTensors:
    """A ChunkSink that assembles tensors in ordinary CPU memory.

    ``prefault``: every page is written first, by torch's threads at once. A fresh page costs a fault on its first
    write, and a receiver copying chunks in on one thread would pay them all: several times the copy itself.
    """

    def __init__(self, specs: Sequence[TensorSpec], prefault: bool = False) -> None:
        self._specs = list(specs)
        allocate = torch.zeros if prefault else torch.empty
        self._buffers = [allocate(spec.byte_length, dtype=torch.uint8) for spec in self._specs]
        self._arrays = [buf.numpy() for buf in self._buffers]

    def write(self, index: int, offset: int, data: bytes | memoryview) -> None:
        # numpy copies without holding the GIL, so concurrent streams copy in parallel.
        self._arrays[index][offset:offset + len(data)] = numpy.frombuffer(data, dtype=numpy.uint8)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The assembled tensors with their announced dtypes and shapes."""
        return {spec.name: buf.view(spec.dtype).reshape(spec.shape)
                for spec, buf in zip(self._specs, self._buffers, strict=True)}


class TensorReceiver:
    """Checks each incoming chunk against the headers and its checksum, then hands it to a sink.

    Chunks must come in header order with ascending offsets and no gaps, so a
    receiver never holds more than the tensors themselves.
    """

    def __init__(self, specs: Sequence[TensorSpec], sink: ChunkSink, field: str = "tensors") -> None:
        self._specs = list(specs)
        self._sink = sink
        self._field = field
        self._current = 0
        self._received = 0
        self.bytes_received = 0
        self._skip_complete()

    @property
    def done(self) -> bool:
        return self._current == len(self._specs)

    @property
    def position(self) -> tuple[int, int]:
        """(tensor index, offset) of the next byte expected: where a resumed stream starts."""
        return self._current, self._received

    def _where(self, index: int) -> str:
        return f"{self._field}[{index}] ({self._specs[index].name})"

    def _skip_complete(self) -> None:
        while self._current < len(self._specs) and self._received == self._specs[self._current].byte_length:
            self._current += 1
            self._received = 0

    def add(self, chunk: pb.TensorChunk | Chunk) -> bytes | memoryview:
        """Checks ``chunk``, hands its bytes to the sink and returns them."""
        index = chunk.tensor_index
        if self.done:
            raise FramingError("chunk.tensor_index", f"is {index} after every tensor arrived", "no further chunks")
        if index != self._current:
            raise FramingError("chunk.tensor_index", f"is {index}",
                               f"{self._current}, the next tensor in header order")
        where = self._where(index)
        if chunk.offset != self._received:
            raise FramingError(f"{where}.chunk.offset", f"is {chunk.offset}",
                               f"{self._received}, right after the bytes received so far")
        data = chunk.data
        remaining = self._specs[index].byte_length - self._received
        if not data or len(data) > remaining:
            raise FramingError(f"{where}.chunk.data", f"holds {len(data)} bytes", f"1 to {remaining} bytes")
        actual = chunk.actual_crc32c if isinstance(chunk, Chunk) else None
        if actual is None:  # not computed where the chunk was decoded
            actual = crc32c(data)
        if actual != chunk.crc32c:
            raise ChecksumError(f"{where}.chunk.crc32c", f"is {chunk.crc32c:#010x} at offset {chunk.offset}",
                                f"{actual:#010x}, the CRC32C of the chunk's bytes")
        self._sink.write(index, chunk.offset, data)
        self._received += len(data)
        self.bytes_received += len(data)
        self._skip_complete()
        return data

    def finish(self) -> None:
        """Raises unless every announced byte arrived."""
        if not self.done:
            spec = self._specs[self._current]
            raise FramingError(f"{self._where(self._current)}", f"ended after {self._received} bytes",
                               f"{spec.byte_length} bytes")


def encode_tensors(tensors: Mapping[str, torch.Tensor], chunk_size: int) -> Iterator[pb.TensorChunk]:
    """Chunk messages of every tensor in mapping order (the order of their headers)."""
    for index, offset, data in iter_pieces(list(tensors.values()), chunk_size):
        yield fill_chunk(pb.TensorChunk(), index, offset, bytes(data))
