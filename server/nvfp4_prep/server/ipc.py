"""Same-node delivery: a prepared layer handed to a client on this node as CUDA IPC handles, under a lease.

No tensor byte crosses a socket: the client maps the server's device memory, copies it into its own and says so
(``PrepareRequest.taken``). Until then the tensors stay with the call, and so does its memory budget (the
call's reservation lives until the call ends). Whichever comes first frees them: taken, the call's end or
cancellation, or the lease timeout, which also ends the call (DEADLINE_EXCEEDED naming ``ipc_lease_timeout``).

The layer goes as ONE exported storage: its tensors are packed into a buffer of their own (``pack``), since the
client pays for opening and closing each storage (on an H200 a 1.6 GB layer as one storage opened in ~1.1 ms and
closed in ~0.02 ms; as its 12 tensors' storages in ~2.0 ms and ~0.7 ms, and copied slower).

torch counts a client's mappings in a shared-memory counter of the exported storage and keeps memory that a client
still maps in its "limbo" after the server drops it. A client that took the layer closed its mappings first; for
one that died, never opened them or overran its lease, the server gives the client's count up itself so that the
memory really goes back (a client still mapping it then reads freed memory, and its call fails).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, MutableMapping

import grpc
import torch

from nvfp4_prep.contract.node import node_id
from nvfp4_prep.contract.tensor_bytes import packed_offsets
from nvfp4_prep.pipeline import PreparedLayer
from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.wire import header_for, layout_to_proto, scalars_to_proto

from .budget import MemoryBudget, Reservation
from .errors import CallCancelled, DeadlinePassed, LimitExceeded, ServerDraining, invalid
from .params import CUDA_IPC, Params
from .worker import DeviceWorker

log = logging.getLogger(__name__)

LEASE_FIELD = "ipc_lease_timeout"
# This server's node, once: a client whose header names another gets chunks.
NODE_ID = node_id()


def stream_reason(params: Params, worker: DeviceWorker, lease_seconds: float, resuming: bool) -> str:
    """Why a freshly prepared answer that asked for CUDA IPC is streamed instead ("" when it is not)."""
    if params.delivery != CUDA_IPC:
        return ""
    if not NODE_ID or params.node_id != NODE_ID:
        return "the client is on another node (header.node_id differs from the server's)"
    if lease_seconds <= 0:
        return "this server hands out no CUDA IPC handles (--ipc-lease-timeout 0)"
    if not worker.is_cuda:
        return f"the layer was prepared on {worker.device}, not a GPU"
    if resuming:
        return "the call resumes a streamed answer (header.resume_from)"
    return ""


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def packed_size(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the buffer that ``pack`` makes for ``tensors``."""
    return packed_offsets([_nbytes(tensor) for tensor in tensors])[1]


def pack(tensors: MutableMapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One fresh uint8 buffer on the tensors' device holding them all (at ``packed_offsets``), and views of it by
    name, of the same dtypes and shapes. Copies on the current stream and takes each tensor out of ``tensors``
    once its copy is queued, so that the allocator can reuse its memory for the next ones."""
    names = list(tensors)
    offsets, size = packed_offsets([_nbytes(tensors[name]) for name in names])
    buffer = torch.empty(size, dtype=torch.uint8, device=next(iter(tensors.values())).device)
    views = {}
    for name, start in zip(names, offsets, strict=True):
        tensor = tensors.pop(name)
        span = buffer[start:start + _nbytes(tensor)]
        span.copy_(tensor.contiguous().reshape(-1).view(torch.uint8))
        views[name] = span.view(tensor.dtype).view(tensor.shape)
        del tensor
    return buffer, views


def packing_room(reservation: Reservation, budget: MemoryBudget, outputs: int, packed: int) -> Reservation | None:
    """What packing ``outputs`` bytes into ``packed`` needs beyond ``reservation`` (both copies are held for a
    moment), taken from ``budget`` now or not at all (None): a call waiting for memory while it holds its outputs
    would hold up the calls that free theirs. Zero bytes when the reservation has room."""
    missing = outputs + packed - reservation.nbytes
    if missing <= 0:
        return Reservation(budget, 0)
    try:
        return budget.reserve(missing, deadline=time.monotonic())  # a deadline already here: now or never
    except (DeadlinePassed, LimitExceeded, ServerDraining):
        return None


class IpcLease:
    """The exported tensors of one answer, held until ``release`` (once, by whoever ends the lease first).

    Packs ``prepared``'s tensors into one buffer on ``worker``'s device (taking them out of ``prepared``) and
    exports that one storage. ``on_expire`` ends the call (from the timer's thread) when ``lease_seconds`` pass
    first; ``expired`` is then the error to report.
    """

    def __init__(self, worker: DeviceWorker, prepared: PreparedLayer, lease_seconds: float,
                 on_expire: Callable[[DeadlinePassed], None]) -> None:
        self.header = pb.PreparedHeader(
            layout=layout_to_proto(prepared.layout), scalars=scalars_to_proto(prepared.tensors),
            tensors=[header_for(name, tensor) for name, tensor in prepared.tensors.items()])
        self.nbytes = sum(_nbytes(tensor) for tensor in prepared.tensors.values())
        self.lease_id = uuid.uuid4().hex
        self.expired: DeadlinePassed | None = None
        self._tensors: list[torch.Tensor] = []  # views of the packed buffer, which they keep alive
        self._counter: tuple[bytes, int] | None = None  # torch's reference counter of the exported storage
        self._lock = threading.Lock()
        self._released = False
        self._on_expire = on_expire
        self._seconds = lease_seconds
        self._timer = threading.Timer(lease_seconds, self._expire)
        self._timer.daemon = True
        try:
            with torch.cuda.device(worker.device):
                device_uuid = str(torch.cuda.get_device_properties(worker.device).uuid)
                buffer, views = pack(prepared.tensors)  # on the current stream, which the export's event follows
                worker.live.track(buffer)
                self._tensors = list(views.values())
                self.message = pb.IpcLayer(lease_id=self.lease_id, device_index=worker.device.index,
                                           lease_seconds=lease_seconds, device_uuid=device_uuid,
                                           tensors=self._export(buffer))
        except BaseException:
            self.release()  # the storage, if it was exported before the failure
            raise
        self._timer.start()

    def _export(self, buffer: torch.Tensor) -> list[pb.CudaIpcTensor]:
        """The one handle of ``buffer``'s storage, for every tensor at its own offset."""
        share = buffer.untyped_storage()._share_cuda_()
        _, handle, size, offset, counter, counter_offset, event, event_sync = share
        self._counter = (counter, counter_offset)
        return [pb.CudaIpcTensor(
            storage_handle=handle, storage_size_bytes=size, storage_offset_bytes=offset,
            tensor_offset=tensor.storage_offset(), stride=list(tensor.stride()), ref_counter_handle=counter,
            ref_counter_offset=counter_offset, event_handle=event, event_sync_required=bool(event_sync))
            for tensor in self._tensors]

    def wait_taken(self, requests: Iterator) -> None:
        """Reads the client's next request, which must take this lease; the call's end or the lease's raises."""
        try:
            request = next(requests, None)
        except grpc.RpcError:  # the call ended under the handler: the lease timer, or the client going away
            request = None
        if self.expired is not None:
            raise self.expired
        if request is None:
            raise CallCancelled("the client went away before it took the layer handed over by CUDA IPC")
        if not isinstance(request, pb.PrepareRequest) or request.WhichOneof("message") != "taken":
            raise invalid("request.taken", "did not come after response.ipc",
                          "PrepareRequest.taken once every tensor is copied")
        if request.taken.lease_id != self.lease_id:
            raise invalid("request.taken.lease_id", f"is {request.taken.lease_id!r}",
                          f"{self.lease_id!r}, the lease_id of response.ipc")
        if not self._free(taken=True):  # the lease ran out just before
            raise self.expired

    def release(self) -> None:
        """Ends the lease of a call that ends without its client having taken the layer (a no-op after)."""
        self._free(taken=False)

    def _expire(self) -> None:
        seconds = self._seconds
        if self._free(taken=False, expired=DeadlinePassed(
                f"the client did not take the layer handed over by CUDA IPC within {seconds:g}s "
                f"(--ipc-lease-timeout={seconds:g}s); its memory was freed and the copy is void", LEASE_FIELD)):
            log.warning("CUDA IPC lease %s expired after %gs: freed its %d bytes", self.lease_id, seconds, self.nbytes)
            self._on_expire(self.expired)

    def _free(self, taken: bool, expired: DeadlinePassed | None = None) -> bool:
        """Drops the tensors, once (False when already done); unless the client took them (its mappings are
        closed), gives up its counts in torch's counters too, so that the memory goes back now."""
        with self._lock:
            if self._released:
                return False
            self._released = True
            self.expired = expired
            self._timer.cancel()
            if not taken and self._counter is not None:
                torch.UntypedStorage._release_ipc_counter_cuda(*self._counter)
            self._tensors.clear()
        torch.cuda.ipc_collect()  # memory that earlier clients let go of late
        return True
