"""One safetensors file: its header parsed and checked, its tensors read through mmap.

The header (8-byte little-endian length, then JSON) is parsed here rather than by
the safetensors library so that a truncated file, a corrupt header or offsets past
the end of the file become a CheckpointInvalid naming the file and the field,
before any tensor byte is touched. Tensor data is never copied here: ``raw`` and
``tensor`` return views of a copy-on-write memory map of the whole file (the
mapping lives as long as any view of it does).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from nvfp4_prep.contract.dtypes import DTYPES

from .errors import CheckpointInvalid, CheckpointNotFound

# The safetensors library refuses headers above this size; so do we.
MAX_HEADER_BYTES = 100_000_000

# Bits per element of every dtype name the safetensors format defines, and the torch dtype of each one torch holds.
DTYPE_BITS = {row.safetensors: row.bits for row in DTYPES}
TORCH_DTYPES = {row.safetensors: row.torch for row in DTYPES if row.torch is not None}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie in its file (absolute offsets) and what they hold."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def expected_nbytes(dtype: str, shape: tuple[int, ...]) -> int | None:
    """Byte size of a tensor, or None when the element count does not fill whole bytes."""
    bits = DTYPE_BITS[dtype] * math.prod(shape)
    return bits // 8 if bits % 8 == 0 else None


def _entry(path: Path, name: object, info: object, data_start: int, data_size: int) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(name, str) or not isinstance(info, dict):
        raise CheckpointInvalid(f"{where}: expected a JSON object with dtype, shape and data_offsets")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise CheckpointInvalid(
            f"{where}: dtype {dtype!r} is not a safetensors dtype (expected one of {sorted(DTYPE_BITS)})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointInvalid(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointInvalid(f"{where}: data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
    if offsets[1] > data_size:
        raise CheckpointInvalid(
            f"{where}: data_offsets {offsets} run past the end of the data "
            f"({data_size} bytes after the header; the file is truncated or the header corrupt)")
    want = expected_nbytes(dtype, tuple(shape))
    if want != offsets[1] - offsets[0]:
        raise CheckpointInvalid(
            f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, "
            f"expected {want} for dtype {dtype} and shape {shape}")
    return TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


class SafetensorsFile:
    """A validated safetensors file; tensor data is mapped on first use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._map: mmap.mmap | None = None
        fd = self._open()
        try:
            stat = os.fstat(fd)
            self.size, self.mtime_ns = stat.st_size, stat.st_mtime_ns
            self._identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
            self.metadata, self.entries = self._read_header(fd)
        finally:
            os.close(fd)

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise CheckpointNotFound(f"safetensors file {str(self.path)!r} does not exist") from None
        except OSError as exc:
            raise CheckpointInvalid(f"safetensors file {str(self.path)!r} cannot be opened: {exc.strerror}") from None

    def _read_header(self, fd: int) -> tuple[dict[str, str], dict[str, TensorEntry]]:
        path = self.path
        if self.size < 8:
            raise CheckpointInvalid(f"{path}: {self.size} bytes, too short for the 8-byte safetensors header length")
        (length,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        if length > min(MAX_HEADER_BYTES, self.size - 8):
            raise CheckpointInvalid(
                f"{path}: header length {length} exceeds the {self.size - 8} bytes that follow it "
                f"(or the {MAX_HEADER_BYTES}-byte limit); the file is truncated or not safetensors")
        raw = os.pread(fd, length, 8)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointInvalid(
                f"{path}: header is not valid UTF-8 JSON ({exc}); expected a safetensors header") from None
        if not isinstance(header, dict):
            raise CheckpointInvalid(f"{path}: header is JSON {type(header).__name__}, expected an object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CheckpointInvalid(f"{path}: __metadata__ is not an object of strings")
        data_start = 8 + length
        data_size = self.size - data_start
        entries = {}
        for name, info in header.items():
            entries[name] = _entry(path, name, info, data_start, data_size)
        return metadata, entries

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            fd = self._open()
            try:
                stat = os.fstat(fd)
                if (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns) != self._identity:
                    raise CheckpointInvalid(f"{self.path}: file changed since its header was read")
                # Copy-on-write: views are writable for torch, writes never reach the file.
                self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
            finally:
                os.close(fd)
        return self._map

    def will_need(self, start: int, end: int) -> None:
        """Starts the kernel reading bytes ``[start, end)`` ahead, so a cold read streams from disk."""
        if end <= start:
            return
        page = mmap.ALLOCATIONGRANULARITY
        aligned = start - start % page
        self._mapped().madvise(mmap.MADV_WILLNEED, aligned, end - aligned)

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise CheckpointNotFound(f"{self.path}: no tensor named {name!r}") from None

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as a flat uint8 view of the mapped file."""
        entry = self.entry(name)
        if entry.nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self._mapped(), dtype=torch.uint8, count=entry.nbytes, offset=entry.start)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor with its dtype and shape, a view of the mapped file where alignment allows."""
        entry = self.entry(name)
        dtype = TORCH_DTYPES.get(entry.dtype)
        if dtype is None:
            raise CheckpointInvalid(f"{self.path}: tensor {name!r} has dtype {entry.dtype}, which torch cannot hold")
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=dtype)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if entry.start % itemsize == 0:
            flat = torch.frombuffer(self._mapped(), dtype=dtype, count=entry.nbytes // itemsize, offset=entry.start)
        else:
            flat = self.raw(name).clone().view(dtype)
        return flat.reshape(entry.shape)

    def close(self) -> None:
        """Drops this object's reference to the mapping; it is unmapped once no view uses it."""
        self._map = None
