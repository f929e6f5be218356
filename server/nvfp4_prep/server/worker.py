"""One worker per device: its memory budget, where tensors land, compute, and the bytes going out."""

from __future__ import annotations

import contextlib
import os
import platform
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence

import torch

from nvfp4_prep import pipeline
from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.wire import ChunkSink, HostTensors, TensorSpec, iter_pieces

from .budget import MemoryBudget
from .config import ConfigError
from .errors import DeadlinePassed
from .staging import DeviceTensors, HostToDevice, PinnedRing, device_chunks, drained

# Share of a GPU's (or the host's, for cpu) memory that an "auto" budget takes.
AUTO_GPU_SHARE = 0.85
AUTO_HOST_SHARE = 0.5


def resolve_devices(names: Sequence[str]) -> list[torch.device]:
    """The devices named by --device, or cuda:0 (else cpu) when none are; checks they exist."""
    if not names:
        return [torch.device("cuda:0" if torch.cuda.is_available() else "cpu")]
    devices = [torch.device(name) for name in names]
    for device in devices:
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if device.index >= count:
                raise ConfigError(f"--device: {device} does not exist (this machine has {count} CUDA devices)")
    return devices


def auto_budget(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * AUTO_GPU_SHARE)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * AUTO_HOST_SHARE)


class LiveBytes:
    """Bytes of the tensors a worker allocated that are still alive (for tests and metrics).

    Counts storages, and drops them when torch actually frees them, so a
    request that leaks a tensor shows here after it ended.
    """

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        with self._lock:
            self.value += nbytes
        weakref.finalize(storage, self._drop, nbytes)

    def _drop(self, nbytes: int) -> None:
        with self._lock:
            self.value -= nbytes


class DeviceWorker:
    """Receives, prepares and sends the layers of one device; compute runs one layer at a time."""

    def __init__(self, device: torch.device, budget_bytes: int, slot_bytes: int) -> None:
        self.device = device
        self.budget = MemoryBudget(budget_bytes, str(device))
        self.live = LiveBytes()
        self.slot_bytes = slot_bytes
        self._compute = threading.Lock()

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def load(self) -> float:
        """Share of the budget taken plus requests queued; the least loaded worker gets the next request."""
        return self.budget.in_use / self.budget.capacity + self.budget.waiting

    def ring(self) -> PinnedRing | None:
        """Pinned staging buffers for one request (None on cpu, where tensors land in place)."""
        return PinnedRing(self.slot_bytes) if self.is_cuda else None

    def sink(self, specs: Sequence[TensorSpec], ring: PinnedRing | None) -> ChunkSink:
        if ring is None:
            sink = HostTensors(specs, prefault=True)
            for tensor in sink.tensors().values():
                self.live.track(tensor)
            return sink
        return DeviceTensors(specs, self.device, ring, self.live.track)

    def upload(self) -> HostToDevice | None:
        """What copies a layer read into host memory to this worker's device (None on cpu, where it stays)."""
        return HostToDevice(self.device, self.live.track) if self.is_cuda else None

    def prepare(self, tensors: Mapping[str, torch.Tensor], per_expert: bool, backend: str, activation: str,
                policy: str, deadline: float | None = None, options: Mapping | None = None,
                quantize: str = "") -> pipeline.PreparedLayer:
        """Runs the pipeline on this device once the layer before it is done, waiting for that no later than
        ``deadline`` (a ``time.monotonic()`` instant); ``options`` are ``pipeline.prepare``'s profile and shard
        keywords; ``quantize`` names the recipe that quantizes high-precision ``tensors`` (weights and activation
        scales) here first, in the same pass; raises PrepError for bad input."""
        with self.computing(deadline):
            return self._prepare(tensors, per_expert, backend, activation, policy, options or {}, quantize)

    @contextlib.contextmanager
    def computing(self, deadline: float | None, stream: torch.cuda.Stream | None = None) -> Iterator[None]:
        """This device's compute, once the work before it is done (waited for no later than ``deadline``, a
        ``time.monotonic()`` instant), with the device current, and ``stream`` too when given."""
        wait = -1 if deadline is None else max(deadline - time.monotonic(), 0.0)
        if not self._compute.acquire(timeout=wait):
            raise DeadlinePassed(f"deadline passed while waiting for {self.device} to finish the layer before")
        try:
            with self._device_context(), torch.cuda.stream(stream):
                yield
        finally:
            self._compute.release()

    def _prepare(self, tensors: Mapping[str, torch.Tensor], per_expert: bool, backend: str, activation: str,
                 policy: str, options: Mapping, quantize: str) -> pipeline.PreparedLayer:
        if quantize:
            weights, scales = pipeline.split_quantize_inputs(tensors)
            prepared = pipeline.prepare_quantized(weights, quantize, scales, backend, activation, policy,
                                                  **options)
        else:
            stacked = pipeline.assemble_layer(tensors, activation) if per_expert else tensors
            prepared = pipeline.prepare(stacked, backend, activation, policy, **options)
        if self.is_cuda:  # so the compute time logged is the kernels', not their launch's
            drained(torch.cuda.current_stream(self.device))
        for tensor in prepared.tensors.values():
            self.live.track(tensor)
        return prepared

    def chunks(self, tensors: Sequence[torch.Tensor], chunk_size: int, ring: PinnedRing | None,
               held: int, spans: Sequence[tuple[int, int]] | None = None,
               after: torch.cuda.Stream | None = None) -> Iterator[tuple[int, int, object]]:
        """``(tensor index, offset, buffer)`` of the tensors' chunks (of the byte ``spans`` of each, default all),
        in order, once the work queued on ``after`` (default: the current stream) is done; each buffer is a view,
        valid while the consumer asks for ``held`` more chunks (see ``device_chunks``; on cpu, for as long as the
        tensors live)."""
        if ring is not None:
            with self._device_context():
                yield from device_chunks(tensors, chunk_size, ring, self.device, held, spans, after)
        else:
            yield from iter_pieces(tensors, chunk_size, spans)

    def _device_context(self):
        return torch.cuda.device(self.device) if self.is_cuda else contextlib.nullcontext()

    def describe(self) -> pb.DeviceInfo:
        if self.is_cuda:
            props = torch.cuda.get_device_properties(self.device)
            return pb.DeviceInfo(device=str(self.device), name=props.name,
                                 compute_capability=f"{props.major}.{props.minor}",
                                 memory_budget_bytes=self.budget.capacity)
        return pb.DeviceInfo(device="cpu", name=platform.processor() or platform.machine(),
                             memory_budget_bytes=self.budget.capacity)

