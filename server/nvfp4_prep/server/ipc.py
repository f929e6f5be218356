"""Same-node delivery: a prepared layer given to a client on this node by CUDA IPC, under a lease.

No tensor byte crosses a socket. When the layer was prepared on the GPU the client lands on
(``header.ipc_device_uuid``), the server writes it into the client's own memory: the client sends CUDA IPC
handles of its tensors (with the header, ``header.ipc_destinations``, when it knows them before the call; else
``PrepareRequest.destinations`` when asked), the server copies every tensor there, waits and says so
(``PrepareResponse.written``): one device copy, and nothing of the server's ever mapped by a client
(``IpcWriteLease``; the mappings it opens are ``client_memory``'s; on an H200 the 6.34 GB DeepSeek-R1 layer is
written in 3.4 ms, where ``clone()`` of it takes 3.05 ms, and the client has it 3.6 ms after the header).
Otherwise the client maps the server's device memory, copies it into its own and says so
(``PrepareRequest.taken``; ``IpcLease``). Until then the tensors stay with the call, and so does its memory
budget (the call's reservation lives until the call ends). Whichever comes first frees them: the client's part
done, the call's end or cancellation, or the lease timeout, which also ends
the call (DEADLINE_EXCEEDED naming ``ipc_lease_timeout``).

Handed out, the layer goes as ONE exported storage: its tensors are packed into a buffer of their own (``pack``),
since the client pays for opening and closing each storage (on an H200 a 1.6 GB layer as one storage opened in
~1.1 ms and closed in ~0.02 ms; as its 12 tensors' storages in ~2.0 ms and ~0.7 ms, and copied slower).

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
from collections.abc import Callable, Iterable, Iterator, MutableMapping, Sequence

import grpc
import torch

from nvfp4_prep.contract.node import node_id, process_id
from nvfp4_prep.contract.tensor_bytes import dense, packed_offsets, row_major_strides
from nvfp4_prep.pipeline import PreparedLayer
from nvfp4_prep.v1 import prep_pb2 as pb
from nvfp4_prep.wire import header_for, layout_to_proto, scalars_to_proto

from .budget import MemoryBudget, Reservation
from .client_memory import ClientMemory
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
    if params.process_id == process_id():
        return "the client runs in the server's own process, where CUDA IPC handles do not open"
    if resuming:
        return "the call resumes a streamed answer (header.resume_from)"
    return ""


def writes_into_client(params: Params, worker: DeviceWorker) -> bool:
    """Whether a CUDA IPC answer is written into the client's memory: it lands on the GPU the layer is on."""
    return bool(params.ipc_device_uuid) and worker.is_cuda and \
        params.ipc_device_uuid == str(torch.cuda.get_device_properties(worker.device).uuid)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s bytes in row-major order, as a flat uint8 tensor on its device."""
    return dense(tensor).reshape(-1).view(torch.uint8)


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
        span.copy_(_flat(tensor))
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


class Lease:
    """A prepared answer held for a client on this node, until ``release`` (once, by whoever ends it first).

    ``on_expire`` ends the call (from the timer's thread) when ``lease_seconds`` pass before ``settle``; ``expired``
    is then the error to report. ``waiting_for`` says what the client owes (in that error and the log).
    """

    waiting_for = ""

    def __init__(self, prepared: PreparedLayer, lease_seconds: float,
                 on_expire: Callable[[DeadlinePassed], None]) -> None:
        self.header = pb.PreparedHeader(
            layout=layout_to_proto(prepared.layout), scalars=scalars_to_proto(prepared.tensors),
            tensors=[header_for(name, tensor) for name, tensor in prepared.tensors.items()])
        self.nbytes = sum(_nbytes(tensor) for tensor in prepared.tensors.values())
        self.lease_id = uuid.uuid4().hex
        self.expired: DeadlinePassed | None = None
        self._lock = threading.Lock()
        self._released = self._settled = False
        self._on_expire = on_expire
        self._seconds = lease_seconds
        self._timer = threading.Timer(lease_seconds, self._expire)
        self._timer.daemon = True

    def reply(self, requests: Iterator, kind: str, after: str) -> pb.PrepareRequest:
        """The client's next request, which must be ``kind`` naming this lease (sent after ``after``); the call's
        end or the lease's raises."""
        try:
            request = next(requests, None)
        except grpc.RpcError:  # the call ended under the handler: the lease timer, or the client going away
            request = None
        if self.expired is not None:
            raise self.expired
        if request is None:
            raise CallCancelled(f"the client went away before it could {self.waiting_for}")
        if not isinstance(request, pb.PrepareRequest) or request.WhichOneof("message") != kind:
            raise invalid(f"request.{kind}", f"did not come after {after}", f"PrepareRequest.{kind}")
        lease_id = getattr(request, kind).lease_id
        if lease_id != self.lease_id:
            raise invalid(f"request.{kind}.lease_id", f"is {lease_id!r}", f"{self.lease_id!r}, the lease_id of {after}")
        return request

    def settle(self) -> None:
        """Stops the lease timer: the client did its part in time (raises ``expired`` when it ran out just before)."""
        with self._lock:
            if self._released:
                raise self.expired or CallCancelled(f"the call ended before its client could {self.waiting_for}")
            self._settled = True
            self._timer.cancel()

    def release(self) -> None:
        """Frees the answer (a no-op after)."""
        self._free()

    def _expire(self) -> None:
        seconds = self._seconds
        expired = DeadlinePassed(f"the client did not {self.waiting_for} within {seconds:g}s (--ipc-lease-timeout="
                                 f"{seconds:g}s); its memory was freed and the answer is void", LEASE_FIELD)
        if self._free(expired, unless_settled=True):
            log.warning("CUDA IPC lease %s expired after %gs: freed its %d bytes", self.lease_id, seconds, self.nbytes)
            self._on_expire(expired)

    def _free(self, expired: DeadlinePassed | None = None, unless_settled: bool = False) -> bool:
        """Drops the tensors, once (False when already done, or, ``unless_settled``, when the client did its
        part: checked under the same lock as ``settle``, so that the timer and the client cannot both win)."""
        with self._lock:
            if self._released or (unless_settled and self._settled):
                return False
            self._released = True
            self.expired = expired
            self._timer.cancel()
            self._drop()
        return True

    def _drop(self) -> None:
        raise NotImplementedError


class IpcLease(Lease):
    """The exported tensors of one answer (PrepareResponse.ipc), held until the client took them.

    Packs ``prepared``'s tensors into one buffer on ``worker``'s device (taking them out of ``prepared``) and
    exports that one storage.
    """

    waiting_for = "take the layer handed over by CUDA IPC"

    def __init__(self, worker: DeviceWorker, prepared: PreparedLayer, lease_seconds: float,
                 on_expire: Callable[[DeadlinePassed], None]) -> None:
        super().__init__(prepared, lease_seconds, on_expire)
        self._tensors: list[torch.Tensor] = []  # views of the packed buffer, which they keep alive
        self._counter: tuple[bytes, int] | None = None  # torch's reference counter of the exported storage
        self._taken = False
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
        self.reply(requests, "taken", "response.ipc")
        self.settle()
        self._taken = True  # its mappings are closed: torch's counter is the client's to have counted down
        self.release()

    def _drop(self) -> None:
        """Unless the client took the tensors, gives up its count in torch's counter too, so that the memory goes
        back now; then lets go of the memory that earlier clients let go of late."""
        if not self._taken and self._counter is not None:
            torch.UntypedStorage._release_ipc_counter_cuda(*self._counter)
        self._tensors.clear()
        torch.cuda.ipc_collect()


class IpcWriteLease(Lease):
    """The prepared tensors of one answer (taken out of ``prepared``), held until the server wrote them into the
    client's memory on ``worker``'s GPU: at destinations the header named (``named``), or that the client sends
    when asked (PrepareResponse.ipc_write, PrepareRequest.destinations; ``destinations``); then ``write``."""

    waiting_for = "send the destinations of the layer prepared on its GPU"

    def __init__(self, worker: DeviceWorker, prepared: PreparedLayer, lease_seconds: float,
                 on_expire: Callable[[DeadlinePassed], None]) -> None:
        super().__init__(prepared, lease_seconds, on_expire)
        self._device = worker.device
        self._tensors = [prepared.tensors.pop(name) for name in list(prepared.tensors)]
        # What each destination is called in an error: as sent when asked for, by name when named up front.
        self._fields = [f"request.destinations.tensors[{index}]" for index in range(len(self._tensors))]
        self.message = pb.IpcWrite(lease_id=self.lease_id, lease_seconds=lease_seconds)
        self._timer.start()

    def named(self, destinations: Sequence[pb.IpcDestination]) -> pb.IpcDestinations:
        """``header.ipc_destinations`` (sent up front) in the answer's order, once each names one of its tensors
        with its dtype and shape; nothing then waits for the client."""
        field = "header.ipc_destinations"
        by_name: dict[str, pb.IpcDestination] = {}
        for index, destination in enumerate(destinations):
            if destination.tensor.name in by_name:
                raise invalid(f"{field}[{index}].tensor.name", f"is {destination.tensor.name!r} again",
                              "each prepared tensor once")
            by_name[destination.tensor.name] = destination
        ordered = []
        for spec in self.header.tensors:
            destination = by_name.pop(spec.name, None)
            if destination is None:
                raise invalid(field, f"has no tensor {spec.name!r}",
                              f"one per prepared tensor: {[want.name for want in self.header.tensors]}")
            got, want = (destination.tensor.dtype, list(destination.tensor.shape)), (spec.dtype, list(spec.shape))
            if got != want:
                raise invalid(f"{field}[{spec.name!r}]", f"is {got[0]} of shape {got[1]}",
                              f"{want[0]} of shape {want[1]}, as the answer's {spec.name}")
            ordered.append(destination.memory)
        if by_name:
            raise invalid(field, f"names {sorted(by_name)[0]!r}", "only the answer's tensors")
        self.settle()
        self._fields = [f"{field}[{spec.name!r}].memory" for spec in self.header.tensors]
        return pb.IpcDestinations(lease_id=self.lease_id, tensors=ordered)

    def destinations(self, requests: Iterator) -> pb.IpcDestinations:
        """The client's destinations, which must come next and within the lease."""
        request = self.reply(requests, "destinations", "response.ipc_write")
        self.settle()
        return request.destinations

    def write(self, destinations: pb.IpcDestinations, memory: ClientMemory) -> pb.IpcWritten:
        """Copies every tensor into its destination and waits for the copies. Every destination is checked (and
        mapped) first: one that does not fit is INVALID_ARGUMENT with nothing written."""
        field = "request.destinations.tensors"
        if len(destinations.tensors) != len(self._tensors):
            raise invalid(field, f"holds {len(destinations.tensors)} tensors",
                          f"{len(self._tensors)}, one per response.header.tensors entry")
        started = time.perf_counter()
        with torch.cuda.device(self._device):
            copies = []
            for where, shared, tensor in zip(self._fields, destinations.tensors, self._tensors, strict=True):
                if not tensor.numel():
                    continue
                if tuple(shared.stride) != row_major_strides(tensor.shape):
                    raise invalid(f"{where}.stride", f"is {list(shared.stride)}",
                                  f"the row-major {list(row_major_strides(tensor.shape))}")
                target = memory.destination(self._device.index, shared, _nbytes(tensor), tensor.element_size(),
                                            where)
                copies.append((target, tensor))
            mapped = time.perf_counter()
            # A stream of its own: the tensors are whole already (the worker waited for its compute), and no other
            # call's work on the device's default stream holds the copies up.
            stream = torch.cuda.Stream(self._device)
            with torch.cuda.stream(stream):
                for target, tensor in copies:
                    target.copy_(_flat(tensor), non_blocking=True)
            # A few milliseconds that the client waits out too: spinning wakes sooner than a blocking event.
            stream.synchronize()
        log.debug("cuda_ipc: lease %s: %d bytes written into the client's memory in %.6f s (its destinations "
                  "checked and mapped in %.6f s)", self.lease_id, self.nbytes, time.perf_counter() - started,
                  mapped - started)
        self.release()
        return pb.IpcWritten(lease_id=self.lease_id)

    def _drop(self) -> None:
        self._tensors.clear()
