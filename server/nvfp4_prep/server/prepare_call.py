"""One Prepare stream, from its header to its last response chunk.

The call reserves memory before any tensor lands, receives the tensors onto
its worker's device, answers from the cache when it can, prepares the layer
and streams it back. Everything it allocates is local to the call, so a
client that goes away (or an error) frees it when the generator closes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import grpc
import torch

from nvfp4_prep import checkpoint as ckpt
from nvfp4_prep.checkpoint.safetensors_file import TORCH_DTYPES
from nvfp4_prep.contract.layout import ACTIVATIONS, BACKENDS, INPUT_SCALE_POLICIES, PIPELINE_VERSION, layout_id
from nvfp4_prep.pipeline import PreparedLayer
from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.wire import (
    Prefetch, TensorReceiver, TensorSpec, chunk_of, encode_chunk, header_for, layout_to_proto, read_headers,
    scalars_to_proto,
)

from .budget import Reservation
from .cache import CacheKey, CachedLayer
from .deadline import CallClock
from .errors import ServiceError, invalid
from .estimate import prepared_bytes, reservation_bytes
from .hashing import ContentHasher
from .metrics import Metrics
from .resume import START, ResumePoint, bytes_before, read_resume, remaining, renumbered, replay_from
from .staging import PinnedRing
from .worker import DeviceWorker

if TYPE_CHECKING:
    from .service import PrepService


@dataclass(frozen=True)
class Params:
    backend: str
    activation: str
    policy: str
    layout_id: str


def read_params(header: pb.PrepareHeader) -> Params:
    """The header's parameters, checked; a layout version this server cannot produce is FAILED_PRECONDITION."""
    for field, value, choices in (("header.backend", header.backend, BACKENDS),
                                  ("header.activation", header.activation, ACTIVATIONS),
                                  ("header.input_scale_policy", header.input_scale_policy, INPUT_SCALE_POLICIES)):
        if value not in choices:
            raise invalid(field, f"is {value!r}", "one of " + ", ".join(choices))
    produced = layout_id(header.backend)
    if header.layout_version and header.layout_version != produced:
        raise ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"header.layout_version: this server produces {produced!r} for {header.backend}, "
            f"not {header.layout_version!r}", "header.layout_version")
    return Params(header.backend, header.activation, header.input_scale_policy, produced)


class PrepareCall:
    def __init__(self, service: "PrepService", requests: Iterator[pb.PrepareRequest],
                 context: grpc.ServicerContext, clock: CallClock) -> None:
        self._service = service
        self._requests = requests
        self._context = context
        self._clock = clock
        self._deadline = clock.deadline
        self._header = pb.PrepareHeader()
        self.summary: dict[str, object] = {}

    def _cancelled(self) -> bool:
        return not self._context.is_active()

    def _check_deadline(self, stage: str) -> None:
        self._clock.check(f"before {stage}")

    def run(self) -> Iterator[pb.PrepareResponse]:
        first = next(self._requests, None)
        if first is None or chunk_of(first) is not None:
            raise invalid("request.header", "did not come first", "a PrepareHeader as the first message")
        header = self._header = first.header
        params = read_params(header)
        self.summary.update(backend=params.backend, activation=params.activation, policy=params.policy)
        source = header.WhichOneof("source")
        self.summary["source"] = source
        if source == "tensors":
            yield from self._streamed(header.tensors, params)
        elif source == "ref":
            yield from self._referenced(header.ref, params)
        else:
            raise invalid("header.source", "is not set", "header.tensors or header.ref")

    # -- streamed tensors ------------------------------------------------------------------------

    def _streamed(self, tensor_set: pb.TensorSet, params: Params) -> Iterator[pb.PrepareResponse]:
        if tensor_set.form not in (pb.TENSOR_FORM_STACKED, pb.TENSOR_FORM_PER_EXPERT):
            raise invalid("header.tensors.form", f"is {tensor_set.form}",
                          "TENSOR_FORM_STACKED or TENSOR_FORM_PER_EXPERT")
        per_expert = tensor_set.form == pb.TENSOR_FORM_PER_EXPERT
        specs = read_headers(tensor_set.tensors, "header.tensors.tensors")
        self._service.limits.check_tensors(specs)
        inputs = sum(spec.byte_length for spec in specs)
        self.summary["bytes_in"] = inputs
        worker = self._service.pick_worker()
        need = reservation_bytes(specs, per_expert, params.backend, params.activation)
        with worker.budget.reserve(need, self._deadline, self._cancelled) as reservation:
            ring = worker.ring()
            with self._metrics.stage_timer("read", params.backend):
                received, identity = self._receive(worker, specs, ring, tensor_set.form)
            key = self._key(identity, params) if identity is not None else None
            cached = self._cached(key)
            if cached is not None:
                received.clear()
                reservation.release()
                yield from self._replay(cached)
                return
            yield from self._compute_and_send(worker, reservation, received, inputs, per_expert, params, ring, key)

    def _receive(self, worker: DeviceWorker, specs: list[TensorSpec], ring: PinnedRing | None, form: int
                 ) -> tuple[list[dict[str, torch.Tensor]], str | None]:
        """The announced tensors, received onto the worker's device, and their content identity
        when the cache is on. The tensors come in a one-item list that the caller hands on, so
        that no frame but the compute step's holds them."""
        sink = worker.sink(specs, ring)
        try:
            hasher = ContentHasher(self._service.hash_pool, specs, form) if self._cache_on else None
            receiver = TensorReceiver(specs, sink, "tensors")
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

    # -- checkpoint references -------------------------------------------------------------------

    def _referenced(self, ref: pb.CheckpointRef, params: Params) -> Iterator[pb.PrepareResponse]:
        roots = self._service.allowed_roots
        if not roots:
            raise ServiceError(grpc.StatusCode.PERMISSION_DENIED,
                               "header.ref.location: this server reads no checkpoints (it was started "
                               "without --allowed-root)", "header.ref.location")
        if not ref.location:
            raise invalid("header.ref.location", "is empty", "a checkpoint directory or file under an allowed root")
        if not ref.layer_prefix:
            raise invalid("header.ref.layer_prefix", "is empty", "an experts prefix such as model.layers.3.mlp.experts")
        with ckpt.open_checkpoint(ref.location, roots) as checkpoint:
            key = None
            if self._cache_on:
                identity = f"ref:{checkpoint.source_identity(ref.layer_prefix)}|{ref.layer_prefix}"
                key = self._key(identity, params)
                cached = self._cached(key)
                if cached is not None:
                    yield from self._replay(cached)
                    return
            # Sized from the shard headers, so that limits and the budget apply before any byte is read.
            specs = _entry_specs(checkpoint, ref.layer_prefix)
            self._service.limits.check_tensors(specs, "header.ref")
            inputs = sum(spec.byte_length for spec in specs)
            self.summary["bytes_in"] = inputs
            outputs = prepared_bytes(specs, True, params.backend, params.activation) or inputs
            worker = self._service.pick_worker()
            with worker.budget.reserve(inputs + outputs, self._deadline, self._cancelled) as reservation:
                with self._metrics.stage_timer("read", params.backend):
                    stacked = checkpoint.read_layer(ref.layer_prefix, params.activation, pin_memory=worker.is_cuda)
                with self._metrics.stage_timer("host_to_device", params.backend):
                    received = [worker.to_device(stacked) if worker.is_cuda else stacked]
                del stacked
                yield from self._compute_and_send(worker, reservation, received, inputs, False, params,
                                                  worker.ring(), key)

    # -- shared tail -----------------------------------------------------------------------------

    @property
    def _cache_on(self) -> bool:
        return self._service.cache.enabled

    @property
    def _metrics(self) -> Metrics:
        return self._service.metrics

    def _cached(self, key: CacheKey | None) -> CachedLayer | None:
        """The cache's entry for ``key``, counted as a hit or a miss; None when uncacheable."""
        if key is None:
            return None
        cached = self._service.cache.get(key)
        (self._metrics.cache_hits if cached is not None else self._metrics.cache_misses).inc()
        return cached

    def _key(self, source: str, params: Params) -> CacheKey:
        return CacheKey(source, params.backend, params.activation, params.policy, params.layout_id, PIPELINE_VERSION)

    def _compute_and_send(self, worker: DeviceWorker, reservation: Reservation,
                          received: list[dict[str, torch.Tensor]], inputs: int, per_expert: bool, params: Params,
                          ring: PinnedRing | None, key: CacheKey | None) -> Iterator[pb.PrepareResponse]:
        """Prepares the layer in ``received`` (taking it out, so the inputs die with the compute
        step) and streams the result."""
        self._check_deadline("compute")
        if self._cancelled():
            raise ServiceError(grpc.StatusCode.CANCELLED, "client went away before compute")
        started = time.perf_counter()
        with self._metrics.stage_timer("prepare", params.backend):
            prepared = worker.prepare(received.pop(), per_expert, params.backend, params.activation, params.policy)
        self.summary["compute_s"] = round(time.perf_counter() - started, 4)
        reservation.shrink(inputs * (2 if per_expert else 1))
        yield from self._send(worker, prepared, ring, key, params.backend)

    def _send(self, worker: DeviceWorker, prepared: PreparedLayer, ring: PinnedRing | None, key: CacheKey | None,
              backend: str) -> Iterator[pb.PrepareResponse]:
        names = list(prepared.tensors)
        tensors = [prepared.tensors[name] for name in names]
        header = pb.PreparedHeader(
            layout=layout_to_proto(prepared.layout),
            scalars=scalars_to_proto(prepared.tensors),
            tensors=[header_for(name, tensor) for name, tensor in zip(names, tensors)],
        )
        sizes = [t.numel() * t.element_size() for t in tensors]
        total = sum(sizes)
        self.summary["bytes_out"] = total
        point = self._resume_point(sizes)
        cacheable = key is not None and point == START and self._service.cache.fits(total)
        kept: list[bytes] | None = [] if cacheable else None
        del prepared
        yield pb.PrepareResponse(header=header)
        copied = _Timed(renumbered(worker.chunks(remaining(tensors, point), self._service.chunk_size, ring), point))
        encoded = Prefetch(encode_chunk(index, offset, data) for index, offset, data in copied)
        try:
            with self._metrics.stage_timer("send", backend):
                for message in encoded:
                    if kept is not None:
                        kept.append(message)
                    yield message
        finally:
            encoded.close()
            self._metrics.stage_seconds.labels("device_to_host", backend).observe(copied.seconds)
        self.summary["bytes_sent"] = total - bytes_before(point, sizes)
        if kept is not None:
            self._service.cache.put(key, CachedLayer(header, tuple(kept), total))

    def _replay(self, cached: CachedLayer) -> Iterator[pb.PrepareResponse]:
        self.summary["cache_hit"] = True
        header = pb.PreparedHeader()
        header.CopyFrom(cached.header)
        header.cache_hit = True
        sizes = [tensor.byte_length for tensor in header.tensors]
        point = self._resume_point(sizes)
        yield pb.PrepareResponse(header=header)
        yield from replay_from(cached.chunks, point)
        self.summary["bytes_sent"] = cached.nbytes - bytes_before(point, sizes)

    def _resume_point(self, sizes: list[int]) -> ResumePoint:
        """Where the answer's chunks start: the request's resume point, checked against the answer."""
        point = read_resume(self._header, sizes)
        if point != START:
            self.summary["resume_from"] = f"{point.tensor_index}:{point.offset}"
        return point


class _Timed:
    """Wraps an iterator and adds up the seconds spent producing its items (device-to-host copies)."""

    def __init__(self, items: Iterator) -> None:
        self._items = items
        self.seconds = 0.0

    def __iter__(self) -> "_Timed":
        return self

    def __next__(self):
        started = time.perf_counter()
        try:
            return next(self._items)
        finally:
            self.seconds += time.perf_counter() - started


def _entry_specs(checkpoint: ckpt.Checkpoint, prefix: str) -> list[TensorSpec]:
    """The layer's per-expert tensors as the shard headers describe them, named relative to ``prefix``
    (``"0.gate_proj.weight"``); a dtype torch cannot hold counts as bytes (reading it fails later)."""
    start = len(prefix) + 1
    specs = []
    for name in checkpoint.layer(prefix).tensor_names:
        entry = checkpoint.entry(name)
        specs.append(TensorSpec(name[start:], TORCH_DTYPES.get(entry.dtype, torch.uint8), entry.shape, entry.nbytes))
    return specs


def checkpoint_error(error: ckpt.CheckpointError) -> ServiceError:
    """The status of a checkpoint error (its ``grpc_code``), naming the reference."""
    code = getattr(grpc.StatusCode, error.grpc_code, grpc.StatusCode.INTERNAL)
    return ServiceError(code, f"header.ref: {error}", "header.ref")
