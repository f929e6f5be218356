"""One safetensors file: its header parsed and checked, its tensors read from its descriptor.

The header (8-byte little-endian length, then JSON) is parsed here rather than by
the safetensors library so that a truncated file, a corrupt header or offsets past
the end of the file become a CheckpointInvalid naming the file and the field,
before any tensor byte is touched. Tensor bytes are read with ``preadv`` into fresh
tensors or the caller's views (rows of a stacked tensor), in bounded chunks, from the
descriptor whose header was checked; nothing is memory-mapped, because a mapped file
that shrinks under a reader (``cp`` over a shard) kills the whole process with SIGBUS.
A file that shrinks, or whose identity (size, mtime, ctime) changes between the header
and the end of a tensor's read, is a CheckpointInvalid saying it changed while being
read. A block of a 2-D tensor (a rank's rows or columns) is read the same way, range by
range (``block_ranges``), so that only its bytes are read.
"""

from __future__ import annotations

import math
import os
import struct
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from nvfp4_prep.contract.dtypes import DTYPES

from .errors import CheckpointInvalid, CheckpointNotFound, shown
from .files import identity, os_error, parse_json, require_regular

# Real headers weigh about 110 bytes a tensor (the shared testdata: 26 KB for 238 tensors), so a few MB
# for the largest sharded MoE checkpoints (a 5 GB shard of NVFP4 experts holds some 10-20k tensors).
# 16 MiB is room for about 150k tensors in one file, yet parsing it costs a fraction of a second and
# some 200 MB, not the 100 MB header the safetensors library allows (over 1 GB of RSS and 16 s of CPU).
MAX_HEADER_BYTES = 16 << 20
# Tensor bytes are read this much at a time, with a check for an interrupt (deadline, cancel) in between.
READ_CHUNK_BYTES = 16 << 20

# Views one preadv fills at most (the system's IOV_MAX).
IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024

# Bounds on a header's shapes, so that checking one costs little whatever a file says.
MAX_DIMS = 32
MAX_DIM = 2**63 - 1

Interrupt = Callable[[], None]

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


def _entry(path: str, name: object, info: object, data_start: int, data_size: int) -> TensorEntry:
    where = f"{path}: tensor {shown(name)!r}"
    if not isinstance(name, str) or not isinstance(info, dict):
        raise CheckpointInvalid(f"{where}: expected a JSON object with dtype, shape and data_offsets")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise CheckpointInvalid(
            f"{where}: dtype {shown(repr(dtype))} is not a safetensors dtype (expected one of {sorted(DTYPE_BITS)})")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)):
        raise CheckpointInvalid(
            f"{where}: shape {shown(shape)} is not a list of at most {MAX_DIMS} non-negative integers "
            f"(each at most {MAX_DIM})")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointInvalid(
            f"{where}: data_offsets {shown(offsets)} are not [begin, end] with 0 <= begin <= end")
    if offsets[1] > data_size:
        raise CheckpointInvalid(
            f"{where}: data_offsets {shown(offsets)} run past the end of the data "
            f"({data_size} bytes after the header; the file is truncated or the header corrupt)")
    want = expected_nbytes(dtype, tuple(shape))
    if want != offsets[1] - offsets[0]:
        raise CheckpointInvalid(
            f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, "
            f"expected {want} for dtype {dtype} and shape {shape}")
    return TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


class SafetensorsFile:
    """A validated safetensors file, held open (by descriptor) until ``close``."""

    def __init__(self, path: Path, *, fd: int | None = None, max_header_bytes: int = MAX_HEADER_BYTES) -> None:
        """``path`` names the file in messages; ``fd``, when given, is the file already opened and checked
        (this object takes it over), else ``path`` is opened here."""
        self.path = path
        self._display = shown(path)
        if fd is None:
            fd = self._open()
        self._fd = fd
        # Tensor bytes read so far (headers not counted), for tests and metrics.
        self.bytes_read = 0
        self._count_lock = threading.Lock()
        self._closer = weakref.finalize(self, os.close, fd)
        try:
            stat = require_regular(fd, str(path))
            self.size, self.mtime_ns = stat.st_size, stat.st_mtime_ns
            self.identity = identity(stat)
            self.metadata, self.entries = self._read_header(max_header_bytes)
        except BaseException:
            self.close()
            raise

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise os_error(exc, "safetensors file", str(self.path)) from None

    def _pread(self, length: int, offset: int) -> bytes:
        try:
            return os.pread(self._fd, length, offset)
        except OSError as exc:
            raise os_error(exc, "safetensors file", str(self.path)) from None

    def _read_header(self, max_header_bytes: int) -> tuple[dict[str, str], dict[str, TensorEntry]]:
        path = self._display
        if self.size < 8:
            raise CheckpointInvalid(f"{path}: {self.size} bytes, too short for the 8-byte safetensors header length")
        prefix = self._pread(8, 0)
        if len(prefix) < 8:
            raise self._changed(f"it ended at byte {len(prefix)}")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(max_header_bytes, self.size - 8):
            raise CheckpointInvalid(
                f"{path}: header length {length} exceeds the {self.size - 8} bytes that follow it "
                f"(or the {max_header_bytes}-byte limit); the file is truncated or not safetensors")
        raw = self._pread(length, 8)
        if len(raw) < length:
            raise self._changed(f"it ended at byte {8 + len(raw)}, inside its {length}-byte header")
        header = parse_json(raw, f"{path}: header", "a safetensors header")
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

    def _changed(self, detail: str) -> CheckpointInvalid:
        return CheckpointInvalid(
            f"{self._display}: changed while being read ({detail}); was it replaced or truncated? Try again "
            "once it is complete")

    def check_unchanged(self) -> None:
        """CheckpointInvalid when the file's size, mtime or ctime differ from those its header was read with."""
        try:
            now = identity(os.fstat(self._descriptor()))
        except OSError as exc:
            raise os_error(exc, "safetensors file", str(self.path)) from None
        if now != self.identity:
            raise self._changed(f"size {self.identity[2]} -> {now[2]} bytes, mtime or ctime moved")

    def _descriptor(self) -> int:
        if not self._closer.alive:
            raise ValueError(f"{self._display}: read after close()")
        return self._fd

    def will_need(self, start: int, end: int) -> None:
        """Starts the kernel reading bytes ``[start, end)`` ahead, so a cold read streams from disk."""
        if end > start and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._descriptor(), start, end - start, os.POSIX_FADV_WILLNEED)

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise CheckpointNotFound(f"{self._display}: no tensor named {shown(name)!r}") from None

    def read_into(self, targets: Sequence[memoryview], ranges: Sequence[tuple[int, int]],
                  interrupt: Interrupt | None) -> None:
        """Fills the flat byte views ``targets``, one after another, with the file's byte ranges ``(start, length)``,
        one after another (both add up to the same length): one ``preadv`` per run of contiguous file bytes, at most
        ``READ_CHUNK_BYTES`` a call, so that a tensor lands in rows of a larger one (stacked, interleaved) with no
        copy between. ``interrupt`` is called before the first call and after every ``READ_CHUNK_BYTES``."""
        fd = self._descriptor()
        self.check_unchanged()
        done, unchecked = 0, READ_CHUNK_BYTES
        try:
            for offset, views in _batches(targets, ranges):
                if interrupt is not None and unchecked >= READ_CHUNK_BYTES:
                    interrupt()
                    unchecked = 0
                got = self._preadv_all(fd, views, offset)
                done += got
                unchecked += got
        except OSError as exc:
            raise os_error(exc, "safetensors file", str(self.path)) from None
        finally:
            with self._count_lock:
                self.bytes_read += done
        self.check_unchanged()

    def _preadv_all(self, fd: int, views: list[memoryview], offset: int) -> int:
        """Fills ``views`` from ``offset`` on, however short the reads; the bytes read."""
        total = 0
        while views:
            got = os.preadv(fd, views, offset + total)
            if got == 0:
                end = offset + total + sum(len(view) for view in views)
                raise self._changed(f"it ended at byte {offset + total}, before byte {end} that the read needs")
            total += got
            while views and got >= len(views[0]):
                got -= len(views.pop(0))
            if got:
                views[0] = views[0][got:]
        return total

    def torch_dtype(self, entry: TensorEntry) -> torch.dtype:
        """The torch dtype of the tensor's elements; CheckpointInvalid for one torch cannot hold."""
        dtype = TORCH_DTYPES.get(entry.dtype)
        if dtype is None:
            raise CheckpointInvalid(
                f"{self._display}: tensor {shown(entry.name)!r} has dtype {entry.dtype}, which torch cannot hold")
        return dtype

    def raw(self, name: str, *, pin_memory: bool = False, interrupt: Interrupt | None = None) -> torch.Tensor:
        """The tensor's bytes as a flat uint8 tensor of its own (page-locked with ``pin_memory`` and CUDA)."""
        entry = self.entry(name)
        out = torch.empty(entry.nbytes, dtype=torch.uint8,
                          pin_memory=pin_memory and entry.nbytes > 0 and torch.cuda.is_available())
        self.read_into([_flat_view(out)], [(entry.start, entry.nbytes)], interrupt)
        return out

    def tensor(self, name: str, *, pin_memory: bool = False, interrupt: Interrupt | None = None) -> torch.Tensor:
        """The tensor with its dtype and shape, read into memory of its own."""
        entry = self.entry(name)
        dtype = self.torch_dtype(entry)
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=dtype)
        return self.raw(name, pin_memory=pin_memory, interrupt=interrupt).view(dtype).reshape(entry.shape)

    def tensors(self, names: Sequence[str], *, interrupt: Interrupt | None = None) -> dict[str, torch.Tensor]:
        """Several tensors, each read into memory of its own, in one ``read_into``: the scalars of a layer lie
        side by side in a shard (its writer groups them by dtype), so hundreds of them take one ``preadv``, where a
        ``tensor`` call each would take hundreds (and two checks of the file each)."""
        entries = sorted((self.entry(name) for name in names), key=lambda entry: entry.start)
        out = {entry.name: torch.empty(entry.shape, dtype=self.torch_dtype(entry)) for entry in entries}
        present = [entry for entry in entries if entry.nbytes]
        self.read_into([_flat_view(out[entry.name].view(-1).view(torch.uint8)) for entry in present],
                       [(entry.start, entry.nbytes) for entry in present], interrupt)
        return out

    def block_ranges(self, name: str, rows: tuple[int, int], cols: tuple[int, int]) -> list[tuple[int, int]]:
        """The file's byte ranges ``(start, length)`` of rows ``[r, r + n)`` and columns ``[c, c + m)``
        (``rows = (r, n)``, ``cols = (c, m)``) of a 2-D tensor: one range when whole rows are asked for, else one
        per row; CheckpointInvalid for a block the tensor does not hold in whole bytes."""
        entry = self.entry(name)
        bits = DTYPE_BITS[entry.dtype]
        (first, count), (col, width) = rows, cols
        if (len(entry.shape) != 2 or not 0 <= first <= first + count <= entry.shape[0]
                or not 0 <= col <= col + width <= entry.shape[1] or (col * bits) % 8 or (width * bits) % 8):
            raise CheckpointInvalid(
                f"{self._display}: tensor {shown(name)!r} has shape {list(entry.shape)} (dtype {entry.dtype}); "
                f"expected a 2-D tensor holding rows {first}..{first + count - 1} and whole bytes of columns "
                f"{col}..{col + width - 1}")
        row_bytes, skip, take = entry.shape[1] * bits // 8, col * bits // 8, width * bits // 8
        base = entry.start + first * row_bytes
        if take == row_bytes:
            return [(base, count * row_bytes)]
        return [(base + row * row_bytes + skip, take) for row in range(count)]

    def close(self) -> None:
        """Closes the descriptor (also done when the object is collected)."""
        self._closer()


def _flat_view(out: torch.Tensor) -> memoryview:
    return memoryview(out.numpy()) if out.numel() else memoryview(b"")


def _batches(targets: Sequence[memoryview], ranges: Sequence[tuple[int, int]]
             ) -> Iterator[tuple[int, list[memoryview]]]:
    """``(file offset, views)`` of one ``preadv`` each: the targets cut along the ranges, contiguous file bytes
    gathered into one call of at most ``READ_CHUNK_BYTES`` and ``IOV_MAX`` views."""
    pending: list[memoryview] = []
    start = size = 0
    index = used = 0  # the target being filled, and how much of it is
    for offset, length in ranges:
        while length:
            while used == len(targets[index]):
                index, used = index + 1, 0
            if pending and (start + size != offset or size == READ_CHUNK_BYTES or len(pending) == IOV_MAX):
                yield start, pending
                pending, size = [], 0
            if not pending:
                start = offset
            take = min(length, len(targets[index]) - used, READ_CHUNK_BYTES - size)
            pending.append(targets[index][used:used + take])
            size, used, offset, length = size + take, used + take, offset + take, length - take
    if pending:
        yield start, pending
