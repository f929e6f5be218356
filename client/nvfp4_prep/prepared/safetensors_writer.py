"""Streaming safetensors writer: header first, then each tensor's bytes, CRC32C on the way.

Tensors are given as flat uint8 byte views (of a mapped source shard or of a
prepared tensor) together with the safetensors dtype name and shape, so a source
tensor is carried over without interpreting its dtype and without staging a whole
shard in memory. Tensors are laid out widest element first so every tensor is
aligned to its element size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import crc32c
import torch

from nvfp4_prep.checkpoint.safetensors_file import DTYPE_BITS, expected_nbytes

from .atomic_file import atomic_write
from .checksum import CHUNK_BYTES


@dataclass(frozen=True)
class OutputTensor:
    """One tensor to write: name, safetensors dtype, shape and its bytes (flat uint8, CPU)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: torch.Tensor


@dataclass(frozen=True)
class WrittenTensor:
    """What the manifest records about a written tensor."""

    dtype: str
    shape: tuple[int, ...]
    crc32c: str

    def as_json(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape), "crc32c": self.crc32c}


def _layout_order(tensor: OutputTensor) -> tuple[int, str]:
    return -DTYPE_BITS[tensor.dtype], tensor.name


def write_safetensors(path: Path, tensors: list[OutputTensor], metadata: dict[str, str]) -> dict[str, WrittenTensor]:
    """Writes ``path`` atomically; returns dtype, shape and CRC32C per tensor name."""
    ordered = sorted(tensors, key=_layout_order)
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for tensor in ordered:
        nbytes = expected_nbytes(tensor.dtype, tensor.shape)
        if nbytes != tensor.data.numel() or tensor.data.dtype != torch.uint8 or tensor.data.dim() != 1:
            raise ValueError(
                f"{tensor.name}: {tensor.data.numel()} bytes given, expected {nbytes} flat uint8 bytes "
                f"for {tensor.dtype} {list(tensor.shape)}")
        header[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.shape),
                               "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)

    written = {}
    with atomic_write(path) as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for tensor in ordered:
            crc = 0
            array = tensor.data.numpy()
            for start in range(0, array.size, CHUNK_BYTES):
                chunk = array[start:start + CHUNK_BYTES]
                handle.write(memoryview(chunk))
                crc = crc32c.crc32c(chunk, value=crc)
            written[tensor.name] = WrittenTensor(tensor.dtype, tensor.shape, f"{crc:08x}")
    return written
