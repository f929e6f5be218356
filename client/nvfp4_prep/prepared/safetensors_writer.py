"""Streaming safetensors writer: header first, then each tensor's bytes, straight from the tensors' memory.

Tensors are given as flat uint8 byte views (of a mapped source shard or of a
prepared tensor) together with the safetensors dtype name and shape, so a source
tensor is carried over without interpreting its dtype and without staging a whole
shard in memory. Tensors are laid out widest element first so every tensor is
aligned to its element size.

Writing is two steps: ``stage_safetensors`` checks the tensors, builds the header
and takes each tensor's CRC32C (work that needs no file, so that it runs beside
another file's writing), then ``write_staged`` writes the bytes, with no copy in
Python and nothing else on the way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from nvfp4_prep.checkpoint.safetensors_file import DTYPE_BITS, expected_nbytes

from .atomic_file import PartialFile
from .checksum import crc32c_hex


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


@dataclass(frozen=True)
class StagedFile:
    """A safetensors file ready to write: its header (length prefix included), its tensors in file order and
    what the manifest records of each (dtype, shape, CRC32C of the bytes about to be written)."""

    header: bytes
    tensors: tuple[OutputTensor, ...]
    records: dict[str, WrittenTensor]

    @property
    def size(self) -> int:
        return len(self.header) + sum(tensor.data.numel() for tensor in self.tensors)


def _layout_order(tensor: OutputTensor) -> tuple[int, str]:
    return -DTYPE_BITS[tensor.dtype], tensor.name


def stage_safetensors(tensors: list[OutputTensor], metadata: dict[str, str]) -> StagedFile:
    """Checks every tensor's bytes against its dtype and shape, builds the header, checksums the bytes."""
    ordered = tuple(sorted(tensors, key=_layout_order))
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for tensor in ordered:
        nbytes = expected_nbytes(tensor.dtype, tensor.shape)
        if (nbytes != tensor.data.numel() or tensor.data.dtype != torch.uint8 or tensor.data.dim() != 1
                or tensor.data.device.type != "cpu" or not tensor.data.is_contiguous()):
            raise ValueError(
                f"{tensor.name}: {tensor.data.numel()} bytes given, expected {nbytes} flat contiguous uint8 CPU "
                f"bytes for {tensor.dtype} {list(tensor.shape)}")
        header[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.shape),
                               "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    records = {tensor.name: WrittenTensor(tensor.dtype, tensor.shape, crc32c_hex(tensor.data)) for tensor in ordered}
    return StagedFile(len(encoded).to_bytes(8, "little") + encoded, ordered, records)


def write_staged(file: PartialFile, staged: StagedFile) -> None:
    """Writes the staged header and tensor bytes into ``file`` (not yet committed)."""
    file.write(staged.header)
    for tensor in staged.tensors:
        file.write(tensor.data.numpy())


def write_safetensors(path: Path, tensors: list[OutputTensor], metadata: dict[str, str]) -> dict[str, WrittenTensor]:
    """Writes ``path`` atomically; returns dtype, shape and CRC32C per tensor name."""
    staged = stage_safetensors(tensors, metadata)
    file = PartialFile(path)
    try:
        write_staged(file, staged)
    except BaseException:
        file.discard()
        raise
    file.commit()
    return staged.records
