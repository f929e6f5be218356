"""Where a Prepare call's layer comes from: tensors streamed in the call, or a checkpoint the server reads.

Each source admits the layer (limits, budget), brings its tensors onto the chosen worker's device and
yields a ``LayerOnDevice``, or, when the cache already holds the answer, the ``CachedLayer`` to replay.
The tensors sit in a one-item list that the compute step empties, so that no frame but that step's
holds them while the answer streams.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from nvfp4_prep import checkpoint as ckpt
from nvfp4_prep.checkpoint.safetensors_file import TORCH_DTYPES
from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.wire import TensorReceiver, TensorSpec, chunk_of, read_headers

from .budget import Reservation
from .cache import CachedLayer, CacheKey
from .errors import ReferencesRefused, invalid
from .hashing import ContentHasher
from .params import Params
from .resources import CallResources
from .staging import PinnedRing
from .worker import DeviceWorker


@dataclass
class LayerOnDevice:
    """A layer admitted and received onto ``worker``'s device, ready to prepare."""

    worker: DeviceWorker
    reservation: Reservation
    tensors: list[dict[str, torch.Tensor]]
    inputs: int  # bytes received or read
    per_expert: bool
    ring: PinnedRing | None
    key: CacheKey | None


class StreamedSource:
    """The tensors announced in ``header.tensors`` and sent as chunks after the header."""

    def __init__(self, tensor_set: pb.TensorSet, requests: Iterator, resources: CallResources, params: Params,
                 deadline: float, cancelled: Callable[[], bool]) -> None:
        if tensor_set.form not in (pb.TENSOR_FORM_STACKED, pb.TENSOR_FORM_PER_EXPERT):
            raise invalid("header.tensors.form", f"is {tensor_set.form}",
                          "TENSOR_FORM_STACKED or TENSOR_FORM_PER_EXPERT")
        self._form = tensor_set.form
        self._specs = read_headers(tensor_set.tensors, "header.tensors.tensors")
        self._requests = requests
        self._resources = resources
        self._params = params
        self._deadline = deadline
        self._cancelled = cancelled
        self.inputs = sum(spec.byte_length for spec in self._specs)

    @contextlib.contextmanager
    def layer(self) -> Iterator[LayerOnDevice | CachedLayer]:
        per_expert = self._form == pb.TENSOR_FORM_PER_EXPERT
        worker, reservation = self._resources.admission.admit_streamed(
            self._specs, per_expert, self._params, self._deadline, self._cancelled)
        with reservation:
            ring = worker.ring()
            with self._resources.metrics.stage_timer("read", self._params.backend):
                received, identity = self._receive(worker, ring)
            key = self._params.cache_key(identity) if identity is not None else None
            cached = lookup(self._resources, key)
            if cached is not None:
                received.clear()
                reservation.release()
                yield cached
                return
            yield LayerOnDevice(worker, reservation, received, self.inputs, per_expert, ring, key)

    def _receive(self, worker: DeviceWorker, ring: PinnedRing | None
                 ) -> tuple[list[dict[str, torch.Tensor]], str | None]:
        """The announced tensors on the worker's device, and their content identity when the cache is on."""
        sink = worker.sink(self._specs, ring)
        try:
            cache_on = self._resources.cache.enabled
            hasher = ContentHasher(self._resources.hash_pool, self._specs, self._form) if cache_on else None
            receiver = TensorReceiver(self._specs, sink, "tensors")
            for request in self._requests:
                chunk = chunk_of(request)
                if chunk is None:
                    raise invalid("request.header", "arrived again", "only chunks after the first header")
                data = receiver.add(chunk)
                if hasher is not None:
                    hasher.add(data)
            receiver.finish()
            return [sink.tensors()], hasher.hexdigest() if hasher is not None else None
        finally:
            close = getattr(sink, "close", None)
            if close is not None:
                close()


class ReferencedSource:
    """A layer of a checkpoint under the server's allowed roots, read by the server itself."""

    def __init__(self, ref: pb.CheckpointRef, resources: CallResources, params: Params, deadline: float,
                 cancelled: Callable[[], bool]) -> None:
        if not resources.allowed_roots:
            raise ReferencesRefused("header.ref.location: this server reads no checkpoints (it was started "
                                    "without --allowed-root)", "header.ref.location")
        if not ref.location:
            raise invalid("header.ref.location", "is empty", "a checkpoint directory or file under an allowed root")
        if not ref.layer_prefix:
            raise invalid("header.ref.layer_prefix", "is empty", "an experts prefix such as model.layers.3.mlp.experts")
        self._ref = ref
        self._resources = resources
        self._params = params
        self._deadline = deadline
        self._cancelled = cancelled
        self.inputs = 0

    @contextlib.contextmanager
    def layer(self) -> Iterator[LayerOnDevice | CachedLayer]:
        prefix = self._ref.layer_prefix
        metrics, backend = self._resources.metrics, self._params.backend
        with ckpt.open_checkpoint(self._ref.location, self._resources.allowed_roots) as checkpoint:
            key = None
            if self._resources.cache.enabled:
                key = self._params.cache_key(f"ref:{checkpoint.source_identity(prefix)}|{prefix}")
                cached = lookup(self._resources, key)
                if cached is not None:
                    yield cached
                    return
            specs = entry_specs(checkpoint, prefix)
            self.inputs = sum(spec.byte_length for spec in specs)
            worker, reservation = self._resources.admission.admit_referenced(
                specs, self._params, self._deadline, self._cancelled)
            with reservation:
                with metrics.stage_timer("read", backend):
                    stacked = checkpoint.read_layer(prefix, self._params.activation, pin_memory=worker.is_cuda)
                with metrics.stage_timer("host_to_device", backend):
                    received = [worker.to_device(stacked) if worker.is_cuda else stacked]
                del stacked
                yield LayerOnDevice(worker, reservation, received, self.inputs, False, worker.ring(), key)


def lookup(resources: CallResources, key: CacheKey | None) -> CachedLayer | None:
    """The cache's entry for ``key``, counted as a hit or a miss; None when uncacheable."""
    if key is None:
        return None
    cached = resources.cache.get(key)
    (resources.metrics.cache_hits if cached is not None else resources.metrics.cache_misses).inc()
    return cached


def entry_specs(checkpoint: ckpt.Checkpoint, prefix: str) -> list[TensorSpec]:
    """The layer's per-expert tensors as the shard headers describe them, named relative to ``prefix``
    (``"0.gate_proj.weight"``), so that limits and the budget apply before any byte is read; a dtype torch
    cannot hold counts as bytes (reading it fails later)."""
    start = len(prefix) + 1
    specs = []
    for name in checkpoint.layer(prefix).tensor_names:
        entry = checkpoint.entry(name)
        specs.append(TensorSpec(name[start:], TORCH_DTYPES.get(entry.dtype, torch.uint8), entry.shape, entry.nbytes))
    return specs
