"""Where an answer's verified bytes land: pageable host tensors, device tensors, or the caller's own tensors.

The receiver checks every chunk (order, CRC32C) and then hands its bytes to one of these sinks. A loader
that wants a layer on the GPU should not wait for the whole layer in host memory and copy it again, so
``DeviceLanding`` allocates the tensors on the device up front (one buffer) and moves chunks through a small
ring of pinned host buffers with asynchronous copies on a stream of its own, overlapped with receiving the
next chunks: peak host memory is the ring, not the layer. ``CallerLanding`` writes into tensors the caller
allocated (an engine's parameters, whose addresses CUDA graphs captured), after checking at the answer's
header, before any byte is written, that every announced tensor has a destination of the same name,
shape and dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy
import torch

from nvfp4_prep.contract.tensor_bytes import packed_offsets, row_major_strides
from nvfp4_prep.wire import ChunkSink, HostTensors, TensorSpec

from .errors import PrepInvalidArgument, PrepOutputMismatch

STAGING_BUFFERS = 4
DEFAULT_STAGING_BYTES = STAGING_BUFFERS * (8 << 20)
MIN_STAGING_BYTES = STAGING_BUFFERS * (64 << 10)


class Landing(ChunkSink, Protocol):
    """A ChunkSink that also hands back the finished tensors."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors by announced name, once every byte written so far has landed."""
        ...

    def discard(self) -> None:
        """Waits for copies in flight and drops the rest: the answer is abandoned (or another replaces it)."""
        ...


class HostLanding(HostTensors):
    """Pageable CPU tensors (the default): every write has landed when it returns."""

    def discard(self) -> None:
        """Nothing is ever in flight."""


class StagingRing:
    """Pinned host buffers that host-to-device copies go through, on a stream of their own.

    Contiguous writes to one destination gather in the current buffer; a full buffer (or a write elsewhere)
    starts its copy and the next buffer takes the bytes after it. A buffer is reused only after its last
    copy's event completed, so at most ``count`` buffers of ``buffer_bytes`` are ever pinned.
    """

    def __init__(self, device: torch.device, total_bytes: int, count: int = STAGING_BUFFERS) -> None:
        self.device = device
        self.buffer_bytes = total_bytes // count
        self.count = count
        self.buffers: list[torch.Tensor] = []  # pinned lazily: a small layer pins only what it needs
        self._arrays: list[numpy.ndarray] = []
        self._events: list[torch.cuda.Event | None] = []
        self.stream = torch.cuda.Stream(device=device)
        # Copies into the caller's tensors come after the work already queued on them (an engine's kernels).
        self.stream.wait_stream(torch.cuda.current_stream(device))
        self._slot = 0
        self._filled = 0
        self._target: torch.Tensor | None = None  # the flat uint8 destination the current buffer fills
        self._start = 0  # its offset where the current buffer's bytes go

    def write(self, target: torch.Tensor, offset: int, data: bytes | memoryview) -> None:
        """Stages ``data`` for ``target[offset:]`` (a flat uint8 device tensor)."""
        source = numpy.frombuffer(data, dtype=numpy.uint8)
        while len(source):
            if self._target is not None and (self._target is not target or self._start + self._filled != offset):
                self._flush()
            if self._target is None:
                self._claim(target, offset)
            size = min(len(source), self.buffer_bytes - self._filled)
            self._arrays[self._slot][self._filled:self._filled + size] = source[:size]
            self._filled += size
            offset += size
            source = source[size:]
            if self._filled == self.buffer_bytes:
                self._flush()

    def _claim(self, target: torch.Tensor, offset: int) -> None:
        if self._slot == len(self.buffers):
            buffer = torch.empty(self.buffer_bytes, dtype=torch.uint8, pin_memory=True)
            self.buffers.append(buffer)
            self._arrays.append(buffer.numpy())
            self._events.append(None)
        event = self._events[self._slot]
        if event is not None:
            event.synchronize()  # the buffer's previous copy has read it
        self._target, self._start, self._filled = target, offset, 0

    def _flush(self) -> None:
        if self._target is None:
            return
        with torch.cuda.stream(self.stream):
            self._target[self._start:self._start + self._filled].copy_(self.buffers[self._slot][:self._filled],
                                                                       non_blocking=True)
            event = torch.cuda.Event(blocking=True)  # its wait sleeps instead of spinning a core
            event.record(self.stream)
        self._events[self._slot] = event
        self._slot = (self._slot + 1) % self.count
        self._target = None

    def synchronize(self) -> None:
        """Starts the last copy and waits until every copy has landed."""
        self._flush()
        self.stream.synchronize()

    def discard(self) -> None:
        """Waits for the copies started; bytes still in the current buffer are dropped."""
        self._target = None
        self.stream.synchronize()


class _BufferLanding:
    """Writes each tensor's bytes into a flat uint8 buffer: directly on the CPU, through a ring on a GPU."""

    def __init__(self, buffers: Sequence[torch.Tensor], tensors: dict[str, torch.Tensor], staging_bytes: int) -> None:
        self._buffers = list(buffers)
        self._arrays = [buf.numpy() if buf.device.type == "cpu" else None for buf in self._buffers]
        self._tensors = tensors
        self._staging_bytes = staging_bytes
        self.rings: dict[torch.device, StagingRing] = {}
        self._copying: set[torch.device] = set()  # devices whose current streams run copy_in's copies

    def write(self, index: int, offset: int, data: bytes | memoryview) -> None:
        array = self._arrays[index]
        if array is not None:
            array[offset:offset + len(data)] = numpy.frombuffer(data, dtype=numpy.uint8)
            return
        target = self._buffers[index]
        ring = self.rings.get(target.device)
        if ring is None:
            ring = self.rings[target.device] = StagingRing(target.device, self._staging_bytes)
        ring.write(target, offset, data)

    def copy_in(self, index: int, source: torch.Tensor) -> None:
        """Writes tensor ``index`` whole from ``source``, a flat uint8 CUDA tensor (a CUDA IPC mapping of the
        server's): on the devices' current streams, after the work queued there; ``tensors()`` waits for it."""
        target = self._buffers[index]
        if target.device.type != "cuda":
            target.copy_(source)  # into host memory: done when it returns
            return
        target.copy_(source, non_blocking=True)
        self._copying.update((target.device, source.device))

    def _wait_copies(self) -> None:
        for device in self._copying:
            torch.cuda.current_stream(device).synchronize()

    def tensors(self) -> dict[str, torch.Tensor]:
        for ring in self.rings.values():
            ring.synchronize()
        self._wait_copies()
        return dict(self._tensors)

    def discard(self) -> None:
        for ring in self.rings.values():
            ring.discard()
        self._wait_copies()


class DeviceLanding(_BufferLanding):
    """The answer's tensors as views of one device buffer (at ``packed_offsets``, in announced order), allocated
    up front and filled through pinned staging; a layer handed over by CUDA IPC packed the same way lands in
    one copy (``copy_packed``)."""

    def __init__(self, specs: Sequence[TensorSpec], device: torch.device, staging_bytes: int) -> None:
        self.offsets, size = packed_offsets([spec.byte_length for spec in specs])
        self.packed = torch.empty(size, dtype=torch.uint8, device=device)
        buffers = [self.packed[start:start + spec.byte_length] for spec, start in zip(specs, self.offsets,
                                                                                     strict=True)]
        tensors = {spec.name: buf.view(spec.dtype).reshape(spec.shape) for spec, buf in zip(specs, buffers,
                                                                                            strict=True)}
        super().__init__(buffers, tensors, staging_bytes)
        ring = self.rings[device] = StagingRing(device, staging_bytes)
        self.packed.record_stream(ring.stream)  # freed early (an abandoned answer), it waits for the ring's copies

    def copy_packed(self, source: torch.Tensor) -> None:
        """Writes every tensor from ``source``, a flat uint8 CUDA tensor laid out as ``packed`` is, in one copy
        (as ``copy_in``)."""
        self.packed.copy_(source, non_blocking=True)
        self._copying.update((self.packed.device, source.device))


class CallerLanding(_BufferLanding):
    """The caller's tensors, written in place; refused before any byte is written unless they match."""

    def __init__(self, specs: Sequence[TensorSpec], out: Mapping[str, torch.Tensor], staging_bytes: int) -> None:
        check_destinations(specs, out)
        tensors = {spec.name: out[spec.name] for spec in specs}
        buffers = [flat_bytes(tensor) for tensor in tensors.values()]
        super().__init__(buffers, tensors, staging_bytes)


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The storage of a row-major tensor as a flat uint8 view (no copy; a parameter's grad flag set aside)."""
    flat = tensor.detach().reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def check_destinations(specs: Sequence[TensorSpec], out: Mapping[str, torch.Tensor]) -> None:
    """Raises PrepOutputMismatch unless ``out`` holds exactly the announced tensors, each of the same
    shape and dtype."""
    announced = [spec.name for spec in specs]
    for spec in specs:
        tensor = out.get(spec.name)
        if tensor is None:
            raise PrepOutputMismatch(f"out: has no tensor {spec.name!r}; the answer announces {spec.name} of "
                                     f"shape {list(spec.shape)} and dtype {spec.dtype}", field=f"out.{spec.name}")
        if tuple(tensor.shape) != spec.shape:
            raise PrepOutputMismatch(f"out[{spec.name!r}].shape: is {list(tensor.shape)}, the answer's "
                                     f"{spec.name} is {list(spec.shape)}", field=f"out.{spec.name}.shape")
        if tensor.dtype != spec.dtype:
            raise PrepOutputMismatch(f"out[{spec.name!r}].dtype: is {tensor.dtype}, the answer's {spec.name} is "
                                     f"{spec.dtype}", field=f"out.{spec.name}.dtype")
    extra = [name for name in out if name not in announced]
    if extra:
        raise PrepOutputMismatch(f"out[{extra[0]!r}]: is not in the answer, which announces {announced}; it "
                                 "would be left unwritten", field=f"out.{extra[0]}")


@dataclass(frozen=True)
class Placement:
    """Where one call's answer lands: ``out`` (the caller's tensors), else ``device`` (None: pageable CPU)."""

    device: torch.device | None = None
    out: Mapping[str, torch.Tensor] | None = None
    staging_bytes: int = DEFAULT_STAGING_BYTES

    def landing(self, specs: Sequence[TensorSpec]) -> Landing:
        """A fresh sink for an answer announcing ``specs`` (PrepOutputMismatch when ``out`` does not fit)."""
        if self.out is not None:
            return CallerLanding(specs, self.out, self.staging_bytes)
        if self.device is not None and self.device.type == "cuda":
            return DeviceLanding(specs, self.device, self.staging_bytes)
        return HostLanding(specs, prefault=True)


def placement(device: str | torch.device | None, out: Mapping[str, torch.Tensor] | None,
              staging_bytes: int = DEFAULT_STAGING_BYTES) -> Placement:
    """The Placement of ``prepare_layer``'s ``device`` and ``out`` keywords, checked before any call."""
    if out is not None:
        if device is not None:
            raise PrepInvalidArgument(f"device: is {device!r} while out is given; the out tensors' own devices "
                                      "decide where the answer lands (expected device=None)", field="device")
        return Placement(out=check_out(out), staging_bytes=staging_bytes)
    return Placement(device=resolve_device(device), staging_bytes=staging_bytes)


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """None, the CPU, or a CUDA device of this host with its index filled in."""
    if device is None:
        return None
    expected = "None, 'cpu', 'cuda', 'cuda:N' or a torch.device of those"
    if not isinstance(device, str | torch.device):
        raise PrepInvalidArgument(f"device: is {device!r} ({type(device).__name__}), expected {expected}",
                                  field="device")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise PrepInvalidArgument(f"device: is {device!r}, expected {expected}", field="device") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise PrepInvalidArgument(f"device: is {device!r}, expected {expected}", field="device")
    if not torch.cuda.is_available():
        raise PrepInvalidArgument(f"device: is {device!r}, but CUDA is not available on this host (expected "
                                  "None or 'cpu')", field="device")
    index = torch.cuda.current_device() if resolved.index is None else resolved.index
    if index >= torch.cuda.device_count():
        raise PrepInvalidArgument(f"device: is {device!r}, but this host has {torch.cuda.device_count()} CUDA "
                                  "device(s)", field="device")
    return torch.device("cuda", index)


def check_out(out: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``out`` as a dict, if it maps names to row-major CPU or CUDA tensors (shapes are checked at the header)."""
    if not isinstance(out, Mapping):
        raise PrepInvalidArgument(f"out: is a {type(out).__name__}, expected a mapping of tensor name to a "
                                  "pre-allocated torch.Tensor", field="out")
    for name, tensor in out.items():
        if not isinstance(tensor, torch.Tensor):
            raise PrepInvalidArgument(f"out[{name!r}]: is a {type(tensor).__name__}, expected a torch.Tensor",
                                      field=f"out.{name}")
        if tensor.device.type not in ("cpu", "cuda"):
            raise PrepInvalidArgument(f"out[{name!r}].device: is {tensor.device}, expected a CPU or CUDA tensor",
                                      field=f"out.{name}.device")
        if tensor.stride() != row_major_strides(tensor.shape):
            raise PrepInvalidArgument(f"out[{name!r}]: has strides {list(tensor.stride())}, expected a contiguous "
                                      f"(row-major) tensor with strides {list(row_major_strides(tensor.shape))}",
                                      field=f"out.{name}.stride")
    return dict(out)
