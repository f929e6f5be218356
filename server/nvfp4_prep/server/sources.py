"""Where a Prepare call's layer comes from: tensors streamed in the call, or a checkpoint the server reads.

Each source admits the layer (limits, budget), brings its tensors onto the chosen worker's device and
yields a ``LayerOnDevice``, or, when the cache already holds the answer, the ``CachedLayer`` to replay.
The tensors sit in a one-item list that the compute step empties, so that no frame but that step's
holds them while the answer streams.

A checkpoint is opened and read on the server's reader threads (``BoundedRunner``), which the call waits
for only until its deadline or cancellation: a read that never returns (a hung mount) then fails the call
with DEADLINE_EXCEEDED naming what was being read, and gives its concurrency slot back at once. Its
memory reservation and open files go with the abandoned read and are let go of when it returns: until
then the budget counts them, since the read may still be filling its buffers.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch

from nvfp4_prep import checkpoint as ckpt
from nvfp4_prep.checkpoint.activation_scales import ActivationScales, read_activation_scales
from nvfp4_prep.checkpoint.formats import BF16
from nvfp4_prep.checkpoint.safetensors_file import TORCH_DTYPES
from nvfp4_prep.contract.layout import STACKED_SCALE_NAMES
from nvfp4_prep.pipeline.shard import WEIGHT_NAMES, Shard
from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.wire import Chunk, TensorReceiver, TensorSpec, chunk_of, read_headers

from .arrivals import Arrivals, Receiving
from .budget import Reservation
from .bulk.connection import BulkChannel
from .cache import CachedLayer, CacheKey
from .deadline import CallClock
from .errors import CallCancelled, ReferencesRefused, invalid
from .hashing import ContentHasher
from .params import CUDA_IPC, Params
from .resources import CallResources
from .staging import DeviceTensors, HostToDevice, PinnedRing
from .worker import DeviceWorker

T = TypeVar("T")

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


@dataclass
class ArrivingLayer:
    """A layer admitted onto ``worker``'s device and still arriving (streamed in, or read by the server): its
    tensors, once known, and how far each has got are the ``arrivals``'."""

    worker: DeviceWorker
    arrivals: Arrivals


def may_answer_early(params: Params, resources: CallResources, resuming: bool) -> bool:
    """Whether a call's answer may start while its layer still arrives: an NVFP4 layer (no quantizing), with the
    cache off (it keeps encoded chunks of whole answers), no resume point and no CUDA IPC."""
    return (not params.quantize and not resuming and params.delivery != CUDA_IPC
            and not resources.cache.enabled)


class StreamedSource:
    """The tensors announced in ``header.tensors`` and sent as chunks after the header: on the request stream
    (``requests``), or over the call's bulk connections when ``bulk`` is set."""

    def __init__(self, tensor_set: pb.TensorSet, requests: Iterator, resources: CallResources, params: Params,
                 clock: CallClock, cancelled: Callable[[], bool]) -> None:
        if tensor_set.form not in (pb.TENSOR_FORM_STACKED, pb.TENSOR_FORM_PER_EXPERT):
            raise invalid("header.tensors.form", f"is {tensor_set.form}",
                          "TENSOR_FORM_STACKED or TENSOR_FORM_PER_EXPERT")
        self._form = tensor_set.form
        self._specs = read_headers(tensor_set.tensors, "header.tensors.tensors")
        self.requests = requests
        self.bulk: BulkChannel | None = None
        self._resources = resources
        self._params = params
        self._clock = clock
        self._cancelled = cancelled
        self.inputs = sum(spec.byte_length for spec in self._specs)

    @contextlib.contextmanager
    def layer(self) -> Iterator[LayerOnDevice | CachedLayer]:
        per_expert = self._form == pb.TENSOR_FORM_PER_EXPERT
        worker, reservation = self._admit(per_expert)
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

    def _admit(self, per_expert: bool) -> tuple[DeviceWorker, Reservation]:
        """A worker and the reservation of the announced tensors (limits first), waited for as long as allowed."""
        with self._clock.doing("waiting for device memory"):
            return self._resources.admission.admit_streamed(
                self._specs, per_expert, self._params, self._clock.deadline, self._cancelled)

    def _receive(self, worker: DeviceWorker, ring: PinnedRing | None
                 ) -> tuple[list[dict[str, torch.Tensor]], str | None]:
        """The announced tensors on the worker's device, and their content identity when the cache is on."""
        sink = worker.sink(self._specs, ring)
        try:
            cache_on = self._resources.cache.enabled
            hasher = ContentHasher(self._resources.hash_pool, self._specs, self._form) if cache_on else None
            receiver = TensorReceiver(self._specs, sink, "tensors")
            # The hasher reads a chunk's bytes after the next chunk came: bulk frames then get buffers of their own.
            chunks = self._inline() if self.bulk is None else self.bulk.chunks(reuse=hasher is None)
            with contextlib.closing(chunks):  # stops the bulk readers at once on an error
                for chunk in chunks:
                    data = receiver.add(chunk)
                    if hasher is not None:
                        hasher.add(data)
            receiver.finish()
            with self._clock.doing("hashing the received tensors"):
                return [sink.tensors()], hasher.hexdigest() if hasher is not None else None
        finally:
            close = getattr(sink, "close", None)
            if close is not None:
                close()

    def answers_early(self, resuming: bool) -> bool:
        """Whether the answer may start while the tensors arrive (``early_answer``): a stacked layer that
        ``may_answer_early`` (the cache's key needs every byte first)."""
        return self._form == pb.TENSOR_FORM_STACKED and may_answer_early(self._params, self._resources, resuming)

    @contextlib.contextmanager
    def arriving(self) -> Iterator[ArrivingLayer]:
        """The admitted layer while its chunks are received on a thread of their own (``arrivals``)."""
        worker, reservation = self._admit(per_expert=False)
        try:
            sink = worker.sink(self._specs, worker.ring())
            arrivals = Arrivals()
            arrivals.offer(sink.views() if isinstance(sink, DeviceTensors) else sink.tensors())
            chunks = self._inline() if self.bulk is None else self.bulk.chunks(reuse=True)
            receiving = Receiving(self._specs, sink, chunks, arrivals, getattr(sink, "close", lambda: None),
                                  self._resources.metrics.stage_timer("read", self._params.backend))
        except BaseException:
            reservation.release()
            raise
        try:
            yield ArrivingLayer(worker, arrivals)
        finally:
            receiving.stop(reservation)

    def _inline(self) -> Iterator[Chunk | pb.TensorChunk]:
        for request in self.requests:
            chunk = chunk_of(request)
            if chunk is None:
                raise invalid("request.header", "arrived again", "only chunks after the first header")
            yield chunk


class ReferencedSource:
    """A layer of a checkpoint under the server's allowed roots, read by the server itself."""

    def __init__(self, ref: pb.CheckpointRef, resources: CallResources, params: Params, clock: CallClock,
                 cancelled: Callable[[], bool]) -> None:
        if not resources.allowed_roots:
            raise ReferencesRefused("header.ref.location: this server reads no checkpoints (it was started "
                                    "without --allowed-root)", "header.ref.location")
        if not ref.location:
            raise invalid("header.ref.location", "is empty", "a checkpoint directory or file under an allowed root")
        if not ref.layer_prefix:
            raise invalid("header.ref.layer_prefix", "is empty", "an experts prefix such as model.layers.3.mlp.experts")
        check_scales_location(ref, params)
        self._ref = ref
        self._resources = resources
        self._params = params
        self._clock = clock
        self._cancelled = cancelled
        self.inputs = 0

    @contextlib.contextmanager
    def layer(self) -> Iterator[LayerOnDevice | CachedLayer]:
        prefix, location = self._ref.layer_prefix, self._ref.location
        metrics, backend = self._resources.metrics, self._params.backend
        with contextlib.ExitStack() as owned:  # what this call must let go of (or hand to a read it abandons)
            checkpoint = self._opened(owned)
            scales = self._activation_scales(checkpoint, owned)
            key = None
            if self._resources.cache.enabled:
                identity = f"ref:{checkpoint.source_identity(prefix)}|{prefix}"
                key = self._params.cache_key(identity if scales is None else f"{identity}|scales:{scales.identity}")
                cached = lookup(self._resources, key)
                if cached is not None:
                    yield cached
                    return
            shard, worker, reservation = self._admit(checkpoint, owned)
            activation, upload = self._params.activation, worker.upload()
            with metrics.stage_timer("read", backend):
                host = self._bounded(
                    lambda interrupt: read_layer(checkpoint, prefix, activation, upload, interrupt, shard, scales),
                    f"reading layer {prefix} of checkpoint {location}", owned)
            metrics.checkpoint_read_bytes.labels(backend).inc(self.inputs)
            with metrics.stage_timer("host_to_device", backend):  # what the read's overlap left to copy
                received = [upload.finish(host) if upload is not None else host]
            del host
            yield LayerOnDevice(worker, reservation, received, self.inputs, scales is not None, worker.ring(), key)

    def _opened(self, owned: contextlib.ExitStack) -> ckpt.Checkpoint:
        """The referenced checkpoint, from the server's open ones (opened on a reader thread if need be), let go
        of with ``owned``."""
        location, checkpoints = self._ref.location, self._resources.checkpoints
        checkpoint = self._bounded(lambda _interrupt: checkpoints.acquire(location), f"opening checkpoint {location}",
                                   owned, checkpoints.release)
        owned.callback(checkpoints.release, checkpoint)
        return checkpoint

    def _admit(self, checkpoint: ckpt.Checkpoint, owned: contextlib.ExitStack
               ) -> tuple[Shard | None, DeviceWorker, Reservation]:
        """The rank's input shard to read (None: the whole layer), and the worker whose budget now holds the layer
        (the reservation held by ``owned``), from the shard headers, before a byte is read."""
        shard = self._params.shard if self._params.inputs == "shard" else None
        specs = entry_specs(checkpoint, self._ref.layer_prefix, shard)
        self.inputs = sum(spec.byte_length for spec in specs)
        with self._clock.doing("waiting for device memory"):
            worker, reservation = self._resources.admission.admit_referenced(
                specs, self._params, self._clock.deadline, self._cancelled)
        owned.enter_context(reservation)
        return shard, worker, reservation

    def answers_early(self, resuming: bool) -> bool:
        """Whether the answer may start while the layer is read (``early_answer``): ``may_answer_early``."""
        return may_answer_early(self._params, self._resources, resuming)

    @contextlib.contextmanager
    def arriving(self) -> Iterator[ArrivingLayer]:
        """The admitted layer while a reader thread reads it (scales first) and copies its experts to the device as
        they are read; the read is bounded as in ``layer``, and stopped when the answer ends first."""
        with contextlib.ExitStack() as owned:
            checkpoint = self._opened(owned)
            self._activation_scales(checkpoint, owned)  # refuses a BF16 checkpoint, which needs header.quantize
            shard, worker, _ = self._admit(checkpoint, owned)
            arrivals, stop = Arrivals(), threading.Event()
            reader = threading.Thread(target=self._read_arriving, name="nvfp4-prep-read-layer", daemon=True,
                                      args=(checkpoint, shard, worker.upload(), arrivals, owned, stop))
            reader.start()
            try:
                yield ArrivingLayer(worker, arrivals)
            finally:
                stop.set()
                reader.join()  # it hands ``owned`` to a read it abandons before it returns

    def _read_arriving(self, checkpoint: ckpt.Checkpoint, shard: Shard | None, upload: HostToDevice | None,
                       arrivals: Arrivals, owned: contextlib.ExitStack, stop: threading.Event) -> None:
        """Reads the layer for ``arriving``, telling ``arrivals`` of its scales, then of each run of experts."""
        prefix, location = self._ref.layer_prefix, self._ref.location
        stage = f"while reading layer {prefix} of checkpoint {location}"

        def scales(host: Mapping[str, torch.Tensor]) -> None:
            tensors = upload.begin(host, STACKED_SCALE_NAMES) if upload is not None else dict(host)
            arrivals.offer(tensors)
            event = upload.landed() if upload is not None else None
            for name in STACKED_SCALE_NAMES:
                arrivals.landed(arrivals.index[name], host[name].numel() * host[name].element_size(), event)

        def ready(host: Mapping[str, torch.Tensor], start: int, end: int) -> None:
            if upload is not None:
                upload.experts(host, start, end)
            event = upload.landed() if upload is not None else None
            for name in WEIGHT_NAMES:
                arrivals.landed(arrivals.index[name], end * host[name][0].numel() * host[name].element_size(), event)

        def check() -> None:
            self._clock.check(stage)
            if self._cancelled():
                raise CallCancelled(f"client went away {stage}")
            if stop.is_set():
                raise CallCancelled(f"the answer ended {stage}")

        metrics = self._resources.metrics
        try:
            with metrics.stage_timer("read", self._params.backend), \
                    self._clock.doing(f"reading layer {prefix} of checkpoint {location}"):
                self._resources.reads.run(
                    lambda interrupt: checkpoint.read_layer(prefix, self._params.activation, upload is not None,
                                                            interrupt=interrupt, shard=shard, ready=ready,
                                                            scales=scales), check, owned)
            metrics.checkpoint_read_bytes.labels(self._params.backend).inc(self.inputs)
            arrivals.ended(None)
        except BaseException as err:  # the answer raises it at its next wait
            arrivals.ended(err)

    def _activation_scales(self, checkpoint: ckpt.Checkpoint, owned: contextlib.ExitStack
                           ) -> ActivationScales | None:
        """The scales to quantize a BF16 layer with (None for an NVFP4 checkpoint); a recipe and a checkpoint
        format that do not go together are refused naming ``header.quantize``."""
        quantize, prefix = self._params.quantize, self._ref.layer_prefix
        if checkpoint.format == BF16 and not quantize:
            raise invalid("header.quantize", "the checkpoint is BF16; name a recipe (modelopt or llm-compressor)")
        if quantize and checkpoint.format != BF16:
            raise invalid("header.quantize", f"is {quantize!r} for a {checkpoint.format} checkpoint, NVFP4 already",
                          "empty: an NVFP4 checkpoint is prepared as it is")
        if not quantize:
            return None
        where = self._ref.activation_scales_location
        return self._bounded(
            lambda interrupt: read_activation_scales(where, prefix, self._resources.allowed_roots, interrupt),
            f"reading the activation scales of {prefix} from {where}", owned)

    def _bounded(self, work: Callable[[Callable[[], None]], T], what: str, owned: contextlib.ExitStack,
                 discard: Callable[[T], object] | None = None) -> T:
        """``work`` on a reader thread, waited for until the call's deadline or cancellation (see the module)."""
        stage = f"while {what}"

        def check() -> None:
            self._clock.check(stage)
            if self._cancelled():
                raise CallCancelled(f"client went away {stage}")

        with self._clock.doing(what):
            return self._resources.reads.run(work, check, owned, discard)


def read_layer(checkpoint: ckpt.Checkpoint, prefix: str, activation: str, upload: HostToDevice | None,
               interrupt: Callable[[], None], shard: Shard | None, scales: ActivationScales | None
               ) -> dict[str, torch.Tensor]:
    """The stacked NVFP4 layer (or the rank's input shard), or, for a layer to quantize (``scales`` given), its
    per-expert high-precision weights and activation scales. With ``upload`` (a CUDA worker) the stacked layer is
    read into pinned memory and its experts start for the device as soon as they are read."""
    if scales is None:
        return checkpoint.read_layer(prefix, activation, pin_memory=upload is not None, interrupt=interrupt,
                                     shard=shard, ready=upload.experts if upload is not None else None)
    return {**checkpoint.read_bf16_layer(prefix, interrupt=interrupt), **scales.tensors}


def check_scales_location(ref: pb.CheckpointRef, params: Params) -> None:
    """``activation_scales_location`` is given exactly when the referenced layer is quantized first."""
    field = "header.ref.activation_scales_location"
    if params.quantize and not ref.activation_scales_location:
        raise invalid(field, "is empty with header.quantize",
                      "an NVFP4 checkpoint of the same model or a calibration .safetensors file, under an allowed root")
    if ref.activation_scales_location and not params.quantize:
        raise invalid(field, "is set without header.quantize", "empty, or a recipe in header.quantize")


def lookup(resources: CallResources, key: CacheKey | None) -> CachedLayer | None:
    """The cache's entry for ``key``, counted as a hit or a miss; None when uncacheable."""
    if key is None:
        return None
    cached = resources.cache.get(key)
    (resources.metrics.cache_hits if cached is not None else resources.metrics.cache_misses).inc()
    return cached


def entry_specs(checkpoint: ckpt.Checkpoint, prefix: str, shard: Shard | None = None) -> list[TensorSpec]:
    """The per-expert tensors that reading the layer (or with ``shard``, that rank's input shard) takes in, as
    the shard headers describe them, named relative to ``prefix`` (``"0.gate_proj.weight"``), so that limits
    and the budget apply before any byte is read; a dtype torch cannot hold counts as bytes (reading it fails
    later). A rank's experts are named by their place on the rank, and their shapes are the blocks it reads."""
    if shard is not None:
        return [TensorSpec(read.key, TORCH_DTYPES.get(read.entry.dtype, torch.uint8), read.shape, read.nbytes)
                for read in checkpoint.rank_reads(prefix, shard).all()]
    start = len(prefix) + 1
    specs = []
    for name in checkpoint.layer(prefix).tensor_names:
        entry = checkpoint.entry(name)
        specs.append(TensorSpec(name[start:], TORCH_DTYPES.get(entry.dtype, torch.uint8), entry.shape, entry.nbytes))
    return specs
