"""Moving tensor bytes between the network and a CUDA device through pinned host memory.

Incoming chunks are copied into a small ring of pinned buffers and sent to the
device with asynchronous copies on a side stream, so the next chunk is read
from the network while the previous one crosses PCIe. Outgoing tensors are
copied off the device a few chunks ahead of the one being sent.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence

import numpy
import torch

from nvfp4_prep.wire import TensorSpec

RING_SLOTS = 8


class PinnedRing:
    """A few pinned host buffers, each reusable once the copy that last used it finished."""

    def __init__(self, slot_bytes: int, slots: int = RING_SLOTS) -> None:
        self.slot_bytes = slot_bytes
        self.buffers = [torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(slots)]
        self.arrays = [buf.numpy() for buf in self.buffers]
        self.events: list[torch.cuda.Event | None] = [None] * slots
        self._next = 0

    def take(self) -> int:
        """The next slot, after waiting for its previous copy."""
        slot = self._next
        self._next = (slot + 1) % len(self.buffers)
        event = self.events[slot]
        if event is not None:
            event.synchronize()
            self.events[slot] = None
        return slot

    def mark(self, slot: int, stream: torch.cuda.Stream) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(stream)
        self.events[slot] = event
        return event


class DeviceTensors:
    """A ChunkSink that assembles tensors on a CUDA device."""

    def __init__(self, specs: Sequence[TensorSpec], device: torch.device, ring: PinnedRing,
                 track: Callable[[torch.Tensor], None]) -> None:
        self._specs = list(specs)
        self._ring = ring
        self._stream = torch.cuda.Stream(device)
        self._buffers = [torch.empty(spec.byte_length, dtype=torch.uint8, device=device) for spec in self._specs]
        for buf in self._buffers:
            track(buf)

    def write(self, index: int, offset: int, data: bytes | memoryview) -> None:
        source = numpy.frombuffer(data, dtype=numpy.uint8)
        for start in range(0, len(source), self._ring.slot_bytes):
            piece = source[start:start + self._ring.slot_bytes]
            slot = self._ring.take()
            self._ring.arrays[slot][:len(piece)] = piece  # numpy copies without holding the GIL
            target = self._buffers[index].narrow(0, offset + start, len(piece))
            with torch.cuda.stream(self._stream):
                target.copy_(self._ring.buffers[slot].narrow(0, 0, len(piece)), non_blocking=True)
            self._ring.mark(slot, self._stream)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The assembled tensors, once every copy to the device finished."""
        self._stream.synchronize()
        pairs = zip(self._specs, self._buffers, strict=True)
        return {spec.name: buf.view(spec.dtype).reshape(spec.shape) for spec, buf in pairs}

    def close(self) -> None:
        """Waits for copies still reading the ring (e.g. after an error) and drops the buffers."""
        self._stream.synchronize()
        self._buffers = []


def device_chunks(tensors: Sequence[torch.Tensor], chunk_size: int, ring: PinnedRing,
                  device: torch.device) -> Iterator[tuple[int, int, numpy.ndarray]]:
    """``(tensor index, offset, bytes)`` of every chunk, copied off the device ahead of the consumer.

    The bytes are a view of a pinned buffer, valid until the consumer asks for the next chunk.
    """
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    flats = [t.contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    pieces = iter([(index, offset, min(chunk_size, flat.numel() - offset))
                   for index, flat in enumerate(flats) for offset in range(0, flat.numel(), chunk_size)])
    in_flight: deque[tuple[int, int, int, int, torch.cuda.Event]] = deque()

    def launch() -> None:
        piece = next(pieces, None)
        if piece is None:
            return
        index, offset, length = piece
        slot = ring.take()
        with torch.cuda.stream(stream):
            ring.buffers[slot].narrow(0, 0, length).copy_(flats[index].narrow(0, offset, length), non_blocking=True)
        in_flight.append((index, offset, length, slot, ring.mark(slot, stream)))

    try:
        for _ in range(len(ring.buffers) - 1):
            launch()
        while in_flight:
            index, offset, length, slot, event = in_flight.popleft()
            event.synchronize()
            yield index, offset, ring.arrays[slot][:length]
            launch()
    finally:
        stream.synchronize()
