"""Same-node delivery on the client: a layer that comes by CUDA IPC into the client's own memory.

A client beside the server (a sidecar on the engine's host) asks with ``delivery="cuda_ipc"``, naming the GPU it
lands on (``header.ipc_device_uuid``, when the landing is on one). When the layer was prepared on that GPU, the
server asks for the landing's tensors (``PrepareResponse.ipc_write``): the client sends CUDA IPC handles of them
(``destinations``, once the work queued on them is done), the server writes every tensor there and says so
(``PrepareResponse.written``). Each storage is shared once, its tensors then remembered while they live, so an
engine landing in its parameters call after call shares nothing again (and the server keeps them mapped).

Otherwise, when the server can, it answers with ``PrepareResponse.ipc`` instead of chunks. The client maps each
storage once (torch's
``UntypedStorage._new_shared_cuda``; this server packs the whole layer into one), copies each tensor whole into the
landing (``device=`` or ``out=``; a peer copy when the server's GPU is another one; into a ``device=`` landing,
which is packed the same way, the whole layer in one copy), waits for the copies, closes
the mappings and only then sends ``PrepareRequest.taken``; the call's OK status after that confirms the server held
the memory throughout. Otherwise the answer streams as usual: asking is always safe.

How long the delivery took (from the handles' arrival to every byte landed: mapping, copying, closing; or from
``ipc_write`` to ``written``: sharing, the server's copies) is logged at DEBUG, for anyone who measures it against
a device copy; the ``taken`` message and the server's OK that follow are bookkeeping, not delivery.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from nvfp4_prep.contract.node import node_id, process_id
from nvfp4_prep.contract.tensor_bytes import row_major_strides
from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.wire import FramingError, TensorSpec, chunk_of, header_for

from .errors import PrepInvalidArgument, PrepProtocolError
from .landing import DeviceLanding, Landing, Placement

log = logging.getLogger(__name__)

STREAM, CUDA_IPC = "stream", "cuda_ipc"
DELIVERIES = (STREAM, CUDA_IPC)
_END = object()
# Seconds that a ``device=`` landing the server was told to write into outlives a call that ended before the server
# said ``written``: the write may still be in flight, and memory freed under it would go to this process's next
# tensor. (``out=`` tensors are the caller's: see ``PrepClient.prepare_layer``.)
WRITE_GRACE = 10.0


def delivery_fields(delivery: str, where: Placement) -> dict:
    """The ``PrepareHeader`` fields of ``prepare_layer``'s ``delivery`` keyword, checked against where the answer
    lands: CUDA IPC needs CUDA on this host and a GPU (``device=``) or the caller's tensors (``out=``) to land on."""
    if delivery not in DELIVERIES:
        raise PrepInvalidArgument(f"delivery: is {delivery!r}, expected 'stream' or 'cuda_ipc'", field="delivery")
    if delivery == STREAM:
        return {}
    if not torch.cuda.is_available():
        raise PrepInvalidArgument("delivery: is 'cuda_ipc', but CUDA is not available on this host (expected "
                                  "'stream')", field="delivery")
    if where.out is None and (where.device is None or where.device.type != "cuda"):
        raise PrepInvalidArgument(f"delivery: is 'cuda_ipc' with device={where.device}; expected device='cuda' or "
                                  "'cuda:N' (or out=...) for the answer to land on", field="delivery")
    node = node_id()
    if not node:
        raise PrepInvalidArgument("delivery: is 'cuda_ipc', but this host has no boot id to name its node "
                                  "(/proc/sys/kernel/random/boot_id); expected 'stream'", field="delivery")
    fields = {"delivery": pb.DELIVERY_CUDA_IPC, "node_id": node, "process_id": process_id()}
    devices = {tensor.device for tensor in where.out.values()} if where.out is not None else {where.device}
    if len(devices) == 1 and (device := devices.pop()).type == "cuda" and _plainly_shared():
        # One GPU, whose memory torch shares as whole cudaMalloc allocations: the server may write there.
        fields["ipc_device_uuid"] = str(torch.cuda.get_device_properties(device).uuid)
        if where.out is not None:  # known already: up front, so that the server writes as soon as it can
            torch.cuda.current_stream(device).synchronize()
            fields["ipc_destinations"] = [pb.IpcDestination(tensor=header_for(name, tensor), memory=_memory(tensor))
                                          for name, tensor in where.out.items()]
    return fields


class HeldRequests:
    """The request stream of a call that asked for CUDA IPC: the requests, then held open until ``send_last``
    sends PrepareRequest.taken or .destinations (or ``close``, when the call ends, lets it end)."""

    def __init__(self, requests: Iterator) -> None:
        self._requests = requests
        self._last: queue.SimpleQueue = queue.SimpleQueue()
        self._sent = False

    def __iter__(self) -> HeldRequests:
        return self

    def __next__(self):
        if not self._sent:
            item = next(self._requests, _END)
            if item is not _END:
                return item
            self._sent = True
        last = self._last.get()
        if last is None:
            raise StopIteration
        self._last.put(None)  # nothing after it
        return last

    def send_last(self, request: pb.PrepareRequest) -> None:
        """Sends ``request`` and ends the stream after it."""
        self._last.put(request)

    def close(self) -> None:
        self._last.put(None)
        close = getattr(self._requests, "close", None)
        if close is not None:
            close()


def land(message: pb.IpcLayer, specs: Sequence[TensorSpec], sink: Landing, landing_device: torch.device | None
         ) -> None:
    """Copies every tensor of ``message`` into ``sink``, waits for the copies and closes the mappings."""
    started = time.perf_counter()
    field = "response.ipc.tensors"
    if len(message.tensors) != len(specs):
        raise PrepProtocolError(f"{field}: holds {len(message.tensors)} tensors, the header announces {len(specs)}",
                                field=field)
    starts = [_checked_start(f"{field}[{index}] ({spec.name})", field, spec, shared)
              for index, (spec, shared) in enumerate(zip(specs, message.tensors, strict=True))]
    torch.cuda.init()  # _new_shared_cuda needs CUDA set up, which out= CPU tensors alone never did
    device = _local_device(message.device_uuid, landing_device)
    storages: dict[tuple[bytes, int], torch.UntypedStorage] = {}
    try:
        _copy(message, specs, starts, sink, device, storages)
    finally:
        storages.clear()  # closes the mappings (torch counts them down for the server)
    log.debug("cuda_ipc: lease %s: %d bytes landed in %.6f s", message.lease_id,
              sum(spec.byte_length for spec in specs), time.perf_counter() - started)


def _copy(message: pb.IpcLayer, specs: Sequence[TensorSpec], starts: Sequence[int], sink: Landing, device: int,
          storages: dict[tuple[bytes, int], torch.UntypedStorage]) -> None:
    """Maps each storage of ``message`` once (into ``storages``) and copies every tensor out of them."""
    with torch.cuda.device(device):
        for spec, shared in zip(specs, message.tensors, strict=True):
            key = (shared.storage_handle, shared.storage_offset_bytes)
            if spec.byte_length and key not in storages:  # once: each mapping counts the server's storage up once
                storages[key] = torch.UntypedStorage._new_shared_cuda(
                    device, shared.storage_handle, shared.storage_size_bytes, shared.storage_offset_bytes,
                    shared.ref_counter_handle, shared.ref_counter_offset, shared.event_handle,
                    shared.event_sync_required)
        base = _packed_base(specs, starts, storages, sink)
        if base is not None:  # one storage, laid out as the landing is: one copy
            (storage,) = storages.values()
            sink.copy_packed(_flat(storage, device, base, sink.packed.numel()))
        else:
            for index, (spec, shared) in enumerate(zip(specs, message.tensors, strict=True)):
                if spec.byte_length:
                    storage = storages[(shared.storage_handle, shared.storage_offset_bytes)]
                    sink.copy_in(index, _flat(storage, device, starts[index], spec.byte_length))
        sink.tensors()  # every copy landed: the server's memory may go


def _checked_start(where: str, field: str, spec: TensorSpec, shared: pb.CudaIpcTensor) -> int:
    """Where tensor ``spec``'s bytes start in its storage, once its strides and extent check out."""
    if not spec.byte_length:
        return 0
    if tuple(shared.stride) != row_major_strides(spec.shape):
        raise PrepProtocolError(f"{where}.stride: is {list(shared.stride)}, expected the row-major "
                                f"{list(row_major_strides(spec.shape))}", field=f"{field}.stride")
    start = shared.tensor_offset * spec.dtype.itemsize
    if not shared.storage_handle or start + spec.byte_length > shared.storage_size_bytes:
        raise PrepProtocolError(f"{where}: bytes {start} to {start + spec.byte_length} lie outside its "
                                f"storage of {shared.storage_size_bytes} bytes", field=f"{field}.storage")
    return start


def _packed_base(specs: Sequence[TensorSpec], starts: Sequence[int],
                 storages: dict[tuple[bytes, int], torch.UntypedStorage], sink: Landing) -> int | None:
    """Where ``sink``'s packed buffer starts in the one storage mapped, when it holds every tensor at the landing's
    own offsets (what this server sends to a ``DeviceLanding``); None otherwise (e.g. the caller's own tensors)."""
    if not isinstance(sink, DeviceLanding) or len(storages) != 1:
        return None
    bases = {start - offset for spec, start, offset in zip(specs, starts, sink.offsets, strict=True)
             if spec.byte_length}
    (storage,) = storages.values()
    base = bases.pop() if len(bases) == 1 else -1
    return base if 0 <= base and base + sink.packed.numel() <= storage.nbytes() else None


def _flat(storage: torch.UntypedStorage, device: int, start: int, length: int) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage, start, (length,), (1,))


def _local_device(uuid: str, landing_device: torch.device | None) -> int:
    """This process's index of the server's GPU, found by its UUID; else (not visible here) the device the
    answer lands on, which then maps it as a peer."""
    for index in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(index).uuid) == uuid:
            return index
    if landing_device is not None and landing_device.type == "cuda":
        return landing_device.index
    return torch.cuda.current_device()


class IpcDelivery:
    """An answer that comes by CUDA IPC instead of chunks, landing in ``sink``: handles to copy from
    (``response.ipc``), or a request for destinations to write into (``response.ipc_write``, then ``written``),
    or, when they went up front (``header.ipc_destinations``), ``written`` alone. ``receive`` takes each response
    after the header (which came at ``header_came``); ``finish`` raises unless the layer landed."""

    def __init__(self, specs: Sequence[TensorSpec], sink: Landing, held: HeldRequests,
                 landing_device: torch.device | None, upfront: bool, header_came: float) -> None:
        self._specs, self._sink, self._held, self._device = specs, sink, held, landing_device
        # The write the server is doing (its lease, "" for one up front), and since when.
        self._write: tuple[str, float] | None = ("", header_came) if upfront else None
        self._asked = False
        self._landed = False

    def receive(self, response: pb.PrepareResponse) -> None:
        kind = "chunk" if chunk_of(response) is not None else response.WhichOneof("message") or "message"
        if self._landed:
            raise FramingError(f"response.{kind}", "arrived after the layer landed by CUDA IPC", "nothing after it")
        if kind in ("ipc", "ipc_write") and not self._asked:
            self._asked = True  # one of the two, once: the server hands out, or asks where to write
            if kind == "ipc":
                land(response.ipc, self._specs, self._sink, self._device)
                self._held.send_last(pb.PrepareRequest(taken=pb.IpcTaken(lease_id=response.ipc.lease_id)))
                self._landed = True
            else:
                self._write = (response.ipc_write.lease_id, time.perf_counter())
                self._held.send_last(destinations(response.ipc_write, self._specs, self._sink))
                log.debug("cuda_ipc: lease %s: destinations sent after %.6f s", response.ipc_write.lease_id,
                          time.perf_counter() - self._write[1])
        elif kind == "written" and self._write is not None:
            lease, started = self._write
            if lease and response.written.lease_id != lease:
                raise FramingError("response.written.lease_id", f"is {response.written.lease_id!r}",
                                   f"{lease!r}, the lease_id of response.ipc_write")
            self._sink.tensors()
            self._landed = True
            log.debug("cuda_ipc: lease %s: %d bytes written into this process in %.6f s", response.written.lease_id,
                      sum(spec.byte_length for spec in self._specs), time.perf_counter() - started)
        else:
            expected = "response.written" if self._write is not None else "response.ipc or response.ipc_write"
            raise FramingError(f"response.{kind}", "arrived out of turn", expected)

    def finish(self) -> None:
        if not self._landed:
            raise FramingError("response.written", "never came", "the server's word that every tensor is written")

    def abandon(self) -> None:
        """The call ends: if without the layer landed, a ``device=`` landing whose destinations went to the server
        is kept for ``WRITE_GRACE`` seconds more (the server may be writing into it), then let go."""
        if self._write is not None and not self._landed and isinstance(self._sink, DeviceLanding):
            timer = threading.Timer(WRITE_GRACE, _let_go, args=(self._sink.packed,))
            timer.daemon = True
            timer.start()


def _let_go(memory: torch.Tensor) -> None:
    """Nothing: the timer that calls it held ``memory`` until then."""


def destinations(message: pb.IpcWrite, specs: Sequence[TensorSpec], sink: Landing) -> pb.PrepareRequest:
    """The CUDA IPC handles of the landing's tensors, for the server to write ``message``'s layer into, once the
    work queued on them is done (the server writes as soon as it has them)."""
    tensors = sink.tensors()
    idle: set[torch.device] = set()
    for spec in specs:
        device = tensors[spec.name].device
        if device.type != "cuda":
            raise PrepProtocolError(f"response.ipc_write: asks to write {spec.name} into this process's memory, but "
                                    f"it lands on {device}", field="response.ipc_write")
        if device not in idle:
            torch.cuda.current_stream(device).synchronize()
            idle.add(device)
    shared = [_memory(tensors[spec.name]) for spec in specs]
    return pb.PrepareRequest(destinations=pb.IpcDestinations(lease_id=message.lease_id, tensors=shared))


def _plainly_shared() -> bool:
    """Whether torch here shares CUDA memory as legacy CUDA IPC handles of whole cudaMalloc allocations, the only
    kind the server maps to write into: not with the cudaMallocAsync backend (which cannot share) nor with
    expandable segments (handles of another kind); the server then hands its own memory out instead."""
    settings = ",".join(os.environ.get(name, "") for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"))
    return torch.cuda.get_allocator_backend() == "native" and \
        "expandable_segments:true" not in settings.replace(" ", "").lower()


def _memory(tensor: torch.Tensor) -> pb.CudaIpcTensor:
    """Where ``tensor`` lies, as a CUDA IPC destination (empty for an empty tensor)."""
    if not tensor.numel():
        return pb.CudaIpcTensor()
    handle, size, offset = _shared(tensor.untyped_storage())
    return pb.CudaIpcTensor(storage_handle=handle, storage_size_bytes=size, storage_offset_bytes=offset,
                            tensor_offset=tensor.storage_offset(), stride=list(tensor.stride()))


_SHARED_LOCK = threading.Lock()
_SHARED: dict[int, tuple[StorageWeakRef, tuple[bytes, int, int]]] = {}  # by data pointer, while the storage lives


def _shared(storage: torch.UntypedStorage) -> tuple[bytes, int, int]:
    """(handle, size, offset) of ``storage`` as torch shares it, once per storage: torch wraps a storage again
    each time it shares it. Its reference count is given up at once: the server maps without one, and the
    storage then goes when this process drops it, as any other."""
    key = storage.data_ptr()
    with _SHARED_LOCK:
        known = _SHARED.get(key)
        if known is not None and not known[0].expired() and known[1][1] == storage.nbytes():
            return known[1]
        for old in [old for old, (ref, _) in _SHARED.items() if ref.expired()]:
            del _SHARED[old]
        try:
            _, handle, size, offset, counter, counter_offset, _, _ = storage._share_cuda_()
        except RuntimeError as err:  # e.g. a storage this process received by CUDA IPC itself
            raise PrepInvalidArgument(f"out: a tensor's storage cannot be shared by CUDA IPC "
                                      f"({str(err).splitlines()[0]}); expected tensors this process allocated, "
                                      "or delivery='stream'", field="out") from None
        torch.UntypedStorage._release_ipc_counter_cuda(counter, counter_offset)
        _SHARED[key] = (StorageWeakRef(storage), (handle, size, offset))
        return handle, size, offset
