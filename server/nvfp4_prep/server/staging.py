"""Moving tensor bytes between the network (or a checkpoint) and a CUDA device through pinned host memory.

Incoming chunks are copied into a small ring of pinned buffers and sent to the
device with asynchronous copies on a side stream, so the next chunk is read
from the network while the previous one crosses PCIe. A layer read from a
checkpoint into pinned memory goes up expert group by expert group while the
later groups are read. Outgoing tensors are copied off the device a few chunks
ahead of the one being sent.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy
import torch

from nvfp4_prep.wire import TensorSpec

RING_SLOTS = 8


def recorded(stream: torch.cuda.Stream) -> torch.cuda.Event:
    """An event that completes once the work queued on ``stream`` so far is done. A blocking one: a thread waiting
    for it sleeps, where by default CUDA spins a core, and a server waits on many at once (every call's ring)."""
    event = torch.cuda.Event(blocking=True)
    event.record(stream)
    return event


def drained(stream: torch.cuda.Stream) -> None:
    """Waits, asleep, for the work queued on ``stream`` so far (``Stream.synchronize`` spins)."""
    recorded(stream).synchronize()


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
        event = self.events[slot] = recorded(stream)
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

    def views(self) -> dict[str, torch.Tensor]:
        """The tensors being assembled, with their announced dtypes and shapes; a byte is there once the event
        ``landed`` recorded after its chunk's write completes."""
        pairs = zip(self._specs, self._buffers, strict=True)
        return {spec.name: buf.view(spec.dtype).reshape(spec.shape) for spec, buf in pairs}

    def landed(self) -> torch.cuda.Event:
        """An event that completes once every chunk written so far is on the device."""
        return recorded(self._stream)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The assembled tensors, once every copy to the device finished."""
        drained(self._stream)
        return self.views()

    def close(self) -> None:
        """Waits for copies still reading the ring (e.g. after an error) and drops the buffers."""
        drained(self._stream)
        self._buffers = []


class HostToDevice:
    """Copies a layer in host memory to a CUDA device on a side stream: the experts ``[start, end)`` of the stacked
    tensors as a checkpoint read finishes them (``experts``, its ``ready``), whatever is left at ``finish``."""

    def __init__(self, device: torch.device, track: Callable[[torch.Tensor], None]) -> None:
        self._device = device
        self._track = track
        self._stream = torch.cuda.Stream(device)
        self._moved: dict[str, torch.Tensor] = {}

    def _target(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The device tensor for ``name``, made on the first copy (on the device's current stream, where the
        layer is used next; the side stream only writes into it)."""
        target = self._moved.get(name)
        if target is None:
            target = self._moved[name] = torch.empty(tensor.shape, dtype=tensor.dtype, device=self._device)
            self._track(target)
        return target

    def begin(self, host: Mapping[str, torch.Tensor], now: Sequence[str]) -> dict[str, torch.Tensor]:
        """The device tensors of the whole layer ``host``, made now, those named in ``now`` copied at once; the
        others fill as ``experts`` copies them."""
        targets = {name: self._target(name, tensor) for name, tensor in host.items()}
        with torch.cuda.stream(self._stream):
            for name in now:
                targets[name].copy_(host[name], non_blocking=True)
        return targets

    def landed(self) -> torch.cuda.Event:
        """An event that completes once every copy queued so far is on the device."""
        return recorded(self._stream)

    def experts(self, host: Mapping[str, torch.Tensor], start: int, end: int) -> None:
        targets = {name: self._target(name, tensor) for name, tensor in host.items()}
        with torch.cuda.stream(self._stream):
            for name, tensor in host.items():
                targets[name][start:end].copy_(tensor[start:end], non_blocking=True)

    def finish(self, host: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``host`` on the device (the tensors not copied yet are copied now), once every copy is done."""
        left = {name: (self._target(name, tensor), tensor) for name, tensor in host.items() if name not in self._moved}
        with torch.cuda.stream(self._stream):
            for target, tensor in left.values():
                target.copy_(tensor, non_blocking=True)
        drained(self._stream)
        moved, self._moved = self._moved, {}  # the caller's alone: whatever still holds this object holds no layer
        return {name: moved[name] for name in host}


def device_chunks(tensors: Sequence[torch.Tensor], chunk_size: int, ring: PinnedRing,
                  device: torch.device, held: int, spans: Sequence[tuple[int, int]] | None = None,
                  after: torch.cuda.Stream | None = None) -> Iterator[tuple[int, int, numpy.ndarray]]:
    """``(tensor index, offset, bytes)`` of every chunk, copied off the device ahead of the consumer, after the work
    queued so far on ``after`` (default: the device's current stream); ``spans``: the ``[start, end)`` byte range
    of each tensor to send (default: all of it).

    The bytes are a view of a pinned buffer that stays valid while the consumer asks for ``held`` more chunks
    (1 to ``RING_SLOTS - 1``): a consumer may work on its last ``held`` chunks at once; the other slots are
    copied into ahead.
    """
    if not 1 <= held < len(ring.buffers):
        raise ValueError(f"held is {held}; expected 1 to {len(ring.buffers) - 1}, fewer than the ring's slots")
    stream = torch.cuda.Stream(device)
    stream.wait_stream(after or torch.cuda.current_stream(device))
    flats = [t.contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    spans = spans or [(0, flat.numel()) for flat in flats]
    pieces = iter([(index, offset, min(chunk_size, end - offset))
                   for index, (start, end) in enumerate(spans) for offset in range(start, end, chunk_size)])
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
        for _ in range(len(ring.buffers) - held):
            launch()
        while in_flight:
            index, offset, length, slot, event = in_flight.popleft()
            event.synchronize()
            yield index, offset, ring.arrays[slot][:length]
            launch()
    finally:
        drained(stream)
