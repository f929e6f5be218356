"""Same-node delivery on the client: a layer handed over as CUDA IPC handles, copied into the client's own memory.

A client beside the server (a sidecar on the engine's host) asks with ``delivery="cuda_ipc"``; when the server can,
it answers with ``PrepareResponse.ipc`` instead of chunks. The client maps each storage once (torch's
``UntypedStorage._new_shared_cuda``; this server packs the whole layer into one), copies each tensor whole into the
landing (``device=`` or ``out=``; a peer copy when the server's GPU is another one; into a ``device=`` landing,
which is packed the same way, the whole layer in one copy), waits for the copies, closes
the mappings and only then sends ``PrepareRequest.taken``; the call's OK status after that confirms the server held
the memory throughout. Otherwise the answer streams as usual: asking is always safe.

How long the delivery took (from the handles' arrival to every byte landed: mapping, copying, closing) is logged
at DEBUG, for anyone who measures it against a device copy; the ``taken`` message and the server's OK that follow
are bookkeeping, not delivery.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Iterator, Sequence

import torch

from nvfp4_prep.contract.node import node_id
from nvfp4_prep.contract.tensor_bytes import row_major_strides
from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.wire import TensorSpec

from .errors import PrepInvalidArgument, PrepProtocolError
from .landing import DeviceLanding, Landing, Placement

log = logging.getLogger(__name__)

STREAM, CUDA_IPC = "stream", "cuda_ipc"
DELIVERIES = (STREAM, CUDA_IPC)
_END = object()


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
    return {"delivery": pb.DELIVERY_CUDA_IPC, "node_id": node}


class HeldRequests:
    """The request stream of a call that asked for CUDA IPC: the requests, then held open until ``take`` sends
    PrepareRequest.taken (or ``close``, when the call ends, lets it end)."""

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

    def take(self, lease_id: str) -> None:
        self._last.put(pb.PrepareRequest(taken=pb.IpcTaken(lease_id=lease_id)))

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
